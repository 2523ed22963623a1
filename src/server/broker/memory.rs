//! [`MemoryBroker`]: one process on its own, no Redis. The default.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;

use super::{
    Broker, BrokerError, BrokerHealth, Cursor, Envelope, EventId, EventSink, PublishedEvent, Replay,
    Retention, Target,
};
use crate::server::clock::now_ms;

/// Keeps history in a ring ordered by id and hands events to its sink while still holding
/// its lock, so the sink sees them in id order even when many tasks publish at once.
pub struct MemoryBroker {
    state: Mutex<State>,
    records: Mutex<Records>,
    sink: EventSink,
    retention: Retention,
    capacity: usize,
    max_bytes: usize,
}

/// Values of [`Broker::put_if_absent`] with their expiry (ms), at most
/// [`MAX_RECORD_BYTES`] in all.
#[derive(Default)]
struct Records {
    values: HashMap<String, (String, u64)>,
    bytes: usize,
}

/// What the records may hold; past it (after forgetting expired ones) a new one is refused.
const MAX_RECORD_BYTES: usize = 64 << 20;

impl Records {
    fn cost(key: &str, value: &str) -> usize {
        key.len() + value.len() + 64
    }

    fn live(&self, key: &str, now: u64) -> Option<&String> {
        self.values
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(v, _)| v)
    }

    fn forget_expired(&mut self, now: u64) {
        let mut freed = 0;
        self.values.retain(|key, (value, expires)| {
            let keep = *expires > now;
            if !keep {
                freed += Self::cost(key, value);
            }
            keep
        });
        self.bytes -= freed;
    }

    fn set(&mut self, key: &str, value: &str, ttl: Duration, now: u64) -> Result<(), BrokerError> {
        self.remove(key);
        let cost = Self::cost(key, value);
        if self.bytes + cost > MAX_RECORD_BYTES {
            self.forget_expired(now);
        }
        if self.bytes + cost > MAX_RECORD_BYTES {
            return Err(BrokerError::Unavailable("idempotency records are full".into()));
        }
        self.bytes += cost;
        let expires = now.saturating_add(ttl.as_millis() as u64);
        self.values.insert(key.to_string(), (value.to_string(), expires));
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        if let Some((value, _)) = self.values.remove(key) {
            self.bytes -= Self::cost(key, &value);
        }
    }
}

/// What one kept event costs beyond its frame: the `Arc`, its fields, and its places in
/// the history ring and the audience index.
const EVENT_OVERHEAD_BYTES: usize = 192;

fn weight(event: &PublishedEvent) -> usize {
    event.frame.len() + EVENT_OVERHEAD_BYTES
}

struct State {
    next_id: u64,
    /// Increasing ids, oldest first (with holes where short-lived events expired).
    history: VecDeque<Arc<PublishedEvent>>,
    /// The same events by audience, so a replay reads only what is for its user instead of
    /// scanning everyone's history (that scan was a third of the server's CPU in a
    /// reconnect storm).
    index: Index,
    /// Highest id no longer in `history` (or issued before this process started).
    forgotten_through: u64,
    /// What `history` holds, in bytes (see [`weight`]).
    bytes: usize,
    /// Per user: the highest id a closed connection had received, and when.
    delivered: HashMap<Arc<str>, (u64, u64)>,
}

impl MemoryBroker {
    /// A broker that hands events to `sink`, keeps them as `retention` says, and at most
    /// `capacity` of them and `max_bytes` of them (the oldest go first).
    pub fn new(sink: EventSink, retention: Retention, capacity: usize, max_bytes: usize) -> Self {
        // Ids start at the clock (ms x 1000), so a restarted server never reuses an id a
        // browser still holds: an older id is recognised and answered with `resync`.
        let first_id = now_ms().saturating_mul(1000);
        Self {
            state: Mutex::new(State {
                next_id: first_id,
                history: VecDeque::new(),
                index: Index::default(),
                forgotten_through: first_id - 1,
                bytes: 0,
                delivered: HashMap::new(),
            }),
            records: Mutex::default(),
            sink,
            retention,
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_oldest(state: &mut State) {
        if let Some(old) = state.history.pop_front() {
            state.forgotten_through = state.forgotten_through.max(old.id.0);
            state.bytes -= weight(&old);
            state.index.forget_oldest(&old);
        }
    }
}

/// History by audience: each list in id order, holding the same events as `history`.
#[derive(Default)]
struct Index {
    broadcasts: VecDeque<Arc<PublishedEvent>>,
    users: HashMap<Arc<str>, VecDeque<Arc<PublishedEvent>>>,
}

impl Index {
    fn list_mut(&mut self, target: &Target) -> &mut VecDeque<Arc<PublishedEvent>> {
        match target {
            Target::Broadcast => &mut self.broadcasts,
            Target::User(user) => self.users.entry(user.clone()).or_default(),
        }
    }

    fn add(&mut self, event: &Arc<PublishedEvent>) {
        self.list_mut(&event.target).push_back(event.clone());
    }

    /// `event` was the oldest in history, so it is the oldest of its list.
    fn forget_oldest(&mut self, event: &PublishedEvent) {
        let list = self.list_mut(&event.target);
        if list.front().is_some_and(|e| e.id == event.id) {
            list.pop_front();
        }
        if let Target::User(user) = &event.target {
            if self.users.get(user).is_some_and(VecDeque::is_empty) {
                self.users.remove(user);
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(&PublishedEvent) -> bool) {
        self.broadcasts.retain(|e| keep(e));
        self.users.retain(|_, list| {
            list.retain(|e| keep(e));
            !list.is_empty()
        });
    }

    /// The user's events and broadcasts after `after`, in order, at most `limit`; and
    /// whether more follow.
    fn after(&self, user: &str, after: EventId, limit: usize) -> (Vec<Arc<PublishedEvent>>, bool) {
        let empty = VecDeque::new();
        let own = self.users.get(user).unwrap_or(&empty);
        let mut own = own.range(own.partition_point(|e| e.id <= after)..).peekable();
        let all = &self.broadcasts;
        let mut all = all.range(all.partition_point(|e| e.id <= after)..).peekable();
        let mut merged = Vec::new();
        loop {
            if merged.len() >= limit {
                return (merged, own.peek().is_some() || all.peek().is_some());
            }
            let next = match (own.peek(), all.peek()) {
                (Some(a), Some(b)) if a.id < b.id => own.next(),
                (Some(_), Some(_)) | (None, Some(_)) => all.next(),
                (Some(_), None) => own.next(),
                (None, None) => break,
            };
            merged.extend(next.cloned());
        }
        (merged, false)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, events: Vec<Envelope>) -> Result<Vec<EventId>, BrokerError> {
        let mut state = self.lock();
        let mut ids = Vec::with_capacity(events.len());
        let clock = now_ms().saturating_mul(1000);
        for envelope in events {
            // A hybrid clock, as the Redis broker's: increasing, and close to the time.
            let id = EventId(state.next_id.max(clock));
            state.next_id = id.0 + 1;
            let event = Arc::new(PublishedEvent::new(id, envelope));
            let added = weight(&event);
            while !state.history.is_empty()
                && (state.history.len() >= self.capacity || state.bytes + added > self.max_bytes)
            {
                Self::forget_oldest(&mut state);
            }
            state.bytes += added;
            state.history.push_back(event.clone());
            state.index.add(&event);
            self.sink.deliver(event);
            ids.push(id);
        }
        Ok(ids)
    }

    async fn replay_page(&self, user: &str, after: Cursor, limit: usize) -> Result<Replay, BrokerError> {
        let after = after.earliest();
        let state = self.lock();
        if after.0 >= state.next_id {
            // Not issued by this broker: from another server or forged.
            return Ok(Replay {
                gap: true,
                ..Replay::default()
            });
        }
        let gap = after.0 < state.forgotten_through;
        let (events, more) = state.index.after(user, after, limit);
        Ok(Replay { events, gap, more })
    }

    fn health(&self) -> BrokerHealth {
        BrokerHealth::Healthy
    }

    async fn disconnect(&self, user: &str) -> Result<usize, BrokerError> {
        Ok(self.sink.disconnect(user))
    }

    async fn head(&self, _user: &str) -> Result<Cursor, BrokerError> {
        Ok(Cursor::One(EventId(self.lock().next_id - 1)))
    }

    async fn delivered_through(&self, user: &str) -> Result<Option<Cursor>, BrokerError> {
        Ok(self
            .lock()
            .delivered
            .get(user)
            .map(|(id, _)| Cursor::One(EventId(*id))))
    }

    async fn set_delivered_through(&self, user: &str, cursor: Cursor) {
        let (id, _) = cursor.lanes();
        let now = now_ms();
        let mut state = self.lock();
        let entry = state.delivered.entry(user.into()).or_insert((0, now));
        *entry = (entry.0.max(id.0), now);
    }

    async fn put_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BrokerError> {
        let now = now_ms();
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = records.live(key, now) {
            return Ok(Some(held.clone()));
        }
        records.set(key, value, ttl, now).map(|()| None)
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.set(key, value, ttl, now_ms())
    }

    async fn remove(&self, key: &str) -> Result<(), BrokerError> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        Ok(())
    }

    async fn cleanup(&self) {
        let now = now_ms();
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget_expired(now);
        let mut state = self.lock();
        let State {
            history,
            index,
            forgotten_through,
            bytes,
            delivered,
            ..
        } = &mut *state;
        history.retain(|e| {
            let keep = self.retention.keeps(e, now);
            if !keep {
                *forgotten_through = (*forgotten_through).max(e.id.0);
                *bytes -= weight(e);
            }
            keep
        });
        index.retain(|e| self.retention.keeps(e, now));
        let longest = self.retention.longest().as_millis() as u64;
        delivered.retain(|_, (_, at)| now.saturating_sub(*at) <= longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::server::broker::Target;

    fn envelope(target: Target) -> Envelope {
        Envelope {
            target,
            name: "notification".into(),
            data: "{}".into(),
            timestamp_ms: now_ms(),
            coalesce_key: None,
        }
    }

    struct Nowhere;

    impl crate::server::broker::Delivery for Nowhere {
        fn deliver(&self, _: Arc<PublishedEvent>) {}
        fn disconnect(&self, _: &str) -> usize {
            0
        }
        fn listens_for(&self, _: &str) -> bool {
            false
        }
    }

    fn broker(retention: Retention, capacity: usize) -> MemoryBroker {
        MemoryBroker::new(Arc::new(Nowhere), retention, capacity, usize::MAX)
    }

    /// History is bounded in bytes as well as in count: the oldest events go first, and a
    /// resume from before them is told so.
    #[tokio::test]
    async fn history_is_bounded_in_bytes() {
        let broker = MemoryBroker::new(
            Arc::new(Nowhere),
            keep(Duration::from_secs(60)),
            1_000_000,
            100_000,
        );
        let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(10_000));
        let mut ids = Vec::new();
        for _ in 0..100 {
            let mut e = envelope(to("a"));
            e.data = big.clone();
            ids.extend(broker.publish(vec![e]).await.unwrap());
        }
        {
            let state = broker.lock();
            assert!(state.bytes <= 100_000, "{} bytes kept", state.bytes);
            assert!(state.history.len() < 10, "{} events kept", state.history.len());
            let kept: usize = state.history.iter().map(|e| weight(e)).sum();
            assert_eq!(kept, state.bytes, "the byte count matches what is held");
        }
        let replay = broker
            .replay("a", Cursor::One(EventId(ids[0].0 - 1)))
            .await
            .unwrap();
        assert!(replay.gap);
        assert_eq!(replay.events.last().unwrap().id, *ids.last().unwrap());
    }

    fn to(user: &str) -> Target {
        Target::User(user.into())
    }

    fn keep(default: Duration) -> Retention {
        Retention {
            default,
            offline: Vec::new(),
        }
    }

    /// The per-audience index forgets with the history: once capacity pushes events out, a
    /// replay neither returns them nor misses a newer one, and broadcasts interleave by id.
    #[tokio::test]
    async fn replay_after_capacity_eviction_keeps_only_what_history_holds() {
        let broker = broker(keep(Duration::from_secs(60)), 3);
        let ids = broker
            .publish(vec![
                envelope(to("a")),
                envelope(to("b")),
                envelope(to("a")),
                envelope(Target::Broadcast),
                envelope(to("a")),
            ])
            .await
            .unwrap();
        let before_all = EventId(ids[0].0 - 1);
        let replay = broker.replay("a", Cursor::One(before_all)).await.unwrap();
        assert!(replay.gap, "two events were pushed out");
        let got: Vec<_> = replay.events.iter().map(|e| e.id).collect();
        assert_eq!(got, vec![ids[2], ids[3], ids[4]]);
        let got: Vec<_> = broker
            .replay("b", Cursor::One(before_all))
            .await
            .unwrap()
            .events
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, vec![ids[3]], "b's own event is gone, the broadcast stays");
        assert!(
            !broker.lock().index.users.contains_key("b"),
            "empty lists are dropped"
        );
    }

    #[tokio::test]
    async fn replay_returns_exactly_what_the_user_missed_in_order() {
        let broker = broker(keep(Duration::from_secs(60)), 100);
        let ids = broker
            .publish(vec![
                envelope(to("a")),
                envelope(to("b")),
                envelope(Target::Broadcast),
                envelope(to("a")),
            ])
            .await
            .unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        let replay = broker.replay("a", Cursor::One(ids[0])).await.unwrap();
        assert!(!replay.gap);
        let got: Vec<_> = replay.events.iter().map(|e| e.id).collect();
        assert_eq!(got, vec![ids[2], ids[3]]);
        assert!(broker
            .replay("a", Cursor::One(ids[3]))
            .await
            .unwrap()
            .events
            .is_empty());
    }

    #[tokio::test]
    async fn ids_older_than_history_or_unknown_ask_for_resync() {
        let broker = broker(keep(Duration::from_secs(60)), 2);
        let ids = broker
            .publish((0..4).map(|_| envelope(to("a"))).collect())
            .await
            .unwrap();
        // ids[0] and ids[1] fell out of the 2-event history.
        let replay = broker.replay("a", Cursor::One(ids[0])).await.unwrap();
        assert!(replay.gap);
        assert_eq!(replay.events.len(), 2);
        assert!(!broker.replay("a", Cursor::One(ids[1])).await.unwrap().gap);
        assert!(
            broker
                .replay("a", Cursor::One(EventId(ids[3].0 + 100)))
                .await
                .unwrap()
                .gap
        );
        assert!(
            broker.replay("a", Cursor::One(EventId(5))).await.unwrap().gap,
            "id from an earlier run"
        );
    }

    #[tokio::test]
    async fn cleanup_forgets_events_past_retention() {
        let broker = broker(keep(Duration::from_millis(1)), 100);
        let ids = broker
            .publish(vec![envelope(to("a")), envelope(to("a"))])
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        broker.cleanup().await;
        let replay = broker.replay("a", Cursor::One(ids[0])).await.unwrap();
        assert!(replay.gap && replay.events.is_empty());
    }
}
