//! [`SseService`]: the server API that handlers, webhooks and background jobs call.
//!
//! It is a cheap-to-clone handle. Put it in your Axum state (the [`router`](super::router)
//! does) and in the Leptos context, so `#[server]` functions reach it with
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
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::Value;
use tokio::task::JoinHandle;

use super::{
    auth::{self, Auth},
    broker::{
        encode_frame, Broker, BrokerError, BrokerHealth, Envelope, EventId, MemoryBroker, RedisBroker,
        Retention, Target,
    },
    hub::Hub,
    metrics as m, now_ms, SseConfig,
};
use crate::events::{
    names, Event, Notification, ReelReady, ReelUploadProgress, SystemAlert, UserUpdate, ValidationError,
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
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not connect to Redis: {0}")]
    Redis(String),
}

/// Figures for `/api/stats`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub clients: usize,
    pub users: usize,
    pub events_published: u64,
    pub events_delivered: u64,
    pub events_failed: u64,
    pub slow_client_disconnects: u64,
    pub connections_replaced: u64,
    pub broker: &'static str,
    pub broker_health: BrokerHealth,
    pub uptime_ms: u64,
}

pub(crate) struct Inner {
    pub(crate) config: SseConfig,
    pub(crate) hub: Arc<Hub>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) auth: Auth,
    pub(crate) retention: Retention,
    pub(crate) ip_limiter: Option<DefaultKeyedRateLimiter<std::net::IpAddr>>,
    pub(crate) user_limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    shutting_down: AtomicBool,
    published: AtomicU64,
    failed: AtomicU64,
    started_at_ms: u64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The notification service: send events, count clients, shut down.
#[derive(Clone)]
pub struct SseService {
    pub(crate) inner: Arc<Inner>,
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
    /// Starts the service: picks the broker (Redis when `config.redis_url` is set, else the
    /// in-process one) and spawns the heartbeat and cleanup tasks. Call inside a Tokio runtime.
    pub async fn start(config: SseConfig) -> Result<Self, StartError> {
        m::install();
        let hub = Arc::new(Hub::new(config.max_clients_per_user, config.queue_capacity));
        let broker: Arc<dyn Broker> = match &config.redis_url {
            Some(url) => RedisBroker::connect(url, hub.clone(), config.retention(), config.history_capacity)
                .await
                .map_err(|e| StartError::Redis(e.to_string()))?,
            None => Arc::new(MemoryBroker::new(
                hub.clone(),
                config.retention(),
                config.history_capacity,
            )),
        };
        let inner = Arc::new(Inner {
            auth: Auth::new(config.jwt_secret.as_deref()),
            retention: config.retention(),
            ip_limiter: limiter(config.connect_rate_per_ip),
            user_limiter: limiter(config.connect_rate_per_user),
            config,
            hub,
            broker,
            shutting_down: AtomicBool::new(false),
            published: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            started_at_ms: now_ms(),
            tasks: Mutex::new(Vec::new()),
        });
        let service = Self { inner };
        service.spawn_background_tasks();
        tracing::info!(broker = service.inner.broker.kind(), "sse service started");
        Ok(service)
    }

    fn spawn_background_tasks(&self) {
        let heartbeat = {
            let inner = Arc::downgrade(&self.inner);
            let period = self.inner.config.heartbeat_interval;
            // The first tick is one period after start, not after the task is first polled.
            let first = tokio::time::Instant::now() + period;
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval_at(first, period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(inner) = inner.upgrade() else { break };
                    inner.hub.send_control(heartbeat_frame());
                }
            })
        };
        let cleanup = {
            let inner = Arc::downgrade(&self.inner);
            let period = self.inner.config.cleanup_interval;
            let first = tokio::time::Instant::now() + period;
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval_at(first, period);
                loop {
                    ticks.tick().await;
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
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.push(heartbeat);
        tasks.push(cleanup);
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
        let envelopes = events
            .into_iter()
            .map(|(target, event)| self.prepare(target, event))
            .collect::<Result<Vec<_>, _>>()?;
        self.publish_envelopes(envelopes).await
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
        match self.inner.broker.publish(envelopes).await {
            Ok(ids) => {
                self.inner
                    .published
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                names.iter().for_each(|n| m::event_published(n));
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

    /// Validates `event` for `target` (user id, fields, payload size) and encodes its data
    /// with a `timestamp` added.
    pub(crate) fn prepare(&self, target: Target, event: Event) -> Result<Envelope, ValidationError> {
        if let Target::User(user) = &target {
            auth::validate_user_id(user).map_err(|m| ValidationError::new("user_id", m))?;
        }
        event.validate()?;
        let mut data = event.to_data();
        if let Value::Object(object) = &mut data {
            object.entry("timestamp").or_insert_with(|| now_ms().into());
        }
        let data = data.to_string();
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

    /// Events waiting in the fullest queue of `user_id`'s connections in this process.
    /// It never passes [`SseConfig::queue_capacity`]: a full queue closes its connection.
    pub fn queue_depth_for_user(&self, user_id: &str) -> usize {
        self.inner
            .hub
            .queued_for_user(user_id)
            .into_iter()
            .max()
            .unwrap_or(0)
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

    /// The broker's current health.
    pub fn broker_health(&self) -> BrokerHealth {
        self.inner.broker.health()
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Figures for `/api/stats`.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        Stats {
            clients: inner.hub.client_count(),
            users: inner.hub.user_count(),
            events_published: inner.published.load(Ordering::Relaxed),
            events_delivered: inner.hub.counters.delivered.load(Ordering::Relaxed),
            events_failed: inner.failed.load(Ordering::Relaxed),
            slow_client_disconnects: inner.hub.counters.slow_disconnects.load(Ordering::Relaxed),
            connections_replaced: inner.hub.counters.replaced.load(Ordering::Relaxed),
            broker: inner.broker.kind(),
            broker_health: inner.broker.health(),
            uptime_ms: now_ms().saturating_sub(inner.started_at_ms),
        }
    }

    /// Ends every stream (clients reconnect, to another instance if there is one), refuses
    /// new connections and events, and stops background tasks. Idempotent.
    pub async fn shutdown(&self) {
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::info!(clients = self.client_count(), "sse service shutting down");
        self.inner.hub.close_all();
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        tasks.iter().for_each(JoinHandle::abort);
        self.inner.broker.shutdown().await;
    }
}

/// A heartbeat frame: no id, so it never moves a client's `Last-Event-ID`.
fn heartbeat_frame() -> bytes::Bytes {
    encode_frame(
        None,
        names::HEARTBEAT,
        &format!(r#"{{"timestamp":{}}}"#, now_ms()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::hub::Outbound;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Heartbeats come exactly every interval, on a paused clock.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_follow_the_interval_exactly() {
        let config = SseConfig::default()
            .jwt_secret(Some("paused-clock-secret-123".into()))
            .heartbeat_interval(Duration::from_secs(30));
        let service = SseService::start(config).await.unwrap();
        let mut conn = service.inner.hub.register(&"u".into(), None).unwrap();
        let mut heartbeats = || {
            let mut n = 0;
            while let Ok(item) = conn.queue.try_recv() {
                assert!(matches!(item, Outbound::Control(_)), "only heartbeats expected");
                n += 1;
            }
            n
        };
        tokio::time::advance(Duration::from_millis(29_999)).await;
        settle().await;
        assert_eq!(heartbeats(), 0, "heartbeat before the interval");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(heartbeats(), 1);
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(30)).await;
            settle().await;
        }
        assert_eq!(heartbeats(), 3);
        service.shutdown().await;
    }
}
