//! [`RedisBroker`]: any number of instances on one Redis act as one.
//!
//! ## Keys and channels
//!
//! | key / channel | what |
//! |---|---|
//! | `sse:seq` | the newest id issued: one order for every instance |
//! | `sse:stream:u:<user>` | stream of the user's events kept only the replay retention (progress, custom events), entry id `<event id>-0`, fields `n` (name), `d` (data), `t` (ms), `k` (coalescing key) |
//! | `sse:stream:long:u:<user>` | the same for the types [kept longer](Retention::kept_longer) for offline users (`notification`, ...) |
//! | `sse:stream:broadcast`, `sse:stream:long:broadcast` | the same for broadcasts |
//! | `sse:trimmed:<stream>` | the newest id a flood pushed out of that stream (set only when `MAXLEN` trims) |
//! | `sse:delivered:u:<user>` | highest id a closed connection of the user had received: where offline delivery starts |
//! | channel `sse:u:<user>` | live fan-out of the user's events, `"<id> <name> <data>"`, and `"!disconnect <nonce>"` |
//! | channel `sse:broadcast` | live fan-out of broadcasts |
//!
//! Publishing is one Lua script per batch: issue the id, `XADD` to the stream (trimmed by
//! time with `MINID ~`, capped by `MAXLEN`, `PEXPIRE`d to the retention), `PUBLISH`: the
//! history and the live message can never disagree. Types kept only the replay retention
//! and types kept longer have streams of their own, each trimmed by time to its retention:
//! a flood of progress events is gone after 5 minutes, not kept as long as notifications.
//! Because the streams use the global id as entry id, a `Last-Event-ID` resumes the user's
//! streams and the broadcast streams at once, exactly.
//!
//! Ids are a hybrid clock: `max(newest + 1, now_ms x 1000, the instance's own newest + 1)`.
//! They increase, stay close to the time they were issued (so streams can be trimmed by
//! time), and never go back, even when Redis loses its data.
//!
//! Each instance subscribes only to the channels of users connected to it (plus broadcast),
//! so Redis traffic per instance scales with its users, not with the number of instances.
//!
//! ## Replay and gaps
//!
//! A resume reads the streams in pages of 512 entries, merged in id order. Every event is
//! kept at least the replay retention, so a resume from an id within that window is exact. An older id
//! (or one from the future, or below what a flood pushed out) answers `resync`.
//!
//! ## Faults
//!
//! Publishing during an outage returns [`BrokerError::Unavailable`] to the caller. The
//! subscriber reconnects with backoff and jitter, resubscribes, and reads from the streams
//! what was published while it was away, so connected clients miss nothing; until that
//! read succeeds the broker stays degraded and tries again. Messages that do not decode
//! (malformed, an absurd id, a bad name) are logged and skipped.

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
use redis::{aio::ConnectionManager, aio::ConnectionManagerConfig, aio::PubSubSink, Client, Script};
use tokio::sync::Mutex;

use super::{
    empty_head,
    presence::{self, PresenceScripts},
    Broker, BrokerError, BrokerHealth, Cursor, Envelope, EventId, EventSink, InstancePresence, PresenceWrite,
    PublishedEvent, Replay, Retention, Target,
};
use crate::{
    backoff::backoff_delay,
    events::validate_event_name,
    server::{clock::now_ms, metrics as m},
};

const SEQ_KEY: &str = "sse:seq";
const BROADCAST_CHANNEL: &str = "sse:broadcast";
/// Entries read per round trip when replaying.
pub(super) const PAGE: usize = 512;
/// The oldest Redis this broker runs on: `XADD ... MINID`, `XINFO` fields and sharded
/// pub/sub need 7.0.
const MIN_REDIS: (u32, u32) = (7, 0);
/// A live message whose id is further ahead of this instance's clock is refused: it would
/// make every later event look old.
const MAX_CLOCK_SKEW_MS: u64 = 3_600_000;

const USER_CHANNEL_PREFIX: &str = "sse:u:";

/// A key or channel name: a fixed prefix, then the rest. As a command argument it is
/// written straight into the command (`write_arg_fmt`), without a `String` of its own.
#[derive(Clone, Copy)]
struct Prefixed<T>(&'static str, T);

impl<T: std::fmt::Display> std::fmt::Display for Prefixed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.0, self.1)
    }
}

impl<T: std::fmt::Display> redis::ToRedisArgs for Prefixed<T> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self)
    }
}

/// A key is one argument.
impl<T: std::fmt::Display> redis::ToSingleRedisArg for Prefixed<T> {}

/// The stream that keeps `target`'s events of `kind` ([`STREAM_KINDS`]). Written as a
/// command argument like [`Prefixed`].
#[derive(Clone, Copy)]
struct StreamKey<'a> {
    target: &'a Target,
    kind: Option<&'a str>,
}

fn stream_of<'a>(target: &'a Target, kind: Option<&'a str>) -> StreamKey<'a> {
    StreamKey { target, kind }
}

impl std::fmt::Display for StreamKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `sse:stream:u:`, `sse:stream:long:`: no user id makes one stream's key another's.
        match self.kind {
            None => f.write_str("sse:stream:")?,
            Some(kind) => write!(f, "sse:stream:{kind}:")?,
        }
        match self.target {
            Target::User(user) => write!(f, "u:{user}"),
            Target::Broadcast => f.write_str("broadcast"),
        }
    }
}

impl redis::ToRedisArgs for StreamKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self)
    }
}

impl redis::ToSingleRedisArg for StreamKey<'_> {}

/// The pub/sub channel of `target`'s live events.
fn channel_of(target: &Target) -> Prefixed<&str> {
    match target {
        Target::User(user) => user_channel(user),
        Target::Broadcast => Prefixed(BROADCAST_CHANNEL, ""),
    }
}

fn user_channel(user: &str) -> Prefixed<&str> {
    Prefixed(USER_CHANNEL_PREFIX, user)
}

fn delivered_key(user: &str) -> String {
    format!("sse:delivered:u:{user}")
}

fn trimmed_key<T: std::fmt::Display>(stream: T) -> Prefixed<T> {
    Prefixed("sse:trimmed:", stream)
}

/// One event's stream write, the same on one Redis and on a cluster (in Lua, for the publish
/// scripts): `XADD` with the id, trimmed by time to the event's retention (`MINID ~`: every
/// event of a stream has the same one) and by length (recording what a flood pushed out),
/// and the stream's expiry only ever extended. Expects `stream`, `trimmed`, `id` and `at`
/// (where the event's arguments start in `ARGV`), with the time in ms in `ARGV[1]`.
macro_rules! lua_append_event {
    () => {
        r#"
  local ttl = tonumber(ARGV[at + 4])
  local below = string.format('%.0f', (tonumber(ARGV[1]) - ttl) * 1000)
  redis.call('XADD', stream, 'MINID', '~', below, id .. '-0',
    'n', ARGV[at + 2], 'd', ARGV[at + 3], 't', ARGV[at + 6], 'k', ARGV[at + 5])
  if redis.call('XLEN', stream) > tonumber(ARGV[2]) then
    redis.call('XTRIM', stream, 'MAXLEN', ARGV[2])
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1][1]
    local below = string.format('%.0f', tonumber(string.match(first, '^(%d+)')) - 1)
    redis.call('SET', trimmed, below, 'PX', ttl)
  end
  -- A stream lives as long as its newest event: only ever extend its expiry.
  if redis.call('PTTL', stream) < ttl then redis.call('PEXPIRE', stream, ttl) end
  if redis.call('PTTL', trimmed) > 0 and redis.call('PTTL', trimmed) < ttl then redis.call('PEXPIRE', trimmed, ttl) end
"#
    };
}
pub(super) use lua_append_event;

const PUBLISH_SCRIPT: &str = concat!(
    r#"
-- KEYS[1] = id counter, then per event: stream, trimmed marker
-- ARGV[1] = now ms, ARGV[2] = max stream length, ARGV[3] = floor id,
-- then per event: channel, name, data, ttl ms, coalescing key, timestamp ms
-- Lua numbers are doubles: ids (about 1.8e15) stay exact below 2^53; format them as
-- integers, never as 1.79e+15.
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local clock = tonumber(ARGV[1]) * 1000
local floor = tonumber(ARGV[3])
local ids = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local stream, trimmed = KEYS[2 + i * 2], KEYS[3 + i * 2]
  local at = 3 + i * 6
  last = math.max(last + 1, clock, floor + 1)
  local id = string.format('%.0f', last)
"#,
    lua_append_event!(),
    r#"  redis.call('PUBLISH', ARGV[at + 1], id .. ' ' .. ARGV[at + 2] .. ' ' .. ARGV[at + 3])
  ids[#ids + 1] = id
end
redis.call('SET', KEYS[1], string.format('%.0f', last))
return ids
"#
);

const SET_DELIVERED_SCRIPT: &str = r#"
-- KEYS[1] = cursor key; ARGV[1] = id, ARGV[2] = ttl ms. Keeps the higher id.
local current = redis.call('GET', KEYS[1])
if not current or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"#;

/// Shares ids, history and fan-out between instances through one Redis.
pub struct RedisBroker {
    client: Client,
    conn: ConnectionManager,
    sink: EventSink,
    /// Who this instance listens for, and the subscriber connection's handle.
    subscriptions: Mutex<Subscriptions>,
    /// Users whose subscription may have to change: flushed together (see
    /// [`sync_subscriptions`](Self::sync_subscriptions)).
    to_sync: std::sync::Mutex<Vec<Arc<str>>>,
    healthy: AtomicBool,
    /// Highest id handed to the sink: recovery after a reconnect starts here.
    last_dispatched: AtomicU64,
    /// Highest id this instance issued or saw: new ids go above it even if Redis lost its data.
    floor: AtomicU64,
    retention: Retention,
    max_stream_len: usize,
    publish_script: Script,
    set_delivered_script: Script,
    presence_scripts: PresenceScripts,
    subscriber: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// With `wait_replicas`: publishes wait for replicas to confirm them.
    replica_wait: Option<ReplicaWait>,
}

/// How a publish is confirmed by replicas before it is acknowledged, so a failover right
/// after cannot lose it. A `WAIT` blocks its connection, so publishes and their `WAIT`s
/// run on a connection of their own.
struct ReplicaWait {
    replicas: usize,
    conn: ConnectionManager,
    /// Until when (ms since the epoch) publishes do not wait, after replicas did not
    /// confirm one in time (down or far behind): each wait would block every publish.
    late_until_ms: AtomicU64,
}

/// How long a publish waits for its replicas.
const REPLICA_WAIT: Duration = Duration::from_millis(500);
/// How long publishes stop waiting after replicas missed one.
const REPLICA_LATE_PAUSE: Duration = Duration::from_secs(10);

/// The users whose channels this instance listens to, and the subscribe/unsubscribe handle
/// of the current subscriber connection (`None` while it is down). One lock for both: a
/// user who subscribes while the connection is rebuilt is either in the set the rebuild
/// subscribes, or subscribes on the new connection itself.
#[derive(Default)]
struct Subscriptions {
    users: HashSet<Arc<str>>,
    pubsub: Option<PubSubSink>,
}

/// Where and how to reach Redis.
///
/// For `rediss://`, TLS runs on rustls with the process's default crypto provider, and
/// installs `ring` as that default when none is set. A host app that wants another
/// provider installs it before starting the service.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://` or `rediss://` (TLS).
    pub url: String,
    /// A PEM certificate authority to verify a `rediss://` server with, instead of the
    /// public web roots (for a Redis with a certificate of a private CA).
    pub ca_cert: Option<Vec<u8>>,
    /// How long events are kept, by type.
    pub retention: Retention,
    /// Most entries one stream keeps.
    pub max_stream_len: usize,
    /// Replicas that must confirm a publish before it is acknowledged (`WAIT`, up to
    /// 500 ms); 0 acknowledges once the primary has it.
    pub wait_replicas: usize,
}

/// For a TLS URL (`rediss://`, `valkeys://`), installs `ring` as the process's default
/// rustls provider if none is set: redis-rs takes the default, which rustls can pick by
/// itself only when exactly one is compiled in, and a host app may bring another. A host
/// that installs its own must do so before starting the service.
pub(super) fn install_tls_provider_for(url: &str) {
    let tls = url.trim().split_once("://").is_some_and(|(scheme, _)| {
        ["rediss", "valkeys"]
            .iter()
            .any(|s| scheme.eq_ignore_ascii_case(s))
    });
    if tls && rustls::crypto::CryptoProvider::get_default().is_none() {
        // rustls 0.23.48 deprecates ring's provider for lacking post-quantum key exchange
        // (aws-lc-rs has it, at the price of a C and CMake build); a host that wants it
        // installs aws-lc-rs's provider before starting the service, and this steps aside.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// `SET key value NX GET PX ttl`: stores unless the key holds a value, and answers with
/// that value (nil when stored). Redis 7.0 takes `NX` with `GET`.
pub(super) fn put_if_absent_cmd(key: &str, value: &str, ttl: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(value)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(ttl.as_millis().max(1) as u64);
    cmd
}

pub(super) fn put_cmd(key: &str, value: &str, ttl: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(value)
        .arg("PX")
        .arg(ttl.as_millis().max(1) as u64);
    cmd
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// Redis answered that it does not know the script (restarted, or its scripts flushed).
fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Loads the publish script, so the `EVALSHA` can run again; a failure shows in that run.
async fn load_publish_script(conn: &mut ConnectionManager) {
    let _ = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(PUBLISH_SCRIPT)
        .exec_async(conn)
        .await;
}

impl RedisBroker {
    /// Connects, checks the server's version, starts the subscriber task, and hands every
    /// event of the subscribed users, and every broadcast, to `sink`.
    pub async fn connect(options: RedisOptions, sink: EventSink) -> Result<Arc<Self>, BrokerError> {
        let RedisOptions {
            url,
            ca_cert,
            retention,
            max_stream_len,
            wait_replicas,
        } = options;
        install_tls_provider_for(&url);
        let client = match ca_cert {
            None => Client::open(url.as_str()),
            Some(pem) => Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            ),
        }
        .map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let mut conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(unavailable)?;
        check_server(&mut conn).await?;
        let replica_wait = match wait_replicas {
            0 => None,
            replicas => Some(ReplicaWait {
                replicas,
                conn: ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map_err(unavailable)?,
                late_until_ms: AtomicU64::new(0),
            }),
        };
        let broker = Arc::new(Self {
            client,
            conn,
            sink,
            subscriptions: Mutex::new(Subscriptions::default()),
            to_sync: Default::default(),
            healthy: AtomicBool::new(true),
            last_dispatched: AtomicU64::new(0),
            floor: AtomicU64::new(0),
            retention,
            max_stream_len: max_stream_len.max(1),
            publish_script: Script::new(PUBLISH_SCRIPT),
            set_delivered_script: Script::new(SET_DELIVERED_SCRIPT),
            presence_scripts: PresenceScripts::default(),
            subscriber: std::sync::Mutex::new(None),
            replica_wait,
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

    /// Where ids stand: the newest issued, or with none in Redis (nothing published yet,
    /// or its data lost), an [empty head](empty_head); never below what this instance
    /// issued or saw.
    fn head_or_empty(&self, head: Option<u64>, now: u64) -> u64 {
        head.unwrap_or_else(|| empty_head(now))
            .max(self.floor.load(Ordering::Relaxed))
    }

    /// Hands one live or recovered event to the sink, unless it was handed over already.
    fn dispatch(&self, event: PublishedEvent) {
        // One subscriber connection delivers in publish order, so ids only grow here.
        if event.id.0 <= self.last_dispatched.load(Ordering::Relaxed) {
            return;
        }
        self.last_dispatched.store(event.id.0, Ordering::Relaxed);
        self.floor.fetch_max(event.id.0, Ordering::Relaxed);
        self.sink.deliver(Arc::new(event));
    }

    /// The streams of `users` and broadcast after `after`, merged in id order, read in
    /// pages until at least `limit` events are in; whether some events after `after` may
    /// no longer be kept; and whether more follow the ones returned.
    async fn read_streams(
        &self,
        users: &[Arc<str>],
        after: EventId,
        limit: usize,
    ) -> Result<(Vec<PublishedEvent>, bool, bool), BrokerError> {
        let mut conn = self.conn.clone();
        let targets: Vec<Target> = users
            .iter()
            .map(|u| Target::User(u.clone()))
            .chain(std::iter::once(Target::Broadcast))
            .collect();
        let streams: Vec<(Target, String)> = targets
            .iter()
            .flat_map(|target| {
                STREAM_KINDS
                    .iter()
                    .map(move |kind| (target.clone(), stream_of(target, *kind).to_string()))
            })
            .collect();
        // The head, each stream's flood watermark and first page, in one round trip.
        let mut pipe = redis::pipe();
        pipe.get(SEQ_KEY);
        for (_, stream) in &streams {
            pipe.get(trimmed_key(stream));
        }
        for (_, stream) in &streams {
            pipe.add_command(xrange_page(stream, after.0));
        }
        let mut reply: Vec<redis::Value> = pipe.query_async(&mut conn).await.map_err(|e| {
            self.set_healthy(false);
            unavailable(e)
        })?;
        let pages = reply.split_off(1 + streams.len());
        let unexpected = |e: redis::ParsingError| BrokerError::Unavailable(format!("unexpected reply: {e}"));
        let head: Option<u64> = redis::from_redis_value(reply.remove(0)).map_err(unexpected)?;
        let trimmed = reply
            .into_iter()
            .map(redis::from_redis_value::<Option<u64>>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(unexpected)?;
        let first_pages = pages
            .into_iter()
            .map(redis::from_redis_value::<Entries>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(unexpected)?;
        let now = now_ms();
        let replay_horizon = now
            .saturating_sub(self.retention.default.as_millis() as u64)
            .saturating_mul(1000);
        let gap = after.0 > self.head_or_empty(head, now)
            // Older than retention may be trimmed, unless nothing was published since.
            || (after.0 < replay_horizon && after.0 < head.unwrap_or(0))
            || trimmed.iter().flatten().any(|&below| after.0 < below);
        let fetch = |asks: &[(usize, u64)]| {
            let mut pipe = redis::pipe();
            for (i, from) in asks {
                pipe.add_command(xrange_page(&streams[*i].1, *from));
            }
            let mut conn = conn.clone();
            async move {
                pipe.query_async(&mut conn).await.map_err(|e| {
                    self.set_healthy(false);
                    unavailable(e)
                })
            }
        };
        let read = read_merged(
            &streams,
            after.0,
            limit,
            &self.retention,
            now,
            PublishedEvent::encode,
            first_pages,
            fetch,
        )
        .await?;
        Ok((read.events, gap || read.expired, read.more))
    }

    /// Runs the publish script and `WAIT`s for the replicas on the publish connection. Past
    /// the wait the primary alone has it, Redis's usual window: acknowledged, and publishes
    /// stop waiting for a while.
    async fn publish_and_wait(
        &self,
        call: redis::Cmd,
        wait: &ReplicaWait,
        now: u64,
    ) -> Result<Vec<u64>, redis::RedisError> {
        let mut pipe = redis::pipe();
        pipe.add_command(call)
            .cmd("WAIT")
            .arg(wait.replicas)
            .arg(REPLICA_WAIT.as_millis() as u64);
        let mut conn = wait.conn.clone();
        let (ids, confirmed): (Vec<u64>, usize) = match pipe.query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => {
                load_publish_script(&mut conn).await;
                pipe.query_async(&mut conn).await?
            }
            reply => reply?,
        };
        if confirmed < wait.replicas {
            tracing::warn!(
                confirmed,
                wanted = wait.replicas,
                "replicas did not confirm a publish in time; not waiting for them for a while"
            );
            let until = now + REPLICA_LATE_PAUSE.as_millis() as u64;
            wait.late_until_ms.store(until, Ordering::Relaxed);
        }
        Ok(ids)
    }

    /// Sends `"!disconnect <nonce>"` to the instances listening for `user` and adds up the
    /// streams each one closed (they answer on a list named after the nonce).
    async fn disconnect_everywhere(&self, user: &str) -> Result<usize, BrokerError> {
        let nonce = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
        let mut conn = self.conn.clone();
        let receivers: usize = redis::cmd("PUBLISH")
            .arg(user_channel(user))
            .arg(format!("!disconnect {nonce}"))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if receivers == 0 {
            return Ok(0);
        }
        // A connection of its own: BLPOP blocks it.
        let mut blocking = self
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(unavailable)?;
        let key = reply_key(&nonce);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut closed = 0;
        for _ in 0..receivers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply: Option<(String, usize)> = redis::cmd("BLPOP")
                .arg(&key)
                .arg(left.as_secs_f64().max(0.01))
                .query_async(&mut blocking)
                .await
                .map_err(unavailable)?;
            match reply {
                Some((_, n)) => closed += n,
                None => {
                    tracing::warn!(user, "an instance did not answer a disconnect in time");
                    break;
                }
            }
        }
        Ok(closed)
    }

    /// Answers a disconnect request from any instance: close the local streams, report how many.
    fn on_disconnect(self: &Arc<Self>, user: &str, nonce: &str) {
        let closed = self.sink.disconnect(user);
        let (mut conn, key) = (self.conn.clone(), reply_key(nonce));
        tokio::spawn(async move {
            let reply: Result<(), _> = redis::pipe()
                .rpush(&key, closed)
                .pexpire(&key, 10_000)
                .query_async(&mut conn)
                .await;
            if let Err(e) = reply {
                tracing::warn!("could not answer a disconnect: {e}");
            }
        });
    }
}

fn reply_key(nonce: &str) -> String {
    format!("sse:disconnect:{nonce}")
}

/// Refuses a Redis older than [`MIN_REDIS`], or a node of a Redis Cluster, with a message
/// that says so.
async fn check_server(conn: &mut ConnectionManager) -> Result<(), BrokerError> {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    check_version(&info)?;
    // On a cluster node every publish would fail with CROSSSLOT (the id counter, the
    // user's stream and the broadcast stream live in different slots): say so at start.
    let cluster: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(conn)
        .await
        .map_err(unavailable)?;
    if cluster.lines().any(|l| l.trim() == "cluster_enabled:1") {
        return Err(BrokerError::Unsupported(
            "REDIS_URL points at a node of a Redis Cluster: set SSE_REDIS_CLUSTER=1 to run on \
             the cluster (with its nodes in REDIS_URL, separated by commas)"
                .to_string(),
        ));
    }
    Ok(())
}

/// Refuses a Redis older than [`MIN_REDIS`], from its `INFO server`.
pub(super) fn check_version(info: &str) -> Result<(), BrokerError> {
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown")
        .to_string();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < MIN_REDIS {
        return Err(BrokerError::Unsupported(format!(
            "Redis {version} is too old: sse-notify needs Redis {}.{} or newer \
             (stream trimming by MINID and the XINFO fields it reads)",
            MIN_REDIS.0, MIN_REDIS.1
        )));
    }
    Ok(())
}

/// How an event read from Redis is built: [`PublishedEvent::encode`], or
/// [`PublishedEvent::encode_in_lane`] on a cluster.
pub(super) type Encode = fn(EventId, Target, Arc<str>, &str, u64, Option<Arc<str>>) -> PublishedEvent;

/// A stream entry as an event; `None` for anything malformed.
pub(super) fn decode_entry(
    target: &Target,
    entry_id: &str,
    fields: &[(String, String)],
    encode: Encode,
) -> Option<PublishedEvent> {
    let id = EventId(entry_id.split('-').next()?.parse().ok()?);
    let field = |k: &str| fields.iter().find(|(name, _)| name == k).map(|(_, v)| v.as_str());
    let name = field("n")?;
    let data = field("d")?;
    if validate_event_name(name).is_err() || !is_json_object(data) {
        return None;
    }
    Some(encode(
        id,
        target.clone(),
        name.into(),
        data,
        field("t").and_then(|t| t.parse().ok()).unwrap_or(0),
        field("k").filter(|k| !k.is_empty()).map(Into::into),
    ))
}

/// A target's streams: `None`, the types kept only the replay retention, and `long`, the
/// types [kept longer](Retention::kept_longer) for offline users. Both are always read, so
/// a type whose retention changes is still replayed from where it was written.
pub(super) const STREAM_KINDS: [Option<&str>; 2] = [None, Some(LONG_KEPT)];

/// The stream (kind) of the types kept longer.
pub(super) const LONG_KEPT: &str = "long";

/// The stream kind of events named `name` (see [`STREAM_KINDS`]).
pub(super) fn stream_kind(retention: &Retention, name: &str) -> Option<&'static str> {
    retention.kept_longer(name).then_some(LONG_KEPT)
}

/// One page of a stream: up to [`PAGE`] entries after `from`.
pub(super) fn xrange_page(stream: &str, from: u64) -> redis::Cmd {
    let mut xrange = redis::cmd("XRANGE");
    xrange
        .arg(stream)
        .arg(format!("({from}-0"))
        .arg("+")
        .arg("COUNT")
        .arg(PAGE);
    xrange
}

/// Stream entries as `XRANGE` answers them.
pub(super) type Entries = Vec<(String, Vec<(String, String)>)>;

/// Events read from several streams, merged.
pub(super) struct MergedRead {
    /// In id order: every one kept, from the start up to where each stream is read through.
    pub events: Vec<PublishedEvent>,
    /// Some entries were no longer kept (their retention passed, trimming lags).
    pub expired: bool,
    /// More entries follow in some stream: read again after the last event.
    pub more: bool,
}

/// Reads `streams` (each with whose events it holds) after `after`, merged in id order, in
/// pages until at least `limit` events are known complete: below where every stream still
/// being read stopped. `fetch` reads one page ([`xrange_page`]) of each `(stream, from)`
/// asked, in one round trip where it can; `first_pages` are every stream's page after
/// `after`, which callers read with the watermarks, in the same round trip.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_merged<F, Fut>(
    streams: &[(Target, String)],
    after: u64,
    limit: usize,
    retention: &Retention,
    now: u64,
    encode: Encode,
    first_pages: Vec<Entries>,
    fetch: F,
) -> Result<MergedRead, BrokerError>
where
    F: Fn(&[(usize, u64)]) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Entries>, BrokerError>>,
{
    let mut events = Vec::new();
    let mut expired = false;
    let mut reading: Vec<(usize, u64)> = (0..streams.len()).map(|i| (i, after)).collect();
    let mut pages = first_pages;
    loop {
        let mut next = Vec::new();
        for (&(i, from), page) in reading.iter().zip(pages) {
            let (target, stream) = &streams[i];
            let full = page.len() == PAGE;
            let mut through = from;
            for (entry_id, fields) in page {
                // Past this entry whatever it holds: a page of undecodable ones moves on too.
                let entry = entry_id.split('-').next().and_then(|id| id.parse::<u64>().ok());
                through = through.max(entry.unwrap_or(through));
                let Some(event) = decode_entry(target, &entry_id, &fields, encode) else {
                    tracing::warn!(stream, entry = %entry_id, "skipped an undecodable entry");
                    continue;
                };
                if retention.keeps(&event, now) {
                    events.push(event);
                } else {
                    expired = true;
                }
            }
            if full {
                next.push((i, through));
            }
        }
        reading = next;
        // Streams still being read stopped where they did: only what lies before the
        // earliest of those is known to be complete, in one order.
        let complete_through = reading.iter().map(|&(_, through)| through).min();
        let complete = |e: &PublishedEvent| complete_through.is_none_or(|through| e.id.0 <= through);
        if complete_through.is_none() || events.iter().filter(|e| complete(e)).count() >= limit {
            events.retain(complete);
            events.sort_by_key(|e| e.id);
            let more = complete_through.is_some();
            return Ok(MergedRead {
                events,
                expired,
                more,
            });
        }
        pages = fetch(&reading).await?;
    }
}

/// Whether `data` is one JSON object on one line (what every publisher writes).
fn is_json_object(data: &str) -> bool {
    data.starts_with('{')
        && !data.contains(['\n', '\r'])
        && serde_json::from_str::<serde::de::IgnoredAny>(data).is_ok()
}

/// What a live message asks for.
#[derive(Debug)]
pub(super) enum Message {
    Event(PublishedEvent),
    Disconnect {
        user: Arc<str>,
        nonce: String,
    },
    /// Close these connections of `user` if `instance` is this one.
    Replace {
        user: Arc<str>,
        instance: String,
        ids: Vec<u64>,
    },
}

/// Parses a live message from `channel`: `"<id> <name> <data>"`, or `"!disconnect <nonce>"`
/// on a user's channel. `None` for anything malformed: a bad id (or one absurdly far ahead
/// of `now_ms`), a bad name, data that is not a JSON object.
fn decode_message(channel: &str, payload: &str, now_ms: u64) -> Option<Message> {
    let target = if channel == BROADCAST_CHANNEL {
        Target::Broadcast
    } else {
        Target::User(channel.strip_prefix(USER_CHANNEL_PREFIX)?.into())
    };
    decode_payload(target, payload, now_ms, PublishedEvent::encode)
}

/// Parses a live message for `target` (see [`decode_message`]).
pub(super) fn decode_payload(target: Target, payload: &str, now_ms: u64, encode: Encode) -> Option<Message> {
    if let Some(rest) = payload.strip_prefix("!replace ") {
        let Target::User(user) = target else { return None };
        let (instance, ids) = presence::parse_replace(rest)?;
        return Some(Message::Replace { user, instance, ids });
    }
    if let Some(nonce) = payload.strip_prefix("!disconnect ") {
        let Target::User(user) = target else { return None };
        let valid =
            !nonce.is_empty() && nonce.len() <= 64 && nonce.bytes().all(|b| b.is_ascii_alphanumeric());
        return valid.then(|| Message::Disconnect {
            user,
            nonce: nonce.to_string(),
        });
    }
    let mut parts = payload.splitn(3, ' ');
    let id: u64 = parts.next()?.parse().ok()?;
    if id > now_ms.saturating_add(MAX_CLOCK_SKEW_MS).saturating_mul(1000) {
        return None;
    }
    let name = parts.next()?;
    let data = parts.next()?;
    if validate_event_name(name).is_err() || !is_json_object(data) {
        return None;
    }
    // Live events are not kept here; only replays from the streams use their age.
    Some(Message::Event(encode(
        EventId(id),
        target,
        name.into(),
        data,
        now_ms,
        None,
    )))
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
                    let payload = std::str::from_utf8(msg.get_payload_bytes()).unwrap_or_default();
                    match decode_message(msg.get_channel_name(), payload, now_ms()) {
                        Some(Message::Event(event)) => this.dispatch(event),
                        Some(Message::Disconnect { user, nonce }) => this.on_disconnect(&user, &nonce),
                        Some(Message::Replace { user, instance, ids }) => {
                            this.sink.replace(&user, &instance, &ids)
                        }
                        None => {
                            tracing::warn!(channel = msg.get_channel_name(), "skipped an undecodable message")
                        }
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
    /// Makes this instance listen for `user` exactly while the hub has a stream of theirs
    /// ([`Delivery::listens_for`](super::Delivery::listens_for)), and returns once that is
    /// so in Redis. Whoever holds the lock flushes every user waiting, in one `SUBSCRIBE`
    /// and one `UNSUBSCRIBE`: a reconnect storm costs a few round trips, not two per
    /// client, and a user who left and came back in between costs none. Deciding from
    /// the hub, not from the order of the calls, means a late unsubscribe can never cut
    /// off a user who has just come back.
    async fn sync_subscriptions(&self, user: &str) {
        self.to_sync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(user.into());
        let mut subscriptions = self.subscriptions.lock().await;
        let waiting = std::mem::take(&mut *self.to_sync.lock().unwrap_or_else(|e| e.into_inner()));
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for user in waiting {
            let wanted = self.sink.listens_for(&user);
            if wanted && subscriptions.users.insert(user.clone()) {
                add.push(user_channel(&user).to_string());
            } else if !wanted && subscriptions.users.remove(&user) {
                remove.push(user_channel(&user).to_string());
            }
        }
        // Without a connection, the reconnect loop subscribes every user in the set.
        let Some(pubsub) = subscriptions.pubsub.as_mut() else {
            return;
        };
        if !add.is_empty() {
            if let Err(e) = pubsub.subscribe(&add).await {
                // The reconnect loop subscribes every user in the set again.
                tracing::warn!("subscribe failed: {e}");
            }
        }
        if !remove.is_empty() {
            let _ = pubsub.unsubscribe(&remove).await;
        }
    }

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
            let (missed, _, _) = self.read_streams(&users, since, usize::MAX).await?;
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
        let now = now_ms();
        // EVALSHA built as one `Cmd`, which packs every argument into one buffer
        // (`ScriptInvocation` allocates a `Vec` per argument: eight per event).
        let bytes: usize = events
            .iter()
            .map(|e| 2 * 64 + e.data.len() + e.name.len() + 64)
            .sum();
        let mut call = redis::Cmd::with_capacity(8 + 8 * events.len(), 64 + bytes);
        call.arg("EVALSHA");
        call.arg(self.publish_script.get_hash())
            .arg(1 + 2 * events.len())
            .arg(SEQ_KEY);
        for event in &events {
            let stream = stream_of(&event.target, stream_kind(&self.retention, &event.name));
            call.arg(stream).arg(trimmed_key(stream));
        }
        call.arg(now)
            .arg(self.max_stream_len)
            .arg(self.floor.load(Ordering::Relaxed));
        for event in &events {
            let ttl_ms = self.retention.stream_retention(&event.name).as_millis() as u64;
            call.arg(channel_of(&event.target))
                .arg(&*event.name)
                .arg(&event.data)
                .arg(ttl_ms)
                .arg(event.coalesce_key.as_deref().unwrap_or(""))
                .arg(event.timestamp_ms);
        }
        let reply = match &self.replica_wait {
            Some(wait) if wait.late_until_ms.load(Ordering::Relaxed) <= now => {
                self.publish_and_wait(call, wait, now).await
            }
            _ => {
                let mut conn = self.conn.clone();
                match call.query_async(&mut conn).await {
                    Err(e) if is_noscript(&e) => {
                        // First publish since Redis restarted (or flushed its scripts).
                        load_publish_script(&mut conn).await;
                        call.query_async(&mut conn).await
                    }
                    reply => reply,
                }
            }
        };
        let ids: Vec<EventId> = reply
            .map_err(|e| {
                self.set_healthy(false);
                unavailable(e)
            })?
            .into_iter()
            .map(EventId)
            .collect();
        if let Some(last) = ids.last() {
            self.floor.fetch_max(last.0, Ordering::Relaxed);
        }
        Ok(ids)
    }

    async fn replay_page(&self, user: &str, after: Cursor, limit: usize) -> Result<Replay, BrokerError> {
        let after = after.earliest();
        let (events, gap, more) = self.read_streams(&[user.into()], after, limit).await?;
        Ok(Replay {
            events: events.into_iter().map(Arc::new).collect(),
            gap,
            more,
        })
    }

    async fn head(&self, _user: &str) -> Result<Cursor, BrokerError> {
        let mut conn = self.conn.clone();
        let head: Option<u64> = redis::cmd("GET")
            .arg(SEQ_KEY)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Cursor::One(EventId(self.head_or_empty(head, now_ms()))))
    }

    async fn delivered_through(&self, user: &str) -> Result<Option<Cursor>, BrokerError> {
        let mut conn = self.conn.clone();
        let id: Option<u64> = redis::cmd("GET")
            .arg(delivered_key(user))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(id.map(|id| Cursor::One(EventId(id))))
    }

    async fn set_delivered_through(&self, user: &str, cursor: Cursor) {
        let (id, _) = cursor.lanes();
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
        self.sync_subscriptions(user).await;
    }

    async fn unsubscribe(&self, user: &str) {
        self.sync_subscriptions(user).await;
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
        let mut conn = self.conn.clone();
        put_if_absent_cmd(key, value, ttl)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        put_cmd(key, value, ttl)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn remove(&self, key: &str) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    fn health(&self) -> BrokerHealth {
        if self.healthy.load(Ordering::Relaxed) {
            BrokerHealth::Healthy
        } else {
            BrokerHealth::Degraded
        }
    }

    async fn write_presence(&self, write: &PresenceWrite<'_>) -> Result<bool, BrokerError> {
        let call = presence::write_call(write);
        let mut conn = self.conn.clone();
        let existed: i64 = call
            .invocation(&self.presence_scripts.write)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(existed == 1 || write.full)
    }

    async fn read_presence(
        &self,
        user: Option<&str>,
        ttl: Duration,
    ) -> Result<Option<Vec<InstancePresence>>, BrokerError> {
        let call = presence::read_call(user, ttl);
        let mut conn = self.conn.clone();
        let reply: Vec<redis::Value> = call
            .invocation(&self.presence_scripts.read)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Some(presence::parse_read(reply)))
    }

    async fn leave_presence(&self, instance: &str) {
        let call = presence::leave_call(instance);
        let mut conn = self.conn.clone();
        let left: Result<i64, _> = call
            .invocation(&self.presence_scripts.leave)
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = left {
            tracing::warn!("could not leave the presence: {e}");
        }
    }

    async fn replace_elsewhere(&self, user: &str, instance: &str, ids: &[u64]) -> Result<(), BrokerError> {
        let mut conn = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(user_channel(user))
            .arg(presence::replace_message(instance, ids))
            .query_async::<usize>(&mut conn)
            .await
            .map(drop)
            .map_err(unavailable)
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

    const NOW: u64 = 1_800_000_000_000;

    fn event(channel: &str, payload: &str) -> Option<PublishedEvent> {
        match decode_message(channel, payload, NOW)? {
            Message::Event(e) => Some(e),
            Message::Disconnect { .. } | Message::Replace { .. } => None,
        }
    }

    #[test]
    fn live_messages_decode_with_their_target() {
        let e = event("sse:u:alice", r#"42 notification {"title":"a b"}"#).unwrap();
        assert_eq!(e.id, EventId(42));
        assert_eq!(e.target, Target::User("alice".into()));
        assert_eq!(&*e.name, "notification");
        assert_eq!(e.data_str(), r#"{"title":"a b"}"#);
        let b = event(BROADCAST_CHANNEL, "7 system_alert {}").unwrap();
        assert_eq!(b.target, Target::Broadcast);
        assert!(matches!(
            decode_message("sse:u:bob", "!disconnect abc123", NOW),
            Some(Message::Disconnect { user, nonce }) if &*user == "bob" && nonce == "abc123"
        ));
        assert!(matches!(
            decode_message("sse:u:bob", "!replace 0a1b 3,4", NOW),
            Some(Message::Replace { user, instance, ids })
                if &*user == "bob" && instance == "0a1b" && ids == [3, 4]
        ));
        // Replacing is per user: never on the broadcast channel.
        assert!(decode_message(BROADCAST_CHANNEL, "!replace 0a1b 3", NOW).is_none());
    }

    /// `count` entries of `name` from id `first` on, published at `at_ms`.
    fn entries(first: u64, count: u64, name: &str, at_ms: u64) -> Entries {
        (first..first + count)
            .map(|id| {
                let fields = [("n", name), ("d", "{}"), ("t", &at_ms.to_string()), ("k", "")]
                    .map(|(k, v)| (k.to_string(), v.to_string()));
                (format!("{id}-0"), fields.to_vec())
            })
            .collect()
    }

    /// A page that ends early must not skip what another stream holds: one stream with a
    /// full page of expired entries, another with more than a page's worth of live ones
    /// after them. Pages are read on until `limit` events are known complete, so every
    /// live event comes back, in order, over however many calls.
    #[tokio::test]
    async fn merged_pages_never_skip_events_of_another_stream() {
        let retention = Retention {
            default: Duration::from_secs(300),
            offline: vec![("notification".into(), Duration::from_secs(86_400))],
        };
        let user = Target::User("u".into());
        let streams = [(user.clone(), "short".to_string()), (user, "long".to_string())];
        let held = [
            entries(1, 600, "job.step", 0),
            entries(1_000, 300, "notification", NOW),
        ];
        let fetch = |asks: &[(usize, u64)]| {
            let pages: Vec<Entries> = asks
                .iter()
                .map(|&(i, from)| {
                    held[i]
                        .iter()
                        .filter(|(id, _)| id.trim_end_matches("-0").parse::<u64>().unwrap() > from)
                        .take(PAGE)
                        .cloned()
                        .collect()
                })
                .collect();
            async move { Ok(pages) }
        };
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let first_pages = fetch(&[(0, after), (1, after)]).await.unwrap();
            let read = read_merged(
                &streams,
                after,
                256,
                &retention,
                NOW,
                PublishedEvent::encode,
                first_pages,
                &fetch,
            )
            .await
            .unwrap();
            assert!(read.expired);
            got.extend(read.events.iter().map(|e| e.id.0));
            after = got.last().copied().unwrap_or(after);
            if !read.more {
                break;
            }
            assert!(
                !read.events.is_empty(),
                "more to read, but nothing to resume after"
            );
        }
        assert_eq!(got, (1_000..1_300).collect::<Vec<_>>());
    }

    /// A sink that listens for the users in `listening` and passes on what it is given.
    struct Recorder {
        listening: std::sync::Mutex<HashSet<String>>,
        got: tokio::sync::mpsc::UnboundedSender<Arc<PublishedEvent>>,
    }

    impl super::super::Delivery for Recorder {
        fn deliver(&self, event: Arc<PublishedEvent>) {
            let _ = self.got.send(event);
        }
        fn disconnect(&self, _: &str) -> usize {
            0
        }
        fn listens_for(&self, user: &str) -> bool {
            self.listening.lock().unwrap().contains(user)
        }
    }

    /// An unsubscribe that arrives after the user came back (the closing stream's task ran
    /// late) leaves them subscribed: what counts is whether the hub has a stream of theirs.
    /// Once they are gone, the channel is released.
    #[tokio::test]
    async fn a_late_unsubscribe_never_cuts_off_a_user_who_came_back() {
        let redis = sse_notify_testkit::RedisServer::start();
        let (got, mut received) = tokio::sync::mpsc::unbounded_channel();
        let sink = Arc::new(Recorder {
            listening: Default::default(),
            got,
        });
        let options = RedisOptions {
            url: redis.url(),
            ca_cert: None,
            retention: Retention {
                default: Duration::from_secs(60),
                offline: Vec::new(),
            },
            max_stream_len: 1_000,
            wait_replicas: 0,
        };
        let broker = RedisBroker::connect(options, sink.clone()).await.unwrap();
        sink.listening.lock().unwrap().insert("back".into());
        broker.subscribe("back").await;
        broker.unsubscribe("back").await;
        let envelope = || Envelope {
            target: Target::User("back".into()),
            name: "notification".into(),
            data: "{}".into(),
            timestamp_ms: 0,
            coalesce_key: None,
        };
        broker.publish(vec![envelope()]).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), received.recv()).await;
        assert!(matches!(event, Ok(Some(_))), "the user was cut off");

        sink.listening.lock().unwrap().clear();
        broker.unsubscribe("back").await;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let (_, listeners): (String, usize) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("sse:u:back")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(listeners, 0, "still subscribed after the user left");
    }

    #[test]
    fn malformed_messages_are_refused() {
        for (channel, payload) in [
            ("other", "1 x {}"),
            ("sse:u:a", "nope x {}"),
            ("sse:u:a", "1 Bad-Name {}"),
            ("sse:u:a", "1 x [1]"),
            ("sse:u:a", "1 x {not json"),
            ("sse:u:a", "1 x"),
            (
                "sse:u:a",
                &format!("{} x {{}}", (NOW + MAX_CLOCK_SKEW_MS + 1) * 1000),
            ),
            ("sse:u:a", "!disconnect "),
            ("sse:u:a", "!disconnect a b"),
            (BROADCAST_CHANNEL, "!disconnect abc"),
        ] {
            assert!(
                decode_message(channel, payload, NOW).is_none(),
                "{channel} {payload:?}"
            );
        }
    }
}
