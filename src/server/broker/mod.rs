//! The [`Broker`]: where events get their id, are kept for replay, and are fanned out.
//!
//! One broker serves one process. [`MemoryBroker`] (the default) keeps everything in this
//! process; [`RedisBroker`] shares ids, history and fan-out between any number of instances
//! through one Redis, [`ClusterBroker`] through a Redis Cluster.
//! A broker knows nothing of connections: it is given a [`Delivery`] when it is built and
//! hands it every event (published here or, with Redis, anywhere) in id order (on a cluster,
//! in id order per lane: see [`Cursor`]), so each
//! connection sees ids increase and a `Last-Event-ID` is always a safe place to resume from;
//! it also passes on requests to end a user's streams. The
//! [`SseService`](crate::server::core::service::SseService) decides which users the broker listens for.

mod cluster;
mod memory;
mod presence;
mod redis;

pub use self::redis::{RedisBroker, RedisOptions};
pub use cluster::{router, subscriber, ClusterBroker, ClusterOptions};
pub use memory::MemoryBroker;

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_trait::async_trait;

pub use super::core::hub::OpenConnection;
pub use super::event::{Cursor, Envelope, EventId, PublishedEvent, Target};
pub use crate::api::BrokerHealth;

/// What a broker hands over to this process: in the service, the local hub.
pub trait Delivery: Send + Sync + 'static {
    /// An event, in id order (per lane, on a broker that orders by lane).
    fn deliver(&self, event: Arc<PublishedEvent>);
    /// Ends this process's streams of `user` (a disconnect sent from any instance);
    /// returns how many there were.
    fn disconnect(&self, user: &str) -> usize;
    /// Whether this process has a stream of `user` now: a broker listens for a user while
    /// it does, whatever order subscribe and unsubscribe calls reach it in.
    fn listens_for(&self, user: &str) -> bool;
    /// Closes `user`'s connections `ids` if `instance` is this process (see
    /// [`Broker::replace_elsewhere`]).
    fn replace(&self, _user: &str, _instance: &str, _ids: &[u64]) {}
}

/// How far behind the clock a lane with no event stands (see [`empty_head`]).
const EMPTY_HEAD_MARGIN_MS: u64 = 60_000;

/// Where a lane (on one Redis: the whole broker) with no event stands at `now`: where the
/// clock stood a minute ago. Ids follow the clock, so every event issued later is above it,
/// and a stream opened before the first event still tells its client where it starts:
/// without an id, a client that comes back is a new one, and what the server wrote just
/// before the connection died counts as delivered. Instances' clocks must agree within
/// that minute (NTP), or an event from one running behind could be issued below it.
pub(crate) fn empty_head(now: u64) -> u64 {
    now.saturating_sub(EMPTY_HEAD_MARGIN_MS).saturating_mul(1000)
}

/// How brokers hold their [`Delivery`].
pub type EventSink = Arc<dyn Delivery>;

/// How long events are kept: `default` for replay by `Last-Event-ID`, longer for the event
/// types listed in `offline`, which are also delivered to a user who was not connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    pub default: Duration,
    pub offline: Vec<(String, Duration)>,
}

impl Retention {
    /// How long events named `name` are kept.
    pub fn for_event(&self, name: &str) -> Duration {
        self.offline_for(name)
            .map_or(self.default, |d| d.max(self.default))
    }

    /// How long `name` waits for a user who is offline; `None` when it does not.
    pub fn offline_for(&self, name: &str) -> Option<Duration> {
        self.offline
            .iter()
            .find(|(n, d)| n == name && !d.is_zero())
            .map(|(_, d)| *d)
    }

    /// Whether events named `name` are kept longer than the replay retention. On Redis
    /// they go to a stream of their own, so a flood of short-lived events (progress, custom
    /// events) is trimmed at the replay retention, not kept as long as notifications.
    pub fn kept_longer(&self, name: &str) -> bool {
        self.offline_for(name).is_some_and(|d| d > self.default)
    }

    /// How long the Redis stream holding events named `name` keeps its entries: the replay
    /// retention, or for the types [kept longer](Self::kept_longer), which share one
    /// stream, the longest of all. A replay still passes over entries past their own
    /// type's retention ([`keeps`](Self::keeps)).
    pub fn stream_retention(&self, name: &str) -> Duration {
        match self.kept_longer(name) {
            true => self.longest(),
            false => self.default,
        }
    }

    /// The longest any event is kept.
    pub fn longest(&self) -> Duration {
        self.offline
            .iter()
            .map(|(_, d)| *d)
            .fold(self.default, Duration::max)
    }

    /// Whether an event published at `published_at_ms` is still kept at `now_ms`.
    pub fn keeps(&self, event: &PublishedEvent, now_ms: u64) -> bool {
        now_ms.saturating_sub(event.published_at_ms) <= self.for_event(&event.name).as_millis() as u64
    }
}

/// Latest wins: of several events with the same name and [coalescing
/// key](PublishedEvent::coalesce_key) (the progress of one reel), only the newest stays.
/// Order is kept.
pub fn coalesce_latest(events: Vec<Arc<PublishedEvent>>) -> Vec<Arc<PublishedEvent>> {
    let mut seen = HashSet::new();
    let mut kept: Vec<_> = events
        .into_iter()
        .rev()
        .filter(|e| {
            e.coalesce_key
                .as_ref()
                .is_none_or(|key| seen.insert((e.name.clone(), key.clone())))
        })
        .collect();
    kept.reverse();
    kept
}

/// What a reconnecting user missed.
#[derive(Debug, Default)]
pub struct Replay {
    /// Their events and broadcasts after the given position, in id order (in each lane).
    pub events: Vec<Arc<PublishedEvent>>,
    /// Some events after the id are no longer kept (or the id is from an earlier run):
    /// the client is sent `resync`.
    pub gap: bool,
    /// More events follow these (the page was full): ask again from the last one.
    pub more: bool,
}

/// Why a broker could not publish or replay.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker is shut down")]
    ShutDown,
    /// The backing store cannot be used (e.g. a Redis too old); found at start.
    #[error("{0}")]
    Unsupported(String),
}

/// One instance's write of its presence (see [`Broker::write_presence`]).
#[derive(Debug, Clone, Copy)]
pub struct PresenceWrite<'a> {
    pub instance: &'a str,
    /// This instance's [`Stats`](crate::api::Stats) as JSON.
    pub figures: &'a str,
    /// Users and their open connections here; none removes a user.
    pub users: &'a [(Arc<str>, Vec<OpenConnection>)],
    /// `users` holds every user connected here (what was written before is replaced).
    pub full: bool,
    /// How long the write stands if the instance writes nothing more.
    pub ttl: Duration,
}

/// One live instance as the presence has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePresence {
    pub instance: String,
    /// Its figures as JSON, as it last wrote them (empty in a read for one user).
    pub figures: String,
    /// The asked-for user's open connections there.
    pub connections: Vec<OpenConnection>,
    /// How long ago it last wrote, by the broker's clock.
    pub age_ms: u64,
}

/// Assigns ids, keeps history for replay, and fans events out to its [`EventSink`].
///
/// Implementations must hand events to the sink in id order (per lane where
/// [`Broker::in_lanes`]), and must make an event
/// replayable no later than they hand it to the sink.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// A short name for stats: `memory`, `redis` or `redis-cluster`.
    fn kind(&self) -> &'static str;

    /// Whether ids are ordered per lane (see [`Cursor::Lanes`]): a client's cursor then
    /// holds both lanes, and event frames carry no `id:` line of their own.
    fn in_lanes(&self) -> bool {
        false
    }

    /// Publishes a batch in order, atomically (on a cluster, atomically per lane: a user's
    /// events, or the broadcasts); returns one id per event.
    async fn publish(&self, events: Vec<Envelope>) -> Result<Vec<EventId>, BrokerError>;

    /// Events for `user` (and broadcasts) after `after`, in order (in each lane): all of
    /// them. A stream reads by [`replay_page`](Self::replay_page), so that no client's
    /// backlog is held in memory at once.
    async fn replay(&self, user: &str, after: Cursor) -> Result<Replay, BrokerError> {
        self.replay_page(user, after, usize::MAX).await
    }

    /// Like [`replay`](Self::replay), at most about `limit` events (a page of the backing
    /// store more at most): the first of them in each lane, with `more` set when others
    /// follow. Where `gap` is set, it is set on the first page.
    async fn replay_page(&self, user: &str, after: Cursor, limit: usize) -> Result<Replay, BrokerError>;

    /// Where the newest event for `user` (or a broadcast) published so far stands: the
    /// start when none. Lanes on a broker that orders by lane, one id otherwise.
    async fn head(&self, user: &str) -> Result<Cursor, BrokerError>;

    /// Where offline delivery for `user` starts: how far one of their connections had got
    /// when it closed; `None` for a user never seen (or forgotten).
    async fn delivered_through(&self, user: &str) -> Result<Option<Cursor>, BrokerError>;

    /// Records that a connection of `user` had received everything through `cursor` (kept
    /// where further than what is recorded).
    async fn set_delivered_through(&self, user: &str, cursor: Cursor);

    /// Start handing `user`'s events to the sink: their first local connection opened.
    /// Broadcasts always come. The in-process broker hands over everything anyway.
    async fn subscribe(&self, _user: &str) {}

    /// Stop handing `user`'s events to the sink: their last local connection closed.
    async fn unsubscribe(&self, _user: &str) {}

    /// Current health.
    fn health(&self) -> BrokerHealth;

    /// Ends every stream of `user` on every instance; returns how many were closed.
    async fn disconnect(&self, user: &str) -> Result<usize, BrokerError>;

    /// Stores `value` under `key` for `ttl` unless the key holds a value; returns the value
    /// it holds then (`None`: stored). Shared by every instance on the broker; what
    /// `Idempotency-Key` records live in.
    async fn put_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BrokerError>;

    /// Stores `value` under `key` for `ttl`, replacing what it holds.
    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), BrokerError>;

    /// Forgets `key`.
    async fn remove(&self, key: &str) -> Result<(), BrokerError>;

    /// Writes this instance's part of the presence every instance reads (see
    /// [`read_presence`](Self::read_presence)); `Ok(false)` when the users' counts it last
    /// wrote were gone (expired while the broker was away), so the next write must hold
    /// them all. A broker with no other instances (in-process) keeps nothing.
    async fn write_presence(&self, _write: &PresenceWrite<'_>) -> Result<bool, BrokerError> {
        Ok(true)
    }

    /// Every live instance's figures and, with `user`, that user's connections there.
    /// `None` from a broker with no other instances: this process is all there is.
    async fn read_presence(
        &self,
        _user: Option<&str>,
        _ttl: Duration,
    ) -> Result<Option<Vec<InstancePresence>>, BrokerError> {
        Ok(None)
    }

    /// Takes this instance out of the presence at once (it is stopping).
    async fn leave_presence(&self, _instance: &str) {}

    /// Asks `instance` to close `user`'s connections `ids` (the per-user limit across
    /// instances chose them), through the user's channel like a disconnect. A broker with
    /// no other instances has nothing to send.
    async fn replace_elsewhere(&self, _user: &str, _instance: &str, _ids: &[u64]) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Drops history past retention; called every cleanup interval.
    async fn cleanup(&self) {}

    /// Stops background work.
    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u64, name: &str, key: Option<&str>) -> Arc<PublishedEvent> {
        let envelope = Envelope {
            target: Target::Broadcast,
            name: name.into(),
            data: "{}".into(),
            timestamp_ms: 0,
            coalesce_key: key.map(Into::into),
        };
        Arc::new(PublishedEvent::new(EventId(id), envelope))
    }

    #[test]
    fn only_the_newest_of_each_name_and_key_survives() {
        let events = vec![
            event(1, "reel_upload_progress", Some("a")),
            event(2, "reel_upload_progress", Some("b")),
            event(3, "notification", None),
            event(4, "reel_upload_progress", Some("a")),
            event(5, "other.progress", Some("a")),
            event(6, "reel_upload_progress", Some("a")),
            event(7, "notification", None),
        ];
        let ids: Vec<u64> = coalesce_latest(events).iter().map(|e| e.id.0).collect();
        assert_eq!(ids, [2, 3, 5, 6, 7]);
    }

    #[test]
    fn offline_types_are_kept_longer() {
        let r = Retention {
            default: Duration::from_secs(300),
            offline: vec![
                ("notification".into(), Duration::from_secs(86_400)),
                ("system_alert".into(), Duration::ZERO),
            ],
        };
        assert_eq!(r.for_event("notification"), Duration::from_secs(86_400));
        assert_eq!(r.for_event("custom.x"), Duration::from_secs(300));
        assert_eq!(
            r.offline_for("system_alert"),
            None,
            "zero turns offline delivery off"
        );
        assert_eq!(r.longest(), Duration::from_secs(86_400));
        assert!(r.kept_longer("notification"));
        assert!(!r.kept_longer("system_alert") && !r.kept_longer("custom.x"));
        assert_eq!(r.stream_retention("notification"), Duration::from_secs(86_400));
        assert_eq!(r.stream_retention("custom.x"), Duration::from_secs(300));
    }
}
