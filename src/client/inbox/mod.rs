//! The notification center in the browser: [`provide_inbox`] / [`use_inbox`] (the user's
//! inbox as signals, kept live by the stream's `inbox` events) and [`NotificationBell`]
//! (a bell with the unread count that opens the list).
//!
//! The inbox rides the stream [`SseNotifications`](super::SseNotifications) already holds
//! (no second connection): provide it above both, and the component hands it every
//! `inbox` event. The first page and the count are rendered on the server for the
//! signed-in user and handed to hydration, so the badge never shows 0 and then jumps.
//!
//! ```no_run
//! use leptos::prelude::*;
//! use sse_notify::client::{provide_inbox, InboxOptions, NotificationBell, SseNotifications};
//!
//! #[component]
//! fn Layout() -> impl IntoView {
//!     provide_inbox(InboxOptions::default());
//!     view! {
//!         <header><NotificationBell /></header>
//!         <SseNotifications />
//!     }
//! }
//! ```

mod bell;
mod state;

use default_struct_builder::DefaultBuilder;
use leptos::prelude::*;

pub use bell::{NotificationBell, INBOX_STYLES};
pub use state::{InboxState, LocalChange};

use super::use_sse::SseMessage;
use crate::{
    api::{self, InboxChange, InboxPage},
    events::names,
};

/// Options of [`provide_inbox`].
#[derive(Clone, DefaultBuilder)]
pub struct InboxOptions {
    /// The inbox route. Defaults to `/api/inbox` under the prefix the server mounted the
    /// routes at (`Routes::prefix`), as the server's render hands it to the page; set it
    /// (with [`url`](Self::url)) only for a page no server rendered.
    #[builder(skip)]
    pub url: Option<String>,
    /// The signed-in user: the inbox is loaded again when it changes. Defaults to `None`.
    #[builder(into)]
    pub user_id: Option<Signal<Option<String>>>,
    /// A session token sent as `Authorization: Bearer`, for pages that cannot use the
    /// session cookie. Defaults to `None`.
    pub token: Option<String>,
    /// Items per page. Defaults to 20.
    pub page_size: usize,
}

impl Default for InboxOptions {
    fn default() -> Self {
        Self {
            url: None,
            user_id: None,
            token: None,
            page_size: 20,
        }
    }
}

impl InboxOptions {
    /// The inbox route, e.g. `https://notify.example/api/inbox`.
    pub fn url(self, url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            ..self
        }
    }
}

/// The user's inbox: its state as a signal, and what can be done with it. Cheap to copy;
/// [`provide_inbox`] puts one in the context.
#[derive(Clone, Copy)]
pub struct Inbox {
    state: RwSignal<InboxState>,
    /// Whether the bell's panel is open: here, so a toast can open it too.
    panel_open: RwSignal<bool>,
    /// What the server rendered: whether the inbox is on, and the first page.
    first: Resource<FirstPage>,
    /// `first`'s `enabled` once hydrated, for code outside views (a resource is read in
    /// views and effects).
    on: RwSignal<bool>,
    options: StoredValue<InboxOptions>,
}

/// Creates the inbox, with its first page rendered on the server, and puts it in the
/// context for [`NotificationBell`], [`use_inbox`] and [`SseNotifications`](super::SseNotifications).
pub fn provide_inbox(mut options: InboxOptions) -> Inbox {
    let page_size = options.page_size;
    options.url = options
        .url
        .or_else(|| Some(format!("{}{}", super::served::served_prefix(), api::INBOX_PATH)));
    let first = Resource::new_blocking(
        || (),
        move |_| async move { inbox_first_page(page_size).await.unwrap_or_default() },
    );
    let inbox = Inbox {
        state: RwSignal::new(InboxState::default()),
        panel_open: RwSignal::new(false),
        first,
        on: RwSignal::new(false),
        options: StoredValue::new(options),
    };
    // The server's first page becomes the state once hydrated; a new user's is fetched.
    Effect::new(move |_| {
        let Some(FirstPage { enabled, page }) = first.get() else {
            return;
        };
        inbox.on.set(enabled);
        if let Some(page) = page {
            inbox.state.update(|s| {
                if !s.loaded {
                    s.first_page(page)
                }
            });
        }
    });
    if let Some(user) = inbox.options.with_value(|o| o.user_id) {
        Effect::new(move |previous: Option<Option<String>>| {
            let current = user.get();
            if previous.is_some_and(|p| p != current) {
                inbox.state.set(InboxState::default());
                if current.is_some() && inbox.enabled().get_untracked() {
                    inbox.refresh();
                }
            }
            current
        });
    }
    provide_context(inbox);
    inbox
}

/// The [`Inbox`] in the context, if [`provide_inbox`] put one there.
pub fn use_inbox() -> Option<Inbox> {
    use_context::<Inbox>()
}

/// What the server renders of the inbox: whether it is on (`SSE_INBOX_URL`), and the
/// signed-in user's first page.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FirstPage {
    pub enabled: bool,
    pub page: Option<InboxPage>,
}

impl Inbox {
    /// Whether the server has an inbox, as known when the page was hydrated; outside
    /// views and effects, where [`enabled`](Self::enabled) would read the resource.
    pub fn is_on(&self) -> bool {
        self.on.get_untracked()
    }

    /// Whether the server has an inbox (`SSE_INBOX_URL`): the bell shows only then.
    pub fn enabled(&self) -> Signal<bool> {
        let first = self.first;
        Signal::derive(move || first.get().is_some_and(|f| f.enabled))
    }

    /// The whole state, for views.
    pub fn state(&self) -> Signal<InboxState> {
        self.state.into()
    }

    /// The unread count: the server-rendered one until the state has its own, so the
    /// badge is right from the first paint.
    pub fn unread(&self) -> Signal<Option<u64>> {
        let (state, first) = (self.state, self.first);
        Signal::derive(move || {
            let own = state.with(|s| s.loaded.then_some(s.unread));
            own.or_else(|| first.get().and_then(|f| f.page).map(|p| p.unread))
        })
    }

    /// The items to show: the state's, else the server-rendered first page's.
    pub fn items(&self) -> Signal<Vec<api::InboxItem>> {
        let (state, first) = (self.state, self.first);
        Signal::derive(move || {
            if state.with(|s| s.loaded) {
                state.with(|s| s.items.clone())
            } else {
                first
                    .get()
                    .and_then(|f| f.page)
                    .map(|p| p.items)
                    .unwrap_or_default()
            }
        })
    }

    /// Whether [`NotificationBell`]'s panel is open.
    pub fn panel_open(&self) -> Signal<bool> {
        self.panel_open.into()
    }

    /// Opens the bell's panel (its list loaded again if it is out of date), e.g. from the
    /// toast that sums up what was missed.
    pub fn open_panel(&self) {
        if self
            .state
            .with_untracked(|s| s.stale || (!s.loaded && s.error.is_some()))
        {
            self.refresh();
        }
        self.panel_open.set(true);
    }

    pub fn close_panel(&self) {
        self.panel_open.set(false);
    }

    /// A message of the stream: an `inbox` event updates the state.
    pub fn apply(&self, message: &SseMessage) {
        if message.event != names::INBOX {
            return;
        }
        if let Ok(change) = serde_json::from_str::<InboxChange>(&message.data) {
            self.state.update(|s| s.apply(&change, now_ms()));
        }
    }

    /// Loads the first page again.
    pub fn refresh(&self) {
        self.fetch_page(None);
    }

    /// Loads the next page, if there is one and none is loading.
    pub fn load_more(&self) {
        let next = self
            .state
            .with_untracked(|s| (!s.loading).then(|| s.next.clone()).flatten());
        if next.is_some() {
            self.fetch_page(next);
        }
    }

    /// Marks `ids` read (shown at once; every tab and device follows).
    pub fn mark_read(&self, ids: Vec<String>) {
        self.change(LocalChange::Read, ids, false);
    }

    pub fn mark_all_read(&self) {
        self.change(LocalChange::Read, Vec::new(), true);
    }

    pub fn mark_unread(&self, ids: Vec<String>) {
        self.change(LocalChange::Unread, ids, false);
    }

    pub fn archive(&self, ids: Vec<String>) {
        self.change(LocalChange::Archive, ids, false);
    }

    fn change(&self, change: LocalChange, ids: Vec<String>, all: bool) {
        self.ensure_loaded();
        self.state
            .update(|s| s.change_locally(change, &ids, all, now_ms()));
        let op = match change {
            LocalChange::Read => "read",
            LocalChange::Unread => "unread",
            LocalChange::Archive => "archive",
        };
        let url = format!("{}/{op}", self.url());
        let body = api::InboxSelection { ids, all };
        self.send(url, Some(body), false);
    }

    /// The inbox route ([`provide_inbox`] settled it).
    fn url(&self) -> String {
        self.options.with_value(|o| o.url.clone().unwrap_or_default())
    }

    /// Copies the server-rendered page into the state before the first local change.
    fn ensure_loaded(&self) {
        if !self.state.with_untracked(|s| s.loaded) {
            if let Some(FirstPage { page: Some(page), .. }) = self.first.get_untracked() {
                self.state.update(|s| s.first_page(page));
            }
        }
    }

    fn fetch_page(&self, before: Option<String>) {
        let (url, size) = (self.url(), self.options.with_value(|o| o.page_size));
        let mut url = format!("{url}?limit={size}");
        if let Some(before) = &before {
            url.push_str(&format!("&before={before}"));
        }
        self.state.update(|s| s.loading = true);
        self.send(url, None, before.is_some());
    }

    /// `GET` a page (`body` none) or `POST` a change, and take in the answer.
    #[allow(unused_variables)]
    fn send(&self, url: String, body: Option<api::InboxSelection>, more: bool) {
        #[cfg(not(feature = "ssr"))]
        {
            let (state, token) = (self.state, self.options.with_value(|o| o.token.clone()));
            leptos::task::spawn_local(async move {
                match request(&url, body.as_ref(), token.as_deref()).await {
                    Ok(Answer::Page(page)) => {
                        state.update(|s| if more { s.more(page) } else { s.first_page(page) })
                    }
                    Ok(Answer::Counts(counts)) => state.update(|s| s.counts(counts.unread, counts.total)),
                    Err(e) => state.update(|s| {
                        s.loading = false;
                        s.error = Some(e);
                    }),
                }
            });
        }
    }
}

#[cfg(not(feature = "ssr"))]
enum Answer {
    Page(InboxPage),
    Counts(api::InboxCounts),
}

#[cfg(not(feature = "ssr"))]
async fn request(
    url: &str,
    body: Option<&api::InboxSelection>,
    token: Option<&str>,
) -> Result<Answer, String> {
    use gloo_net::http::Request;
    let request = match body {
        Some(body) => post_keepalive(url, body, token),
        None => {
            let builder = Request::get(url).credentials(web_sys::RequestCredentials::Include);
            match token {
                Some(token) => builder.header("Authorization", &format!("Bearer {token}")),
                None => builder,
            }
            .build()
            .map_err(|e| e.to_string())
        }
    }?;
    let response = request.send().await.map_err(|e| e.to_string())?;
    if !response.ok() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let error = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(error);
    }
    if body.is_some() {
        response
            .json()
            .await
            .map(Answer::Counts)
            .map_err(|e| e.to_string())
    } else {
        response.json().await.map(Answer::Page).map_err(|e| e.to_string())
    }
}

/// A `POST` of a change with `keepalive` set, so that a change made as the page goes away
/// (an item's link followed, a reload right after "Archive") still reaches the server:
/// without it the browser cancels the request with the page. gloo-net's builder cannot set
/// the flag, so the request is built from `RequestInit` directly.
#[cfg(not(feature = "ssr"))]
fn post_keepalive(
    url: &str,
    body: &api::InboxSelection,
    token: Option<&str>,
) -> Result<gloo_net::http::Request, String> {
    let js = |e: wasm_bindgen::JsValue| format!("{e:?}");
    let headers = web_sys::Headers::new().map_err(js)?;
    headers.set("Content-Type", "application/json").map_err(js)?;
    if let Some(token) = token {
        headers
            .set("Authorization", &format!("Bearer {token}"))
            .map_err(js)?;
    }
    let init = web_sys::RequestInit::new();
    init.set_method("POST");
    init.set_credentials(web_sys::RequestCredentials::Include);
    init.set_headers(&headers);
    init.set_body(&serde_json::to_string(body).map_err(|e| e.to_string())?.into());
    js_sys::Reflect::set(&init, &"keepalive".into(), &true.into()).map_err(js)?;
    web_sys::Request::new_with_str_and_init(url, &init)
        .map(Into::into)
        .map_err(js)
}

/// Milliseconds since the Unix epoch, as the browser's clock says (0 on the server, where
/// nothing is changed).
fn now_ms() -> u64 {
    #[cfg(not(feature = "ssr"))]
    {
        js_sys::Date::now() as u64
    }
    #[cfg(feature = "ssr")]
    {
        0
    }
}

/// Whether the inbox is on, and the signed-in user's first page, for the server's render:
/// no page when nobody is signed in; off when the inbox is, or the app put no `SseService`
/// in the context.
#[server(endpoint = "sse_notify_inbox_first_page")]
pub async fn inbox_first_page(limit: usize) -> Result<FirstPage, ServerFnError> {
    use crate::server::{inbox::InboxQuery, SseService};
    let Some(service) = use_context::<SseService>().filter(SseService::has_inbox) else {
        return Ok(FirstPage::default());
    };
    let no_page = FirstPage {
        enabled: true,
        page: None,
    };
    let parts: axum::http::request::Parts = leptos_axum::extract().await?;
    let Ok(identity) = service.authenticate(parts).await else {
        return Ok(no_page);
    };
    let Ok(inbox) = service.inbox(&identity.user_id) else {
        return Ok(no_page);
    };
    let query = InboxQuery {
        limit: limit.clamp(1, crate::server::inbox::MAX_PAGE),
        ..Default::default()
    };
    match inbox.list(&query).await {
        Ok(page) => Ok(FirstPage {
            enabled: true,
            page: Some(page),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "the inbox's first page could not be rendered");
            Ok(no_page)
        }
    }
}
