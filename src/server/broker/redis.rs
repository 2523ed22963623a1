//! [`RedisBroker`]: any number of instances on one Redis act as one.
//!
//! ## Keys and channels
//!
//! | key / channel | what |
//! |---|---|
//! | `sse:seq` | the id counter (`INCR`): one order for every instance |
//! | `sse:stream:u:<user>` | stream of the user's events, entry id `<event id>-0`, fields `n` (name), `d` (data), `t` (ms) |
//! | `sse:stream:broadcast` | stream of broadcasts, same layout |
//! | `sse:delivered:u:<user>` | highest id a closed connection of the user had received: where offline delivery starts |
//! | channel `sse:u:<user>` | live fan-out of the user's events: `"<id> <name> <data>"` |
//! | channel `sse:broadcast` | live fan-out of broadcasts |
//!
//! Publishing is one Lua script per batch: `INCR` the counter, `XADD` to the stream
//! (capped with `MAXLEN`, `PEXPIRE`d to the retention), `PUBLISH`: the history and the live
//! message can never disagree. Because the streams use the global counter as entry id, a
//! `Last-Event-ID` resumes the user's stream and the broadcast stream at once, exactly.
//!
//! Each instance subscribes only to the channels of users connected to it (plus broadcast),
//! so Redis traffic per instance scales with its users, not with the number of instances.
//!
//! ## Redis Cluster
//!
//! The script touches the counter and one stream per event, which Cluster allows only within
//! one hash slot. To shard: give each user's keys a hash tag (`sse:{u:<user>}:stream`), keep
//! a counter per slot group, and use sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`). Not done yet:
//! one Redis serves the scale this project targets (see the README).
//!
//! ## Faults
//!
//! Publishing during an outage returns [`BrokerError::Unavailable`] to the caller. The
//! subscriber reconnects with backoff and jitter, resubscribes, and reads from the streams
//! what was published while it was away, so connected clients miss nothing.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use redis::{aio::ConnectionManager, aio::ConnectionManagerConfig, aio::PubSubSink, Client, Script, Value};
use tokio::sync::Mutex;

use super::{
    Broker, BrokerError, BrokerHealth, Envelope, EventId, EventSink, PublishedEvent, Replay, Retention,
    Target,
};
use crate::{
    backoff::backoff_delay,
    server::{metrics as m, now_ms},
};

const SEQ_KEY: &str = "sse:seq";
const BROADCAST_STREAM: &str = "sse:stream:broadcast";
const BROADCAST_CHANNEL: &str = "sse:broadcast";

fn user_stream(user: &str) -> String {
    format!("sse:stream:u:{user}")
}

fn user_channel(user: &str) -> String {
    format!("sse:u:{user}")
}

fn delivered_key(user: &str) -> String {
    format!("sse:delivered:u:{user}")
}

const PUBLISH_SCRIPT: &str = r#"
-- KEYS[1] = counter, KEYS[2..] = one stream per event
-- ARGV[1] = now ms, ARGV[2] = max stream length, then per event: channel, name, data, ttl ms, key, timestamp ms
-- A counter lost with Redis's data restarts at the clock (ms x 1000, as the in-process
-- broker does), above every id handed out before, so no client mistakes new ids for old.
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1] .. '000') end
local ids = {}
for i = 2, #KEYS do
  local at = 2 + (i - 2) * 6
  -- Lua numbers are doubles: format the id as an integer, never as 1.79e+15.
  local id = string.format('%.0f', redis.call('INCR', KEYS[1]))
  redis.call('XADD', KEYS[i], 'MAXLEN', ARGV[2], id .. '-0', 'n', ARGV[at + 2], 'd', ARGV[at + 3], 't', ARGV[at + 6], 'k', ARGV[at + 5])
  -- A stream lives as long as its longest-kept event: only ever extend its expiry.
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[at + 4]) then redis.call('PEXPIRE', KEYS[i], ARGV[at + 4]) end
  redis.call('PUBLISH', ARGV[at + 1], id .. ' ' .. ARGV[at + 2] .. ' ' .. ARGV[at + 3])
  ids[#ids + 1] = id
end
return ids
"#;

const SET_DELIVERED_SCRIPT: &str = r#"
-- KEYS[1] = cursor key; ARGV[1] = id, ARGV[2] = ttl ms. Keeps the higher id.
local current = redis.call('GET', KEYS[1])
if not current or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"#;

const REPLAY_SCRIPT: &str = r#"
-- KEYS[1] = counter, KEYS[2..] = streams; ARGV[1] = after
-- returns {head, then per stream: entries after ARGV[1], first kept id if any were trimmed else '0-0'}
local out = { redis.call('GET', KEYS[1]) or '0' }
for i = 2, #KEYS do
  local entries, trimmed_below = {}, '0-0'
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local info, f = redis.call('XINFO', 'STREAM', KEYS[i]), {}
    for j = 1, #info, 2 do f[info[j]] = info[j + 1] end
    if tonumber(f['entries-added']) > tonumber(f['length']) then
      trimmed_below = f['recorded-first-entry-id']
    end
    entries = redis.call('XRANGE', KEYS[i], '(' .. ARGV[1] .. '-0', '+')
  end
  out[#out + 1] = entries
  out[#out + 1] = trimmed_below
end
return out
"#;

/// Shares ids, history and fan-out between instances through one Redis.
pub struct RedisBroker {
    client: Client,
    conn: ConnectionManager,
    sink: EventSink,
    /// Who this instance listens for, and the subscriber connection's handle.
    subscriptions: Mutex<Subscriptions>,
    healthy: AtomicBool,
    /// Highest id handed to the sink: recovery after a reconnect starts here.
    last_dispatched: AtomicU64,
    retention: Retention,
    max_stream_len: usize,
    publish_script: Script,
    replay_script: Script,
    set_delivered_script: Script,
    subscriber: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The users whose channels this instance listens to, and the subscribe/unsubscribe handle
/// of the current subscriber connection (`None` while it is down). One lock for both: a
/// user who subscribes while the connection is rebuilt is either in the set the rebuild
/// subscribes, or subscribes on the new connection itself.
#[derive(Default)]
struct Subscriptions {
    users: HashSet<Arc<str>>,
    pubsub: Option<PubSubSink>,
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl RedisBroker {
    /// Connects to `url` (`redis://` or `rediss://`), starts the subscriber task, and hands
    /// every event of the subscribed users, and every broadcast, to `sink`.
    pub async fn connect(
        url: &str,
        sink: EventSink,
        retention: Retention,
        max_stream_len: usize,
    ) -> Result<Arc<Self>, BrokerError> {
        let client = Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(2)
            .set_max_delay(1_000);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(unavailable)?;
        let broker = Arc::new(Self {
            client,
            conn,
            sink,
            subscriptions: Mutex::new(Subscriptions::default()),
            healthy: AtomicBool::new(true),
            last_dispatched: AtomicU64::new(0),
            retention,
            max_stream_len: max_stream_len.max(1),
            publish_script: Script::new(PUBLISH_SCRIPT),
            replay_script: Script::new(REPLAY_SCRIPT),
            set_delivered_script: Script::new(SET_DELIVERED_SCRIPT),
            subscriber: std::sync::Mutex::new(None),
        });
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_subscriber(Arc::downgrade(&broker), ready_tx));
        *broker.subscriber.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        // Wait for the first subscription, so nothing published from here on is missed.
        let _ = tokio::time::timeout(Duration::from_secs(5), ready_rx).await;
        Ok(broker)
    }

    fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Ordering::Relaxed) != healthy {
            if healthy {
                tracing::info!("redis broker healthy again");
            } else {
                tracing::warn!("redis broker degraded");
            }
        }
        m::broker_healthy(healthy);
    }

    /// Hands one live or recovered event to the sink, unless it was handed over already.
    fn dispatch(&self, event: PublishedEvent) {
        // One subscriber connection delivers in publish order, so ids only grow here.
        if event.id.0 <= self.last_dispatched.load(Ordering::Relaxed) {
            return;
        }
        self.last_dispatched.store(event.id.0, Ordering::Relaxed);
        (self.sink)(Arc::new(event));
    }

    /// Reads the streams of `users` and broadcast after `after`, merged in id order.
    async fn read_streams(
        &self,
        users: &[Arc<str>],
        after: EventId,
    ) -> Result<(u64, Vec<PublishedEvent>, bool), BrokerError> {
        let mut invocation = self.replay_script.prepare_invoke();
        invocation.key(SEQ_KEY);
        for user in users {
            invocation.key(user_stream(user));
        }
        invocation.key(BROADCAST_STREAM);
        invocation.arg(after.0);
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = invocation.invoke_async(&mut conn).await.map_err(|e| {
            self.set_healthy(false);
            unavailable(e)
        })?;
        let head: u64 = reply
            .first()
            .and_then(|v| redis::from_redis_value::<String>(v).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let now = now_ms();
        let mut gap = after.0 > head;
        let mut events = Vec::new();
        let targets = users
            .iter()
            .map(|u| Target::User(u.clone()))
            .chain(std::iter::once(Target::Broadcast));
        for (target, pair) in targets.zip(reply[1..].chunks(2)) {
            let [entries, trimmed_below] = pair else { continue };
            // Entries below the first kept one were trimmed: if any could lie after `after`,
            // the client may have missed some.
            let first_kept: u64 = redis::from_redis_value::<String>(trimmed_below)
                .ok()
                .and_then(|id| id.split('-').next()?.parse().ok())
                .unwrap_or(0);
            gap |= first_kept > after.0 + 1;
            let entries: Vec<(String, Vec<(String, String)>)> =
                redis::from_redis_value(entries).map_err(unavailable)?;
            for (entry_id, fields) in entries {
                let Some(event) = decode_entry(&target, &entry_id, &fields) else {
                    continue;
                };
                if !self.retention.keeps(&event, now) {
                    gap = true;
                    continue;
                }
                events.push(event);
            }
        }
        events.sort_by_key(|e| e.id);
        Ok((head, events, gap))
    }
}

fn decode_entry(target: &Target, entry_id: &str, fields: &[(String, String)]) -> Option<PublishedEvent> {
    let id = EventId(entry_id.split('-').next()?.parse().ok()?);
    let field = |k: &str| fields.iter().find(|(name, _)| name == k).map(|(_, v)| v.as_str());
    let envelope = Envelope {
        target: target.clone(),
        name: field("n")?.into(),
        data: field("d")?.to_string(),
        timestamp_ms: field("t").and_then(|t| t.parse().ok()).unwrap_or(0),
        coalesce_key: field("k").filter(|k| !k.is_empty()).map(Into::into),
    };
    Some(PublishedEvent::new(id, envelope))
}

/// Parses a live message `"<id> <name> <data>"` from `channel`.
fn decode_message(channel: &str, payload: &str) -> Option<PublishedEvent> {
    let target = if channel == BROADCAST_CHANNEL {
        Target::Broadcast
    } else {
        Target::User(channel.strip_prefix("sse:u:")?.into())
    };
    let mut parts = payload.splitn(3, ' ');
    let id = EventId(parts.next()?.parse().ok()?);
    let envelope = Envelope {
        target,
        name: parts.next()?.into(),
        data: parts.next()?.to_string(),
        // Live events are not kept here; only replays from the streams use their age.
        timestamp_ms: now_ms(),
        coalesce_key: None,
    };
    Some(PublishedEvent::new(id, envelope))
}

/// Keeps one subscriber connection up: subscribe, recover what was missed, dispatch; on
/// loss, back off with jitter and start again. A failed recovery read counts as a loss (the
/// broker stays degraded and tries again from the same point), so it never reports healthy
/// with events missed. Ends when the broker is dropped.
async fn run_subscriber(broker: Weak<RedisBroker>, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let mut attempt = 0u32;
    loop {
        let Some(this) = broker.upgrade() else { return };
        match this.resubscribe().await {
            Ok(mut stream) => {
                this.set_healthy(true);
                attempt = 0;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                drop(this);
                while let Some(msg) = stream.next().await {
                    let Some(this) = broker.upgrade() else { return };
                    let payload: String = msg.get_payload().unwrap_or_default();
                    match decode_message(msg.get_channel_name(), &payload) {
                        Some(event) => this.dispatch(event),
                        None => tracing::warn!(channel = msg.get_channel_name(), "undecodable message"),
                    }
                }
                let Some(this) = broker.upgrade() else { return };
                this.subscriptions.lock().await.pubsub = None;
                this.set_healthy(false);
                tracing::warn!("redis subscriber connection lost; reconnecting");
            }
            Err(e) => {
                this.subscriptions.lock().await.pubsub = None;
                this.set_healthy(false);
                tracing::warn!("redis subscriber cannot connect or catch up: {e}");
            }
        }
        let delay = backoff_delay(100, 5_000, attempt, rand::random::<f64>());
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

impl RedisBroker {
    /// Opens a subscriber connection, subscribes broadcast and every subscribed user, then
    /// hands over what was published while this instance was not listening (read from the
    /// streams). Returns the message stream, to be read from then on.
    async fn resubscribe(&self) -> Result<impl futures::Stream<Item = redis::Msg>, BrokerError> {
        let pubsub = self.client.get_async_pubsub().await.map_err(unavailable)?;
        let (mut pubsub, stream) = pubsub.split();
        let users: Vec<Arc<str>> = {
            let mut subscriptions = self.subscriptions.lock().await;
            pubsub.subscribe(BROADCAST_CHANNEL).await.map_err(unavailable)?;
            for user in &subscriptions.users {
                pubsub.subscribe(user_channel(user)).await.map_err(unavailable)?;
            }
            subscriptions.pubsub = Some(pubsub);
            subscriptions.users.iter().cloned().collect()
        };
        let since = EventId(self.last_dispatched.load(Ordering::Relaxed));
        if since.0 > 0 {
            let (_, missed, _) = self.read_streams(&users, since).await?;
            if !missed.is_empty() {
                tracing::info!(
                    events = missed.len(),
                    "recovered events published while not listening"
                );
            }
            missed.into_iter().for_each(|e| self.dispatch(e));
        }
        Ok(stream)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn publish(&self, events: Vec<Envelope>) -> Result<Vec<EventId>, BrokerError> {
        let mut invocation = self.publish_script.prepare_invoke();
        invocation.key(SEQ_KEY);
        invocation.arg(now_ms()).arg(self.max_stream_len);
        for event in &events {
            let (stream, channel) = match &event.target {
                Target::User(user) => (user_stream(user), user_channel(user)),
                Target::Broadcast => (BROADCAST_STREAM.to_string(), BROADCAST_CHANNEL.to_string()),
            };
            invocation.key(stream);
            let ttl_ms = self.retention.for_event(&event.name).as_millis() as u64;
            invocation
                .arg(channel)
                .arg(&*event.name)
                .arg(&event.data)
                .arg(ttl_ms)
                .arg(event.coalesce_key.as_deref().unwrap_or(""))
                .arg(event.timestamp_ms);
        }
        let mut conn = self.conn.clone();
        let ids: Vec<String> = invocation.invoke_async(&mut conn).await.map_err(|e| {
            self.set_healthy(false);
            unavailable(e)
        })?;
        ids.iter()
            .map(|id| id.parse().map(EventId))
            .collect::<Result<_, _>>()
            .map_err(|e| BrokerError::Unavailable(format!("bad id from the publish script: {e}")))
    }

    async fn replay(&self, user: &str, after: EventId) -> Result<Replay, BrokerError> {
        let (_, events, gap) = self.read_streams(&[user.into()], after).await?;
        Ok(Replay {
            events: events.into_iter().map(Arc::new).collect(),
            gap,
        })
    }

    async fn head(&self) -> Result<EventId, BrokerError> {
        let mut conn = self.conn.clone();
        let head: Option<String> = redis::cmd("GET")
            .arg(SEQ_KEY)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(EventId(head.and_then(|h| h.parse().ok()).unwrap_or(0)))
    }

    async fn delivered_through(&self, user: &str) -> Result<Option<EventId>, BrokerError> {
        let mut conn = self.conn.clone();
        let id: Option<String> = redis::cmd("GET")
            .arg(delivered_key(user))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(id.and_then(|id| id.parse().ok()).map(EventId))
    }

    async fn set_delivered_through(&self, user: &str, id: EventId) {
        let mut conn = self.conn.clone();
        let ttl_ms = self.retention.longest().as_millis() as u64;
        let result: Result<i64, _> = self
            .set_delivered_script
            .key(delivered_key(user))
            .arg(id.0)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = result {
            tracing::warn!("could not record delivery position: {e}");
        }
    }

    async fn subscribe(&self, user: &str) {
        let mut subscriptions = self.subscriptions.lock().await;
        subscriptions.users.insert(user.into());
        if let Some(pubsub) = subscriptions.pubsub.as_mut() {
            if let Err(e) = pubsub.subscribe(user_channel(user)).await {
                // The reconnect loop subscribes every user in the set again.
                tracing::warn!("subscribe failed: {e}");
            }
        }
    }

    async fn unsubscribe(&self, user: &str) {
        let mut subscriptions = self.subscriptions.lock().await;
        subscriptions.users.remove(user);
        if let Some(pubsub) = subscriptions.pubsub.as_mut() {
            let _ = pubsub.unsubscribe(user_channel(user)).await;
        }
    }

    fn health(&self) -> BrokerHealth {
        if self.healthy.load(Ordering::Relaxed) {
            BrokerHealth::Healthy
        } else {
            BrokerHealth::Degraded
        }
    }

    async fn shutdown(&self) {
        if let Some(task) = self.subscriber.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_messages_decode_with_their_target() {
        let e = decode_message("sse:u:alice", r#"42 notification {"title":"a b"}"#).unwrap();
        assert_eq!(e.id, EventId(42));
        assert_eq!(e.target, Target::User("alice".into()));
        assert_eq!(&*e.name, "notification");
        assert_eq!(e.data_str(), r#"{"title":"a b"}"#);
        let b = decode_message(BROADCAST_CHANNEL, "7 system_alert {}").unwrap();
        assert_eq!(b.target, Target::Broadcast);
        assert!(decode_message("other", "1 x {}").is_none());
        assert!(decode_message("sse:u:a", "nope x {}").is_none());
    }
}
