//! `<SseNotifications/>`: toasts for the events of [`use_sse`](super::use_sse).
//!
//! ```no_run
//! use leptos::prelude::*;
//! use sse_notify::client::{Position, SseNotifications};
//!
//! #[component]
//! fn Layout() -> impl IntoView {
//!     view! { <SseNotifications position=Position::BottomRight max_notifications=3 /> }
//! }
//! ```
//!
//! - a toast per `notification`, styled by its kind, with an action link for `actionUrl`;
//! - one toast per reel for `reel_upload_progress`, updated in place, that turns into a
//!   "ready" toast with a link on `reel_ready`;
//! - `system_alert` as a banner for its `duration`; `user_update` as a quiet toast;
//! - past `max_notifications`, toasts wait and appear as others leave (none are lost);
//! - auto-dismiss pauses while hovered or focused; the close button and Escape dismiss;
//! - a polite live region (errors and alerts assertive); SSR renders the empty region.

use std::collections::VecDeque;

use leptos::prelude::*;

use super::use_sse::{
    use_sse_with_options, ConnectionReadyState, SseMessage, UseSseError, UseSseOptions, UseSseReturn,
};
use crate::events::{
    Event, NotificationKind, ReelUploadProgress, SystemAlertKind, UploadStatus, UserUpdateKind,
};

/// Where the toast stack sits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Position {
    #[default]
    TopRight,
    TopLeft,
    BottomRight,
    BottomLeft,
}

impl Position {
    /// The CSS modifier, also the value accepted by [`Position::parse`].
    pub fn as_str(self) -> &'static str {
        match self {
            Position::TopRight => "top-right",
            Position::TopLeft => "top-left",
            Position::BottomRight => "bottom-right",
            Position::BottomLeft => "bottom-left",
        }
    }

    /// `top-right`, `top-left`, `bottom-right` or `bottom-left`.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Position::TopRight,
            Position::TopLeft,
            Position::BottomRight,
            Position::BottomLeft,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// How a toast looks and how loudly it is announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToastKind {
    Info,
    Success,
    Warning,
    Error,
    /// `user_update`: a quiet note.
    Quiet,
}

impl ToastKind {
    fn as_str(self) -> &'static str {
        match self {
            ToastKind::Info => "info",
            ToastKind::Success => "success",
            ToastKind::Warning => "warning",
            ToastKind::Error => "error",
            ToastKind::Quiet => "quiet",
        }
    }
}

/// One toast.
#[derive(Debug, Clone, PartialEq)]
pub struct Toast {
    pub key: u64,
    pub kind: ToastKind,
    pub title: String,
    pub message: String,
    /// `(href, label)` of its action link.
    pub link: Option<(String, String)>,
    /// Upload progress in percent, for reel toasts.
    pub progress: Option<u8>,
    /// The reel it follows, so later events update it in place.
    pub reel_id: Option<String>,
    /// Stays until dismissed by hand (an upload in flight).
    pub sticky: bool,
    /// How long it stays, when it overrides the component's `dismiss_delay`.
    pub duration_ms: Option<u64>,
}

/// The toasts on screen, those waiting for room, and the system-alert banners.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToastStore {
    pub visible: Vec<Toast>,
    pub waiting: VecDeque<Toast>,
    pub banners: Vec<Toast>,
    max_visible: usize,
    next_key: u64,
}

impl ToastStore {
    pub fn new(max_visible: usize) -> Self {
        Self {
            max_visible: max_visible.max(1),
            ..Self::default()
        }
    }

    /// Turns an event into a toast (or an update of one). Other events are ignored.
    pub fn apply(&mut self, message: &SseMessage) {
        let Ok(event) = message.parse() else { return };
        match event {
            Event::Notification(n) => {
                let kind = match n.kind {
                    NotificationKind::Info => ToastKind::Info,
                    NotificationKind::Success => ToastKind::Success,
                    NotificationKind::Warning => ToastKind::Warning,
                    NotificationKind::Error => ToastKind::Error,
                };
                let link = n.action_url.map(|url| (url, "Open".to_string()));
                self.push(self.toast(kind, n.title, n.message, link));
            }
            Event::ReelUploadProgress(p) => self.upload_progress(p),
            Event::ReelReady(r) => {
                let link = Some((r.playback_url, "Watch".to_string()));
                let updated = self.update_reel(&r.reel_id, |t| {
                    t.kind = ToastKind::Success;
                    t.title = "Reel ready".into();
                    t.message = format!("{} is ready to watch", r.reel_id);
                    t.progress = Some(100);
                    t.sticky = false;
                    t.link = link.clone();
                });
                if !updated {
                    let mut toast = self.toast(
                        ToastKind::Success,
                        "Reel ready".into(),
                        format!("{} is ready to watch", r.reel_id),
                        link,
                    );
                    toast.reel_id = Some(r.reel_id);
                    self.push(toast);
                }
            }
            Event::UserUpdate(u) => {
                let what = match u.kind {
                    UserUpdateKind::Profile => "Profile updated",
                    UserUpdateKind::Settings => "Settings updated",
                    UserUpdateKind::Subscription => "Subscription updated",
                };
                self.push(self.toast(ToastKind::Quiet, what.into(), String::new(), None));
            }
            Event::SystemAlert(a) => {
                let kind = match a.kind {
                    SystemAlertKind::Info => ToastKind::Info,
                    SystemAlertKind::Warning | SystemAlertKind::Maintenance => ToastKind::Warning,
                };
                let title = match a.kind {
                    SystemAlertKind::Maintenance => "Maintenance",
                    SystemAlertKind::Warning => "Warning",
                    SystemAlertKind::Info => "System notice",
                };
                let mut banner = self.toast(kind, title.into(), a.message, None);
                banner.duration_ms = a.duration;
                self.next_key += 1;
                self.banners.push(banner);
            }
            Event::Heartbeat(_) | Event::Custom { .. } => {}
        }
    }

    fn upload_progress(&mut self, p: ReelUploadProgress) {
        let (kind, title, sticky) = match p.status {
            UploadStatus::Uploading => (ToastKind::Info, "Uploading reel", true),
            UploadStatus::Processing => (ToastKind::Info, "Processing reel", true),
            UploadStatus::Ready => (ToastKind::Success, "Reel processed", false),
            UploadStatus::Error => (ToastKind::Error, "Upload failed", false),
        };
        let message = p
            .message
            .clone()
            .unwrap_or_else(|| format!("{} — {}%", p.reel_id, p.progress));
        let updated = self.update_reel(&p.reel_id, |t| {
            // A late progress event never undoes "ready".
            if t.kind == ToastKind::Success && t.link.is_some() {
                return;
            }
            t.kind = kind;
            t.title = title.into();
            t.message = message.clone();
            t.progress = Some(p.progress);
            t.sticky = sticky;
        });
        if !updated {
            let mut toast = self.toast(kind, title.into(), message, None);
            toast.progress = Some(p.progress);
            toast.reel_id = Some(p.reel_id);
            toast.sticky = sticky;
            self.push(toast);
        }
    }

    fn toast(
        &self,
        kind: ToastKind,
        title: String,
        message: String,
        link: Option<(String, String)>,
    ) -> Toast {
        Toast {
            key: self.next_key,
            kind,
            title,
            message,
            link,
            progress: None,
            reel_id: None,
            sticky: false,
            duration_ms: None,
        }
    }

    /// Shows `toast`, or queues it when the stack is full.
    pub fn push(&mut self, toast: Toast) {
        self.next_key = self.next_key.max(toast.key) + 1;
        if self.visible.len() < self.max_visible {
            self.visible.push(toast);
        } else {
            self.waiting.push_back(toast);
        }
    }

    /// Updates the toast following `reel_id`, wherever it is. `false` if there is none.
    fn update_reel(&mut self, reel_id: &str, update: impl FnOnce(&mut Toast)) -> bool {
        let toast = self
            .visible
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|t| t.reel_id.as_deref() == Some(reel_id));
        match toast {
            Some(t) => {
                update(t);
                true
            }
            None => false,
        }
    }

    /// Removes a toast or banner; the first waiting toast takes its place.
    pub fn dismiss(&mut self, key: u64) {
        self.banners.retain(|t| t.key != key);
        let before = self.visible.len();
        self.visible.retain(|t| t.key != key);
        self.waiting.retain(|t| t.key != key);
        if self.visible.len() < before {
            if let Some(next) = self.waiting.pop_front() {
                self.visible.push(next);
            }
        }
    }

    /// A visible toast or banner by key.
    pub fn get(&self, key: u64) -> Option<&Toast> {
        self.visible
            .iter()
            .chain(self.banners.iter())
            .find(|t| t.key == key)
    }
}

/// Connection state, for a status indicator beside the toasts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStatus {
    pub state: ConnectionReadyState,
    /// The latest problem, if any.
    pub error: Option<UseSseError>,
}

/// Toasts for the notification stream. Opens one stream with [`use_sse_with_options`].
#[component]
pub fn SseNotifications(
    /// The signed-in user: the stream is open while this is `Some` and reopens when it
    /// changes. Leave it out to connect at once with the session cookie.
    #[prop(optional, into)]
    user_id: Option<Signal<Option<String>>>,
    /// A session token sent as `?token=`, where the cookie cannot be used.
    #[prop(optional, into)]
    session_id: Option<String>,
    /// Toasts on screen at once; the rest wait. Defaults to 5.
    #[prop(default = 5)]
    max_notifications: usize,
    /// Dismiss toasts by themselves. Defaults to `true`.
    #[prop(default = true)]
    auto_dismiss: bool,
    /// Milliseconds a toast stays. Defaults to 5,000.
    #[prop(default = 5_000)]
    dismiss_delay: u64,
    /// Which corner the stack sits in. Defaults to top right.
    #[prop(default = Position::TopRight)]
    position: Position,
    /// Receives the connection state, for a status indicator.
    #[prop(optional)]
    status: Option<RwSignal<ConnectionStatus>>,
    /// Called for every event, toasts or not (custom events included).
    #[prop(optional, into)]
    on_message: Option<Callback<SseMessage>>,
    /// Extra event names to listen for, beyond the built-in ones (for `on_message`).
    #[prop(optional)]
    extra_events: Vec<String>,
    /// Milliseconds without any event or heartbeat before the stream counts as stalled and
    /// is reopened. Defaults to `None`: the hook's default (65,000).
    #[prop(default = None)]
    retry_timeout: Option<u64>,
) -> impl IntoView {
    let store = RwSignal::new(ToastStore::new(max_notifications));
    let mut options = UseSseOptions::default().on_message(move |msg| {
        store.update(|s| s.apply(msg));
        if let Some(cb) = on_message {
            cb.run(msg.clone());
        }
    });
    if let Some(user_id) = user_id {
        options = options.user_id(user_id);
    }
    options = options.session_id(session_id);
    if let Some(ms) = retry_timeout {
        options = options.retry_timeout(ms);
    }
    if !extra_events.is_empty() {
        let mut events: Vec<String> = crate::events::names::BUILT_IN
            .iter()
            .map(|s| s.to_string())
            .collect();
        events.extend(extra_events);
        options = options.events(events);
    }
    let UseSseReturn {
        ready_state, error, ..
    } = use_sse_with_options(options);
    if let Some(status) = status {
        Effect::new(move |_| {
            status.set(ConnectionStatus {
                state: ready_state.get(),
                error: error.get(),
            });
        });
    }

    #[cfg(not(feature = "ssr"))]
    {
        // Escape dismisses the toast that holds focus, else the newest one.
        let handle = window_event_listener(leptos::ev::keydown, move |e| {
            if e.key() != "Escape" {
                return;
            }
            let focused = document()
                .active_element()
                .and_then(|el| el.closest("[data-toast-key]").ok().flatten())
                .and_then(|el| el.get_attribute("data-toast-key"))
                .and_then(|k| k.parse::<u64>().ok());
            let key = focused.or_else(|| store.with_untracked(|s| s.visible.last().map(|t| t.key)));
            if let Some(key) = key {
                store.update(|s| s.dismiss(key));
            }
        });
        on_cleanup(move || handle.remove());
    }

    let toast_view = move |key: u64| {
        view! { <ToastView store key auto_dismiss dismiss_delay /> }
    };
    let polite = move || {
        store.with(|s| {
            s.visible
                .iter()
                .filter(|t| t.kind != ToastKind::Error)
                .map(|t| t.key)
                .collect::<Vec<_>>()
        })
    };
    let assertive = move || {
        store.with(|s| {
            s.visible
                .iter()
                .filter(|t| t.kind == ToastKind::Error)
                .map(|t| t.key)
                .collect::<Vec<_>>()
        })
    };
    let banners = move || store.with(|s| s.banners.iter().map(|t| t.key).collect::<Vec<_>>());
    view! {
        <section class="sse-banners" aria-label="System alerts" role="alert" aria-live="assertive">
            <For each=banners key=|k| *k children=toast_view />
        </section>
        <section
            class=format!("sse-toasts sse-toasts--{}", position.as_str())
            aria-label="Notifications"
            data-position=position.as_str()
        >
            <div class="sse-toasts__list" role="status" aria-live="polite">
                <For each=polite key=|k| *k children=toast_view />
            </div>
            <div class="sse-toasts__list" role="alert" aria-live="assertive">
                <For each=assertive key=|k| *k children=toast_view />
            </div>
        </section>
    }
}

/// One toast, reading its fields from the store by key so progress updates re-render
/// only what changed. Owns the auto-dismiss timer, paused while hovered or focused.
#[component]
fn ToastView(store: RwSignal<ToastStore>, key: u64, auto_dismiss: bool, dismiss_delay: u64) -> impl IntoView {
    let toast = Memo::new(move |_| store.with(|s| s.get(key).cloned()));
    let field = move |f: fn(&Toast) -> String| move || toast.with(|t| t.as_ref().map(f).unwrap_or_default());
    let dismiss = move || store.update(|s| s.dismiss(key));
    let timer = AutoDismiss::new(dismiss);
    let sticky = Memo::new(move |_| toast.with(|t| t.as_ref().is_none_or(|t| t.sticky)));
    if auto_dismiss {
        // Start (or restart) when the toast stops being sticky: an upload that became ready.
        Effect::new(move |_| {
            if !sticky.get() {
                let delay = toast
                    .with_untracked(|t| t.as_ref().and_then(|t| t.duration_ms))
                    .unwrap_or(dismiss_delay);
                timer.start(delay);
            }
        });
    }
    let kind = move || toast.with(|t| t.as_ref().map_or("info", |t| t.kind.as_str()));
    let progress = move || toast.with(|t| t.as_ref().and_then(|t| t.progress));
    let link = move || toast.with(|t| t.as_ref().and_then(|t| t.link.clone()));
    view! {
        <div
            class=move || format!("sse-toast sse-toast--{}", kind())
            data-toast-key=key.to_string()
            data-kind=kind
            tabindex="0"
            on:mouseenter=move |_| timer.pause()
            on:mouseleave=move |_| timer.resume()
            on:focusin=move |_| timer.pause()
            on:focusout=move |_| timer.resume()
        >
            <div class="sse-toast__body">
                <p class="sse-toast__title">{field(|t| t.title.clone())}</p>
                <Show when=move || toast.with(|t| t.as_ref().is_some_and(|t| !t.message.is_empty()))>
                    <p class="sse-toast__message">{field(|t| t.message.clone())}</p>
                </Show>
                {move || progress().map(|p| view! {
                    <div class="sse-toast__progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow=p.to_string()>
                        <div class="sse-toast__bar" style=format!("width: {p}%")></div>
                    </div>
                })}
                {move || link().map(|(href, label)| view! { <a class="sse-toast__link" href=href>{label}</a> })}
            </div>
            <button class="sse-toast__close" type="button" aria-label="Dismiss notification" on:click=move |_| dismiss()>
                "×"
            </button>
        </div>
    }
}

/// A pausable one-shot timer. Under SSR it never fires.
#[derive(Clone, Copy)]
#[cfg_attr(feature = "ssr", allow(dead_code))]
struct AutoDismiss {
    state: StoredValue<TimerState, LocalStorage>,
    on_fire: StoredValue<Box<dyn Fn()>, LocalStorage>,
}

#[derive(Default)]
#[cfg_attr(feature = "ssr", allow(dead_code))]
struct TimerState {
    remaining_ms: Option<f64>,
    started_at: f64,
    paused: bool,
    handle: Option<TimeoutHandle>,
}

impl AutoDismiss {
    fn new(on_fire: impl Fn() + 'static) -> Self {
        let timer = Self {
            state: StoredValue::new_local(TimerState::default()),
            on_fire: StoredValue::new_local(Box::new(on_fire)),
        };
        on_cleanup(move || timer.clear());
        timer
    }

    fn clear(self) {
        #[cfg(not(feature = "ssr"))]
        {
            let _ = self.state.try_update_value(|s| {
                if let Some(h) = s.handle.take() {
                    h.clear();
                }
            });
        }
    }

    fn start(self, delay_ms: u64) {
        #[cfg(not(feature = "ssr"))]
        {
            self.clear();
            self.state
                .update_value(|s| s.remaining_ms = Some(delay_ms as f64));
            if !self.state.with_value(|s| s.paused) {
                self.run();
            }
        }
        #[cfg(feature = "ssr")]
        let _ = delay_ms;
    }

    #[cfg(not(feature = "ssr"))]
    fn run(self) {
        let Some(remaining) = self.state.with_value(|s| s.remaining_ms) else {
            return;
        };
        let handle = set_timeout_with_handle(
            move || {
                let _ = self.on_fire.try_with_value(|f| f());
            },
            std::time::Duration::from_millis(remaining.max(0.0) as u64),
        )
        .ok();
        self.state.update_value(|s| {
            s.started_at = js_sys::Date::now();
            s.handle = handle;
        });
    }

    fn pause(self) {
        #[cfg(not(feature = "ssr"))]
        {
            self.clear();
            self.state.update_value(|s| {
                if !s.paused {
                    s.paused = true;
                    if let Some(r) = s.remaining_ms.as_mut() {
                        *r -= js_sys::Date::now() - s.started_at;
                    }
                }
            });
        }
    }

    fn resume(self) {
        #[cfg(not(feature = "ssr"))]
        {
            let was_paused = self
                .state
                .try_update_value(|s| std::mem::replace(&mut s.paused, false));
            if was_paused == Some(true) {
                self.run();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: &str, data: &str) -> SseMessage {
        SseMessage {
            id: "1".into(),
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn past_the_maximum_toasts_wait_and_none_are_lost() {
        let mut store = ToastStore::new(3);
        for i in 0..8 {
            store.apply(&msg(
                "notification",
                &format!(r#"{{"title":"n{i}","message":"m"}}"#),
            ));
        }
        assert_eq!(store.visible.len(), 3);
        assert_eq!(store.waiting.len(), 5);
        let mut seen = Vec::new();
        while let Some(first) = store.visible.first().cloned() {
            seen.push(first.title.clone());
            store.dismiss(first.key);
        }
        assert_eq!(seen, (0..8).map(|i| format!("n{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn reel_progress_updates_one_toast_that_becomes_ready() {
        let mut store = ToastStore::new(5);
        for p in [10, 50, 90] {
            store.apply(&msg(
                "reel_upload_progress",
                &format!(r#"{{"reelId":"r1","progress":{p},"status":"uploading"}}"#),
            ));
        }
        assert_eq!(store.visible.len(), 1);
        assert_eq!(store.visible[0].progress, Some(90));
        assert!(store.visible[0].sticky);
        store.apply(&msg(
            "reel_ready",
            r#"{"reelId":"r1","playbackUrl":"https://cdn/r1.m3u8"}"#,
        ));
        assert_eq!(store.visible.len(), 1);
        let t = &store.visible[0];
        assert_eq!(t.kind, ToastKind::Success);
        assert_eq!(t.link.as_ref().map(|l| l.0.as_str()), Some("https://cdn/r1.m3u8"));
        assert!(!t.sticky);
    }

    #[test]
    fn alerts_are_banners_and_custom_events_make_no_toast() {
        let mut store = ToastStore::new(5);
        store.apply(&msg(
            "system_alert",
            r#"{"message":"down at 10","type":"maintenance","duration":8000}"#,
        ));
        store.apply(&msg("order.shipped", r#"{"id":1}"#));
        assert!(store.visible.is_empty());
        assert_eq!(store.banners.len(), 1);
        assert_eq!(store.banners[0].duration_ms, Some(8000));
        let key = store.banners[0].key;
        store.dismiss(key);
        assert!(store.banners.is_empty());
    }

    #[test]
    fn positions_round_trip() {
        for p in ["top-right", "top-left", "bottom-right", "bottom-left"] {
            assert_eq!(Position::parse(p).unwrap().as_str(), p);
        }
        assert!(Position::parse("middle").is_none());
    }
}
