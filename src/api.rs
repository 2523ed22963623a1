//! The HTTP contract shared by the server and the browser: default route paths and the
//! figures of `/api/stats`. One home for each, so the router, the listener's lean stream
//! path, the hook and the dashboard cannot drift apart.

use serde::{Deserialize, Serialize};

/// Where the event stream is served by default (`GET`).
pub const STREAM_PATH: &str = "/api/sse";
/// The same stream over WebSocket (`GET`), for when something in between buffers SSE.
pub const WS_PATH: &str = "/api/ws";
/// Where other backends publish (`POST`).
pub const PUBLISH_PATH: &str = "/api/events";
/// Where another backend ends a user's streams (`POST`), e.g. at logout.
pub const DISCONNECT_PATH: &str = "/api/disconnect";
/// The demo's sign-in (`POST`, only with `SSE_DEMO=1`).
pub const SESSION_PATH: &str = "/api/session";
/// The JSON figures of [`Stats`].
pub const STATS_PATH: &str = "/api/stats";
/// The same figures as a `stats` event every second.
pub const STATS_STREAM_PATH: &str = "/api/stats/stream";
/// `?user_id=`: a user's streams on every instance (publish key).
pub const PRESENCE_PATH: &str = "/api/presence";
/// Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";
/// Liveness and broker health.
pub const HEALTH_PATH: &str = "/healthz";
/// The signed-in user's inbox (`GET`, newest first, [`InboxPage`]); `POST` to
/// `{INBOX_PATH}/read`, `/unread`, `/archive` or `/unarchive` with [`InboxSelection`]
/// changes it.
pub const INBOX_PATH: &str = "/api/inbox";

/// `{WEBHOOKS_PATH}/<name>`: a Standard Webhooks delivery for the webhook `name`
/// (`SSE_WEBHOOK_SECRETS`).
pub const WEBHOOKS_PATH: &str = "/api/webhooks";

/// The response header of `HEAD` on the stream path (204) that carries the caller's
/// identity tag: what tabs of one browser key their shared channels by, learned before
/// any stream opens.
pub const IDENTITY_TAG_HEADER: &str = "x-sse-identity-tag";

/// The data of the `ready` event that ends every stream's prelude.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// How often heartbeats come, so the client knows how soon to expect one.
    pub heartbeat_ms: u64,
    /// The opaque tag of the identity the server confirmed for this stream (see
    /// `IDENTITY_TAG_HEADER`): a keyed hash of the user id, never the id itself. Empty
    /// from a server that sends none.
    #[serde(default)]
    pub tag: String,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
}

/// How the broker is doing, for `/healthz`, `/api/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum BrokerHealth {
    Healthy,
    /// Cannot reach its backing store; publishing fails, local connections keep working.
    Degraded,
}

impl BrokerHealth {
    /// The name used on the wire: `healthy` or `degraded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
        }
    }
}

/// Figures of one server instance, served at `/api/stats` and streamed at
/// `/api/stats/stream`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub clients: usize,
    pub users: usize,
    pub events_published: u64,
    pub events_delivered: u64,
    pub events_failed: u64,
    pub slow_client_disconnects: u64,
    pub connections_replaced: u64,
    /// `memory`, `redis` or `redis-cluster`.
    pub broker: String,
    pub broker_health: BrokerHealth,
    pub uptime_ms: u64,
}

/// One kept event in a user's inbox, as `GET /api/inbox` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct InboxItem {
    /// The event's id (the same as on the stream).
    pub id: String,
    /// The event name, e.g. `notification`.
    pub event: String,
    /// The event's `data` object.
    pub data: serde_json::Value,
    /// When it was published, ms since the Unix epoch.
    pub created: u64,
    /// When this user read it, if they did.
    pub read: Option<u64>,
    /// When this user archived it, if they did.
    pub archived: Option<u64>,
}

/// A page of the inbox, and the counts of the whole of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct InboxPage {
    pub items: Vec<InboxItem>,
    /// Unread items, archived ones not counted.
    pub unread: u64,
    /// Items not archived.
    pub total: u64,
    /// Pass as `before=` for the next page; `None` on the last one.
    pub next: Option<String>,
}

/// A user's unread and total (not archived) counts: the answer of the `POST` routes that
/// change an inbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct InboxCounts {
    pub unread: u64,
    pub total: u64,
}

/// The body of the `POST` routes that change an inbox: some ids, or all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct InboxSelection {
    /// Event ids; unknown ones and other users' are ignored.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Every item instead.
    #[serde(default)]
    pub all: bool,
}

/// The data of the `inbox` control event: what changed, from any tab, device or instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct InboxChange {
    /// `added`, `read`, `unread`, `archived` or `unarchived`.
    pub op: String,
    /// The items it changed (empty with `all`).
    #[serde(default)]
    pub ids: Vec<String>,
    /// It changed every item.
    #[serde(default)]
    pub all: bool,
    /// The unread count after the change; `None` for an item added to everyone (a kept
    /// broadcast), where each user's count went up by one.
    pub unread: Option<u64>,
}
