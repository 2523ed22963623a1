//! The host app's own page: the toasts from sse-notify in the bottom-left corner.
use leptos::prelude::*;
use sse_notify::client::{Position, SseNotifications};

#[component]
pub fn App() -> impl IntoView {
    view! {
        <h1>"My app"</h1>
        <SseNotifications position=Position::BottomLeft max_notifications=3 />
    }
}

/// The host's own WASM entry; sse-notify without `demo` exports none, so this cannot clash.
#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    leptos::mount::hydrate_body(App);
}
