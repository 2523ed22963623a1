//! The browser side: the [`use_sse`] hook, the [`SseNotifications`] toasts and the
//! [`Toaster`] behind them.
//!
//! All compile for the server too, where they render the empty markup and open nothing,
//! so they can sit in any SSR-rendered Leptos view.

mod inbox;
mod notifications;
mod served;
mod toaster;
mod use_sse;

pub use inbox::{
    inbox_first_page, provide_inbox, use_inbox, FirstPage, Inbox, InboxOptions, InboxState, LocalChange,
    NotificationBell, INBOX_STYLES,
};
pub use notifications::{
    use_connection_status, ConnectionStatus, Position, SSENotifications, SseNotifications, Theme, STYLES,
};
pub use toaster::{
    expect_toaster, provide_toaster, use_toaster, NewToast, Toast, ToastAction, ToastDuration, ToastId,
    ToastKind, ToastLabels, ToastStore, Toaster, MISSED_TOASTS,
};
pub use use_sse::{
    use_sse, use_sse_with_options, ConnectionReadyState, SseMessage, Transport, TransportMode, UseSseError,
    UseSseOptions, UseSseReturn,
};
