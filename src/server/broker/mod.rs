//! The [`Broker`]: where events get their id, are kept for replay, and are fanned out.
//!
//! One broker serves one process. [`MemoryBroker`] (the default) keeps everything in this
//! process; [`RedisBroker`] shares ids, history and fan-out between any number of instances.
//! Both hand every event to the local [`Hub`](super::hub::Hub) in id order, so each connection
//! sees ids increase and a `Last-Event-ID` is always a safe place to resume from.

mod memory;
mod redis;

pub use self::redis::RedisBroker;
pub use memory::MemoryBroker;

use std::{collections::HashSet, fmt, str::FromStr, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};

/// The id of a published event: opaque to clients, increasing, valid as `Last-Event-ID`.
///
/// Ids come from one counter per broker (one per Redis for [`RedisBroker`]), so a user's
/// events and broadcasts share one order and one id resumes both exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventId(pub u64);

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EventId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse().map(EventId)
    }
}

impl serde::Serialize for EventId {
    /// As a string: ids may pass 2^53, past what a JavaScript number holds exactly.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Who an event is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    User(Arc<str>),
    /// Every connected user.
    Broadcast,
}

/// A validated event on its way to the broker: target, name and the JSON of its `data`.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub target: Target,
    pub name: Arc<str>,
    /// The `data` object as JSON text, `timestamp` included.
    pub data: String,
}

/// An event with its id, encoded once as an SSE frame that every connection shares.
#[derive(Debug)]
pub struct PublishedEvent {
    pub id: EventId,
    pub target: Target,
    pub name: Arc<str>,
    /// When the broker accepted it, ms since the Unix epoch; drives retention.
    pub published_at_ms: u64,
    /// `id: ..\nevent: ..\ndata: ..\n\n`, ready to write to any connection.
    pub frame: Bytes,
}

impl PublishedEvent {
    pub fn new(id: EventId, envelope: Envelope, published_at_ms: u64) -> Self {
        let frame = encode_frame(Some(id), &envelope.name, &envelope.data);
        Self {
            id,
            target: envelope.target,
            name: envelope.name,
            published_at_ms,
            frame,
        }
    }

    /// The JSON of its `data`, read back out of the frame (for brokers that store it).
    pub fn data(&self) -> &str {
        let text = std::str::from_utf8(&self.frame).unwrap_or_default();
        text.split_once("\ndata: ")
            .map(|(_, rest)| rest.trim_end_matches('\n'))
            .unwrap_or("{}")
    }
}

/// Encodes one SSE frame. `name` must be a validated event name and `data` one line of
/// JSON (serde_json never emits a raw newline), so no payload can forge a field.
pub fn encode_frame(id: Option<EventId>, name: &str, data: &str) -> Bytes {
    debug_assert!(!name.contains(['\n', '\r']) && !data.contains(['\n', '\r']));
    let mut buf = BytesMut::with_capacity(name.len() + data.len() + 40);
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        buf.put_slice(id.to_string().as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_slice(b"event: ");
    buf.put_slice(name.as_bytes());
    buf.put_slice(b"\ndata: ");
    buf.put_slice(data.as_bytes());
    buf.put_slice(b"\n\n");
    buf.freeze()
}

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

/// Latest wins for upload progress: of several `reel_upload_progress` events for one reel,
/// only the newest stays. Order is kept.
pub fn latest_progress_only(events: Vec<Arc<PublishedEvent>>) -> Vec<Arc<PublishedEvent>> {
    let reel_of = |e: &PublishedEvent| -> Option<String> {
        if &*e.name != crate::events::names::REEL_UPLOAD_PROGRESS {
            return None;
        }
        let data: serde_json::Value = serde_json::from_str(e.data()).ok()?;
        data.get("reelId")?.as_str().map(str::to_string)
    };
    let mut seen = HashSet::new();
    let mut kept: Vec<_> = events
        .into_iter()
        .rev()
        .filter(|e| reel_of(e).is_none_or(|reel| seen.insert(reel)))
        .collect();
    kept.reverse();
    kept
}

/// What a reconnecting user missed.
#[derive(Debug, Default)]
pub struct Replay {
    /// Their events and broadcasts after the given id, in id order.
    pub events: Vec<Arc<PublishedEvent>>,
    /// Some events after the id are no longer kept (or the id is from an earlier run):
    /// the client is sent `resync`.
    pub gap: bool,
}

/// How the broker is doing, for `/healthz`, `/api/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerHealth {
    Healthy,
    /// Cannot reach its backing store; publishing fails, local connections keep working.
    Degraded,
}

/// Why a broker could not publish or replay.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker is shut down")]
    ShutDown,
}

/// Assigns ids, keeps history for replay, and fans events out to the local hub.
///
/// Implementations must hand events to the hub in id order, and must make an event
/// replayable no later than they hand it to the hub.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// A short name for stats: `memory` or `redis`.
    fn kind(&self) -> &'static str;

    /// Publishes a batch atomically in order; returns one id per event.
    async fn publish(&self, events: Vec<Envelope>) -> Result<Vec<EventId>, BrokerError>;

    /// Events for `user` (and broadcasts) after `after`, in order.
    async fn replay(&self, user: &str, after: EventId) -> Result<Replay, BrokerError>;

    /// The id of the newest event published so far (0 when none).
    async fn head(&self) -> Result<EventId, BrokerError>;

    /// Where offline delivery for `user` starts: the highest id one of their connections
    /// had received when it closed; `None` for a user never seen (or forgotten).
    async fn delivered_through(&self, user: &str) -> Result<Option<EventId>, BrokerError>;

    /// Records that a connection of `user` had received everything through `id` (kept if
    /// higher than what is recorded).
    async fn set_delivered_through(&self, user: &str, id: EventId);

    /// The first local connection of `user` opened: start receiving their events.
    async fn user_online(&self, _user: &str) {}

    /// The last local connection of `user` closed: stop receiving their events.
    async fn user_offline(&self, _user: &str) {}

    /// Current health.
    fn health(&self) -> BrokerHealth;

    /// Drops history past retention; called every cleanup interval.
    async fn cleanup(&self) {}

    /// Stops background work.
    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(id: u64, reel: &str, pct: u8) -> Arc<PublishedEvent> {
        let data = format!(r#"{{"reelId":"{reel}","progress":{pct},"status":"uploading"}}"#);
        let envelope = Envelope {
            target: Target::Broadcast,
            name: "reel_upload_progress".into(),
            data,
        };
        Arc::new(PublishedEvent::new(EventId(id), envelope, 0))
    }

    #[test]
    fn only_the_newest_progress_per_reel_survives() {
        let other = Arc::new(PublishedEvent::new(
            EventId(3),
            Envelope {
                target: Target::Broadcast,
                name: "notification".into(),
                data: "{}".into(),
            },
            0,
        ));
        let events = vec![
            progress(1, "a", 10),
            progress(2, "b", 10),
            other,
            progress(4, "a", 50),
            progress(5, "a", 90),
        ];
        let ids: Vec<u64> = latest_progress_only(events).iter().map(|e| e.id.0).collect();
        assert_eq!(ids, [2, 3, 5]);
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
    }

    #[test]
    fn frame_is_one_sse_event() {
        let frame = encode_frame(Some(EventId(42)), "notification", r#"{"title":"a\nb"}"#);
        assert_eq!(
            &frame[..],
            b"id: 42\nevent: notification\ndata: {\"title\":\"a\\nb\"}\n\n"
        );
        let event = PublishedEvent {
            id: EventId(42),
            target: Target::Broadcast,
            name: "notification".into(),
            published_at_ms: 0,
            frame,
        };
        assert_eq!(event.data(), r#"{"title":"a\nb"}"#);
    }
}
