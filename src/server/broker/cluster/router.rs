//! A small Redis Cluster client: slot routing for commands and sharded pub/sub, built on
//! plain [`MultiplexedConnection`]s (one per primary) instead of redis-rs's own cluster
//! client, which was measured to wedge for 40+ s when a primary dies and never renews
//! sharded subscriptions.
//!
//! - [`key_slot`]: the hash slot of a key (CRC16/XMODEM mod 16384, with hash tags).
//! - [`ClusterRouter`]: runs a command on the primary that owns a key's slot, following
//!   `MOVED`/`ASK`, and refreshing the slot table (`CLUSTER SLOTS`) and retrying with a
//!   bounded backoff on `TRYAGAIN`, `CLUSTERDOWN`, connection errors and timeouts.
//!
//! The sharded pub/sub built on it is in [`subscriber`](super::subscriber).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use crate::backoff::backoff_delay;
use rand::seq::SliceRandom;
use redis::{
    aio::MultiplexedConnection, AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo,
    ErrorKind, FromRedisValue, IntoConnectionInfo, ProtocolVersion, PushInfo, RedisError, Script,
    ServerErrorKind, Value,
};
use tokio::sync::OnceCell;
use tracing::{debug, warn};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Marks a slot that no primary serves in the table.
const UNASSIGNED: u16 = u16::MAX;

/// Redirections followed for one command before backing off (slots moving back and forth).
const MAX_REDIRECTS: u32 = 5;

// ---------------------------------------------------------------------------------------
// Hash slots
// ---------------------------------------------------------------------------------------

/// CRC16/XMODEM lookup table (polynomial 0x1021), the checksum Redis Cluster uses.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ CRC16_TABLE[(((crc >> 8) as u8) ^ b) as usize]
    })
}

/// The hash slot of `key`, as `CLUSTER KEYSLOT` computes it: only the part between the
/// first `{` and the next `}` is hashed when that part is non-empty (a hash tag), so that
/// keys like `{user1000}.following` and `{user1000}.followers` share a slot.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

// ---------------------------------------------------------------------------------------
// Errors and options
// ---------------------------------------------------------------------------------------

/// What the router reports when a command could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A seed URL that redis-rs cannot parse, or no seed at all.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No node could be reached (or kept failing) within the retry budget.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The cluster answered but could not serve the slot within the retry budget
    /// (`CLUSTERDOWN`, `TRYAGAIN`, no primary for the slot).
    #[error("cluster down: {0}")]
    ClusterDown(String),
    /// An error that retrying does not fix (wrong type, `NOSCRIPT`, bad arguments, ...).
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// Timeouts and retry budget of a [`ClusterRouter`].
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// Time to open a connection to a node (TCP and handshake).
    pub connection_timeout: Duration,
    /// Time to wait for any reply; a dead node shows as a timeout, not a hang.
    pub response_timeout: Duration,
    /// Total time one command (or one `subscribe`) keeps retrying before it fails. A
    /// failover with `cluster-node-timeout 2000` takes about 4 s.
    pub retry_budget: Duration,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_secs(6),
        }
    }
}

/// What to do about a failed attempt.
pub(super) enum Action {
    Moved(String),
    Ask(String),
    /// Retry after a backoff and a topology refresh; `reconnect` drops the connection.
    Retry {
        reconnect: bool,
    },
    Fail,
}

pub(super) fn classify(err: &RedisError) -> Action {
    match err.kind() {
        ErrorKind::Server(ServerErrorKind::Moved) => match err.redirect_node() {
            Some((addr, _)) if !addr.starts_with(':') => Action::Moved(addr.to_string()),
            _ => Action::Retry { reconnect: false },
        },
        ErrorKind::Server(ServerErrorKind::Ask) => match err.redirect_node() {
            Some((addr, _)) if !addr.starts_with(':') => Action::Ask(addr.to_string()),
            _ => Action::Retry { reconnect: false },
        },
        // READONLY: the node we think is a primary was demoted.
        ErrorKind::Server(
            ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly,
        ) => Action::Retry { reconnect: false },
        ErrorKind::Io | ErrorKind::Parse | ErrorKind::ClusterConnectionNotFound => {
            Action::Retry { reconnect: true }
        }
        _ => Action::Fail,
    }
}

fn is_cluster_state_error(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::TryAgain | ServerErrorKind::ClusterDown | ServerErrorKind::MasterDown
        )
    )
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
}

/// Waits between retries, by the crate's one formula ([`backoff_delay`]): 50-100 ms first,
/// doubling up to 250-500 ms, each at a random point in its upper half, so instances that
/// lost the same node do not retry in step.
#[derive(Default)]
pub(super) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(super) fn next(&mut self) -> Duration {
        let ms = backoff_delay(100, 500, self.attempt, rand::random::<f64>());
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(ms)
    }
}

// ---------------------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------------------

/// The slot table read from `CLUSTER SLOTS`. Addresses are `host:port`.
#[derive(Debug, Default)]
struct Topology {
    /// Slot -> index into `primaries`, or [`UNASSIGNED`].
    slots: Vec<u16>,
    primaries: Vec<String>,
    /// How many replicas each of `primaries` has.
    replica_counts: Vec<usize>,
    replicas: Vec<String>,
}

impl Topology {
    fn owner(&self, slot: u16) -> Option<&str> {
        let index = *self.slots.get(slot as usize)?;
        self.primaries.get(index as usize).map(String::as_str)
    }

    fn replicas_of(&self, slot: u16) -> usize {
        let index = self.slots.get(slot as usize).copied().unwrap_or(UNASSIGNED);
        self.replica_counts.get(index as usize).copied().unwrap_or(0)
    }
}

pub(super) fn value_to_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn value_to_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        other => value_to_string(other)?.parse().ok(),
    }
}

/// Parses a `CLUSTER SLOTS` reply. A node announced with an empty or `?` host is reached
/// at the host we asked (`asked_host`), as redis-cli does.
fn parse_cluster_slots(reply: &Value, asked_host: &str) -> Option<Topology> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut topology = Topology {
        slots: vec![UNASSIGNED; SLOTS as usize],
        ..Topology::default()
    };
    let node_addr = |node: &Value| -> Option<String> {
        let Value::Array(fields) = node else {
            return None;
        };
        let host = value_to_string(fields.first()?)?;
        let port = value_to_int(fields.get(1)?)?;
        let host = if host.is_empty() || host == "?" {
            asked_host.to_string()
        } else {
            host
        };
        Some(format!("{host}:{port}"))
    };
    for range in ranges {
        let Value::Array(items) = range else {
            return None;
        };
        let start = value_to_int(items.first()?)?;
        let end = value_to_int(items.get(1)?)?;
        if !(0..SLOTS as i64).contains(&start) || !(start..SLOTS as i64).contains(&end) {
            return None;
        }
        let primary = node_addr(items.get(2)?)?;
        let index = match topology.primaries.iter().position(|p| *p == primary) {
            Some(i) => i,
            None => {
                topology.primaries.push(primary);
                topology.replica_counts.push(0);
                topology.primaries.len() - 1
            }
        };
        let replicas = items.iter().skip(3).filter_map(node_addr).count();
        topology.replica_counts[index] = topology.replica_counts[index].max(replicas);
        for slot in start..=end {
            topology.slots[slot as usize] = index as u16;
        }
        for replica in items.iter().skip(3).filter_map(node_addr) {
            if !topology.replicas.contains(&replica) {
                topology.replicas.push(replica);
            }
        }
    }
    Some(topology)
}

fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

// ---------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------

/// Routes commands to the primary that owns their key's slot. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct ClusterRouter {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    /// The first seed's connection info: scheme, TLS settings and credentials are kept for
    /// every node; only the address changes.
    template: ConnectionInfo,
    /// Seed addresses (`host:port`), the last resort of a refresh.
    seeds: Vec<String>,
    options: RouterOptions,
    topology: RwLock<Arc<Topology>>,
    /// One lazily opened connection per node; an empty cell is (re)connected on use.
    conns: Mutex<HashMap<String, Arc<OnceCell<MultiplexedConnection>>>>,
    /// Serialises refreshes; `refresh_generation` lets waiters skip a redundant one.
    refresh_lock: tokio::sync::Mutex<()>,
    refresh_generation: AtomicU64,
}

impl ClusterRouter {
    /// A connection of its own to `addr` (RESP3, with `push` for the sharded subscriber's
    /// messages), with the router's TLS and timeouts.
    pub(super) async fn open_connection(
        &self,
        addr: &str,
        push: Option<Box<dyn Fn(PushInfo) + Send + Sync>>,
    ) -> Result<MultiplexedConnection, RedisError> {
        self.inner.open(addr, push).await
    }
}

impl ClusterRouter {
    /// Connects through the first seed that answers `CLUSTER SLOTS`. Seeds are
    /// `redis://[user:password@]host:port` (or `rediss://`) URLs; all nodes are reached
    /// with the scheme and credentials of the first seed. Node connections open lazily.
    pub async fn connect(seeds: &[String], options: RouterOptions) -> Result<Self, RouterError> {
        let mut infos = Vec::new();
        for seed in seeds {
            let info = seed
                .as_str()
                .into_connection_info()
                .map_err(|e| RouterError::Config(format!("seed {seed}: {e}")))?;
            infos.push(info);
        }
        let template = infos
            .first()
            .cloned()
            .ok_or_else(|| RouterError::Config("no seed URL".into()))?;
        let seeds = infos
            .iter()
            .map(|info| match info.addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    Ok(format!("{host}:{port}"))
                }
                other => Err(RouterError::Config(format!(
                    "seed {other:?} is not a TCP address"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let router = Self {
            inner: Arc::new(RouterInner {
                template,
                seeds,
                options,
                topology: RwLock::new(Arc::new(Topology::default())),
                conns: Mutex::new(HashMap::new()),
                refresh_lock: tokio::sync::Mutex::new(()),
                refresh_generation: AtomicU64::new(0),
            }),
        };
        router.refresh().await?;
        Ok(router)
    }

    /// The router's options.
    pub fn options(&self) -> &RouterOptions {
        &self.inner.options
    }

    /// The primaries of the current slot table (`host:port`), for tests and diagnostics.
    pub fn primaries(&self) -> Vec<String> {
        self.topology().primaries.clone()
    }

    /// The primary that owns `slot` in the current table, if any.
    pub fn owner_of(&self, slot: u16) -> Option<String> {
        self.topology().owner(slot).map(str::to_string)
    }

    /// How many replicas the primary that owns `slot` has, in the current table.
    pub fn replicas_of(&self, slot: u16) -> usize {
        self.topology().replicas_of(slot)
    }

    fn topology(&self) -> Arc<Topology> {
        self.inner
            .topology
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `cmd` on the primary that owns `slot_key`'s slot and converts the reply.
    /// Follows `MOVED` and `ASK`; on `TRYAGAIN`, `CLUSTERDOWN`, connection errors and
    /// timeouts it refreshes the slot table and retries with a backoff until
    /// [`RouterOptions::retry_budget`] is spent.
    pub async fn query<T: FromRedisValue>(
        &self,
        slot_key: impl AsRef<[u8]>,
        cmd: &Cmd,
    ) -> Result<T, RouterError> {
        let (_, value) = self.route(key_slot(slot_key.as_ref()), cmd).await?;
        T::from_redis_value(value).map_err(|e| RouterError::Redis(e.into()))
    }

    /// Like [`query`](Self::query) for an `EVALSHA` built by hand (with
    /// `script.get_hash()`): on `NOSCRIPT` it loads `script` on the slot's primary (a
    /// promoted replica or a restarted node has an empty script cache) and runs it again.
    pub async fn eval_script<T: FromRedisValue>(
        &self,
        slot_key: impl AsRef<[u8]>,
        script: &Script,
        evalsha: &Cmd,
    ) -> Result<T, RouterError> {
        let (_, value) = self
            .eval_on_owner(key_slot(slot_key.as_ref()), script, evalsha)
            .await?;
        T::from_redis_value(value).map_err(|e| RouterError::Redis(e.into()))
    }

    /// Like [`eval_script`](Self::eval_script), then `WAIT 1 <timeout>` on the connection
    /// the script ran on: returns the reply and how many replicas confirmed the script's
    /// writes. The `WAIT` is not retried (on another connection it would confirm nothing):
    /// if it fails, so does the call, and the caller runs its script again, which must
    /// therefore recognise a batch it already ran.
    pub async fn eval_script_and_wait<T: FromRedisValue>(
        &self,
        slot_key: impl AsRef<[u8]>,
        script: &Script,
        evalsha: &Cmd,
        timeout: Duration,
    ) -> Result<(T, usize), RouterError> {
        let (addr, value) = self
            .eval_on_owner(key_slot(slot_key.as_ref()), script, evalsha)
            .await?;
        let reply = T::from_redis_value(value).map_err(|e| RouterError::Redis(e.into()))?;
        let mut wait = redis::cmd("WAIT");
        wait.arg(1).arg(timeout.as_millis() as u64);
        match self.inner.run(&addr, &wait).await {
            Ok(confirmed) => Ok((reply, usize::from_redis_value(confirmed).unwrap_or(0))),
            Err(e) => {
                if matches!(classify(&e), Action::Retry { reconnect: true }) {
                    self.inner.forget(&addr);
                }
                Err(RouterError::Unavailable(format!("WAIT on {addr}: {e}")))
            }
        }
    }

    /// Runs an `EVALSHA` on the slot's primary, loading the script on `NOSCRIPT`; returns
    /// the node it ran on and its reply.
    async fn eval_on_owner(
        &self,
        slot: u16,
        script: &Script,
        evalsha: &Cmd,
    ) -> Result<(String, Value), RouterError> {
        let value = match self.route(slot, evalsha).await {
            Err(RouterError::Redis(e)) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let addr = self
                    .owner_of(slot)
                    .ok_or_else(|| RouterError::ClusterDown(format!("slot {slot} unassigned")))?;
                debug!(%addr, "loading script after NOSCRIPT");
                let mut conn = self.inner.connection(&addr).await?;
                script.load_async(&mut conn).await?;
                self.route(slot, evalsha).await?
            }
            other => other?,
        };
        Ok(value)
    }

    /// Runs `cmd` on the slot's primary, with redirections and retries (see
    /// [`query`](Self::query)); returns the node it ran on and its reply.
    async fn route(&self, slot: u16, cmd: &Cmd) -> Result<(String, Value), RouterError> {
        let started = Instant::now();
        let budget = self.inner.options.retry_budget;
        let mut retries = Backoff::default();
        let mut backoff = retries.next();
        let mut redirects = 0;
        let mut ask: Option<String> = None;
        loop {
            let (addr, result) = match ask.take() {
                Some(addr) => {
                    let result = self.inner.run_asking(&addr, cmd).await;
                    (addr, result)
                }
                None => match self.owner_of(slot) {
                    Some(addr) => {
                        let result = self.inner.run(&addr, cmd).await;
                        (addr, result)
                    }
                    None => (
                        String::new(),
                        Err(RedisError::from((
                            ErrorKind::Server(ServerErrorKind::ClusterDown),
                            "no primary for slot",
                        ))),
                    ),
                },
            };
            let err = match result {
                Ok(value) => return Ok((addr, value)),
                Err(err) => err,
            };
            let action = match classify(&err) {
                Action::Moved(_) | Action::Ask(_) if redirects >= MAX_REDIRECTS => {
                    Action::Retry { reconnect: false }
                }
                action => action,
            };
            match action {
                Action::Fail => return Err(RouterError::Redis(err)),
                Action::Moved(to) => {
                    redirects += 1;
                    debug!(slot, from = %addr, %to, "MOVED");
                    let _ = self.refresh().await;
                    if self.owner_of(slot).as_deref() != Some(to.as_str()) {
                        // The node we asked is behind the one that redirected us.
                        self.inner.set_owner(slot, &to);
                    }
                }
                Action::Ask(to) => {
                    redirects += 1;
                    debug!(slot, from = %addr, %to, "ASK");
                    ask = Some(to);
                }
                Action::Retry { reconnect } => {
                    if reconnect && !addr.is_empty() {
                        self.inner.forget(&addr);
                    }
                    if started.elapsed() + backoff > budget {
                        warn!(slot, %addr, error = %err, "giving up after retries");
                        let message = format!("slot {slot} via {addr}: {err}");
                        return Err(if is_cluster_state_error(&err) {
                            RouterError::ClusterDown(message)
                        } else {
                            RouterError::Unavailable(message)
                        });
                    }
                    debug!(slot, %addr, error = %err, ?backoff, "retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = retries.next();
                    redirects = 0;
                    let _ = self.refresh().await;
                }
            }
        }
    }

    /// Re-reads the slot table from a known node (primaries and replicas, live connections
    /// first), then the seeds, and drops connections to nodes that are no longer
    /// primaries. Concurrent calls coalesce: a caller that waited for a running refresh
    /// returns with its result.
    pub async fn refresh(&self) -> Result<(), RouterError> {
        let inner = &self.inner;
        let generation = inner.refresh_generation.load(Ordering::Acquire);
        let _guard = inner.refresh_lock.lock().await;
        if inner.refresh_generation.load(Ordering::Acquire) != generation {
            return Ok(());
        }
        let current = self.topology();
        let mut candidates: Vec<String> = current
            .primaries
            .iter()
            .chain(&current.replicas)
            .cloned()
            .collect();
        candidates.shuffle(&mut rand::thread_rng());
        // Nodes we hold a working connection to are the likeliest to answer.
        let connected: HashSet<String> = {
            let conns = inner.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns
                .iter()
                .filter(|(_, cell)| cell.initialized())
                .map(|(addr, _)| addr.clone())
                .collect()
        };
        candidates.sort_by_key(|addr| !connected.contains(addr));
        for seed in &inner.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut last_error = String::from("no node to ask");
        for addr in candidates {
            let cmd = redis::cmd("CLUSTER").arg("SLOTS").clone();
            match inner.run(&addr, &cmd).await {
                Ok(reply) => {
                    let host = split_addr(&addr).map(|(h, _)| h).unwrap_or_default();
                    let Some(topology) = parse_cluster_slots(&reply, &host) else {
                        last_error = format!("{addr}: unexpected CLUSTER SLOTS reply");
                        continue;
                    };
                    debug!(%addr, primaries = ?topology.primaries, "slot table refreshed");
                    let primaries: HashSet<String> = topology.primaries.iter().cloned().collect();
                    *inner.topology.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(topology);
                    inner
                        .conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|addr, _| primaries.contains(addr));
                    inner.refresh_generation.fetch_add(1, Ordering::AcqRel);
                    return Ok(());
                }
                Err(err) => {
                    if classify(&err).reconnects() {
                        inner.forget(&addr);
                    }
                    last_error = format!("{addr}: {err}");
                }
            }
        }
        warn!(error = %last_error, "no node answered CLUSTER SLOTS");
        Err(RouterError::Unavailable(format!(
            "no node answered CLUSTER SLOTS (last: {last_error})"
        )))
    }
}

impl Action {
    fn reconnects(&self) -> bool {
        matches!(self, Action::Retry { reconnect: true })
    }
}

impl RouterInner {
    /// Connection info for `addr` with the template's scheme, TLS settings and
    /// credentials; RESP3 when `resp3` (needed for push messages).
    fn node_info(&self, addr: &str, resp3: bool) -> Result<ConnectionInfo, RedisError> {
        let (host, port) = split_addr(addr)
            .ok_or_else(|| RedisError::from((ErrorKind::InvalidClientConfig, "bad node address")))?;
        let mut node_addr = self.template.addr().clone();
        match &mut node_addr {
            ConnectionAddr::TcpTls { host: h, port: p, .. } => {
                *h = host;
                *p = port;
            }
            other => *other = ConnectionAddr::Tcp(host, port),
        }
        let mut redis = self.template.redis_settings().clone();
        if resp3 {
            redis = redis.set_protocol(ProtocolVersion::RESP3);
        }
        Ok(self
            .template
            .clone()
            .set_addr(node_addr)
            .set_redis_settings(redis))
    }

    /// Opens a new connection to `addr`; with a push sender it is a RESP3 connection.
    async fn open(
        &self,
        addr: &str,
        push: Option<Box<dyn Fn(PushInfo) + Send + Sync>>,
    ) -> Result<MultiplexedConnection, RedisError> {
        let client = Client::open(self.node_info(addr, push.is_some())?)?;
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.options.connection_timeout))
            .set_response_timeout(Some(self.options.response_timeout));
        if let Some(push) = push {
            config = config.set_push_sender(move |info| {
                push(info);
                Ok::<(), ()>(())
            });
        }
        let connect = client.get_multiplexed_async_connection_with_config(&config);
        // The connection timeout covers TCP; this also bounds the handshake.
        let limit = self.options.connection_timeout + self.options.response_timeout;
        tokio::time::timeout(limit, connect)
            .await
            .map_err(|_| timeout_error())?
    }

    /// The shared connection to `addr`, opened on first use.
    async fn connection(&self, addr: &str) -> Result<MultiplexedConnection, RedisError> {
        let cell = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr.to_string())
            .or_default()
            .clone();
        let conn = cell.get_or_try_init(|| self.open(addr, None)).await?;
        Ok(conn.clone())
    }

    /// Drops the cached connection to `addr` (it is reopened on next use).
    fn forget(&self, addr: &str) {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
    }

    async fn run(&self, addr: &str, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut conn = self.connection(addr).await?;
        cmd.query_async(&mut conn).await
    }

    /// `ASKING` and `cmd` in one pipeline, so that they arrive in order on one connection.
    async fn run_asking(&self, addr: &str, cmd: &Cmd) -> Result<Value, RedisError> {
        let mut conn = self.connection(addr).await?;
        let mut pipe = redis::pipe();
        pipe.cmd("ASKING").ignore().add_command(cmd.clone());
        let mut values: Vec<Value> = pipe.query_async(&mut conn).await?;
        Ok(values.pop().unwrap_or(Value::Nil))
    }

    /// Points `slot` at `addr` (after a `MOVED` the node we refreshed from did not know).
    fn set_owner(&self, slot: u16, addr: &str) {
        let mut guard = self.topology.write().unwrap_or_else(|e| e.into_inner());
        let mut topology = Topology {
            slots: guard.slots.clone(),
            primaries: guard.primaries.clone(),
            replica_counts: guard.replica_counts.clone(),
            replicas: guard.replicas.clone(),
        };
        if topology.slots.len() != SLOTS as usize {
            topology.slots = vec![UNASSIGNED; SLOTS as usize];
        }
        let index = match topology.primaries.iter().position(|p| p == addr) {
            Some(i) => i,
            None => {
                topology.primaries.push(addr.to_string());
                topology.replica_counts.push(0);
                topology.primaries.len() - 1
            }
        };
        topology.slots[slot as usize] = index as u16;
        *guard = Arc::new(topology);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_slots() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // Empty tag: the whole key is hashed; only the first tag counts.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b""), 0);
    }

    #[test]
    fn parses_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("10.0.0.1", 7000),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node("?", 7002)]),
        ]);
        let topology = parse_cluster_slots(&reply, "seed").expect("parsed");
        assert_eq!(topology.owner(0), Some("10.0.0.1:7000"));
        assert_eq!(topology.owner(8191), Some("10.0.0.1:7000"));
        assert_eq!(topology.owner(16383), Some("seed:7002"));
        assert_eq!(topology.replicas, vec!["10.0.0.2:7001".to_string()]);
    }
}
