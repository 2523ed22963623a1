//! Who is online across every instance, and each instance's figures.
//!
//! Each instance writes, once a [`TICK`], the users whose connection counts changed since
//! its last write (a full list at start and after the broker lost them) and its
//! [`Stats`], under a [`TTL`]; reads sum the live instances' parts. So a connect costs
//! nothing on the broker by itself, a user's change costs one hash field a second at most,
//! and an instance that dies drops out within the TTL with nothing to clean up. Counts
//! are at most a tick behind. On the in-process broker there are no other instances and
//! nothing is written.

use std::collections::HashMap;
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc, Mutex,
};
use std::time::Duration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::hub::{Hub, OpenConnection};
use crate::{
    api::Stats,
    server::{
        broker::{Broker, BrokerError, InstancePresence, PresenceWrite},
        clock::now_ms,
    },
};

/// How often an instance writes its part.
pub const TICK: Duration = Duration::from_secs(1);
/// How long an instance's part stands without a write: a crashed instance's connections
/// stop counting after this.
pub const TTL: Duration = Duration::from_secs(10);
/// Most users one write carries (a full list goes in several).
const MAX_PER_WRITE: usize = 5_000;
/// A full write this often (in ticks) even when nothing was lost, in case a Redis failover
/// lost some of the changes written before it.
const FULL_WRITE_EVERY: u64 = 60;
/// How long after a connect its user's limit across instances is checked: every instance
/// has written what it holds by then.
pub const LIMIT_CHECK_DELAY: Duration = Duration::from_secs(3);
/// An instance whose last write is older than this is left out of the limit's count: it
/// may have crashed, and its clients may be the ones reconnecting.
const FRESH: Duration = Duration::from_millis(2_500);
/// Most limit checks one tick runs (each a read of the broker).
const MAX_LIMIT_CHECKS: usize = 1_000;
/// Most ids one replace message names (the broker's parser takes at most 64).
const MAX_REPLACED_PER_MESSAGE: usize = 64;

/// A user's connections on every instance (`GET /api/presence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    pub user_id: String,
    /// At least one stream open anywhere.
    pub online: bool,
    /// Streams open, summed over the instances.
    pub connections: u64,
    /// The instances holding any, with how many each.
    pub instances: Vec<InstanceConnections>,
}

/// One instance's share of a user's connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct InstanceConnections {
    pub instance: String,
    pub connections: u64,
}

/// One instance's figures: its [`Stats`] and the connections it refused, by reason (the
/// reasons of `sse_connections_refused_total`; counted per process).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct InstanceFigures {
    #[serde(flatten)]
    pub stats: Stats,
    #[serde(default)]
    pub refused: BTreeMap<String, u64>,
}

/// Every live instance's figures and their sums (in `GET /api/stats` as `cluster`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ClusterStats {
    /// Streams open on all instances.
    pub clients: usize,
    /// Events published through all instances.
    pub events_published: u64,
    /// Events delivered by all instances.
    pub events_delivered: u64,
    /// Slow clients cut by all instances.
    pub slow_client_disconnects: u64,
    /// Connections refused by all instances, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Each live instance, this one included.
    pub instances: Vec<InstanceStats>,
}

/// One instance's figures, as it last wrote them (at most a tick old).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct InstanceStats {
    pub instance: String,
    pub stats: InstanceFigures,
}

/// `GET /api/stats`: this instance's figures, its id, and every instance's.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StatsReport {
    #[serde(flatten)]
    pub stats: InstanceFigures,
    /// This instance's id (random, new at each start).
    pub instance: String,
    pub cluster: ClusterStats,
}

impl ClusterStats {
    /// The sums over `instances`.
    pub fn of(instances: Vec<InstanceStats>) -> Self {
        let mut refused = BTreeMap::new();
        for (reason, n) in instances.iter().flat_map(|i| &i.stats.refused) {
            *refused.entry(reason.clone()).or_default() += n;
        }
        let sum = |f: fn(&Stats) -> u64| instances.iter().map(|i| f(&i.stats.stats)).sum();
        Self {
            clients: instances.iter().map(|i| i.stats.stats.clients).sum(),
            events_published: sum(|s| s.events_published),
            events_delivered: sum(|s| s.events_delivered),
            slow_client_disconnects: sum(|s| s.slow_client_disconnects),
            refused,
            instances,
        }
    }
}

/// This instance's side of the presence: its id, whether its next write must be whole,
/// the other instances' figures as last read, and the users whose limit is to be checked.
pub(crate) struct PresenceBook {
    pub instance: String,
    full_write_due: AtomicBool,
    /// Ticks since the last full write: one every [`FULL_WRITE_EVERY`] repairs what a
    /// Redis failover may have lost of the deltas.
    ticks_since_full: AtomicU64,
    /// Every live instance's part as read after this instance's last write; `None` until
    /// the first read, after [`TTL`] without one, and always on the in-process broker.
    seen: Mutex<Option<Vec<InstancePresence>>>,
    /// Consecutive failed ticks.
    failures: AtomicU64,
    /// Users who opened a stream here, and when their limit check is due (ms).
    limit_checks: Mutex<HashMap<Arc<str>, u64>>,
}

impl PresenceBook {
    pub fn new(instance: String) -> Self {
        Self {
            instance,
            full_write_due: AtomicBool::new(true),
            ticks_since_full: AtomicU64::new(0),
            seen: Mutex::new(None),
            failures: AtomicU64::new(0),
            limit_checks: Mutex::default(),
        }
    }

    /// Writes this instance's part and reads everyone's. When a write of changes fails,
    /// those users are noted again for the next one; when a full write fails, the next is
    /// full again. After [`TTL`] of failures the others count as gone.
    pub async fn tick(
        &self,
        hub: &Hub,
        broker: &dyn Broker,
        own: &InstanceFigures,
    ) -> Result<(), BrokerError> {
        let outcome = self.write_and_read(hub, broker, own).await;
        if outcome.is_err() {
            let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures * TICK.as_millis() as u64 >= TTL.as_millis() as u64 {
                *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        } else {
            self.failures.store(0, Ordering::Relaxed);
        }
        outcome
    }

    async fn write_and_read(
        &self,
        hub: &Hub,
        broker: &dyn Broker,
        own: &InstanceFigures,
    ) -> Result<(), BrokerError> {
        let figures = serde_json::to_string(own).expect("stats serialize");
        let periodic = self.ticks_since_full.fetch_add(1, Ordering::Relaxed) + 1 >= FULL_WRITE_EVERY;
        let full = self.full_write_due.swap(false, Ordering::Relaxed) || periodic;
        if full {
            self.ticks_since_full.store(0, Ordering::Relaxed);
        }
        let users = if full {
            hub.presence_snapshot()
        } else {
            hub.presence_changes(MAX_PER_WRITE)
        };
        let written = self.write(broker, &figures, &users, full).await;
        match written {
            Err(e) if full => {
                self.full_write_due.store(true, Ordering::Relaxed);
                return Err(e);
            }
            Err(e) => {
                hub.note_presence_changes(users.into_iter().map(|(user, _)| user));
                return Err(e);
            }
            // What it wrote before expired (the broker was away longer than the TTL).
            Ok(false) => self.full_write_due.store(true, Ordering::Relaxed),
            Ok(true) => {}
        }
        let seen = broker.read_presence(None, TTL).await?;
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        Ok(())
    }

    /// Writes `users` in chunks of [`MAX_PER_WRITE`]; `Ok(false)` as the broker's write.
    async fn write(
        &self,
        broker: &dyn Broker,
        figures: &str,
        users: &[(Arc<str>, Vec<OpenConnection>)],
        full: bool,
    ) -> Result<bool, BrokerError> {
        let mut chunks = users.chunks(MAX_PER_WRITE);
        let mut write = PresenceWrite {
            instance: &self.instance,
            figures,
            users: chunks.next().unwrap_or_default(),
            full,
            ttl: TTL,
        };
        let kept = broker.write_presence(&write).await?;
        for chunk in chunks {
            write.users = chunk;
            write.full = false;
            broker.write_presence(&write).await?;
        }
        Ok(kept)
    }

    /// Notes that `user` opened a stream here: the limit across instances is checked for
    /// them [`LIMIT_CHECK_DELAY`] later, once every instance has written what it holds
    /// then (a tab that moved here from another instance is gone there by then). Nothing
    /// while no other instance is live.
    pub fn user_connected(&self, user: &Arc<str>) {
        if !self.others_seen() {
            return;
        }
        let due = now_ms() + LIMIT_CHECK_DELAY.as_millis() as u64;
        let mut checks = self.limit_checks.lock().unwrap_or_else(|e| e.into_inner());
        checks.entry(user.clone()).or_insert(due);
    }

    /// Runs the limit checks that are due, at most [`MAX_LIMIT_CHECKS`] (the rest wait for
    /// the next tick); returns how many connections were closed.
    pub async fn run_limit_checks(
        &self,
        hub: &Hub,
        broker: &dyn Broker,
        max: usize,
    ) -> Result<usize, BrokerError> {
        let now = now_ms();
        let due: Vec<Arc<str>> = {
            let mut checks = self.limit_checks.lock().unwrap_or_else(|e| e.into_inner());
            let due: Vec<Arc<str>> = checks
                .iter()
                .filter(|(_, at)| **at <= now)
                .take(MAX_LIMIT_CHECKS)
                .map(|(user, _)| user.clone())
                .collect();
            due.iter().for_each(|user| {
                checks.remove(user);
            });
            due
        };
        let mut closed = 0;
        for user in due {
            if hub.client_count_for_user(&user) > 0 {
                closed += self.hold_to_limit(hub, broker, &user, max).await?;
            }
        }
        Ok(closed)
    }

    /// This instance's figures with every live instance's.
    pub fn report(&self, own: InstanceFigures) -> StatsReport {
        StatsReport {
            cluster: self.cluster_stats(own.clone()),
            instance: self.instance.clone(),
            stats: own,
        }
    }

    /// Every live instance's figures, this one's current; just this one's before the first
    /// read or on the in-process broker.
    pub fn cluster_stats(&self, own: InstanceFigures) -> ClusterStats {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut instances: Vec<InstanceStats> = seen
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.instance != self.instance)
            .filter_map(|i| {
                Some(InstanceStats {
                    stats: serde_json::from_str(&i.figures).ok()?,
                    instance: i.instance,
                })
            })
            .collect();
        instances.push(InstanceStats {
            instance: self.instance.clone(),
            stats: own,
        });
        instances.sort_by(|a, b| a.instance.cmp(&b.instance));
        ClusterStats::of(instances)
    }

    /// `user`'s connections on every instance: the others' as they last wrote them, this
    /// one's now.
    pub async fn presence(
        &self,
        hub: &Hub,
        broker: &dyn Broker,
        user: &str,
    ) -> Result<Presence, BrokerError> {
        let mut instances: Vec<InstanceConnections> = self
            .elsewhere(broker, user)
            .await?
            .into_iter()
            .map(|i| InstanceConnections {
                instance: i.instance,
                connections: i.connections.len() as u64,
            })
            .collect();
        let here = hub.client_count_for_user(user) as u64;
        if here > 0 {
            instances.push(InstanceConnections {
                instance: self.instance.clone(),
                connections: here,
            });
        }
        instances.sort_by(|a, b| a.instance.cmp(&b.instance));
        let connections = instances.iter().map(|i| i.connections).sum();
        Ok(Presence {
            user_id: user.to_string(),
            online: connections > 0,
            connections,
            instances,
        })
    }

    /// Holds `user` to `max` connections on all instances together: past it, the oldest
    /// are closed wherever they are ([`CloseReason::Replaced`](super::mailbox::CloseReason),
    /// as the local limit does). Returns how many were asked to close. Skipped (no broker
    /// call) while no other instance has been seen.
    pub async fn hold_to_limit(
        &self,
        hub: &Hub,
        broker: &dyn Broker,
        user: &str,
        max: usize,
    ) -> Result<usize, BrokerError> {
        let elsewhere: Vec<InstancePresence> = self
            .elsewhere(broker, user)
            .await?
            .into_iter()
            .filter(|i| i.age_ms <= FRESH.as_millis() as u64)
            .collect();
        let mut all: Vec<(OpenConnection, &str)> = hub
            .open_connections(user)
            .into_iter()
            .map(|c| (c, self.instance.as_str()))
            .chain(
                elsewhere
                    .iter()
                    .flat_map(|i| i.connections.iter().map(|c| (*c, i.instance.as_str()))),
            )
            .collect();
        if all.len() <= max {
            return Ok(0);
        }
        // Oldest first, ties by instance then id: every instance that checks picks the same.
        all.sort_by(|(a, ai), (b, bi)| (a.opened_ms, *ai, a.id).cmp(&(b.opened_ms, *bi, b.id)));
        let excess = all.len() - max;
        let mut by_instance: Vec<(&str, Vec<u64>)> = Vec::new();
        for (conn, instance) in &all[..excess] {
            match by_instance.iter_mut().find(|(i, _)| i == instance) {
                Some((_, ids)) => ids.push(conn.id),
                None => by_instance.push((instance, vec![conn.id])),
            }
        }
        for (instance, ids) in by_instance {
            if instance == self.instance {
                hub.replace_connections(user, &ids);
            } else {
                for ids in ids.chunks(MAX_REPLACED_PER_MESSAGE) {
                    broker.replace_elsewhere(user, instance, ids).await?;
                }
            }
        }
        Ok(excess)
    }

    /// Whether the last read saw any instance but this one.
    pub fn others_seen(&self) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.as_ref()
            .is_some_and(|all| all.iter().any(|i| i.instance != self.instance))
    }

    /// The other live instances holding connections of `user`, as they last wrote them.
    async fn elsewhere(&self, broker: &dyn Broker, user: &str) -> Result<Vec<InstancePresence>, BrokerError> {
        Ok(broker
            .read_presence(Some(user), TTL)
            .await?
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i.instance != self.instance && !i.connections.is_empty())
            .collect())
    }
}

/// A fresh instance id: 12 hex digits, random, so two instances never share one (a
/// restarted instance is a new one; its old part expires).
pub(crate) fn new_instance_id() -> String {
    use rand::Rng;
    format!("{:012x}", rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff)
}
