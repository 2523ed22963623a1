//! [`ShardedSubscriber`]: `SSUBSCRIBE`s channels on the primaries that own them (RESP3
//! connections with a push sender), through the [`ClusterRouter`]'s slot table, and
//! re-subscribes them wherever they live after a failover or a slot migration, then says
//! so with [`SubscriberEvent::Resubscribed`] so that the consumer can catch up on what it
//! missed (from Redis streams).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use redis::{aio::MultiplexedConnection, PushInfo, PushKind, RedisError, Value};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::router::{classify, key_slot, value_to_string, Action, Backoff, ClusterRouter, RouterError};

/// How many `SSUBSCRIBE`s one shard connection has in flight at once.
const SUBSCRIBE_CONCURRENCY: usize = 64;

/// What a [`ShardedSubscriber`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriberEvent {
    /// An `smessage` on a channel that is subscribed.
    Message { channel: String, payload: Vec<u8> },
    /// The connection carrying these channels was lost: messages may be missed until
    /// [`Resubscribed`](Self::Resubscribed) names them again. The consumer may show
    /// itself degraded.
    Lost { channels: Vec<String> },
    /// These channels are live again (after a lost connection, a slot migration, or a
    /// full event queue), sent only after their `SSUBSCRIBE` succeeded: the consumer
    /// catches up on what it missed from the streams, then carries on with messages.
    Resubscribed { channels: Vec<String> },
}

/// Sharded subscriptions over a [`ClusterRouter`]: one RESP3 connection per primary that
/// owns a subscribed channel, and a background task that re-subscribes channels wherever
/// their slot lives after a failover or migration.
///
/// Events go to a bounded queue. Messages are offered with `try_send` from the
/// connection's push callback, which must never block the connection's task.
///
/// The promise to the consumer, per channel: once a message of a channel may have been
/// missed (its connection dropped, its slot moved, or the queue was full), no message of
/// that channel is queued until its [`SubscriberEvent::Resubscribed`] is; messages in
/// between are dropped. So whatever the consumer read back from its streams when it
/// handles `Resubscribed` covers every message it did not get, and nothing is lost. `Lost`
/// is sent by the background task and waits for room; `Resubscribed` is queued together
/// with the end of the channel's suppression, and retried while the queue is full.
///
/// Dropping the subscriber closes its connections and stops its task.
pub struct ShardedSubscriber {
    inner: Arc<SubInner>,
}

struct SubInner {
    router: ClusterRouter,
    events: mpsc::Sender<SubscriberEvent>,
    state: Mutex<SubState>,
    /// Wakes the background task (a lost shard, a moved channel, an overflow).
    wake: Arc<Notify>,
    /// Serialises (un)subscribe work so that a channel is never on two connections.
    ops: tokio::sync::Mutex<()>,
    next_shard_id: AtomicU64,
}

#[derive(Default)]
struct SubState {
    /// Channels wanted, and the shard (connection id) each is subscribed on; `None` while
    /// pending.
    channels: HashMap<String, Option<u64>>,
    /// Pending channels that get `Resubscribed` once live again.
    catch_up: HashSet<String>,
    /// Live subscriber connections by node address.
    shards: HashMap<String, Shard>,
    /// Shards whose connection reported a disconnection.
    lost: HashSet<u64>,
    /// Channels whose message did not fit in the event queue.
    overflowed: HashSet<String>,
    /// Channels whose messages are dropped until their `Resubscribed` is queued.
    suppressed: HashSet<String>,
    /// Channels live again whose `Resubscribed` is still to be queued.
    announce: HashSet<String>,
    /// Refresh the slot table before the next pass.
    refresh: bool,
}

struct Shard {
    id: u64,
    conn: MultiplexedConnection,
}

/// Outcome of one `SSUBSCRIBE`.
enum SubscribeResult {
    Done,
    /// Slot elsewhere or cluster busy: refresh and retry later.
    Retry,
    /// The shard connection failed.
    Broken,
}

impl ClusterRouter {
    /// A sharded subscriber and the receiver of its events (a queue of `capacity`).
    pub fn subscriber(&self, capacity: usize) -> (ShardedSubscriber, mpsc::Receiver<SubscriberEvent>) {
        let (events, receiver) = mpsc::channel(capacity.max(1));
        let inner = Arc::new(SubInner {
            router: self.clone(),
            events,
            state: Mutex::new(SubState::default()),
            wake: Arc::new(Notify::new()),
            ops: tokio::sync::Mutex::new(()),
            next_shard_id: AtomicU64::new(1),
        });
        tokio::spawn(background(Arc::downgrade(&inner), inner.wake.clone()));
        (ShardedSubscriber { inner }, receiver)
    }
}

impl ShardedSubscriber {
    /// Subscribes `channel` and returns once its `SSUBSCRIBE` succeeded. If that does not
    /// happen within the router's retry budget it returns an error, but the channel stays
    /// wanted: the background task keeps trying and sends `Resubscribed` when it is live.
    pub async fn subscribe(&self, channel: impl Into<String>) -> Result<(), RouterError> {
        self.subscribe_many(vec![channel.into()]).await
    }

    /// [`subscribe`](Self::subscribe) for many channels at once (pipelined per shard).
    pub async fn subscribe_many(&self, channels: Vec<String>) -> Result<(), RouterError> {
        let inner = &self.inner;
        {
            let mut state = inner.state();
            for channel in &channels {
                state.channels.entry(channel.clone()).or_insert(None);
            }
        }
        let started = Instant::now();
        let mut retries = Backoff::default();
        let mut backoff = retries.next();
        loop {
            inner.pass().await;
            let out_of_time = started.elapsed() + backoff > inner.router.options().retry_budget;
            let outcome = {
                let mut state = inner.state();
                let pending: Vec<String> = channels
                    .iter()
                    .filter(|c| matches!(state.channels.get(*c), Some(None)))
                    .cloned()
                    .collect();
                if pending.is_empty() {
                    Some(Ok(()))
                } else if out_of_time {
                    let message = format!("{} channel(s) not subscribed yet", pending.len());
                    state.suppressed.extend(pending.iter().cloned());
                    state.catch_up.extend(pending);
                    Some(Err(RouterError::Unavailable(message)))
                } else {
                    None
                }
            };
            match outcome {
                Some(Err(err)) => {
                    inner.wake.notify_one();
                    return Err(err);
                }
                Some(Ok(())) => return Ok(()),
                None => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = retries.next();
        }
    }

    /// Stops delivering `channel` (messages already queued stay queued) and sends
    /// `SSUNSUBSCRIBE` on its connection.
    pub async fn unsubscribe(&self, channel: &str) {
        let inner = &self.inner;
        let _ops = inner.ops.lock().await;
        let conn = {
            let mut state = inner.state();
            state.catch_up.remove(channel);
            state.overflowed.remove(channel);
            state.suppressed.remove(channel);
            state.announce.remove(channel);
            match state.channels.remove(channel).flatten() {
                Some(id) => state.shards.values().find(|s| s.id == id).map(|s| s.conn.clone()),
                None => None,
            }
        };
        if let Some(mut conn) = conn {
            let cmd = redis::cmd("SUNSUBSCRIBE").arg(channel).clone();
            if let Err(err) = cmd.query_async::<()>(&mut conn).await {
                debug!(channel, error = %err, "SUNSUBSCRIBE failed");
            }
        }
    }

    /// The channels subscribed right now (not pending).
    pub fn live_channels(&self) -> Vec<String> {
        let state = self.inner.state();
        state
            .channels
            .iter()
            .filter(|(_, shard)| shard.is_some())
            .map(|(c, _)| c.clone())
            .collect()
    }
}

/// Re-subscribes what is pending, waking on pushes and retrying with a backoff; ends when
/// the subscriber is dropped.
async fn background(inner: Weak<SubInner>, wake: Arc<Notify>) {
    let mut retries = Backoff::default();
    loop {
        let Some(sub) = inner.upgrade() else {
            return;
        };
        let pending = sub.pass().await;
        drop(sub);
        let wait = if pending {
            retries.next()
        } else {
            retries = Backoff::default();
            // Also a bound on how long a dropped subscriber's task lingers.
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn channel_and_payload(data: Vec<Value>) -> Option<(String, Vec<u8>)> {
    let mut data = data.into_iter();
    let channel = value_to_string(&data.next()?)?;
    let payload = match data.next()? {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => s.into_bytes(),
        _ => return None,
    };
    Some((channel, payload))
}

impl SubInner {
    fn state(&self) -> std::sync::MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles a push from shard `id`'s connection. Runs on the connection's task: it
    /// never blocks (a short lock, `try_send`).
    fn on_push(&self, id: u64, push: PushInfo) {
        match push.kind {
            PushKind::SMessage => {
                let Some((channel, payload)) = channel_and_payload(push.data) else {
                    return;
                };
                let mut state = self.state();
                if !state.channels.contains_key(&channel) || state.suppressed.contains(&channel) {
                    return;
                }
                let event = SubscriberEvent::Message {
                    channel: channel.clone(),
                    payload,
                };
                if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(event) {
                    state.suppressed.insert(channel.clone());
                    state.overflowed.insert(channel);
                    drop(state);
                    self.wake.notify_one();
                }
            }
            PushKind::Disconnection => {
                self.state().lost.insert(id);
                self.wake.notify_one();
            }
            // Sent by the server when the channel's slot moved away (and in reply to our
            // own SUNSUBSCRIBE, but then the channel is no longer wanted).
            PushKind::SUnsubscribe => {
                let Some(channel) = push.data.first().and_then(value_to_string) else {
                    return;
                };
                let mut state = self.state();
                if state.channels.get(&channel) == Some(&Some(id)) {
                    debug!(%channel, "server unsubscribed channel; slot moved");
                    state.channels.insert(channel.clone(), None);
                    state.suppressed.insert(channel.clone());
                    state.catch_up.insert(channel);
                    state.refresh = true;
                    drop(state);
                    self.wake.notify_one();
                }
            }
            _ => {}
        }
    }

    /// One reconciliation pass: handles lost shards and overflows, then subscribes the
    /// pending channels on their slots' owners. Returns whether some are still pending.
    async fn pass(self: &Arc<Self>) -> bool {
        let _ops = self.ops.lock().await;

        // Lost shards and overflowed queues.
        let (lost, overflowed, refresh) = {
            let mut state = self.state();
            let lost_ids = std::mem::take(&mut state.lost);
            state.shards.retain(|_, shard| !lost_ids.contains(&shard.id));
            let mut lost = Vec::new();
            let mut overflowed = Vec::new();
            let SubState {
                channels,
                catch_up,
                overflowed: marked,
                suppressed,
                announce,
                ..
            } = &mut *state;
            for (channel, shard) in channels.iter_mut() {
                if shard.is_some_and(|id| lost_ids.contains(&id)) {
                    *shard = None;
                    suppressed.insert(channel.clone());
                    catch_up.insert(channel.clone());
                    lost.push(channel.clone());
                }
            }
            for channel in marked.drain() {
                match channels.get(&channel) {
                    // Still subscribed: only its `Resubscribed` is owed.
                    Some(Some(_)) => {
                        announce.insert(channel.clone());
                        overflowed.push(channel);
                    }
                    Some(None) => {
                        catch_up.insert(channel);
                    }
                    None => {}
                }
            }
            let refresh = std::mem::take(&mut state.refresh) || !lost_ids.is_empty();
            (lost, overflowed, refresh)
        };
        if !lost.is_empty() {
            warn!(channels = lost.len(), "sharded subscriber connection lost");
            let _ = self.events.send(SubscriberEvent::Lost { channels: lost }).await;
        }
        if !overflowed.is_empty() {
            debug!(channels = overflowed.len(), "event queue was full; catching up");
        }
        if refresh {
            let _ = self.router.refresh().await;
        }

        // Pending channels by owner.
        let mut by_owner: HashMap<String, Vec<String>> = HashMap::new();
        let mut unowned = false;
        {
            let state = self.state();
            for (channel, shard) in &state.channels {
                if shard.is_some() {
                    continue;
                }
                match self.router.owner_of(key_slot(channel.as_bytes())) {
                    Some(addr) => by_owner.entry(addr).or_default().push(channel.clone()),
                    None => unowned = true,
                }
            }
        }
        let mut pending = unowned;
        for (addr, channels) in by_owner {
            pending |= !self.subscribe_on(&addr, channels).await;
        }
        pending |= !self.announce();
        let primaries: HashSet<String> = self.router.primaries().into_iter().collect();
        let mut state = self.state();
        if pending {
            state.refresh = true;
        }
        // Connections to nodes that are no longer primaries and carry nothing.
        let used: HashSet<u64> = state.channels.values().flatten().copied().collect();
        state
            .shards
            .retain(|addr, shard| primaries.contains(addr) || used.contains(&shard.id));
        pending
    }

    /// The subscriber connection to `addr`, opened if needed.
    async fn shard(self: &Arc<Self>, addr: &str) -> Result<(u64, MultiplexedConnection), RedisError> {
        if let Some(shard) = self.state().shards.get(addr) {
            return Ok((shard.id, shard.conn.clone()));
        }
        let id = self.next_shard_id.fetch_add(1, Ordering::Relaxed);
        let weak = Arc::downgrade(self);
        let push = Box::new(move |info: PushInfo| {
            if let Some(sub) = weak.upgrade() {
                sub.on_push(id, info);
            }
        });
        let conn = self.router.open_connection(addr, Some(push)).await?;
        debug!(%addr, id, "sharded subscriber connected");
        self.state().shards.insert(
            addr.to_string(),
            Shard {
                id,
                conn: conn.clone(),
            },
        );
        Ok((id, conn))
    }

    /// Subscribes `channels` on `addr`; sends `Resubscribed` for those that were lost.
    /// Returns whether all of them are live.
    async fn subscribe_on(self: &Arc<Self>, addr: &str, channels: Vec<String>) -> bool {
        let (id, conn) = match self.shard(addr).await {
            Ok(shard) => shard,
            Err(err) => {
                debug!(%addr, error = %err, "cannot open subscriber connection");
                return false;
            }
        };
        let results: Vec<(String, SubscribeResult)> = stream::iter(channels)
            .map(|channel| {
                let mut conn = conn.clone();
                async move {
                    let cmd = redis::cmd("SSUBSCRIBE").arg(&channel).clone();
                    let result = match cmd.query_async::<()>(&mut conn).await {
                        Ok(()) => SubscribeResult::Done,
                        Err(err) => {
                            debug!(%channel, error = %err, "SSUBSCRIBE failed");
                            match classify(&err) {
                                Action::Retry { reconnect: true } => SubscribeResult::Broken,
                                _ => SubscribeResult::Retry,
                            }
                        }
                    };
                    (channel, result)
                }
            })
            .buffer_unordered(SUBSCRIBE_CONCURRENCY)
            .collect()
            .await;

        let mut all_done = true;
        {
            let mut state = self.state();
            let mut broken = false;
            for (channel, result) in results {
                match result {
                    SubscribeResult::Done => {
                        // Lost in the meantime: the next pass moves it on.
                        if let Some(shard @ None) = state.channels.get_mut(&channel) {
                            *shard = Some(id);
                            if state.catch_up.remove(&channel) {
                                state.announce.insert(channel);
                            }
                        }
                    }
                    SubscribeResult::Retry => all_done = false,
                    SubscribeResult::Broken => {
                        all_done = false;
                        broken = true;
                    }
                }
            }
            if broken {
                state.lost.insert(id);
            }
        }
        self.announce();
        all_done
    }

    /// Queues `Resubscribed` for the channels live again, and ends their suppression in the
    /// same step (under the lock that the push callback takes): a message after it is
    /// queued after it. Returns false when the queue is full (tried again on the next pass).
    fn announce(&self) -> bool {
        let mut state = self.state();
        if state.announce.is_empty() {
            return true;
        }
        let channels: Vec<String> = state.announce.iter().cloned().collect();
        let count = channels.len();
        match self.events.try_send(SubscriberEvent::Resubscribed { channels }) {
            Ok(()) => {
                let SubState {
                    announce, suppressed, ..
                } = &mut *state;
                for channel in announce.drain() {
                    suppressed.remove(&channel);
                }
                info!(channels = count, "channels resubscribed");
                true
            }
            Err(_) => false,
        }
    }
}
