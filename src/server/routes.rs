//! [`router`] and the small endpoints: session sign-in, stats, metrics, health.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderValue, Method},
    response::{
        sse::{Event as SseFrame, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::{get, post},
    Json, Router,
};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::IntervalStream;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{publish::publish_handler, stream::sse_handler, ApiError, SseService};
use crate::api;

/// The routes of the notification server, ready to merge into an app of any state type:
/// `GET /api/sse`, `POST /api/events`, `GET /api/stats`, `GET /api/stats/stream`,
/// `GET /metrics`, `GET /healthz`, and with feature `demo` the sign-in `POST /api/session`.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so the per-IP
/// connection limit can see client addresses.
pub fn router<S: Clone + Send + Sync + 'static>(service: SseService) -> Router<S> {
    let config = service.config();
    let mut api = Router::new()
        .route(api::STREAM_PATH, get(sse_handler))
        .route(
            api::PUBLISH_PATH,
            post(publish_handler).layer(DefaultBodyLimit::max(config.max_body_bytes)),
        )
        .route(api::STATS_PATH, get(stats))
        .route(api::STATS_STREAM_PATH, get(stats_stream))
        .route(api::METRICS_PATH, get(metrics))
        .route(api::HEALTH_PATH, get(healthz));
    #[cfg(feature = "demo")]
    {
        api = api.route(
            "/api/session",
            post(session).layer(DefaultBodyLimit::max(4 * 1024)),
        );
    }
    if !config.allowed_origins.is_empty() {
        let origins: Vec<HeaderValue> = config
            .allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        api = api.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_credentials(true)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::HeaderName::from_static("last-event-id"),
                ]),
        );
    }
    api.with_state(service)
}

/// `GET /api/stats`.
async fn stats(State(service): State<SseService>) -> Response {
    Json(service.stats()).into_response()
}

/// `GET /api/stats/stream`: a `stats` event at once and then every second, for live
/// dashboards, until the service shuts down.
async fn stats_stream(
    State(service): State<SseService>,
) -> Sse<impl Stream<Item = Result<SseFrame, Infallible>>> {
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_secs(1)));
    let stream = ticks.take_until(service.shutting_down()).map(move |_| {
        Ok(SseFrame::default()
            .event("stats")
            .json_data(service.stats())
            .unwrap_or_default())
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /metrics`: Prometheus text format.
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::metrics::install().render(),
    )
        .into_response()
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
#[cfg(feature = "demo")]
async fn session(
    State(service): State<SseService>,
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
    let cookie = session_cookie(&token);
    let body = serde_json::json!({ "user_id": request.user_id, "token": token });
    Ok(([(header::SET_COOKIE, cookie)], Json(body)).into_response())
}

/// The `Set-Cookie` value of a session: HttpOnly, SameSite=Lax, for the whole site.
#[cfg(feature = "demo")]
pub fn session_cookie(token: &str) -> String {
    format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
        super::SESSION_COOKIE,
        SESSION_TTL.as_secs()
    )
}
