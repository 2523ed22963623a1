//! The toast store and the [`Toaster`]: the toasts on screen, those waiting for room, and
//! the system-alert banners. Notifications from the stream and the app's own toasts go
//! through the same store.
//!
//! ```no_run
//! use leptos::prelude::*;
//! use sse_notify::client::{use_toaster, NewToast, ToastKind};
//!
//! #[component]
//! fn SaveButton() -> impl IntoView {
//!     let toaster = use_toaster();
//!     let save = move |_| {
//!         // A loading toast that turns into the result, like a promise toast.
//!         let id = toaster.loading("Saving…");
//!         leptos::task::spawn_local(async move {
//!             // ... save ...
//!             toaster.update(id, NewToast::new(ToastKind::Success, "Saved").duration_ms(3_000));
//!         });
//!     };
//!     let undo = move |_| {
//!         toaster.show(NewToast::new(ToastKind::Info, "Archived").action("Undo", move || {
//!             leptos::logging::log!("undo");
//!         }));
//!     };
//!     view! { <button on:click=save>"Save"</button> <button on:click=undo>"Archive"</button> }
//! }
//! ```
//!
//! [`use_toaster`] finds the toaster the [`SseNotifications`](super::SseNotifications)
//! component (or [`provide_toaster`]) put in the context, so any component below it can
//! show toasts.

use std::{collections::VecDeque, sync::Arc};

use leptos::prelude::*;

use super::use_sse::SseMessage;
use crate::events::{
    Event, NotificationKind, ReelUploadProgress, SystemAlertKind, UploadStatus, UserUpdateKind,
};

/// Identifies one toast, e.g. to update or dismiss it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ToastId(pub u64);

/// How a toast looks and how loudly it is announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToastKind {
    Info,
    Success,
    Warning,
    Error,
    /// Something in progress: sticky, with a spinner, until it is updated.
    Loading,
    /// `user_update`: a quiet note.
    Quiet,
}

impl ToastKind {
    /// The CSS modifier and `data-kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ToastKind::Info => "info",
            ToastKind::Success => "success",
            ToastKind::Warning => "warning",
            ToastKind::Error => "error",
            ToastKind::Loading => "loading",
            ToastKind::Quiet => "quiet",
        }
    }
}

/// How long a toast stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ToastDuration {
    /// The component's `dismiss_delay`.
    #[default]
    Default,
    Millis(u64),
    /// Until dismissed (or updated to something that is not).
    Sticky,
}

/// A button on a toast: its label and what it does (the toast is dismissed after).
#[derive(Clone)]
pub struct ToastAction {
    pub label: String,
    pub run: Arc<dyn Fn() + Send + Sync>,
}

impl PartialEq for ToastAction {
    fn eq(&self, other: &Self) -> bool {
        self.label == other.label && Arc::ptr_eq(&self.run, &other.run)
    }
}

impl std::fmt::Debug for ToastAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToastAction").field("label", &self.label).finish()
    }
}

/// One toast.
#[derive(Debug, Clone, PartialEq)]
pub struct Toast {
    pub id: ToastId,
    pub kind: ToastKind,
    pub title: String,
    pub message: String,
    /// `(href, label)` of its link (a notification's `actionUrl`).
    pub link: Option<(String, String)>,
    /// Its button.
    pub action: Option<ToastAction>,
    /// Upload progress in percent, for reel toasts.
    pub progress: Option<u8>,
    pub duration: ToastDuration,
    /// For toasts from the stream: what they stand for (`event:<id>`, `reel:<id>`), so a
    /// later event updates them in place and a dismissal in one tab reaches the others.
    pub source: Option<String>,
}

/// What to show: a toast before it has an id. Build with [`NewToast::new`] and the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct NewToast {
    pub kind: ToastKind,
    pub title: String,
    pub message: String,
    pub link: Option<(String, String)>,
    pub action: Option<ToastAction>,
    pub duration: ToastDuration,
}

impl NewToast {
    /// A toast of `kind` titled `title`; loading toasts are sticky.
    pub fn new(kind: ToastKind, title: impl Into<String>) -> Self {
        Self {
            kind,
            title: title.into(),
            message: String::new(),
            link: None,
            action: None,
            duration: if kind == ToastKind::Loading {
                ToastDuration::Sticky
            } else {
                ToastDuration::Default
            },
        }
    }

    /// Sets the text under the title.
    #[must_use]
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Stays `ms` milliseconds instead of the component's default.
    #[must_use]
    pub fn duration_ms(mut self, ms: u64) -> Self {
        self.duration = ToastDuration::Millis(ms);
        self
    }

    /// Stays until dismissed.
    #[must_use]
    pub fn sticky(mut self) -> Self {
        self.duration = ToastDuration::Sticky;
        self
    }

    /// Adds a link.
    #[must_use]
    pub fn link(mut self, href: impl Into<String>, label: impl Into<String>) -> Self {
        self.link = Some((href.into(), label.into()));
        self
    }

    /// Adds a button that runs `run` and then dismisses the toast.
    #[must_use]
    pub fn action(mut self, label: impl Into<String>, run: impl Fn() + Send + Sync + 'static) -> Self {
        self.action = Some(ToastAction {
            label: label.into(),
            run: Arc::new(run),
        });
        self
    }
}

/// Every string the toasts show, to replace for another language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToastLabels {
    pub region: String,
    pub alerts: String,
    pub dismiss: String,
    pub open: String,
    pub watch: String,
    /// `{n}` is replaced by the number of toasts waiting.
    pub more: String,
    pub uploading: String,
    pub processing: String,
    pub processed: String,
    pub upload_failed: String,
    pub reel_ready: String,
    /// `{reel}` is replaced by the reel id.
    pub ready_to_watch: String,
    pub profile_updated: String,
    pub settings_updated: String,
    pub subscription_updated: String,
    pub maintenance: String,
    pub warning: String,
    pub notice: String,
    /// The toast that sums up what was missed while away; `{n}` is replaced by how many.
    pub missed: String,
    pub missed_detail: String,
    /// Its button, which opens the notification center.
    pub show: String,
}

impl Default for ToastLabels {
    fn default() -> Self {
        Self {
            region: "Notifications".into(),
            alerts: "System alerts".into(),
            dismiss: "Dismiss notification".into(),
            open: "Open".into(),
            watch: "Watch".into(),
            more: "+{n} more".into(),
            uploading: "Uploading reel".into(),
            processing: "Processing reel".into(),
            processed: "Reel processed".into(),
            upload_failed: "Upload failed".into(),
            reel_ready: "Reel ready".into(),
            ready_to_watch: "{reel} is ready to watch".into(),
            profile_updated: "Profile updated".into(),
            settings_updated: "Settings updated".into(),
            subscription_updated: "Subscription updated".into(),
            maintenance: "Maintenance".into(),
            warning: "Warning".into(),
            notice: "System notice".into(),
            missed: "{n} new notifications".into(),
            missed_detail: "They are waiting in your notifications.".into(),
            show: "Show".into(),
        }
    }
}

/// Missed events that make at most this many toasts are shown one by one; a longer burst
/// becomes one summary toast (see [`ToastStore::apply_missed`]).
pub const MISSED_TOASTS: usize = 3;

/// The `source` of the summary toast, so a later burst replaces it rather than adding one.
const MISSED_SOURCE: &str = "missed";

/// The toasts on screen, those waiting for room, and the system-alert banners.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToastStore {
    pub visible: Vec<Toast>,
    pub waiting: VecDeque<Toast>,
    pub banners: Vec<Toast>,
    pub labels: ToastLabels,
    max_visible: usize,
    next_id: u64,
}

impl ToastStore {
    pub fn new(max_visible: usize) -> Self {
        Self {
            max_visible: max_visible.max(1),
            ..Self::default()
        }
    }

    /// Toasts on screen at once (at least 1); the rest wait.
    pub fn set_max_visible(&mut self, max_visible: usize) {
        self.max_visible = max_visible.max(1);
        while self.visible.len() < self.max_visible {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            self.visible.push(next);
        }
    }

    /// The same store with other strings.
    #[must_use]
    pub fn with_labels(mut self, labels: ToastLabels) -> Self {
        self.labels = labels;
        self
    }

    fn next_id(&mut self) -> ToastId {
        self.next_id += 1;
        ToastId(self.next_id)
    }

    /// Shows `toast`, or queues it when the stack is full; returns its id.
    pub fn show(&mut self, toast: NewToast) -> ToastId {
        let id = self.next_id();
        self.push(self.toast(id, toast, None));
        id
    }

    fn toast(&self, id: ToastId, new: NewToast, source: Option<String>) -> Toast {
        Toast {
            id,
            kind: new.kind,
            title: new.title,
            message: new.message,
            link: new.link,
            action: new.action,
            progress: None,
            duration: new.duration,
            source,
        }
    }

    fn push(&mut self, toast: Toast) {
        if self.visible.len() < self.max_visible {
            self.visible.push(toast);
        } else {
            self.waiting.push_back(toast);
        }
    }

    /// Replaces what toast `id` shows, where it is (a loading toast that became a result).
    /// `false` when there is no such toast any more.
    pub fn update(&mut self, id: ToastId, new: NewToast) -> bool {
        let Some(toast) = self.find_mut(|t| t.id == id) else {
            return false;
        };
        let source = toast.source.take();
        *toast = Toast {
            id,
            kind: new.kind,
            title: new.title,
            message: new.message,
            link: new.link,
            action: new.action,
            progress: None,
            duration: new.duration,
            source,
        };
        true
    }

    fn find_mut(&mut self, pick: impl Fn(&Toast) -> bool) -> Option<&mut Toast> {
        self.visible
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .chain(self.banners.iter_mut())
            .find(|t| pick(t))
    }

    /// Turns an event into a toast (or an update of one). Other events are ignored.
    pub fn apply(&mut self, message: &SseMessage) {
        if let Ok(event) = message.parse() {
            self.apply_event(&message.id, event);
        }
    }

    /// [`apply`](Self::apply) for an event already parsed; `id` is its event id.
    fn apply_event(&mut self, id: &str, event: Event) {
        let labels = self.labels.clone();
        let source = format!("event:{id}");
        match event {
            Event::Notification(n) => {
                let kind = match n.kind {
                    NotificationKind::Info => ToastKind::Info,
                    NotificationKind::Success => ToastKind::Success,
                    NotificationKind::Warning => ToastKind::Warning,
                    NotificationKind::Error => ToastKind::Error,
                };
                let mut new = NewToast::new(kind, n.title).message(n.message);
                new.link = n.action_url.map(|url| (url, labels.open.clone()));
                let id = self.next_id();
                self.push(self.toast(id, new, Some(source)));
            }
            Event::ReelUploadProgress(p) => self.upload_progress(p),
            Event::ReelReady(r) => {
                let source = format!("reel:{}", r.reel_id);
                let text = labels.ready_to_watch.replace("{reel}", &r.reel_id);
                let new = NewToast::new(ToastKind::Success, labels.reel_ready.clone())
                    .message(text)
                    .link(r.playback_url, labels.watch.clone());
                match self.find_mut(|t| t.source.as_deref() == Some(&source)) {
                    Some(toast) => {
                        toast.kind = new.kind;
                        toast.title = new.title;
                        toast.message = new.message;
                        toast.link = new.link;
                        toast.progress = Some(100);
                        toast.duration = ToastDuration::Default;
                    }
                    None => {
                        let id = self.next_id();
                        self.push(self.toast(id, new, Some(source)));
                    }
                }
            }
            Event::UserUpdate(u) => {
                let what = match u.kind {
                    UserUpdateKind::Profile => labels.profile_updated,
                    UserUpdateKind::Settings => labels.settings_updated,
                    UserUpdateKind::Subscription => labels.subscription_updated,
                };
                let id = self.next_id();
                self.push(self.toast(id, NewToast::new(ToastKind::Quiet, what), Some(source)));
            }
            Event::SystemAlert(a) => {
                let (kind, title) = match a.kind {
                    SystemAlertKind::Maintenance => (ToastKind::Warning, labels.maintenance),
                    SystemAlertKind::Warning => (ToastKind::Warning, labels.warning),
                    SystemAlertKind::Info => (ToastKind::Info, labels.notice),
                };
                let mut new = NewToast::new(kind, title).message(a.message);
                if let Some(ms) = a.duration {
                    new = new.duration_ms(ms);
                }
                let id = self.next_id();
                let banner = self.toast(id, new, Some(source));
                self.banners.push(banner);
            }
            Event::Heartbeat(_) | Event::Custom { .. } => {}
        }
    }

    /// Events missed while away (see [`SseMessage::replayed`]), as one burst. When they
    /// would make more than [`MISSED_TOASTS`] new toasts, one summary toast ("12 new
    /// notifications", with `show` as its button) stands for those, as the inbox holds
    /// them; upload progress and system-alert banners apply as usual. Returns the
    /// summary's id, if there is one.
    pub fn apply_missed(&mut self, messages: &[SseMessage], show: Option<ToastAction>) -> Option<ToastId> {
        let events: Vec<(&str, Event)> = messages
            .iter()
            .filter_map(|m| Some((m.id.as_str(), m.parse().ok()?)))
            .collect();
        // A reel whose progress is in the burst (or on screen) is updated in place, never
        // summed up, or its progress toast would stay sticky.
        let reels_in_progress: Vec<&str> = events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::ReelUploadProgress(p) => Some(p.reel_id.as_str()),
                _ => None,
            })
            .collect();
        let summed: Vec<bool> = events
            .iter()
            .map(|(_, e)| match e {
                Event::Notification(_) | Event::UserUpdate(_) => true,
                Event::ReelReady(r) => {
                    let source = format!("reel:{}", r.reel_id);
                    !reels_in_progress.contains(&r.reel_id.as_str())
                        && self.find_mut(|t| t.source.as_deref() == Some(&source)).is_none()
                }
                _ => false,
            })
            .collect();
        let count = summed.iter().filter(|s| **s).count();
        let summing = count > MISSED_TOASTS;
        for ((id, event), summed) in events.into_iter().zip(summed) {
            if !(summing && summed) {
                self.apply_event(id, event);
            }
        }
        if !summing {
            return None;
        }
        let mut new = NewToast::new(
            ToastKind::Info,
            self.labels.missed.replace("{n}", &count.to_string()),
        )
        .message(self.labels.missed_detail.clone());
        new.action = show;
        self.dismiss_source(MISSED_SOURCE);
        let id = self.next_id();
        self.push(self.toast(id, new, Some(MISSED_SOURCE.into())));
        Some(id)
    }

    fn upload_progress(&mut self, p: ReelUploadProgress) {
        let labels = &self.labels;
        let (kind, title, sticky) = match p.status {
            UploadStatus::Uploading => (ToastKind::Info, labels.uploading.clone(), true),
            UploadStatus::Processing => (ToastKind::Info, labels.processing.clone(), true),
            UploadStatus::Ready => (ToastKind::Success, labels.processed.clone(), false),
            UploadStatus::Error => (ToastKind::Error, labels.upload_failed.clone(), false),
        };
        let message = p
            .message
            .clone()
            .unwrap_or_else(|| format!("{} — {}%", p.reel_id, p.progress));
        let duration = if sticky {
            ToastDuration::Sticky
        } else {
            ToastDuration::Default
        };
        let source = format!("reel:{}", p.reel_id);
        match self.find_mut(|t| t.source.as_deref() == Some(&source)) {
            // A late progress event never undoes "ready".
            Some(t) if t.kind == ToastKind::Success && t.link.is_some() => {}
            Some(t) => {
                t.kind = kind;
                t.title = title;
                t.message = message;
                t.progress = Some(p.progress);
                t.duration = duration;
            }
            None => {
                let id = self.next_id();
                let mut toast = self.toast(id, NewToast::new(kind, title).message(message), Some(source));
                toast.progress = Some(p.progress);
                toast.duration = duration;
                self.push(toast);
            }
        }
    }

    /// Removes a toast or banner; the first waiting toast takes its place.
    pub fn dismiss(&mut self, id: ToastId) {
        self.banners.retain(|t| t.id != id);
        let before = self.visible.len();
        self.visible.retain(|t| t.id != id);
        self.waiting.retain(|t| t.id != id);
        if self.visible.len() < before {
            if let Some(next) = self.waiting.pop_front() {
                self.visible.push(next);
            }
        }
    }

    /// Removes the toast that stands for `source` (a dismissal in another tab).
    pub fn dismiss_source(&mut self, source: &str) {
        let found = self
            .visible
            .iter()
            .chain(self.waiting.iter())
            .chain(self.banners.iter())
            .find(|t| t.source.as_deref() == Some(source))
            .map(|t| t.id);
        if let Some(id) = found {
            self.dismiss(id);
        }
    }

    /// Removes every toast and banner.
    pub fn clear(&mut self) {
        self.visible.clear();
        self.waiting.clear();
        self.banners.clear();
    }

    /// A toast or banner on screen, by id.
    pub fn get(&self, id: ToastId) -> Option<&Toast> {
        self.visible
            .iter()
            .chain(self.banners.iter())
            .find(|t| t.id == id)
    }
}

/// A handle on the toasts: show, update and dismiss them from any component. `Copy`, so
/// it moves into any closure.
#[derive(Clone, Copy)]
pub struct Toaster {
    store: RwSignal<ToastStore>,
}

impl Toaster {
    /// A toaster over a fresh store with room for `max_visible` toasts at once.
    pub fn new(max_visible: usize) -> Self {
        Self {
            store: RwSignal::new(ToastStore::new(max_visible)),
        }
    }

    /// The store, for reading in views.
    pub fn store(&self) -> RwSignal<ToastStore> {
        self.store
    }

    /// Shows `toast`; returns its id.
    pub fn show(&self, toast: NewToast) -> ToastId {
        self.store.try_update(|s| s.show(toast)).unwrap_or(ToastId(0))
    }

    pub fn info(&self, title: impl Into<String>) -> ToastId {
        self.show(NewToast::new(ToastKind::Info, title))
    }

    pub fn success(&self, title: impl Into<String>) -> ToastId {
        self.show(NewToast::new(ToastKind::Success, title))
    }

    pub fn warning(&self, title: impl Into<String>) -> ToastId {
        self.show(NewToast::new(ToastKind::Warning, title))
    }

    pub fn error(&self, title: impl Into<String>) -> ToastId {
        self.show(NewToast::new(ToastKind::Error, title))
    }

    /// A sticky toast with a spinner; [`update`](Self::update) it with the result.
    pub fn loading(&self, title: impl Into<String>) -> ToastId {
        self.show(NewToast::new(ToastKind::Loading, title))
    }

    /// Replaces what toast `id` shows; `false` when it is gone.
    pub fn update(&self, id: ToastId, toast: NewToast) -> bool {
        self.store.try_update(|s| s.update(id, toast)).unwrap_or(false)
    }

    /// Removes toast `id`.
    pub fn dismiss(&self, id: ToastId) {
        self.store.update(|s| s.dismiss(id));
    }

    /// Removes every toast.
    pub fn clear(&self) {
        self.store.update(ToastStore::clear);
    }
}

/// Puts a [`Toaster`] in the context for the components below (the `SseNotifications`
/// component does this itself when there is none) and returns it.
pub fn provide_toaster(max_visible: usize) -> Toaster {
    let toaster = Toaster::new(max_visible);
    provide_context(toaster);
    toaster
}

/// The [`Toaster`] in the context; panics when there is none.
pub fn expect_toaster() -> Toaster {
    expect_context::<Toaster>()
}

/// The [`Toaster`] in the context, or a new one put there (room for 5 toasts).
pub fn use_toaster() -> Toaster {
    use_context::<Toaster>().unwrap_or_else(|| provide_toaster(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, event: &str, data: &str) -> SseMessage {
        SseMessage {
            id: id.into(),
            event: event.into(),
            data: data.into(),
            replayed: false,
        }
    }

    #[test]
    fn past_the_maximum_toasts_wait_and_none_are_lost() {
        let mut store = ToastStore::new(3);
        for i in 0..8 {
            store.apply(&msg(
                &i.to_string(),
                "notification",
                &format!(r#"{{"title":"n{i}","message":"m"}}"#),
            ));
        }
        assert_eq!(store.visible.len(), 3);
        assert_eq!(store.waiting.len(), 5);
        let mut seen = Vec::new();
        while let Some(first) = store.visible.first().cloned() {
            seen.push(first.title.clone());
            store.dismiss(first.id);
        }
        assert_eq!(seen, (0..8).map(|i| format!("n{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn reel_progress_updates_one_toast_that_becomes_ready() {
        let mut store = ToastStore::new(5);
        for p in [10, 50, 90] {
            store.apply(&msg(
                &p.to_string(),
                "reel_upload_progress",
                &format!(r#"{{"reelId":"r1","progress":{p},"status":"uploading"}}"#),
            ));
        }
        assert_eq!(store.visible.len(), 1);
        assert_eq!(store.visible[0].progress, Some(90));
        assert_eq!(store.visible[0].duration, ToastDuration::Sticky);
        store.apply(&msg(
            "91",
            "reel_ready",
            r#"{"reelId":"r1","playbackUrl":"https://cdn/r1.m3u8"}"#,
        ));
        assert_eq!(store.visible.len(), 1);
        let t = &store.visible[0];
        assert_eq!(t.kind, ToastKind::Success);
        assert_eq!(t.link.as_ref().map(|l| l.0.as_str()), Some("https://cdn/r1.m3u8"));
        assert_eq!(t.duration, ToastDuration::Default);
        // A late progress event does not undo "ready".
        store.apply(&msg(
            "92",
            "reel_upload_progress",
            r#"{"reelId":"r1","progress":95,"status":"processing"}"#,
        ));
        assert_eq!(store.visible[0].kind, ToastKind::Success);
    }

    #[test]
    fn alerts_are_banners_and_custom_events_make_no_toast() {
        let mut store = ToastStore::new(5);
        store.apply(&msg(
            "1",
            "system_alert",
            r#"{"message":"down at 10","type":"maintenance","duration":8000}"#,
        ));
        store.apply(&msg("2", "order.shipped", r#"{"id":1}"#));
        assert!(store.visible.is_empty());
        assert_eq!(store.banners.len(), 1);
        assert_eq!(store.banners[0].duration, ToastDuration::Millis(8000));
        let id = store.banners[0].id;
        store.dismiss(id);
        assert!(store.banners.is_empty());
    }

    #[test]
    fn a_loading_toast_turns_into_its_result_in_place() {
        let mut store = ToastStore::new(2);
        let first = store.show(NewToast::new(ToastKind::Info, "first"));
        let loading = store.show(NewToast::new(ToastKind::Loading, "Saving"));
        assert_eq!(store.get(loading).unwrap().duration, ToastDuration::Sticky);
        assert!(store.update(
            loading,
            NewToast::new(ToastKind::Success, "Saved").duration_ms(1_000)
        ));
        let ids: Vec<_> = store.visible.iter().map(|t| t.id).collect();
        assert_eq!(ids, [first, loading], "updated where it was");
        assert_eq!(store.get(loading).unwrap().title, "Saved");
        assert_eq!(store.get(loading).unwrap().duration, ToastDuration::Millis(1_000));
        store.dismiss(loading);
        assert!(!store.update(loading, NewToast::new(ToastKind::Info, "gone")));
    }

    #[test]
    fn a_dismissal_elsewhere_finds_the_toast_by_its_source() {
        let mut store = ToastStore::new(5);
        store.apply(&msg("7", "notification", r#"{"title":"t","message":"m"}"#));
        store.apply(&msg(
            "8",
            "reel_upload_progress",
            r#"{"reelId":"r","progress":1,"status":"uploading"}"#,
        ));
        store.dismiss_source("event:7");
        store.dismiss_source("reel:r");
        assert!(store.visible.is_empty());
    }

    #[test]
    fn a_long_burst_of_missed_events_becomes_one_summary_toast() {
        let notes: Vec<SseMessage> = (1..=6)
            .map(|i| {
                msg(
                    &i.to_string(),
                    "notification",
                    &format!(r#"{{"title":"n{i}","message":"m"}}"#),
                )
            })
            .collect();
        // A few are shown as they are.
        let mut store = ToastStore::new(5);
        assert_eq!(store.apply_missed(&notes[..MISSED_TOASTS], None), None);
        assert_eq!(store.visible.len(), MISSED_TOASTS);

        // More: one summary, while banners and progress still apply.
        let mut store = ToastStore::new(5);
        let mut burst = notes.clone();
        burst.push(msg(
            "7",
            "system_alert",
            r#"{"type":"maintenance","message":"m"}"#,
        ));
        burst.push(msg(
            "8",
            "reel_upload_progress",
            r#"{"reelId":"r1","progress":40,"status":"uploading"}"#,
        ));
        burst.push(msg("9", "reel_ready", r#"{"reelId":"r1","playbackUrl":"/r1"}"#));
        let id = store.apply_missed(&burst, None).expect("summed up");
        let titles: Vec<&str> = store.visible.iter().map(|t| t.title.as_str()).collect();
        assert_eq!(titles, ["Reel ready", "6 new notifications"]);
        assert_eq!(
            store.visible[0].progress,
            Some(100),
            "the reel's toast updated in place"
        );
        assert_eq!(store.banners.len(), 1);
        assert!(store.waiting.is_empty());

        // A second burst replaces the summary rather than stacking another.
        let again = store.apply_missed(&notes, None).expect("summed up");
        assert_ne!(again, id);
        assert_eq!(store.get(id), None);
        assert_eq!(store.visible.len(), 2);
    }

    #[test]
    fn labels_replace_the_strings() {
        let labels = ToastLabels {
            reel_ready: "Clip prêt".into(),
            ready_to_watch: "{reel} est prêt".into(),
            watch: "Regarder".into(),
            ..ToastLabels::default()
        };
        let mut store = ToastStore::new(5).with_labels(labels);
        store.apply(&msg("1", "reel_ready", r#"{"reelId":"r9","playbackUrl":"/r9"}"#));
        let t = &store.visible[0];
        assert_eq!(
            (t.title.as_str(), t.message.as_str()),
            ("Clip prêt", "r9 est prêt")
        );
        assert_eq!(t.link.as_ref().unwrap().1, "Regarder");
    }
}
