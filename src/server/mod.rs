//! The server half (feature `ssr`): the SSE endpoint, the publish API and the typed
//! [`SseService`] API, on an in-process or Redis [`Broker`](broker::Broker).
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
//! Layout, from the bottom up (each module uses only those above it in this list):
//! - `event`: event ids, targets and published events with their shared SSE frame;
//! - `hub`: this process's connections, per user, each with a bounded queue;
//! - `broker`: ids, history and fan-out (in-process or Redis), handing events to a
//!   [`Delivery`](broker::Delivery);
//! - `service` + `connection`: [`SseService`], which owns the hub and the broker and runs
//!   the protocol of opening and closing a stream;
//! - `auth`: who a request is from; `stream`, `publish`, `routes`, `listener`: HTTP glue
//!   around the service.

pub mod auth;
pub mod broker;
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
pub use config::{ConfigError, CookieSecure, SseConfig};
pub use connection::EventStream;
pub use event::{EventId, Target};
#[cfg(unix)]
pub use listener::{Serve, SseListener};
pub use routes::Routes;
#[cfg(feature = "demo")]
pub use routes::{session_cookie, session_cookie_removal, SESSION_TTL};
pub use service::{
    ConnectionPermit, OpenError, RateLimited, Resume, SendError, SseService, SseServiceBuilder, StartError,
};

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};

use crate::events::ValidationError;

/// The key of per-address budgets and rate limits: the address, or its /64 for IPv6 (one
/// subscriber usually holds a whole /64); IPv4-mapped IPv6 addresses count as IPv4.
pub(crate) fn address_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut bytes = v6.octets();
                bytes[8..].fill(0);
                IpAddr::V6(bytes.into())
            }
        },
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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
