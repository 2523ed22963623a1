//! One stream per browser: the tabs of one origin and identity elect a leader with the Web
//! Locks API, and the leader relays what its stream brings to the others over a
//! BroadcastChannel.
//!
//! The lock and the channel are named by the identity tag the server confirmed (the
//! `HEAD` probe's, then each stream's `ready`), never by what the page says about its user:
//! tabs signed in as different users in one browser never share. Every message carries
//! the sender's tag too, and one with another tag is dropped.
//!
//! The lock is held for as long as the leader's hook lives (a promise that resolves only
//! on release); the browser hands it to the next waiting tab when the leader closes,
//! navigates away or crashes. Web Locks are reached through `js_sys::Reflect` because
//! web-sys ships them behind its unstable flag, which every host app would have to set.

use std::{cell::RefCell, rc::Rc};

use js_sys::{Function, Promise, Reflect};
use serde::{Deserialize, Serialize};
use wasm_bindgen::{closure::Closure, JsCast, JsValue};
use web_sys::{AbortController, BroadcastChannel, MessageEvent};

pub(super) use super::machine::TabMessage;

/// A message and the identity tag of the tab that sent it.
#[derive(Serialize, Deserialize)]
struct Envelope<M> {
    tag: String,
    message: M,
}

/// Whether this browser has both Web Locks and BroadcastChannel.
pub(super) fn supported() -> bool {
    let Some(window) = web_sys::window() else {
        return false;
    };
    let locks = Reflect::get(&window.navigator(), &"locks".into()).unwrap_or(JsValue::UNDEFINED);
    let channel = Reflect::get(&window, &"BroadcastChannel".into()).unwrap_or(JsValue::UNDEFINED);
    !locks.is_undefined() && !locks.is_null() && channel.is_function()
}

/// This tab's place in the election: the channel it listens on, and its lock request (or
/// the lock itself, once it leads).
pub(super) struct Relay {
    /// The identity tag of the tabs in this election.
    tag: String,
    channel: BroadcastChannel,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_granted: Closure<dyn FnMut(JsValue) -> Promise>,
    /// Cancels the lock request of a tab that is still waiting.
    abort: AbortController,
    /// Resolves the promise that holds the lock.
    release: Rc<RefCell<Option<Function>>>,
}

impl Relay {
    /// Joins the election of the tabs streaming from `url` as the identity `tag`:
    /// `on_message` hears the other tabs, `on_leader` runs once this tab holds the lock.
    /// `None` where Web Locks or BroadcastChannel are missing.
    pub(super) fn join(
        url: &str,
        tag: &str,
        on_message: impl Fn(TabMessage) + 'static,
        on_leader: impl FnOnce() + 'static,
    ) -> Option<Self> {
        let window = web_sys::window()?;
        let locks = Reflect::get(&window.navigator(), &"locks".into()).ok()?;
        let request: Function = Reflect::get(&locks, &"request".into()).ok()?.dyn_into().ok()?;
        let name = format!("sse-notify:{url}:{tag}");
        let channel = BroadcastChannel::new(&name).ok()?;
        let own_tag = tag.to_string();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            let Some(text) = event.data().as_string() else {
                return;
            };
            match serde_json::from_str::<Envelope<TabMessage>>(&text) {
                Ok(envelope) if envelope.tag == own_tag => on_message(envelope.message),
                _ => {}
            }
        });
        channel.set_onmessage(Some(on_message.as_ref().unchecked_ref()));

        let release: Rc<RefCell<Option<Function>>> = Rc::default();
        let mut on_leader = Some(on_leader);
        let held = release.clone();
        let on_granted = Closure::<dyn FnMut(JsValue) -> Promise>::new(move |_lock: JsValue| {
            // Held until `release` resolves it (or the tab goes away).
            let held = held.clone();
            let promise = Promise::new(&mut |resolve, _reject| {
                *held.borrow_mut() = Some(resolve);
            });
            if let Some(on_leader) = on_leader.take() {
                on_leader();
            }
            promise
        });
        let abort = AbortController::new().ok()?;
        let lock_options = js_sys::Object::new();
        Reflect::set(&lock_options, &"signal".into(), &abort.signal()).ok()?;
        let pending = request
            .call3(&locks, &name.as_str().into(), &lock_options, on_granted.as_ref())
            .ok()?;
        // An aborted request rejects: that is how a tab that never led leaves.
        if let Ok(pending) = pending.dyn_into::<Promise>() {
            let ignore = Closure::<dyn FnMut(JsValue)>::new(|_| {});
            let _ = pending.catch(&ignore);
            ignore.forget();
        }
        let relay = Self {
            tag: tag.to_string(),
            channel,
            _on_message: on_message,
            _on_granted: on_granted,
            abort,
            release,
        };
        relay.post(&TabMessage::Hello);
        Some(relay)
    }

    /// Sends `message` to every other tab in the election.
    pub(super) fn post(&self, message: &TabMessage) {
        let envelope = Envelope {
            tag: self.tag.clone(),
            message,
        };
        if let Ok(text) = serde_json::to_string(&envelope) {
            let _ = self.channel.post_message(&text.into());
        }
    }

    /// Leaves the election: gives up the lock (or the request for it) and the channel.
    pub(super) fn leave(self) {
        self.abort.abort();
        if let Some(resolve) = self.release.borrow_mut().take() {
            let _ = resolve.call0(&JsValue::UNDEFINED);
        }
        self.channel.set_onmessage(None);
        self.channel.close();
    }
}
