//! Real-time server-to-client notifications for Leptos apps over Server-Sent Events.
//!
//! - [`events`]: the event model shared by server and browser; [`api`]: the HTTP contract
//!   (route paths, stats) both sides rely on; [`backoff`]: the one retry formula.
//! - [`client`]: the browser side, the [`use_sse`](client::use_sse) hook and the
//!   [`SseNotifications`](client::SseNotifications) toasts (no-ops when rendered on the server).
//! - `server` (feature `ssr`): the SSE endpoint, publish API and [`SseService`](server::SseService).
//! - `app` (feature `demo`): the demo pages of this crate's own binary.

#![recursion_limit = "256"]

pub mod api;
pub mod backoff;
pub mod client;
pub mod events;

#[cfg(feature = "demo")]
pub mod app;

#[cfg(feature = "ssr")]
pub mod server;

/// The demo app's WASM entry. Behind `demo`, so a host app has no second `hydrate` export.
#[cfg(all(feature = "hydrate", feature = "demo"))]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
