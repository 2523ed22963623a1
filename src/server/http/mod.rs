//! The HTTP edge, in the order a request passes through it: `listener` (sockets,
//! per-address budgets, timeouts, the lean stream path), `routes` (the Axum router),
//! `origin` (cross-site checks), `admission` (what both stream transports check before a
//! stream opens), `stream` (`/api/sse`), `websocket` (`/api/ws`), `publish` (the HTTP
//! publish API), `webhook` (signed callbacks of other services), `inbox` (the
//! notification center), `dashboard` (the operators' page), and `error`, the JSON error
//! every route answers with. It uses the core and the shared pieces, and nothing uses it
//! but the facade.

mod admission;
pub mod dashboard;
mod error;
pub mod inbox;
#[cfg(unix)]
pub(crate) mod listener;
pub mod openapi;
mod origin;
pub mod publish;
pub(crate) mod routes;
pub mod stream;
pub mod webhook;
pub mod websocket;

pub use error::ApiError;
