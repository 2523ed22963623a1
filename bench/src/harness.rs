//! The scenarios (S1-S8) and the run that strings them together.

use std::{
    collections::HashSet,
    process::ExitCode,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    cli::{Args, Dialect, SOURCES_PER_WORKER},
    processes::{now_us, Cluster, Peer, Pool, Subject},
    publish::{bench_message, publish_targeted, Published, Publisher},
    report::{audit_broadcast, percentile_ms, Report, AUDIT_GRACE},
};

/// What holding connections cost: the S1 and S1x figures.
struct Held {
    count: usize,
    rss_before: u64,
    rss_held: u64,
    per_conn: f64,
    idle_pct: f64,
}

impl Held {
    /// Opens `connections` on `subject`, from `sources` addresses per worker, lets them
    /// settle, then idles `idle_secs`. Connections count as held only if none was dropped
    /// and reopened meanwhile (a worker reconnects a stream the server ends, which would
    /// hide the drop).
    #[allow(clippy::too_many_arguments)]
    async fn measure(
        subject: &dyn Subject,
        dialect: Dialect,
        connections: usize,
        per_worker: usize,
        phase: u8,
        sources: usize,
        idle_secs: u64,
    ) -> (Pool, Self) {
        let (rss_before, _) = subject.figures();
        let mut plan = Pool::plan(&subject.addrs(), connections, per_worker, phase, dialect);
        plan.iter_mut().for_each(|share| share.sources = sources);
        let mut pool = Pool::open(&plan).await;
        let reconnects_before = pool.reconnects().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (rss_held, cpu_start) = subject.figures();
        tokio::time::sleep(Duration::from_secs(idle_secs)).await;
        let (_, cpu_end) = subject.figures();
        let dropped = pool.reconnects().await - reconnects_before;
        if dropped > 0 {
            eprintln!("{dropped} connections were dropped and reopened while held");
        }
        let held = Self {
            count: pool.held.saturating_sub(dropped as usize),
            rss_before,
            rss_held,
            per_conn: rss_held.saturating_sub(rss_before) as f64 / pool.held.max(1) as f64,
            idle_pct: (cpu_end - cpu_start) / idle_secs.max(1) as f64 * 100.0,
        };
        (pool, held)
    }
}

/// S1, S2 and S4 on one server: sse-notify (in-process broker) over SSE or WebSocket, or
/// a peer, on the same connections. Only sse-notify over SSE is held to the targets; the
/// others are there to compare with, in the same run. Returns false when the peer
/// cannot run here.
async fn single_instance(args: &Args, report: &mut Report, dialect: Dialect) -> bool {
    let (connections, idle_secs) = (args.connections, args.idle_secs);
    let (ours, peer) = match dialect {
        Dialect::Sse | Dialect::Ws => (Some(Cluster::start(&args.server_bin, 1, false).await), None),
        Dialect::Nchan | Dialect::Floor => match Peer::start(dialect, &args.peers, false).await {
            Some(peer) => (None, Some(peer)),
            None => return false,
        },
    };
    let subject: &dyn Subject = match (&ours, &peer) {
        (Some(cluster), _) => cluster,
        (_, Some(peer)) => peer,
        _ => unreachable!(),
    };
    let phase = match dialect {
        Dialect::Sse => 0,
        Dialect::Ws => 4,
        Dialect::Nchan => 5,
        Dialect::Floor => 6,
    };
    let (mut pool, held) = Held::measure(
        subject,
        dialect,
        connections,
        9_500,
        phase,
        SOURCES_PER_WORKER,
        idle_secs,
    )
    .await;
    report.correct &= held.count == connections;
    let Held {
        count: held,
        rss_before,
        rss_held,
        per_conn,
        idle_pct,
    } = held;
    let s1 = format!("s1{}", dialect.suffix());
    report.put(&format!("{s1}_connections_held"), json!(held));
    report.put(&format!("{s1}_open_seconds"), json!(pool.open_secs));
    report.put(&format!("{s1}_rss_before_kib"), json!(rss_before));
    report.put(&format!("{s1}_rss_held_kib"), json!(rss_held));
    report.put(&format!("{s1}_rss_per_connection_kib"), json!(per_conn));
    report.put(&format!("{s1}_idle_cpu_percent_of_a_core"), json!(idle_pct));
    if dialect == Dialect::Sse {
        report.target(
            "S1",
            &format!("hold {connections}; <= 2.5 KiB/conn; idle CPU < 2 %"),
            format!("{held} held; {per_conn:.1} KiB/conn; idle {idle_pct:.1} %"),
            held == connections && per_conn <= 2.5 && idle_pct < 2.0,
        );
    }

    if args.runs("s2") {
        broadcast(
            &format!("s2{}", dialect.suffix()),
            S2_BROADCASTS,
            idle_pct,
            subject,
            dialect,
            &mut pool,
            report,
        )
        .await;
    }
    // A storm needs targeted publishing and resuming, which the floor does not do; over
    // WebSocket it is the same server path as over SSE.
    if args.runs("s4") && matches!(dialect, Dialect::Sse | Dialect::Nchan) {
        storm(
            &format!("s4{}", dialect.suffix()),
            args,
            subject,
            dialect,
            &mut pool,
            report,
        )
        .await;
    }
    pool.close().await;
    if let Some(cluster) = ours {
        cluster.stop().await;
    }
    if let Some(peer) = peer {
        peer.stop().await;
    }
    true
}

/// Broadcasts S2 sends one after another: one is 19,000 deliveries in a few hundred ms,
/// and its p99 moved by a third from run to run.
const S2_BROADCASTS: u32 = 5;

/// `count` broadcasts to every connection, one after another; publish-to-receive latency
/// over all of them and the server's CPU per delivery, counted from each publish until its
/// last first copy arrived (not during the grace wait for duplicates). The figure is also
/// given with `idle_pct` (the subject's CPU while idle, measured by S1: sse-notify's
/// heartbeats, spread over every second) taken off for that time.
async fn broadcast(
    name: &str,
    count: u32,
    idle_pct: f64,
    subject: &dyn Subject,
    dialect: Dialect,
    pool: &mut Pool,
    report: &mut Report,
) {
    let (mut cpu, mut busy, mut cpu_whole) = (0.0, Duration::ZERO, 0.0);
    let (mut lost, mut duplicated, mut latencies, mut status) = (0, 0, Vec::new(), 0);
    for seq in 1..=count {
        pool.ask("clear").await;
        let (_, cpu_before) = subject.figures();
        let started = Instant::now();
        let sent = now_us();
        let (path, body) = dialect.broadcast(&bench_message(sent, seq));
        let this_status = match Publisher::connect(subject.addrs()[0]).await {
            Ok(mut p) => p.post_to(path, &body).await.unwrap_or(0),
            Err(_) => 0,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while audit_broadcast(&pool.seen().await, seq, pool.held).0 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (_, cpu_after) = subject.figures();
        cpu += cpu_after - cpu_before;
        busy += started.elapsed();
        cpu_whole += cpu_when_idle_again(subject, idle_pct).await - cpu_before;
        // Keep listening a little: a duplicate may come after the last first copy.
        tokio::time::sleep(AUDIT_GRACE).await;
        let (this_lost, this_duplicated, this_latencies) =
            audit_broadcast(&pool.seen().await, seq, pool.held);
        lost += this_lost;
        duplicated += this_duplicated;
        latencies.extend(this_latencies);
        // The first refusal (or failed connection) stays; otherwise the latest status.
        if seq == 1 || (200..300).contains(&status) {
            status = this_status;
        }
    }
    let idle_cpu = busy.as_secs_f64() * idle_pct / 100.0;
    let received = latencies.len().max(1) as f64;
    report.put(&format!("{name}_broadcasts"), json!(count));
    report.put(&format!("{name}_publish_status"), json!(status));
    report.put(&format!("{name}_expected"), json!(pool.held * count as usize));
    report.put(&format!("{name}_received"), json!(latencies.len()));
    report.put(&format!("{name}_lost"), json!(lost));
    report.put(&format!("{name}_duplicated"), json!(duplicated));
    report.latencies(name, latencies);
    report.put(
        &format!("{name}_server_cpu_us_per_delivery_with_idle"),
        json!(cpu / received * 1e6),
    );
    report.put(
        &format!("{name}_server_cpu_us_per_delivery"),
        json!((cpu - idle_cpu) / received * 1e6),
    );
    report.put(
        &format!("{name}_server_cpu_us_per_delivery_whole_phase"),
        json!(cpu_whole / received * 1e6),
    );
    // Every subject must deliver everything once; the floor drops what a full socket
    // buffer cannot take, and says so, so only sse-notify's delivery is part of the verdict.
    if matches!(dialect, Dialect::Sse | Dialect::Ws) {
        report.correct &= (200..300).contains(&status) && lost == 0 && duplicated == 0;
    }
}

/// The subject's CPU seconds once it is idle again after a broadcast: sampled every
/// 250 ms until a sample uses no more than its idle CPU (`idle_pct`, from S1) and one clock
/// tick; the figure from the start of that quiet sample. At most 10 s.
async fn cpu_when_idle_again(subject: &dyn Subject, idle_pct: f64) -> f64 {
    const SAMPLE: Duration = Duration::from_millis(250);
    let quiet = 0.01 + SAMPLE.as_secs_f64() * idle_pct / 100.0;
    let (_, mut last) = subject.figures();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        tokio::time::sleep(SAMPLE).await;
        let (_, now) = subject.figures();
        if now - last <= quiet {
            break;
        }
        last = now;
    }
    last
}

/// S4: every client drops and reconnects with `Last-Event-ID` at once while targeted
/// events flow; then every event must have arrived exactly once.
async fn storm(
    name: &str,
    args: &Args,
    subject: &dyn Subject,
    dialect: Dialect,
    pool: &mut Pool,
    report: &mut Report,
) {
    let rate = args.s4_rate;
    pool.ask("clear").await;
    let users = pool.held as u32;
    let publishing = tokio::spawn(publish_targeted(
        dialect,
        subject.addrs(),
        rate,
        5.0,
        users,
        1_000,
        1,
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let storm_at = now_us();
    let answers = pool.ask("storm").await;
    let back: u64 = answers.iter().map(|a| a["back"].as_u64().unwrap_or(0)).sum();
    let expected_back: u64 = answers.iter().map(|a| a["expected"].as_u64().unwrap_or(0)).sum();
    let last_back = answers
        .iter()
        .filter_map(|a| a["last_back_us"].as_u64())
        .max()
        .unwrap_or(0);
    let back_secs = last_back.saturating_sub(storm_at) as f64 / 1e6;
    let Published {
        accepted: expected,
        refused,
        failed,
    } = publishing.await.expect("publisher");
    let (seen, (lost, duplicated, wrong)) = pool
        .settle(&expected, Duration::from_secs(20), Duration::from_millis(250))
        .await;
    if std::env::var_os("SSE_BENCH_DEBUG_LOST").is_some() {
        let got: HashSet<u32> = seen.iter().map(|s| s[1]).collect();
        let mut missing: Vec<(u32, u32)> = expected
            .iter()
            .filter(|(seq, _)| !got.contains(seq))
            .map(|(s, u)| (*s, *u))
            .collect();
        missing.sort();
        eprintln!("DEBUG lost (seq, user): {:?}", &missing[..missing.len().min(60)]);
    }
    report.put(&format!("{name}_clients"), json!(expected_back));
    report.put(&format!("{name}_back"), json!(back));
    report.put(&format!("{name}_all_back_seconds"), json!(back_secs));
    report.put(&format!("{name}_events_sent"), json!(expected.len()));
    report.put(&format!("{name}_events_refused"), json!(refused));
    report.put(&format!("{name}_gaps"), json!(lost));
    report.put(&format!("{name}_duplicates"), json!(duplicated));
    report.put(&format!("{name}_wrong_user"), json!(wrong));
    report.put(&format!("{name}_publisher_failed"), json!(failed));
    report.latencies(name, seen.iter().map(|s| s[2]).collect());
    if dialect == Dialect::Sse {
        report.correct &= lost == 0 && duplicated == 0 && wrong == 0 && refused == 0 && !failed;
    }
}

/// Where an S4 variant runs: the in-process broker from 4 addresses in all (clients behind
/// NATs), or on Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StormVariant {
    BehindNat,
    OnRedis,
}

/// S4n / S4r: the S4 storm on `--connections` fresh clients, on sse-notify and (when
/// compared) on nchan, side by side: every client behind 4 addresses (2 per worker), or
/// each server on a `redis-server` of its own.
async fn storm_variant(args: &Args, report: &mut Report, variant: StormVariant) {
    let (scenario, phase, sources) = match variant {
        StormVariant::BehindNat => ("s4n", 7, 2),
        StormVariant::OnRedis => ("s4r", 9, SOURCES_PER_WORKER),
    };
    let on_redis = variant == StormVariant::OnRedis;
    let mut dialects = vec![Dialect::Sse];
    if args.compares(Dialect::Nchan) {
        dialects.push(Dialect::Nchan);
    }
    for (i, dialect) in dialects.into_iter().enumerate() {
        let (ours, peer) = match dialect {
            Dialect::Sse => (Some(Cluster::start(&args.server_bin, 1, on_redis).await), None),
            _ => match Peer::start(dialect, &args.peers, on_redis).await {
                Some(peer) => (None, Some(peer)),
                None => continue,
            },
        };
        let subject: &dyn Subject = match (&ours, &peer) {
            (Some(cluster), _) => cluster,
            (_, Some(peer)) => peer,
            _ => unreachable!(),
        };
        let (mut pool, held) = Held::measure(
            subject,
            dialect,
            args.connections,
            9_500,
            phase + i as u8,
            sources,
            0,
        )
        .await;
        if dialect == Dialect::Sse {
            report.correct &= held.count == args.connections;
        }
        let name = format!("{scenario}{}", dialect.suffix());
        storm(&name, args, subject, dialect, &mut pool, report).await;
        pool.close().await;
        if let Some(cluster) = ours {
            cluster.stop().await;
        }
        if let Some(peer) = peer {
            peer.stop().await;
        }
    }
    let (gaps, dups) = (
        report.get(&format!("{scenario}_gaps")),
        report.get(&format!("{scenario}_duplicates")),
    );
    let (back, expected) = (
        report.get(&format!("{scenario}_back")),
        report.get(&format!("{scenario}_clients")),
    );
    let secs = report.get(&format!("{scenario}_all_back_seconds"));
    let nchan_secs = report.get(&format!("{scenario}_nchan_all_back_seconds"));
    let vs_nchan = secs / nchan_secs;
    report.put(&format!("{scenario}_back_vs_nchan"), json!(vs_nchan));
    match variant {
        StormVariant::BehindNat => {
            let vs_spread = secs / report.get("s4_all_back_seconds");
            report.put("s4n_back_vs_s4", json!(vs_spread));
            report.target(
                "S4n",
                "storm from 4 addresses: all back, 0 gaps, within 2x S4's time",
                format!(
                    "{back} of {expected} back in {secs:.2} s ({vs_spread:.2}x S4, {vs_nchan:.2}x nchan's); {gaps} gaps, {dups} dups"
                ),
                back == expected && gaps == 0.0 && dups == 0.0 && vs_spread <= 2.0,
            );
        }
        StormVariant::OnRedis => report.target(
            "S4r",
            "storm on Redis: all back in <= nchan-on-Redis's time, 0 gaps",
            format!("{back} of {expected} back in {secs:.2} s ({vs_nchan:.2}x nchan's {nchan_secs:.2} s); {gaps} gaps, {dups} dups"),
            back == expected && gaps == 0.0 && dups == 0.0 && vs_nchan <= 1.0,
        ),
    }
}

/// S1x and S2x: `--instances` servers on one Redis hold `--cluster-connections`.
async fn cluster_scale(args: &Args, report: &mut Report) {
    let (connections, instances, idle_secs) = (args.cluster_connections, args.instances, args.idle_secs);
    let cluster = Cluster::start(&args.server_bin, instances, true).await;
    let (mut pool, held) = Held::measure(
        &cluster,
        Dialect::Sse,
        connections,
        17_000,
        1,
        SOURCES_PER_WORKER,
        idle_secs,
    )
    .await;
    report.correct &= held.count == connections;
    let Held {
        count: held,
        per_conn,
        idle_pct,
        ..
    } = held;
    report.put("s1x_instances", json!(instances));
    report.put("s1x_connections_held", json!(held));
    report.put("s1x_open_seconds", json!(pool.open_secs));
    report.put("s1x_rss_per_connection_kib", json!(per_conn));
    report.put("s1x_idle_cpu_percent_of_a_core_all_instances", json!(idle_pct));
    report.target(
        "S1x",
        &format!("{instances} instances hold {connections}; <= 6 KiB/conn"),
        format!("{held} held; {per_conn:.1} KiB/conn; idle {idle_pct:.1} %"),
        held == connections && per_conn <= 6.0,
    );
    if args.runs("s2x") {
        broadcast("s2x", 1, idle_pct, &cluster, Dialect::Sse, &mut pool, report).await;
        let (lost, duplicated) = (report.get("s2x_lost"), report.get("s2x_duplicated"));
        let (p99, s2_p99) = (report.get("s2x_p99_ms"), report.get("s2_p99_ms"));
        report.target(
            "S2x",
            &format!("broadcast to {} on {instances} instances: zero loss", pool.held),
            format!("{lost} lost, {duplicated} dups; p99 {p99:.0} ms (one instance, 19,000: {s2_p99:.0} ms)"),
            lost == 0.0 && duplicated == 0.0,
        );
    }
    pool.close().await;
    cluster.stop().await;
}

/// S3: two instances on Redis, one connection per user, targeted events at a steady rate
/// published alternately through both instances.
async fn targeted(args: &Args, report: &mut Report) {
    let (users, rate, secs) = (args.s3_users, args.s3_rate, args.s3_secs);
    let cluster = Cluster::start(&args.server_bin, 2, true).await;
    let pool = targeted_on("s3", &cluster, TargetedLoad::s3(args), 2, report).await;
    let (lost, refused, p99) = (
        report.get("s3_lost"),
        report.get("s3_events_refused"),
        report.get("s3_p99_ms"),
    );
    report.target(
        "S3",
        &format!("{users} users, {rate}/s for {secs} s via Redis: zero loss, p99 <= 10 ms"),
        format!(
            "{} sent, {lost} lost, {refused} refused; p99 {p99:.1} ms",
            report.get("s3_events_sent")
        ),
        lost == 0.0 && refused == 0.0 && p99 <= 10.0,
    );
    pool.close().await;
    cluster.stop().await;
}

/// S8: what one active uploader (10 progress events a second, and a day's 20
/// notifications) holds in Redis once steady. Progress is kept its 5 minutes: 3,000 entries.
/// When every event of a user's stream was kept as long as the longest-kept type (24 h),
/// the same user reached the stream cap, 100,000 entries, in under 3 hours: that user is
/// published here too, and both users' keys are measured with `MEMORY USAGE`.
async fn redis_memory_per_uploader(args: &Args, report: &mut Report) {
    const PER_SECOND: usize = 10;
    const NOTIFICATIONS: usize = 20;
    let kept_now = PER_SECOND * 300;
    let kept_before = 100_000;
    let cluster = Cluster::start(&args.server_bin, 1, true).await;
    let mut publisher = Publisher::connect(cluster.addrs()[0])
        .await
        .expect("publisher connects");
    for (user, progress_events) in [("mem-now", kept_now), ("mem-before", kept_before)] {
        let events: Vec<Value> = (0..NOTIFICATIONS)
            .map(|n| {
                json!({"user_id": user, "event": "notification",
                       "data": {"title": "Comment", "message": format!("Someone commented on your reel ({n})")}})
            })
            .chain((0..progress_events).map(|n| {
                json!({"user_id": user, "event": "reel_upload_progress",
                       "data": {"reelId": format!("reel-{}", n / 1_000), "progress": n % 100, "status": "uploading"}})
            }))
            .collect();
        for batch in events.chunks(1_000) {
            let status = publisher
                .post(&Value::Array(batch.to_vec()).to_string())
                .await
                .expect("publish");
            report.correct &= status == 202;
        }
    }
    let redis_port = cluster.redis.as_ref().expect("on Redis").port;
    let (now_bytes, before_bytes) = (
        redis_bytes_of(redis_port, "mem-now"),
        redis_bytes_of(redis_port, "mem-before"),
    );
    report.put("s8_bytes_per_uploader", json!(now_bytes));
    report.put("s8_bytes_per_uploader_before", json!(before_bytes));
    report.target(
        "S8",
        "Redis memory per active uploader (10 progress/s, 20 notifications), steady state",
        format!(
            "{:.0} KB ({kept_now} entries) vs {:.1} MB when kept as long as notifications ({kept_before} entries): {:.0}x less",
            now_bytes as f64 / 1e3,
            before_bytes as f64 / 1e6,
            before_bytes as f64 / now_bytes.max(1) as f64
        ),
        now_bytes > 0 && now_bytes * 10 < before_bytes,
    );
    cluster.stop().await;
}

/// The bytes Redis (on localhost:`port`) uses for every key naming `user`.
fn redis_bytes_of(port: u16, user: &str) -> u64 {
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let pattern = format!("*:{user}");
    cli(&["--scan", "--pattern", &pattern])
        .lines()
        .filter(|key| !key.is_empty())
        .map(|key| {
            cli(&["MEMORY", "USAGE", key, "SAMPLES", "0"])
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        })
        .sum()
}

/// S6: `--instances` servers on a Redis Cluster (3 primaries, a replica each) hold
/// `--cluster-connections`, one per user; targeted events at the S3 rate for the S3 time,
/// published through every instance, then one broadcast to everyone.
async fn on_redis_cluster(args: &Args, report: &mut Report) {
    let (users, rate, secs, instances) = (
        args.cluster_connections,
        args.s3_rate,
        args.s3_secs,
        args.instances,
    );
    let cluster = Cluster::start_on_redis_cluster(&args.server_bin, instances).await;
    let load = TargetedLoad {
        users,
        ..TargetedLoad::s3(args)
    };
    let mut pool = targeted_on("s6", &cluster, load, 3, report).await;
    broadcast("s6_broadcast", 1, 0.0, &cluster, Dialect::Sse, &mut pool, report).await;
    let (lost, refused, p99) = (
        report.get("s6_lost"),
        report.get("s6_events_refused"),
        report.get("s6_p99_ms"),
    );
    let broadcast_lost = report.get("s6_broadcast_lost");
    let (s3_p99, broadcast_p99) = (report.get("s3_p99_ms"), report.get("s6_broadcast_p99_ms"));
    report.target(
        "S6",
        &format!("{instances} instances on a 3-primary cluster, {users} users, {rate}/s for {secs} s, then a broadcast: zero loss"),
        format!(
            "{} sent, {lost} lost, {refused} refused; p99 {p99:.1} ms (S3 on one Redis: {s3_p99:.1} ms); \
             broadcast: {broadcast_lost} lost, p99 {broadcast_p99:.0} ms",
            report.get("s6_events_sent")
        ),
        lost == 0.0 && refused == 0.0 && broadcast_lost == 0.0,
    );
    pool.close().await;
    cluster.stop().await;
}

/// A targeted load: `rate` events per second for `secs` to `users` (one connection each),
/// with up to `in_flight` publish requests at once on each instance.
#[derive(Clone, Copy)]
pub(crate) struct TargetedLoad {
    pub(crate) users: usize,
    pub(crate) rate: u64,
    pub(crate) secs: f64,
    pub(crate) in_flight: usize,
}

impl TargetedLoad {
    /// S3's: `--s3-users`, `--s3-rate`, `--s3-secs`, `--publish-in-flight`.
    pub(crate) fn s3(args: &Args) -> Self {
        Self {
            users: args.s3_users,
            rate: args.s3_rate,
            secs: args.s3_secs,
            in_flight: args.publish_in_flight,
        }
    }
}

/// `load` on the users held by `cluster`, published round-robin through every instance;
/// figures under `name`.
pub(crate) async fn targeted_on(
    name: &str,
    cluster: &Cluster,
    load: TargetedLoad,
    phase: u8,
    report: &mut Report,
) -> Pool {
    let TargetedLoad {
        users,
        rate,
        secs,
        in_flight,
    } = load;
    let mut pool = Pool::open(&Pool::plan(&cluster.addrs(), users, 17_000, phase, Dialect::Sse)).await;
    report.correct &= pool.held == users;
    let (_, cpu_before) = cluster.figures();
    let redis_before = cluster.redis_cpu();
    let Published {
        accepted: expected,
        refused,
        failed,
    } = publish_targeted(
        Dialect::Sse,
        cluster.addrs(),
        rate,
        secs,
        pool.held as u32,
        1_000_000,
        in_flight,
    )
    .await;
    let redis_after = cluster.redis_cpu();
    let (seen, (lost, duplicated, wrong)) = pool
        .settle(&expected, Duration::from_secs(30), Duration::from_millis(500))
        .await;
    let (_, cpu_after) = cluster.figures();
    let reconnects = pool.reconnects().await;
    let key = |what: &str| format!("{name}_{what}");
    report.put(&key("users"), json!(pool.held));
    report.put(&key("events_sent"), json!(expected.len()));
    report.put(&key("rate_per_second"), json!(expected.len() as f64 / secs));
    report.put(&key("events_refused"), json!(refused));
    report.put(&key("lost"), json!(lost));
    report.put(&key("duplicated"), json!(duplicated));
    report.put(&key("wrong_user"), json!(wrong));
    report.put(&key("stream_reconnects"), json!(reconnects));
    report.latencies(name, seen.iter().map(|s| s[2]).collect());
    // Where in the run the tail lies: sequence numbers grow with send time.
    let window = (rate * 5).max(1);
    let mut windows: Vec<Vec<u32>> = Vec::new();
    for [_, seq, latency] in &seen {
        let w = (seq.saturating_sub(1_000_000) as u64 / window) as usize;
        if windows.len() <= w {
            windows.resize(w + 1, Vec::new());
        }
        windows[w].push(*latency);
    }
    // A last window with less than half a window's events is the run's ragged end: left out.
    let by_window: Vec<f64> = windows
        .into_iter()
        .filter(|l| l.len() as u64 >= window / 2)
        .map(|mut l| {
            l.sort_unstable();
            percentile_ms(&l, 0.99)
        })
        .collect();
    report.put(&key("p99_ms_by_5s"), json!(by_window));
    report.put(
        &key("server_cpu_s_per_million_deliveries"),
        json!((cpu_after - cpu_before) / seen.len().max(1) as f64 * 1e6),
    );
    // Redis's CPU per event, each primary: 1 s over it is what one Redis core can take.
    let per_event: Vec<f64> = redis_before
        .iter()
        .zip(&redis_after)
        .map(|(b, a)| (a - b) / expected.len().max(1) as f64 * 1e6)
        .collect();
    report.put(&key("redis_cpu_us_per_event_by_primary"), json!(per_event));
    report.put(
        &key("redis_cpu_us_per_event"),
        json!(per_event.iter().sum::<f64>()),
    );
    let busiest = per_event.iter().copied().fold(0.0, f64::max);
    report.put(
        &key("redis_ceiling_events_per_second"),
        json!(if busiest > 0.0 { 1e6 / busiest } else { 0.0 }),
    );
    report.put(&key("publisher_failed"), json!(failed));
    report.correct &= lost == 0 && duplicated == 0 && wrong == 0 && refused == 0 && !failed;
    pool
}

/// A file's size after `gzip -9`, in KiB (0 when it cannot be read).
fn gzip_kib(path: &std::path::Path) -> f64 {
    std::process::Command::new("gzip")
        .args(["-9c"])
        .arg(path)
        .output()
        .map_or(0, |o| o.stdout.len() as u64) as f64
        / 1024.0
}

/// S5: the release bundles on disk, gzipped: the demo's, the example host app's, and the
/// three that `scripts/bundle-peers.sh` builds beside them (`make bench` builds all five):
/// the host app's pages with no live toasts (the base), with leptos-use + leptoaster (the
/// peer), and the host app without the notification center (toasts only). What the library
/// adds to a host app is the host app's WASM minus the base's; the peer's delta, measured in
/// the same run, is its target. The host app minus the toasts-only build is what the
/// notification center adds before its panel is opened.
fn bundle(report: &mut Report) {
    for (dir, name, prefix) in [
        ("target/site/pkg", "sse-notify", "s5"),
        ("target/site-host/pkg", "host", "s5_host"),
    ] {
        let pkg = std::path::Path::new(dir);
        if !pkg.join(format!("{name}.wasm")).exists() {
            eprintln!("S5: {dir}/{name}.wasm is missing (cargo leptos build --release); skipped");
            continue;
        }
        let mut total = 0.0;
        for ext in ["wasm", "js", "css"] {
            let kib = gzip_kib(&pkg.join(format!("{name}.{ext}")));
            report.put(&format!("{prefix}_{ext}_gzip_kib"), json!(kib));
            total += kib;
        }
        report.put(&format!("{prefix}_bundle_gzip_kib"), json!(total));
        if prefix == "s5" {
            report.target(
                "S5",
                "demo: WASM + JS + CSS <= 250 KiB gzipped",
                format!("{total:.1} KiB"),
                total <= 250.0,
            );
        }
    }
    let peer_wasm = |name: &str| {
        let path = std::path::PathBuf::from(format!("target/bundle-peers/{name}/pkg/{name}.wasm"));
        path.exists().then(|| gzip_kib(&path))
    };
    let (Some(base), Some(peer)) = (peer_wasm("base"), peer_wasm("leptos-toasts")) else {
        eprintln!("S5: target/bundle-peers is missing (scripts/bundle-peers.sh); no deltas");
        return;
    };
    let host = report.get("s5_host_wasm_gzip_kib");
    let (ours, theirs) = (host - base, peer - base);
    report.put("s5_base_wasm_gzip_kib", json!(base));
    report.put("s5_peer_wasm_gzip_kib", json!(peer));
    report.put("s5_library_adds_gzip_kib", json!(ours));
    report.put("s5_peer_adds_gzip_kib", json!(theirs));
    let center = peer_wasm("toasts").map(|toasts| host - toasts);
    let center_line = center.map_or(String::new(), |kib| {
        format!("\n  of which the notification center before its panel opens +{kib:.1} KiB")
    });
    println!(
        "S5 what a host app's WASM gains (gzipped; the host app's pages alone: {base:.1} KiB)\n  \
         sse-notify (toasts, hook, bell, styles) +{ours:.1} KiB{center_line}\n  \
         leptos-use use_event_source + codee + leptoaster +{theirs:.1} KiB\n  ratio {:.2}x",
        ours / theirs
    );
    if let Some(kib) = center {
        report.put("s5_inbox_adds_gzip_kib", json!(kib));
        report.target(
            "S5",
            "the notification center adds <= 5 KiB before its panel is opened",
            format!("+{kib:.1} KiB"),
            kib <= 5.0,
        );
    }
    report.target(
        "S5",
        "the library adds <= the peer's delta to a host app",
        format!("+{ours:.1} vs +{theirs:.1} KiB ({:.2}x)", ours / theirs),
        ours <= theirs,
    );
}

/// Prints S1, S2 and S4 for every subject of this run in one table, and judges the
/// targets that are ratios to a peer measured in the same run.
fn side_by_side(report: &mut Report, compared: &[Dialect]) {
    let label = |d: Dialect| match d {
        Dialect::Sse => "sse-notify",
        Dialect::Ws => "sse-notify over WebSocket",
        Dialect::Nchan => "nginx + nchan (memory, 2 workers)",
        Dialect::Floor => "floor (one write per socket)",
    };
    println!(
        "{:<34} {:>8} {:>9} {:>9} {:>16} {:>11} {:>11} {:>10}",
        "same run, one server",
        "held",
        "KiB/conn",
        "idle CPU",
        "S2 p50/p99 ms",
        "µs/deliv.",
        "whole µs",
        "S4 back s"
    );
    for &d in compared {
        let f_at = |scenario: &str, key: &str| report.get(&format!("{scenario}{}_{key}", d.suffix()));
        println!(
            "{:<34} {:>8} {:>9.1} {:>8.1}% {:>16} {:>11.1} {:>11.1} {:>10}",
            label(d),
            f_at("s1", "connections_held"),
            f_at("s1", "rss_per_connection_kib"),
            f_at("s1", "idle_cpu_percent_of_a_core"),
            format!("{:.0} / {:.0}", f_at("s2", "p50_ms"), f_at("s2", "p99_ms")),
            f_at("s2", "server_cpu_us_per_delivery"),
            f_at("s2", "server_cpu_us_per_delivery_whole_phase"),
            match f_at("s4", "all_back_seconds") {
                back if back.is_nan() => "-".to_string(),
                back => format!("{back:.2}"),
            },
        );
    }
    println!();
    let ratio = |ours: f64, theirs: f64| ours / theirs;
    if compared.contains(&Dialect::Floor) {
        let p99 = ratio(report.get("s2_p99_ms"), report.get("s2_floor_p99_ms"));
        let cpu = ratio(
            report.get("s2_server_cpu_us_per_delivery"),
            report.get("s2_floor_server_cpu_us_per_delivery"),
        );
        report.put("s2_p99_vs_floor", json!(p99));
        report.put("s2_cpu_per_delivery_vs_floor", json!(cpu));
        report.put(
            "s2_cpu_per_delivery_with_idle_vs_floor",
            json!(ratio(
                report.get("s2_server_cpu_us_per_delivery_with_idle"),
                report.get("s2_floor_server_cpu_us_per_delivery_with_idle"),
            )),
        );
        report.target(
            "S2",
            "broadcast p99 <= 1.1x the floor's",
            format!("{p99:.2}x"),
            p99 <= 1.1,
        );
        report.target(
            "S2",
            "server CPU per delivery <= 1.3x the floor's",
            format!("{cpu:.2}x"),
            cpu <= 1.3,
        );
        let whole = ratio(
            report.get("s2_server_cpu_us_per_delivery_whole_phase"),
            report.get("s2_floor_server_cpu_us_per_delivery_whole_phase"),
        );
        report.put("s2_cpu_per_delivery_whole_phase_vs_floor", json!(whole));
        report.target(
            "S2",
            "server CPU per delivery, whole phase (publish until idle again) <= 1.5x the floor's",
            format!("{whole:.2}x"),
            whole <= 1.5,
        );
    }
    if compared.contains(&Dialect::Nchan) {
        let back = ratio(
            report.get("s4_all_back_seconds"),
            report.get("s4_nchan_all_back_seconds"),
        );
        let (gaps, dups) = (report.get("s4_gaps"), report.get("s4_duplicates"));
        report.put("s4_back_vs_nchan", json!(back));
        report.target(
            "S4",
            "storm: all back in <= 0.5x nchan's time, 0 gaps, 0 dups",
            format!("{back:.2}x; {gaps} gaps, {dups} dups"),
            back <= 0.5 && gaps == 0.0 && dups == 0.0,
        );
        let rss = ratio(
            report.get("s1_rss_per_connection_kib"),
            report.get("s1_nchan_rss_per_connection_kib"),
        );
        report.put("s1_rss_vs_nchan", json!(rss));
    }
    if compared.contains(&Dialect::Ws) {
        report.put(
            "s2_ws_p99_vs_sse",
            json!(ratio(report.get("s2_ws_p99_ms"), report.get("s2_p99_ms"))),
        );
    }
}

pub async fn harness(args: Args) -> ExitCode {
    let mut report = Report {
        correct: true,
        ..Report::default()
    };
    let started = Instant::now();
    if args.runs("s5") {
        bundle(&mut report);
    }
    if ["s1", "s2", "s4"].iter().any(|s| args.runs(s)) {
        eprintln!("S1/S2/S4: one instance, in-process broker");
        single_instance(&args, &mut report, Dialect::Sse).await;
        let mut compared = vec![Dialect::Sse];
        for dialect in [Dialect::Ws, Dialect::Nchan, Dialect::Floor] {
            if args.compares(dialect) {
                eprintln!("S1/S2/S4 side by side: {}", dialect.name());
                if single_instance(&args, &mut report, dialect).await {
                    compared.push(dialect);
                }
            }
        }
        side_by_side(&mut report, &compared);
    }
    if args.runs("s4n") {
        eprintln!("S4n: the storm with every client behind 4 addresses");
        storm_variant(&args, &mut report, StormVariant::BehindNat).await;
    }
    if args.runs("s4r") {
        eprintln!("S4r: the storm on Redis");
        storm_variant(&args, &mut report, StormVariant::OnRedis).await;
    }
    if args.runs("s1x") || args.runs("s2x") {
        eprintln!("S1x/S2x: several instances on one Redis");
        cluster_scale(&args, &mut report).await;
    }
    if args.runs("s3") {
        eprintln!("S3: targeted events through Redis");
        targeted(&args, &mut report).await;
    }
    if args.runs("s6") {
        eprintln!("S6: several instances on a Redis Cluster");
        on_redis_cluster(&args, &mut report).await;
    }
    if args.runs("s7") {
        eprintln!("S7: the notification center's store under load");
        crate::inbox::inbox_under_load(&args, &mut report).await;
    }
    if args.runs("s8") {
        eprintln!("S8: Redis memory per active uploader");
        redis_memory_per_uploader(&args, &mut report).await;
    }
    report.put("harness_seconds", json!(started.elapsed().as_secs_f64()));
    report.print();
    if let Some(path) = &args.json {
        report.write(path);
    }
    if report.correct {
        ExitCode::SUCCESS
    } else {
        eprintln!("FAILED: an event was lost, duplicated or misdelivered, or a connection was not held");
        ExitCode::FAILURE
    }
}
