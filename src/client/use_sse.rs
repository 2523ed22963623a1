//! The [`use_sse`] hook: one EventSource on `/api/sse`, as Leptos signals.
//!
//! ## Usage
//!
//! ```no_run
//! use leptos::prelude::*;
//! use sse_notify::client::{use_sse_with_options, ConnectionReadyState, UseSseOptions, UseSseReturn};
//!
//! #[component]
//! fn Status() -> impl IntoView {
//!     let UseSseReturn { ready_state, last_event, .. } = use_sse_with_options(
//!         UseSseOptions::default()
//!             .events(vec!["notification".into(), "order.shipped".into()])
//!             .on_message(|msg: &sse_notify::client::SseMessage| leptos::logging::log!("{} {}", msg.event, msg.data)),
//!     );
//!     view! {
//!         <p>{move || if ready_state.get() == ConnectionReadyState::Open { "live" } else { "offline" }}</p>
//!         <p>{move || last_event.get().map(|m| m.data)}</p>
//!     }
//! }
//! ```
//!
//! What it does for you:
//! - every event reaches `on_message`, even in a burst (nothing is coalesced into a signal
//!   first), and an event id seen before is dropped;
//! - on an error or a stall it reconnects with exponential backoff and jitter, resuming from
//!   the last id it saw (`lastEventId`), so nothing is missed;
//! - a `resync` from the server (events no longer kept) and a stalled stream show up in
//!   `error`; a `connection_replaced` (the user opened too many tabs) stops reconnecting, so
//!   two tabs never fight;
//! - the EventSource is closed when the owner is cleaned up.
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
}

/// One event as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    /// The event id (empty for events the server sends without one, like `resync`).
    pub id: String,
    /// The event name.
    pub event: String,
    /// The `data` JSON as text.
    pub data: String,
}

impl SseMessage {
    /// The typed event.
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
    /// `max_reconnect_attempts` reconnects failed in a row.
    #[error("gave up after {0} reconnect attempts")]
    GaveUp(u32),
}

impl UseSseError {
    /// A short stable name of the kind of error, e.g. for a `data-` attribute or a log field:
    /// `connection`, `stalled`, `resync`, `replaced` or `gave-up`.
    pub fn code(&self) -> &'static str {
        match self {
            UseSseError::Connection => "connection",
            UseSseError::Stalled(_) => "stalled",
            UseSseError::Resync(_) => "resync",
            UseSseError::Replaced => "replaced",
            UseSseError::GaveUp(_) => "gave-up",
        }
    }
}

/// Options of [`use_sse_with_options`].
#[derive(Clone, DefaultBuilder)]
pub struct UseSseOptions {
    /// The stream URL. Defaults to `/api/sse`.
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
    /// Event names to receive (sent as the `events=` filter). An EventSource only hears
    /// events it listens for by name, so custom events must be named here. Defaults to
    /// `None`: the five built-in events.
    #[builder(into)]
    pub events: Option<Vec<String>>,
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
            events: None,
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
    fn stream_url(&self, last_event_id: Option<&str>) -> String {
        let mut params = Vec::new();
        if let Some(events) = &self.events {
            params.push(format!("events={}", encode(&events.join(","))));
        }
        if let Some(id) = last_event_id.filter(|id| !id.is_empty()) {
            params.push(format!("lastEventId={}", encode(id)));
        }
        if let Some(token) = &self.session_id {
            params.push(format!("token={}", encode(token)));
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        if params.is_empty() {
            self.url.clone()
        } else {
            format!("{}{sep}{}", self.url, params.join("&"))
        }
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
    /// Where the stream is: connecting, open or closed.
    pub ready_state: Signal<ConnectionReadyState>,
    /// The latest problem, cleared when the stream opens again.
    pub error: Signal<Option<UseSseError>>,
    /// The latest event (heartbeats excepted). Use `on_message` to see every one of a burst.
    pub last_event: Signal<Option<SseMessage>>,
    /// The id the next reconnect resumes after.
    pub last_event_id: Signal<Option<String>>,
    /// (Re)opens the stream now, resuming after the last seen id.
    pub open: Open,
    /// Closes the stream and stops reconnecting.
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
        open,
        close,
    }
}

#[derive(Clone, Copy)]
struct Signals {
    ready_state: RwSignal<ConnectionReadyState>,
    error: RwSignal<Option<UseSseError>>,
    last_event: RwSignal<Option<SseMessage>>,
    last_event_id: RwSignal<Option<String>>,
}

/// The browser side: the EventSource, its listeners and the timers.
#[cfg(not(feature = "ssr"))]
mod browser {
    use std::{cell::RefCell, collections::VecDeque, rc::Rc, time::Duration};

    use send_wrapper::SendWrapper;
    use wasm_bindgen::{closure::Closure, JsCast};
    use web_sys::{EventSource, EventSourceInit, MessageEvent};

    use super::*;
    use crate::backoff::backoff_delay;

    /// Reconnect delays never grow past this.
    const MAX_RECONNECT_DELAY_MS: u64 = 30_000;

    /// How many recent ids are remembered to drop duplicates.
    const SEEN_IDS: usize = 512;

    struct Connection {
        options: UseSseOptions,
        signals: Signals,
        source: Option<EventSource>,
        listeners: Vec<(String, Listener)>,
        seen: VecDeque<String>,
        last_id: Option<String>,
        attempts: u32,
        reconnect_timer: Option<TimeoutHandle>,
        stall_timer: Option<TimeoutHandle>,
        /// Set by `disconnect` and by `connection_replaced`: do not reconnect.
        stopped: bool,
    }

    type Shared = Rc<RefCell<Connection>>;
    /// A JS event listener, kept alive as long as it is registered.
    type Listener = Closure<dyn FnMut(web_sys::Event)>;

    pub(super) fn start(
        options: UseSseOptions,
        signals: Signals,
    ) -> (impl Fn() + Clone + Send + Sync, impl Fn() + Clone + Send + Sync) {
        let user_id = options.user_id;
        let shared: Shared = Rc::new(RefCell::new(Connection {
            options,
            signals,
            source: None,
            listeners: Vec::new(),
            seen: VecDeque::new(),
            last_id: None,
            attempts: 0,
            reconnect_timer: None,
            stall_timer: None,
            stopped: false,
        }));
        let connect = {
            let shared = SendWrapper::new(shared.clone());
            move || {
                shared.borrow_mut().stopped = false;
                shared.borrow_mut().attempts = 0;
                open(&shared);
            }
        };
        let disconnect = {
            let shared = SendWrapper::new(shared.clone());
            move || stop(&shared)
        };
        match user_id {
            // Open while a user is signed in; reopen (from scratch) when the user changes.
            Some(user_id) => {
                let shared = SendWrapper::new(shared.clone());
                Effect::new(move |previous: Option<Option<String>>| {
                    let current = user_id.get();
                    if previous.as_ref() != Some(&current) {
                        stop(&shared);
                        if current.is_some() {
                            let mut c = shared.borrow_mut();
                            c.stopped = false;
                            c.attempts = 0;
                            c.last_id = None;
                            c.seen.clear();
                            drop(c);
                            open(&shared);
                        }
                    }
                    current
                });
            }
            None => {
                let shared = SendWrapper::new(shared.clone());
                Effect::new(move |_| open(&shared));
            }
        }
        {
            let shared = SendWrapper::new(shared);
            on_cleanup(move || stop(&shared));
        }
        (connect, disconnect)
    }

    /// Closes the EventSource and its listeners, without touching the signals.
    fn close_source(c: &mut Connection) {
        if let Some(source) = c.source.take() {
            for (name, listener) in c.listeners.drain(..) {
                let _ = source.remove_event_listener_with_callback(&name, listener.as_ref().unchecked_ref());
            }
            source.close();
        }
        if let Some(t) = c.stall_timer.take() {
            t.clear();
        }
        if let Some(t) = c.reconnect_timer.take() {
            t.clear();
        }
    }

    fn stop(shared: &Shared) {
        let was_open = {
            let mut c = shared.borrow_mut();
            c.stopped = true;
            let was_open = c.source.is_some();
            close_source(&mut c);
            c.signals.ready_state.set(ConnectionReadyState::Closed);
            was_open
        };
        if was_open {
            let on_close = shared.borrow().options.on_close.clone();
            on_close();
        }
    }

    fn open(shared: &Shared) {
        let mut c = shared.borrow_mut();
        close_source(&mut c);
        let url = c.options.stream_url(c.last_id.as_deref());
        let init = EventSourceInit::new();
        init.set_with_credentials(c.options.url.starts_with("http"));
        let Ok(source) = EventSource::new_with_event_source_init_dict(&url, &init) else {
            drop(c);
            fail(shared, UseSseError::Connection);
            return;
        };
        c.signals.ready_state.set(ConnectionReadyState::Connecting);
        let mut listeners = Vec::new();
        let on_open = {
            let shared = shared.clone();
            Listener::new(move |_| opened(&shared))
        };
        listeners.push(("open".to_string(), on_open));
        let on_error = {
            let shared = shared.clone();
            Listener::new(move |_| fail(&shared, UseSseError::Connection))
        };
        listeners.push(("error".to_string(), on_error));
        for name in c.options.listened_names() {
            let shared = shared.clone();
            let listener = Listener::new(move |e: web_sys::Event| {
                if let Ok(message) = e.dyn_into::<MessageEvent>() {
                    received(&shared, message);
                }
            });
            listeners.push((name, listener));
        }
        for (name, listener) in &listeners {
            let _ = source.add_event_listener_with_callback(name, listener.as_ref().unchecked_ref());
        }
        c.listeners = listeners;
        c.source = Some(source);
        drop(c);
        arm_stall_timer(shared);
    }

    fn opened(shared: &Shared) {
        let on_open = {
            let mut c = shared.borrow_mut();
            c.attempts = 0;
            c.signals.ready_state.set(ConnectionReadyState::Open);
            c.signals.error.set(None);
            c.options.on_open.clone()
        };
        arm_stall_timer(shared);
        on_open();
    }

    fn received(shared: &Shared, message: MessageEvent) {
        arm_stall_timer(shared);
        let msg = SseMessage {
            id: message.last_event_id(),
            event: message.type_(),
            data: message.data().as_string().unwrap_or_default(),
        };
        let mut c = shared.borrow_mut();
        if msg.event == names::HEARTBEAT {
            // The stream opens with an id-only frame (where it starts); heartbeats repeat
            // that id. Adopt it so a tab that drops before its first event still resumes.
            if c.last_id.is_none() && !msg.id.is_empty() {
                c.last_id = Some(msg.id.clone());
                c.signals.last_event_id.set(Some(msg.id));
            }
            return;
        }
        // EventSource repeats the last id on events sent without one; only new ids count.
        let fresh_id = !msg.id.is_empty() && c.last_id.as_deref() != Some(msg.id.as_str());
        if fresh_id {
            if c.seen.contains(&msg.id) {
                return;
            }
            if c.seen.len() >= SEEN_IDS {
                c.seen.pop_front();
            }
            c.seen.push_back(msg.id.clone());
            c.last_id = Some(msg.id.clone());
            c.signals.last_event_id.set(Some(msg.id.clone()));
        }
        let signals = c.signals;
        let on_message = c.options.on_message.clone();
        let on_error = c.options.on_error.clone();
        drop(c);
        match msg.event.as_str() {
            names::RESYNC => {
                let err = UseSseError::Resync(msg.data.clone());
                signals.error.set(Some(err.clone()));
                on_error(&err);
            }
            names::CONNECTION_REPLACED => {
                stop(shared);
                signals.error.set(Some(UseSseError::Replaced));
                on_error(&UseSseError::Replaced);
            }
            _ => {}
        }
        signals.last_event.set(Some(msg.clone()));
        on_message(&msg);
    }

    fn fail(shared: &Shared, err: UseSseError) {
        let (on_error, on_close, was_open) = {
            let mut c = shared.borrow_mut();
            let was_open = c.signals.ready_state.get_untracked() == ConnectionReadyState::Open;
            close_source(&mut c);
            c.signals.ready_state.set(ConnectionReadyState::Closed);
            c.signals.error.set(Some(err.clone()));
            (c.options.on_error.clone(), c.options.on_close.clone(), was_open)
        };
        on_error(&err);
        if was_open {
            on_close();
        }
        schedule_reconnect(shared);
    }

    fn schedule_reconnect(shared: &Shared) {
        let mut c = shared.borrow_mut();
        if c.stopped || !c.options.auto_reconnect {
            return;
        }
        if c.options
            .max_reconnect_attempts
            .is_some_and(|max| c.attempts >= max)
        {
            let err = UseSseError::GaveUp(c.attempts);
            c.signals.error.set(Some(err.clone()));
            let on_error = c.options.on_error.clone();
            drop(c);
            on_error(&err);
            return;
        }
        let delay = backoff_delay(
            c.options.reconnect_interval,
            MAX_RECONNECT_DELAY_MS,
            c.attempts,
            js_sys::Math::random(),
        );
        c.attempts += 1;
        c.signals.ready_state.set(ConnectionReadyState::Connecting);
        let again = shared.clone();
        c.reconnect_timer = set_timeout_with_handle(move || open(&again), Duration::from_millis(delay)).ok();
    }

    fn arm_stall_timer(shared: &Shared) {
        let mut c = shared.borrow_mut();
        if let Some(t) = c.stall_timer.take() {
            t.clear();
        }
        let timeout = c.options.retry_timeout;
        let again = shared.clone();
        c.stall_timer = set_timeout_with_handle(
            move || fail(&again, UseSseError::Stalled(timeout)),
            Duration::from_millis(timeout),
        )
        .ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_url_carries_filter_resume_point_and_token() {
        let o = UseSseOptions::default();
        assert_eq!(o.stream_url(None), "/api/sse");
        let o = o
            .events(vec!["a".into(), "b.c".into()])
            .session_id(Some("t k".into()));
        assert_eq!(
            o.stream_url(Some("42")),
            "/api/sse?events=a,b.c&lastEventId=42&token=t%20k"
        );
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
