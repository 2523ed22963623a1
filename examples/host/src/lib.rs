//! The host app's pages: a login form of its own, and a home page with sse-notify's toasts
//! and a button that notifies the signed-in user through a server function.

use leptos::{either::Either, prelude::*};
use leptos_meta::{provide_meta_context, MetaTags, Stylesheet, Title};
use leptos_router::{
    components::{Route, Router, Routes},
    path,
};
use sse_notify::client::{
    provide_inbox, use_connection_status, InboxOptions, NotificationBell, Position, SseNotifications,
};

/// The signed-in user, from the host's own session.
#[server]
pub async fn current_user() -> Result<Option<String>, ServerFnError> {
    let session: tower_sessions::Session = leptos_axum::extract().await?;
    Ok(session.get::<String>("user").await?)
}

/// Notifies the signed-in user, as any handler, webhook or job of the host would.
#[server]
pub async fn notify_me(title: String) -> Result<String, ServerFnError> {
    use sse_notify::{
        events::{Notification, NotificationKind},
        server::SseService,
    };
    let user = current_user()
        .await?
        .ok_or_else(|| ServerFnError::new("not signed in"))?;
    let note = Notification {
        title,
        message: format!("Sent to {user} from a server function."),
        kind: NotificationKind::Success,
        action_url: None,
    };
    let id = expect_context::<SseService>()
        .send_notification(&user, note)
        .await?;
    Ok(id.to_string())
}

#[component]
fn Home() -> impl IntoView {
    let user = Resource::new(|| (), |_| current_user());
    let user_id = Signal::derive(move || user.get().and_then(Result::ok).flatten());
    let status = use_connection_status();
    let notify = ServerAction::<NotifyMe>::new();
    // The notification center (with SSE_INBOX_URL set), above the toasts and the bell.
    provide_inbox(InboxOptions::default().user_id(user_id));
    view! {
        // The server rendering this page tells it where the routes are (under /notify here).
        <SseNotifications user_id position=Position::BottomRight />
        <Transition fallback=|| "…">
            {move || match user_id.get() {
                // Either, not into_any: an AnyView links a second copy of the view's hydration code.
                None => Either::Left(view! { <p>"You are not signed in. " <a href="/login">"Sign in"</a></p> }),
                Some(name) => Either::Right(view! {
                    <header>
                        <h1>"Hello, " <span data-testid="user">{name}</span></h1>
                        <NotificationBell />
                        <form method="post" action="/logout">
                            <button type="submit" data-testid="logout">"Log out"</button>
                        </form>
                    </header>
                    <p data-testid="stream" data-status=move || status.with(|s| s.state.as_str())>
                        {move || format!("Notifications: {}", status.with(|s| s.state.as_str()))}
                    </p>
                    <button data-testid="notify-me" on:click=move |_| {
                        notify.dispatch(NotifyMe { title: "Hello from the host".into() });
                    }>"Send me a notification"</button>
                }),
            }}
        </Transition>
    }
}

/// The HTML document around the app.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <link rel="icon" type="image/svg+xml" href="/favicon.svg" />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));
    view! {
        <Stylesheet id="leptos" href="/pkg/host.css" />
        <Title text="My app" />
        <Router>
            <main data-hydrated=move || hydrated.get().to_string()>
                <Routes fallback=|| "Not found.">
                    <Route path=path!("/") view=Home />
                    <Route path=path!("/login") view=Login />
                </Routes>
            </main>
        </Router>
    }
}

#[component]
fn Login() -> impl IntoView {
    view! {
        <h1>"Sign in"</h1>
        <form method="post" action="/login">
            <input name="username" placeholder="Your name" required maxlength="64" />
            <button type="submit">"Sign in"</button>
        </form>
    }
}

/// The host's own WASM entry; sse-notify without `demo` exports none, so this cannot clash.
#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(App);
}
