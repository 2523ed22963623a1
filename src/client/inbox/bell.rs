//! [`NotificationBell`]: a bell with the unread count that opens the inbox's list.

use leptos::{either::Either, prelude::*};

use super::{use_inbox, Inbox};
use crate::{api::InboxItem, client::Theme, events::names};

/// The bell's stylesheet: every rule under `.sse-inbox`, themed by the same variables as
/// the toasts (`--sse-notify-*`), light, dark or the system's.
pub const INBOX_STYLES: &str = include_str!("../../../style/sse-inbox.css");

/// A bell button with the unread count (rendered on the server) that opens the user's
/// notification center: the list, newest first, unread marked; a click marks an item
/// read and follows its link; "Mark all as read"; archive; more on scroll. Needs
/// [`provide_inbox`](super::provide_inbox) above it.
#[component]
pub fn NotificationBell(
    /// `system` (default), `light` or `dark`.
    #[prop(optional)]
    theme: Theme,
    /// Render the component's own `<style>`. Defaults to `true`.
    #[prop(default = true)]
    styles: bool,
) -> impl IntoView {
    let view = match use_inbox() {
        Some(inbox) => Either::Left(bell(inbox, theme, styles)),
        None => {
            leptos::logging::warn!("sse-notify: NotificationBell needs provide_inbox() above it");
            Either::Right(())
        }
    };
    erased(view)
}

/// The bell and its panel, shown while the server has an inbox.
fn bell(inbox: Inbox, theme: Theme, styles: bool) -> impl IntoView {
    let open = inbox.panel_open();
    let unread = inbox.unread();
    let bell_ref = NodeRef::<leptos::html::Button>::new();
    let toggle = move |_| match open.get_untracked() {
        true => inbox.close_panel(),
        false => inbox.open_panel(),
    };
    let close = move || {
        inbox.close_panel();
        if let Some(bell) = bell_ref.get_untracked() {
            let _ = bell.focus();
        }
    };
    // Opened from elsewhere (the toast that sums up what was missed): focus comes to the
    // bell, so the keyboard is one Tab from the list and Escape closes it.
    Effect::new(move |_| {
        if open.get() {
            let inside = document()
                .active_element()
                .and_then(|el| el.closest(".sse-inbox").ok().flatten())
                .is_some();
            if let (false, Some(bell)) = (inside, bell_ref.get_untracked()) {
                let _ = bell.focus();
            }
        }
    });
    // An item added while the list is open shows at once.
    Effect::new(move |_| {
        if open.get() && inbox.state().with(|s| s.stale && !s.loading) {
            inbox.refresh();
        }
    });
    let label = move || match unread.get() {
        Some(n) if n > 0 => format!("Notifications, {n} unread"),
        _ => "Notifications".to_string(),
    };
    let button = move || {
        view! {
            {styles.then(|| view! { <style data-sse-inbox="">{INBOX_STYLES}</style> })}
            <div class="sse-inbox" data-theme=theme.as_str()>
                <button
                    node_ref=bell_ref
                    class="sse-inbox__bell"
                    type="button"
                    aria-haspopup="dialog"
                    aria-expanded=move || open.get().to_string()
                    aria-label=label
                    on:click=toggle
                >
                    <svg viewBox="0 0 24 24" width="22" height="22" aria-hidden="true">
                        <path d="M12 3a6 6 0 0 0-6 6v3.6L4.4 15.5A1 1 0 0 0 5.3 17h13.4a1 1 0 0 0 .9-1.5L18 12.6V9a6 6 0 0 0-6-6zM9.5 19a2.5 2.5 0 0 0 5 0" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round"/>
                    </svg>
                    // The server-rendered count is known before the page is sent (a blocking
                    // resource), so no Suspense: the badge is in the HTML itself.
                    {move || {
                        unread
                            .get()
                            .filter(|n| *n > 0)
                            .map(|n| {
                                let text = if n > 99 { "99+".to_string() } else { n.to_string() };
                                view! { <span class="sse-inbox__badge" data-count=n.to_string()>{text}</span> }
                            })
                    }}
                </button>
                <Show when=move || open.get()>
                    {panel(inbox, Callback::new(move |()| close()))}
                </Show>
            </div>
        }
    };
    // Nothing at all while the server has no inbox.
    let enabled = inbox.enabled();
    view! { <Show when=move || enabled.get()>{button()}</Show> }
}

/// The bell's view, type-erased on the server only. A host page nests the bell deep in
/// its own views (a Transition, an Either), and the server's render reaches rustc's
/// type-depth limit first. In the browser an `AnyView` would link a second, async copy of
/// the view's hydration code: 15 KiB of gzipped WASM in the example host app.
#[cfg(feature = "ssr")]
fn erased(view: impl IntoView + 'static) -> AnyView {
    view.into_any()
}

#[cfg(not(feature = "ssr"))]
fn erased<V: IntoView>(view: V) -> V {
    view
}

/// The open list, in the page's own WASM.
#[cfg(not(sse_notify_split))]
fn panel(inbox: Inbox, close: Callback<()>) -> impl IntoView {
    view! { <Panel inbox close /> }
}

/// The open list, from a WASM chunk of its own that the first opening loads, in an app
/// built with `cargo leptos build --split` (see build.rs): most of the notification
/// center's code is the list's views.
#[cfg(sse_notify_split)]
fn panel(inbox: Inbox, close: Callback<()>) -> impl IntoView {
    Suspend::new(async move { lazy_panel(inbox, close).await })
}

#[cfg(sse_notify_split)]
#[leptos::lazy]
fn lazy_panel(inbox: Inbox, close: Callback<()>) -> AnyView {
    view! { <Panel inbox close /> }.into_any()
}

/// The open list.
#[component]
fn Panel(inbox: Inbox, close: Callback<()>) -> impl IntoView {
    let items = inbox.items();
    let state = inbox.state();
    let unread = inbox.unread();
    // Escape closes it wherever focus is (an archived item's button is gone, and focus with
    // it); so does a press outside the bell and the panel.
    let escape = window_event_listener(leptos::ev::keydown, move |e| {
        if e.key() == "Escape" {
            close.run(());
        }
    });
    let outside = window_event_listener(leptos::ev::pointerdown, move |e| {
        let inside = event_target::<web_sys::Element>(&e)
            .closest(".sse-inbox")
            .ok()
            .flatten()
            .is_some();
        if !inside {
            close.run(());
        }
    });
    on_cleanup(move || {
        escape.remove();
        outside.remove();
    });
    let on_scroll = move |e: leptos::ev::Event| {
        let list = event_target::<web_sys::Element>(&e);
        if list.scroll_top() + list.client_height() >= list.scroll_height() - 48 {
            inbox.load_more();
        }
    };
    view! {
        <div class="sse-inbox__panel" role="dialog" aria-label="Notifications">
            <div class="sse-inbox__head">
                <h2 class="sse-inbox__title">"Notifications"</h2>
                <button
                    class="sse-inbox__all"
                    type="button"
                    disabled=move || unread.get().unwrap_or(0) == 0
                    on:click=move |_| inbox.mark_all_read()
                >
                    "Mark all as read"
                </button>
            </div>
            <ul class="sse-inbox__list" on:scroll=on_scroll>
                <For each=move || items.get() key=|item| (item.id.clone(), item.read.is_some()) let:item>
                    <Row inbox item />
                </For>
            </ul>
            <Show when=move || items.with(Vec::is_empty) && !state.with(|s| s.loading)>
                <p class="sse-inbox__empty">"You're all caught up."</p>
            </Show>
            <Show when=move || state.with(|s| s.has_more())>
                <button class="sse-inbox__more" type="button" on:click=move |_| inbox.load_more()>
                    {move || if state.with(|s| s.loading) { "Loading…" } else { "Load more" }}
                </button>
            </Show>
            {move || state.with(|s| s.error.clone()).map(|e| view! { <p class="sse-inbox__error" role="alert">{e}</p> })}
        </div>
    }
}

/// One item: a link (or button) that marks it read, and an archive button.
#[component]
fn Row(inbox: Inbox, item: InboxItem) -> impl IntoView {
    let (title, message, link) = describe(&item);
    let unread = item.read.is_none();
    let id = item.id.clone();
    let read = {
        let id = id.clone();
        move |_| {
            if unread {
                inbox.mark_read(vec![id.clone()]);
            }
        }
    };
    let archive = move |_| inbox.archive(vec![id.clone()]);
    let body = view! {
        <span class="sse-inbox__text">
            <span class="sse-inbox__item-title">{title}</span>
            {(!message.is_empty()).then(|| view! { <span class="sse-inbox__message">{message}</span> })}
            <time class="sse-inbox__time">{ago(item.created)}</time>
        </span>
    };
    let open = match link {
        Some(href) => Either::Left(view! { <a class="sse-inbox__open" href=href on:click=read>{body}</a> }),
        None => Either::Right(
            view! { <button class="sse-inbox__open" type="button" on:click=read>{body}</button> },
        ),
    };
    view! {
        <li class="sse-inbox__item" data-unread=unread.to_string() data-id=item.id.clone()>
            {unread.then(|| view! { <span class="sse-inbox__dot" aria-label="unread"></span> })}
            {open}
            <button class="sse-inbox__archive" type="button" aria-label="Archive" title="Archive" on:click=archive>
                <svg viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
                    <path d="M4 7h16v3H4zM6 10v8h12v-8M10 13h4" fill="none" stroke="currentColor" stroke-width="1.8" stroke-linejoin="round"/>
                </svg>
            </button>
        </li>
    }
}

/// The title, message and link an item shows, by its event.
fn describe(item: &InboxItem) -> (String, String, Option<String>) {
    let text = |field: &str| {
        item.data
            .get(field)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let link = |field: &str| {
        item.data
            .get(field)
            .and_then(|v| v.as_str())
            .filter(|u| u.starts_with("https://") || u.starts_with("http://") || u.starts_with('/'))
            .map(str::to_string)
    };
    match item.event.as_str() {
        names::NOTIFICATION => (text("title"), text("message"), link("actionUrl")),
        names::REEL_READY => ("Your reel is ready".into(), text("reelId"), link("playbackUrl")),
        names::SYSTEM_ALERT => ("Notice".into(), text("message"), None),
        other => (other.to_string(), String::new(), None),
    }
}

/// How long ago `ms` (since the epoch) was, in words.
fn ago(ms: u64) -> String {
    let now = {
        #[cfg(not(feature = "ssr"))]
        {
            js_sys::Date::now() as u64
        }
        #[cfg(feature = "ssr")]
        {
            crate::server::now_ms()
        }
    };
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=59 => "just now".into(),
        60..=3_599 => format!("{} min ago", secs / 60),
        3_600..=86_399 => format!("{} h ago", secs / 3_600),
        _ => format!("{} d ago", secs / 86_400),
    }
}
