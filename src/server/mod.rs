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
//! Layout, in the order a request passes through it, from the socket in:
//! - the HTTP edge: `listener` (sockets, per-address budgets, timeouts, the lean stream
//!   path), `routes`, `origin` (cross-site checks), `stream` (`/api/sse` and the stream
//!   admission shared with `websocket`), `publish` (the HTTP publish API);
//! - the core: `service` ([`SseService`]: the typed API and the protocol of opening and
//!   closing a stream), `connection` (one stream's body), `replay` (backlogs in pages),
//!   `hub` and `mailbox` (this process's connections, each with a bounded queue);
//! - `broker`: ids, history and fan-out (in-process, one Redis or a Redis Cluster),
//!   handing events to a [`Delivery`](broker::Delivery), the hub;
//! - shared by all: `event` (ids, targets, frames), `auth`, `config`, `metrics`, and the
//!   leaves `clock` and `address`, which use nothing of the server.
//!
//! The brokers use only `event`, `clock` and `metrics`; the core uses the brokers; the
//! edge uses the core; within the core, `service` uses `connection`, `replay` and `hub`,
//! which use nothing of it (a stream reports its end through `connection::StreamEnded`).
//! (Some modules still import the items this file re-exports.)

mod address;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod config;
mod connection;
pub mod event;
mod hub;
#[cfg(unix)]
mod listener;
mod mailbox;
pub mod metrics;
mod origin;
pub mod publish;
mod replay;
mod routes;
pub mod service;
pub mod stream;
pub mod websocket;

pub use crate::api::{BrokerHealth, Stats};
pub use auth::{Auth, AuthError, Authenticate, Claims, Identity, SESSION_COOKIE};
pub use broker::{Broker, BrokerError};
pub use clock::now_ms;
pub use config::{ConfigError, CookieSecure, SseConfig};
pub use connection::{ConnectionPermit, EventStream};
pub use event::{EventId, Target};
#[cfg(unix)]
pub use listener::{Serve, SseListener};
pub use routes::Routes;
#[cfg(feature = "demo")]
pub use routes::{session_cookie, session_cookie_removal, SESSION_TTL};
pub use service::{OpenError, RateLimited, Resume, SendError, SseService, SseServiceBuilder, StartError};

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use crate::events::ValidationError;

/// An HTTP error with a JSON body: `{"error": "...", "field": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, error)
    }

    /// 503 with `Retry-After: 1`.
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, error).retry_after(1)
    }

    #[must_use]
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    #[must_use]
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let field = e.field.clone();
        Self::bad_request(e.to_string()).field(field)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(field) = self.field {
            body["field"] = field.into();
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
