//! The HTTP contract as an OpenAPI 3.1 document, served at `GET /api/openapi.json` and
//! checked in as `docs/openapi.json`, for backends that generate their clients from it.
//!
//! The schemas are derived from the wire types themselves (`ToSchema` on [`crate::api`] and
//! [`crate::events`]), so a field renamed there changes the document. The operations are
//! declared here, in one place, because the handlers read raw requests (to bound bodies
//! and name the field at fault) rather than typed extractors a generator could follow;
//! `tests/openapi.rs` keeps the two honest by calling every operation on a running server
//! and validating each answer against the schema declared here for its status.

use utoipa::{
    openapi::{
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
        ServerBuilder,
    },
    Modify, OpenApi, ToSchema,
};

use crate::{
    api::{self, BrokerHealth, InboxChange, InboxCounts, InboxItem, InboxPage, InboxSelection, Ready, Stats},
    events::{
        Heartbeat, Notification, NotificationKind, ReelReady, ReelUploadProgress, SystemAlert,
        SystemAlertKind, UploadStatus, UserUpdate, UserUpdateKind,
    },
    server::{
        auth::SESSION_COOKIE,
        core::presence::{
            ClusterStats, InstanceConnections, InstanceFigures, InstanceStats, Presence, StatsReport,
        },
        http::dashboard::OPS_COOKIE,
    },
};

/// The path of the document itself (under the routes' prefix).
pub const OPENAPI_PATH: &str = "/api/openapi.json";

/// The document for routes served under `prefix` (`""` for none): the paths stay as the
/// defaults and the prefix becomes the server's base URL, as generated clients expect.
pub fn openapi(prefix: &str) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.servers = Some(vec![ServerBuilder::new()
        .url(if prefix.is_empty() { "/" } else { prefix })
        .description(Some("this server"))
        .build()]);
    doc
}

/// The document as the checked-in `docs/openapi.json` holds it (no prefix, pretty, with a
/// final newline).
pub fn openapi_json() -> String {
    let mut json = openapi("").to_pretty_json().expect("the document serializes");
    json.push('\n');
    json
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sse-notify",
        description = "Real-time notifications over Server-Sent Events: the stream a browser \
            holds, the publish API other backends call, and the signed-in user's inbox. Every \
            error is JSON naming the field at fault: `{\"error\": \"...\", \"field\": \"...\"}`.",
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        stream, stream_probe, websocket, publish, disconnect, webhook, inbox_list, inbox_read,
        inbox_unread, inbox_archive, inbox_unarchive, stats, stats_stream, presence, metrics, health, dashboard,
        dashboard_sign_in, dashboard_sign_out,
        document,
    ),
    components(schemas(
        ErrorBody, PublishItem, PublishBody, Published, DisconnectBody, Disconnected, Health,
        Stats, StatsReport, InstanceFigures, ClusterStats, InstanceStats, Presence, InstanceConnections,
        BrokerHealth, InboxPage, InboxItem, InboxCounts, InboxSelection, InboxChange,
        Ready, Heartbeat, Notification, NotificationKind, ReelUploadProgress, UploadStatus,
        ReelReady, UserUpdate, UserUpdateKind, SystemAlert, SystemAlertKind,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "stream", description = "The user's live events"),
        (name = "publish", description = "For other backends, with `Authorization: Bearer <SSE_PUBLISH_KEY>`"),
        (name = "inbox", description = "The signed-in user's notification center (404 while `SSE_INBOX_URL` is unset)"),
        (name = "operate", description = "Health, figures and this document"),
    ),
)]
struct ApiDoc;

/// `publishKey` (the operator's `SSE_PUBLISH_KEY` as a bearer token) and the three ways a
/// user's session may come: a bearer token, the session cookie, or `?token=`.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme("publishKey", bearer("`SSE_PUBLISH_KEY`"));
        components.add_security_scheme(
            "sessionToken",
            bearer("A session token (HS256 JWT signed with `SSE_JWT_SECRET`, `sub` = the user id)"),
        );
        components.add_security_scheme(
            "sessionCookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                SESSION_COOKIE,
                "The same token in a cookie; a page on another origin is refused (403 naming `origin`)",
            ))),
        );
        components.add_security_scheme(
            "operatorCookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                OPS_COOKIE,
                "Set by signing in to the dashboard with the publish key; opens the stats routes",
            ))),
        );
        components.add_security_scheme(
            "sessionQuery",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "The same token in the query, for clients that can send neither header nor cookie",
            ))),
        );
    }
}

/// Every error: what went wrong, and the request field at fault when there is one
/// (`user_id`, `data.title`, `Authorization`, `Idempotency-Key`, `origin`, ...).
#[derive(ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ErrorBody {
    error: String,
    #[schema(required = false)]
    field: String,
}

/// One event to publish: to one user (`user_id`) or to every connected user
/// (`broadcast: true`), never both. `data` is the event's object: `Notification` for
/// `notification`, `ReelUploadProgress`, `ReelReady`, `UserUpdate`, `SystemAlert` for the
/// others; any other name not reserved is a custom event with any object.
#[derive(ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PublishItem {
    #[schema(required = false, min_length = 1, max_length = 128)]
    user_id: String,
    #[schema(required = false, default = false)]
    broadcast: bool,
    #[schema(min_length = 1, max_length = 64, example = "notification")]
    event: String,
    #[schema(required = false, value_type = Object)]
    data: serde_json::Value,
}

/// `POST /api/events`: one event, or an array of 1 to `SSE_MAX_BATCH` (1,000), all
/// published or none.
#[derive(ToSchema, serde::Serialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum PublishBody {
    One(PublishItem),
    Many(Vec<PublishItem>),
}

/// A publish was taken: the events' ids, in the order sent (also each inbox item's id).
#[derive(ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Published {
    ids: Vec<String>,
}

/// `POST /api/disconnect`.
#[derive(ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DisconnectBody {
    user_id: String,
}

/// How many of the user's streams were ended, on every instance.
#[derive(ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Disconnected {
    closed: u64,
}

/// `GET /healthz` while serving.
#[derive(ToSchema, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Health {
    #[schema(example = "ok")]
    status: String,
    /// `memory`, `redis` or `redis-cluster`.
    broker: String,
    #[schema(rename = "brokerHealth")]
    broker_health: BrokerHealth,
}

/// The events a stream carries, as SSE frames (`id:`, `event:`, `data:` with one JSON
/// object). First a `ready` event (`Ready`), then the user's events and broadcasts,
/// `heartbeat` (`Heartbeat`) every `heartbeatMs`, and control events: `inbox`
/// (`InboxChange`), `resync`, `connection_replaced`, `session_ended`.
#[utoipa::path(
    get,
    path = api::STREAM_PATH,
    tag = "stream",
    params(
        ("events" = Option<String>, Query, description = "Comma-separated event names: only these are sent (at most 32)"),
        ("lastEventId" = Option<String>, Query, description = "Resume after this id (as the `Last-Event-ID` header)"),
        ("resumeAgoMs" = Option<u64>, Query, description = "No id yet: start this many ms back (at most 60000)"),
        ("probe" = Option<String>, Query, description = "`1`: only the `ready` event, held 15 s, then the end"),
        ("fallback" = Option<String>, Query, description = "`buffered`: the client found SSE held back on the way"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this id: missed events are replayed, or a `resync` event says they are gone"),
    ),
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad query parameter (named)", body = ErrorBody),
        (status = 401, description = "No session, or an expired or forged one", body = ErrorBody),
        (status = 403, description = "A cookie session from another origin", body = ErrorBody),
        (status = 429, description = "Too many connections or attempts (per user, address or server)", body = ErrorBody),
        (status = 503, description = "Shutting down, or the session store is unavailable (retry)", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn stream() {}

/// Whether a `GET` would be let in, without opening a stream, and the identity tag tabs
/// key their shared stream by.
#[utoipa::path(
    head,
    path = api::STREAM_PATH,
    tag = "stream",
    responses(
        (status = 204, description = "A `GET` would open", headers(
            ("x-sse-identity-tag" = String, description = "A keyed hash of the user id, never the id itself"),
        )),
        (status = 401, description = "No valid session"),
        (status = 403, description = "A cookie session from another origin"),
        (status = 503, description = "The session store is unavailable (retry)"),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn stream_probe() {}

/// The same stream over WebSocket, for when something in between buffers SSE: each text
/// message holds SSE frames exactly as the stream writes them. Same query as the stream
/// (`events`, `lastEventId`, `token`); any foreign `Origin` is refused.
#[utoipa::path(
    get,
    path = api::WS_PATH,
    tag = "stream",
    params(
        ("events" = Option<String>, Query, description = "As for the stream"),
        ("lastEventId" = Option<String>, Query, description = "Resume after this id"),
    ),
    responses(
        (status = 101, description = "Upgraded"),
        (status = 400, description = "Not a WebSocket handshake, or a bad parameter", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "From another origin", body = ErrorBody),
        (status = 429, description = "Too many connections or attempts", body = ErrorBody),
        (status = 503, description = "Shutting down, or the session store is unavailable", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn websocket() {}

/// Publish events: kept in the inbox (for kept types) before the answer, then delivered
/// to every instance. With an `Idempotency-Key`, a retry with the same body within the
/// window (`SSE_IDEMPOTENCY_WINDOW_MS`, 24 h) answers the first ids and publishes nothing.
#[utoipa::path(
    post,
    path = api::PUBLISH_PATH,
    tag = "publish",
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters"),
    ),
    request_body(content = PublishBody, content_type = "application/json"),
    responses(
        (status = 202, description = "Taken: delivered live and replayable by id", body = Published),
        (status = 400, description = "A bad body (the field is named, e.g. `[2].data.title`)", body = ErrorBody),
        (status = 401, description = "No publish key", body = ErrorBody),
        (status = 403, description = "A wrong publish key, or none configured", body = ErrorBody),
        (status = 408, description = "The body came too slowly", body = ErrorBody),
        (status = 409, description = "The idempotency key came with another body, or its first publish is still running", body = ErrorBody),
        (status = 413, description = "The body is over `SSE_MAX_BODY_BYTES`", body = ErrorBody),
        (status = 503, description = "The broker or the inbox store is down: nothing was taken", body = ErrorBody),
    ),
    security(("publishKey" = [])),
)]
#[allow(dead_code)]
fn publish() {}

/// End every stream of a user on every instance (e.g. at logout).
#[utoipa::path(
    post,
    path = api::DISCONNECT_PATH,
    tag = "publish",
    request_body(content = DisconnectBody, content_type = "application/json"),
    responses(
        (status = 200, description = "Ended", body = Disconnected),
        (status = 400, description = "A bad body", body = ErrorBody),
        (status = 401, description = "No publish key", body = ErrorBody),
        (status = 403, description = "A wrong publish key, or none configured", body = ErrorBody),
        (status = 503, description = "The broker is down", body = ErrorBody),
    ),
    security(("publishKey" = [])),
)]
#[allow(dead_code)]
fn disconnect() {}

/// A Standard Webhooks delivery (`webhook-id`, `webhook-timestamp`, `webhook-signature`,
/// HMAC-SHA256 with the secret `SSE_WEBHOOK_SECRETS` names), published as
/// `reel_upload_progress` or `reel_ready` for the user the payload names, once per
/// `webhook-id`.
#[utoipa::path(
    post,
    path = "/api/webhooks/{name}",
    tag = "publish",
    params(
        ("name" = String, Path, description = "A webhook named in `SSE_WEBHOOK_SECRETS`"),
        ("webhook-id" = String, Header),
        ("webhook-timestamp" = String, Header, description = "Unix seconds, within 5 minutes"),
        ("webhook-signature" = String, Header, description = "`v1,<base64 HMAC-SHA256>`, space-separated"),
    ),
    request_body(content = Object, content_type = "application/json",
        description = "`{\"type\": \"reel.upload_progress\" | \"reel.ready\", \"data\": {\"userId\": ..., ...the event's fields}}`, at most 64 KiB"),
    responses(
        (status = 202, description = "Published (or already, for this `webhook-id`)", body = Published),
        (status = 400, description = "A payload of another shape (named)", body = ErrorBody),
        (status = 401, description = "A missing, stale or wrong signature (the header is named)", body = ErrorBody),
        (status = 404, description = "No webhook of this name", body = ErrorBody),
        (status = 503, description = "The broker is down", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn webhook() {}

/// A page of the signed-in user's inbox, newest first, with the counts of all of it.
#[utoipa::path(
    get,
    path = api::INBOX_PATH,
    tag = "inbox",
    params(
        ("status" = Option<String>, Query, description = "`unread`, `all` (the default) or `archived`"),
        ("before" = Option<String>, Query, description = "The `next` of the page before"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Items per page (20)"),
    ),
    responses(
        (status = 200, description = "A page", body = InboxPage),
        (status = 400, description = "A bad parameter (named)", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "A cookie session from another origin", body = ErrorBody),
        (status = 404, description = "The inbox is off (`SSE_INBOX_URL` unset)", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn inbox_list() {}

/// Mark items read; every stream of the user gets an `inbox` event.
#[utoipa::path(post, path = "/api/inbox/read", tag = "inbox",
    request_body(content = InboxSelection, content_type = "application/json"),
    responses(
        (status = 200, description = "The counts after the change (ids not the user's are ignored)", body = InboxCounts),
        (status = 400, description = "A bad body (named)", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 403, description = "A cookie session from another origin", body = ErrorBody),
        (status = 404, description = "The inbox is off", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn inbox_read() {}

/// Mark items unread, as `POST /api/inbox/read` does.
#[utoipa::path(post, path = "/api/inbox/unread", tag = "inbox",
    request_body(content = InboxSelection, content_type = "application/json"),
    responses(
        (status = 200, description = "The counts after the change", body = InboxCounts),
        (status = 400, description = "A bad body (named)", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 404, description = "The inbox is off", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn inbox_unread() {}

/// Archive items (out of `all` and `unread`, into `archived`), as `POST /api/inbox/read` does.
#[utoipa::path(post, path = "/api/inbox/archive", tag = "inbox",
    request_body(content = InboxSelection, content_type = "application/json"),
    responses(
        (status = 200, description = "The counts after the change", body = InboxCounts),
        (status = 400, description = "A bad body (named)", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 404, description = "The inbox is off", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn inbox_archive() {}

/// Bring archived items back, as `POST /api/inbox/read` does.
#[utoipa::path(post, path = "/api/inbox/unarchive", tag = "inbox",
    request_body(content = InboxSelection, content_type = "application/json"),
    responses(
        (status = 200, description = "The counts after the change", body = InboxCounts),
        (status = 400, description = "A bad body (named)", body = ErrorBody),
        (status = 401, description = "No valid session", body = ErrorBody),
        (status = 404, description = "The inbox is off", body = ErrorBody),
    ),
    security(("sessionToken" = []), ("sessionCookie" = []), ("sessionQuery" = [])),
)]
#[allow(dead_code)]
fn inbox_unarchive() {}

/// This instance's figures, its id, and every live instance's (`cluster`, through Redis; at
/// most a second old). The publish key unless the server made them public.
#[utoipa::path(get, path = api::STATS_PATH, tag = "operate",
    responses(
        (status = 200, description = "The figures", body = StatsReport),
        (status = 401, description = "No publish key", body = ErrorBody),
        (status = 403, description = "A wrong publish key, or none configured", body = ErrorBody),
    ),
    security(("publishKey" = []), ("operatorCookie" = [])),
)]
#[allow(dead_code)]
fn stats() {}

/// The same figures as a `stats` event (`StatsReport`) at once and then every second.
#[utoipa::path(get, path = api::STATS_STREAM_PATH, tag = "operate",
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "No publish key", body = ErrorBody),
        (status = 403, description = "A wrong publish key, or none configured", body = ErrorBody),
        (status = 503, description = "The server holds as many connections as it may", body = ErrorBody),
    ),
    security(("publishKey" = []), ("operatorCookie" = [])),
)]
#[allow(dead_code)]
fn stats_stream() {}

/// A user's open streams on every instance (the others' at most a second old). Always
/// behind the publish key.
#[utoipa::path(get, path = api::PRESENCE_PATH, tag = "publish",
    params(("user_id" = String, Query, description = "The user")),
    responses(
        (status = 200, description = "The user's presence", body = Presence),
        (status = 400, description = "No or a bad `user_id` (named)", body = ErrorBody),
        (status = 401, description = "No publish key", body = ErrorBody),
        (status = 403, description = "A wrong publish key, or none configured", body = ErrorBody),
        (status = 503, description = "The broker could not be read", body = ErrorBody),
    ),
    security(("publishKey" = [])),
)]
#[allow(dead_code)]
fn presence() {}

/// The operators' dashboard (when the server turns it on; the standalone server does): the
/// sign-in form without a valid `sse_ops` cookie, every instance's figures with one.
#[utoipa::path(get, path = "/dashboard", tag = "operate",
    responses(
        (status = 200, description = "The dashboard, or the sign-in form", content_type = "text/html", body = String),
        (status = 403, description = "No publish key configured", content_type = "text/html", body = String),
    ),
)]
#[allow(dead_code)]
fn dashboard() {}

/// Signs an operator in with the publish key (a form field `key`): sets the `sse_ops`
/// cookie (`HttpOnly`, `SameSite=Strict`, 12 h) and goes back to the dashboard.
#[utoipa::path(post, path = "/dashboard/sign-in", tag = "operate",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "`key=<SSE_PUBLISH_KEY>`"),
    responses(
        (status = 303, description = "Signed in; to the dashboard"),
        (status = 403, description = "A wrong key: the form again", content_type = "text/html", body = String),
        (status = 408, description = "The body trickled in", body = ErrorBody),
        (status = 413, description = "A body over 1 KiB", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn dashboard_sign_in() {}

/// Signs the operator out on this browser.
#[utoipa::path(post, path = "/dashboard/sign-out", tag = "operate",
    responses((status = 303, description = "Signed out; to the sign-in form")),
)]
#[allow(dead_code)]
fn dashboard_sign_out() {}

/// Prometheus metrics (the publish key unless public).
#[utoipa::path(get, path = api::METRICS_PATH, tag = "operate",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "No publish key", body = ErrorBody),
        (status = 403, description = "A wrong publish key, or none configured", body = ErrorBody),
    ),
    security(("publishKey" = [])),
)]
#[allow(dead_code)]
fn metrics() {}

/// Liveness, with the broker's health (a degraded broker still serves local streams).
#[utoipa::path(get, path = api::HEALTH_PATH, tag = "operate",
    responses(
        (status = 200, description = "Serving", body = Health),
        (status = 503, description = "Shutting down", body = ErrorBody),
    ),
)]
#[allow(dead_code)]
fn health() {}

/// This document.
#[utoipa::path(get, path = OPENAPI_PATH, tag = "operate",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object)),
)]
#[allow(dead_code)]
fn document() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_becomes_the_base_url() {
        let doc = serde_json::to_value(openapi("/notify")).unwrap();
        assert_eq!(doc["servers"][0]["url"], "/notify");
        assert!(doc["paths"]["/api/sse"]["get"].is_object());
        assert_eq!(doc["openapi"].as_str().unwrap().get(..3), Some("3.1"));
    }
}
