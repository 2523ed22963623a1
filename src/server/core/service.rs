//! [`SseService`]: the server API that handlers, webhooks and background jobs call.
//!
//! It is a cheap-to-clone handle. Put it in your Axum state (the [`Routes`](crate::server::Routes)
//! do) and in the Leptos context, so `#[server]` functions reach it with
//! `expect_context::<SseService>()`.
//!
//! # From a webhook handler
//!
//! ```no_run
//! use axum::{extract::State, http::StatusCode, Json};
//! use sse_notify::{events::{ReelReady}, server::SseService};
//!
//! #[derive(serde::Deserialize)]
//! struct TranscodeDone { user_id: String, reel_id: String, url: String }
//!
//! async fn transcoder_webhook(State(sse): State<SseService>, Json(hook): Json<TranscodeDone>) -> StatusCode {
//!     let ready = ReelReady { reel_id: hook.reel_id, playback_url: hook.url, thumbnail_url: None, duration: None };
//!     match sse.send_reel_ready(&hook.user_id, ready).await {
//!         Ok(_) => StatusCode::NO_CONTENT,
//!         // Redis down or bad input: tell the webhook sender so it retries.
//!         Err(_) => StatusCode::SERVICE_UNAVAILABLE,
//!     }
//! }
//! ```
//!
//! # From a background job
//!
//! ```no_run
//! use sse_notify::{events::{ReelUploadProgress, UploadStatus}, server::SseService};
//!
//! async fn transcode(sse: SseService, user_id: String, reel_id: String) {
//!     for progress in (0..=100).step_by(10) {
//!         let update = ReelUploadProgress {
//!             reel_id: reel_id.clone(),
//!             progress,
//!             status: if progress < 100 { UploadStatus::Processing } else { UploadStatus::Ready },
//!             message: None,
//!         };
//!         if let Err(e) = sse.send_reel_upload_progress(&user_id, update).await {
//!             tracing::warn!("progress not sent: {e}");
//!         }
//!     }
//! }
//! ```

use std::{
    collections::VecDeque,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::BytesMut;
use governor::{clock::Clock, DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_stream::{wrappers::IntervalStream, StreamExt};

use super::{
    connection::{Closer, ConnectionPermit, EventStream, StreamEnded},
    hub::Hub,
    idempotency::check_idempotency_key,
    inbox::{with_ids, Inbox, UserInbox},
    mailbox::CloseReason,
    presence::{self, ClusterStats, InstanceFigures, Presence, PresenceBook, StatsReport},
    replay::{write_frames, ReplayRest, ReplaySelection, REPLAY_PAGE},
};
use crate::{
    api::{self, BrokerHealth, Stats},
    events::{
        names, Event, Notification, ReelReady, ReelUploadProgress, SystemAlert, UserUpdate, ValidationError,
    },
    server::{
        address::address_key,
        auth::{self, Auth, Authenticate, Identity},
        broker::{
            Broker, BrokerError, ClusterBroker, ClusterOptions, Delivery, EventSink, MemoryBroker,
            RedisBroker, RedisOptions, Retention,
        },
        clock::now_ms,
        config::{ConfigError, SseConfig},
        event::{encode_frame, Cursor, Envelope, EventId, PublishedEvent, Target},
        inbox::{InboxError, InboxStore, NewItem, SqlInbox},
        metrics as m,
    },
};

/// Why an event was not sent. The caller always hears about it: nothing is dropped silently.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The event or user id is not acceptable; `field` names what to fix.
    #[error("invalid event: {0}")]
    Invalid(#[from] ValidationError),
    /// The broker could not take it (e.g. Redis unreachable); try again later.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The service is shutting down.
    #[error("the notification service is shutting down")]
    ShuttingDown,
    /// The events were published, but the inbox could not keep those of a kept type, so the
    /// publish is not acknowledged: open streams may have shown them; retry later.
    #[error("published, but not kept in the inbox: {0}")]
    Inbox(#[from] InboxError),
    /// The idempotency key was first used for other events: nothing was published.
    #[error("this idempotency key was used with another body")]
    KeyReused,
    /// A publish with this idempotency key has not finished yet; retry shortly.
    #[error("a publish with this idempotency key is still in progress; retry shortly")]
    KeyInProgress,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A configuration no single setting shows to be wrong (see [`SseConfig::validate`]).
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not connect to Redis: {0}")]
    Redis(String),
    #[error("could not open the inbox store (SSE_INBOX_URL): {0}")]
    Inbox(String),
}

/// Where a new stream starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Resume {
    /// From now; on the user's first connection here, also what waited for them while
    /// they were offline.
    #[default]
    Now,
    /// After this position: the client's `Last-Event-ID`.
    After(Cursor),
    /// From this long ago (at most [`MAX_RESUME_AGO`]): a client without an id whose
    /// earlier stream may have carried events that never reached it, e.g. one a proxy
    /// held back. On the user's first connection here, also what waited while offline.
    Ago(Duration),
}

/// The furthest back [`Resume::Ago`] reaches.
pub const MAX_RESUME_AGO: Duration = Duration::from_secs(60);

/// Why a stream could not be opened. Nothing is lost: the client retries with its id.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the server is shutting down; reconnect shortly")]
    ShuttingDown,
    #[error("the server holds as many connections as it may ({0}); retry shortly")]
    TooManyConnections(usize),
    #[error("the event broker is unavailable; retry shortly")]
    Broker(#[from] BrokerError),
}

/// A new connection refused by a rate limit: who hit it, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many new connections from {who}; retry in {} s", retry_after.as_secs())]
pub struct RateLimited {
    /// `this address` or `this user`.
    pub who: &'static str,
    /// Whole seconds, at least 1.
    pub retry_after: Duration,
}

struct Inner {
    config: SseConfig,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    /// Signs and verifies session tokens ([`SseService::issue_token`]).
    auth: Auth,
    /// Who a stream request is from: `auth` unless the host gave its own.
    authenticator: Arc<dyn Authenticate>,
    /// `authenticator` is the host's own hook, not `auth`.
    host_authenticates: bool,
    /// Where the stream is served (with the routes' prefix), for the listener's lean path.
    stream_path: std::sync::RwLock<Arc<str>>,
    /// Long-lived responses open now (streams, stats streams), and the most allowed.
    long_lived: Arc<AtomicUsize>,
    max_long_lived: usize,
    retention: Arc<Retention>,
    /// The notification center, when `SSE_INBOX_URL` (or the builder) gave it a store.
    inbox: Option<Inbox>,
    ip_limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    user_limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    /// `true` once [`SseService::shutdown`] began; long-lived responses end on it.
    shutting_down: tokio::sync::watch::Sender<bool>,
    /// This instance's id and its view of the others (`presence`).
    presence: PresenceBook,
    published: AtomicU64,
    failed: AtomicU64,
    started_at_ms: u64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The notification service: send events, open streams, count clients, shut down.
///
/// It owns the local `Hub` of connections and the broker, and runs the connection
/// protocol between them; HTTP handlers only adapt requests to it.
#[derive(Clone)]
pub struct SseService {
    inner: Arc<Inner>,
    /// Set by [`with_idempotency_key`](Self::with_idempotency_key): this handle publishes once.
    idempotency_key: Option<Arc<str>>,
}

impl std::fmt::Debug for SseService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseService")
            .field("broker", &self.inner.broker.kind())
            .field("clients", &self.client_count())
            .finish()
    }
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_minute: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

impl SseService {
    /// Starts the service with the default identity (session tokens, see [`Auth`]): picks
    /// the broker (Redis when `config.redis_url` is set, else the in-process one) and spawns
    /// the heartbeat, expiry and cleanup tasks. Call inside a Tokio runtime.
    pub async fn start(config: SseConfig) -> Result<Self, StartError> {
        Self::builder(config).start().await
    }

    /// A service to configure further before it starts, e.g. with the host app's own
    /// [`Authenticate`] hook.
    pub fn builder(config: SseConfig) -> SseServiceBuilder {
        SseServiceBuilder {
            config,
            authenticator: None,
            inbox_store: None,
        }
    }

    async fn start_with(
        config: SseConfig,
        authenticator: Option<Arc<dyn Authenticate>>,
        inbox_store: Option<Arc<dyn InboxStore>>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        let inbox_store = match (inbox_store, &config.inbox_url) {
            (Some(store), _) => Some(store),
            (None, Some(url)) => {
                use secrecy::ExposeSecret;
                let store = SqlInbox::connect(url.expose_secret(), config.inbox_max_per_user)
                    .await
                    .map_err(|e| StartError::Inbox(e.to_string()))?;
                Some(Arc::new(store) as Arc<dyn InboxStore>)
            }
            (None, None) => None,
        };
        let inbox =
            inbox_store.map(|store| Inbox::new(store, config.inbox_events.clone(), config.inbox_retention));
        m::install();
        let hub = Arc::new(Hub::new(config.max_clients_per_user, config.queue_capacity));
        let instance = presence::new_instance_id();
        let sink: EventSink = Arc::new(HubDelivery {
            hub: hub.clone(),
            instance: instance.clone(),
        });
        let broker: Arc<dyn Broker> = match &config.redis_url {
            Some(url) if config.redis_cluster => {
                use secrecy::ExposeSecret;
                let options = ClusterOptions {
                    seeds: url
                        .expose_secret()
                        .split(',')
                        .map(|u| u.trim().to_string())
                        .collect(),
                    retention: config.retention(),
                    max_stream_len: config.history_capacity,
                };
                ClusterBroker::connect(options, sink)
                    .await
                    .map_err(|e| StartError::Redis(e.to_string()))?
            }
            Some(url) => {
                use secrecy::ExposeSecret;
                let ca_cert = match &config.redis_ca_cert {
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        StartError::Redis(format!("cannot read SSE_REDIS_CA_CERT {}: {e}", path.display()))
                    })?),
                    None => None,
                };
                let options = RedisOptions {
                    url: url.expose_secret().to_string(),
                    ca_cert,
                    retention: config.retention(),
                    max_stream_len: config.history_capacity,
                    wait_replicas: config.redis_wait_replicas,
                };
                RedisBroker::connect(options, sink)
                    .await
                    .map_err(|e| StartError::Redis(e.to_string()))?
            }
            None => Arc::new(MemoryBroker::new(
                sink,
                config.retention(),
                config.history_capacity,
                config.history_max_bytes,
            )),
        };
        let auth = Auth::new(config.jwt_secret.as_ref())
            .accept_tokens_without_audience(config.accept_tokens_without_aud);
        if config.jwt_secret.is_none() && authenticator.is_none() {
            tracing::warn!(
                "SSE_JWT_SECRET is not set: using a random secret; sessions end with this process \
                 and other instances cannot verify them"
            );
        }
        let inner = Arc::new(Inner {
            host_authenticates: authenticator.is_some(),
            authenticator: authenticator.unwrap_or_else(|| Arc::new(auth.clone())),
            auth,
            stream_path: std::sync::RwLock::new(api::STREAM_PATH.into()),
            long_lived: Arc::new(AtomicUsize::new(0)),
            max_long_lived: config.max_connections,
            retention: Arc::new(config.retention()),
            inbox,
            ip_limiter: limiter(config.connect_rate_per_ip),
            user_limiter: limiter(config.connect_rate_per_user),
            config,
            hub,
            broker,
            shutting_down: tokio::sync::watch::Sender::new(false),
            presence: PresenceBook::new(instance),
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started_at_ms: now_ms(),
            tasks: Mutex::new(Vec::new()),
        });
        let service = Self::of(inner);
        service.spawn_background_tasks();
        tracing::info!(
            broker = service.inner.broker.kind(),
            max_connections = service.inner.max_long_lived,
            "sse service started"
        );
        Ok(service)
    }

    /// A handle on `inner` that publishes without an idempotency key.
    fn of(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            idempotency_key: None,
        }
    }

    fn spawn_background_tasks(&self) {
        let config = &self.inner.config;
        // The first tick of each is one period after start, not after the task is first polled.
        let every = |period: Duration| {
            let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            IntervalStream::new(interval)
        };
        // Each connection gets a heartbeat every interval, but not all at the same moment:
        // a heartbeat to every connection at once is a broadcast's worth of writes, and in
        // S3 that burst was the whole latency tail (p99 100-250 ms in the 5 s holding it,
        // 20 ms elsewhere). So the interval is cut into slices, and each tick serves the
        // connections of one slice (by connection id, so a storm of connections opened
        // together is spread too).
        let heartbeat = {
            let inner = Arc::downgrade(&self.inner);
            let slices = heartbeat_slices(config.heartbeat_interval);
            let mut ticks = every(config.heartbeat_interval / slices as u32);
            tokio::spawn(async move {
                let mut tick = 0u64;
                while ticks.next().await.is_some() {
                    let Some(inner) = inner.upgrade() else { break };
                    tick += 1;
                    inner.hub.send_control(heartbeat_frame(), tick % slices, slices);
                }
            })
        };
        let cleanup = {
            let inner = Arc::downgrade(&self.inner);
            let mut ticks = every(config.cleanup_interval);
            tokio::spawn(async move {
                while ticks.next().await.is_some() {
                    let Some(inner) = inner.upgrade() else { break };
                    inner.hub.sweep();
                    inner.broker.cleanup().await;
                    if let Some(l) = &inner.ip_limiter {
                        l.retain_recent();
                    }
                    if let Some(l) = &inner.user_limiter {
                        l.retain_recent();
                    }
                    m::broker_healthy(inner.broker.health() == BrokerHealth::Healthy);
                }
            })
        };
        // Streams end when their session does: checked every second, one ordered index.
        let expiry = {
            let inner = Arc::downgrade(&self.inner);
            let mut ticks = every(Duration::from_secs(1));
            tokio::spawn(async move {
                while ticks.next().await.is_some() {
                    let Some(inner) = inner.upgrade() else { break };
                    inner.hub.expire(now_ms() / 1000);
                }
            })
        };
        // Presence across instances; nothing to do on the in-process broker, which has none.
        let presence = {
            let inner = Arc::downgrade(&self.inner);
            let mut ticks = every(presence::TICK);
            tokio::spawn(async move {
                let Some(service) = inner.upgrade().map(SseService::of) else {
                    return;
                };
                if matches!(
                    service.inner.broker.read_presence(None, presence::TTL).await,
                    Ok(None)
                ) {
                    return;
                }
                service.inner.hub.track_presence();
                drop(service);
                let mut failing = false;
                while ticks.next().await.is_some() {
                    let Some(service) = inner.upgrade().map(SseService::of) else {
                        break;
                    };
                    let inner = &service.inner;
                    let outcome = inner
                        .presence
                        .tick(&inner.hub, inner.broker.as_ref(), &service.figures())
                        .await;
                    match &outcome {
                        Err(e) if !failing => tracing::warn!("presence not written: {e}"),
                        Ok(()) if failing => tracing::info!("presence written again"),
                        _ => {}
                    }
                    failing = outcome.is_err();
                    if !failing {
                        let max = inner.config.max_clients_per_user;
                        let checked = inner
                            .presence
                            .run_limit_checks(&inner.hub, inner.broker.as_ref(), max)
                            .await;
                        if let Err(e) = checked {
                            tracing::debug!("per-user limit across instances not checked: {e}");
                        }
                    }
                }
            })
        };
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.extend([heartbeat, cleanup, expiry, presence]);
        if let Some(inbox) = &self.inner.inbox {
            tasks.push(tokio::spawn(Inbox::prune_forever(
                inbox.store.clone(),
                inbox.retention,
            )));
            tasks.push(tokio::spawn(Inbox::trim_forever(
                inbox.store.clone(),
                inbox.deferred.clone(),
            )));
        }
    }

    /// Who a stream request comes from, by the service's [`Authenticate`] hook. The user
    /// id is checked as a token's subject is ([`auth::validate_user_id`]), whichever hook
    /// gave it, and an identity whose `expires_at` has passed is refused: a user id nobody
    /// could publish to, or a session already over, never opens a stream.
    pub async fn authenticate(
        &self,
        request: axum::http::request::Parts,
    ) -> Result<Identity, auth::AuthError> {
        let identity = self.inner.authenticator.authenticate(request).await?;
        auth::validate_user_id(&identity.user_id).map_err(auth::AuthError::Invalid)?;
        if identity.expires_at.is_some_and(|at| at <= now_ms() / 1000) {
            return Err(auth::AuthError::Invalid("the session has expired".into()));
        }
        Ok(identity)
    }

    /// Whether stream requests are authenticated by the default session tokens ([`Auth`]),
    /// not by a hook of the host's.
    pub fn uses_default_auth(&self) -> bool {
        !self.inner.host_authenticates
    }

    /// Where the stream is served: `/api/sse` under the prefix the routes were built with.
    pub fn stream_path(&self) -> Arc<str> {
        self.inner
            .stream_path
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The prefix the routes were built with (`Routes::prefix`), `""` for none: the
    /// components read it while the page renders, so the page never repeats it.
    pub fn routes_prefix(&self) -> String {
        let path = self.stream_path();
        path.strip_suffix(api::STREAM_PATH)
            .unwrap_or_default()
            .to_string()
    }

    pub(crate) fn set_stream_path(&self, path: &str) {
        *self.inner.stream_path.write().unwrap_or_else(|e| e.into_inner()) = path.into();
    }

    /// Counts one more long-lived response (a stream, a stats stream) against
    /// `SseConfig::max_connections`; `None` when that many are open. Dropping the permit
    /// gives the place back.
    pub fn hold_connection(&self) -> Option<ConnectionPermit> {
        let open = self.inner.long_lived.fetch_add(1, Ordering::AcqRel);
        if open >= self.inner.max_long_lived {
            self.inner.long_lived.fetch_sub(1, Ordering::AcqRel);
            m::connection_refused("max_connections");
            return None;
        }
        Some(ConnectionPermit::new(self.inner.long_lived.clone()))
    }

    /// Counts a new connection against the per-address (IPv6: per /64) and per-user rates.
    pub fn admit(&self, ip: Option<IpAddr>, user: &Arc<str>) -> Result<(), RateLimited> {
        let refused = |who, not_until: governor::NotUntil<_>| {
            m::connection_refused("rate_limited");
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            RateLimited {
                who,
                retry_after: Duration::from_secs(wait.as_secs() + 1),
            }
        };
        if let (Some(limiter), Some(ip)) = (&self.inner.ip_limiter, ip) {
            let key = address_key(ip);
            limiter.check_key(&key).map_err(|n| refused("this address", n))?;
        }
        if let Some(limiter) = &self.inner.user_limiter {
            limiter.check_key(user).map_err(|n| refused("this user", n))?;
        }
        Ok(())
    }

    /// Opens a stream of `user`'s events and broadcasts: the opening half of the connection
    /// protocol.
    ///
    /// 1. Register in the hub *first*, so nothing published from here on is missed.
    /// 2. Decide what to replay: after `resume_from` (the client's `Last-Event-ID`); or, for
    ///    the user's first connection here, what waited for them while they were offline
    ///    (from where their last connection stopped) plus anything published while the
    ///    broker starts listening for them (after the head read now).
    /// 3. Subscribe the broker to the user (first connection only), read the replay, and
    ///    skip live events the replay already sent: no gap, no duplicate.
    /// 4. End the prelude with an id-only frame (no data, so no event fires) that tells
    ///    `EventSource` where this stream starts: a client that drops before its first event
    ///    still resumes from there.
    ///
    /// `filter` keeps only the named events (heartbeats and control events always pass).
    /// The stream ends when `identity` expires.
    pub async fn open_stream(
        &self,
        identity: &Identity,
        resume: Resume,
        filter: Option<Arc<[String]>>,
    ) -> Result<EventStream, OpenError> {
        let inner = &self.inner;
        if self.is_shutting_down() {
            return Err(OpenError::ShuttingDown);
        }
        let permit = self
            .hold_connection()
            .ok_or(OpenError::TooManyConnections(inner.max_long_lived))?;
        let user: Arc<str> = identity.user_id.as_str().into();
        let registration = inner
            .hub
            .register(&user, filter.clone(), identity.expires_at)
            .ok_or(OpenError::ShuttingDown)?;
        // From here on, dropping the closer unregisters the connection, also on an error.
        let mut closer = Closer {
            ended: self.inner.clone(),
            user: user.clone(),
            id: registration.id,
            delivered_through: Cursor::default(),
            announced: Cursor::default(),
            records_position: false,
        };
        let broker = &inner.broker;
        let start = match broker.in_lanes() {
            true => Cursor::LANES_START,
            false => Cursor::default(),
        };
        // A cursor of the other kind (from before a move to or from a cluster) resumes
        // from the earlier of its lanes.
        let of_this_broker = |cursor: Cursor| match (cursor, start) {
            (Cursor::One(id), Cursor::Lanes { .. }) => Cursor::Lanes {
                user: id,
                broadcast: id,
            },
            (lanes @ Cursor::Lanes { .. }, Cursor::One(_)) => Cursor::One(lanes.earliest()),
            (cursor, _) => cursor,
        };
        // A time ago as a cursor: the id the broker's clock gave then; if nothing came
        // since, the head (a point every broker still knows, so no false gap).
        let ago = |head: Cursor, age: Duration| {
            let age_ms = age.min(MAX_RESUME_AGO).as_millis() as u64;
            let then = EventId(now_ms().saturating_sub(age_ms).saturating_mul(1000));
            head.map(|head| head.min(then))
        };
        let replay_plan = match resume {
            Resume::After(after) => Some((of_this_broker(after), None)),
            // The user's first connection here also gets what waited for them while they
            // were offline; so does one asked by time (a page that waited to join its tabs
            // before streaming), from the earlier of the two.
            Resume::Now | Resume::Ago(_) if registration.first_for_user => {
                let head = broker.head(&user).await?;
                let cursor = broker.delivered_through(&user).await?;
                let offline = cursor.map_or(start, of_this_broker).min(head);
                let from = match resume {
                    Resume::Ago(age) => offline.min(ago(head, age)),
                    _ => offline,
                };
                Some((from, Some(head)))
            }
            Resume::Ago(age) => Some((ago(broker.head(&user).await?, age), None)),
            Resume::Now => None,
        };
        if registration.first_for_user {
            broker.subscribe(&user).await;
        }
        // The per-user limit across instances is checked a few seconds from now, by the
        // presence task (nothing on the connect's path).
        inner.presence.user_connected(&user);

        let mut prelude = BytesMut::new();
        prelude.extend_from_slice(format!("retry: {}\n\n", inner.config.retry.as_millis()).as_bytes());
        let mut replayed_through = start;
        // Lanes the client claimed to be past the broker's head in: announced at the head.
        let mut announce_at_least = start;
        let mut rest = None;
        if let Some((after, fresh_head)) = replay_plan {
            let now = now_ms();
            let selection = ReplaySelection {
                filter: filter.clone(),
                fresh_head,
                now_ms: now,
            };
            let replay = broker.replay_page(&user, after, REPLAY_PAGE).await?;
            let mut replay_through = after;
            replay.events.iter().for_each(|e| replay_through.advance(e));
            let events = selection.select(&inner.retention, replay.events);
            // Only a client that named an id has state to reload: one resuming by time
            // (no id yet) or a first connection gets what is kept, as a new client would.
            let resync = replay.gap && matches!(resume, Resume::After(_));
            m::replayed(events.len(), resync);
            if resync {
                let data = format!(
                    r#"{{"reason":"events after this id are no longer kept; reload state","lastEventId":"{after}","timestamp":{now}}}"#
                );
                prelude.extend_from_slice(&encode_frame(names::RESYNC, &data));
            }
            let mut sent = after;
            write_frames(&events, &mut sent, &mut prelude);
            // Live events up to here came through the replay (or were meant for nobody yet).
            replayed_through = replay_through.max(after).max(fresh_head.unwrap_or(start));
            // The head now, for a replay to go on to or a cursor to correct (read once).
            let head = match replay.more || resync {
                true => broker.head(&user).await?,
                false => start,
            };
            if replay.more {
                // A backlog longer than a page: the rest is read page by page as the client
                // takes it, up to the head read now (what is newer is in the queue).
                let until = head.max(replayed_through);
                rest = Some(Box::new(ReplayRest::new(
                    inner.broker.clone(),
                    inner.retention.clone(),
                    user.clone(),
                    selection,
                    replay_through.max(after),
                    sent,
                    until,
                )));
            }
            if resync {
                // A cursor beyond the broker's head (a faster clock's, another
                // environment's, or from before Redis lost its data) must not become this
                // stream's position: live events below it would be skipped, and it would
                // be stored as where the user's offline delivery starts. In such a lane
                // nothing counts as delivered (every queued event goes out) and the
                // client is told the real head.
                replayed_through = replayed_through.zip(head, |r, h| if r > h { EventId(0) } else { r });
                announce_at_least = after.zip(head, |a, h| if a > h { h } else { EventId(0) });
            }
        }
        // For another tab of a connected user, the start is the head read after registering:
        // anything newer is in this connection's queue, behind the start frame. A replay
        // still going on writes the start when it ends.
        let starts_after = match (&rest, replayed_through.is_start()) {
            (Some(_), _) => start,
            (None, true) => broker.head(&user).await?,
            (None, false) => replayed_through.max(announce_at_least),
        };
        if !starts_after.is_start() {
            prelude.extend_from_slice(format!("id: {starts_after}\n\n").as_bytes());
        }
        // Then an event at once: a client that saw the response open but not this soon
        // after knows something in between buffers the stream.
        prelude.extend_from_slice(&self.ready_frame(identity));
        tracing::debug!(user = %user, ?resume, "stream opened");
        // While the rest of a backlog is read, the client's position is the part sent.
        let skip_live_through = replayed_through.max(rest.as_ref().map_or(start, |r| r.until()));
        closer.delivered_through = match &rest {
            Some(rest) => rest.handled(),
            None => replayed_through,
        };
        closer.announced = starts_after;
        // A filtered stream skipped events it was not asked for: its position says nothing
        // about them, so it never moves the user's offline delivery past them.
        closer.records_position = filter.is_none();
        Ok(EventStream {
            prelude: VecDeque::from([prelude.freeze()]),
            rest,
            replayed_through: skip_live_through,
            mailbox: registration.mailbox,
            ended: false,
            closer,
            _permit: permit,
        })
    }

    /// The `ready` event that ends every stream's prelude: the heartbeat interval, so the
    /// client knows how soon to expect the next sign of life, and the tag of the identity
    /// the stream is for, so a browser tab that relays the stream to its other tabs can
    /// check that they share its identity.
    pub(crate) fn ready_frame(&self, identity: &Identity) -> bytes::Bytes {
        let ready = api::Ready {
            heartbeat_ms: self.inner.config.heartbeat_interval.as_millis() as u64,
            tag: self.identity_tag(identity),
            timestamp: now_ms(),
        };
        let data = serde_json::to_string(&ready).expect("plain numbers and an ASCII tag serialize");
        encode_frame(names::READY, &data)
    }

    /// The opaque tag of `identity`'s user (see [`Auth::identity_tag`]): the same on every
    /// instance that shares `SSE_JWT_SECRET` (random per process without one, also with a
    /// host's own [`Authenticate`]).
    pub fn identity_tag(&self, identity: &Identity) -> String {
        self.inner.auth.identity_tag(&identity.user_id)
    }

    /// The closing half of the protocol, run when a stream is dropped: unregister it, record
    /// how far it got (where the user's offline delivery starts next time), and stop the
    /// broker listening for the user if this was their last connection here.
    pub(super) fn stream_closed(&self, user: Arc<str>, id: u64, delivered_through: Option<Cursor>) {
        let last = self.inner.hub.unregister(&user, id);
        tracing::debug!(user = %user, "stream closed");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let service = self.clone();
        runtime.spawn(async move {
            let broker = &service.inner.broker;
            if let Some(cursor) = delivered_through.filter(|c| !c.is_start()) {
                broker.set_delivered_through(&user, cursor).await;
            }
            // The user may have come back while this was scheduled.
            if last && !service.inner.hub.holds_user(&user) {
                broker.unsubscribe(&user).await;
            }
        });
    }

    /// Sends a `notification` to every connection of `user_id`.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// use sse_notify::events::{Notification, NotificationKind};
    /// sse.send_notification("alice", Notification {
    ///     title: "Payment received".into(),
    ///     message: "Thanks! Your plan is active.".into(),
    ///     kind: NotificationKind::Success,
    ///     action_url: Some("/billing".into()),
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_notification(
        &self,
        user_id: &str,
        notification: Notification,
    ) -> Result<EventId, SendError> {
        self.send(Target::User(user_id.into()), Event::Notification(notification))
            .await
    }

    /// Sends a `reel_upload_progress` (`progress` 0..=100) to `user_id`.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// use sse_notify::events::{ReelUploadProgress, UploadStatus};
    /// sse.send_reel_upload_progress("alice", ReelUploadProgress {
    ///     reel_id: "reel-7".into(), progress: 40, status: UploadStatus::Uploading, message: None,
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_reel_upload_progress(
        &self,
        user_id: &str,
        progress: ReelUploadProgress,
    ) -> Result<EventId, SendError> {
        self.send(Target::User(user_id.into()), Event::ReelUploadProgress(progress))
            .await
    }

    /// Sends a `reel_ready` to `user_id`.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// use sse_notify::events::ReelReady;
    /// sse.send_reel_ready("alice", ReelReady {
    ///     reel_id: "reel-7".into(),
    ///     playback_url: "https://cdn.example.com/reel-7.m3u8".into(),
    ///     thumbnail_url: None,
    ///     duration: Some(31.5),
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_reel_ready(&self, user_id: &str, ready: ReelReady) -> Result<EventId, SendError> {
        self.send(Target::User(user_id.into()), Event::ReelReady(ready))
            .await
    }

    /// Sends a `user_update` to `user_id`.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// use sse_notify::events::{UserUpdate, UserUpdateKind};
    /// sse.send_user_update("alice", UserUpdate {
    ///     kind: UserUpdateKind::Subscription,
    ///     data: serde_json::json!({"plan": "pro"}),
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_user_update(&self, user_id: &str, update: UserUpdate) -> Result<EventId, SendError> {
        self.send(Target::User(user_id.into()), Event::UserUpdate(update))
            .await
    }

    /// Sends a `system_alert` to every connected user.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// use sse_notify::events::{SystemAlert, SystemAlertKind};
    /// sse.send_system_alert(SystemAlert {
    ///     message: "Maintenance at 22:00 UTC".into(),
    ///     kind: SystemAlertKind::Maintenance,
    ///     duration: Some(10_000),
    /// }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_system_alert(&self, alert: SystemAlert) -> Result<EventId, SendError> {
        self.send(Target::Broadcast, Event::SystemAlert(alert)).await
    }

    /// Sends an event named `event_name` (`[a-z0-9_.-]{1,64}`) whose `data` is a JSON object.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// sse.send_custom_event("alice", "order.shipped", serde_json::json!({"orderId": 42})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send_custom_event(
        &self,
        user_id: &str,
        event_name: &str,
        data: Value,
    ) -> Result<EventId, SendError> {
        let event = Event::from_value(event_name, data)?;
        self.send(Target::User(user_id.into()), event).await
    }

    /// Validates and publishes one event.
    pub async fn send(&self, target: Target, event: Event) -> Result<EventId, SendError> {
        let mut ids = self.publish(vec![(target, event)]).await?;
        Ok(ids.remove(0))
    }

    /// Validates every event first, then publishes them in order as one batch: either all
    /// are published or the error says why none were.
    pub async fn publish(&self, events: Vec<(Target, Event)>) -> Result<Vec<EventId>, SendError> {
        let Some(key) = &self.idempotency_key else {
            let envelopes = self.prepare_all(events)?;
            return self.publish_envelopes(envelopes).await;
        };
        check_idempotency_key(key).map_err(|message| ValidationError::new("idempotencyKey", message))?;
        // What a retry must repeat: the targets and events, not the time they were sent.
        let body = events
            .iter()
            .map(|(target, event)| {
                let data = serde_json::to_string(event).unwrap_or_default();
                format!("{target:?} {} {data}\n", event.name())
            })
            .collect::<String>();
        let envelopes = self.prepare_all(events)?;
        self.publish_once(key, body.as_bytes(), envelopes).await
    }

    /// A handle whose sends publish at most once per `key` within
    /// [`SseConfig::idempotency_window`] (24 h by default), on every instance that shares
    /// the broker, as `Idempotency-Key` on `POST /api/events`: a retry with the same key and
    /// the same events returns the first send's ids and publishes nothing; the same key
    /// with other events is [`SendError::KeyReused`]. Use one key per logical send, e.g.
    /// derived from the job or webhook that causes it. The key is checked when sending:
    /// 1 to 255 visible ASCII characters.
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::SendError> {
    /// use sse_notify::events::ReelReady;
    /// // A job queue may run this twice; the user sees one `reel_ready`.
    /// sse.with_idempotency_key("reel-7-ready")
    ///     .send_reel_ready("alice", ReelReady {
    ///         reel_id: "reel-7".into(),
    ///         playback_url: "https://cdn.example.com/reel-7.m3u8".into(),
    ///         thumbnail_url: None,
    ///         duration: None,
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn with_idempotency_key(&self, key: impl Into<Arc<str>>) -> SseService {
        SseService {
            inner: self.inner.clone(),
            idempotency_key: Some(key.into()),
        }
    }

    fn prepare_all(&self, events: Vec<(Target, Event)>) -> Result<Vec<Envelope>, SendError> {
        events
            .into_iter()
            .map(|(target, event)| self.prepare(target, event))
            .collect::<Result<_, _>>()
            .map_err(SendError::from)
    }

    /// Publishes events already checked by [`prepare`](Self::prepare).
    pub(crate) async fn publish_envelopes(
        &self,
        envelopes: Vec<Envelope>,
    ) -> Result<Vec<EventId>, SendError> {
        if self.is_shutting_down() {
            return Err(SendError::ShuttingDown);
        }
        let names: Vec<Arc<str>> = envelopes.iter().map(|e| e.name.clone()).collect();
        // What the inbox keeps, taken before the broker takes the envelopes.
        let to_keep = self
            .inner
            .inbox
            .as_ref()
            .map(|inbox| inbox.to_keep(&envelopes))
            .unwrap_or_default();
        match self.inner.broker.publish(envelopes).await {
            Ok(ids) => {
                self.inner
                    .published
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                names.iter().for_each(|n| m::event_published(n));
                if let (Some(inbox), false) = (&self.inner.inbox, to_keep.is_empty()) {
                    self.keep_in_inbox(inbox, with_ids(to_keep, &ids)).await?;
                }
                Ok(ids)
            }
            Err(e) => {
                self.inner.failed.fetch_add(names.len() as u64, Ordering::Relaxed);
                names.iter().for_each(|n| m::event_failed(n, "broker"));
                tracing::warn!(error = %e, events = names.len(), "publish failed");
                Err(e.into())
            }
        }
    }

    /// Keeps the events of a kept type; telling their owners' streams (`inbox`, op
    /// `added`) and the per-user limit follow in the background. A store that fails fails
    /// the publish: nothing is acknowledged that is not kept.
    async fn keep_in_inbox(&self, inbox: &Inbox, items: Vec<NewItem>) -> Result<(), SendError> {
        if let Err(e) = inbox.store.keep(&items).await {
            self.inner.failed.fetch_add(items.len() as u64, Ordering::Relaxed);
            items.iter().for_each(|i| m::event_failed(&i.event, "inbox"));
            tracing::warn!(error = %e, events = items.len(), "published, but the inbox could not keep them");
            return Err(e.into());
        }
        inbox.follow_up(&items, self.inner.broker.as_ref()).await;
        Ok(())
    }

    /// One user's inbox (the notification center): list, count, mark read, archive.
    /// [`InboxError::Off`] without a store (`SSE_INBOX_URL`).
    pub fn inbox(&self, user_id: &str) -> Result<UserInbox, InboxError> {
        let inbox = self.inner.inbox.as_ref().ok_or(InboxError::Off)?;
        UserInbox::new(self, inbox.store.clone(), user_id)
    }

    /// The broker, for the core's other parts (idempotency records).
    pub(super) fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// Whether the notification center is on.
    pub fn has_inbox(&self) -> bool {
        self.inner.inbox.is_some()
    }

    /// Validates `event` for `target` (user id, fields, payload size) and encodes its data
    /// with a `timestamp` added.
    pub(crate) fn prepare(&self, target: Target, event: Event) -> Result<Envelope, ValidationError> {
        if let Target::User(user) = &target {
            auth::validate_user_id(user).map_err(|m| ValidationError::new("user_id", m))?;
        }
        event.validate()?;
        let timestamp_ms = now_ms();
        let data = event.data_json_with_timestamp(timestamp_ms);
        let limit = self.inner.config.max_payload_bytes;
        if data.len() > limit {
            return Err(ValidationError::new(
                "data",
                format!("is {} bytes of JSON, at most {limit} allowed", data.len()),
            ));
        }
        Ok(Envelope {
            target,
            name: event.name().into(),
            data,
            timestamp_ms,
            coalesce_key: event.coalesce_key().map(Into::into),
        })
    }

    /// Open SSE connections in this process.
    pub fn client_count(&self) -> usize {
        self.inner.hub.client_count()
    }

    /// Open SSE connections of `user_id` in this process.
    pub fn client_count_for_user(&self, user_id: &str) -> usize {
        self.inner.hub.client_count_for_user(user_id)
    }

    /// This instance's id in the presence and in `/api/stats`: random, new at each start.
    pub fn instance_id(&self) -> &str {
        &self.inner.presence.instance
    }

    /// `user_id`'s open streams on every instance (through Redis when it is the broker; at
    /// most [`presence::TICK`] behind for the other instances, current for this one).
    ///
    /// ```no_run
    /// # async fn f(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::BrokerError> {
    /// if !sse.is_online("alice").await? {
    ///     // e.g. send an email instead
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn presence(&self, user_id: &str) -> Result<Presence, BrokerError> {
        let inner = &self.inner;
        inner
            .presence
            .presence(&inner.hub, inner.broker.as_ref(), user_id)
            .await
    }

    /// Whether `user_id` has a stream open on any instance (see [`presence`](Self::presence)).
    pub async fn is_online(&self, user_id: &str) -> Result<bool, BrokerError> {
        Ok(self.presence(user_id).await?.online)
    }

    /// Every live instance's figures and their sums, as the last presence read saw them
    /// (this instance's current): no broker call.
    pub fn cluster_stats(&self) -> ClusterStats {
        self.inner.presence.cluster_stats(self.figures())
    }

    /// [`stats`](Self::stats) and the connections refused, by reason.
    fn figures(&self) -> InstanceFigures {
        InstanceFigures {
            stats: self.stats(),
            refused: m::refusals(),
        }
    }

    /// [`stats`](Self::stats) with this instance's id and [`cluster_stats`](Self::cluster_stats),
    /// as `GET /api/stats` serves them.
    pub fn stats_report(&self) -> StatsReport {
        self.inner.presence.report(self.figures())
    }

    /// A session token for `user_id`, valid for `ttl`, as `/api/sse` accepts it.
    pub fn issue_token(
        &self,
        user_id: &str,
        session_id: Option<&str>,
        ttl: Duration,
    ) -> Result<String, auth::AuthError> {
        self.inner.auth.issue(user_id, session_id, ttl)
    }

    /// Verifies a session token and returns its claims.
    pub fn verify_token(&self, token: &str) -> Result<auth::Claims, auth::AuthError> {
        self.inner.auth.verify(token)
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &SseConfig {
        &self.inner.config
    }

    /// The broker's kind: `memory` or `redis`.
    pub fn broker_kind(&self) -> &'static str {
        self.inner.broker.kind()
    }

    /// The broker's current health.
    pub fn broker_health(&self) -> BrokerHealth {
        self.inner.broker.health()
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutting_down.borrow()
    }

    /// Completes once [`shutdown`](Self::shutdown) has begun: long-lived responses other than
    /// event streams (which the hub closes) end on it.
    pub fn shutting_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut flag = self.inner.shutting_down.subscribe();
        async move {
            let _ = flag.wait_for(|down| *down).await;
        }
    }

    /// Figures for `/api/stats`.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let counters = &inner.hub.counters;
        Stats {
            clients: inner.hub.client_count(),
            users: inner.hub.user_count(),
            events_published: inner.published.load(Ordering::Relaxed),
            events_delivered: counters.delivered.load(Ordering::Relaxed),
            events_failed: inner.failed.load(Ordering::Relaxed),
            slow_client_disconnects: counters.slow_disconnects.load(Ordering::Relaxed),
            connections_replaced: counters.replaced.load(Ordering::Relaxed),
            broker: inner.broker.kind().into(),
            broker_health: inner.broker.health(),
            uptime_ms: now_ms().saturating_sub(inner.started_at_ms),
        }
    }

    /// Ends every stream of `user_id`, on every instance (through Redis when it is the
    /// broker), e.g. at logout; their hooks do not reconnect by themselves. Returns how many
    /// streams were closed.
    ///
    /// ```no_run
    /// # async fn logout(sse: sse_notify::server::SseService) -> Result<(), sse_notify::server::BrokerError> {
    /// let closed = sse.disconnect_user("alice").await?;
    /// # Ok(()) }
    /// ```
    pub async fn disconnect_user(&self, user_id: &str) -> Result<usize, BrokerError> {
        self.inner.broker.disconnect(user_id).await
    }

    /// Ends every stream (clients reconnect, to another instance if there is one), refuses
    /// new connections and events, and stops background tasks. Idempotent.
    pub async fn shutdown(&self) {
        if self.inner.shutting_down.send_replace(true) {
            return;
        }
        tracing::info!(clients = self.client_count(), "sse service shutting down");
        self.inner.hub.close_all();
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        tasks.iter().for_each(JoinHandle::abort);
        // Awaited, so no presence write still in flight lands after the leave below.
        for task in tasks {
            let _ = task.await;
        }
        if let Some(inbox) = &self.inner.inbox {
            // The owners of kept items not checked against the per-user limit yet.
            let trim = inbox.take_deferred().trim(inbox.store.as_ref());
            if tokio::time::timeout(Duration::from_secs(2), trim).await.is_err() {
                tracing::warn!("the inbox's last limit check did not finish in 2 s");
            }
        }
        let leave = self.inner.broker.leave_presence(&self.inner.presence.instance);
        if tokio::time::timeout(Duration::from_secs(2), leave).await.is_err() {
            tracing::warn!("could not leave the presence in 2 s; it expires by itself");
        }
        self.inner.broker.shutdown().await;
    }
}

/// The broker hands events and disconnects to the local hub through this.
struct HubDelivery {
    hub: Arc<Hub>,
    /// This instance's id, to pick out the replace requests meant for it.
    instance: String,
}

impl StreamEnded for Inner {
    fn stream_ended(self: Arc<Self>, user: Arc<str>, id: u64, position: Option<Cursor>) {
        SseService::of(self).stream_closed(user, id, position);
    }
}

impl Delivery for HubDelivery {
    fn deliver(&self, event: Arc<PublishedEvent>) {
        self.hub.dispatch(&event);
    }

    fn disconnect(&self, user: &str) -> usize {
        self.hub.close_user(user, CloseReason::Disconnected)
    }

    fn listens_for(&self, user: &str) -> bool {
        self.hub.holds_user(user)
    }

    fn replace(&self, user: &str, instance: &str, ids: &[u64]) {
        if instance == self.instance {
            self.hub.replace_connections(user, ids);
        }
    }
}

/// Configures an [`SseService`] before it starts; see [`SseService::builder`].
pub struct SseServiceBuilder {
    config: SseConfig,
    authenticator: Option<Arc<dyn Authenticate>>,
    inbox_store: Option<Arc<dyn InboxStore>>,
}

impl SseServiceBuilder {
    /// Who a stream request comes from: the host app's own sessions instead of the default
    /// session tokens. Any `async fn(Parts) -> Result<Identity, AuthError>` will do.
    #[must_use]
    pub fn authenticate(mut self, authenticate: impl Authenticate) -> Self {
        self.authenticator = Some(Arc::new(authenticate));
        self
    }

    /// The notification center's store, instead of the one `inbox_url` names: e.g. a
    /// [`SqlInbox`] on the host's own database, or a store of the host's.
    #[must_use]
    pub fn inbox_store(mut self, store: Arc<dyn InboxStore>) -> Self {
        self.inbox_store = Some(store);
        self
    }

    /// Starts the service; see [`SseService::start`].
    pub async fn start(self) -> Result<SseService, StartError> {
        SseService::start_with(self.config, self.authenticator, self.inbox_store).await
    }
}

/// Into how many slices the heartbeat interval is cut: one a second, at most 30.
fn heartbeat_slices(interval: Duration) -> u64 {
    (interval.as_secs()).clamp(1, 30)
}

/// A heartbeat frame: no id, so it never moves a client's `Last-Event-ID`.
fn heartbeat_frame() -> bytes::Bytes {
    encode_frame(names::HEARTBEAT, &format!(r#"{{"timestamp":{}}}"#, now_ms()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::core::mailbox::Outbound;
    use crate::server::core::mailbox::Received;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Every connection gets one heartbeat per interval, exactly an interval apart, and the
    /// heartbeats of many connections are spread over the interval instead of coming at
    /// once (on a paused clock).
    #[tokio::test(start_paused = true)]
    async fn heartbeats_come_every_interval_spread_over_the_connections() {
        let config = SseConfig::default()
            .jwt_secret("paused-clock-secret-123")
            .heartbeat_interval(Duration::from_secs(30));
        let service = SseService::start(config).await.unwrap();
        let mut conns: Vec<_> = (0..90)
            .map(|i| {
                service
                    .inner
                    .hub
                    .register(&format!("u{i}").into(), None, None)
                    .unwrap()
            })
            .collect();
        let mut heard_at: Vec<Vec<u64>> = vec![Vec::new(); conns.len()];
        let mut most_in_one_second = 0;
        for second in 1..=90 {
            tokio::time::advance(Duration::from_secs(1)).await;
            settle().await;
            let mut this_second = 0;
            for (conn, heard) in conns.iter_mut().zip(&mut heard_at) {
                while let Some(item) = conn.mailbox.try_recv() {
                    assert!(
                        matches!(item, Received::Frame(Outbound::Control(_))),
                        "only heartbeats expected"
                    );
                    heard.push(second);
                    this_second += 1;
                }
            }
            most_in_one_second = most_in_one_second.max(this_second);
        }
        for heard in &heard_at {
            assert_eq!(heard.len(), 3, "one heartbeat per interval: {heard:?}");
            assert!(heard[0] <= 30, "the first within an interval: {heard:?}");
            assert!(
                heard.windows(2).all(|w| w[1] - w[0] == 30),
                "an interval apart: {heard:?}"
            );
        }
        assert_eq!(most_in_one_second, 3, "90 connections over 30 slices");
        service.shutdown().await;
    }
}
