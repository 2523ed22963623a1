//! `<SseNotifications/>`: toasts for the notification stream, styled out of the box.
//!
//! ```no_run
//! use leptos::prelude::*;
//! use sse_notify::client::{Position, SseNotifications, Theme};
//!
//! #[component]
//! fn Layout() -> impl IntoView {
//!     view! { <SseNotifications position=Position::BottomRight max_notifications=3 theme=Theme::System /> }
//! }
//! ```
//!
//! - a toast per `notification`, styled by its kind, with an icon and an action link for
//!   `actionUrl`; one toast per reel for `reel_upload_progress`, updated in place, that
//!   turns into a "ready" toast with a link on `reel_ready`; `system_alert` as a banner at
//!   the top (the top stacks sit below it); `user_update` as a quiet toast;
//! - the app's own toasts through the same store: see [`use_toaster`](super::use_toaster);
//! - past `max_notifications`, toasts wait ("+N more") and appear as others leave;
//! - auto-dismiss pauses while hovered, focused, or while the tab is hidden; the close
//!   button, a swipe, and Escape (with focus inside the toasts) dismiss; a dismissal in one
//!   tab reaches the other tabs of the same stream;
//! - light and dark themes (following `prefers-color-scheme` by default), reduced motion
//!   respected, full width on narrow screens within the safe area; every string can be
//!   replaced (`labels`);
//! - polite and assertive live regions; SSR renders the empty regions.
//!
//! ## Styles
//!
//! The component brings its stylesheet (a `<style>` element with rules under `.sse-notify`
//! and `.sse-toast*` only, nothing global) unless `styles=false`. Restyle it with the
//! CSS variables on `.sse-notify`, e.g. in your own stylesheet:
//!
//! ```css
//! .sse-notify { --sse-notify-radius: 4px; --sse-notify-font: "Inter", sans-serif; }
//! .sse-notify[data-theme="dark"] { --sse-notify-surface: #111; }
//! ```
//!
//! Every variable is listed at the top of [`STYLES`].

use leptos::prelude::*;

use super::{
    inbox::Inbox,
    toaster::{use_toaster, Toast, ToastDuration, ToastId, ToastKind, ToastLabels, ToastStore},
    use_sse::{
        use_sse_with_options, ConnectionReadyState, SseMessage, Transport, TransportMode, UseSseError,
        UseSseOptions, UseSseReturn,
    },
};
use crate::api;

/// The component's stylesheet, with every CSS variable it reads at the top.
pub const STYLES: &str = include_str!("../../style/sse-notify.css");

/// Where the toast stack sits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Position {
    #[default]
    TopRight,
    TopLeft,
    TopCenter,
    BottomRight,
    BottomLeft,
    BottomCenter,
}

impl Position {
    const ALL: [Position; 6] = [
        Position::TopRight,
        Position::TopLeft,
        Position::TopCenter,
        Position::BottomRight,
        Position::BottomLeft,
        Position::BottomCenter,
    ];

    /// The CSS modifier, also the value accepted by [`Position::parse`].
    pub fn as_str(self) -> &'static str {
        match self {
            Position::TopRight => "top-right",
            Position::TopLeft => "top-left",
            Position::TopCenter => "top-center",
            Position::BottomRight => "bottom-right",
            Position::BottomLeft => "bottom-left",
            Position::BottomCenter => "bottom-center",
        }
    }

    /// `top-right`, `top-left`, `top-center`, `bottom-right`, `bottom-left` or `bottom-center`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    fn is_top(self) -> bool {
        matches!(self, Position::TopRight | Position::TopLeft | Position::TopCenter)
    }
}

/// Light, dark, or whatever the system prefers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Theme {
    #[default]
    System,
    Light,
    Dark,
}

impl Theme {
    /// `system`, `light` or `dark`: the `data-theme` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Theme::System => "system",
            Theme::Light => "light",
            Theme::Dark => "dark",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        [Theme::System, Theme::Light, Theme::Dark]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// Connection state, for a status indicator beside the toasts: read it from
/// [`use_connection_status`] (or hand an `RwSignal` to `<SseNotifications status/>`).
///
/// ```
/// use leptos::prelude::*;
/// use sse_notify::client::{use_connection_status, SseNotifications};
///
/// #[component]
/// fn Page() -> impl IntoView {
///     let status = use_connection_status();
///     view! {
///         <SseNotifications />
///         <p>{move || status.with(|s| s.state.as_str())}</p>
///     }
/// }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Connecting, open, closing or closed (`as_str()` gives `"open"`, ...). Closed after a
    /// sign-out, a refusal, a replacement or giving up; `error` says which.
    pub state: ConnectionReadyState,
    /// The latest problem, if any ([`UseSseError`]: `Unauthorized`, `Replaced`, `GaveUp`,
    /// `Stalled`, ...). Cleared when a stream opens and after an ordinary sign-out
    /// (`user_id` becoming `None`).
    pub error: Option<UseSseError>,
    /// This tab holds the stream (other tabs share it).
    pub leader: bool,
    /// How the stream travels now.
    pub transport: Transport,
}

/// Where `<SseNotifications/>` writes its state for [`use_connection_status`].
#[derive(Clone, Copy)]
struct StatusSink(RwSignal<ConnectionStatus>);

/// The connection state of the `<SseNotifications/>` in this component's view or below it,
/// as a signal (leptos-use style: the hook returns it, nothing to create). Call it before
/// the view is built, in that component or an ancestor of it: it puts the state in the
/// context, where the component finds it.
pub fn use_connection_status() -> Signal<ConnectionStatus> {
    let sink = use_context::<StatusSink>().unwrap_or_else(|| {
        let sink = StatusSink(RwSignal::new(ConnectionStatus::default()));
        provide_context(sink);
        sink
    });
    sink.0.into()
}

/// Toasts for the notification stream. Opens the stream with [`use_sse_with_options`] and
/// shows its events, and the app's own toasts, through the [`Toaster`](super::Toaster) in the context (or
/// a new one it provides).
#[component]
pub fn SseNotifications(
    /// The signed-in user: the stream is open while this is `Some` and reopens when it
    /// changes. Leave it out to connect at once with the session cookie.
    #[prop(optional, into)]
    user_id: Option<Signal<Option<String>>>,
    /// A session token sent as `?token=`, where the cookie cannot be used. Takes a
    /// string or an `Option`; read once, when the component is created.
    #[prop(optional, into)]
    token: MaybeProp<String>,
    /// The seed's name for `token` (it holds a token, not a session id); `token` wins
    /// when both are given.
    #[prop(optional, into)]
    session_id: MaybeProp<String>,
    /// Where to fetch a fresh token when the session ends; see [`UseSseOptions::token_url`].
    /// Takes a string or an `Option`; read once, when the component is created.
    #[prop(optional, into)]
    token_url: MaybeProp<String>,
    /// Fetch the first token from `token_url` too; see [`UseSseOptions::token_first`].
    #[prop(optional)]
    token_first: bool,
    /// The stream URL. Defaults to `/api/sse` under the prefix the server mounted the
    /// routes at (`Routes::prefix`), which the server's render hands to the page; name it
    /// only for a page no server rendered, or a stream on another origin.
    #[prop(optional, into)]
    url: Option<String>,
    /// Toasts on screen at once; the rest wait. Defaults to 5.
    #[prop(default = 5)]
    max_notifications: usize,
    /// Dismiss toasts by themselves. Defaults to `true`.
    #[prop(default = true)]
    auto_dismiss: bool,
    /// Milliseconds a toast stays. Defaults to 5,000.
    #[prop(default = 5_000)]
    dismiss_delay: u64,
    /// Where the stack sits. Defaults to top right.
    #[prop(default = Position::TopRight)]
    position: Position,
    /// Light, dark, or following the system. Defaults to the system.
    #[prop(default = Theme::System)]
    theme: Theme,
    /// The strings it shows, to translate. Defaults to English.
    #[prop(optional)]
    labels: Option<ToastLabels>,
    /// Bring the built-in stylesheet. Defaults to `true`.
    #[prop(default = true)]
    styles: bool,
    /// Receives the connection state, for a status indicator; [`use_connection_status`]
    /// is the simpler way.
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
    stall_timeout: Option<u64>,
    /// The seed's name for `stall_timeout`; `stall_timeout` wins when both are given.
    #[prop(default = None)]
    retry_timeout: Option<u64>,
    /// First reconnect delay in ms (it doubles per failed attempt). Defaults to 1,000.
    #[prop(default = 1_000)]
    reconnect_interval: u64,
    /// Failed reconnects in a row before giving up. Defaults to `Some(10)`.
    #[prop(default = Some(10))]
    max_reconnect_attempts: Option<u32>,
    /// Share one stream between tabs. Defaults to `true`.
    #[prop(default = true)]
    share_across_tabs: bool,
    /// SSE with a WebSocket fallback, or one of them only. Defaults to
    /// [`TransportMode::Auto`].
    #[prop(optional)]
    transport: TransportMode,
    /// After falling back to WebSocket, try SSE again after this many ms. Defaults to
    /// `None`: the hook's default (60,000).
    #[prop(default = None)]
    sse_retry_interval: Option<u64>,
) -> impl IntoView {
    let toaster = use_toaster();
    let store = toaster.store();
    // The notification center, when the app provided one: it hears the stream's `inbox` events.
    let inbox = super::inbox::use_inbox();
    store.update(|s| {
        *s = std::mem::take(s).with_labels(labels.unwrap_or_default());
        s.set_max_visible(max_notifications);
    });
    let missed = MissedBurst::new();
    let url = url.unwrap_or_else(|| format!("{}{}", super::served::served_prefix(), api::STREAM_PATH));
    let stream_url = url.clone();
    let mut options = UseSseOptions::default()
        .url(url)
        .token(token.get_untracked().or_else(|| session_id.get_untracked()))
        .token_url(token_url.get_untracked())
        .token_first(token_first)
        .reconnect_interval(reconnect_interval)
        .max_reconnect_attempts(max_reconnect_attempts)
        .share_across_tabs(share_across_tabs)
        .transport(transport)
        .on_message(move |msg: &SseMessage| {
            if let Some(inbox) = inbox {
                inbox.apply(msg);
            }
            missed.take(msg, store, inbox);
            if let Some(cb) = on_message {
                cb.run(msg.clone());
            }
        });
    if let Some(user_id) = user_id {
        options = options.user_id(user_id);
    }
    if let Some(ms) = stall_timeout.or(retry_timeout) {
        options = options.stall_timeout(ms);
    }
    if let Some(ms) = sse_retry_interval {
        options = options.sse_retry_interval(ms);
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
        ready_state,
        error,
        is_leader,
        identity_tag,
        transport,
        ..
    } = use_sse_with_options(options);
    let sync = DismissSync::new(&stream_url, identity_tag, store);
    if let Some(status) = status.or_else(|| use_context::<StatusSink>().map(|sink| sink.0)) {
        Effect::new(move |_| {
            status.set(ConnectionStatus {
                state: ready_state.get(),
                error: error.get(),
                leader: is_leader.get(),
                transport: transport.get(),
            });
        });
    }

    let page_hidden = page_hidden();
    let ctx = ToastContext {
        store,
        sync,
        auto_dismiss,
        dismiss_delay,
        page_hidden,
        inbox,
    };
    // Escape dismisses the toast that holds focus; only when focus is inside the toasts.
    let on_keydown = move |e: leptos::ev::KeyboardEvent| {
        if e.key() != "Escape" {
            return;
        }
        let focused = document()
            .active_element()
            .and_then(|el| el.closest("[data-toast-key]").ok().flatten())
            .and_then(|el| el.get_attribute("data-toast-key"))
            .and_then(|k| k.parse::<u64>().ok());
        if let Some(key) = focused {
            ctx.dismiss(ToastId(key));
        }
    };
    let stack = move || view! { <Stack ctx position /> };
    let (top, bottom) = if position.is_top() {
        (Some(stack()), None)
    } else {
        (None, Some(stack()))
    };
    let banners = move || store.with(|s| s.banners.iter().map(|t| t.id).collect::<Vec<_>>());
    let labels = move || store.with(|s| s.labels.clone());
    view! {
        {styles.then(|| view! { <style data-sse-notify="">{STYLES}</style> })}
        <div class="sse-notify" data-theme=theme.as_str() data-position=position.as_str() on:keydown=on_keydown>
            <div class="sse-notify__top">
                <section class="sse-banners" aria-label=move || labels().alerts role="alert" aria-live="assertive">
                    <For each=banners key=|id| *id children=move |id| view! { <ToastView ctx id /> } />
                </section>
                {top}
            </div>
            <div class="sse-notify__bottom">{bottom}</div>
        </div>
    }
    // Erased, so a host page that nests the toaster deep in its own views stays
    // under the compiler's type-depth limit (release builds hit it otherwise).
    .into_any()
}

/// The design card's name for the component; the same as [`SseNotifications`].
pub use SseNotifications as SSENotifications;

/// What every toast view needs.
#[derive(Clone, Copy)]
struct ToastContext {
    store: RwSignal<ToastStore>,
    sync: DismissSync,
    auto_dismiss: bool,
    dismiss_delay: u64,
    page_hidden: Signal<bool>,
    inbox: Option<super::inbox::Inbox>,
}

impl ToastContext {
    /// The user followed the toast's link: the inbox item of its event counts as read.
    fn opened(self, id: ToastId) {
        let source = self
            .store
            .with_untracked(|s| s.get(id).and_then(|t| t.source.clone()));
        let event_id = source.as_deref().and_then(|s| s.strip_prefix("event:"));
        if let (Some(inbox), Some(event_id)) = (self.inbox, event_id) {
            inbox.mark_read(vec![event_id.to_string()]);
        }
    }

    /// Dismisses `id` here and, for a toast from the stream, in the other tabs.
    fn dismiss(self, id: ToastId) {
        let source = self
            .store
            .with_untracked(|s| s.get(id).and_then(|t| t.source.clone()));
        self.store.update(|s| s.dismiss(id));
        if let Some(source) = source {
            self.sync.announce(&source);
        }
    }
}

/// The stack of toasts: polite and assertive regions, and "+N more" when some wait.
#[component]
fn Stack(ctx: ToastContext, position: Position) -> impl IntoView {
    let store = ctx.store;
    let ids = move |errors: bool| {
        store.with(|s| {
            s.visible
                .iter()
                .filter(|t| (t.kind == ToastKind::Error) == errors)
                .map(|t| t.id)
                .collect::<Vec<_>>()
        })
    };
    let waiting = move || store.with(|s| s.waiting.len());
    let more = move || store.with(|s| s.labels.more.replace("{n}", &s.waiting.len().to_string()));
    view! {
        <section
            class=format!("sse-toasts sse-toasts--{}", position.as_str())
            aria-label=move || store.with(|s| s.labels.region.clone())
            data-position=position.as_str()
        >
            <div class="sse-toasts__list" role="status" aria-live="polite">
                <For each=move || ids(false) key=|id| *id children=move |id| view! { <ToastView ctx id /> } />
            </div>
            <div class="sse-toasts__list" role="alert" aria-live="assertive">
                <For each=move || ids(true) key=|id| *id children=move |id| view! { <ToastView ctx id /> } />
            </div>
            <Show when=move || { waiting() > 0 }>
                <p class="sse-toasts__more" data-testid="toasts-more">{more}</p>
            </Show>
        </section>
    }
    .into_any()
}

/// One toast (or banner), reading its fields from the store by id so progress updates
/// re-render only what changed. Owns the auto-dismiss timer (paused while hovered, focused
/// or the page is hidden), the exit animation and the swipe.
#[component]
fn ToastView(ctx: ToastContext, id: ToastId) -> impl IntoView {
    let store = ctx.store;
    let toast = Memo::new(move |_| store.with(|s| s.get(id).cloned()));
    let text = move |f: fn(&Toast) -> String| move || toast.with(|t| t.as_ref().map(f).unwrap_or_default());
    let leaving = RwSignal::new(false);
    let dismiss = move || {
        if leaving.get_untracked() {
            return;
        }
        leaving.set(true);
        // Let the exit animation play (none with reduced motion), then remove it.
        set_timeout(move || ctx.dismiss(id), std::time::Duration::from_millis(160));
    };
    let timer = AutoDismiss::new(dismiss);
    let hovered = RwSignal::new(false);
    let focused = RwSignal::new(false);
    let duration = Memo::new(move |_| toast.with(|t| t.as_ref().map(|t| t.duration)));
    if ctx.auto_dismiss {
        // (Re)start when the toast's duration changes: an upload that became ready.
        Effect::new(move |_| match duration.get() {
            Some(ToastDuration::Default) => timer.start(ctx.dismiss_delay),
            Some(ToastDuration::Millis(ms)) => timer.start(ms),
            Some(ToastDuration::Sticky) | None => timer.stop(),
        });
        Effect::new(move |_| {
            if hovered.get() || focused.get() || ctx.page_hidden.get() {
                timer.pause();
            } else {
                timer.resume();
            }
        });
    }
    let swipe = Swipe::new();
    let kind = move || toast.with(|t| t.as_ref().map_or("info", |t| t.kind.as_str()));
    let progress = move || toast.with(|t| t.as_ref().and_then(|t| t.progress));
    let link = move || toast.with(|t| t.as_ref().and_then(|t| t.link.clone()));
    let action = move || toast.with(|t| t.as_ref().and_then(|t| t.action.clone()));
    let dismiss_label = move || store.with(|s| s.labels.dismiss.clone());
    let class = move || {
        let mut class = format!("sse-toast sse-toast--{}", kind());
        if leaving.get() {
            class.push_str(" sse-toast--leaving");
        }
        class
    };
    view! {
        <div
            class=class
            data-toast-key=id.0.to_string()
            data-kind=kind
            tabindex="0"
            style=move || swipe.style()
            on:mouseenter=move |_| hovered.set(true)
            on:mouseleave=move |_| hovered.set(false)
            on:focusin=move |_| focused.set(true)
            on:focusout=move |_| focused.set(false)
            on:pointerdown=move |e| swipe.start(&e)
            on:pointermove=move |e| swipe.moved(&e)
            on:pointerup=move |e| {
                if swipe.end(&e) {
                    dismiss();
                }
            }
            on:pointercancel=move |_| swipe.cancel()
        >
            <span class="sse-toast__icon" aria-hidden="true" inner_html=move || icon(kind())></span>
            <div class="sse-toast__body">
                <p class="sse-toast__title">{text(|t| t.title.clone())}</p>
                <Show when=move || toast.with(|t| t.as_ref().is_some_and(|t| !t.message.is_empty()))>
                    <p class="sse-toast__message">{text(|t| t.message.clone())}</p>
                </Show>
                {move || progress().map(|p| view! {
                    <div class="sse-toast__progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow=p.to_string()>
                        <div class="sse-toast__bar" style=format!("width: {p}%")></div>
                    </div>
                })}
                <div class="sse-toast__actions">
                    {move || link().map(|(href, label)| view! { <a class="sse-toast__link" href=href on:click=move |_| ctx.opened(id)>{label}</a> })}
                    {move || action().map(|action| {
                        let run = action.run.clone();
                        view! {
                            <button class="sse-toast__action" type="button" on:click=move |_| {
                                run();
                                dismiss();
                            }>{action.label.clone()}</button>
                        }
                    })}
                </div>
            </div>
            <button class="sse-toast__close" type="button" aria-label=dismiss_label on:click=move |_| dismiss()>
                "×"
            </button>
        </div>
    }
    .into_any()
}

/// The icon of a kind, as inline SVG (no font or image to load).
fn icon(kind: &str) -> &'static str {
    match kind {
        "success" => {
            r#"<svg viewBox="0 0 24 24" width="20" height="20"><circle cx="12" cy="12" r="10" fill="currentColor"/><path d="M7 12.5l3.2 3.2L17 9" fill="none" stroke="var(--sse-notify-surface)" stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round"/></svg>"#
        }
        "warning" => {
            r#"<svg viewBox="0 0 24 24" width="20" height="20"><path d="M12 2.8L22.5 21H1.5z" fill="currentColor"/><path d="M12 9v5.5M12 17.5v.5" stroke="var(--sse-notify-surface)" stroke-width="2.2" stroke-linecap="round"/></svg>"#
        }
        "error" => {
            r#"<svg viewBox="0 0 24 24" width="20" height="20"><circle cx="12" cy="12" r="10" fill="currentColor"/><path d="M8.5 8.5l7 7M15.5 8.5l-7 7" stroke="var(--sse-notify-surface)" stroke-width="2.2" stroke-linecap="round"/></svg>"#
        }
        "loading" => {
            r#"<svg class="sse-toast__spinner" viewBox="0 0 24 24" width="20" height="20"><circle cx="12" cy="12" r="9" fill="none" stroke="currentColor" stroke-opacity=".25" stroke-width="3"/><path d="M21 12a9 9 0 0 0-9-9" fill="none" stroke="currentColor" stroke-width="3" stroke-linecap="round"/></svg>"#
        }
        "quiet" => {
            r#"<svg viewBox="0 0 24 24" width="20" height="20"><circle cx="12" cy="12" r="4" fill="currentColor"/></svg>"#
        }
        _ => {
            r#"<svg viewBox="0 0 24 24" width="20" height="20"><circle cx="12" cy="12" r="10" fill="currentColor"/><path d="M12 11v6M12 7.5v.5" stroke="var(--sse-notify-surface)" stroke-width="2.2" stroke-linecap="round"/></svg>"#
        }
    }
}

/// Whether the page is hidden (another tab in front, a minimised window): toasts do not
/// count down while nobody can see them.
fn page_hidden() -> Signal<bool> {
    let hidden = RwSignal::new(false);
    #[cfg(not(feature = "ssr"))]
    {
        let is_hidden = || document().visibility_state() == web_sys::VisibilityState::Hidden;
        hidden.set(is_hidden());
        let handle = window_event_listener_untyped("visibilitychange", move |_| hidden.set(is_hidden()));
        on_cleanup(move || handle.remove());
    }
    hidden.into()
}

/// How long a burst of missed events may pause before it counts as over.
#[cfg_attr(feature = "ssr", allow(dead_code))]
const MISSED_SETTLE_MS: u64 = 150;

/// Events missed while away ([`SseMessage::replayed`]) held together until their burst
/// is over (a live event, or [`MISSED_SETTLE_MS`] without another), then toasted through
/// [`ToastStore::apply_missed`]: a long burst becomes one summary toast whose button opens
/// the inbox. Only while an inbox is on; without one every event is toasted as it comes.
/// Nothing is held under SSR (no stream there), and no local storage is made that another
/// thread would tear down.
#[derive(Clone, Copy)]
struct MissedBurst {
    #[cfg(not(feature = "ssr"))]
    pending: StoredValue<(Vec<SseMessage>, Option<TimeoutHandle>), LocalStorage>,
}

impl MissedBurst {
    fn new() -> Self {
        #[cfg(not(feature = "ssr"))]
        {
            let burst = Self {
                pending: StoredValue::new_local(Default::default()),
            };
            on_cleanup(move || {
                let _ = burst
                    .pending
                    .try_update_value(|(_, timer)| timer.take().map(|t| t.clear()));
            });
            burst
        }
        #[cfg(feature = "ssr")]
        Self {}
    }

    /// `message` from the stream: held if it belongs to a burst, else toasted at once,
    /// after whatever burst came before it.
    fn take(self, message: &SseMessage, store: RwSignal<ToastStore>, inbox: Option<Inbox>) {
        #[cfg(not(feature = "ssr"))]
        {
            let held = message.replayed && inbox.is_some_and(|i| i.is_on());
            if held {
                let settled = set_timeout_with_handle(
                    move || self.flush(store, inbox),
                    std::time::Duration::from_millis(MISSED_SETTLE_MS),
                )
                .ok();
                self.pending.update_value(|(messages, timer)| {
                    messages.push(message.clone());
                    if let Some(earlier) = std::mem::replace(timer, settled) {
                        earlier.clear();
                    }
                });
                return;
            }
            self.flush(store, inbox);
        }
        let _ = inbox;
        store.update(|s| s.apply(message));
    }

    #[cfg(not(feature = "ssr"))]
    fn flush(self, store: RwSignal<ToastStore>, inbox: Option<Inbox>) {
        let Some(messages) = self.pending.try_update_value(|(messages, timer)| {
            if let Some(timer) = timer.take() {
                timer.clear();
            }
            std::mem::take(messages)
        }) else {
            return;
        };
        if messages.is_empty() {
            return;
        }
        let show = inbox.map(|inbox| super::toaster::ToastAction {
            label: store.with_untracked(|s| s.labels.show.clone()),
            run: std::sync::Arc::new(move || inbox.open_panel()),
        });
        store.update(|s| {
            s.apply_missed(&messages, show);
        });
    }
}

/// Tells the other tabs of the same stream and identity which toasts were dismissed here,
/// and hears theirs (BroadcastChannel; nothing where it is missing or under SSR). The
/// channel is named by the identity tag the server confirmed, so tabs of another user in
/// the same browser never hear it; none is open while the tag is unknown.
#[derive(Clone, Copy)]
struct DismissSync {
    #[cfg(not(feature = "ssr"))]
    channel: StoredValue<Option<DismissChannel>, LocalStorage>,
}

/// The open channel of a [`DismissSync`] and its listener.
#[cfg(not(feature = "ssr"))]
struct DismissChannel {
    channel: web_sys::BroadcastChannel,
    _on_message: wasm_bindgen::closure::Closure<dyn FnMut(web_sys::MessageEvent)>,
}

#[cfg(not(feature = "ssr"))]
impl DismissChannel {
    fn open(name: &str, store: RwSignal<ToastStore>) -> Option<Self> {
        use wasm_bindgen::{closure::Closure, JsCast};
        let channel = web_sys::BroadcastChannel::new(name).ok()?;
        let on_message = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |e: web_sys::MessageEvent| {
            if let Some(source) = e.data().as_string() {
                store.update(|s| s.dismiss_source(&source));
            }
        });
        channel.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        Some(Self {
            channel,
            _on_message: on_message,
        })
    }

    fn close(self) {
        self.channel.set_onmessage(None);
        self.channel.close();
    }
}

impl DismissSync {
    fn new(url: &str, identity_tag: Signal<Option<String>>, store: RwSignal<ToastStore>) -> Self {
        #[cfg(not(feature = "ssr"))]
        {
            let channel = StoredValue::new_local(None::<DismissChannel>);
            let url = url.to_string();
            // Reopened under the new name whenever the confirmed identity changes.
            Effect::new(move |_| {
                let name = identity_tag
                    .get()
                    .map(|tag| format!("sse-notify-toasts:{url}:{tag}"));
                channel.try_update_value(|open| {
                    if let Some(old) = open.take() {
                        old.close();
                    }
                    *open = name.and_then(|name| DismissChannel::open(&name, store));
                });
            });
            on_cleanup(move || {
                channel.try_update_value(|open| open.take().map(DismissChannel::close));
            });
            Self { channel }
        }
        #[cfg(feature = "ssr")]
        {
            // Nothing to share on the server (and no local value to drop on another thread).
            let _ = (url, identity_tag, store);
            Self {}
        }
    }

    fn announce(self, source: &str) {
        #[cfg(not(feature = "ssr"))]
        self.channel.with_value(|open| {
            if let Some(open) = open {
                let _ = open.channel.post_message(&source.into());
            }
        });
        #[cfg(feature = "ssr")]
        let _ = source;
    }
}

/// Horizontal drag to dismiss, for touch (and mouse) users.
#[derive(Clone, Copy)]
struct Swipe {
    start_x: RwSignal<Option<f64>>,
    offset: RwSignal<f64>,
}

/// How far a toast must be dragged to go.
const SWIPE_DISMISS_PX: f64 = 80.0;

impl Swipe {
    fn new() -> Self {
        Self {
            start_x: RwSignal::new(None),
            offset: RwSignal::new(0.0),
        }
    }

    fn start(self, e: &leptos::ev::PointerEvent) {
        // Only a primary touch or pen drags; a mouse click goes to the buttons.
        if e.pointer_type() != "mouse" && e.is_primary() {
            self.start_x.set(Some(f64::from(e.client_x())));
        }
    }

    fn moved(self, e: &leptos::ev::PointerEvent) {
        if let Some(start) = self.start_x.get_untracked() {
            self.offset.set(f64::from(e.client_x()) - start);
        }
    }

    /// `true` when the drag went far enough to dismiss.
    fn end(self, e: &leptos::ev::PointerEvent) -> bool {
        let Some(start) = self.start_x.get_untracked() else {
            return false;
        };
        let far = (f64::from(e.client_x()) - start).abs() >= SWIPE_DISMISS_PX;
        self.cancel();
        far
    }

    fn cancel(self) {
        self.start_x.set(None);
        self.offset.set(0.0);
    }

    fn style(self) -> String {
        let dx = self.offset.get();
        if dx == 0.0 {
            String::new()
        } else {
            let fade = (1.0 - dx.abs() / (SWIPE_DISMISS_PX * 2.0)).max(0.2);
            format!("transform: translateX({dx}px); opacity: {fade:.2}")
        }
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

    /// Counts `delay_ms` from now (or from when it is no longer paused).
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

    /// Stops counting (a sticky toast).
    fn stop(self) {
        self.clear();
        let _ = self.state.try_update_value(|s| s.remaining_ms = None);
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
            let _ = self.state.try_update_value(|s| {
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

    #[test]
    fn positions_and_themes_round_trip() {
        for p in Position::ALL {
            assert_eq!(Position::parse(p.as_str()), Some(p));
        }
        assert!(Position::parse("middle").is_none());
        for t in ["system", "light", "dark"] {
            assert_eq!(Theme::parse(t).unwrap().as_str(), t);
        }
    }

    #[test]
    fn the_stylesheet_has_no_global_rules() {
        // Every selector of the toasts' and the bell's stylesheets is under `.sse-notify`,
        // `.sse-inbox` or a `.sse-` class (`:where(.sse-notify)` for the resets, which
        // keep an element rule's weight), so nothing leaks into the host page.
        for sheet in [STYLES, crate::client::INBOX_STYLES] {
            assert_namespaced(sheet);
        }
    }

    fn assert_namespaced(sheet: &str) {
        let mut css = String::new();
        let mut rest = sheet;
        while let Some((before, after)) = rest.split_once("/*") {
            css.push_str(before);
            rest = after.split_once("*/").map_or("", |(_, after)| after);
        }
        css.push_str(rest);
        let mut depth = 0;
        let mut selector = String::new();
        for c in css.chars() {
            match c {
                '{' => {
                    let s = selector.trim().to_string();
                    let is_at_rule = s.starts_with('@');
                    let is_keyframe_step = depth > 0 && (s.ends_with('%') || s == "from" || s == "to");
                    if !is_at_rule && !is_keyframe_step {
                        // The selector list's own commas, not those inside `:where(...)`.
                        let mut parens = 0;
                        let parts = s.split(|c| {
                            match c {
                                '(' => parens += 1,
                                ')' => parens -= 1,
                                _ => {}
                            }
                            c == ',' && parens == 0
                        });
                        for part in parts {
                            let part = part.trim();
                            assert!(
                                part.starts_with(".sse-") || part.starts_with(":where(.sse-"),
                                "a rule outside the namespace: {part:?}"
                            );
                        }
                    }
                    depth += 1;
                    selector.clear();
                }
                '}' => {
                    depth -= 1;
                    selector.clear();
                }
                ';' => selector.clear(),
                _ => selector.push(c),
            }
        }
        assert!(STYLES.contains("--sse-notify-"), "variables are namespaced");
    }
}
