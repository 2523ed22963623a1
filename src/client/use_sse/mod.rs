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
//! - **one stream for all tabs**: tabs of the same origin and identity elect a leader (Web
//!   Locks); only the leader holds the `EventSource` and relays every event to the others
//!   (BroadcastChannel), so a user with many tabs holds one connection. The identity is
//!   the server's: a tab asks (`HEAD`) for its identity tag before it joins, and a leader
//!   whose stream turns out to be another identity's moves to that identity's tabs before
//!   relaying anything, so two users signed in in one browser never hear each other's
//!   events. When the leader closes or crashes, another tab takes over and resumes from the
//!   last id any tab saw (the stream's opening id included). Where Web Locks are missing,
//!   each tab opens its own stream;
//! - every event reaches `on_message`, even in a burst, and an event id seen before is
//!   dropped;
//! - on an error or a stall it reconnects with exponential backoff and jitter, resuming from
//!   the last id it saw (`lastEventId`), so nothing is missed; after giving up it tries again
//!   when the browser comes back online or the tab becomes visible;
//! - a `resync` (events no longer kept), a stall, a `connection_replaced` and an ended
//!   session (`Unauthorized`: expired or logged out) show up in `error`. Replaced and
//!   unauthorized streams do not reconnect by themselves; with `token_url`, an expired
//!   session fetches a fresh token and carries on (with `token_first`, the first token
//!   comes from there too);
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

/// How the stream travels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Server-Sent Events (`EventSource`), the default.
    #[default]
    Sse,
    /// The same stream over WebSocket, when something in between buffers SSE.
    WebSocket,
}

impl Transport {
    /// `sse` or `websocket`, e.g. for a `data-` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::WebSocket => "websocket",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        [Transport::Sse, Transport::WebSocket]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// Which transport the hook may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TransportMode {
    /// SSE, falling back to WebSocket when SSE is found buffered (its `ready` event does
    /// not come within `buffering_timeout`) or fails to open three times while the server
    /// answers; SSE is tried again every `sse_retry_interval`.
    #[default]
    Auto,
    /// SSE only.
    Sse,
    /// WebSocket only.
    WebSocket,
}

impl TransportMode {
    /// `auto`, `sse` or `websocket`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "sse" => Some(Self::Sse),
            "websocket" => Some(Self::WebSocket),
            _ => None,
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
    /// Missed while away: sent before the stream's `ready` (a replay after
    /// `Last-Event-ID`, or what waited while the user was offline), not live. The toaster
    /// sums up a burst of these in one toast when an inbox holds them.
    #[serde(default)]
    pub replayed: bool,
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
    /// Nothing (not even a heartbeat) arrived within `stall_timeout`.
    #[error("no event or heartbeat for {0} ms")]
    Stalled(u64),
    /// The server no longer keeps some events this client missed: reload state.
    #[error("some events may have been missed: {0}")]
    Resync(String),
    /// The same user opened a newer connection; this one was closed and stays closed.
    #[error("replaced by a newer connection of the same user")]
    Replaced,
    /// The session is not (or no longer) valid: it expired, the user logged out, the
    /// server refused it, or `token_url` refused a token (401 or 403). The stream stays
    /// closed until the session changes (`user_id`), a fresh token comes from `token_url`,
    /// or `open` is called.
    #[error("not signed in, or the session ended")]
    Unauthorized,
    /// `max_reconnect_attempts` reconnects failed in a row.
    #[error("gave up after {0} reconnect attempts")]
    GaveUp(u32),
    /// The SSE response opened but its first event did not arrive within this many ms:
    /// something in between (a proxy, a CDN) holds the stream back. With
    /// `TransportMode::Auto` the hook goes on over WebSocket.
    #[error("the stream is held back by something in between (no event {0} ms after it opened)")]
    Buffered(u64),
}

impl UseSseError {
    /// A short stable name of the kind of error, e.g. for a `data-` attribute or a log field:
    /// `connection`, `stalled`, `resync`, `replaced`, `unauthorized`, `gave-up` or `buffered`.
    pub fn code(&self) -> &'static str {
        match self {
            UseSseError::Connection => "connection",
            UseSseError::Stalled(_) => "stalled",
            UseSseError::Resync(_) => "resync",
            UseSseError::Replaced => "replaced",
            UseSseError::Unauthorized => "unauthorized",
            UseSseError::GaveUp(_) => "gave-up",
            UseSseError::Buffered(_) => "buffered",
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
            "buffered" => Self::Buffered(detail.parse().unwrap_or(0)),
            _ => return None,
        })
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    fn detail(&self) -> String {
        match self {
            Self::Stalled(ms) => ms.to_string(),
            Self::Resync(why) => why.clone(),
            Self::GaveUp(n) => n.to_string(),
            Self::Buffered(ms) => ms.to_string(),
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
    /// cookie (e.g. another origin). Defaults to `None`. (Was `session_id`, which still
    /// works as a setter.)
    pub token: Option<String>,
    /// Where to get a fresh token when the session ends or is refused: `GET` with
    /// credentials, answering `{"token": "..."}` (or the token as text). The token is then
    /// sent as `?token=`. Defaults to `None`: an ended session stays closed.
    pub token_url: Option<String>,
    /// Get the first token from `token_url` too, before the first stream opens, instead of
    /// opening with the cookie: for a page whose stream is on another origin, or that
    /// streams on short-lived tokens only. Ignored with a `token`. A refused fetch
    /// (401 or 403) stops the hook with `Unauthorized`; any other failure, or no answer
    /// within 10 s, is retried with the reconnect backoff. Defaults to `false`.
    pub token_first: bool,
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
    /// Share one stream between the tabs of this origin and identity (Web Locks and
    /// BroadcastChannel; the identity is the one the server confirmed, see
    /// [`UseSseReturn::identity_tag`]). Defaults to `true`.
    pub share_across_tabs: bool,
    /// SSE, WebSocket, or SSE with a WebSocket fallback. Defaults to `Auto`.
    pub transport: TransportMode,
    /// The WebSocket URL. Defaults to `None`: `url` with its last `/sse` replaced by `/ws`
    /// (`/api/sse` -> `/api/ws`), on the page's host for a relative `url`.
    pub ws_url: Option<String>,
    /// Milliseconds after the SSE response opens within which its first event must come,
    /// else the stream counts as buffered. Defaults to 5,000.
    pub buffering_timeout: u64,
    /// Milliseconds on WebSocket after which SSE is tried again. Defaults to 60,000.
    pub sse_retry_interval: u64,
    /// Milliseconds without any event or heartbeat after which the stream counts as
    /// stalled and is reopened. Defaults to `None`: twice the heartbeat interval the
    /// server announces in its `ready` event, plus 5 s (65 s until it has announced one).
    /// (Was `retry_timeout`, which still works as a setter.)
    #[builder(skip)]
    pub stall_timeout: Option<u64>,
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
            token: None,
            token_url: None,
            token_first: false,
            events: None,
            immediate: true,
            with_credentials: None,
            share_across_tabs: true,
            transport: TransportMode::Auto,
            ws_url: None,
            buffering_timeout: 5_000,
            sse_retry_interval: 60_000,
            stall_timeout: None,
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
    /// Sets [`stall_timeout`](Self::stall_timeout): this many ms without any event or
    /// heartbeat count as a stall, whatever the server's heartbeat interval.
    pub fn stall_timeout(mut self, ms: u64) -> Self {
        self.stall_timeout = Some(ms);
        self
    }

    /// The seed's name for [`token`](Self::token).
    #[deprecated(note = "renamed to `token`: it holds a session token, not a session id")]
    pub fn session_id(self, token: Option<String>) -> Self {
        self.token(token)
    }

    /// The seed's name for [`stall_timeout`](Self::stall_timeout).
    #[deprecated(note = "renamed to `stall_timeout`: it is how long a silent stream may stall")]
    pub fn retry_timeout(self, ms: u64) -> Self {
        self.stall_timeout(ms)
    }

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
    /// The stream URL: the filter, then what `params` carries.
    fn stream_url(&self, params: &StreamParams) -> String {
        let mut query = Vec::new();
        if let Some(events) = &self.events {
            query.push(format!("events={}", encode(&events.join(","))));
        }
        match params.last_event_id.filter(|id| !id.is_empty()) {
            Some(id) => query.push(format!("lastEventId={}", encode(id))),
            None => {
                if let Some(ms) = params.resume_ago_ms {
                    query.push(format!("resumeAgoMs={}", ms.min(MAX_RESUME_AGO_MS)));
                }
            }
        }
        if let Some(token) = params.token {
            query.push(format!("token={}", encode(token)));
        }
        if let Some(why) = params.fallback {
            query.push(format!("fallback={}", encode(why)));
        }
        if params.probe {
            query.push("probe=1".into());
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        if query.is_empty() {
            self.url.clone()
        } else {
            format!("{}{sep}{}", self.url, query.join("&"))
        }
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    /// The same stream over WebSocket: `ws_url`, or `url` with `/sse` turned into `/ws`;
    /// `origin` is the page's (`https://host`) for a relative URL.
    fn websocket_url(&self, origin: &str, params: &StreamParams) -> String {
        let base = self.ws_url.clone().unwrap_or_else(|| {
            let path = match self.url.rfind("/sse") {
                Some(at) => format!("{}/ws{}", &self.url[..at], &self.url[at + 4..]),
                None => self.url.clone(),
            };
            if path.starts_with("http://") || path.starts_with("https://") {
                path
            } else {
                format!("{origin}{path}")
            }
        });
        let base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base
        };
        UseSseOptions {
            url: base,
            ..self.clone()
        }
        .stream_url(params)
    }

    #[cfg_attr(feature = "ssr", allow(dead_code))]
    fn credentials(&self) -> bool {
        self.with_credentials
            .unwrap_or_else(|| self.url.starts_with("http://") || self.url.starts_with("https://"))
    }
}

/// The furthest back a stream resumes without an id (the server's limit).
const MAX_RESUME_AGO_MS: u64 = 60_000;

/// What a stream URL carries besides the filter.
#[derive(Debug, Default, Clone, Copy)]
#[cfg_attr(feature = "ssr", allow(dead_code))]
struct StreamParams<'a> {
    /// Resume after this id.
    last_event_id: Option<&'a str>,
    /// No id yet: resume from this many ms ago, because an earlier stream of this page
    /// opened and its events may not have reached it (held back by a proxy).
    resume_ago_ms: Option<u64>,
    token: Option<&'a str>,
    /// Why the stream comes over WebSocket (`buffered`, `failed`), counted by the server.
    fallback: Option<&'a str>,
    /// Only a transport probe: the `ready` event, no stream.
    probe: bool,
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
    /// The opaque tag of the identity the server confirmed for this tab (its `HEAD` probe,
    /// then each stream's `ready`): what to key anything shared between tabs by, so tabs of
    /// different users never mix. `None` until known.
    pub identity_tag: Signal<Option<String>>,
    /// How the stream travels now: SSE, or WebSocket after a fallback.
    pub transport: Signal<Transport>,
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

/// Opens the notification stream; see the module docs of `use_sse`.
pub fn use_sse_with_options(
    options: UseSseOptions,
) -> UseSseReturn<impl Fn() + Clone + Send + Sync, impl Fn() + Clone + Send + Sync> {
    let signals = Signals {
        ready_state: RwSignal::new(ConnectionReadyState::Closed),
        error: RwSignal::new(None::<UseSseError>),
        last_event: RwSignal::new(None::<SseMessage>),
        last_event_id: RwSignal::new(None::<String>),
        is_leader: RwSignal::new(true),
        identity_tag: RwSignal::new(None::<String>),
        transport: RwSignal::new(Transport::Sse),
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
        identity_tag: signals.identity_tag.into(),
        transport: signals.transport.into(),
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
    identity_tag: RwSignal<Option<String>>,
    transport: RwSignal<Transport>,
}

/// One SSE frame as a WebSocket message carries it (the stream's own bytes): the `id:`,
/// `event:` and `data:` fields of one event, before the blank line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "ssr", allow(dead_code))]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

/// Splits text holding SSE frames into frames, as `EventSource` reads them: `field: value`
/// lines (one space after the colon dropped), `data` lines joined by newlines, comments and
/// `retry:` ignored, a blank line ending a frame.
#[cfg_attr(feature = "ssr", allow(dead_code))]
fn parse_frames(text: &str) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut frame = Frame::default();
    let mut has_fields = false;
    // Only whole lines count: an unterminated tail is not a line yet.
    for line in text.split_inclusive('\n') {
        let Some(line) = line.strip_suffix('\n') else {
            break;
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if has_fields {
                frames.push(std::mem::take(&mut frame));
                has_fields = false;
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => frame.id = Some(value.to_string()),
            "event" => frame.event = Some(value.to_string()),
            "data" => {
                frame.data = Some(match frame.data.take() {
                    Some(before) => format!("{before}\n{value}"),
                    None => value.to_string(),
                })
            }
            _ => continue,
        }
        has_fields = true;
    }
    frames
}

#[cfg(not(feature = "ssr"))]
mod browser;
mod machine;
#[cfg(not(feature = "ssr"))]
mod tabs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_url_carries_filter_resume_point_and_token() {
        let o = UseSseOptions::default();
        assert_eq!(o.stream_url(&StreamParams::default()), "/api/sse");
        let o = o.events(vec!["a".into(), "b.c".into()]);
        let params = StreamParams {
            last_event_id: Some("42"),
            resume_ago_ms: Some(5000),
            token: Some("t k"),
            ..Default::default()
        };
        assert_eq!(
            o.stream_url(&params),
            "/api/sse?events=a,b.c&lastEventId=42&token=t%20k",
            "an id wins over an age"
        );
        let params = StreamParams {
            resume_ago_ms: Some(90_000),
            ..Default::default()
        };
        assert_eq!(
            o.stream_url(&params),
            "/api/sse?events=a,b.c&resumeAgoMs=60000",
            "capped at what the server accepts"
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
            UseSseError::Buffered(5_000),
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
    fn websocket_urls_follow_the_stream_url() {
        let none = StreamParams::default();
        let o = UseSseOptions::default().events(vec!["a".into()]);
        let params = StreamParams {
            last_event_id: Some("7"),
            fallback: Some("buffered"),
            ..Default::default()
        };
        assert_eq!(
            o.websocket_url("https://app.example", &params),
            "wss://app.example/api/ws?events=a&lastEventId=7&fallback=buffered"
        );
        let o = UseSseOptions::default().url("/notify/api/sse");
        assert_eq!(
            o.websocket_url("http://h:3000", &none),
            "ws://h:3000/notify/api/ws"
        );
        let o = UseSseOptions::default().url("https://n.example/api/sse");
        let params = StreamParams {
            token: Some("t"),
            ..Default::default()
        };
        assert_eq!(
            o.websocket_url("http://other", &params),
            "wss://n.example/api/ws?token=t"
        );
        let o = UseSseOptions::default().ws_url(Some("wss://x/socket".into()));
        assert_eq!(o.websocket_url("http://h", &none), "wss://x/socket");
    }

    #[test]
    fn frames_parse_as_event_source_reads_them() {
        let text = "retry: 500\n\nid: 5\n\nid: 6\nevent: notification\ndata: {\"a\":1}\n\n: ping\nevent: heartbeat\ndata: {}\n\n";
        assert_eq!(
            parse_frames(text),
            vec![
                Frame {
                    id: Some("5".into()),
                    event: None,
                    data: None
                },
                Frame {
                    id: Some("6".into()),
                    event: Some("notification".into()),
                    data: Some(r#"{"a":1}"#.into())
                },
                Frame {
                    id: None,
                    event: Some("heartbeat".into()),
                    data: Some("{}".into())
                },
            ]
        );
        assert_eq!(
            parse_frames("data: a\ndata: b\n\n")[0].data.as_deref(),
            Some("a\nb")
        );
        assert!(
            parse_frames("event: x\n").is_empty(),
            "no blank line, no frame yet"
        );
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
            [
                "x",
                "heartbeat",
                "resync",
                "connection_replaced",
                "session_ended",
                "ready",
                "inbox"
            ]
        );
    }
}
