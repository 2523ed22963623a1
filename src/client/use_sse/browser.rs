//! The browser side of the hook: the `EventSource` (in the tab that leads, or in every tab
//! where tabs cannot share), its listeners, timers, reconnects and session handling, and
//! the follower's side of a shared stream.

use std::{cell::RefCell, collections::VecDeque, rc::Rc, time::Duration};

use send_wrapper::SendWrapper;
use wasm_bindgen::{closure::Closure, JsCast};
use web_sys::{EventSource, EventSourceInit, MessageEvent};

use super::{
    tabs::{self, Relay, TabMessage},
    ConnectionReadyState, Signals, SseMessage, UseSseError, UseSseOptions,
};
use crate::{backoff::backoff_delay, events::names};

/// How many recent ids are remembered to drop duplicates.
const SEEN_IDS: usize = 512;
/// Reconnect delays never grow past this.
const MAX_RECONNECT_DELAY_MS: u64 = 30_000;
/// Fresh tokens fetched in a row without the stream opening, before giving up on them.
const MAX_TOKEN_REFRESHES: u32 = 2;

/// Who holds the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// This tab alone (tabs do not share, or cannot).
    Alone,
    /// Another tab leads; this one hears its events through the relay.
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
    seen: VecDeque<String>,
    last_id: Option<String>,
    /// The token sent as `?token=`: the configured one, or the last fresh one.
    token: Option<String>,
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
        token: options.session_id.clone(),
        options,
        signals,
        role: Role::Alone,
        relay: None,
        source: None,
        listeners: Vec::new(),
        seen: VecDeque::new(),
        last_id: None,
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
                        c.seen.clear();
                        c.signals.last_event_id.set(None);
                    }
                    if current.is_some() {
                        begin(&shared, current.as_deref());
                    }
                }
                current
            });
        }
        None if immediate => {
            let shared = SendWrapper::new(shared.clone());
            Effect::new(move |_| begin(&shared, None));
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

/// Starts holding or sharing the stream: joins the tabs' election, or opens alone.
fn begin(shared: &Shared, user: Option<&str>) {
    let mut c = shared.borrow_mut();
    c.generation += 1;
    c.stopped = false;
    c.attempts = 0;
    c.refreshes = 0;
    if c.options.share_across_tabs && tabs::supported() {
        let name = format!("sse-notify:{}:{}", c.options.url, user.unwrap_or(""));
        let hears = {
            let shared = shared.clone();
            move |message| heard(&shared, message)
        };
        let leads = {
            let shared = shared.clone();
            let generation = c.generation;
            move || became_leader(&shared, generation)
        };
        c.relay = Relay::join(&name, hears, leads);
        if c.relay.is_some() {
            c.role = Role::Follower;
            c.signals.is_leader.set(false);
            c.signals.ready_state.set(ConnectionReadyState::Connecting);
            return;
        }
    }
    c.role = Role::Alone;
    c.signals.is_leader.set(true);
    drop(c);
    open(shared);
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
        (Role::Follower, TabMessage::State { state, error }) => {
            let c = shared.borrow();
            c.signals.ready_state.set(ConnectionReadyState::parse(&state));
            let error = error.and_then(|(code, detail)| UseSseError::from_code(&code, &detail));
            c.signals.error.set(error);
        }
        (Role::Leader, TabMessage::Hello) => publish_state(&shared.borrow()),
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
        });
    }
}

fn set_state(c: &Connection, state: ConnectionReadyState, error: Option<Option<UseSseError>>) {
    c.signals.ready_state.set(state);
    if let Some(error) = error {
        c.signals.error.set(error);
    }
    publish_state(c);
}

/// Closes the EventSource and its listeners and timers, without touching the signals.
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

/// `close()`: this tab stops; a tab that shares the stream hands it on.
fn close(shared: &Shared) {
    let was_open = {
        let mut c = shared.borrow_mut();
        c.stopped = true;
        c.generation += 1;
        let was_open = c.opened;
        c.opened = false;
        close_source(&mut c);
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
                let user = shared.borrow().options.user_id.and_then(|u| u.get_untracked());
                begin(shared, user.as_deref());
            }
        }
    }
}

fn open(shared: &Shared) {
    let mut c = shared.borrow_mut();
    close_source(&mut c);
    c.opened = false;
    let url = c.options.stream_url(c.last_id.as_deref(), c.token.as_deref());
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
        c.refreshes = 0;
        c.opened = true;
        set_state(&c, ConnectionReadyState::Open, Some(None));
        c.options.on_open.clone()
    };
    arm_stall_timer(shared);
    on_open();
}

/// A message from this tab's own `EventSource`.
fn received(shared: &Shared, message: MessageEvent) {
    arm_stall_timer(shared);
    let msg = SseMessage {
        id: message.last_event_id(),
        event: message.type_(),
        data: message.data().as_string().unwrap_or_default(),
    };
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
    if let Some(relay) = &shared.borrow().relay {
        if shared.borrow().role == Role::Leader && msg.event != names::RESYNC {
            relay.post(&TabMessage::Event(msg.clone()));
        }
    }
    deliver(shared, msg);
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
    let (on_error, on_close, was_open) = {
        let mut c = shared.borrow_mut();
        c.stopped = true;
        let was_open = c.opened;
        c.opened = false;
        close_source(&mut c);
        set_state(&c, ConnectionReadyState::Closed, Some(Some(err.clone())));
        (c.options.on_error.clone(), c.options.on_close.clone(), was_open)
    };
    on_error(&err);
    if was_open {
        on_close();
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
    let shared = SendWrapper::new(shared.clone());
    leptos::task::spawn_local(async move {
        let token = fetch_token(&token_url, credentials).await;
        let mut c = shared.borrow_mut();
        if c.generation != generation {
            return;
        }
        match token {
            Some(token) => {
                c.token = Some(token);
                c.stopped = false;
                drop(c);
                open(&shared);
            }
            None => leptos::logging::warn!("sse-notify: no fresh token from {token_url}"),
        }
    });
}

/// `GET token_url` with credentials: `{"token": "..."}`, or the token as text.
async fn fetch_token(url: &str, credentials: bool) -> Option<String> {
    let mut request = gloo_net::http::Request::get(url);
    if credentials || !url.starts_with("http") {
        request = request.credentials(web_sys::RequestCredentials::Include);
    }
    let response = request.send().await.ok()?;
    if !response.ok() {
        return None;
    }
    let text = response.text().await.ok()?;
    let text = text.trim();
    if text.starts_with('{') {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()?
            .get("token")?
            .as_str()
            .map(str::to_string)
    } else {
        (!text.is_empty()).then(|| text.to_string())
    }
}

/// Asks the server whether the session would be let in (`HEAD` on the stream URL): `false`
/// only on a clear 401.
async fn session_accepted(url: &str, credentials: bool) -> bool {
    let mut request = gloo_net::http::RequestBuilder::new(url).method(gloo_net::http::Method::HEAD);
    if credentials {
        request = request.credentials(web_sys::RequestCredentials::Include);
    }
    match request.send().await {
        Ok(response) => response.status() != 401,
        Err(_) => true,
    }
}

fn fail(shared: &Shared, err: UseSseError) {
    let (on_error, on_close, was_open, probe) = {
        let mut c = shared.borrow_mut();
        let was_open = c.opened;
        c.opened = false;
        close_source(&mut c);
        set_state(&c, ConnectionReadyState::Closed, Some(Some(err.clone())));
        // A stream that never opened may have been refused: find out why before retrying.
        let probe = (!was_open && err == UseSseError::Connection).then(|| {
            (
                c.options.stream_url(None, c.token.as_deref()),
                c.options.credentials(),
                c.generation,
            )
        });
        (
            c.options.on_error.clone(),
            c.options.on_close.clone(),
            was_open,
            probe,
        )
    };
    on_error(&err);
    if was_open {
        on_close();
    }
    match probe {
        None => schedule_reconnect(shared),
        Some((url, credentials, generation)) => {
            let shared = SendWrapper::new(shared.clone());
            leptos::task::spawn_local(async move {
                let accepted = session_accepted(&url, credentials).await;
                if shared.borrow().generation != generation || shared.borrow().stopped {
                    return;
                }
                if accepted {
                    schedule_reconnect(&shared);
                } else {
                    session_refused(&shared, true);
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
    let timeout = c.options.retry_timeout;
    let again = shared.clone();
    c.stall_timer = set_timeout_with_handle(
        move || fail(&again, UseSseError::Stalled(timeout)),
        Duration::from_millis(timeout),
    )
    .ok();
}
