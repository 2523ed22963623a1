//! [`Routes`]: which HTTP routes a server exposes and under which prefix, and the small
//! endpoints (stats, metrics, health, disconnect, the demo's sign-in).

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Query, State},
    http::{header, HeaderMap, HeaderValue, Method, Uri},
    response::{
        sse::{Event as SseFrame, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use futures::StreamExt;
use tokio_stream::wrappers::IntervalStream;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{
    dashboard::{self, check_operator},
    inbox, openapi,
    publish::{check_publish_key, disconnect_handler, publish_handler},
    stream::sse_handler,
    webhook::webhook_handler,
    websocket::ws_handler,
    ApiError,
};
use crate::{
    api,
    server::{auth, core::service::SseService, metrics},
};

/// The routes of the notification server, to merge into an app of any state type.
///
/// By default: `GET /api/sse` (the stream), `POST /api/events` (publish), `POST
/// /api/webhooks/<name>` (signed callbacks), `POST /api/disconnect`, `GET /api/stats` and
/// `/api/stats/stream`, `GET /metrics`, `GET /healthz`, the inbox routes and `GET
/// /api/openapi.json`.
/// Stats and metrics need the publish key unless [`public_stats`](Self::public_stats) is
/// set. Turn any of them off, and put them all under a prefix; the
/// [`SseListener`](super::listener::SseListener)'s lean stream path follows the prefix.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use sse_notify::server::{Routes, SseConfig, SseService};
///
/// let sse = SseService::start(SseConfig::from_env()?).await?;
/// // /notify/api/sse, /notify/api/events, /notify/api/disconnect, /notify/healthz
/// let notify: axum::Router = Routes::new(&sse).prefix("/notify").stats(false).metrics(false).build();
/// # Ok(()) }
/// ```
///
/// Serve the app with [`SseListener::serve`](super::listener::SseListener::serve) (or axum's
/// `into_make_service_with_connect_info::<SocketAddr>()`), so the per-address connection
/// limit sees client addresses.
#[must_use]
pub struct Routes {
    service: SseService,
    prefix: String,
    stream: bool,
    publish: bool,
    disconnect: bool,
    stats: bool,
    public_stats: bool,
    metrics: bool,
    health: bool,
    inbox: bool,
    webhooks: bool,
    openapi: bool,
    dashboard: bool,
    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    session: bool,
}

impl Routes {
    /// Every route except the demo sign-in, at the root.
    pub fn new(service: &SseService) -> Self {
        Self {
            service: service.clone(),
            prefix: String::new(),
            stream: true,
            publish: true,
            disconnect: true,
            stats: true,
            public_stats: false,
            metrics: true,
            health: true,
            inbox: true,
            webhooks: true,
            openapi: true,
            dashboard: false,
            session: false,
        }
    }

    /// Puts every route under `prefix` (e.g. `/notify`). Defaults to none.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.trim_end_matches('/').to_string();
        self
    }

    /// `GET /api/sse`, the event stream, and `GET /api/ws`, the same over WebSocket.
    /// Defaults to on.
    pub fn stream(mut self, on: bool) -> Self {
        self.stream = on;
        self
    }

    /// `POST /api/events`, publishing for other backends (with `SSE_PUBLISH_KEY`). Defaults to on.
    pub fn publish(mut self, on: bool) -> Self {
        self.publish = on;
        self
    }

    /// `POST /api/disconnect`, ending a user's streams (with `SSE_PUBLISH_KEY`). Defaults to on.
    pub fn disconnect(mut self, on: bool) -> Self {
        self.disconnect = on;
        self
    }

    /// `GET /api/stats`, `GET /api/stats/stream` and `GET /api/presence` (always behind the
    /// publish key). Defaults to on.
    pub fn stats(mut self, on: bool) -> Self {
        self.stats = on;
        self
    }

    /// Stats and metrics without the publish key (the demo's dashboard). Defaults to off.
    pub fn public_stats(mut self, on: bool) -> Self {
        self.public_stats = on;
        self
    }

    /// `GET /metrics`, Prometheus. Defaults to on.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// `GET /healthz`. Defaults to on.
    pub fn health(mut self, on: bool) -> Self {
        self.health = on;
        self
    }

    /// `GET /api/inbox` and `POST /api/inbox/{read,unread,archive,unarchive}`, the signed-in
    /// user's notification center (404 while the service has no inbox store). Defaults to on.
    pub fn inbox(mut self, on: bool) -> Self {
        self.inbox = on;
        self
    }

    /// `POST /api/webhooks/<name>`, Standard Webhooks deliveries turned into events (404
    /// for a name without a secret in `SSE_WEBHOOK_SECRETS`). Defaults to on.
    pub fn webhooks(mut self, on: bool) -> Self {
        self.webhooks = on;
        self
    }

    /// `GET /api/openapi.json`, the OpenAPI 3.1 document of these routes (with the prefix
    /// as its server URL). Defaults to on.
    pub fn openapi(mut self, on: bool) -> Self {
        self.openapi = on;
        self
    }

    /// `GET /dashboard`, the operators' page of every instance's figures, with its sign-in
    /// (`POST /dashboard/sign-in` with the publish key) and sign-out. Defaults to off (the
    /// standalone server turns it on); a signed-in operator's cookie also opens the stats
    /// routes.
    pub fn dashboard(mut self, on: bool) -> Self {
        self.dashboard = on;
        self
    }

    /// `POST /api/session`: sign in as any user (the demo's; never in production).
    /// Defaults to off.
    #[cfg(feature = "demo")]
    pub fn demo_session(mut self, on: bool) -> Self {
        self.session = on;
        self
    }

    /// The router; records the stream's full path in the service for the lean path.
    pub fn build<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let service = self.service.clone();
        let at = |path: &str| format!("{}{path}", self.prefix);
        service.set_stream_path(&at(api::STREAM_PATH));
        let mut routes = Router::new();
        if self.stream {
            routes = routes
                .route(&at(api::STREAM_PATH), get(sse_handler))
                .route(&at(api::WS_PATH), get(ws_handler));
        }
        if self.publish {
            routes = routes.route(&at(api::PUBLISH_PATH), post(publish_handler));
        }
        if self.disconnect {
            routes = routes.route(&at(api::DISCONNECT_PATH), post(disconnect_handler));
        }
        if self.stats {
            let (json, stream) = if self.public_stats {
                (get(stats), get(stats_stream))
            } else {
                (get(protected_stats), get(protected_stats_stream))
            };
            routes = routes
                .route(&at(api::STATS_PATH), json)
                .route(&at(api::STATS_STREAM_PATH), stream)
                .route(&at(api::PRESENCE_PATH), get(presence));
        }
        if self.metrics {
            let metrics = if self.public_stats {
                get(metrics)
            } else {
                get(protected_metrics)
            };
            routes = routes.route(&at(api::METRICS_PATH), metrics);
        }
        if self.health {
            routes = routes.route(&at(api::HEALTH_PATH), get(healthz));
        }
        if self.inbox {
            let change = |op: &str| at(&format!("{}/{op}", api::INBOX_PATH));
            routes = routes
                .route(&at(api::INBOX_PATH), get(inbox::list_handler))
                .route(&change("read"), post(inbox::read_handler))
                .route(&change("unread"), post(inbox::unread_handler))
                .route(&change("archive"), post(inbox::archive_handler))
                .route(&change("unarchive"), post(inbox::unarchive_handler));
        }
        if self.webhooks {
            routes = routes.route(
                &at(&format!("{}/{{name}}", api::WEBHOOKS_PATH)),
                post(webhook_handler),
            );
        }
        if self.openapi {
            // Serialized once, here: the document only changes with the code, and a request
            // for it costs a clone of a reference-counted buffer.
            let document = bytes::Bytes::from(
                serde_json::to_vec(&openapi::openapi(&self.prefix)).expect("the document serializes"),
            );
            let serve = move || {
                let body = document.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body) }
            };
            routes = routes.route(&at(openapi::OPENAPI_PATH), get(serve));
        }
        if self.dashboard {
            let page = at(dashboard::DASHBOARD_PATH);
            routes = routes
                .route(&page, get(dashboard::dashboard_page))
                .route(&format!("{page}/sign-in"), post(dashboard::sign_in))
                .route(&format!("{page}/sign-out"), post(dashboard::sign_out));
        }
        #[cfg(feature = "demo")]
        if self.session {
            routes = routes.route(&at(api::SESSION_PATH), post(session));
        }
        let config = service.config();
        if !config.allowed_origins.is_empty() {
            let origins: Vec<HeaderValue> = config
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect();
            routes = routes.layer(
                CorsLayer::new()
                    .allow_origin(AllowOrigin::list(origins))
                    .allow_credentials(true)
                    .allow_methods([Method::GET, Method::HEAD, Method::POST])
                    .allow_headers([
                        header::AUTHORIZATION,
                        header::CONTENT_TYPE,
                        header::HeaderName::from_static("last-event-id"),
                    ])
                    // A page on a listed origin reads its tag from the `HEAD` probe.
                    .expose_headers([header::HeaderName::from_static(api::IDENTITY_TAG_HEADER)]),
            );
        }
        routes.with_state(service)
    }
}

/// `GET /api/stats`.
async fn stats(State(service): State<SseService>) -> Response {
    Json(service.stats_report()).into_response()
}

/// `GET /api/presence?user_id=`: a user's streams on every instance. Always behind the
/// publish key, `public_stats` or not: who is online is about one person.
async fn presence(
    State(service): State<SseService>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    struct PresenceQuery {
        user_id: Option<String>,
    }
    check_publish_key(&service, &headers)?;
    let Query(query) = Query::<PresenceQuery>::try_from_uri(&uri)
        .map_err(|e| ApiError::bad_request(e.body_text()).field("query"))?;
    let user_id = query
        .user_id
        .ok_or_else(|| ApiError::bad_request("add ?user_id=<the user's id>").field("user_id"))?;
    auth::validate_user_id(&user_id).map_err(|e| ApiError::bad_request(e).field("user_id"))?;
    let presence = service
        .presence(&user_id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(presence).into_response())
}

async fn protected_stats(
    State(service): State<SseService>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_operator(&service, &headers)?;
    Ok(stats(State(service)).await)
}

/// `GET /api/stats/stream`: a `stats` event at once and then every second, for live
/// dashboards, until the service shuts down. Counts against `max_connections`.
async fn stats_stream(State(service): State<SseService>) -> Result<Response, ApiError> {
    let permit = service.hold_connection().ok_or_else(|| {
        ApiError::unavailable("the server holds as many connections as it may; retry shortly")
    })?;
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let stream = ticks.take_until(service.shutting_down()).map(move |_| {
        let _held = &permit;
        Ok::<_, Infallible>(
            SseFrame::default()
                .event("stats")
                .json_data(service.stats_report())
                .unwrap_or_default(),
        )
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn protected_stats_stream(
    State(service): State<SseService>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_operator(&service, &headers)?;
    stats_stream(State(service)).await
}

/// `GET /metrics`: Prometheus text format.
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::install().render(),
    )
        .into_response()
}

async fn protected_metrics(
    State(service): State<SseService>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_publish_key(&service, &headers)?;
    Ok(metrics().await)
}

/// `GET /healthz`: 200 while serving, with the broker's health in the body (a degraded
/// broker still serves its local connections); 503 while shutting down.
async fn healthz(State(service): State<SseService>) -> Response {
    if service.is_shutting_down() {
        return ApiError::unavailable("shutting down").into_response();
    }
    Json(serde_json::json!({
        "status": "ok",
        "broker": service.broker_kind(),
        "brokerHealth": service.broker_health(),
    }))
    .into_response()
}

#[cfg(feature = "demo")]
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRequest {
    user_id: String,
}

/// How long a demo session lasts.
#[cfg(feature = "demo")]
pub const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);

/// `POST /api/session` (demo): signs in as any user id and sets the `sse_session` cookie.
/// JSON only, so no cross-site form can sign a browser in; the token is only in the cookie.
#[cfg(feature = "demo")]
async fn session(
    State(service): State<SseService>,
    parts: axum::http::request::Parts,
    body: Result<Json<SessionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(request) = body.map_err(|e| {
        let field = if e.body_text().contains("user_id") {
            "user_id"
        } else {
            "body"
        };
        let status = match &e {
            axum::extract::rejection::JsonRejection::JsonDataError(_) => axum::http::StatusCode::BAD_REQUEST,
            other => other.status(),
        };
        ApiError::new(status, e.body_text()).field(field)
    })?;
    let token = service
        .issue_token(&request.user_id, None, SESSION_TTL)
        .map_err(|e| ApiError::bad_request(e.to_string()).field("user_id"))?;
    let cookie = session_cookie(&service, &parts, &token);
    let body = serde_json::json!({ "user_id": request.user_id });
    Ok(([(header::SET_COOKIE, cookie)], Json(body)).into_response())
}

/// Whether a cookie set in answer to this request gets `Secure`: as `SSE_COOKIE_SECURE` says,
/// by default when the request came over HTTPS (its URI's scheme, or `X-Forwarded-Proto`).
pub(crate) fn cookies_secure(service: &SseService, scheme: Option<&str>, headers: &HeaderMap) -> bool {
    use crate::server::config::CookieSecure;

    let https = scheme == Some("https")
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    match service.config().cookie_secure {
        CookieSecure::Auto => https,
        CookieSecure::Always => true,
        CookieSecure::Never => false,
    }
}

/// The `Set-Cookie` value of a demo session: HttpOnly, SameSite=Lax, for the whole site,
/// `Secure` as `SSE_COOKIE_SECURE` says (by default when the request came over HTTPS).
#[cfg(feature = "demo")]
pub fn session_cookie(service: &SseService, request: &axum::http::request::Parts, token: &str) -> String {
    use axum_extra::extract::cookie::{Cookie, SameSite};

    use crate::server::auth::SESSION_COOKIE;

    let secure = cookies_secure(service, request.uri.scheme_str(), &request.headers);
    Cookie::build((SESSION_COOKIE, token.to_string()))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(time_span(SESSION_TTL))
        .secure(secure)
        .build()
        .to_string()
}

/// The `Set-Cookie` value that ends a demo session.
#[cfg(feature = "demo")]
pub fn session_cookie_removal() -> String {
    use axum_extra::extract::cookie::{Cookie, SameSite};

    use crate::server::auth::SESSION_COOKIE;
    Cookie::build((SESSION_COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(time_span(Duration::ZERO))
        .build()
        .to_string()
}

#[cfg(feature = "demo")]
fn time_span(d: Duration) -> cookie::time::Duration {
    cookie::time::Duration::seconds(d.as_secs() as i64)
}
