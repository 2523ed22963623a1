//! The server half (feature `ssr`): the SSE endpoint, the publish API and the typed
//! [`SseService`] API, on an in-process or Redis [`Broker`].
//!
//! Build the [`Routes`] into your Axum app, put the [`SseService`] into the Leptos context,
//! and serve through [`SseListener`] (on unix; plain `axum::serve` works too, with about
//! four times the memory per open stream and no protection against idle sockets):
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use sse_notify::server::{Routes, SseConfig, SseListener, SseService};
//!
//! let sse = SseService::start(SseConfig::from_env()?).await?;
//! let app: axum::Router = axum::Router::new()
//!     // .leptos_routes_with_context(&options, routes, { let s = sse.clone(); move || leptos::prelude::provide_context(s.clone()) }, ..)
//!     .merge(Routes::new(&sse).build());
//! SseListener::bind("127.0.0.1:3000".parse()?)
//!     .await?
//!     .serve(app, &sse)
//!     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Layout, one folder per layer, each using only the ones below it:
//! - [`http`]: the edge, in the order a request passes through it (`listener`, `routes`,
//!   `origin`, `admission`, `stream`, `websocket`, `publish`);
//! - [`core`]: [`SseService`] (the typed API and the protocol of opening and closing a
//!   stream), one stream's body, paged replay, and this process's connections (`hub`,
//!   `mailbox`);
//! - [`broker`]: ids, history and fan-out (in-process, one Redis or a Redis Cluster),
//!   handing events to a [`Delivery`](broker::Delivery), the hub;
//! - shared pieces beside them: `config`, `auth` (used by the core and the edge),
//!   `event` (ids, targets, frames), `metrics`, and the leaves `clock` and `address`.
//!
//! No module imports this file's re-exports; they are for the crate's users.

mod address;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
pub mod core;
pub mod event;
pub mod http;
pub mod inbox;
pub mod metrics;
pub mod webhook;

pub use self::core::connection::{ConnectionPermit, EventStream};
/// The modules' former paths, kept for code that names them.
pub use self::core::presence::{
    ClusterStats, InstanceConnections, InstanceFigures, InstanceStats, Presence, StatsReport,
};
pub use self::core::service;
pub use self::core::service::{
    OpenError, RateLimited, Resume, SendError, SseService, SseServiceBuilder, StartError,
};
pub use crate::api::{BrokerHealth, Stats};
pub use address::TrustedProxies;
pub use auth::{Auth, AuthError, Authenticate, Claims, Identity, SESSION_COOKIE};
pub use broker::{Broker, BrokerError};
pub use clock::now_ms;
pub use config::{ConfigError, CookieSecure, SseConfig};
pub use event::{EventId, Target};
#[cfg(unix)]
pub use http::listener::{Serve, SseListener};
pub use http::routes::Routes;
#[cfg(feature = "demo")]
pub use http::routes::{session_cookie, session_cookie_removal, SESSION_TTL};
pub use http::ApiError;
pub use http::{openapi, publish, stream, websocket};
pub use webhook::WebhookSecrets;
