//! [`SseConfig`]: every tunable of the server, with defaults, `SSE_*` environment overrides
//! (read with `envy`) and a start-up error that names the variable when a value is bad.
//! Secrets are [`SecretString`]s, so no `Debug` output or log line can print them.
//!
//! ```
//! use std::time::Duration;
//! use sse_notify::server::SseConfig;
//!
//! let config = SseConfig::default()
//!     .heartbeat_interval(Duration::from_secs(15))
//!     .max_clients_per_user(3);
//! assert_eq!(config.max_clients_per_user, 3);
//!
//! let err = SseConfig::from_vars([("SSE_MAX_CLIENTS_PER_USER", "lots")]).unwrap_err();
//! assert_eq!(err.variable, "SSE_MAX_CLIENTS_PER_USER");
//! ```

use std::time::Duration;

use default_struct_builder::DefaultBuilder;
use secrecy::SecretString;
use serde::Deserialize;

use crate::{
    events::names,
    server::{address::TrustedProxies, broker::Retention, webhook::WebhookSecrets},
};

/// A configuration value that could not be used. The server refuses to start with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable} is not valid: {problem}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: String,
    /// What was wrong and what was expected (never the value of a secret).
    pub problem: String,
}

impl ConfigError {
    fn new(variable: &str, problem: impl Into<String>) -> Self {
        Self {
            variable: variable.into(),
            problem: problem.into(),
        }
    }
}

/// Tunables of the SSE server. Build with [`SseConfig::default`] and the setters, or read
/// them from the environment with [`SseConfig::from_env`].
#[derive(Clone, Debug, DefaultBuilder)]
pub struct SseConfig {
    /// How often every connection gets a `heartbeat` event. Defaults to 30 s (`SSE_HEARTBEAT_INTERVAL_MS`).
    pub heartbeat_interval: Duration,
    /// Connections one user may hold; one more replaces the oldest. Defaults to 5 (`SSE_MAX_CLIENTS_PER_USER`).
    pub max_clients_per_user: usize,
    /// How often dead connections and expired history are swept. Defaults to 60 s (`SSE_CLEANUP_INTERVAL_MS`).
    pub cleanup_interval: Duration,
    /// How long events stay replayable by `Last-Event-ID`. Defaults to 5 min (`SSE_EVENT_RETENTION_MS`).
    pub event_retention: Duration,
    /// How long an `Idempotency-Key` of `POST /api/events` is remembered. Defaults to 24 h
    /// (`SSE_IDEMPOTENCY_WINDOW_MS`).
    pub idempotency_window: Duration,
    /// Event types delivered to users who were offline when they were sent, and how long
    /// they wait; 0 turns one off. Defaults to `notification` and `reel_ready` 24 h,
    /// `system_alert` 1 h, `reel_upload_progress` 5 min (`SSE_OFFLINE_RETENTION_MS`, as
    /// `name=ms,name=ms`, merged over the defaults).
    pub offline_retention: Vec<(String, Duration)>,
    /// Events waiting for one connection before it counts as too slow and is closed.
    /// Defaults to 256 (`SSE_QUEUE_CAPACITY`).
    pub queue_capacity: usize,
    /// Most events kept for replay, whatever their age, so memory stays bounded under a
    /// flood (per stream with Redis). Defaults to 100,000 (`SSE_HISTORY_CAPACITY`).
    pub history_capacity: usize,
    /// Most bytes of events the in-process broker keeps for replay. Defaults to 64 MiB
    /// (`SSE_HISTORY_MAX_BYTES`).
    pub history_max_bytes: usize,
    /// Long-lived responses (event streams, stats streams) held at once; past it, new ones
    /// get 503 with `Retry-After`. Defaults to the process's open-file limit minus 1,024
    /// (`SSE_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Whether the demo's session cookie is `Secure`: `auto` when the request came over
    /// HTTPS (or `X-Forwarded-Proto: https`), `always`, or `never`. Defaults to `auto`
    /// (`SSE_COOKIE_SECURE`).
    pub cookie_secure: CookieSecure,
    /// Largest `data` of one event, in bytes of JSON. Defaults to 64 KiB (`SSE_MAX_PAYLOAD_BYTES`).
    pub max_payload_bytes: usize,
    /// Largest body `POST /api/events` accepts. Defaults to 1 MiB (`SSE_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Most events in one `POST /api/events` batch. Defaults to 1,000 (`SSE_MAX_BATCH`).
    pub max_batch: usize,
    /// The `retry:` hint sent to browsers, in ms. Defaults to 3,000 (`SSE_RETRY_MS`).
    pub retry: Duration,
    /// New `/api/sse` connections per minute from one IP; 0 turns the limit off.
    /// Defaults to 600 (`SSE_CONNECT_RATE_PER_IP`).
    pub connect_rate_per_ip: u32,
    /// New `/api/sse` connections per minute for one user; 0 turns the limit off.
    /// Defaults to 120 (`SSE_CONNECT_RATE_PER_USER`).
    pub connect_rate_per_user: u32,
    /// HS256 secret for session tokens; `None` makes a random one per process (`SSE_JWT_SECRET`).
    #[builder(into)]
    pub jwt_secret: Option<SecretString>,
    /// Bearer key of `POST /api/events`; `None` disables that route (`SSE_PUBLISH_KEY`).
    /// At least 16 bytes, and never the JWT secret (its holder could mint sessions).
    #[builder(into)]
    pub publish_key: Option<SecretString>,
    /// Accept session tokens without an `aud` claim, as issued before tokens carried
    /// `aud: "sse-notify"`; only while older tokens are still in use. Defaults to off
    /// (`SSE_ACCEPT_TOKENS_WITHOUT_AUD=1`).
    pub accept_tokens_without_aud: bool,
    /// Origins allowed by CORS; empty means same origin only (`SSE_ALLOWED_ORIGINS`, comma-separated).
    pub allowed_origins: Vec<String>,
    /// The proxies in front of the server, whose `X-Forwarded-For` per-address limits
    /// count by. Defaults to none (`SSE_TRUSTED_PROXIES`, comma-separated CIDR blocks).
    pub trusted_proxies: TrustedProxies,
    /// The secret of each webhook `POST /api/webhooks/<name>` accepts, signed as Standard
    /// Webhooks sign. Defaults to none: the route answers 404 (`SSE_WEBHOOK_SECRETS`,
    /// comma-separated `name=whsec_<base64>`).
    pub webhook_secrets: WebhookSecrets,
    /// Shared Redis for several instances; `None` runs on the in-process broker (`REDIS_URL`).
    /// On a Redis Cluster, its seed nodes separated by commas. Secret: the URL may hold the
    /// password.
    #[builder(into)]
    pub redis_url: Option<SecretString>,
    /// A PEM file of the certificate authority that signed a `rediss://` server's
    /// certificate, when it is not one of the public web roots (`SSE_REDIS_CA_CERT`).
    #[builder(into)]
    pub redis_ca_cert: Option<std::path::PathBuf>,
    /// `redis_url` names the nodes of a Redis Cluster (`SSE_REDIS_CLUSTER=1`).
    pub redis_cluster: bool,
    /// On one Redis with replicas: how many must confirm a publish before it is
    /// acknowledged (`WAIT`, up to 500 ms each), so a failover right after cannot lose it.
    /// A Redis Cluster always waits for one replica of the shard. Defaults to 0
    /// (`SSE_REDIS_WAIT_REPLICAS`).
    pub redis_wait_replicas: usize,
    /// Where the notification center keeps its inbox: `sqlite://<file>` (embedded, one
    /// instance) or `postgres://...` (any number of instances). `None`: the inbox is off
    /// and its routes answer 404 (`SSE_INBOX_URL`).
    #[builder(into)]
    pub inbox_url: Option<SecretString>,
    /// Event types kept in the inbox. A broadcast of a kept type (`system_alert` when
    /// listed) is kept once, with read state per user. Defaults to `notification` and
    /// `reel_ready` (`SSE_INBOX_EVENTS`).
    pub inbox_events: Vec<String>,
    /// Items older than this are pruned. Defaults to 90 days (`SSE_INBOX_RETENTION_DAYS`).
    pub inbox_retention: Duration,
    /// Items kept per user (and broadcasts kept in all); the oldest go first. Defaults to
    /// 1,000 (`SSE_INBOX_MAX_PER_USER`).
    pub inbox_max_per_user: usize,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            max_clients_per_user: 5,
            cleanup_interval: Duration::from_secs(60),
            event_retention: Duration::from_secs(300),
            idempotency_window: Duration::from_secs(86_400),
            offline_retention: vec![
                (names::NOTIFICATION.into(), Duration::from_secs(24 * 3600)),
                (names::REEL_READY.into(), Duration::from_secs(24 * 3600)),
                (names::SYSTEM_ALERT.into(), Duration::from_secs(3600)),
                (names::REEL_UPLOAD_PROGRESS.into(), Duration::from_secs(300)),
            ],
            queue_capacity: 256,
            history_capacity: 100_000,
            history_max_bytes: 64 * 1024 * 1024,
            max_connections: default_max_connections(),
            cookie_secure: CookieSecure::Auto,
            max_payload_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            max_batch: 1_000,
            retry: Duration::from_millis(3_000),
            connect_rate_per_ip: 600,
            connect_rate_per_user: 120,
            jwt_secret: None,
            publish_key: None,
            accept_tokens_without_aud: false,
            allowed_origins: Vec::new(),
            trusted_proxies: TrustedProxies::default(),
            webhook_secrets: WebhookSecrets::default(),
            redis_url: None,
            redis_ca_cert: None,
            redis_cluster: false,
            redis_wait_replicas: 0,
            inbox_url: None,
            inbox_events: vec![names::NOTIFICATION.into(), names::REEL_READY.into()],
            inbox_retention: Duration::from_secs(90 * 24 * 3600),
            inbox_max_per_user: 1_000,
        }
    }
}

/// When a session cookie gets the `Secure` attribute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CookieSecure {
    /// When the request came over HTTPS (directly or, per `X-Forwarded-Proto`, via a proxy).
    #[default]
    Auto,
    Always,
    Never,
}

/// Long-lived responses one process may hold: its open-file limit (`ulimit -n`) minus 1,024
/// for everything else (requests, Redis, files), at least 64.
fn default_max_connections() -> usize {
    file_limit().saturating_sub(1_024).max(64)
}

/// This process's open-file limit (`ulimit -n`), 1,024 where it cannot be read.
pub(crate) fn file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        })
        .unwrap_or(1_024)
}

/// The `SSE_*` variables as they come (prefix stripped, names lower-cased by `envy`).
#[derive(Deserialize)]
struct SseVars {
    heartbeat_interval_ms: Option<u64>,
    max_clients_per_user: Option<usize>,
    cleanup_interval_ms: Option<u64>,
    event_retention_ms: Option<u64>,
    idempotency_window_ms: Option<u64>,
    offline_retention_ms: Option<String>,
    queue_capacity: Option<usize>,
    history_capacity: Option<usize>,
    history_max_bytes: Option<usize>,
    max_connections: Option<usize>,
    cookie_secure: Option<String>,
    max_payload_bytes: Option<usize>,
    max_body_bytes: Option<usize>,
    max_batch: Option<usize>,
    retry_ms: Option<u64>,
    connect_rate_per_ip: Option<u32>,
    connect_rate_per_user: Option<u32>,
    jwt_secret: Option<SecretString>,
    publish_key: Option<SecretString>,
    accept_tokens_without_aud: Option<String>,
    allowed_origins: Option<String>,
    trusted_proxies: Option<String>,
    webhook_secrets: Option<SecretString>,
    redis_ca_cert: Option<std::path::PathBuf>,
    redis_cluster: Option<String>,
    redis_wait_replicas: Option<usize>,
    inbox_url: Option<SecretString>,
    inbox_events: Option<String>,
    inbox_retention_days: Option<u64>,
    inbox_max_per_user: Option<usize>,
}

/// The Redis variables, which have no `SSE_` prefix.
#[derive(Deserialize)]
struct RedisVars {
    redis_url: Option<String>,
    upstash_redis_rest_url: Option<String>,
    upstash_redis_rest_token: Option<SecretString>,
}

/// An `envy` error as a [`ConfigError`]: its message names the variable, without the
/// prefix ("... provided by HEARTBEAT_INTERVAL_MS"), for a value that does not parse.
fn envy_error(e: envy::Error, prefix: &str) -> ConfigError {
    let message = e.to_string();
    let variable = message
        .rsplit_once(" provided by ")
        .map(|(_, var)| format!("{prefix}{var}"))
        .unwrap_or_else(|| format!("{prefix}*"));
    let problem = match message.split_once(" while parsing value") {
        Some((why, _)) => format!("expected a whole number ({why})"),
        None => message,
    };
    ConfigError { variable, problem }
}

impl SseConfig {
    /// How long events are kept, by type.
    pub fn retention(&self) -> Retention {
        Retention {
            default: self.event_retention,
            offline: self.offline_retention.clone(),
        }
    }

    /// Reads the configuration from the process environment (see the README's table).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the configuration from `(name, value)` pairs, as [`from_env`](Self::from_env)
    /// does from the environment. Unset and empty variables keep their defaults.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, ConfigError>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| (k, v.trim().to_string()))
            .collect();
        let sse: SseVars = envy::prefixed("SSE_")
            .from_iter(vars.iter().cloned())
            .map_err(|e| envy_error(e, "SSE_"))?;
        let redis: RedisVars = envy::from_iter(vars.iter().cloned()).map_err(|e| envy_error(e, ""))?;

        let mut config = Self::default();
        let positive_ms = |variable: &str, ms: Option<u64>, default: Duration| match ms {
            None => Ok(default),
            Some(0) => Err(ConfigError::new(variable, "expected milliseconds greater than 0")),
            Some(ms) => Ok(Duration::from_millis(ms)),
        };
        let positive = |variable: &str, n: Option<usize>, default: usize| match n {
            None => Ok(default),
            Some(0) => Err(ConfigError::new(
                variable,
                "expected a whole number greater than 0",
            )),
            Some(n) => Ok(n),
        };
        config.heartbeat_interval = positive_ms(
            "SSE_HEARTBEAT_INTERVAL_MS",
            sse.heartbeat_interval_ms,
            config.heartbeat_interval,
        )?;
        config.cleanup_interval = positive_ms(
            "SSE_CLEANUP_INTERVAL_MS",
            sse.cleanup_interval_ms,
            config.cleanup_interval,
        )?;
        config.idempotency_window = positive_ms(
            "SSE_IDEMPOTENCY_WINDOW_MS",
            sse.idempotency_window_ms,
            config.idempotency_window,
        )?;
        config.event_retention = positive_ms(
            "SSE_EVENT_RETENTION_MS",
            sse.event_retention_ms,
            config.event_retention,
        )?;
        config.retry = positive_ms("SSE_RETRY_MS", sse.retry_ms, config.retry)?;
        config.max_clients_per_user = positive(
            "SSE_MAX_CLIENTS_PER_USER",
            sse.max_clients_per_user,
            config.max_clients_per_user,
        )?;
        config.queue_capacity = positive("SSE_QUEUE_CAPACITY", sse.queue_capacity, config.queue_capacity)?;
        config.history_capacity = positive(
            "SSE_HISTORY_CAPACITY",
            sse.history_capacity,
            config.history_capacity,
        )?;
        config.history_max_bytes = positive(
            "SSE_HISTORY_MAX_BYTES",
            sse.history_max_bytes,
            config.history_max_bytes,
        )?;
        config.max_connections =
            positive("SSE_MAX_CONNECTIONS", sse.max_connections, config.max_connections)?;
        if let Some(value) = sse.cookie_secure {
            config.cookie_secure = match value.to_ascii_lowercase().as_str() {
                "auto" => CookieSecure::Auto,
                "always" | "true" | "1" => CookieSecure::Always,
                "never" | "false" | "0" => CookieSecure::Never,
                _ => {
                    return Err(ConfigError::new(
                        "SSE_COOKIE_SECURE",
                        "expected auto, always or never",
                    ))
                }
            };
        }
        config.max_payload_bytes = positive(
            "SSE_MAX_PAYLOAD_BYTES",
            sse.max_payload_bytes,
            config.max_payload_bytes,
        )?;
        config.max_body_bytes = positive("SSE_MAX_BODY_BYTES", sse.max_body_bytes, config.max_body_bytes)?;
        config.max_batch = positive("SSE_MAX_BATCH", sse.max_batch, config.max_batch)?;
        config.connect_rate_per_ip = sse.connect_rate_per_ip.unwrap_or(config.connect_rate_per_ip);
        config.connect_rate_per_user = sse.connect_rate_per_user.unwrap_or(config.connect_rate_per_user);
        if let Some(list) = sse.offline_retention_ms {
            merge_offline_retention(&mut config.offline_retention, &list)?;
        }
        config.jwt_secret = sse.jwt_secret;
        config.publish_key = sse.publish_key;
        config.accept_tokens_without_aud = flag(
            "SSE_ACCEPT_TOKENS_WITHOUT_AUD",
            sse.accept_tokens_without_aud.as_deref(),
        )?;
        if let Some(origins) = sse.allowed_origins {
            config.allowed_origins = parse_origins(&origins)?;
        }
        if let Some(proxies) = sse.trusted_proxies {
            config.trusted_proxies =
                TrustedProxies::parse(&proxies).map_err(|e| ConfigError::new("SSE_TRUSTED_PROXIES", e))?;
        }
        if let Some(secrets) = sse.webhook_secrets {
            use secrecy::ExposeSecret;
            config.webhook_secrets = WebhookSecrets::parse(secrets.expose_secret())
                .map_err(|e| ConfigError::new("SSE_WEBHOOK_SECRETS", e))?;
        }
        config.redis_ca_cert = sse.redis_ca_cert;
        config.redis_cluster = flag("SSE_REDIS_CLUSTER", sse.redis_cluster.as_deref())?;
        let is_redis_url = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
        config.redis_url = match redis.redis_url {
            Some(url) if config.redis_cluster && url.split(',').all(|u| is_redis_url(u.trim())) => {
                Some(url.into())
            }
            Some(_) if config.redis_cluster => {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "expected the cluster's nodes as redis:// or rediss:// URLs separated by commas",
                ))
            }
            Some(url) if is_redis_url(&url) && !url.contains(',') => Some(url.into()),
            Some(url) if url.contains(',') => {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "several URLs name a Redis Cluster's nodes: set SSE_REDIS_CLUSTER=1 as well",
                ))
            }
            Some(_) => {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "expected a redis:// or rediss:// URL",
                ))
            }
            None if config.redis_cluster => {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    "SSE_REDIS_CLUSTER=1 needs the cluster's nodes in REDIS_URL",
                ))
            }
            None => upstash_url(redis.upstash_redis_rest_url, redis.upstash_redis_rest_token)?,
        };
        config.redis_wait_replicas = sse.redis_wait_replicas.unwrap_or(0);
        match (
            config.redis_wait_replicas,
            config.redis_cluster,
            &config.redis_url,
        ) {
            (0, _, _) => {}
            (_, true, _) => {
                return Err(ConfigError::new(
                    "SSE_REDIS_WAIT_REPLICAS",
                    "a Redis Cluster waits for a replica of each shard by itself: leave it unset",
                ))
            }
            (_, false, None) => {
                return Err(ConfigError::new(
                    "SSE_REDIS_WAIT_REPLICAS",
                    "needs REDIS_URL: the in-process broker has no replicas",
                ))
            }
            _ => {}
        }
        if config.redis_cluster && config.redis_ca_cert.is_some() {
            return Err(ConfigError::new(
                "SSE_REDIS_CA_CERT",
                "not supported on a Redis Cluster yet: use a server certificate of a public CA",
            ));
        }
        if let Some(url) = sse.inbox_url {
            use secrecy::ExposeSecret;
            let text = url.expose_secret();
            if !(text.starts_with("sqlite:")
                || text.starts_with("postgres://")
                || text.starts_with("postgresql://"))
            {
                return Err(ConfigError::new(
                    "SSE_INBOX_URL",
                    "expected sqlite://<file> or postgres://user:password@host/database",
                ));
            }
            config.inbox_url = Some(url);
        }
        if let Some(list) = sse.inbox_events {
            let mut kept = Vec::new();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if crate::events::validate_event_name(name).is_err() || names::RESERVED.contains(&name) {
                    return Err(ConfigError::new(
                        "SSE_INBOX_EVENTS",
                        format!("{name:?} is not an event name publishers can use"),
                    ));
                }
                kept.push(name.to_string());
            }
            config.inbox_events = kept;
        }
        if let Some(days) = sse.inbox_retention_days {
            if days == 0 {
                return Err(ConfigError::new(
                    "SSE_INBOX_RETENTION_DAYS",
                    "expected at least 1 day",
                ));
            }
            config.inbox_retention = Duration::from_secs(days.saturating_mul(24 * 3600));
        }
        config.inbox_max_per_user = positive(
            "SSE_INBOX_MAX_PER_USER",
            sse.inbox_max_per_user,
            config.inbox_max_per_user,
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what no single value shows: the secrets' lengths, and that the publish key
    /// is not the JWT secret. [`from_vars`](Self::from_vars) and the service's start call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use secrecy::ExposeSecret;
        let secret = self.jwt_secret.as_ref().map(|s| s.expose_secret().as_bytes());
        let key = self.publish_key.as_ref().map(|k| k.expose_secret().as_bytes());
        if secret.is_some_and(|s| s.len() < 16) {
            return Err(ConfigError::new(
                "SSE_JWT_SECRET",
                "expected a secret of at least 16 bytes",
            ));
        }
        if key.is_some_and(|k| k.len() < 16) {
            return Err(ConfigError::new(
                "SSE_PUBLISH_KEY",
                "expected a key of at least 16 bytes (e.g. `openssl rand -hex 32`)",
            ));
        }
        if key.is_some() && key == secret {
            return Err(ConfigError::new(
                "SSE_PUBLISH_KEY",
                "must differ from SSE_JWT_SECRET: whoever holds the publish key could sign sessions as any user",
            ));
        }
        Ok(())
    }
}

/// A switch: `1`/`true` or `0`/`false` (unset is off).
fn flag(variable: &str, value: Option<&str>) -> Result<bool, ConfigError> {
    match value.map(str::trim) {
        None | Some("" | "0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(_) => Err(ConfigError::new(variable, "expected 1 or 0")),
    }
}

/// Merges `name=ms,name=ms` over the defaults; `name=0` turns one type off.
fn merge_offline_retention(retention: &mut Vec<(String, Duration)>, list: &str) -> Result<(), ConfigError> {
    for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = pair.split_once('=').and_then(|(name, ms)| {
            crate::events::validate_event_name(name.trim()).ok()?;
            Some((
                name.trim().to_string(),
                Duration::from_millis(ms.trim().parse().ok()?),
            ))
        });
        let Some((name, duration)) = parsed else {
            return Err(ConfigError::new(
                "SSE_OFFLINE_RETENTION_MS",
                format!(
                    "{pair:?}: expected event=milliseconds pairs, e.g. notification=86400000,system_alert=0"
                ),
            ));
        };
        retention.retain(|(n, _)| *n != name);
        retention.push((name, duration));
    }
    Ok(())
}

fn parse_origins(list: &str) -> Result<Vec<String>, ConfigError> {
    let origins: Vec<String> = list
        .split(',')
        .map(|o| o.trim().trim_end_matches('/').to_string())
        .filter(|o| !o.is_empty())
        .collect();
    match origins
        .iter()
        .find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
    {
        Some(bad) => Err(ConfigError::new(
            "SSE_ALLOWED_ORIGINS",
            format!("{bad:?}: expected comma-separated origins such as https://app.example.com"),
        )),
        None => Ok(origins),
    }
}

/// The original design's Upstash REST variables. The REST token is not the database's
/// Redis password, so they cannot become a working `rediss://` URL: when they are set
/// without `REDIS_URL`, the server stops at start and says exactly what to set instead.
fn upstash_url(
    rest_url: Option<String>,
    token: Option<SecretString>,
) -> Result<Option<SecretString>, ConfigError> {
    let Some(rest_url) = rest_url else {
        return match token {
            None => Ok(None),
            Some(_) => Err(ConfigError::new(
                "UPSTASH_REDIS_REST_TOKEN",
                "the REST API is not used: set REDIS_URL=rediss://default:<password>@<host>:6379 instead",
            )),
        };
    };
    let host = rest_url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .filter(|h| !h.is_empty() && !h.contains('@'))
        .unwrap_or("<host>");
    Err(ConfigError::new(
        "UPSTASH_REDIS_REST_URL",
        format!(
            "the REST token is not the Redis password, so these variables cannot be used as they are: \
             set REDIS_URL=rediss://default:<password>@{host}:6379 (the password is on the database's page of the \
             Upstash console)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn from(pairs: &[(&str, &str)]) -> Result<SseConfig, ConfigError> {
        SseConfig::from_vars(pairs.iter().copied())
    }

    /// A short publish key, or one equal to the JWT secret (its holder could mint tokens),
    /// stops the start with the variable named; so does a short secret.
    #[test]
    fn publish_keys_are_long_and_not_the_jwt_secret() {
        let same = "the-same-long-secret-0123";
        let err = from(&[("SSE_JWT_SECRET", same), ("SSE_PUBLISH_KEY", same)]).unwrap_err();
        assert_eq!(err.variable, "SSE_PUBLISH_KEY");
        assert!(!err.to_string().contains(same), "{err}");
        let err = from(&[("SSE_PUBLISH_KEY", "fifteen-bytes-k")]).unwrap_err();
        assert_eq!(err.variable, "SSE_PUBLISH_KEY");
        assert!(from(&[("SSE_PUBLISH_KEY", "sixteen-bytes-ke")]).is_ok());
        let err = from(&[("SSE_JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(err.variable, "SSE_JWT_SECRET");
        // The builder's configuration is checked the same way (the service's start calls it).
        let built = SseConfig::default().jwt_secret(same).publish_key(same);
        assert_eq!(built.validate().unwrap_err().variable, "SSE_PUBLISH_KEY");
        assert!(
            from(&[("SSE_ACCEPT_TOKENS_WITHOUT_AUD", "1")])
                .unwrap()
                .accept_tokens_without_aud
        );
        assert_eq!(
            from(&[("SSE_ACCEPT_TOKENS_WITHOUT_AUD", "yes")])
                .unwrap_err()
                .variable,
            "SSE_ACCEPT_TOKENS_WITHOUT_AUD"
        );
    }

    #[test]
    fn defaults_match_the_design() {
        let c = from(&[]).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.max_clients_per_user, 5);
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.event_retention, Duration::from_secs(300));
        assert!(c.redis_url.is_none());
        assert_eq!(format!("{c:?}"), format!("{:?}", SseConfig::default()));
    }

    #[test]
    fn env_overrides_apply() {
        let c = from(&[
            ("SSE_HEARTBEAT_INTERVAL_MS", "1500"),
            ("SSE_MAX_CLIENTS_PER_USER", " 2 "),
            ("SSE_ALLOWED_ORIGINS", "https://a.example, http://localhost:8080/"),
            ("SSE_CONNECT_RATE_PER_IP", "0"),
            ("SSE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7"),
            ("SSE_QUEUE_CAPACITY", ""),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("UNRELATED", "x"),
        ])
        .unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(1500));
        assert_eq!(c.max_clients_per_user, 2);
        assert_eq!(c.queue_capacity, 256, "empty keeps the default");
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "http://localhost:8080"]
        );
        assert_eq!(c.connect_rate_per_ip, 0);
        assert!(c.trusted_proxies.contains("10.9.9.9".parse().unwrap()));
        assert!(!c.trusted_proxies.contains("192.168.1.8".parse().unwrap()));
        assert_eq!(
            c.redis_url
                .as_ref()
                .map(|u| u.expose_secret().to_string())
                .as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        let c = from(&[("SSE_OFFLINE_RETENTION_MS", "system_alert=0, order.shipped=60000")]).unwrap();
        let r = c.retention();
        assert_eq!(r.offline_for("system_alert"), None);
        assert_eq!(r.offline_for("order.shipped"), Some(Duration::from_secs(60)));
        assert_eq!(r.offline_for("notification"), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("SSE_HEARTBEAT_INTERVAL_MS", "0"),
            ("SSE_HEARTBEAT_INTERVAL_MS", "-5"),
            ("SSE_MAX_CLIENTS_PER_USER", "many"),
            ("SSE_MAX_CLIENTS_PER_USER", "0"),
            ("SSE_EVENT_RETENTION_MS", "1.5"),
            ("SSE_IDEMPOTENCY_WINDOW_MS", "0"),
            ("SSE_CONNECT_RATE_PER_IP", "99999999999"),
            ("SSE_JWT_SECRET", "short"),
            ("SSE_ALLOWED_ORIGINS", "example.com"),
            ("SSE_TRUSTED_PROXIES", "10.0.0.0/40"),
            ("SSE_TRUSTED_PROXIES", "proxy.internal"),
            ("REDIS_URL", "http://localhost"),
            ("SSE_OFFLINE_RETENTION_MS", "notification"),
            ("SSE_OFFLINE_RETENTION_MS", "Bad Name=5"),
            ("SSE_MAX_CONNECTIONS", "0"),
            ("SSE_HISTORY_MAX_BYTES", "lots"),
            ("SSE_COOKIE_SECURE", "sometimes"),
        ] {
            let err = from(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{err}");
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    #[test]
    fn a_redis_cluster_is_named_by_the_flag_and_a_list_of_seeds() {
        let seeds = "redis://127.0.0.1:7000, rediss://10.0.0.2:7001";
        let c = from(&[("SSE_REDIS_CLUSTER", "1"), ("REDIS_URL", seeds)]).unwrap();
        assert!(c.redis_cluster);
        let url = c.redis_url.as_ref().map(|u| u.expose_secret().to_string());
        assert_eq!(url.as_deref(), Some(seeds));
        let one_seed = from(&[("SSE_REDIS_CLUSTER", "true"), ("REDIS_URL", "redis://n1:7000")]).unwrap();
        assert!(one_seed.redis_cluster, "one seed is enough to find the others");
        let off = from(&[("SSE_REDIS_CLUSTER", "0"), ("REDIS_URL", "redis://n1:6379")]).unwrap();
        assert!(!off.redis_cluster);

        for (vars, variable, says) in [
            (
                &[("REDIS_URL", "redis://n1:7000,redis://n2:7000")][..],
                "REDIS_URL",
                "set SSE_REDIS_CLUSTER=1",
            ),
            (
                &[("SSE_REDIS_CLUSTER", "1")][..],
                "REDIS_URL",
                "needs the cluster's nodes",
            ),
            (
                &[
                    ("SSE_REDIS_CLUSTER", "1"),
                    ("REDIS_URL", "redis://n1:7000,,redis://n2:7000"),
                ][..],
                "REDIS_URL",
                "separated by commas",
            ),
            (
                &[
                    ("SSE_REDIS_CLUSTER", "1"),
                    ("REDIS_URL", "redis://n1:7000,http://n2"),
                ][..],
                "REDIS_URL",
                "separated by commas",
            ),
            (
                &[("SSE_REDIS_CLUSTER", "yes please")][..],
                "SSE_REDIS_CLUSTER",
                "expected 1 or 0",
            ),
            (
                &[
                    ("SSE_REDIS_CLUSTER", "1"),
                    ("REDIS_URL", "rediss://n1:7000"),
                    ("SSE_REDIS_CA_CERT", "/etc/ca.pem"),
                ][..],
                "SSE_REDIS_CA_CERT",
                "not supported on a Redis Cluster",
            ),
        ] {
            let err = from(vars).unwrap_err();
            assert_eq!(err.variable, variable, "{vars:?}: {err}");
            assert!(err.to_string().contains(says), "{vars:?}: {err}");
        }
    }

    #[test]
    fn upstash_variables_stop_the_start_with_what_to_set() {
        let err = from(&[
            ("UPSTASH_REDIS_REST_URL", "https://eu1-fine-cat-123.upstash.io"),
            ("UPSTASH_REDIS_REST_TOKEN", "tok-not-a-password"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "UPSTASH_REDIS_REST_URL");
        let message = err.to_string();
        assert!(
            message.contains("set REDIS_URL=rediss://default:<password>@eu1-fine-cat-123.upstash.io:6379"),
            "{message}"
        );
        assert!(!message.contains("tok-not-a-password"), "{message}");
        let err = from(&[("UPSTASH_REDIS_REST_TOKEN", "t")]).unwrap_err();
        assert_eq!(err.variable, "UPSTASH_REDIS_REST_TOKEN");
        assert!(err.to_string().contains("REDIS_URL=rediss://"), "{err}");
        // REDIS_URL wins over the Upstash pair.
        let c = from(&[
            ("REDIS_URL", "redis://r:1"),
            ("UPSTASH_REDIS_REST_URL", "https://x.upstash.io"),
        ])
        .unwrap();
        assert_eq!(c.redis_url.unwrap().expose_secret(), "redis://r:1");
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = from(&[
            ("SSE_JWT_SECRET", "super-secret-value-123"),
            ("SSE_PUBLISH_KEY", "publish-key-xyz-0123"),
            ("REDIS_URL", "redis://:hunter2@r:1"),
        ])
        .unwrap();
        let printed = format!("{c:?}");
        for secret in ["super-secret", "publish-key-xyz", "hunter2"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        let err = from(&[("SSE_JWT_SECRET", "short-secret")]).unwrap_err();
        assert!(!err.to_string().contains("short-secret"), "{err}");
    }
}
