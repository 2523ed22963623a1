//! The demo app (feature `demo`): sign in as any user, send yourself every event type,
//! watch the toasts, and follow connections and throughput on a live dashboard.
//!
//! The home page reads `SseNotifications` options from the query string, so every option
//! can be tried without code: `/?position=bottom-left&max=3&dismiss=2000&auto=false&theme=dark`
//! (also `stall=<ms>`, the stall timeout; `share=false`, one stream per tab;
//! `transport=auto|sse|websocket`; `sse_retry=<ms>`, how soon SSE is tried again after a
//! fallback to WebSocket; `token_ttl=<s>`, stream on tokens of that life from the demo's
//! token endpoint instead of the cookie; `user_hint=none`, the hook is told only whether
//! someone is signed in, not who, as in an app whose session signal carries no user id).

use leptos::{either::Either, prelude::*};
use leptos_meta::{provide_meta_context, MetaTags, Stylesheet, Title};
use leptos_router::{
    components::{Route, Router, Routes, A},
    hooks::use_query_map,
    path,
};
use serde::{Deserialize, Serialize};

use crate::{
    api::{self, Stats},
    client::{
        provide_inbox, use_connection_status, use_sse_with_options, use_toaster, ConnectionReadyState,
        ConnectionStatus, InboxOptions, NewToast, NotificationBell, Position, SseMessage, SseNotifications,
        Theme, ToastKind, Transport, TransportMode, UseSseError, UseSseOptions,
    },
    events::{NotificationKind, SystemAlertKind, UserUpdateKind},
};

/// The HTML document around the app.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <link rel="icon" type="image/svg+xml" href="/favicon.svg" />
                <AutoReload options=options.clone() />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

/// The demo app: routes and layout.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    // Set once the WASM has hydrated the page; end-to-end tests wait for it.
    let hydrated = RwSignal::new(false);
    Effect::new(move |_| hydrated.set(true));
    view! {
        <Stylesheet id="leptos" href="/pkg/sse-notify.css" />
        <Title text="sse-notify demo" />
        <Router>
            <div class="app" data-hydrated=move || hydrated.get().to_string()>
                <header class="topbar">
                    <a class="brand" href="/">"sse-notify"</a>
                    <nav>
                        <A href="/">"Send events"</A>
                        <A href="/dashboard">"Dashboard"</A>
                    </nav>
                </header>
                <main>
                    <Routes fallback=|| view! { <p class="card">"Page not found."</p> }>
                        <Route path=path!("/") view=HomePage />
                        <Route path=path!("/dashboard") view=DashboardPage />
                        <Route path=path!("/short-session") view=ShortSessionPage />
                    </Routes>
                </main>
            </div>
        </Router>
    }
}

/// What the demo page can ask the server to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DemoEvent {
    Notification {
        title: String,
        message: String,
        kind: NotificationKind,
        action_url: Option<String>,
    },
    /// A simulated upload: progress to 100 %, then `reel_ready`.
    ReelUpload,
    UserUpdate(UserUpdateKind),
    Custom {
        name: String,
        data: String,
    },
    /// To every connected user.
    SystemAlert {
        message: String,
        kind: SystemAlertKind,
        duration: Option<u64>,
    },
}

/// The signed-in user of this request, from the session cookie.
#[server]
pub async fn current_user() -> Result<Option<String>, ServerFnError> {
    Ok(server_side::session_user().await.ok())
}

/// Signs in as `user_id` (any name: this is a demo) and sets the session cookie. JSON
/// only, so a cross-site form cannot sign a visitor in as someone else.
#[server(input = server_fn::codec::Json)]
pub async fn sign_in(user_id: String) -> Result<String, ServerFnError> {
    use crate::server::{session_cookie, SseService};
    let user_id = user_id.trim().to_string();
    let sse = expect_context::<SseService>();
    let token = sse
        .issue_token(&user_id, None, crate::server::SESSION_TTL)
        .map_err(|e| ServerFnError::new(e.to_string()))?;
    let request: axum::http::request::Parts = leptos_axum::extract().await?;
    server_side::set_cookie(&session_cookie(&sse, &request, &token))?;
    Ok(user_id)
}

/// Signs out: clears the session cookie and ends the user's streams everywhere.
#[server(input = server_fn::codec::Json)]
pub async fn sign_out() -> Result<(), ServerFnError> {
    use crate::server::SseService;
    if let Ok(user) = server_side::session_user().await {
        let _ = expect_context::<SseService>().disconnect_user(&user).await;
    }
    server_side::set_cookie(&crate::server::session_cookie_removal())
}

/// Sends `event` to the signed-in user (or to everyone, for a system alert).
#[server(input = server_fn::codec::Json)]
pub async fn send_demo_event(event: DemoEvent) -> Result<String, ServerFnError> {
    server_side::send(event).await
}

#[cfg(feature = "ssr")]
mod server_side {
    use std::time::Duration;

    use axum::http::{header, HeaderValue};
    use axum_extra::extract::CookieJar;
    use leptos::prelude::*;

    use super::DemoEvent;
    use crate::{
        events::{Event, Notification, ReelReady, ReelUploadProgress, SystemAlert, UploadStatus, UserUpdate},
        server::{SseService, SESSION_COOKIE},
    };

    fn err(e: impl std::fmt::Display) -> ServerFnError {
        ServerFnError::new(e.to_string())
    }

    pub async fn session_user() -> Result<String, ServerFnError> {
        let jar: CookieJar = leptos_axum::extract().await.map_err(err)?;
        let token = jar.get(SESSION_COOKIE).ok_or_else(|| err("not signed in"))?;
        Ok(expect_context::<SseService>()
            .verify_token(token.value())
            .map_err(err)?
            .sub)
    }

    /// `GET /api/demo/token?ttl=3`: `{"token": "..."}` for the signed-in user of the cookie.
    pub async fn token_handler(
        sse: SseService,
        jar: CookieJar,
        query: std::collections::HashMap<String, String>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let user = jar
            .get(SESSION_COOKIE)
            .and_then(|c| sse.verify_token(c.value()).ok())
            .map(|claims| claims.sub);
        let Some(user) = user else {
            return axum::http::StatusCode::UNAUTHORIZED.into_response();
        };
        let ttl = query
            .get("ttl")
            .and_then(|t| t.parse().ok())
            .unwrap_or(60u64)
            .clamp(2, 60);
        match sse.issue_token(&user, None, Duration::from_secs(ttl)) {
            Ok(token) => axum::Json(serde_json::json!({ "token": token })).into_response(),
            Err(_) => axum::http::StatusCode::BAD_REQUEST.into_response(),
        }
    }

    pub fn set_cookie(value: &str) -> Result<(), ServerFnError> {
        let response = expect_context::<leptos_axum::ResponseOptions>();
        response.insert_header(header::SET_COOKIE, HeaderValue::from_str(value).map_err(err)?);
        Ok(())
    }

    pub async fn send(event: DemoEvent) -> Result<String, ServerFnError> {
        let sse = expect_context::<SseService>();
        let user = session_user().await?;
        let id = match event {
            DemoEvent::Notification {
                title,
                message,
                kind,
                action_url,
            } => {
                let action_url = action_url.filter(|u| !u.trim().is_empty());
                sse.send_notification(
                    &user,
                    Notification {
                        title,
                        message,
                        kind,
                        action_url,
                    },
                )
                .await
            }
            DemoEvent::UserUpdate(kind) => {
                let data = serde_json::json!({ "changedBy": "demo", "at": crate::server::clock::now_ms() });
                sse.send_user_update(&user, UserUpdate { kind, data }).await
            }
            DemoEvent::Custom { name, data } => {
                let data: serde_json::Value =
                    serde_json::from_str(&data).map_err(|e| err(format!("data: not valid JSON: {e}")))?;
                let event = Event::from_value(&name, data).map_err(err)?;
                sse.send(crate::server::Target::User(user.as_str().into()), event)
                    .await
            }
            DemoEvent::SystemAlert {
                message,
                kind,
                duration,
            } => {
                sse.send_system_alert(SystemAlert {
                    message,
                    kind,
                    duration,
                })
                .await
            }
            DemoEvent::ReelUpload => {
                let reel_id = format!("reel-{}", crate::server::clock::now_ms() % 100_000);
                tokio::spawn(simulate_upload(sse, user, reel_id.clone()));
                return Ok(reel_id);
            }
        };
        id.map(|id| id.to_string()).map_err(err)
    }

    /// Streams progress to 100 % in steps, then `reel_ready`, like a transcoding job would.
    async fn simulate_upload(sse: SseService, user: String, reel_id: String) {
        for progress in (0..=100u8).step_by(10) {
            let status = if progress < 60 {
                UploadStatus::Uploading
            } else {
                UploadStatus::Processing
            };
            let update = ReelUploadProgress {
                reel_id: reel_id.clone(),
                progress,
                status,
                message: None,
            };
            if let Err(e) = sse.send_reel_upload_progress(&user, update).await {
                tracing::warn!("demo upload progress not sent: {e}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let ready = ReelReady {
            playback_url: format!("/reels/{reel_id}"),
            reel_id,
            thumbnail_url: None,
            duration: Some(42.0),
        };
        if let Err(e) = sse.send_reel_ready(&user, ready).await {
            tracing::warn!("demo reel_ready not sent: {e}");
        }
    }
}

/// Sign in, send events, see toasts and the raw event log.
#[component]
fn HomePage() -> impl IntoView {
    let sign_in = ServerAction::<SignIn>::new();
    let sign_out = ServerAction::<SignOut>::new();
    let user = Resource::new(
        move || (sign_in.version().get(), sign_out.version().get()),
        |_| current_user(),
    );
    let user_id = Signal::derive(move || user.get().and_then(Result::ok).flatten());
    // The notification center: its first page and count rendered here on the server, kept
    // live by the stream's `inbox` events (SseNotifications hands them over).
    provide_inbox(InboxOptions::default().user_id(user_id));

    let query = use_query_map();
    let (position, max, dismiss, auto, stall, theme, share, transport, sse_retry) =
        query.with_untracked(|q| {
            (
                q.get("position")
                    .and_then(|p| Position::parse(&p))
                    .unwrap_or_default(),
                q.get("max").and_then(|m| m.parse().ok()).unwrap_or(5usize),
                q.get("dismiss").and_then(|d| d.parse().ok()).unwrap_or(5_000u64),
                q.get("auto").map(|a| a != "false").unwrap_or(true),
                q.get("stall").and_then(|s| s.parse::<u64>().ok()),
                q.get("theme").and_then(|t| Theme::parse(&t)).unwrap_or_default(),
                q.get("share").map(|s| s != "false").unwrap_or(true),
                q.get("transport")
                    .and_then(|t| TransportMode::parse(&t))
                    .unwrap_or_default(),
                q.get("sse_retry").and_then(|s| s.parse::<u64>().ok()),
            )
        });
    let token_url = query.with_untracked(|q| {
        q.get("token_ttl")
            .and_then(|s| s.parse::<u64>().ok())
            .map(|ttl| format!("{DEMO_TOKEN_PATH}?ttl={ttl}"))
    });
    let token_first = token_url.is_some();
    // Which tabs may share a stream must not depend on the app naming the user: with
    // `user_hint=none` only the server's confirmation tells users apart.
    let hook_user_id = match query.with_untracked(|q| q.get("user_hint")).as_deref() {
        Some("none") => Signal::derive(move || user_id.get().map(|_| "signed-in".to_string())),
        _ => user_id,
    };
    let status = use_connection_status();
    let log = RwSignal::new(Vec::<SseMessage>::new());
    let on_message = Callback::new(move |msg: SseMessage| {
        log.update(|l| {
            l.insert(0, msg);
            l.truncate(30);
        })
    });

    view! {
        <SseNotifications
            user_id=hook_user_id
            position
            max_notifications=max
            dismiss_delay=dismiss
            auto_dismiss=auto
            on_message
            extra_events=vec!["demo.ping".to_string()]
            stall_timeout=stall
            theme
            share_across_tabs=share
            transport
            sse_retry_interval=sse_retry
            token_url
            token_first
        />
        <section class="hero">
            <h1>"Live notifications for Leptos"</h1>
            <p>"Sign in as anyone, send yourself events, and watch them arrive as toasts over Server-Sent Events."</p>
            <StatusBadge status />
        </section>
        <Transition fallback=|| view! { <p class="card">"Loading…"</p> }>
            {move || match user_id.get() {
                None => Either::Left(view! { <SignInCard sign_in /> }),
                Some(name) => Either::Right(view! {
                    <div class="signed-in">
                        <span>"Signed in as " <strong data-testid="user">{name}</strong></span>
                        <span class="signed-in__actions">
                            <NotificationBell theme />
                            <button class="button button--ghost" type="button" data-testid="sign-out" on:click=move |_| { sign_out.dispatch(SignOut {}); }>"Sign out"</button>
                        </span>
                    </div>
                    <div class="grid">
                        <div>
                            <SendPanel />
                            <ToasterPanel />
                        </div>
                        <EventLog log />
                    </div>
                }),
            }}
        </Transition>
    }
}

#[component]
fn StatusBadge(status: Signal<ConnectionStatus>) -> impl IntoView {
    let state = move || status.with(|s| s.state);
    let error = move || status.with(|s| s.error.as_ref().map(UseSseError::code));
    let label = move || match state() {
        ConnectionReadyState::Open => "Live",
        ConnectionReadyState::Connecting => "Connecting…",
        _ if error() == Some("unauthorized") => "Not signed in",
        ConnectionReadyState::Closing | ConnectionReadyState::Closed => "Offline",
    };
    let leader = move || status.with(|s| s.leader.to_string());
    let transport = move || status.with(|s| s.transport);
    view! {
        <p class="status" data-status=move || state().as_str() data-error=error data-leader=leader data-transport=move || transport().as_str() role="status">
            <span class="status__dot" aria-hidden="true"></span>
            {label}
            {move || (transport() == Transport::WebSocket).then_some(" · over WebSocket")}
        </p>
    }
}

#[component]
fn SignInCard(sign_in: ServerAction<SignIn>) -> impl IntoView {
    let name = RwSignal::new(String::new());
    let submit = move |ev: leptos::ev::SubmitEvent| {
        ev.prevent_default();
        sign_in.dispatch(SignIn {
            user_id: name.get_untracked(),
        });
    };
    view! {
        <div class="card sign-in">
            <h2>"Sign in"</h2>
            <p>"Pick any user name. Open a second browser window as another user to see that events stay private."</p>
            <form on:submit=submit>
                <label for="user_id">"User name"</label>
                <div class="row">
                    <input id="user_id" name="user_id" required maxlength="128" placeholder="alice" bind:value=name />
                    <button class="button" type="submit">"Sign in"</button>
                </div>
            </form>
            {move || sign_in.value().get().and_then(Result::err).map(|e| view! { <p class="error">{e.to_string()}</p> })}
        </div>
    }
}

/// The forms that send each event type through `send_demo_event`.
#[component]
fn SendPanel() -> impl IntoView {
    let send = ServerAction::<SendDemoEvent>::new();
    /// Parses an enum from its lowercase wire name, as the `<select>` values are.
    fn parse_kind<T: serde::de::DeserializeOwned + Default>(s: String) -> T {
        serde_json::from_value(serde_json::Value::String(s)).unwrap_or_default()
    }
    let dispatch = move |event: DemoEvent| {
        send.dispatch(SendDemoEvent { event });
    };
    let title = RwSignal::new("Hello from the server".to_string());
    let message = RwSignal::new("This toast arrived over SSE.".to_string());
    let kind = RwSignal::new("info".to_string());
    let action_url = RwSignal::new(String::new());
    let alert = RwSignal::new("Scheduled maintenance tonight at 22:00 UTC".to_string());
    let alert_kind = RwSignal::new("maintenance".to_string());
    let custom_name = RwSignal::new("demo.ping".to_string());
    let custom_data = RwSignal::new(r#"{"hello":"world"}"#.to_string());

    view! {
        <div class="stack">
            <div class="card">
                <h2>"Notification"</h2>
                <label>"Title" <input data-testid="title" bind:value=title /></label>
                <label>"Message" <input data-testid="message" bind:value=message /></label>
                <div class="row">
                    <label>"Kind"
                        <select data-testid="kind" bind:value=kind>
                            <option value="info">"info"</option>
                            <option value="success">"success"</option>
                            <option value="warning">"warning"</option>
                            <option value="error">"error"</option>
                        </select>
                    </label>
                    <label>"Action URL" <input data-testid="action-url" placeholder="/reels/1" bind:value=action_url /></label>
                </div>
                <button class="button" data-testid="send-notification" on:click=move |_| dispatch(DemoEvent::Notification {
                    title: title.get_untracked(),
                    message: message.get_untracked(),
                    kind: parse_kind(kind.get_untracked()),
                    action_url: Some(action_url.get_untracked()),
                })>"Send notification"</button>
            </div>
            <div class="card">
                <h2>"Reel upload"</h2>
                <p>"A simulated upload streams progress to 100 % and then says the reel is ready."</p>
                <button class="button" data-testid="send-reel" on:click=move |_| dispatch(DemoEvent::ReelUpload)>"Simulate upload"</button>
            </div>
            <div class="card">
                <h2>"User update"</h2>
                <div class="row">
                    <button class="button button--ghost" data-testid="send-profile" on:click=move |_| dispatch(DemoEvent::UserUpdate(UserUpdateKind::Profile))>"Profile"</button>
                    <button class="button button--ghost" on:click=move |_| dispatch(DemoEvent::UserUpdate(UserUpdateKind::Settings))>"Settings"</button>
                    <button class="button button--ghost" on:click=move |_| dispatch(DemoEvent::UserUpdate(UserUpdateKind::Subscription))>"Subscription"</button>
                </div>
            </div>
            <div class="card">
                <h2>"Custom event"</h2>
                <p>"Shows in the event log (no toast)."</p>
                <label>"Name" <input data-testid="custom-name" bind:value=custom_name /></label>
                <label>"Data (JSON object)" <input data-testid="custom-data" bind:value=custom_data /></label>
                <button class="button button--ghost" data-testid="send-custom" on:click=move |_| dispatch(DemoEvent::Custom {
                    name: custom_name.get_untracked(),
                    data: custom_data.get_untracked(),
                })>"Send custom event"</button>
            </div>
            <div class="card">
                <h2>"System alert (everyone)"</h2>
                <label>"Message" <input data-testid="alert-message" bind:value=alert /></label>
                <label>"Kind"
                    <select bind:value=alert_kind>
                        <option value="info">"info"</option>
                        <option value="warning">"warning"</option>
                        <option value="maintenance">"maintenance"</option>
                    </select>
                </label>
                <button class="button button--warn" data-testid="send-alert" on:click=move |_| dispatch(DemoEvent::SystemAlert {
                    message: alert.get_untracked(),
                    kind: parse_kind(alert_kind.get_untracked()),
                    duration: Some(8_000),
                })>"Broadcast alert"</button>
            </div>
            <p class="result" data-testid="send-result" aria-live="polite">
                {move || send.value().get().map(|r| match r {
                    Ok(id) => format!("Sent ({id})"),
                    Err(e) => format!("Not sent: {e}"),
                })}
            </p>
        </div>
    }
}

/// The toaster API from the page: a loading toast that becomes its result, and a toast
/// with an action button.
#[component]
fn ToasterPanel() -> impl IntoView {
    let toaster = use_toaster();
    let undone = RwSignal::new(String::new());
    let save = move |_| {
        let id = toaster.loading("Saving your draft…");
        set_timeout(
            move || {
                toaster.update(
                    id,
                    NewToast::new(ToastKind::Success, "Draft saved").message("All changes are stored."),
                );
            },
            std::time::Duration::from_millis(1_200),
        );
    };
    let archive = move |_| {
        undone.set(String::new());
        toaster.show(
            NewToast::new(ToastKind::Info, "Conversation archived")
                .sticky()
                .action("Undo", move || undone.set("Archive undone".into())),
        );
    };
    view! {
        <div class="card">
            <h2>"Toaster API"</h2>
            <p>"App toasts from any component, through the same store as the stream's."</p>
            <div class="toaster-demo">
                <button class="button" data-testid="toast-promise" on:click=save>"Save (loading → done)"</button>
                <button class="button button--ghost" data-testid="toast-action" on:click=archive>"Archive (with Undo)"</button>
            </div>
            <p class="undo-result" data-testid="undo-result" aria-live="polite">{move || undone.get()}</p>
        </div>
    }
}

#[component]
fn EventLog(log: RwSignal<Vec<SseMessage>>) -> impl IntoView {
    view! {
        <div class="card log">
            <h2>"Event log"</h2>
            <ol data-testid="event-log">
                <For each=move || log.get() key=|m| (m.id.clone(), m.event.clone(), m.data.clone()) let:m>
                    <li>
                        <code class="log__event">{m.event.clone()}</code>
                        <code class="log__id">{format!("#{}", m.id)}</code>
                        <pre>{m.data.clone()}</pre>
                    </li>
                </For>
            </ol>
        </div>
    }
}

/// A stream on 3-second tokens (`?token=`) from `token_url`: the first when the page opens,
/// a fresh one whenever one expires. The page keeps receiving.
#[component]
fn ShortSessionPage() -> impl IntoView {
    let status = use_connection_status();
    view! {
        <section class="hero">
            <h1>"A short session"</h1>
            <p>"This page streams with a token that lasts 3 seconds and fetches a fresh one each time it ends."</p>
            <StatusBadge status />
        </section>
        // No token at render time: the hook fetches the first one from `token_url` too
        // (401 there when not signed in: the badge then says so).
        <SseNotifications
            token_url=format!("{}?ttl=3", DEMO_TOKEN_PATH)
            token_first=true
            auto_dismiss=false
            share_across_tabs=false
        />
    }
}

/// Where the demo hands out fresh short tokens (`GET`, `?ttl=<seconds>`).
pub const DEMO_TOKEN_PATH: &str = "/api/demo/token";

/// Live connections and throughput, streamed over SSE.
#[component]
fn DashboardPage() -> impl IntoView {
    const SAMPLES: usize = 60;
    let latest = RwSignal::new(None::<Stats>);
    // Events delivered per second, newest last.
    let rates = RwSignal::new(Vec::<u64>::new());
    let options = UseSseOptions::default()
        .url(api::STATS_STREAM_PATH)
        .events(vec!["stats".into()])
        .on_message(move |msg| {
            let Ok(stats) = serde_json::from_str::<Stats>(&msg.data) else {
                return;
            };
            let previous = latest.get_untracked().map(|p| p.events_delivered);
            if let Some(previous) = previous {
                rates.update(|r| {
                    r.push(stats.events_delivered.saturating_sub(previous));
                    if r.len() > SAMPLES {
                        r.remove(0);
                    }
                });
            }
            latest.set(Some(stats));
        });
    let sse = use_sse_with_options(options);
    let stat = move |f: fn(&Stats) -> String| {
        move || latest.with(|s| s.as_ref().map(f).unwrap_or_else(|| "–".into()))
    };
    let chart = move || {
        rates.with(|r| {
            let max = r.iter().copied().max().unwrap_or(0).max(1) as f64;
            r.iter()
                .enumerate()
                .map(|(i, v)| format!("{},{:.1}", i * 10, 100.0 - *v as f64 / max * 95.0))
                .collect::<Vec<_>>()
                .join(" ")
        })
    };
    view! {
        <section class="hero">
            <h1>"Dashboard"</h1>
            <p>{move || if sse.ready_state.get() == ConnectionReadyState::Open { "Live, updated every second." } else { "Connecting…" }}</p>
        </section>
        <div class="tiles">
            <div class="tile"><span class="tile__label">"Connections"</span><span class="tile__value" data-testid="clients">{stat(|s| s.clients.to_string())}</span></div>
            <div class="tile"><span class="tile__label">"Users"</span><span class="tile__value" data-testid="users">{stat(|s| s.users.to_string())}</span></div>
            <div class="tile"><span class="tile__label">"Published"</span><span class="tile__value" data-testid="published">{stat(|s| s.events_published.to_string())}</span></div>
            <div class="tile"><span class="tile__label">"Delivered"</span><span class="tile__value" data-testid="delivered">{stat(|s| s.events_delivered.to_string())}</span></div>
            <div class="tile"><span class="tile__label">"Failed"</span><span class="tile__value">{stat(|s| s.events_failed.to_string())}</span></div>
            <div class="tile"><span class="tile__label">"Slow clients cut"</span><span class="tile__value">{stat(|s| s.slow_client_disconnects.to_string())}</span></div>
            <div class="tile"><span class="tile__label">"Broker"</span><span class="tile__value">{stat(|s| format!("{} ({})", s.broker, s.broker_health.as_str()))}</span></div>
        </div>
        <div class="card">
            <h2>"Deliveries per second"</h2>
            <svg class="chart" viewBox="0 0 600 100" preserveAspectRatio="none" role="img" aria-label="Deliveries per second, last minute">
                <polyline points=chart fill="none" stroke="currentColor" stroke-width="2" />
            </svg>
        </div>
    }
}

/// The full server router of the demo binary: the Leptos pages and server functions with
/// [`SseService`](crate::server::SseService) in their context, plus the SSE routes.
#[cfg(feature = "ssr")]
pub fn router(options: LeptosOptions, service: crate::server::SseService) -> axum::Router {
    use leptos_axum::{generate_route_list, LeptosRoutes};
    let routes = generate_route_list(App);
    let context_service = service.clone();
    axum::Router::new()
        .leptos_routes_with_context(
            &options,
            routes,
            move || provide_context(context_service.clone()),
            {
                let options = options.clone();
                move || shell(options.clone())
            },
        )
        .route(
            DEMO_TOKEN_PATH,
            axum::routing::get({
                let sse = service.clone();
                move |jar, axum::extract::Query(query)| server_side::token_handler(sse.clone(), jar, query)
            }),
        )
        .fallback(leptos_axum::file_and_error_handler(shell))
        .with_state(options)
        .merge(
            crate::server::Routes::new(&service)
                .public_stats(true)
                .demo_session(true)
                .build(),
        )
}
