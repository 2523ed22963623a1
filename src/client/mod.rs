//! The browser side: the [`use_sse`] hook and the [`SseNotifications`] toasts.
//!
//! Both compile for the server too, where they render the empty markup and open nothing,
//! so they can sit in any SSR-rendered Leptos view.

mod notifications;
mod use_sse;

pub use notifications::{ConnectionStatus, Position, SseNotifications, Toast, ToastKind, ToastStore};
pub use use_sse::{
    use_sse, use_sse_with_options, ConnectionReadyState, SseMessage, UseSseError, UseSseOptions, UseSseReturn,
};
