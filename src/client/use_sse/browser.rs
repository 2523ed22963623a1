//! The browser side of the hook: a thin adapter between web-sys and the
//! [`Machine`](super::machine::Machine) that makes every decision. It turns what the
//! browser reports (an `EventSource` or WebSocket event, a timer, a fetch's answer,
//! another tab's message) into [`Input`]s, performs the [`Action`]s that come back, and
//! copies the machine's view to the hook's signals.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    rc::{Rc, Weak},
    time::Duration,
};

use leptos::prelude::*;
use send_wrapper::SendWrapper;
use wasm_bindgen::{closure::Closure, JsCast};
use web_sys::{EventSource, EventSourceInit, MessageEvent};

use super::{
    machine::{Action, Fetched, Input, Machine, Notice, SessionProbe, Timer},
    tabs::{self, Relay},
    Signals, SseMessage, UseSseOptions,
};
use crate::{api, events::names};

/// How long `token_url` may take to answer before the fetch counts as failed.
const TOKEN_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A JS event listener, kept alive as long as it is registered.
type Listener = Closure<dyn FnMut(web_sys::Event)>;

/// The hook in one tab: the machine, and the browser objects its actions hold.
struct Hook {
    machine: RefCell<Machine>,
    io: RefCell<Io>,
    signals: Signals,
    options: UseSseOptions,
    /// Inputs that came while actions were being performed (an owner's callback that calls
    /// `open` or `close`): taken in order once the current ones are done.
    queue: RefCell<VecDeque<Input>>,
    busy: Cell<bool>,
}

/// The browser objects the machine's actions open.
#[derive(Default)]
struct Io {
    source: Option<(EventSource, Vec<(String, Listener)>)>,
    socket: Option<(web_sys::WebSocket, Vec<Listener>)>,
    probe: Option<(EventSource, Listener)>,
    relay: Option<Relay>,
    timers: Vec<(Timer, TimeoutHandle)>,
}

pub(super) fn start(
    options: UseSseOptions,
    signals: Signals,
) -> (impl Fn() + Clone + Send + Sync, impl Fn() + Clone + Send + Sync) {
    let user_id = options.user_id;
    let immediate = options.immediate;
    let machine = Machine::new(
        options.clone(),
        window().location().origin().unwrap_or_default(),
        tabs::supported(),
        Box::new(js_sys::Math::random),
    );
    let hook = Rc::new(Hook {
        machine: RefCell::new(machine),
        io: RefCell::default(),
        signals,
        options,
        queue: RefCell::default(),
        busy: Cell::new(false),
    });
    let on = |input: fn() -> Input| {
        let hook = SendWrapper::new(hook.clone());
        move || dispatch(&hook, input())
    };
    let (open, close) = (on(|| Input::Open), on(|| Input::Close));
    match user_id {
        // Open while a user is signed in; start over when the user changes.
        Some(user_id) => {
            let hook = SendWrapper::new(hook.clone());
            Effect::new(move |previous: Option<Option<String>>| {
                let current = user_id.get();
                if previous.as_ref() != Some(&current) {
                    let signed_in = current.is_some();
                    dispatch(&hook, Input::UserChanged { signed_in });
                }
                current
            });
        }
        None if immediate => {
            let hook = SendWrapper::new(hook.clone());
            Effect::new(move |_| dispatch(&hook, Input::Start));
        }
        None => {}
    }
    // After giving up: try again when the network is back or the tab is looked at again.
    for event in ["online", "visibilitychange"] {
        let hook = SendWrapper::new(hook.clone());
        let handle = window_event_listener_untyped(event, move |_| {
            let visible = document().visibility_state() == web_sys::VisibilityState::Visible;
            dispatch(&hook, Input::Wake { visible });
        });
        on_cleanup(move || handle.remove());
    }
    let hook = SendWrapper::new(hook);
    on_cleanup(move || dispatch(&hook, Input::Close));
    (open, close)
}

/// Feeds `input` to the machine and performs what it says, one input at a time.
fn dispatch(hook: &Rc<Hook>, input: Input) {
    hook.queue.borrow_mut().push_back(input);
    if hook.busy.replace(true) {
        return;
    }
    loop {
        let next = hook.queue.borrow_mut().pop_front();
        let Some(input) = next else { break };
        let now = window().performance().map_or(0.0, |p| p.now());
        let actions = hook.machine.borrow_mut().step(now, input);
        show_view(hook);
        for action in actions {
            perform(hook, action);
        }
    }
    hook.busy.set(false);
}

/// A callback that feeds what `input` makes of its argument to the hook, while the hook
/// lives.
fn feeder<T>(hook: &Rc<Hook>, input: impl Fn(T) -> Option<Input> + 'static) -> impl Fn(T) + 'static {
    let hook = Rc::downgrade(hook);
    move |value| {
        if let (Some(hook), Some(input)) = (Weak::upgrade(&hook), input(value)) {
            dispatch(&hook, input);
        }
    }
}

/// Copies the machine's view to the signals (only what changed, so nothing re-renders
/// for nothing).
fn show_view(hook: &Hook) {
    fn set<T: PartialEq + Send + Sync + 'static>(signal: RwSignal<T>, value: T) {
        if signal.with_untracked(|current| *current != value) {
            signal.set(value);
        }
    }
    let view = hook.machine.borrow().view().clone();
    let s = hook.signals;
    set(s.ready_state, view.ready_state);
    set(s.error, view.error);
    set(s.last_event_id, view.last_event_id);
    set(s.is_leader, view.is_leader);
    set(s.identity_tag, view.identity_tag);
    set(s.transport, view.transport);
}

fn perform(hook: &Rc<Hook>, action: Action) {
    match action {
        Action::OpenSse { url, credentials } => open_sse(hook, &url, credentials),
        Action::OpenWebSocket { url } => open_websocket(hook, &url),
        Action::CloseStream => close_stream(&mut hook.io.borrow_mut()),
        Action::OpenProbe { url, credentials } => open_probe(hook, &url, credentials),
        Action::CloseProbe => {
            if let Some((source, listener)) = hook.io.borrow_mut().probe.take() {
                remove_listener(&source, names::READY, &listener);
                source.close();
            }
        }
        Action::SetTimer(timer, ms) => {
            let fire = feeder(hook, move |()| Some(Input::TimerFired(timer)));
            let mut io = hook.io.borrow_mut();
            clear_timer(&mut io, timer);
            if let Ok(handle) = set_timeout_with_handle(move || fire(()), Duration::from_millis(ms)) {
                io.timers.push((timer, handle));
            }
        }
        Action::ClearTimer(timer) => clear_timer(&mut hook.io.borrow_mut(), timer),
        Action::ProbeSession {
            url,
            credentials,
            purpose,
            generation,
        } => {
            let answered = feeder(hook, move |outcome| {
                Some(Input::SessionProbed {
                    purpose,
                    generation,
                    outcome,
                })
            });
            leptos::task::spawn_local(async move { answered(probe_session(&url, credentials).await) });
        }
        Action::FetchToken {
            url,
            credentials,
            generation,
        } => {
            let fetched = feeder(hook, move |outcome| {
                Some(Input::TokenFetched { generation, outcome })
            });
            leptos::task::spawn_local(async move { fetched(fetch_token(&url, credentials).await) });
        }
        Action::JoinTabs { tag, generation } => {
            if let Some(relay) = hook.io.borrow_mut().relay.take() {
                relay.leave();
            }
            let heard = feeder(hook, |message| Some(Input::Heard(message)));
            let leads = feeder(hook, move |()| Some(Input::BecameLeader { generation }));
            let relay = Relay::join(&hook.options.url, &tag, heard, move || leads(()));
            match relay {
                Some(relay) => hook.io.borrow_mut().relay = Some(relay),
                None => dispatch(hook, Input::JoinFailed),
            }
        }
        Action::LeaveTabs => {
            if let Some(relay) = hook.io.borrow_mut().relay.take() {
                relay.leave();
            }
        }
        Action::PostToTabs(message) => {
            if let Some(relay) = &hook.io.borrow().relay {
                relay.post(&message);
            }
        }
        Action::Deliver(msg) => {
            hook.signals.last_event.set(Some(msg.clone()));
            (hook.options.on_message)(&msg);
        }
        Action::Notify(Notice::Open) => (hook.options.on_open)(),
        Action::Notify(Notice::Close) => (hook.options.on_close)(),
        Action::Notify(Notice::Error(err)) => (hook.options.on_error)(&err),
        Action::Warn(warning) => leptos::logging::warn!("{warning}"),
    }
}

fn clear_timer(io: &mut Io, timer: Timer) {
    io.timers.retain(|(t, handle)| {
        if *t == timer {
            handle.clear();
        }
        *t != timer
    });
}

fn remove_listener(source: &EventSource, name: &str, listener: &Listener) {
    let _ = source.remove_event_listener_with_callback(name, listener.as_ref().unchecked_ref());
}

/// Closes the EventSource or WebSocket and drops their listeners.
fn close_stream(io: &mut Io) {
    if let Some((source, listeners)) = io.source.take() {
        for (name, listener) in &listeners {
            remove_listener(&source, name, listener);
        }
        source.close();
    }
    if let Some((socket, _handlers)) = io.socket.take() {
        socket.set_onopen(None);
        socket.set_onmessage(None);
        socket.set_onerror(None);
        socket.set_onclose(None);
        let _ = socket.close();
    }
}

fn event_source(url: &str, credentials: bool) -> Option<EventSource> {
    let init = EventSourceInit::new();
    init.set_with_credentials(credentials);
    EventSource::new_with_event_source_init_dict(url, &init).ok()
}

fn open_sse(hook: &Rc<Hook>, url: &str, credentials: bool) {
    let Some(source) = event_source(url, credentials) else {
        return dispatch(hook, Input::StreamFailed);
    };
    let on_open = feeder(hook, |_: web_sys::Event| Some(Input::StreamOpened));
    let on_error = feeder(hook, |_: web_sys::Event| Some(Input::StreamFailed));
    let mut listeners = vec![
        ("open".to_string(), Listener::new(on_open)),
        ("error".to_string(), Listener::new(on_error)),
    ];
    for name in hook.options.listened_names() {
        let on_message = feeder(hook, |e: web_sys::Event| {
            let message = e.dyn_into::<MessageEvent>().ok()?;
            Some(Input::Message(SseMessage {
                id: message.last_event_id(),
                event: message.type_(),
                data: message.data().as_string().unwrap_or_default(),
                replayed: false,
            }))
        });
        listeners.push((name, Listener::new(on_message)));
    }
    for (name, listener) in &listeners {
        let _ = source.add_event_listener_with_callback(name, listener.as_ref().unchecked_ref());
    }
    hook.io.borrow_mut().source = Some((source, listeners));
}

/// The same stream over WebSocket: text messages holding SSE frames.
fn open_websocket(hook: &Rc<Hook>, url: &str) {
    let Ok(socket) = web_sys::WebSocket::new(url) else {
        return dispatch(hook, Input::StreamFailed);
    };
    let on_open = Listener::new(feeder(hook, |_: web_sys::Event| Some(Input::StreamOpened)));
    let on_message = Listener::new(feeder(hook, |e: web_sys::Event| {
        let text = e.dyn_ref::<MessageEvent>()?.data().as_string()?;
        Some(Input::SocketText(text))
    }));
    let on_close = Listener::new(feeder(hook, |_: web_sys::Event| Some(Input::StreamFailed)));
    socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    hook.io.borrow_mut().socket = Some((socket, vec![on_open, on_message, on_close]));
}

/// The SSE probe: only its `ready` is listened for.
fn open_probe(hook: &Rc<Hook>, url: &str, credentials: bool) {
    let Some(source) = event_source(url, credentials) else {
        return dispatch(hook, Input::ProbeFailed);
    };
    let on_ready = Listener::new(feeder(hook, |_: web_sys::Event| Some(Input::ProbeReady)));
    let _ = source.add_event_listener_with_callback(names::READY, on_ready.as_ref().unchecked_ref());
    hook.io.borrow_mut().probe = Some((source, on_ready));
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

/// Asks the server whether the session would be let in, and as whom (`HEAD` on the stream
/// URL), without opening a stream.
async fn probe_session(url: &str, credentials: bool) -> SessionProbe {
    let mut request = gloo_net::http::RequestBuilder::new(url).method(gloo_net::http::Method::HEAD);
    if credentials {
        request = request.credentials(web_sys::RequestCredentials::Include);
    }
    match request.send().await {
        Ok(response) if response.status() == 401 => SessionProbe::Refused,
        Ok(response) if response.status() == 503 => SessionProbe::Unavailable,
        Ok(response) => SessionProbe::Accepted(
            response
                .headers()
                .get(api::IDENTITY_TAG_HEADER)
                .filter(|tag| !tag.is_empty()),
        ),
        Err(_) => SessionProbe::Unanswered,
    }
}
