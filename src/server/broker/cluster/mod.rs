//! [`ClusterBroker`]: any number of instances on a Redis Cluster act as one.
//!
//! ## Lanes
//!
//! Each user's events and the broadcasts are a *lane*: one id counter, one stream, one
//! sharded channel, all under one hash tag, so a lane lives on one shard and a publish to it
//! is atomic there (the steps [`RedisBroker`](super::RedisBroker) runs, with `SPUBLISH`).
//! Lanes spread over the shards by user; the lanes of a batch that share a shard are
//! published in one script there (see [`PUBLISH_SCRIPT`]).
//!
//! | key / channel | what |
//! |---|---|
//! | `sse:{u:<user>}:seq` | the newest id of the user's lane |
//! | `sse:{u:<user>}:stream` | the user's events kept only the replay retention, entry id `<event id>-0` (fields as on one Redis) |
//! | `sse:{u:<user>}:stream:long` | the same for the types [kept longer](Retention::kept_longer) for offline users (`notification`, ...) |
//! | `sse:{u:<user>}:trimmed`, `sse:{u:<user>}:trimmed:long` | the newest id a flood pushed out of that stream |
//! | `sse:{u:<user>}:delivered` | how far a closed connection of the user had got: `<user lane>.<broadcast lane>` |
//! | sharded channel `sse:{u:<user>}:live` | live fan-out of the user's events, and `!disconnect <nonce>` |
//! | `sse:{b}:seq`, `sse:{b}:stream[:long]`, `sse:{b}:trimmed[:long]`, channel `sse:{b}:live` | the same for broadcasts |
//!
//! Ids are the same hybrid clock as on one Redis, per lane: they increase within a lane and
//! stay close to the time they were issued, so lanes interleave roughly by time, but an
//! event of one lane may reach a client before an older one of the other. A client's place
//! is therefore a [`Cursor::Lanes`], `<user lane>.<broadcast lane>`, written by each
//! connection as the `id:` of every event: `Last-Event-ID` resumes both lanes exactly.
//! Broadcasts are one lane, one hot key on one shard: they are rare next to user events
//! and each costs that shard one script, whatever the number of users.
//!
//! A lane's counter is kept for [`SEQ_KEEP_MIN`] (or the longest retention, if longer)
//! after its last publish, so idle users cost Redis nothing after that.
//!
//! ## Faults
//!
//! The [`router`] follows `MOVED`/`ASK` and retries through a failover. When a shard's
//! subscriber connection drops (a primary died, a slot moved), its channels are subscribed
//! again wherever they now live, and each of their lanes is read from its stream after the
//! last id handed over, as on one Redis. Until that read succeeds the broker is degraded
//! and tries again every second.
//!
//! Replication in Redis is asynchronous, so on a shard with replicas a publish returns once
//! one of them confirmed it (`WAIT 1`, up to [`REPLICA_WAIT`]): a failover right after does
//! not lose it. When no replica confirms in time (one down or far behind), the publish
//! succeeds on the primary alone, as Redis does, and that primary's publishes stop waiting
//! for [`REPLICA_LATE_PAUSE`]: a `WAIT` holds up every command on its connection. A retry
//! (the router's, or one after a failed script or `WAIT`) finds each lane's batch key and
//! returns its ids instead of publishing it twice.
//!
//! Known limits: a catch-up runs in the dispatch task, [`CATCH_UP_CONCURRENCY`] lanes at a
//! time (live events wait meanwhile); and instances' clocks must agree within a minute (see
//! [`empty_head`]).

pub mod router;
pub mod subscriber;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Weak,
    },
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use redis::Script;
use tokio::sync::mpsc;

use self::{
    router::{ClusterRouter, RouterError, RouterOptions},
    subscriber::{ShardedSubscriber, SubscriberEvent},
};
use super::{
    empty_head,
    presence::{self, PresenceScripts},
    redis::{
        check_version, decode_payload, install_tls_provider_for, lua_append_event, read_merged, stream_kind,
        xrange_page, Entries, Message, STREAM_KINDS,
    },
    Broker, BrokerError, BrokerHealth, Cursor, Envelope, EventId, EventSink, InstancePresence, PresenceWrite,
    PublishedEvent, Replay, Retention, Target,
};
use crate::server::{clock::now_ms, metrics as m};

/// The least time a lane's id counter outlives its last publish.
pub const SEQ_KEEP_MIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// Subscriber events (messages, resubscriptions) waiting for the dispatch task. When full,
/// a channel's messages are dropped until its `Resubscribed` is queued, and its lane is
/// caught up from its stream then (see [`router::ShardedSubscriber`]).
const SUBSCRIBER_QUEUE: usize = 16_384;
/// Scripts of one batch run at once (one per shard, or per lane when a slot moved).
const PUBLISH_CONCURRENCY: usize = 32;
/// Most events in one script: a bigger batch takes several, so one script never holds its
/// shard for long (about 20 µs per event). One lane is never split: a lane with more events
/// (up to `SSE_MAX_BATCH`) is a script of its own.
const EVENTS_PER_SCRIPT: usize = 500;
/// Lanes read back at once after their shard came back (each one `MGET` and `XRANGE`).
const CATCH_UP_CONCURRENCY: usize = 32;
/// How many times a publish runs its batch when a primary goes away before confirming.
const PUBLISH_ATTEMPTS: u32 = 3;
/// How long a lane's batch key (its ids) is kept for a retry to find: longer than
/// [`PUBLISH_DEADLINE`], so every try of a publish still finds what an earlier one wrote,
/// and no longer, since each lane of each publish leaves one such key.
const BATCH_KEEP: Duration = Duration::from_secs(30);
/// How long one publish keeps trying, every script of it and every try of each: past it,
/// no try starts and the publish fails (reported to its sender) rather than risk running a
/// lane again after its batch key is gone. A failover takes about 2x
/// `cluster-node-timeout`.
const PUBLISH_DEADLINE: Duration = Duration::from_secs(15);
/// How long a publish waits for a replica of its shard to confirm it.
const REPLICA_WAIT: Duration = Duration::from_millis(500);
/// How long a failed publish shows the broker as degraded.
const PUBLISH_FAILURE_SHOWS: Duration = Duration::from_secs(5);
/// How long publishes stop waiting for the replicas of a primary whose replicas did not
/// confirm one in time (a replica down or far behind): waits there would block that
/// primary's connection for every command.
const REPLICA_LATE_PAUSE: Duration = Duration::from_secs(10);

/// The lanes of a batch that live on one shard, in one script there: the steps of a publish
/// on one Redis, per lane, with the lane's own counter, `SPUBLISH`, and a key per lane that
/// makes a retry harmless.
///
/// One lane declares its keys (`KEYS`), so the router follows its slot wherever it moved.
/// Several lanes are in several slots, which a script may not declare: their keys come in
/// `ARGV` instead (`allow-cross-slot-keys`, `KEYS` empty), and a lane whose slot this node
/// does not hold (moved, or moving and the lane's batch key not here) stops the script
/// before the lane writes anything. The lanes before it are done and recorded under their
/// keys, so publishing each lane on its own afterwards publishes nothing twice.
const PUBLISH_SCRIPT: &str = concat!(
    r#"#!lua flags=allow-cross-slot-keys
-- ARGV[1] = now ms, ARGV[2] = max stream length, ARGV[3] = floor id,
-- ARGV[4] = how long a lane's counter is kept, ms, ARGV[5] = how long a batch key is kept, ms,
-- ARGV[6] = number of lanes m, ARGV[7 .. 6 + m] = each lane's number of events.
-- Per lane, its batch key, counter, stream and trimmed marker: in KEYS, or (KEYS empty) in
-- the next 4m arguments. Then per event, lane after lane: channel, name, data, ttl ms,
-- coalescing key, timestamp ms, and the suffix of its stream and trimmed marker (empty, or
-- `:long` for the types kept longer: same hash tag, same slot).
-- A batch key holds the ids its lane was given: a retry of a try whose reply was lost gets
-- them back instead of publishing the lane again.
-- Lua numbers are doubles: ids (about 1.8e15) stay exact below 2^53, and stay strings in
-- cjson (which writes numbers with 14 digits).
local m = tonumber(ARGV[6])
local K, at = KEYS, 6 + m
if #KEYS == 0 then
  K = {}
  for k = 1, 4 * m do K[k] = ARGV[at + k] end
  at = at + 4 * m
end
local clock = tonumber(ARGV[1]) * 1000
local floor = tonumber(ARGV[3])
local ids = {}
for l = 0, m - 1 do
  local batch, seq, lane_stream, lane_trimmed = K[1 + l * 4], K[2 + l * 4], K[3 + l * 4], K[4 + l * 4]
  local events = tonumber(ARGV[7 + l])
  -- The lane's first command. Its batch key exists only once the lane is done, so on a node
  -- that does not hold the lane's slot (moved, or moving and the key not here) it fails
  -- as a non-local key and stops the script before the lane writes anything.
  local done = redis.call('GET', batch)
  if done then
    -- A retry: kept for another while (each retry finds it), and written, so a WAIT after
    -- it confirms the lane reached a replica.
    redis.call('PEXPIRE', batch, ARGV[5])
    for _, id in ipairs(cjson.decode(done)) do ids[#ids + 1] = id end
    at = at + events * 7
  else
    local last, lane = tonumber(redis.call('GET', seq) or '0'), {}
    for _ = 1, events do
      last = math.max(last + 1, clock, floor + 1)
      local id = string.format('%.0f', last)
      local stream, trimmed = lane_stream .. ARGV[at + 7], lane_trimmed .. ARGV[at + 7]
"#,
    lua_append_event!(),
    r#"      redis.call('SPUBLISH', ARGV[at + 1], id .. ' ' .. ARGV[at + 2] .. ' ' .. ARGV[at + 3])
      lane[#lane + 1] = id
      ids[#ids + 1] = id
      at = at + 7
    end
    redis.call('SET', seq, string.format('%.0f', last), 'PX', ARGV[4])
    redis.call('SET', batch, cjson.encode(lane), 'PX', ARGV[5])
  end
end
return ids
"#
);

const SET_DELIVERED_SCRIPT: &str = r#"
-- KEYS[1] = cursor key; ARGV[1] = user lane id, ARGV[2] = broadcast lane id, ARGV[3] = ttl ms.
-- Keeps the further position in each lane.
local user, broadcast = tonumber(ARGV[1]), tonumber(ARGV[2])
local current = redis.call('GET', KEYS[1])
if current then
  local u, b = string.match(current, '^(%d+)%.(%d+)$')
  if u then
    user, broadcast = math.max(user, tonumber(u)), math.max(broadcast, tonumber(b))
  end
end
redis.call('SET', KEYS[1], string.format('%.0f.%.0f', user, broadcast), 'PX', ARGV[3])
return 1
"#;

/// A key or channel of a lane: `sse:{u:<user>}:<what>` or `sse:{b}:<what>`, then
/// `:<kind>` for the stream (and trimmed marker) of the types kept longer.
#[derive(Clone, Copy)]
struct LaneKey<'a> {
    user: Option<&'a str>,
    what: &'static str,
    kind: KindSuffix<'a>,
}

fn lane_key<'a>(target: &'a Target, what: &'static str) -> LaneKey<'a> {
    lane_key_of_kind(target, what, None)
}

/// A lane's stream or trimmed marker for events of `kind` (see [`STREAM_KINDS`]).
fn lane_key_of_kind<'a>(target: &'a Target, what: &'static str, kind: Option<&'a str>) -> LaneKey<'a> {
    LaneKey {
        user: match target {
            Target::User(user) => Some(user),
            Target::Broadcast => None,
        },
        what,
        kind: KindSuffix(kind),
    }
}

impl std::fmt::Display for LaneKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.user {
            Some(user) => write!(f, "sse:{{u:{user}}}:{}{}", self.what, self.kind),
            None => write!(f, "sse:{{b}}:{}{}", self.what, self.kind),
        }
    }
}

/// What follows a lane's stream key for the types kept longer: `:long`, or nothing. No
/// user id makes one key another's (the key ends in `}:stream` or `}:stream:long`).
#[derive(Clone, Copy)]
struct KindSuffix<'a>(Option<&'a str>);

impl std::fmt::Display for KindSuffix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(kind) => write!(f, ":{kind}"),
            None => Ok(()),
        }
    }
}

impl redis::ToRedisArgs for KindSuffix<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self)
    }
}

impl redis::ToRedisArgs for LaneKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self)
    }
}

impl redis::ToSingleRedisArg for LaneKey<'_> {}

/// The lane a live channel carries; `None` for a channel that is not one of ours.
fn lane_of_channel(channel: &str) -> Option<Target> {
    if channel == "sse:{b}:live" {
        return Some(Target::Broadcast);
    }
    let user = channel.strip_prefix("sse:{u:")?.strip_suffix("}:live")?;
    Some(Target::User(user.into()))
}

fn router_error(e: RouterError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// One lane's part of a batch, and the key (in the lane's slot) its ids are kept under, so
/// a retry returns them instead of publishing the lane again.
struct LaneBatch<'a> {
    batch_key: String,
    events: Vec<&'a Envelope>,
}

impl<'a> LaneBatch<'a> {
    /// `events`, all of one lane (at least one), under a new batch key.
    fn new(events: Vec<&'a Envelope>) -> Self {
        let batch_key = format!(
            "{}:{:016x}{:016x}",
            lane_key(&events[0].target, "batch"),
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        Self { batch_key, events }
    }

    fn target(&self) -> &'a Target {
        &self.events[0].target
    }

    fn slot(&self) -> u16 {
        router::key_slot(lane_key(self.target(), "stream").to_string().as_bytes())
    }
}

/// Where the publish script finds its keys.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeysIn {
    /// Declared (one lane): the cluster checks them and redirects.
    Keys,
    /// In the arguments (several lanes, several slots): the script checks each lane's.
    Arguments,
}

/// How far each lane this instance listens to was handed to the sink: the newest id handed
/// over, or where the lane stood when it was subscribed. A catch-up reads after it, and a
/// message at or below it is not handed over again.
#[derive(Default)]
struct Dispatched {
    /// Per subscribed user.
    users: HashMap<Arc<str>, u64>,
    broadcast: u64,
}

impl Dispatched {
    fn lane(&mut self, target: &Target) -> Option<&mut u64> {
        match target {
            Target::User(user) => self.users.get_mut(user),
            Target::Broadcast => Some(&mut self.broadcast),
        }
    }
}

/// Shares ids, history and fan-out between instances through a Redis Cluster.
pub struct ClusterBroker {
    router: ClusterRouter,
    subscriber: ShardedSubscriber,
    sink: EventSink,
    dispatched: std::sync::Mutex<Dispatched>,
    /// Channels whose shard is down, or whose lane could not be read back yet.
    behind: std::sync::Mutex<HashSet<String>>,
    /// When a publish last failed (ms; 0 for never): degraded for [`PUBLISH_FAILURE_SHOWS`].
    publish_failed_at: AtomicU64,
    /// Primaries (`host:port`) whose replicas did not confirm a publish in time, and until
    /// when (ms) publishes there do not wait for them again.
    replica_late_until: std::sync::Mutex<HashMap<String, u64>>,
    /// Serialises subscribing and unsubscribing users (a user's last tab closing while a
    /// new one opens), as on one Redis.
    subscribing: tokio::sync::Mutex<()>,
    /// Highest id this instance issued or saw, in any lane: new ids go above it.
    floor: AtomicU64,
    retention: Retention,
    max_stream_len: usize,
    publish_script: Script,
    set_delivered_script: Script,
    presence_scripts: PresenceScripts,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where and how to reach a Redis Cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Seed nodes, `redis://` or `rediss://`; the rest are found from them.
    pub seeds: Vec<String>,
    /// How long events are kept, by type.
    pub retention: Retention,
    /// Most entries one stream keeps.
    pub max_stream_len: usize,
}

impl ClusterBroker {
    /// Connects to the cluster, checks its version, subscribes broadcasts, and hands every
    /// event of the subscribed users, and every broadcast, to `sink`.
    pub async fn connect(options: ClusterOptions, sink: EventSink) -> Result<Arc<Self>, BrokerError> {
        options
            .seeds
            .iter()
            .for_each(|seed| install_tls_provider_for(seed));
        let router = ClusterRouter::connect(&options.seeds, RouterOptions::default())
            .await
            .map_err(|e| BrokerError::Unavailable(format!("Redis Cluster: {e}")))?;
        let info: String = router
            .query("sse:{b}:seq", redis::cmd("INFO").arg("server"))
            .await
            .map_err(router_error)?;
        check_version(&info)?;
        let (subscriber, events) = router.subscriber(SUBSCRIBER_QUEUE);
        let broadcast_seq = lane_key(&Target::Broadcast, "seq").to_string();
        let broadcast_head: Option<u64> = router
            .query(&broadcast_seq, &redis::Cmd::get(&broadcast_seq))
            .await
            .map_err(router_error)?;
        let broker = Arc::new(Self {
            router,
            subscriber,
            sink,
            dispatched: std::sync::Mutex::new(Dispatched {
                users: HashMap::new(),
                broadcast: broadcast_head.unwrap_or_else(|| empty_head(now_ms())),
            }),
            behind: Default::default(),
            publish_failed_at: AtomicU64::new(0),
            replica_late_until: Default::default(),
            subscribing: Default::default(),
            floor: AtomicU64::new(0),
            retention: options.retention,
            max_stream_len: options.max_stream_len.max(1),
            publish_script: Script::new(PUBLISH_SCRIPT),
            set_delivered_script: Script::new(SET_DELIVERED_SCRIPT),
            presence_scripts: PresenceScripts::default(),
            task: Default::default(),
        });
        broker
            .subscriber
            .subscribe(lane_key(&Target::Broadcast, "live").to_string())
            .await
            .map_err(router_error)?;
        let task = tokio::spawn(run_dispatch(Arc::downgrade(&broker), events));
        *broker.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        m::broker_healthy(true);
        Ok(broker)
    }

    fn lock_dispatched(&self) -> std::sync::MutexGuard<'_, Dispatched> {
        self.dispatched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_behind(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.behind.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops from `behind` the lanes of users nobody here listens to any more (one who left
    /// while their shard was lost, or while their catch-up failed): they would keep the
    /// broker degraded with nothing to catch up.
    fn forget_lanes_nobody_listens_to(&self) {
        let behind: Vec<String> = self.lock_behind().iter().cloned().collect();
        let gone: Vec<String> = {
            let mut dispatched = self.lock_dispatched();
            behind
                .into_iter()
                .filter(|channel| {
                    lane_of_channel(channel).is_none_or(|lane| dispatched.lane(&lane).is_none())
                })
                .collect()
        };
        if !gone.is_empty() {
            let mut behind = self.lock_behind();
            gone.iter().for_each(|channel| {
                behind.remove(channel);
            });
            drop(behind);
            self.report_health();
        }
    }

    fn report_health(&self) {
        m::broker_healthy(self.health() == BrokerHealth::Healthy);
    }

    /// Hands one live or recovered event to the sink, unless its lane already got it (or
    /// nobody here listens for the user any more).
    fn dispatch(&self, event: PublishedEvent) {
        {
            let mut dispatched = self.lock_dispatched();
            let Some(through) = dispatched.lane(&event.target) else {
                return;
            };
            if event.id.0 <= *through {
                return;
            }
            *through = event.id.0;
        }
        self.floor.fetch_max(event.id.0, Ordering::Relaxed);
        self.sink.deliver(Arc::new(event));
    }

    /// Reads back what `channels`' lanes published since they were last handed over: after
    /// a shard came back, or a slot moved. A lane that cannot be read stays behind and is
    /// tried again.
    async fn catch_up(&self, channels: Vec<String>) {
        futures::stream::iter(channels)
            .for_each_concurrent(CATCH_UP_CONCURRENCY, |channel| self.catch_up_lane(channel))
            .await;
        self.report_health();
    }

    /// [`catch_up`](Self::catch_up) for one channel's lane.
    async fn catch_up_lane(&self, channel: String) {
        let Some(target) = lane_of_channel(&channel) else {
            return;
        };
        let from = self.lock_dispatched().lane(&target).map(|through| *through);
        let Some(from) = from else {
            // Nobody here listens for that user any more.
            self.lock_behind().remove(&channel);
            return;
        };
        match self.read_lane(&target, EventId(from), usize::MAX).await {
            Ok((missed, _, _)) => {
                if !missed.is_empty() {
                    tracing::info!(
                        channel,
                        events = missed.len(),
                        "recovered events published while not listening"
                    );
                }
                missed.into_iter().for_each(|e| self.dispatch(e));
                self.lock_behind().remove(&channel);
            }
            Err(e) => {
                tracing::warn!(channel, "cannot catch up yet: {e}");
                // If the user left meanwhile, the retry tick drops it.
                self.lock_behind().insert(channel);
            }
        }
    }

    /// `target`'s lane after `after`, read in pages from its streams until at least
    /// `limit` events are in; whether some events after `after` may no longer be kept; and
    /// whether more may follow.
    async fn read_lane(
        &self,
        target: &Target,
        after: EventId,
        limit: usize,
    ) -> Result<(Vec<PublishedEvent>, bool, bool), BrokerError> {
        let kinds = || STREAM_KINDS.iter().copied();
        let streams: Vec<(Target, String)> = kinds()
            .map(|kind| {
                (
                    target.clone(),
                    lane_key_of_kind(target, "stream", kind).to_string(),
                )
            })
            .collect();
        // Every key of a lane is in one slot: route by its first stream.
        let route = &streams[0].1;
        let fetch = |asks: &[(usize, u64)]| {
            let pages: Vec<_> = asks
                .iter()
                .map(|&(i, from)| (streams[i].1.clone(), xrange_page(&streams[i].1, from)))
                .collect();
            let router = &self.router;
            async move {
                futures::future::try_join_all(
                    pages
                        .iter()
                        .map(|(stream, xrange)| router.query::<Entries>(stream, xrange)),
                )
                .await
                .map_err(router_error)
            }
        };
        // The lane's head, each stream's flood watermark and first page, at once.
        let mut watermarks = redis::cmd("MGET");
        watermarks.arg(lane_key(target, "seq"));
        for kind in kinds() {
            watermarks.arg(lane_key_of_kind(target, "trimmed", kind));
        }
        let from_start: Vec<(usize, u64)> = (0..streams.len()).map(|i| (i, after.0)).collect();
        let (mut reply, first_pages) = tokio::try_join!(
            async {
                self.router
                    .query::<Vec<Option<u64>>>(route, &watermarks)
                    .await
                    .map_err(router_error)
            },
            fetch(&from_start)
        )?;
        let head = reply.remove(0).unwrap_or(0);
        let now = now_ms();
        let replay_horizon = now
            .saturating_sub(self.retention.default.as_millis() as u64)
            .saturating_mul(1000);
        let gap = after.0
            > head
                .max(self.floor.load(Ordering::Relaxed))
                .max(now.saturating_mul(1000))
            || (after.0 < replay_horizon && after.0 < head)
            || reply.iter().flatten().any(|&below| after.0 < below);
        let read = read_merged(
            &streams,
            after.0,
            limit,
            &self.retention,
            now,
            PublishedEvent::encode_in_lane,
            first_pages,
            fetch,
        )
        .await?;
        Ok((read.events, gap || read.expired, read.more))
    }

    /// Publishes `lanes`, all on one shard as far as this instance knows: in one script if
    /// there are several, and if the script stops at a lane the shard does not hold (a slot
    /// moved meanwhile), lane by lane, each following its slot. Returns each lane's ids.
    async fn publish_on_shard(&self, lanes: &[&LaneBatch<'_>]) -> Result<Vec<Vec<EventId>>, BrokerError> {
        let deadline = tokio::time::Instant::now() + PUBLISH_DEADLINE;
        if lanes.len() > 1 {
            match self.publish_lanes(lanes, KeysIn::Arguments, deadline).await {
                Ok(ids) => return Ok(ids),
                // The shard answered, but not for every lane: a non-local key.
                Err(RouterError::Redis(e)) => {
                    tracing::debug!(lanes = lanes.len(), "publishing lane by lane: {e}")
                }
                // The shard did not answer through every retry: the lanes would not fare
                // better one by one.
                Err(e) => return Err(router_error(e)),
            }
        }
        type Lane<'a> = futures::future::BoxFuture<'a, Result<Vec<Vec<EventId>>, RouterError>>;
        let each: Vec<Lane<'_>> = lanes
            .iter()
            .map(|lane| Box::pin(self.publish_lanes(std::slice::from_ref(lane), KeysIn::Keys, deadline)) as _)
            .collect();
        let ids: Vec<Vec<Vec<EventId>>> = futures::stream::iter(each)
            .buffered(PUBLISH_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(router_error)?;
        Ok(ids.into_iter().flatten().collect())
    }

    /// Runs the publish script once for `lanes` (one lane with `KeysIn::Keys`) on the shard
    /// of the first, waiting for a replica where there is one; returns each lane's ids.
    async fn publish_lanes(
        &self,
        lanes: &[&LaneBatch<'_>],
        keys_in: KeysIn,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Vec<EventId>>, RouterError> {
        let Some(first) = lanes.first() else {
            return Ok(Vec::new());
        };
        let events = lanes.iter().map(|lane| lane.events.len()).sum::<usize>();
        let now = now_ms();
        let seq_keep = self.retention.longest().max(SEQ_KEEP_MIN).as_millis() as u64;
        let keys = |call: &mut redis::Cmd| {
            for lane in lanes {
                let target = lane.target();
                call.arg(&lane.batch_key)
                    .arg(lane_key(target, "seq"))
                    .arg(lane_key(target, "stream"))
                    .arg(lane_key(target, "trimmed"));
            }
        };
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.publish_script.get_hash());
        match keys_in {
            KeysIn::Keys => {
                call.arg(4 * lanes.len());
                keys(&mut call);
            }
            KeysIn::Arguments => {
                call.arg(0);
            }
        }
        call.arg(now)
            .arg(self.max_stream_len)
            .arg(self.floor.load(Ordering::Relaxed))
            .arg(seq_keep)
            .arg(BATCH_KEEP.as_millis() as u64)
            .arg(lanes.len());
        for lane in lanes {
            call.arg(lane.events.len());
        }
        if keys_in == KeysIn::Arguments {
            keys(&mut call);
        }
        for event in lanes.iter().flat_map(|lane| &lane.events) {
            let ttl_ms = self.retention.stream_retention(&event.name).as_millis() as u64;
            let kind = stream_kind(&self.retention, &event.name);
            call.arg(lane_key(&event.target, "live"))
                .arg(&*event.name)
                .arg(&event.data)
                .arg(ttl_ms)
                .arg(event.coalesce_key.as_deref().unwrap_or(""))
                .arg(event.timestamp_ms)
                .arg(KindSuffix(kind));
        }
        let stream = lane_key(first.target(), "stream").to_string();
        let script = &self.publish_script;
        let slot = router::key_slot(stream.as_bytes());
        let mut attempt = 0;
        let gave_up = || RouterError::Unavailable(format!("publish not done within {PUBLISH_DEADLINE:?}"));
        let ids: Vec<u64> = loop {
            attempt += 1;
            if tokio::time::Instant::now() >= deadline {
                return Err(gave_up());
            }
            let owner = self.router.owner_of(slot).unwrap_or_default();
            if self.router.replicas_of(slot) == 0 || self.replica_late(&owner) {
                let run = self.router.eval_script(&stream, script, &call);
                break tokio::time::timeout_at(deadline, run)
                    .await
                    .map_err(|_| gave_up())??;
            }
            // Acknowledged once a replica has it too, so a failover right after cannot lose
            // it. Past the timeout the primary alone has it: Redis's usual window.
            let run = self
                .router
                .eval_script_and_wait(&stream, script, &call, REPLICA_WAIT);
            match tokio::time::timeout_at(deadline, run)
                .await
                .map_err(|_| gave_up())?
            {
                Ok((ids, confirmed)) => {
                    if confirmed == 0 {
                        tracing::warn!(stream, primary = owner, "no replica confirmed a publish in time");
                        let until = now_ms() + REPLICA_LATE_PAUSE.as_millis() as u64;
                        self.replica_late_until
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(owner, until);
                    }
                    break ids;
                }
                // The primary went away before confirming: run the batch again where the
                // slot now lives (it comes back with its ids if the replica had it).
                Err(e @ (RouterError::Unavailable(_) | RouterError::ClusterDown(_)))
                    if attempt < PUBLISH_ATTEMPTS =>
                {
                    tracing::warn!(stream, "publish not confirmed, retrying: {e}")
                }
                Err(e) => return Err(e),
            }
        };
        if ids.len() != events {
            return Err(RouterError::Unavailable(format!(
                "a publish answered {} ids for {events} events",
                ids.len()
            )));
        }
        let mut ids = ids.into_iter().map(EventId);
        Ok(lanes
            .iter()
            .map(|lane| ids.by_ref().take(lane.events.len()).collect())
            .collect())
    }

    /// Whether publishes on `primary` skip waiting for its replicas for now.
    fn replica_late(&self, primary: &str) -> bool {
        let mut late = self.replica_late_until.lock().unwrap_or_else(|e| e.into_inner());
        match late.get(primary) {
            Some(&until) if now_ms() < until => true,
            Some(_) => {
                late.remove(primary);
                false
            }
            None => false,
        }
    }

    /// Sends `"!disconnect <nonce>"` to the instances listening for `user` and adds up the
    /// streams each one closed (they answer on a list named after the nonce, in the user's
    /// slot, read here until every listener answered or 3 s passed).
    async fn disconnect_everywhere(&self, user: &str) -> Result<usize, BrokerError> {
        let target = Target::User(user.into());
        let nonce = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let channel = lane_key(&target, "live").to_string();
        let receivers: usize = self
            .router
            .query(
                &channel,
                redis::cmd("SPUBLISH")
                    .arg(&channel)
                    .arg(format!("!disconnect {nonce}")),
            )
            .await
            .map_err(router_error)?;
        let key = disconnect_reply_key(user, &nonce);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut answers: Vec<usize> = Vec::new();
        while answers.len() < receivers && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            answers = self
                .router
                .query(&key, redis::cmd("LRANGE").arg(&key).arg(0).arg(-1))
                .await
                .map_err(router_error)?;
        }
        if answers.len() < receivers {
            tracing::warn!(user, "an instance did not answer a disconnect in time");
        }
        Ok(answers.iter().sum())
    }

    /// Answers a disconnect request from any instance: close the local streams, report how many.
    fn on_disconnect(&self, user: &str, nonce: &str) {
        let closed = self.sink.disconnect(user);
        let (router, key) = (self.router.clone(), disconnect_reply_key(user, nonce));
        tokio::spawn(async move {
            let mut pipe = redis::cmd("RPUSH");
            pipe.arg(&key).arg(closed);
            let pushed: Result<usize, _> = router.query(&key, &pipe).await;
            let expire: Result<bool, _> = router
                .query(&key, redis::cmd("PEXPIRE").arg(&key).arg(10_000))
                .await;
            if let Err(e) = pushed.map(drop).and(expire.map(drop)) {
                tracing::warn!("could not answer a disconnect: {e}");
            }
        });
    }
}

/// The list where instances answer disconnect `nonce` for `user`: in the user's slot.
fn disconnect_reply_key(user: &str, nonce: &str) -> String {
    format!("sse:{{u:{user}}}:disconnect:{nonce}")
}

/// Hands the subscriber's messages to the sink in order, catches lanes up after their shard
/// came back, and retries lanes still behind every second. Ends when the broker is dropped.
async fn run_dispatch(broker: Weak<ClusterBroker>, mut events: mpsc::Receiver<SubscriberEvent>) {
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = retry.tick() => {
                let Some(this) = broker.upgrade() else { return };
                this.forget_lanes_nobody_listens_to();
                let behind: Vec<String> = this.lock_behind().iter().cloned().collect();
                if !behind.is_empty() {
                    // Only lanes whose channel is subscribed again: the others still wait
                    // for their shard, and their `Resubscribed` catches them up.
                    let live: HashSet<String> = this.subscriber.live_channels().into_iter().collect();
                    this.catch_up(behind.into_iter().filter(|c| live.contains(c)).collect()).await;
                }
                continue;
            }
        };
        let Some(event) = event else { return };
        let Some(this) = broker.upgrade() else { return };
        match event {
            SubscriberEvent::Message { channel, payload } => {
                let Some(target) = lane_of_channel(&channel) else {
                    continue;
                };
                let payload = std::str::from_utf8(&payload).unwrap_or_default();
                let now = now_ms();
                match decode_payload(target, payload, now, PublishedEvent::encode_in_lane) {
                    Some(Message::Event(event)) => this.dispatch(event),
                    Some(Message::Disconnect { user, nonce }) => this.on_disconnect(&user, &nonce),
                    Some(Message::Replace { user, instance, ids }) => {
                        this.sink.replace(&user, &instance, &ids)
                    }
                    None => tracing::warn!(channel, "skipped an undecodable message"),
                }
            }
            SubscriberEvent::Lost { channels } => {
                tracing::warn!(
                    channels = channels.len(),
                    "a Redis Cluster shard was lost; resubscribing"
                );
                this.lock_behind().extend(channels);
                this.report_health();
            }
            SubscriberEvent::Resubscribed { channels } => this.catch_up(channels).await,
        }
    }
}

#[async_trait]
impl Broker for ClusterBroker {
    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn in_lanes(&self) -> bool {
        true
    }

    async fn publish(&self, events: Vec<Envelope>) -> Result<Vec<EventId>, BrokerError> {
        // Lanes in the order they first appear, each atomic; not atomic across lanes.
        let mut lanes: Vec<Vec<usize>> = Vec::new();
        let mut lane_of: HashMap<&Target, usize> = HashMap::new();
        for (i, event) in events.iter().enumerate() {
            let lane = *lane_of.entry(&event.target).or_insert_with(|| {
                lanes.push(Vec::new());
                lanes.len() - 1
            });
            lanes[lane].push(i);
        }
        let batches: Vec<LaneBatch<'_>> = lanes
            .iter()
            .map(|at| LaneBatch::new(at.iter().map(|&i| &events[i]).collect()))
            .collect();
        // The lanes on one primary go in one script (one call instead of one per user), up
        // to EVENTS_PER_SCRIPT events; a lane whose owner is unknown goes alone.
        let mut scripts: Vec<(Vec<usize>, usize)> = Vec::new();
        let mut open_script: HashMap<String, usize> = HashMap::new();
        for (lane, batch) in batches.iter().enumerate() {
            let size = batch.events.len();
            let owner = self.router.owner_of(batch.slot());
            let open = owner
                .as_ref()
                .and_then(|owner| open_script.get(owner).copied())
                .filter(|&at| scripts[at].1 + size <= EVENTS_PER_SCRIPT);
            let at = open.unwrap_or_else(|| {
                scripts.push((Vec::new(), 0));
                scripts.len() - 1
            });
            if let Some(owner) = owner {
                open_script.insert(owner, at);
            }
            scripts[at].0.push(lane);
            scripts[at].1 += size;
        }
        let shards: Vec<Vec<usize>> = scripts.into_iter().map(|(lanes, _)| lanes).collect();
        type Published<'a> = futures::future::BoxFuture<'a, Result<Vec<Vec<EventId>>, BrokerError>>;
        let work: Vec<Published<'_>> = shards
            .iter()
            .map(|shard| {
                let lanes: Vec<&LaneBatch<'_>> = shard.iter().map(|&lane| &batches[lane]).collect();
                Box::pin(async move { self.publish_on_shard(&lanes).await }) as _
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(work)
            .buffered(PUBLISH_CONCURRENCY)
            .collect()
            .await;
        let mut ids = vec![EventId(0); events.len()];
        let mut failed = None;
        for (shard, result) in shards.iter().zip(results) {
            match result {
                Ok(lane_ids) => {
                    for (&lane, lane_ids) in shard.iter().zip(lane_ids) {
                        for (&i, id) in lanes[lane].iter().zip(lane_ids) {
                            ids[i] = id;
                            self.floor.fetch_max(id.0, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            self.publish_failed_at.store(now_ms(), Ordering::Relaxed);
            self.report_health();
            return Err(e);
        }
        Ok(ids)
    }

    async fn replay_page(&self, user: &str, after: Cursor, limit: usize) -> Result<Replay, BrokerError> {
        let (user_after, broadcast_after) = after.lanes();
        let target = Target::User(user.into());
        // Each lane is its own order: a page of each is a prefix of each.
        let (own, broadcasts) = tokio::try_join!(
            self.read_lane(&target, user_after, limit),
            self.read_lane(&Target::Broadcast, broadcast_after, limit)
        )?;
        let mut events: Vec<Arc<PublishedEvent>> =
            own.0.into_iter().chain(broadcasts.0).map(Arc::new).collect();
        // Each lane is in order; across lanes, by id (roughly by time).
        events.sort_by_key(|e| e.id);
        Ok(Replay {
            events,
            gap: own.1 || broadcasts.1,
            more: own.2 || broadcasts.2,
        })
    }

    async fn head(&self, user: &str) -> Result<Cursor, BrokerError> {
        let target = Target::User(user.into());
        let user_seq = lane_key(&target, "seq").to_string();
        let broadcast_seq = lane_key(&Target::Broadcast, "seq").to_string();
        let (get_own, get_broadcast) = (redis::Cmd::get(&user_seq), redis::Cmd::get(&broadcast_seq));
        let (own, broadcast): (Option<u64>, Option<u64>) = tokio::try_join!(
            self.router.query(&user_seq, &get_own),
            self.router.query(&broadcast_seq, &get_broadcast)
        )
        .map_err(router_error)?;
        // An empty lane stands where the clock stood a while ago, not at 0: a client that
        // starts there and comes back after the retention gets `resync` only if events came
        // in between (as with one order), and no event to come is issued below it.
        let empty = empty_head(now_ms());
        Ok(Cursor::Lanes {
            user: EventId(own.unwrap_or(empty)),
            broadcast: EventId(broadcast.unwrap_or(empty)),
        })
    }

    async fn delivered_through(&self, user: &str) -> Result<Option<Cursor>, BrokerError> {
        let key = lane_key(&Target::User(user.into()), "delivered").to_string();
        let cursor: Option<String> = self
            .router
            .query(&key, redis::cmd("GET").arg(&key))
            .await
            .map_err(router_error)?;
        Ok(cursor.and_then(|c| c.parse().ok()))
    }

    async fn set_delivered_through(&self, user: &str, cursor: Cursor) {
        let key = lane_key(&Target::User(user.into()), "delivered").to_string();
        let (own, broadcast) = cursor.lanes();
        let ttl_ms = self.retention.longest().as_millis() as u64;
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.set_delivered_script.get_hash())
            .arg(1)
            .arg(&key)
            .arg(own.0)
            .arg(broadcast.0)
            .arg(ttl_ms);
        let result: Result<i64, _> = self
            .router
            .eval_script(&key, &self.set_delivered_script, &call)
            .await;
        if let Err(e) = result {
            tracing::warn!("could not record delivery position: {e}");
        }
    }

    async fn subscribe(&self, user: &str) {
        let _serial = self.subscribing.lock().await;
        let user: Arc<str> = user.into();
        let target = Target::User(user.clone());
        let channel = lane_key(&target, "live").to_string();
        if !self.lock_dispatched().users.contains_key(&user) {
            // Where the lane stands now: a catch-up after a lost shard reads from here, and
            // the first connection's replay covers what came before.
            let seq = lane_key(&target, "seq").to_string();
            let head: Option<u64> = match self.router.query(&seq, &redis::Cmd::get(&seq)).await {
                Ok(head) => head,
                Err(e) => {
                    tracing::warn!("cannot read where {channel} stands: {e}");
                    None
                }
            };
            let head = head.unwrap_or_else(|| empty_head(now_ms()));
            self.lock_dispatched().users.entry(user).or_insert(head);
        }
        if let Err(e) = self.subscriber.subscribe(channel.clone()).await {
            // The subscriber keeps trying; its `Resubscribed` catches the lane up.
            tracing::warn!("subscribe failed: {e}");
            self.lock_behind().insert(channel);
            self.report_health();
        }
    }

    async fn unsubscribe(&self, user: &str) {
        let _serial = self.subscribing.lock().await;
        if self.sink.listens_for(user) {
            // Back already (a reconnect, a storm): its subscribe found the lane subscribed.
            return;
        }
        let target = Target::User(user.into());
        let channel = lane_key(&target, "live").to_string();
        self.lock_dispatched().users.remove(user);
        self.lock_behind().remove(&channel);
        self.subscriber.unsubscribe(&channel).await;
    }

    async fn disconnect(&self, user: &str) -> Result<usize, BrokerError> {
        self.disconnect_everywhere(user).await
    }

    async fn put_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, BrokerError> {
        let cmd = super::redis::put_if_absent_cmd(key, value, ttl);
        self.router.query(key, &cmd).await.map_err(router_error)
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), BrokerError> {
        let cmd = super::redis::put_cmd(key, value, ttl);
        self.router.query(key, &cmd).await.map_err(router_error)
    }

    async fn remove(&self, key: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        self.router
            .query::<i64>(key, &cmd)
            .await
            .map(drop)
            .map_err(router_error)
    }

    fn health(&self) -> BrokerHealth {
        let failed_at = self.publish_failed_at.load(Ordering::Relaxed);
        let failing =
            failed_at > 0 && now_ms().saturating_sub(failed_at) < PUBLISH_FAILURE_SHOWS.as_millis() as u64;
        if self.lock_behind().is_empty() && !failing {
            BrokerHealth::Healthy
        } else {
            BrokerHealth::Degraded
        }
    }

    async fn write_presence(&self, write: &PresenceWrite<'_>) -> Result<bool, BrokerError> {
        let call = presence::write_call(write);
        let script = &self.presence_scripts.write;
        let existed: i64 = self
            .router
            .eval_script(presence::INSTANCES_KEY, script, &call.evalsha(script))
            .await
            .map_err(router_error)?;
        Ok(existed == 1 || write.full)
    }

    async fn read_presence(
        &self,
        user: Option<&str>,
        ttl: Duration,
    ) -> Result<Option<Vec<InstancePresence>>, BrokerError> {
        let call = presence::read_call(user, ttl);
        let script = &self.presence_scripts.read;
        let reply: Vec<redis::Value> = self
            .router
            .eval_script(presence::INSTANCES_KEY, script, &call.evalsha(script))
            .await
            .map_err(router_error)?;
        Ok(Some(presence::parse_read(reply)))
    }

    async fn leave_presence(&self, instance: &str) {
        let call = presence::leave_call(instance);
        let script = &self.presence_scripts.leave;
        let left: Result<i64, _> = self
            .router
            .eval_script(presence::INSTANCES_KEY, script, &call.evalsha(script))
            .await;
        if let Err(e) = left {
            tracing::warn!("could not leave the presence: {e}");
        }
    }

    async fn replace_elsewhere(&self, user: &str, instance: &str, ids: &[u64]) -> Result<(), BrokerError> {
        let channel = lane_key(&Target::User(user.into()), "live").to_string();
        let cmd = redis::cmd("SPUBLISH")
            .arg(&channel)
            .arg(presence::replace_message(instance, ids))
            .clone();
        self.router
            .query::<usize>(&channel, &cmd)
            .await
            .map(drop)
            .map_err(router_error)
    }

    async fn shutdown(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every try of a publish starts within PUBLISH_DEADLINE of the first, so a batch key
    /// written by one (even one whose command went out just before the deadline) is still
    /// there when a later one looks.
    #[test]
    fn a_batch_key_outlasts_every_try_of_its_publish() {
        assert!(
            BATCH_KEEP >= PUBLISH_DEADLINE * 2,
            "a retry could miss the key and publish the lane again"
        );
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + PUBLISH_DEADLINE
    }

    #[test]
    fn every_key_of_a_lane_is_in_one_slot() {
        for user in ["alice", "a}b", "{x}", "x:y", ""] {
            let target = Target::User(user.into());
            let slots: HashSet<u16> = ["seq", "stream", "trimmed", "delivered", "live"]
                .iter()
                .map(|what| router::key_slot(lane_key(&target, what).to_string().as_bytes()))
                .chain([router::key_slot(disconnect_reply_key(user, "n").as_bytes())])
                .collect();
            assert_eq!(slots.len(), 1, "{user:?}");
        }
        let broadcast: HashSet<u16> = ["seq", "stream", "trimmed", "live"]
            .iter()
            .map(|what| router::key_slot(lane_key(&Target::Broadcast, what).to_string().as_bytes()))
            .collect();
        assert_eq!(broadcast.len(), 1);
    }

    /// A broker on a cluster of 3 primaries of its own, which delivers nowhere.
    async fn broker_on_a_cluster() -> (sse_notify_testkit::RedisCluster, Arc<ClusterBroker>) {
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
        let cluster = tokio::task::spawn_blocking(|| sse_notify_testkit::RedisCluster::start(3, 0))
            .await
            .unwrap();
        let options = ClusterOptions {
            seeds: cluster.urls().split(',').map(String::from).collect(),
            retention: Retention {
                default: Duration::from_secs(60),
                offline: Vec::new(),
            },
            max_stream_len: 1000,
        };
        let broker = ClusterBroker::connect(options, Arc::new(Nowhere)).await.unwrap();
        (cluster, broker)
    }

    fn envelope(user: &str) -> Envelope {
        envelope_with(user, "{}")
    }

    fn envelope_with(user: &str, data: &str) -> Envelope {
        Envelope {
            target: Target::User(user.into()),
            name: "notification".into(),
            data: data.into(),
            timestamp_ms: 0,
            coalesce_key: None,
        }
    }

    /// `user`'s stream: each entry's event id and data.
    async fn stream_entries(broker: &ClusterBroker, user: &str) -> Vec<(EventId, String)> {
        let stream = lane_key(&Target::User(user.into()), "stream").to_string();
        let entries: Vec<(String, Vec<String>)> = broker
            .router
            .query(&stream, redis::cmd("XRANGE").arg(&stream).arg("-").arg("+"))
            .await
            .unwrap();
        entries
            .into_iter()
            .map(|(id, fields)| {
                let id = id.strip_suffix("-0").unwrap().parse().unwrap();
                let data = fields.chunks(2).find(|f| f[0] == "d").unwrap()[1].clone();
                (EventId(id), data)
            })
            .collect()
    }

    /// `redis-cli -p <port of node> args...`, for cluster commands on one node.
    fn on_node(node: &str, args: &[&str]) -> String {
        let port = node.rsplit(':').next().unwrap();
        let output = std::process::Command::new("redis-cli")
            .args(["-p", port])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn lane<'a>(batch_key: &str, events: &'a [Envelope]) -> LaneBatch<'a> {
        LaneBatch {
            batch_key: batch_key.into(),
            events: events.iter().collect(),
        }
    }

    /// How many events `user`'s stream holds.
    async fn stream_length(broker: &ClusterBroker, user: &str) -> usize {
        let stream = lane_key(&Target::User(user.into()), "stream").to_string();
        broker
            .router
            .query::<usize>(&stream, redis::cmd("XLEN").arg(&stream))
            .await
            .unwrap()
    }

    /// The owner of `user`'s lane.
    fn shard_of(broker: &ClusterBroker, user: &str) -> String {
        let slot = router::key_slot(
            lane_key(&Target::User(user.into()), "stream")
                .to_string()
                .as_bytes(),
        );
        broker.router.owner_of(slot).unwrap()
    }

    /// Users `<prefix>1`, `<prefix>2`, ... whose lanes are on `shard` (with `on` false:
    /// elsewhere).
    fn users_where<'a>(
        broker: &'a ClusterBroker,
        prefix: &'a str,
        shard: &'a str,
        on: bool,
    ) -> impl Iterator<Item = String> + 'a {
        (1..)
            .map(move |i| format!("{prefix}{i}"))
            .filter(move |user| (shard_of(broker, user) == shard) == on)
    }

    /// One lane per group of events, each under a new batch key.
    fn lanes_of<const N: usize>(events: &[[Envelope; N]]) -> Vec<LaneBatch<'_>> {
        events
            .iter()
            .map(|lane| LaneBatch::new(lane.iter().collect()))
            .collect()
    }

    /// A batch run twice (a retry after its reply was lost) is published once: the second
    /// run answers the first's ids and adds nothing to the streams. On a real cluster.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retried_batch_is_published_once() {
        let (_cluster, broker) = broker_on_a_cluster().await;
        let events = [envelope("a"), envelope("a")];
        let one = lane("sse:{u:a}:batch:1", &events);
        let first = broker.publish_lanes(&[&one], KeysIn::Keys, soon()).await.unwrap();
        let again = broker.publish_lanes(&[&one], KeysIn::Keys, soon()).await.unwrap();
        assert_eq!(first, again);
        assert!(first[0][0] < first[0][1], "ids increase within a lane");
        assert_eq!(stream_length(&broker, "a").await, 2);
        // Another batch is another batch.
        let other = lane("sse:{u:a}:batch:2", &events);
        let third = broker
            .publish_lanes(&[&other], KeysIn::Keys, soon())
            .await
            .unwrap();
        assert!(third[0][0] > first[0][1]);
        assert_eq!(stream_length(&broker, "a").await, 4);
    }

    /// The lanes of one shard go in one script, each with its own ids, and a retry of that
    /// script publishes none of them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lanes_of_one_shard_are_published_in_one_script_once() {
        let (_cluster, broker) = broker_on_a_cluster().await;
        let home = shard_of(&broker, "u0");
        let users: Vec<String> = users_where(&broker, "u", &home, true).take(3).collect();
        let data = |user: &str, n: u8| format!(r#"{{"for":"{user}","n":{n}}}"#);
        let events: Vec<[Envelope; 2]> = users
            .iter()
            .map(|u| [envelope_with(u, &data(u, 1)), envelope_with(u, &data(u, 2))])
            .collect();
        let lanes = lanes_of(&events);
        let lanes: Vec<&LaneBatch<'_>> = lanes.iter().collect();
        let first = broker
            .publish_lanes(&lanes, KeysIn::Arguments, soon())
            .await
            .unwrap();
        let again = broker
            .publish_lanes(&lanes, KeysIn::Arguments, soon())
            .await
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(first.len(), 3);
        for (user, ids) in users.iter().zip(&first) {
            // Each lane's stream holds its own two events, under the ids answered for them.
            let expected = vec![(ids[0], data(user, 1)), (ids[1], data(user, 2))];
            assert_eq!(stream_entries(&broker, user).await, expected, "{user}");
        }
    }

    /// A lane whose slot the shard does not hold stops the script before it writes; the
    /// lanes before it are recorded, so publishing lane by lane afterwards (what a publish
    /// falls back to) publishes every event exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lane_elsewhere_stops_the_script_and_the_rest_go_lane_by_lane_once() {
        let (_cluster, broker) = broker_on_a_cluster().await;
        let home = shard_of(&broker, "h0");
        let here: Vec<String> = users_where(&broker, "h", &home, true).take(2).collect();
        let away = users_where(&broker, "a", &home, false).next().unwrap();
        let users = [here[0].clone(), away.clone(), here[1].clone()];
        let events: Vec<[Envelope; 1]> = users.iter().map(|u| [envelope(u)]).collect();
        let lanes = lanes_of(&events);
        let lanes: Vec<&LaneBatch<'_>> = lanes.iter().collect();

        let refused = broker.publish_lanes(&lanes, KeysIn::Arguments, soon()).await;
        assert!(
            refused.is_err(),
            "a lane of another shard was written: {refused:?}"
        );
        let lengths = [
            stream_length(&broker, &users[0]).await,
            stream_length(&broker, &users[1]).await,
            stream_length(&broker, &users[2]).await,
        ];
        assert_eq!(
            lengths,
            [1, 0, 0],
            "the script stops at the lane elsewhere, before it writes"
        );

        let ids = broker.publish_on_shard(&lanes).await.unwrap();
        assert_eq!(ids.len(), 3);
        for user in &users {
            assert_eq!(stream_length(&broker, user).await, 1, "{user}: published once");
        }
        let again = broker.publish_on_shard(&lanes).await.unwrap();
        assert_eq!(ids, again, "a retry answers the same ids");
    }

    /// A batch over users on every shard, their events interleaved, gets back each event's
    /// own id, in order within each user, each event written once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_answers_each_events_own_id() {
        let (_cluster, broker) = broker_on_a_cluster().await;
        // Two users on one shard, and one on each other.
        let home = shard_of(&broker, "p0");
        let mut users: Vec<String> = users_where(&broker, "p", &home, true).take(2).collect();
        let mut elsewhere = HashSet::new();
        for user in users_where(&broker, "q", &home, false) {
            if elsewhere.insert(shard_of(&broker, &user)) {
                users.push(user);
            }
            if elsewhere.len() == 2 {
                break;
            }
        }
        let order = [0, 1, 0, 2, 3, 1, 0, 3];
        let events: Vec<Envelope> = order
            .iter()
            .enumerate()
            .map(|(n, &u)| envelope_with(&users[u], &format!(r#"{{"n":{n}}}"#)))
            .collect();
        let ids = broker.publish(events.clone()).await.unwrap();
        for (u, user) in users.iter().enumerate() {
            let expected: Vec<(EventId, String)> = order
                .iter()
                .zip(&events)
                .zip(&ids)
                .filter(|((&of, _), _)| of == u)
                .map(|((_, event), &id)| (id, event.data.to_string()))
                .collect();
            assert_eq!(stream_entries(&broker, user).await, expected, "{user}");
        }
    }

    /// A lane whose slot is migrating (its keys still here, its batch key not) stops a
    /// several-lane script before it writes: the batch key is read first. Once the slot is
    /// stable again, the batch goes through with every event once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_migrating_lane_stops_the_script_before_it_writes() {
        let (_cluster, broker) = broker_on_a_cluster().await;
        let home = shard_of(&broker, "m0");
        let mut here = users_where(&broker, "m", &home, true);
        let (before, moving, after) = (here.next().unwrap(), here.next().unwrap(), here.next().unwrap());
        let elsewhere = shard_of(&broker, &users_where(&broker, "x", &home, false).next().unwrap());
        // The moving lane has a counter and a stream here already.
        let earlier = broker.publish(vec![envelope(&moving)]).await.unwrap()[0];
        assert_eq!(stream_length(&broker, &moving).await, 1);

        let slot = router::key_slot(
            lane_key(&Target::User(moving.as_str().into()), "stream")
                .to_string()
                .as_bytes(),
        );
        let destination = on_node(&elsewhere, &["CLUSTER", "MYID"]);
        let slot_arg = slot.to_string();
        assert_eq!(
            on_node(
                &home,
                &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &destination]
            ),
            "OK"
        );
        let data = |user: &str| format!(r#"{{"lane":"{user}"}}"#);
        let events: Vec<[Envelope; 1]> = [&before, &moving, &after]
            .iter()
            .map(|u| [envelope_with(u, &data(u))])
            .collect();
        let lanes = lanes_of(&events);
        let lanes: Vec<&LaneBatch<'_>> = lanes.iter().collect();
        let refused = broker.publish_lanes(&lanes, KeysIn::Arguments, soon()).await;
        assert!(matches!(refused, Err(RouterError::Redis(_))), "{refused:?}");
        assert_eq!(
            stream_length(&broker, &before).await,
            1,
            "the lane before it is done"
        );
        assert_eq!(
            stream_length(&broker, &moving).await,
            1,
            "the migrating lane wrote nothing"
        );
        assert_eq!(stream_length(&broker, &after).await, 0);

        assert_eq!(on_node(&home, &["CLUSTER", "SETSLOT", &slot_arg, "STABLE"]), "OK");
        let ids = broker.publish_on_shard(&lanes).await.unwrap();
        // Each lane holds its own event once, under its id (a lane done earlier in the
        // script is skipped whole, its arguments too).
        assert_eq!(
            stream_entries(&broker, &before).await,
            [(ids[0][0], data(&before))],
            "not published twice"
        );
        assert_eq!(
            stream_entries(&broker, &moving).await,
            [(earlier, "{}".to_string()), (ids[1][0], data(&moving))]
        );
        assert_eq!(stream_entries(&broker, &after).await, [(ids[2][0], data(&after))]);
    }

    #[test]
    fn a_live_channel_names_its_lane() {
        for user in ["alice", "a}b", "}:live"] {
            let target = Target::User(user.into());
            let channel = lane_key(&target, "live").to_string();
            assert_eq!(lane_of_channel(&channel), Some(target));
        }
        assert_eq!(lane_of_channel("sse:{b}:live"), Some(Target::Broadcast));
        assert_eq!(lane_of_channel("sse:u:alice"), None);
    }
}
