//! The [`use_sse`] hook: the notification stream as Leptos signals, one stream per browser.
//!
//! ## Usage
//!
//! ```no_run
//! use leptos::prelude::*;
//! use sse_notify::client::{use_sse_with_options, ConnectionReadyState, SseMessage, UseSseOptions, UseSseReturn};
//!
//! #[component]
//! fn Status() -> impl IntoView {
//!     let UseSseReturn { ready_state, last_event, .. } = use_sse_with_options(
//!         UseSseOptions::default()
//!             .events(vec!["notification".into(), "order.shipped".into()])
//!             .on_message(|msg: &SseMessage| leptos::logging::log!("{} {}", msg.event, msg.data)),
//!     );
//!     view! {
//!         <p>{move || if ready_state.get() == ConnectionReadyState::Open { "live" } else { "offline" }}</p>
//!         <p>{move || last_event.get().map(|m| m.data)}</p>
//!     }
//! }
//! ```
//!
//! What it does for you:
//! - **one stream for all tabs**: tabs of the same origin and user elect a leader (Web
//!   Locks); only the leader holds the `EventSource` and relays every event to the others
//!   (BroadcastChannel), so a user with many tabs holds one connection. When the leader
//!   closes or crashes, another tab takes over and resumes from the last id any tab saw.
//!   Where Web Locks are missing, each tab opens its own stream;
//! - every event reaches `on_message`, even in a burst, and an event id seen before is
//!   dropped;
//! - on an error or a stall it reconnects with exponential backoff and jitter, resuming from
//!   the last id it saw (`lastEventId`), so nothing is missed; after giving up it tries again
//!   when the browser comes back online or the tab becomes visible;
//! - a `resync` (events no longer kept), a stall, a `connection_replaced` and an ended
//!   session (`Unauthorized`: expired or logged out) show up in `error`. Replaced and
//!   unauthorized streams do not reconnect by themselves; with `token_url`, an expired
//!   session fetches a fresh token and carries on;
//! - the stream is closed when the owner is cleaned up.
//!
//! ## Server-Side Rendering
//!
//! On the server (feature `ssr`) the hook opens nothing: the signals keep their initial
//! values and `open` / `close` do nothing. The signature is the same on both sides, and the
//! browser code runs in any build without `ssr` (hydrated or client-side rendered).

use std::sync::Arc;

use default_struct_builder::DefaultBuilder;
use leptos::prelude::*;

use crate::{
    api,
    events::{names, Event, ValidationError},
};

/// Where the stream is, as `EventSource.readyState` and leptos-use name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ConnectionReadyState {
    /// Opening, or waiting to reopen after an error.
    Connecting,
    Open,
    Closing,
    /// Closed, and not reopening by itself.
    #[default]
    Closed,
}

impl ConnectionReadyState {
    /// `connecting`, `open`, `closing` or `closed`, e.g. for a `data-` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionReadyState::Connecting => "connecting",
            ConnectionReadyState::Open => "open",
            ConnectionReadyState::Closing => "closing",
            ConnectionReadyState::Closed => "closed",
        }
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    fn parse(s: &str) -> Self {
        match s {
            "connecting" => Self::Connecting,
            "open" => Self::Open,
            "closing" => Self::Closing,
            _ => Self::Closed,
        }
    }
}

/// One event as received.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SseMessage {
    /// The event id (empty for events the server sends without one, like `resync`).
    pub id: String,
    /// The event name.
    pub event: String,
    /// The `data` JSON as text.
    pub data: String,
}

impl SseMessage {
    /// The typed event, through the model the server validated it with.
    pub fn parse(&self) -> Result<Event, ValidationError> {
        Event::parse(&self.event, &self.data)
    }
}

/// What went wrong with the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UseSseError {
    /// The connection failed or dropped; a reconnect may be on its way.
    #[error("connection lost")]
    Connection,
    /// Nothing (not even a heartbeat) arrived within `retry_timeout`.
    #[error("no event or heartbeat for {0} ms")]
    Stalled(u64),
    /// The server no longer keeps some events this client missed: reload state.
    #[error("some events may have been missed: {0}")]
    Resync(String),
    /// The same user opened a newer connection; this one was closed and stays closed.
    #[error("replaced by a newer connection of the same user")]
    Replaced,
    /// The session is not (or no longer) valid: it expired, the user logged out, or the
    /// server refused it. The stream stays closed until the session changes (`user_id`), a
    /// fresh token comes from `token_url`, or `open` is called.
    #[error("not signed in, or the session ended")]
    Unauthorized,
    /// `max_reconnect_attempts` reconnects failed in a row.
    #[error("gave up after {0} reconnect attempts")]
    GaveUp(u32),
}

impl UseSseError {
    /// A short stable name of the kind of error, e.g. for a `data-` attribute or a log field:
    /// `connection`, `stalled`, `resync`, `replaced`, `unauthorized` or `gave-up`.
    pub fn code(&self) -> &'static str {
        match self {
            UseSseError::Connection => "connection",
            UseSseError::Stalled(_) => "stalled",
            UseSseError::Resync(_) => "resync",
            UseSseError::Replaced => "replaced",
            UseSseError::Unauthorized => "unauthorized",
            UseSseError::GaveUp(_) => "gave-up",
        }
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    fn from_code(code: &str, detail: &str) -> Option<Self> {
        Some(match code {
            "connection" => Self::Connection,
            "stalled" => Self::Stalled(detail.parse().unwrap_or(0)),
            "resync" => Self::Resync(detail.to_string()),
            "replaced" => Self::Replaced,
            "unauthorized" => Self::Unauthorized,
            "gave-up" => Self::GaveUp(detail.parse().unwrap_or(0)),
            _ => return None,
        })
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    fn detail(&self) -> String {
        match self {
            Self::Stalled(ms) => ms.to_string(),
            Self::Resync(why) => why.clone(),
            Self::GaveUp(n) => n.to_string(),
            _ => String::new(),
        }
    }
}

/// Options of [`use_sse_with_options`].
#[derive(Clone, DefaultBuilder)]
pub struct UseSseOptions {
    /// The stream URL, e.g. `/notify/api/sse` when the routes sit under a prefix. Defaults
    /// to `/api/sse`.
    #[builder(into)]
    pub url: String,
    /// The signed-in user. When given, the stream is open only while it is `Some`, and is
    /// reopened when it changes (the server takes the identity from the session, this only
    /// tells the hook when the session changed). Defaults to `None`: connect at once.
    #[builder(into)]
    pub user_id: Option<Signal<Option<String>>>,
    /// A session token sent as `?token=`, for pages that cannot use the `sse_session`
    /// cookie (e.g. another origin). Defaults to `None`.
    pub session_id: Option<String>,
    /// Where to get a fresh token when the session ends or is refused: `GET` with
    /// credentials, answering `{"token": "..."}` (or the token as text). The token is then
    /// sent as `?token=`. Defaults to `None`: an ended session stays closed.
    pub token_url: Option<String>,
    /// Event names to receive (sent as the `events=` filter). An EventSource only hears
    /// events it listens for by name, so custom events must be named here. Defaults to
    /// `None`: the five built-in events.
    #[builder(into)]
    pub events: Option<Vec<String>>,
    /// Open at once (`true`) or only when `open` is called. Defaults to `true`.
    pub immediate: bool,
    /// Send cookies with the stream request (`EventSource`'s `withCredentials`); needed for
    /// a stream on another origin. Defaults to `None`: on for an absolute `url`.
    pub with_credentials: Option<bool>,
    /// Share one stream between the tabs of this origin and user (Web Locks and
    /// BroadcastChannel). Defaults to `true`.
    pub share_across_tabs: bool,
    /// Milliseconds without any event or heartbeat after which the stream counts as
    /// stalled and is reopened; set it above twice the server's heartbeat interval.
    /// Defaults to 65,000.
    pub retry_timeout: u64,
    /// Called for every event (heartbeats excepted), in order. Defaults to nothing.
    pub on_message: Arc<dyn Fn(&SseMessage) + Send + Sync>,
    /// Called on every error. Defaults to nothing.
    pub on_error: Arc<dyn Fn(&UseSseError) + Send + Sync>,
    /// Called when the stream opens. Defaults to nothing.
    pub on_open: Arc<dyn Fn() + Send + Sync>,
    /// Called when the stream closes. Defaults to nothing.
    pub on_close: Arc<dyn Fn() + Send + Sync>,
    /// Reconnect after errors and stalls. Defaults to `true`.
    pub auto_reconnect: bool,
    /// First reconnect delay in ms; it doubles per failed attempt, with jitter, up to 30 s.
    /// Defaults to 1,000.
    pub reconnect_interval: u64,
    /// Failed reconnects in a row before giving up; `None` never gives up. Defaults to `Some(10)`.
    pub max_reconnect_attempts: Option<u32>,
}

impl Default for UseSseOptions {
    fn default() -> Self {
        Self {
            url: api::STREAM_PATH.into(),
            user_id: None,
            session_id: None,
            token_url: None,
            events: None,
            immediate: true,
            with_credentials: None,
            share_across_tabs: true,
            retry_timeout: 65_000,
            on_message: Arc::new(|_| {}),
            on_error: Arc::new(|_| {}),
            on_open: Arc::new(|| {}),
            on_close: Arc::new(|| {}),
            auto_reconnect: true,
            reconnect_interval: 1_000,
            max_reconnect_attempts: Some(10),
        }
    }
}

impl UseSseOptions {
    #[cfg_attr(feature = "ssr", allow(dead_code))]
    /// The names the EventSource listens for: the payload events plus the control ones.
    fn listened_names(&self) -> Vec<String> {
        let mut listened: Vec<String> = match &self.events {
            Some(events) => events.clone(),
            None => names::BUILT_IN.iter().map(|n| n.to_string()).collect(),
        };
        for control in names::CONTROL {
            if !listened.iter().any(|n| n == control) {
                listened.push(control.to_string());
            }
        }
        listened
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    /// The stream URL with filter, resume point and token.
    fn stream_url(&self, last_event_id: Option<&str>, token: Option<&str>) -> String {
        let mut params = Vec::new();
        if let Some(events) = &self.events {
            params.push(format!("events={}", encode(&events.join(","))));
        }
        if let Some(id) = last_event_id.filter(|id| !id.is_empty()) {
            params.push(format!("lastEventId={}", encode(id)));
        }
        if let Some(token) = token {
            params.push(format!("token={}", encode(token)));
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        if params.is_empty() {
            self.url.clone()
        } else {
            format!("{}{sep}{}", self.url, params.join("&"))
        }
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    fn credentials(&self) -> bool {
        self.with_credentials
            .unwrap_or_else(|| self.url.starts_with("http://") || self.url.starts_with("https://"))
    }
}

/// Percent-encodes a query value.
#[cfg_attr(feature = "ssr", allow(dead_code))]
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What [`use_sse`] returns.
pub struct UseSseReturn<Open, Close>
where
    Open: Fn() + Clone + Send + Sync,
    Close: Fn() + Clone + Send + Sync,
{
    /// Where the stream is: connecting, open or closed (in a tab that shares another tab's
    /// stream, where that stream is).
    pub ready_state: Signal<ConnectionReadyState>,
    /// The latest problem, cleared when the stream opens again.
    pub error: Signal<Option<UseSseError>>,
    /// The latest event (heartbeats excepted). Use `on_message` to see every one of a burst.
    pub last_event: Signal<Option<SseMessage>>,
    /// The id the next reconnect resumes after.
    pub last_event_id: Signal<Option<String>>,
    /// This tab holds the stream (the others share it); `true` when not sharing.
    pub is_leader: Signal<bool>,
    /// (Re)opens the stream now, resuming after the last seen id; also after giving up,
    /// being replaced or an ended session.
    pub open: Open,
    /// Closes the stream and stops reconnecting (another tab may take over the shared one).
    pub close: Close,
}

/// [`use_sse_with_options`] with the default options.
pub fn use_sse() -> UseSseReturn<impl Fn() + Clone + Send + Sync, impl Fn() + Clone + Send + Sync> {
    use_sse_with_options(UseSseOptions::default())
}

/// Opens the notification stream; see the [module docs](self).
pub fn use_sse_with_options(
    options: UseSseOptions,
) -> UseSseReturn<impl Fn() + Clone + Send + Sync, impl Fn() + Clone + Send + Sync> {
    let signals = Signals {
        ready_state: RwSignal::new(ConnectionReadyState::Closed),
        error: RwSignal::new(None::<UseSseError>),
        last_event: RwSignal::new(None::<SseMessage>),
        last_event_id: RwSignal::new(None::<String>),
        is_leader: RwSignal::new(true),
    };

    #[cfg(not(feature = "ssr"))]
    let (open, close) = browser::start(options, signals);

    #[cfg(feature = "ssr")]
    let (open, close) = {
        let _ = options;
        (|| (), || ())
    };

    UseSseReturn {
        ready_state: signals.ready_state.into(),
        error: signals.error.into(),
        last_event: signals.last_event.into(),
        last_event_id: signals.last_event_id.into(),
        is_leader: signals.is_leader.into(),
        open,
        close,
    }
}

#[derive(Clone, Copy)]
#[cfg_attr(feature = "ssr", allow(dead_code))]
struct Signals {
    ready_state: RwSignal<ConnectionReadyState>,
    error: RwSignal<Option<UseSseError>>,
    last_event: RwSignal<Option<SseMessage>>,
    last_event_id: RwSignal<Option<String>>,
    is_leader: RwSignal<bool>,
}

#[cfg(not(feature = "ssr"))]
mod browser;
#[cfg(not(feature = "ssr"))]
mod tabs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_url_carries_filter_resume_point_and_token() {
        let o = UseSseOptions::default();
        assert_eq!(o.stream_url(None, None), "/api/sse");
        let o = o.events(vec!["a".into(), "b.c".into()]);
        assert_eq!(
            o.stream_url(Some("42"), Some("t k")),
            "/api/sse?events=a,b.c&lastEventId=42&token=t%20k"
        );
    }

    #[test]
    fn errors_travel_between_tabs_by_code() {
        for e in [
            UseSseError::Connection,
            UseSseError::Stalled(65_000),
            UseSseError::Resync("why".into()),
            UseSseError::Replaced,
            UseSseError::Unauthorized,
            UseSseError::GaveUp(10),
        ] {
            assert_eq!(UseSseError::from_code(e.code(), &e.detail()), Some(e));
        }
        for s in [
            ConnectionReadyState::Connecting,
            ConnectionReadyState::Open,
            ConnectionReadyState::Closing,
            ConnectionReadyState::Closed,
        ] {
            assert_eq!(ConnectionReadyState::parse(s.as_str()), s);
        }
    }

    #[test]
    fn credentials_go_with_absolute_urls_unless_set() {
        assert!(!UseSseOptions::default().credentials());
        assert!(UseSseOptions::default()
            .url("https://n.example/api/sse")
            .credentials());
        assert!(!UseSseOptions::default()
            .url("https://n.example/api/sse")
            .with_credentials(Some(false))
            .credentials());
    }

    #[test]
    fn control_events_are_always_listened_for() {
        let names = UseSseOptions::default().events(vec!["x".into()]).listened_names();
        assert_eq!(
            names,
            ["x", "heartbeat", "resync", "connection_replaced", "session_ended"]
        );
    }
}
