//! `sse-bench soak` (behind `make soak`): two instances on a real `redis-server` hold
//! thousands of connections while targeted events flow, and faults are injected one after
//! another: an instance killed and restarted, Redis killed and restarted, the pub/sub
//! connections cut, a reconnect storm, slow readers whose queues overflow. At the end every
//! accepted event must have reached its user exactly once, and nobody else.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sse_notify_testkit::{RedisServer, TempDir};

use crate::{
    cli::Dialect,
    processes::{now_us, Cluster, Pool},
    publish::{targeted_batch, Pacer, Publisher},
    report::Report,
};

/// Options of the soak run.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the run lasts, in seconds (faults are spread over it).
    #[arg(long, default_value_t = 300)]
    pub secs: u64,
    /// Connections held (one user each), over both instances.
    #[arg(long, default_value_t = 5_000)]
    pub connections: usize,
    /// Targeted events per second, published through both instances.
    #[arg(long, default_value_t = 400)]
    pub rate: u64,
    /// The server binary (build it with `cargo leptos build --release`).
    #[arg(long, default_value = "target/release/sse-notify")]
    pub server_bin: String,
    /// Where to write the figures as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    CrashInstance(usize),
    RestartRedis,
    CutPubSub,
    ReconnectStorm,
    SlowReaders,
}

impl Fault {
    fn describe(self) -> String {
        match self {
            Fault::CrashInstance(i) => format!("instance {i} killed (SIGKILL) and restarted"),
            Fault::RestartRedis => "Redis killed and restarted (2 s outage)".into(),
            Fault::CutPubSub => "every pub/sub connection cut (CLIENT KILL TYPE pubsub)".into(),
            Fault::ReconnectStorm => "every client dropped and reconnected at once".into(),
            Fault::SlowReaders => "a tenth of the clients stop reading for 10 s under a burst".into(),
        }
    }
}

/// What the publisher got back over the whole run.
#[derive(Default)]
struct Published {
    accepted: HashMap<u32, u32>,
    refused: usize,
    /// Sent on a connection that broke before the answer: maybe published, maybe not.
    unknown: usize,
}

/// The soak run; exits non-zero on any loss, duplicate or misdelivery.
pub async fn soak(args: SoakArgs) -> ExitCode {
    let started = Instant::now();
    // Redis keeps its data across a restart (append-only file, fsync always): a restart, not a wipe.
    let dir = TempDir::new("sse-soak");
    let redis = RedisServer::start_with(&[
        "--maxclients",
        "10000",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        &dir.path().to_string_lossy(),
    ]);
    let redis_port = redis.port;
    // Small queues, so slow readers really overflow theirs.
    let mut cluster =
        Cluster::start_on(&args.server_bin, 2, Some(redis), &[("SSE_QUEUE_CAPACITY", "32")]).await;
    let addrs = cluster.addrs();
    eprintln!(
        "soak: {} connections on 2 instances and Redis, {} s",
        args.connections, args.secs
    );
    let mut pool = Pool::open(&Pool::plan(&addrs, args.connections, 2_500, 3, Dialect::Sse)).await;
    let held = pool.held;
    let users = held as u32;

    let stop = Arc::new(AtomicBool::new(false));
    let next_seq = Arc::new(AtomicU32::new(1));
    let publishing = tokio::spawn(publish(
        addrs.clone(),
        args.rate,
        users,
        stop.clone(),
        next_seq.clone(),
    ));

    let faults = [
        Fault::CrashInstance(1),
        Fault::RestartRedis,
        Fault::CutPubSub,
        Fault::ReconnectStorm,
        Fault::SlowReaders,
        Fault::CrashInstance(0),
    ];
    let spacing = Duration::from_secs(args.secs) / (faults.len() as u32 + 1);
    let mut burst = Published::default();
    let mut log = Vec::new();
    for fault in faults {
        tokio::time::sleep(spacing).await;
        let at = started.elapsed().as_secs_f64();
        eprintln!("soak: {at:.0} s: {}", fault.describe());
        match fault {
            Fault::CrashInstance(i) => cluster.crash_and_restart(i).await,
            Fault::RestartRedis => {
                let redis = cluster.redis_mut();
                redis.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                redis.restart();
            }
            Fault::CutPubSub => {
                let _ = std::process::Command::new("redis-cli")
                    .args(["-p", &redis_port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
                    .output();
            }
            Fault::ReconnectStorm => {
                pool.ask("storm").await;
            }
            Fault::SlowReaders => {
                pool.ask("pause 10000").await;
                // A burst to the paused users overflows their queues of 32.
                let paused: Vec<u32> = (0..users).filter(|u| u.is_multiple_of(10)).collect();
                let extra = publish_burst(addrs[0], &paused, 64, &next_seq).await;
                burst.accepted.extend(extra.accepted);
                burst.refused += extra.refused;
                burst.unknown += extra.unknown;
            }
        }
        log.push(json!({"at_s": at, "fault": fault.describe()}));
    }
    tokio::time::sleep(spacing).await;
    stop.store(true, Ordering::Relaxed);
    let mut published = publishing.await.expect("publisher");
    published.accepted.extend(burst.accepted);
    published.refused += burst.refused;
    published.unknown += burst.unknown;

    let (seen, (lost, duplicated, wrong)) = pool
        .settle(
            &published.accepted,
            Duration::from_secs(90),
            Duration::from_millis(500),
        )
        .await;
    let reconnects = pool.reconnects().await;
    let mut report = Report::default();
    report.put("soak_seconds", json!(started.elapsed().as_secs_f64()));
    report.put("soak_connections_held", json!(held));
    report.put("soak_events_accepted", json!(published.accepted.len()));
    report.put("soak_events_refused_during_faults", json!(published.refused));
    report.put("soak_events_unknown_broken_connection", json!(published.unknown));
    report.put("soak_lost", json!(lost));
    report.put("soak_duplicated", json!(duplicated));
    report.put("soak_wrong_user", json!(wrong));
    report.put("soak_stream_reconnects", json!(reconnects));
    report.latencies("soak", seen.iter().map(|s| s[2]).collect());
    report.put("soak_faults", Value::Array(log));
    let ok = lost == 0 && duplicated == 0 && wrong == 0 && held == args.connections;
    report.print();
    if let Some(path) = &args.json {
        report.write(path);
    }
    pool.close().await;
    cluster.stop().await;
    if ok {
        eprintln!("soak: zero loss, zero duplicates, zero misdelivery");
        ExitCode::SUCCESS
    } else {
        eprintln!("soak: FAILED: {lost} lost, {duplicated} duplicated, {wrong} to the wrong user");
        ExitCode::FAILURE
    }
}

/// Targeted events at `rate`/s until `stop`, in 10 ms batches round-robin over the
/// instances; a lane whose instance went away reconnects and carries on.
async fn publish(
    servers: Vec<SocketAddr>,
    rate: u64,
    users: u32,
    stop: Arc<AtomicBool>,
    next_seq: Arc<AtomicU32>,
) -> Published {
    let lanes = servers.len() as f64;
    let mut tasks = Vec::new();
    for server in servers {
        let (stop, next_seq) = (stop.clone(), next_seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Published::default();
            let mut publisher: Option<Publisher> = None;
            let mut pacer = Pacer::new(rate as f64 / lanes, 500);
            while !stop.load(Ordering::Relaxed) {
                let count = pacer.owed().await.count() as u32;
                if count == 0 {
                    continue;
                }
                let first = next_seq.fetch_add(count, Ordering::Relaxed);
                let batch: Vec<(u32, u32)> = (first..first + count).map(|seq| (seq, seq % users)).collect();
                match post_batch(&mut publisher, server, &batch).await {
                    Some(202) => out.accepted.extend(batch),
                    Some(_) => out.refused += batch.len(),
                    None => out.unknown += batch.len(),
                }
            }
            out
        }));
    }
    let mut all = Published::default();
    for task in tasks {
        let lane = task.await.expect("publisher lane");
        all.accepted.extend(lane.accepted);
        all.refused += lane.refused;
        all.unknown += lane.unknown;
    }
    all
}

/// `per_user` events to each of `users` at once.
async fn publish_burst(server: SocketAddr, users: &[u32], per_user: u32, next_seq: &AtomicU32) -> Published {
    let mut out = Published::default();
    let mut publisher = None;
    let all: Vec<u32> = users
        .iter()
        .flat_map(|u| std::iter::repeat_n(*u, per_user as usize))
        .collect();
    for chunk in all.chunks(1_000) {
        let first = next_seq.fetch_add(chunk.len() as u32, Ordering::Relaxed);
        let batch: Vec<(u32, u32)> = chunk
            .iter()
            .enumerate()
            .map(|(i, u)| (first + i as u32, *u))
            .collect();
        match post_batch(&mut publisher, server, &batch).await {
            Some(202) => out.accepted.extend(batch),
            Some(_) => out.refused += batch.len(),
            None => out.unknown += batch.len(),
        }
    }
    out
}

/// Posts `(seq, user)` events: the status (0 when the server cannot be reached, so nothing
/// was published), or `None` when the connection broke mid-request (maybe published). A
/// broken connection is dropped; the next call connects again.
async fn post_batch(
    publisher: &mut Option<Publisher>,
    server: SocketAddr,
    batch: &[(u32, u32)],
) -> Option<u16> {
    if publisher.is_none() {
        *publisher = Publisher::connect(server).await.ok();
    }
    let Some(connection) = publisher.as_mut() else {
        tokio::time::sleep(Duration::from_millis(200)).await;
        return Some(0);
    };
    let sent_us = now_us();
    let body = targeted_batch(batch, sent_us, "soak");
    match connection.post(&body).await {
        Ok(status) => Some(status),
        Err(_) => {
            *publisher = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_lane_counts_refused_not_accepted() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let nothing: SocketAddr = ([127, 0, 0, 1], sse_notify_testkit::free_port()).into();
        let seq = AtomicU32::new(1);
        let out = runtime.block_on(publish_burst(nothing, &[1, 2], 3, &seq));
        assert!(out.accepted.is_empty());
        assert_eq!(out.refused, 6);
    }
}
