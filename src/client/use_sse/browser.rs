//! The browser side of the hook: the `EventSource` (in the tab that leads, or in every tab
//! where tabs cannot share), its listeners, timers, reconnects and session handling, and
//! the follower's side of a shared stream.

use std::{cell::RefCell, collections::VecDeque, rc::Rc, time::Duration};

use send_wrapper::SendWrapper;
use wasm_bindgen::{closure::Closure, JsCast};
use web_sys::{EventSource, EventSourceInit, MessageEvent};

use super::{
    parse_frames,
    tabs::{self, Relay, TabMessage},
    ConnectionReadyState, Signals, SseMessage, StreamParams, Transport, TransportMode, UseSseError,
    UseSseOptions,
};
use crate::{api, backoff::backoff_delay, events::names};

/// How many recent ids are remembered to drop duplicates.
const SEEN_IDS: usize = 512;
/// Reconnect delays never grow past this.
const MAX_RECONNECT_DELAY_MS: u64 = 30_000;
/// Fresh tokens fetched in a row without the stream opening, before giving up on them.
const MAX_TOKEN_REFRESHES: u32 = 2;
/// How long `token_url` may take to answer before the fetch counts as failed.
const TOKEN_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to a resume age for the time a request takes to reach the server.
const RESUME_MARGIN_MS: u64 = 1_000;
/// SSE failures to open in a row, while the server answers, before WebSocket is tried.
const SSE_FAILURES_BEFORE_FALLBACK: u32 = 3;
/// Times in a row a tab moves to the tabs of another identity tag before it stops
/// sharing: more means the tags keep changing (instances that do not share
/// `SSE_JWT_SECRET`).
const MAX_IDENTITY_SWITCHES: u32 = 2;

/// Who holds the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// This tab alone (tabs do not share, or cannot, or the server named no identity).
    Alone,
    /// Another tab leads; this one hears its events through the relay. Also while the
    /// tab asks the server who it is, before it joins the tabs of that identity.
    Follower,
    Leader,
}

struct Connection {
    options: UseSseOptions,
    signals: Signals,
    role: Role,
    relay: Option<Relay>,
    source: Option<EventSource>,
    listeners: Vec<(String, Listener)>,
    /// The WebSocket, when the stream travels over it, and its handlers.
    socket: Option<web_sys::WebSocket>,
    socket_handlers: Vec<Listener>,
    /// The id the last WebSocket frame set (what `EventSource.lastEventId` would be).
    socket_last_id: Option<String>,
    transport: Transport,
    /// Why the stream is on WebSocket (`buffered`, `failed`), told to the server.
    fallback: Option<&'static str>,
    /// SSE failed to open this many times in a row while the server answered.
    sse_failures: u32,
    /// The `ready` event came on the current stream (and, when leading, named the
    /// identity the other tabs share).
    ready: bool,
    /// Events of the current stream that came before its `ready`: a leader relays them
    /// only once `ready` confirmed that the stream is for its tabs' identity.
    unconfirmed: Vec<SseMessage>,
    /// Moves to the tabs of another identity tag in a row, without a stream confirming
    /// the tag it joined with in between.
    identity_switches: u32,
    buffer_timer: Option<TimeoutHandle>,
    sse_retry_timer: Option<TimeoutHandle>,
    /// On WebSocket: the SSE probe open now, its `ready` listener, and how long it may take.
    probe: Option<(EventSource, Listener, TimeoutHandle)>,
    seen: VecDeque<String>,
    last_id: Option<String>,
    /// When the first stream without an id was asked for (`performance.now()`): a later
    /// one that still has no id resumes from then, so nothing published while an earlier
    /// stream was held back is lost.
    started_at: Option<f64>,
    /// The token sent as `?token=`: the configured one, or the last fresh one.
    token: Option<String>,
    /// The generation whose first token is being fetched (`token_first`).
    fetching_token: Option<u64>,
    attempts: u32,
    refreshes: u32,
    /// The current `EventSource` fired `open`.
    opened: bool,
    /// No reconnect by itself: closed, replaced, unauthorized, or gave up.
    stopped: bool,
    /// Bumped on every (re)start, so a late answer (probe, token) of an earlier one is ignored.
    generation: u64,
    reconnect_timer: Option<TimeoutHandle>,
    stall_timer: Option<TimeoutHandle>,
}

type Shared = Rc<RefCell<Connection>>;
/// A JS event listener, kept alive as long as it is registered.
type Listener = Closure<dyn FnMut(web_sys::Event)>;

use leptos::prelude::*;

pub(super) fn start(
    options: UseSseOptions,
    signals: Signals,
) -> (impl Fn() + Clone + Send + Sync, impl Fn() + Clone + Send + Sync) {
    let user_id = options.user_id;
    let immediate = options.immediate;
    let shared: Shared = Rc::new(RefCell::new(Connection {
        token: options.token.clone(),
        fetching_token: None,
        options,
        signals,
        role: Role::Alone,
        relay: None,
        source: None,
        listeners: Vec::new(),
        socket: None,
        socket_handlers: Vec::new(),
        socket_last_id: None,
        transport: Transport::Sse,
        fallback: None,
        sse_failures: 0,
        ready: false,
        unconfirmed: Vec::new(),
        identity_switches: 0,
        buffer_timer: None,
        sse_retry_timer: None,
        probe: None,
        seen: VecDeque::new(),
        last_id: None,
        started_at: None,
        attempts: 0,
        refreshes: 0,
        opened: false,
        stopped: false,
        generation: 0,
        reconnect_timer: None,
        stall_timer: None,
    }));
    let open = {
        let shared = SendWrapper::new(shared.clone());
        move || revive(&shared)
    };
    let close = {
        let shared = SendWrapper::new(shared.clone());
        move || close(&shared)
    };
    match user_id {
        // Open while a user is signed in; start over when the user changes.
        Some(user_id) => {
            let shared = SendWrapper::new(shared.clone());
            Effect::new(move |previous: Option<Option<String>>| {
                let current = user_id.get();
                if previous.as_ref() != Some(&current) {
                    leave(&shared);
                    {
                        let mut c = shared.borrow_mut();
                        c.last_id = None;
                        c.started_at = None;
                        c.seen.clear();
                        c.signals.last_event_id.set(None);
                        c.signals.identity_tag.set(None);
                    }
                    if current.is_some() {
                        begin(&shared);
                    }
                }
                current
            });
        }
        None if immediate => {
            let shared = SendWrapper::new(shared.clone());
            Effect::new(move |_| begin(&shared));
        }
        None => {}
    }
    // After giving up: try again when the network is back or the tab is looked at again.
    let retry_when = |event: &'static str| {
        let shared = SendWrapper::new(shared.clone());
        let handle = leptos::prelude::window_event_listener_untyped(event, move |_| {
            let gave_up = matches!(
                shared.borrow().signals.error.get_untracked(),
                Some(UseSseError::GaveUp(_))
            );
            let visible = document().visibility_state() == web_sys::VisibilityState::Visible;
            if gave_up && visible {
                revive(&shared);
            }
        });
        on_cleanup(move || handle.remove());
    };
    retry_when("online");
    retry_when("visibilitychange");
    {
        let shared = SendWrapper::new(shared);
        on_cleanup(move || leave(&shared));
    }
    (open, close)
}

/// Starts holding or sharing the stream: asks the server who this tab is (`HEAD`) and
/// joins the election of that identity's tabs, or opens alone.
fn begin(shared: &Shared) {
    let mut c = shared.borrow_mut();
    c.generation += 1;
    c.stopped = false;
    c.attempts = 0;
    c.refreshes = 0;
    c.identity_switches = 0;
    // A token fetched for an earlier user must never open this one's stream.
    c.token = c.options.token.clone();
    if c.options.share_across_tabs && tabs::supported() {
        c.role = Role::Follower;
        c.signals.is_leader.set(false);
        c.signals.ready_state.set(ConnectionReadyState::Connecting);
        let (url, credentials) = session_probe_request(&c);
        let generation = c.generation;
        let shared = SendWrapper::new(shared.clone());
        leptos::task::spawn_local(async move {
            let probe = probe_session(&url, credentials).await;
            {
                let c = shared.borrow();
                if c.generation != generation || c.stopped {
                    return;
                }
            }
            match probe {
                SessionProbe::Accepted(Some(tag)) => join(&shared, tag),
                // Nobody to share with yet: open alone; the stream's `ready` names the
                // identity, and the tab joins its tabs then.
                _ => open_alone(&shared),
            }
        });
        return;
    }
    drop(c);
    open_alone(shared);
}

/// Joins the election of the tabs of identity `tag`: follows their leader (resuming from
/// where it stands if this tab ever leads), or leads when the lock comes.
fn join(shared: &Shared, tag: String) {
    let mut c = shared.borrow_mut();
    let hears = {
        let shared = shared.clone();
        move |message| heard(&shared, message)
    };
    let leads = {
        let shared = shared.clone();
        let generation = c.generation;
        move || became_leader(&shared, generation)
    };
    c.relay = Relay::join(&c.options.url, &tag, hears, leads);
    c.signals.identity_tag.set(Some(tag));
    if c.relay.is_none() {
        drop(c);
        open_alone(shared);
        return;
    }
    c.role = Role::Follower;
    c.signals.is_leader.set(false);
    c.signals.ready_state.set(ConnectionReadyState::Connecting);
    // Should this tab lead before the leader told it where the stream stands, it resumes
    // from when it joined.
    if c.started_at.is_none() {
        c.started_at = Some(window().performance().map_or(0.0, |p| p.now()));
    }
}

/// Holds a stream of its own, shared with no other tab.
fn open_alone(shared: &Shared) {
    {
        let mut c = shared.borrow_mut();
        c.role = Role::Alone;
        c.signals.is_leader.set(true);
    }
    if !shared.borrow().stopped {
        open(shared);
    }
}

/// This tab's stream is for identity `tag` (its `ready` said so), not the one of the tabs
/// it shares with, or it shares with none yet: leave them, before relaying anything, for
/// the tabs of `tag`, resuming from the last id. A session that changed under a leader
/// (another user signed in in this browser) thus never reaches the first user's tabs.
fn switch_identity(shared: &Shared, tag: Option<String>) {
    let tag = {
        let mut c = shared.borrow_mut();
        c.identity_switches += 1;
        c.generation += 1;
        c.unconfirmed.clear();
        c.opened = false;
        close_source(&mut c);
        if let Some(relay) = c.relay.take() {
            relay.leave();
        }
        if c.identity_switches > MAX_IDENTITY_SWITCHES {
            leptos::logging::warn!(
                "sse-notify: the identity tag keeps changing (do all instances share SSE_JWT_SECRET?); this tab stops sharing its stream"
            );
        }
        tag.filter(|_| c.identity_switches <= MAX_IDENTITY_SWITCHES)
    };
    match tag {
        Some(tag) => join(shared, tag),
        None => open_alone(shared),
    }
}

/// The lock came: this tab holds the stream now, resuming from the last id any tab saw.
fn became_leader(shared: &Shared, generation: u64) {
    {
        let mut c = shared.borrow_mut();
        if c.generation != generation || c.role != Role::Follower {
            return;
        }
        c.role = Role::Leader;
        c.signals.is_leader.set(true);
    }
    if !shared.borrow().stopped {
        open(shared);
    }
}

/// What another tab said.
fn heard(shared: &Shared, message: TabMessage) {
    let role = shared.borrow().role;
    match (role, message) {
        (Role::Follower, TabMessage::Event(msg)) => deliver(shared, msg),
        (Role::Follower, TabMessage::Position { id }) => {
            let mut c = shared.borrow_mut();
            c.last_id = Some(id.clone());
            c.signals.last_event_id.set(Some(id));
        }
        (
            Role::Follower,
            TabMessage::State {
                state,
                error,
                transport,
            },
        ) => {
            let c = shared.borrow();
            c.signals.ready_state.set(ConnectionReadyState::parse(&state));
            c.signals
                .transport
                .set(Transport::parse(&transport).unwrap_or_default());
            let error = error.and_then(|(code, detail)| UseSseError::from_code(&code, &detail));
            c.signals.error.set(error);
        }
        (Role::Leader, TabMessage::Hello) => {
            let c = shared.borrow();
            publish_state(&c);
            publish_position(&c);
        }
        (Role::Leader, TabMessage::Revive) => revive(shared),
        _ => {}
    }
}

/// Tells the other tabs where the shared stream is.
fn publish_state(c: &Connection) {
    if let (Role::Leader, Some(relay)) = (c.role, &c.relay) {
        let error = c.signals.error.get_untracked();
        relay.post(&TabMessage::State {
            state: c.signals.ready_state.get_untracked().as_str().to_string(),
            error: error.map(|e| (e.code().to_string(), e.detail())),
            transport: c.transport.as_str().to_string(),
        });
    }
}

/// Tells the other tabs where the shared stream stands, once its `ready` confirmed it is
/// theirs.
fn publish_position(c: &Connection) {
    if let (Role::Leader, Some(relay), true, Some(id)) = (c.role, &c.relay, c.ready, &c.last_id) {
        relay.post(&TabMessage::Position { id: id.clone() });
    }
}

fn set_state(c: &Connection, state: ConnectionReadyState, error: Option<Option<UseSseError>>) {
    c.signals.ready_state.set(state);
    if let Some(error) = error {
        c.signals.error.set(error);
    }
    publish_state(c);
}

/// Closes the EventSource or WebSocket and their listeners and timers, without touching
/// the signals.
fn close_source(c: &mut Connection) {
    if let Some(source) = c.source.take() {
        for (name, listener) in c.listeners.drain(..) {
            let _ = source.remove_event_listener_with_callback(&name, listener.as_ref().unchecked_ref());
        }
        source.close();
    }
    if let Some(socket) = c.socket.take() {
        socket.set_onopen(None);
        socket.set_onmessage(None);
        socket.set_onerror(None);
        socket.set_onclose(None);
        let _ = socket.close();
        c.socket_handlers.clear();
    }
    for timer in [&mut c.stall_timer, &mut c.reconnect_timer, &mut c.buffer_timer] {
        if let Some(t) = timer.take() {
            t.clear();
        }
    }
}

/// `close()`: this tab stops; a tab that shares the stream hands it on.
fn close(shared: &Shared) {
    let was_open = {
        let mut c = shared.borrow_mut();
        c.stopped = true;
        c.generation += 1;
        let was_open = c.opened;
        c.opened = false;
        close_source(&mut c);
        if let Some(t) = c.sse_retry_timer.take() {
            t.clear();
        }
        close_probe(&mut c);
        set_state(&c, ConnectionReadyState::Closed, None);
        if let Some(relay) = c.relay.take() {
            relay.leave();
        }
        c.role = Role::Alone;
        was_open
    };
    if was_open {
        let on_close = shared.borrow().options.on_close.clone();
        on_close();
    }
}

/// The hook goes away (or its user changed): leave the election and close everything.
fn leave(shared: &Shared) {
    close(shared);
}

/// `open()`: starts again after a close, a give-up, a replacement or an ended session.
fn revive(shared: &Shared) {
    let role = {
        let mut c = shared.borrow_mut();
        c.stopped = false;
        c.attempts = 0;
        c.refreshes = 0;
        c.role
    };
    match role {
        Role::Follower => {
            if let Some(relay) = &shared.borrow().relay {
                relay.post(&TabMessage::Revive);
            }
        }
        Role::Leader => open(shared),
        Role::Alone => {
            let joined = shared.borrow().relay.is_some() || !shared.borrow().options.share_across_tabs;
            if joined {
                open(shared);
            } else {
                begin(shared);
            }
        }
    }
}

/// Opens the stream over the current transport, resuming after the last id. With a
/// `token_url` and no token yet, the first token is fetched from there.
fn open(shared: &Shared) {
    let first_token_from = {
        let c = shared.borrow();
        match (&c.token, &c.options.token_url) {
            (None, Some(url)) if c.options.token_first => {
                Some((url.clone(), c.generation, c.options.credentials()))
            }
            _ => None,
        }
    };
    if let Some((token_url, generation, credentials)) = first_token_from {
        let mut c = shared.borrow_mut();
        set_state(&c, ConnectionReadyState::Connecting, None);
        // One fetch at a time: it opens the stream when it returns.
        if c.fetching_token != Some(generation) {
            c.fetching_token = Some(generation);
            drop(c);
            open_with_token_from(shared, token_url, generation, credentials);
        }
        return;
    }
    let transport = {
        let mut c = shared.borrow_mut();
        c.transport = match c.options.transport {
            TransportMode::Sse => Transport::Sse,
            TransportMode::WebSocket => Transport::WebSocket,
            TransportMode::Auto => c.transport,
        };
        c.signals.transport.set(c.transport);
        c.transport
    };
    match transport {
        Transport::Sse => open_sse(shared),
        Transport::WebSocket => open_websocket(shared),
    }
}

fn open_sse(shared: &Shared) {
    let mut c = shared.borrow_mut();
    close_source(&mut c);
    c.opened = false;
    c.ready = false;
    c.unconfirmed.clear();
    let url = next_stream_url(&mut c, Transport::Sse);
    let init = EventSourceInit::new();
    init.set_with_credentials(c.options.credentials());
    let Ok(source) = EventSource::new_with_event_source_init_dict(&url, &init) else {
        drop(c);
        fail(shared, UseSseError::Connection);
        return;
    };
    set_state(&c, ConnectionReadyState::Connecting, None);
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
                let msg = SseMessage {
                    id: message.last_event_id(),
                    event: message.type_(),
                    data: message.data().as_string().unwrap_or_default(),
                };
                received(&shared, msg);
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

/// The URL of the next stream over `transport`. The first stream without an id starts
/// now; a later one still without an id resumes from when the first was asked for.
fn next_stream_url(c: &mut Connection, transport: Transport) -> String {
    let now = window().performance().map_or(0.0, |p| p.now());
    let resume_ago_ms = match (&c.last_id, c.started_at) {
        (Some(_), _) => None,
        (None, Some(started)) => Some((now - started).max(0.0) as u64 + RESUME_MARGIN_MS),
        (None, None) => {
            c.started_at = Some(now);
            None
        }
    };
    let params = StreamParams {
        last_event_id: c.last_id.as_deref(),
        resume_ago_ms,
        token: c.token.as_deref(),
        fallback: c.fallback.filter(|_| transport == Transport::WebSocket),
        probe: false,
    };
    match transport {
        Transport::Sse => c.options.stream_url(&params),
        Transport::WebSocket => {
            let origin = window().location().origin().unwrap_or_default();
            c.options.websocket_url(&origin, &params)
        }
    }
}

/// The same stream over WebSocket: text messages holding SSE frames.
fn open_websocket(shared: &Shared) {
    let mut c = shared.borrow_mut();
    close_source(&mut c);
    c.opened = false;
    c.ready = false;
    c.unconfirmed.clear();
    c.socket_last_id = c.last_id.clone();
    let url = next_stream_url(&mut c, Transport::WebSocket);
    let Ok(socket) = web_sys::WebSocket::new(&url) else {
        drop(c);
        fail(shared, UseSseError::Connection);
        return;
    };
    set_state(&c, ConnectionReadyState::Connecting, None);
    let on_open = {
        let shared = shared.clone();
        Listener::new(move |_| opened(&shared))
    };
    let on_message = {
        let shared = shared.clone();
        Listener::new(move |e: web_sys::Event| {
            let Some(text) = e.dyn_ref::<MessageEvent>().and_then(|m| m.data().as_string()) else {
                return;
            };
            for frame in parse_frames(&text) {
                let message = {
                    let mut c = shared.borrow_mut();
                    if let Some(id) = frame.id {
                        c.socket_last_id = Some(id);
                    }
                    let Some(data) = frame.data else { continue };
                    let event = frame.event.unwrap_or_else(|| "message".into());
                    // As `EventSource`: only the names listened for are heard.
                    if !c.options.listened_names().contains(&event) {
                        continue;
                    }
                    SseMessage {
                        id: c.socket_last_id.clone().unwrap_or_default(),
                        event,
                        data,
                    }
                };
                received(&shared, message);
            }
        })
    };
    let on_close = {
        let shared = shared.clone();
        Listener::new(move |_| fail(&shared, UseSseError::Connection))
    };
    socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    c.socket_handlers = vec![on_open, on_message, on_close];
    c.socket = Some(socket);
    drop(c);
    arm_stall_timer(shared);
}

fn opened(shared: &Shared) {
    let on_open = {
        let mut c = shared.borrow_mut();
        c.attempts = 0;
        c.refreshes = 0;
        c.opened = true;
        set_state(&c, ConnectionReadyState::Open, Some(None));
        if c.transport == Transport::Sse {
            // The `ready` event must follow at once; if it does not, something holds the
            // stream back.
            let timeout = c.options.buffering_timeout;
            let again = shared.clone();
            c.buffer_timer =
                set_timeout_with_handle(move || buffered(&again, timeout), Duration::from_millis(timeout))
                    .ok();
        }
        c.options.on_open.clone()
    };
    arm_stall_timer(shared);
    on_open();
}

/// The SSE response opened but nothing came through: report it, and with `Auto` go on
/// over WebSocket (the server counts why), trying SSE again later.
fn buffered(shared: &Shared, waited_ms: u64) {
    let (on_error, auto) = {
        let mut c = shared.borrow_mut();
        c.buffer_timer = None;
        if c.ready || c.transport != Transport::Sse {
            return;
        }
        let err = UseSseError::Buffered(waited_ms);
        set_state(&c, c.signals.ready_state.get_untracked(), Some(Some(err)));
        (
            c.options.on_error.clone(),
            c.options.transport == TransportMode::Auto,
        )
    };
    on_error(&UseSseError::Buffered(waited_ms));
    if auto {
        fall_back_to_websocket(shared, "buffered");
    }
}

fn fall_back_to_websocket(shared: &Shared, why: &'static str) {
    {
        let mut c = shared.borrow_mut();
        c.transport = Transport::WebSocket;
        c.fallback = Some(why);
        c.sse_failures = 0;
    }
    schedule_sse_retry(shared);
    open(shared);
}

/// On WebSocket for a while: see whether SSE gets through now, with a probe (`probe=1`:
/// the `ready` event alone, no second stream) while the WebSocket goes on. If `ready`
/// comes within `buffering_timeout`, move back to SSE (resuming by last id); if not, try
/// again after `sse_retry_interval`.
fn retry_sse(shared: &Shared) {
    let mut c = shared.borrow_mut();
    c.sse_retry_timer = None;
    if c.transport != Transport::WebSocket || c.options.transport != TransportMode::Auto || c.stopped {
        return;
    }
    close_probe(&mut c);
    let url = c.options.stream_url(&StreamParams {
        token: c.token.as_deref(),
        probe: true,
        ..Default::default()
    });
    let init = EventSourceInit::new();
    init.set_with_credentials(c.options.credentials());
    let Ok(source) = EventSource::new_with_event_source_init_dict(&url, &init) else {
        drop(c);
        schedule_sse_retry(shared);
        return;
    };
    let on_ready = {
        let shared = shared.clone();
        Listener::new(move |_| {
            {
                let mut c = shared.borrow_mut();
                close_probe(&mut c);
                if c.transport != Transport::WebSocket || c.stopped {
                    return;
                }
                c.transport = Transport::Sse;
                c.fallback = None;
            }
            open(&shared);
        })
    };
    let _ = source.add_event_listener_with_callback(names::READY, on_ready.as_ref().unchecked_ref());
    let timeout = c.options.buffering_timeout;
    let again = shared.clone();
    let Ok(timer) = set_timeout_with_handle(
        move || {
            close_probe(&mut again.borrow_mut());
            schedule_sse_retry(&again);
        },
        Duration::from_millis(timeout),
    ) else {
        source.close();
        return;
    };
    c.probe = Some((source, on_ready, timer));
}

fn schedule_sse_retry(shared: &Shared) {
    let mut c = shared.borrow_mut();
    if let Some(t) = c.sse_retry_timer.take() {
        t.clear();
    }
    let again = shared.clone();
    let retry = c.options.sse_retry_interval;
    c.sse_retry_timer = set_timeout_with_handle(move || retry_sse(&again), Duration::from_millis(retry)).ok();
}

fn close_probe(c: &mut Connection) {
    if let Some((source, listener, timer)) = c.probe.take() {
        let _ = source.remove_event_listener_with_callback(names::READY, listener.as_ref().unchecked_ref());
        source.close();
        timer.clear();
    }
}

/// A message from this tab's own stream (either transport).
fn received(shared: &Shared, msg: SseMessage) {
    arm_stall_timer(shared);
    if msg.event == names::READY {
        ready_received(shared, msg);
        return;
    }
    if msg.event == names::HEARTBEAT {
        // The stream opens with an id-only frame (where it starts); heartbeats repeat that
        // id. Adopt it so a tab that drops before its first event still resumes from there.
        let mut c = shared.borrow_mut();
        if c.last_id.is_none() && !msg.id.is_empty() {
            c.last_id = Some(msg.id.clone());
            c.signals.last_event_id.set(Some(msg.id));
        }
        return;
    }
    match msg.event.as_str() {
        names::CONNECTION_REPLACED => {
            stop_with(shared, UseSseError::Replaced);
            return;
        }
        names::SESSION_ENDED => {
            // Logged out: stay closed. Expired: a fresh token may carry on.
            let expired = !msg.data.contains(r#""reason":"disconnected""#);
            session_refused(shared, expired);
            return;
        }
        _ => {}
    }
    {
        let mut c = shared.borrow_mut();
        if c.role == Role::Leader && msg.event != names::RESYNC {
            if !c.ready {
                c.unconfirmed.push(msg.clone());
            } else if let Some(relay) = &c.relay {
                relay.post(&TabMessage::Event(msg.clone()));
            }
        }
    }
    deliver(shared, msg);
}

/// The stream flows (nothing in between holds it back), starts after its id, and is for
/// the identity its tag names. A leader whose tabs share that identity relays what came
/// before it and where the stream stands; one whose tabs do not, or a tab alone that could
/// share, moves to the tabs of that identity.
fn ready_received(shared: &Shared, msg: SseMessage) {
    let tag = serde_json::from_str::<api::Ready>(&msg.data)
        .ok()
        .map(|ready| ready.tag)
        .filter(|tag| !tag.is_empty());
    let mut c = shared.borrow_mut();
    c.ready = true;
    c.sse_failures = 0;
    if let Some(t) = c.buffer_timer.take() {
        t.clear();
    }
    if c.last_id.is_none() && !msg.id.is_empty() {
        c.last_id = Some(msg.id.clone());
        c.signals.last_event_id.set(Some(msg.id));
    }
    if tag.is_some() {
        c.signals.identity_tag.set(tag.clone());
    }
    let election = c.relay.as_ref().map(|relay| relay.tag().to_string());
    let may_share =
        c.options.share_across_tabs && tabs::supported() && c.identity_switches < MAX_IDENTITY_SWITCHES;
    let switch = match c.role {
        Role::Leader => election != tag,
        Role::Alone => c.relay.is_none() && may_share && tag.is_some(),
        Role::Follower => false,
    };
    if switch {
        drop(c);
        switch_identity(shared, tag);
        return;
    }
    if c.role == Role::Leader {
        // Confirmed: only changes in a row count towards giving up on sharing.
        c.identity_switches = 0;
    }
    let held = std::mem::take(&mut c.unconfirmed);
    if let (Role::Leader, Some(relay)) = (c.role, &c.relay) {
        for msg in held {
            relay.post(&TabMessage::Event(msg));
        }
    }
    // The other tabs hear only events: without this, a tab that takes over before the
    // first event opens "now" and misses what was published during the hand-over.
    publish_position(&c);
}

/// An event for this tab (from its own stream, or relayed): drop a duplicate, update the
/// signals, call `on_message`.
fn deliver(shared: &Shared, msg: SseMessage) {
    let mut c = shared.borrow_mut();
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
    if msg.event == names::RESYNC {
        let err = UseSseError::Resync(msg.data.clone());
        set_state(&c, c.signals.ready_state.get_untracked(), Some(Some(err.clone())));
        drop(c);
        on_error(&err);
    } else {
        drop(c);
    }
    signals.last_event.set(Some(msg.clone()));
    on_message(&msg);
}

/// Stops (no reconnect by itself) with `err`, keeping the lead of a shared stream, so no
/// other tab of this browser opens one that would fight the reason it stopped.
fn stop_with(shared: &Shared, err: UseSseError) {
    let closed = {
        let mut c = shared.borrow_mut();
        c.stopped = true;
        close_with_error(&mut c, &err)
    };
    closed.notify(&err);
}

/// Closes the current stream, if any, and shows `err` in the signals. The owner's
/// callbacks are owed: call [`ClosedWithError::notify`] once `c` is released.
fn close_with_error(c: &mut Connection, err: &UseSseError) -> ClosedWithError {
    let was_open = c.opened;
    c.opened = false;
    close_source(c);
    set_state(c, ConnectionReadyState::Closed, Some(Some(err.clone())));
    ClosedWithError {
        on_error: c.options.on_error.clone(),
        on_close: c.options.on_close.clone(),
        was_open,
    }
}

/// The callbacks a [`close_with_error`] owes the hook's owner.
struct ClosedWithError {
    on_error: std::sync::Arc<dyn Fn(&UseSseError) + Send + Sync>,
    on_close: std::sync::Arc<dyn Fn() + Send + Sync>,
    was_open: bool,
}

impl ClosedWithError {
    fn notify(self, err: &UseSseError) {
        (self.on_error)(err);
        if self.was_open {
            (self.on_close)();
        }
    }
}

/// The server refused the session or ended it. With `token_url` (and `refresh`), fetch a
/// fresh token and open again; otherwise stop with `Unauthorized`.
fn session_refused(shared: &Shared, refresh: bool) {
    let (token_url, generation, refreshes, credentials) = {
        let c = shared.borrow();
        (
            c.options.token_url.clone(),
            c.generation,
            c.refreshes,
            c.options.credentials(),
        )
    };
    stop_with(shared, UseSseError::Unauthorized);
    let Some(token_url) = token_url.filter(|_| refresh && refreshes < MAX_TOKEN_REFRESHES) else {
        return;
    };
    shared.borrow_mut().refreshes += 1;
    open_with_token_from(shared, token_url, generation, credentials);
}

/// Fetches a token from `token_url`, then opens with it, unless the hook was restarted
/// meanwhile. Refused: the hook stops with `Unauthorized`. Any other failure: the hook
/// retries with the reconnect backoff (a first token), or stays stopped (a fresh one,
/// after the session ended).
fn open_with_token_from(shared: &Shared, token_url: String, generation: u64, credentials: bool) {
    let shared = SendWrapper::new(shared.clone());
    leptos::task::spawn_local(async move {
        let token = fetch_token(&token_url, credentials).await;
        let mut c = shared.borrow_mut();
        if c.fetching_token == Some(generation) {
            c.fetching_token = None;
        }
        if c.generation != generation {
            return;
        }
        let stopped = c.stopped;
        match token {
            Fetched::Token(token) => {
                c.token = Some(token);
                c.stopped = false;
                drop(c);
                open(&shared);
            }
            Fetched::Refused if !stopped => {
                drop(c);
                stop_with(&shared, UseSseError::Unauthorized);
            }
            Fetched::Failed if !stopped => {
                let closed = close_with_error(&mut c, &UseSseError::Connection);
                drop(c);
                closed.notify(&UseSseError::Connection);
                schedule_reconnect(&shared);
            }
            Fetched::Refused | Fetched::Failed => {
                leptos::logging::warn!("sse-notify: no fresh token from {token_url}")
            }
        }
    });
}

/// What `token_url` answered.
enum Fetched {
    Token(String),
    /// 401 or 403: not signed in.
    Refused,
    /// Unreachable, another status, or no token in the body.
    Failed,
}

/// `GET token_url` with credentials: `{"token": "..."}`, or the token as text.
async fn fetch_token(url: &str, credentials: bool) -> Fetched {
    // Bounded: a token endpoint that never answers must not leave the hook waiting.
    let abort = web_sys::AbortController::new().ok();
    let signal = abort.as_ref().map(web_sys::AbortController::signal);
    let timer = abort
        .clone()
        .and_then(|abort| set_timeout_with_handle(move || abort.abort(), TOKEN_FETCH_TIMEOUT).ok());
    let fetched = fetch_token_with(url, credentials, signal.as_ref()).await;
    if let Some(timer) = timer {
        timer.clear();
    }
    fetched
}

async fn fetch_token_with(url: &str, credentials: bool, signal: Option<&web_sys::AbortSignal>) -> Fetched {
    let mut request = gloo_net::http::Request::get(url).abort_signal(signal);
    if credentials || !url.starts_with("http") {
        request = request.credentials(web_sys::RequestCredentials::Include);
    }
    let Ok(response) = request.send().await else {
        return Fetched::Failed;
    };
    if matches!(response.status(), 401 | 403) {
        return Fetched::Refused;
    }
    if !response.ok() {
        return Fetched::Failed;
    }
    let Ok(text) = response.text().await else {
        return Fetched::Failed;
    };
    let text = text.trim();
    let token = if text.starts_with('{') {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v.get("token")?.as_str().map(str::to_string))
    } else {
        (!text.is_empty()).then(|| text.to_string())
    };
    token.map_or(Fetched::Failed, Fetched::Token)
}

/// What `HEAD` on the stream URL says about this tab's session.
enum SessionProbe {
    /// It would be let in, as the identity of this tag (`None` from a server that names
    /// none).
    Accepted(Option<String>),
    /// A clear 401.
    Refused,
    /// No answer (offline, server down): nothing is known.
    Unanswered,
}

/// The URL and credentials mode of a `HEAD` probe of this tab's session.
fn session_probe_request(c: &Connection) -> (String, bool) {
    let url = c.options.stream_url(&StreamParams {
        token: c.token.as_deref(),
        ..Default::default()
    });
    (url, c.options.credentials())
}

/// Asks the server whether the session would be let in, and as whom (`HEAD` on the stream
/// URL), without opening a stream.
async fn probe_session(url: &str, credentials: bool) -> SessionProbe {
    let mut request = gloo_net::http::RequestBuilder::new(url).method(gloo_net::http::Method::HEAD);
    if credentials {
        request = request.credentials(web_sys::RequestCredentials::Include);
    }
    match request.send().await {
        Ok(response) if response.status() == 401 => SessionProbe::Refused,
        Ok(response) => SessionProbe::Accepted(
            response
                .headers()
                .get(api::IDENTITY_TAG_HEADER)
                .filter(|tag| !tag.is_empty()),
        ),
        Err(_) => SessionProbe::Unanswered,
    }
}

fn fail(shared: &Shared, err: UseSseError) {
    let (closed, probe) = {
        let mut c = shared.borrow_mut();
        let closed = close_with_error(&mut c, &err);
        // A stream that never opened may have been refused: find out why before retrying.
        let probe = (!closed.was_open && err == UseSseError::Connection).then(|| {
            let (url, credentials) = session_probe_request(&c);
            (url, credentials, c.generation)
        });
        (closed, probe)
    };
    closed.notify(&err);
    match probe {
        None => schedule_reconnect(shared),
        Some((url, credentials, generation)) => {
            let shared = SendWrapper::new(shared.clone());
            leptos::task::spawn_local(async move {
                let refused = matches!(probe_session(&url, credentials).await, SessionProbe::Refused);
                if shared.borrow().generation != generation || shared.borrow().stopped {
                    return;
                }
                if refused {
                    session_refused(&shared, true);
                    return;
                }
                // The server answers, yet SSE does not open: after a few tries, WebSocket.
                let fall_back = {
                    let mut c = shared.borrow_mut();
                    if c.transport == Transport::Sse && c.options.transport == TransportMode::Auto {
                        c.sse_failures += 1;
                        c.sse_failures >= SSE_FAILURES_BEFORE_FALLBACK
                    } else {
                        false
                    }
                };
                if fall_back {
                    fall_back_to_websocket(&shared, "failed");
                } else {
                    schedule_reconnect(&shared);
                }
            });
        }
    }
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
        c.stopped = true;
        set_state(&c, ConnectionReadyState::Closed, Some(Some(err.clone())));
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
    set_state(&c, ConnectionReadyState::Connecting, None);
    let again = shared.clone();
    c.reconnect_timer = set_timeout_with_handle(move || open(&again), Duration::from_millis(delay)).ok();
}

fn arm_stall_timer(shared: &Shared) {
    let mut c = shared.borrow_mut();
    if let Some(t) = c.stall_timer.take() {
        t.clear();
    }
    let timeout = c.options.stall_timeout;
    let again = shared.clone();
    c.stall_timer = set_timeout_with_handle(
        move || fail(&again, UseSseError::Stalled(timeout)),
        Duration::from_millis(timeout),
    )
    .ok();
}
