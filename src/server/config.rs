//! [`SseConfig`]: every tunable of the server, with defaults, `SSE_*` environment overrides
//! and a start-up error that names the variable when a value is bad.
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
//! let err = SseConfig::from_lookup(|k| (k == "SSE_MAX_CLIENTS_PER_USER").then(|| "lots".to_string()))
//!     .unwrap_err();
//! assert!(err.to_string().contains("SSE_MAX_CLIENTS_PER_USER"));
//! ```

use std::time::Duration;

/// A configuration value that could not be used. The server refuses to start with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is not valid: expected {expected}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// Tunables of the SSE server. Build with [`SseConfig::default`] and the setters, or read
/// them from the environment with [`SseConfig::from_env`].
#[derive(Clone, PartialEq, Eq)]
pub struct SseConfig {
    /// How often every connection gets a `heartbeat` event. Defaults to 30 s (`SSE_HEARTBEAT_INTERVAL_MS`).
    pub heartbeat_interval: Duration,
    /// Connections one user may hold; one more replaces the oldest. Defaults to 5 (`SSE_MAX_CLIENTS_PER_USER`).
    pub max_clients_per_user: usize,
    /// How often dead connections and expired history are swept. Defaults to 60 s (`SSE_CLEANUP_INTERVAL_MS`).
    pub cleanup_interval: Duration,
    /// How long events stay replayable by `Last-Event-ID`. Defaults to 5 min (`SSE_EVENT_RETENTION_MS`).
    pub event_retention: Duration,
    /// Event types delivered to users who were offline when they were sent, and how long
    /// they wait; 0 turns one off. Defaults to `notification` and `reel_ready` 24 h,
    /// `system_alert` 1 h, `reel_upload_progress` 5 min (`SSE_OFFLINE_RETENTION_MS`, as
    /// `name=ms,name=ms`, merged over the defaults).
    pub offline_retention: Vec<(String, Duration)>,
    /// Events waiting for one connection before it counts as too slow and is closed.
    /// Defaults to 256 (`SSE_QUEUE_CAPACITY`).
    pub queue_capacity: usize,
    /// Most events the in-process broker keeps for replay, whatever their age, so memory stays
    /// bounded under a flood. Defaults to 100,000 (`SSE_HISTORY_CAPACITY`).
    pub history_capacity: usize,
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
    pub jwt_secret: Option<String>,
    /// Bearer key of `POST /api/events`; `None` disables that route (`SSE_PUBLISH_KEY`).
    pub publish_key: Option<String>,
    /// Origins allowed by CORS; empty means same origin only (`SSE_ALLOWED_ORIGINS`, comma-separated).
    pub allowed_origins: Vec<String>,
    /// Shared Redis for several instances; `None` runs on the in-process broker (`REDIS_URL`).
    pub redis_url: Option<String>,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            max_clients_per_user: 5,
            cleanup_interval: Duration::from_secs(60),
            event_retention: Duration::from_secs(300),
            offline_retention: vec![
                ("notification".into(), Duration::from_secs(24 * 3600)),
                ("reel_ready".into(), Duration::from_secs(24 * 3600)),
                ("system_alert".into(), Duration::from_secs(3600)),
                ("reel_upload_progress".into(), Duration::from_secs(300)),
            ],
            queue_capacity: 256,
            history_capacity: 100_000,
            max_payload_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            max_batch: 1_000,
            retry: Duration::from_millis(3_000),
            connect_rate_per_ip: 600,
            connect_rate_per_user: 120,
            jwt_secret: None,
            publish_key: None,
            allowed_origins: Vec::new(),
            redis_url: None,
        }
    }
}

impl std::fmt::Debug for SseConfig {
    /// Like a derived `Debug`, but never prints the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<set>");
        f.debug_struct("SseConfig")
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("max_clients_per_user", &self.max_clients_per_user)
            .field("cleanup_interval", &self.cleanup_interval)
            .field("event_retention", &self.event_retention)
            .field("offline_retention", &self.offline_retention)
            .field("queue_capacity", &self.queue_capacity)
            .field("history_capacity", &self.history_capacity)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_batch", &self.max_batch)
            .field("retry", &self.retry)
            .field("connect_rate_per_ip", &self.connect_rate_per_ip)
            .field("connect_rate_per_user", &self.connect_rate_per_user)
            .field("jwt_secret", &redact(&self.jwt_secret))
            .field("publish_key", &redact(&self.publish_key))
            .field("allowed_origins", &self.allowed_origins)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .finish()
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        #[must_use]
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl SseConfig {
    setter!(/// Sets [`SseConfig::heartbeat_interval`].
        heartbeat_interval: Duration);
    setter!(/// Sets [`SseConfig::max_clients_per_user`].
        max_clients_per_user: usize);
    setter!(/// Sets [`SseConfig::cleanup_interval`].
        cleanup_interval: Duration);
    setter!(/// Sets [`SseConfig::event_retention`].
        event_retention: Duration);
    setter!(/// Sets [`SseConfig::offline_retention`].
        offline_retention: Vec<(String, Duration)>);
    setter!(/// Sets [`SseConfig::queue_capacity`].
        queue_capacity: usize);
    setter!(/// Sets [`SseConfig::history_capacity`].
        history_capacity: usize);
    setter!(/// Sets [`SseConfig::max_payload_bytes`].
        max_payload_bytes: usize);
    setter!(/// Sets [`SseConfig::max_body_bytes`].
        max_body_bytes: usize);
    setter!(/// Sets [`SseConfig::max_batch`].
        max_batch: usize);
    setter!(/// Sets [`SseConfig::retry`].
        retry: Duration);
    setter!(/// Sets [`SseConfig::connect_rate_per_ip`].
        connect_rate_per_ip: u32);
    setter!(/// Sets [`SseConfig::connect_rate_per_user`].
        connect_rate_per_user: u32);
    setter!(/// Sets [`SseConfig::jwt_secret`].
        jwt_secret: Option<String>);
    setter!(/// Sets [`SseConfig::publish_key`].
        publish_key: Option<String>);
    setter!(/// Sets [`SseConfig::allowed_origins`].
        allowed_origins: Vec<String>);
    setter!(/// Sets [`SseConfig::redis_url`].
        redis_url: Option<String>);

    /// How long events are kept, by type.
    pub fn retention(&self) -> crate::server::broker::Retention {
        crate::server::broker::Retention {
            default: self.event_retention,
            offline: self.offline_retention.clone(),
        }
    }

    /// Reads the configuration from the process environment (see the README's table).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads the configuration through `lookup`, which maps a variable name to its value.
    /// Unset and empty variables keep their defaults.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |key: &str| lookup(key).filter(|v| !v.trim().is_empty());
        let mut config = Self::default();
        let millis = |variable: &'static str, default: Duration| -> Result<Duration, ConfigError> {
            match get(variable) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
                    _ => Err(ConfigError {
                        variable,
                        value: v,
                        expected: "a whole number of milliseconds greater than 0",
                    }),
                },
            }
        };
        let count = |variable: &'static str, default: usize, min: usize| -> Result<usize, ConfigError> {
            match get(variable) {
                None => Ok(default),
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => Err(ConfigError {
                        variable,
                        value: v,
                        expected: if min == 0 {
                            "a whole number (0 or more)"
                        } else {
                            "a whole number greater than 0"
                        },
                    }),
                },
            }
        };
        config.heartbeat_interval = millis("SSE_HEARTBEAT_INTERVAL_MS", config.heartbeat_interval)?;
        config.cleanup_interval = millis("SSE_CLEANUP_INTERVAL_MS", config.cleanup_interval)?;
        config.event_retention = millis("SSE_EVENT_RETENTION_MS", config.event_retention)?;
        config.retry = millis("SSE_RETRY_MS", config.retry)?;
        config.max_clients_per_user = count("SSE_MAX_CLIENTS_PER_USER", config.max_clients_per_user, 1)?;
        config.queue_capacity = count("SSE_QUEUE_CAPACITY", config.queue_capacity, 1)?;
        config.history_capacity = count("SSE_HISTORY_CAPACITY", config.history_capacity, 1)?;
        config.max_payload_bytes = count("SSE_MAX_PAYLOAD_BYTES", config.max_payload_bytes, 1)?;
        config.max_body_bytes = count("SSE_MAX_BODY_BYTES", config.max_body_bytes, 1)?;
        config.max_batch = count("SSE_MAX_BATCH", config.max_batch, 1)?;
        let rate = |variable: &'static str, default: u32| -> Result<u32, ConfigError> {
            let n = count(variable, default as usize, 0)?;
            u32::try_from(n).map_err(|_| ConfigError {
                variable,
                value: n.to_string(),
                expected: "a number of connections per minute below 2^32",
            })
        };
        config.connect_rate_per_ip = rate("SSE_CONNECT_RATE_PER_IP", config.connect_rate_per_ip)?;
        config.connect_rate_per_user = rate("SSE_CONNECT_RATE_PER_USER", config.connect_rate_per_user)?;

        if let Some(list) = get("SSE_OFFLINE_RETENTION_MS") {
            for pair in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let parsed = pair.split_once('=').and_then(|(name, ms)| {
                    crate::events::validate_event_name(name.trim()).ok()?;
                    Some((
                        name.trim().to_string(),
                        Duration::from_millis(ms.trim().parse().ok()?),
                    ))
                });
                let Some((name, duration)) = parsed else {
                    return Err(ConfigError {
                        variable: "SSE_OFFLINE_RETENTION_MS",
                        value: pair.to_string(),
                        expected: "event=milliseconds pairs, e.g. notification=86400000,system_alert=0",
                    });
                };
                config.offline_retention.retain(|(n, _)| *n != name);
                config.offline_retention.push((name, duration));
            }
        }
        config.jwt_secret = get("SSE_JWT_SECRET");
        if let Some(secret) = &config.jwt_secret {
            if secret.len() < 16 {
                return Err(ConfigError {
                    variable: "SSE_JWT_SECRET",
                    value: "<hidden>".into(),
                    expected: "a secret of at least 16 bytes",
                });
            }
        }
        config.publish_key = get("SSE_PUBLISH_KEY");
        if let Some(origins) = get("SSE_ALLOWED_ORIGINS") {
            config.allowed_origins = origins
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect();
            if let Some(bad) = config
                .allowed_origins
                .iter()
                .find(|o| !(o.starts_with("http://") || o.starts_with("https://")))
            {
                return Err(ConfigError {
                    variable: "SSE_ALLOWED_ORIGINS",
                    value: bad.clone(),
                    expected: "comma-separated origins such as https://app.example.com",
                });
            }
        }
        config.redis_url = match get("REDIS_URL") {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => Some(url),
            Some(url) => {
                return Err(ConfigError {
                    variable: "REDIS_URL",
                    value: url,
                    expected: "a redis:// or rediss:// URL",
                })
            }
            None => upstash_url(get("UPSTASH_REDIS_REST_URL"), get("UPSTASH_REDIS_REST_TOKEN"))?,
        };
        Ok(config)
    }
}

/// Turns the original design's Upstash REST variables into a `rediss://` URL of the same database.
fn upstash_url(rest_url: Option<String>, token: Option<String>) -> Result<Option<String>, ConfigError> {
    match (rest_url, token) {
        (None, None) => Ok(None),
        (Some(url), Some(token)) => {
            let host = url
                .trim()
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            if host.is_empty() || host.contains('/') || host.contains('@') {
                return Err(ConfigError {
                    variable: "UPSTASH_REDIS_REST_URL",
                    value: url,
                    expected: "https://<host> of an Upstash database",
                });
            }
            let host = host.split(':').next().unwrap_or(host);
            Ok(Some(format!("rediss://default:{token}@{host}:6379")))
        }
        (Some(_), None) => Err(ConfigError {
            variable: "UPSTASH_REDIS_REST_TOKEN",
            value: String::new(),
            expected: "to be set together with UPSTASH_REDIS_REST_URL",
        }),
        (None, Some(_)) => Err(ConfigError {
            variable: "UPSTASH_REDIS_REST_URL",
            value: String::new(),
            expected: "to be set together with UPSTASH_REDIS_REST_TOKEN",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<SseConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SseConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_design() {
        let c = from(&[]).unwrap();
        assert_eq!(c, SseConfig::default());
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.max_clients_per_user, 5);
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.event_retention, Duration::from_secs(300));
        assert_eq!(c.redis_url, None);
    }

    #[test]
    fn env_overrides_apply() {
        let c = from(&[
            ("SSE_HEARTBEAT_INTERVAL_MS", "1500"),
            ("SSE_MAX_CLIENTS_PER_USER", "2"),
            ("SSE_ALLOWED_ORIGINS", "https://a.example, http://localhost:8080/"),
            ("SSE_CONNECT_RATE_PER_IP", "0"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
        ])
        .unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(1500));
        assert_eq!(c.max_clients_per_user, 2);
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example", "http://localhost:8080"]
        );
        assert_eq!(c.connect_rate_per_ip, 0);
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
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
            ("SSE_EVENT_RETENTION_MS", "1.5"),
            ("SSE_JWT_SECRET", "short"),
            ("SSE_ALLOWED_ORIGINS", "example.com"),
            ("REDIS_URL", "http://localhost"),
            ("SSE_OFFLINE_RETENTION_MS", "notification"),
            ("SSE_OFFLINE_RETENTION_MS", "Bad Name=5"),
        ] {
            let err = from(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{err}");
        }
    }

    #[test]
    fn upstash_variables_become_a_tls_url() {
        let c = from(&[
            ("UPSTASH_REDIS_REST_URL", "https://eu1-fine-cat-123.upstash.io"),
            ("UPSTASH_REDIS_REST_TOKEN", "tok"),
        ])
        .unwrap();
        assert_eq!(
            c.redis_url.as_deref(),
            Some("rediss://default:tok@eu1-fine-cat-123.upstash.io:6379")
        );
        let err = from(&[("UPSTASH_REDIS_REST_URL", "https://x.upstash.io")]).unwrap_err();
        assert_eq!(err.variable, "UPSTASH_REDIS_REST_TOKEN");
        // REDIS_URL wins over the Upstash pair.
        let c = from(&[
            ("REDIS_URL", "redis://r:1"),
            ("UPSTASH_REDIS_REST_URL", "https://x.upstash.io"),
        ])
        .unwrap();
        assert_eq!(c.redis_url.as_deref(), Some("redis://r:1"));
    }

    #[test]
    fn secrets_are_not_printed() {
        let c = SseConfig::default()
            .jwt_secret(Some("super-secret-value-123".into()))
            .publish_key(Some("publish-key-xyz".into()));
        let printed = format!("{c:?}");
        assert!(!printed.contains("super-secret") && !printed.contains("publish-key-xyz"));
    }
}
