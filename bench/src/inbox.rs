//! S7: the notification center's store under load, on SQLite and on PostgreSQL. 10,000
//! users with 100 items each (1M rows, half of them read), filled in SQL; then one
//! instance serves concurrent readers of first pages and unread counts over HTTP, and one
//! user with 1,000 items marks them all read. Last, S3 with the inbox off and on.

use std::time::{Duration, Instant};

use serde_json::json;
use sse_notify::{api, server::Auth};
use sse_notify_testkit::{PostgresServer, RedisServer, TempDir};

use crate::{
    cli::{Args, SECRET},
    harness::{targeted_on, TargetedLoad},
    processes::Cluster,
    publish::Publisher,
    report::{percentile_ms, Report},
};

const USERS: u64 = 10_000;
const ITEMS: u64 = 1_000_000;
/// The user whose 1,000 items are marked read at once.
const MARKER: &str = "bench-marker";
const READERS: usize = 32;
const READ_SECS: u64 = 15;

pub(crate) async fn inbox_under_load(args: &Args, report: &mut Report) {
    let dir = TempDir::new("sse-bench-inbox");
    let postgres = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .expect("postgres starts");
    let stores = [
        ("sqlite", format!("sqlite://{}/inbox.db", dir.path().display())),
        ("postgres", postgres.database("bench")),
    ];
    for (name, url) in stores {
        eprintln!("S7 on {name}: filling {ITEMS} items");
        let started = Instant::now();
        fill(&url, name == "postgres").await;
        report.put(
            &format!("s7_{name}_fill_seconds"),
            json!(started.elapsed().as_secs_f64()),
        );
        let cluster = Cluster::start_on(&args.server_bin, 1, None, &[("SSE_INBOX_URL", &url)]).await;
        let addr = cluster.addrs()[0];
        let (pages, counts, errors) = read_load(addr).await;
        let mark_all = mark_all_read(addr).await;
        cluster.stop().await;
        let key = |what: &str| format!("s7_{name}_{what}");
        report.put(&key("first_page_p50_ms"), json!(percentile_ms(&pages, 0.5)));
        report.put(&key("first_page_p99_ms"), json!(percentile_ms(&pages, 0.99)));
        report.put(&key("unread_count_p50_ms"), json!(percentile_ms(&counts, 0.5)));
        report.put(&key("unread_count_p99_ms"), json!(percentile_ms(&counts, 0.99)));
        report.put(
            &key("reads_per_second"),
            json!((pages.len() + counts.len()) as f64 / READ_SECS as f64),
        );
        report.put(&key("read_errors"), json!(errors));
        report.put(&key("mark_all_read_1000_ms"), json!(mark_all));
        report.correct &= errors == 0;
        report.target(
            &format!("S7 {name}"),
            &format!("{USERS} users x 100 items; {READERS} readers; first page and count; mark all of 1,000"),
            format!(
                "page p50 {:.1} / p99 {:.1} ms, count p50 {:.1} / p99 {:.1} ms, {:.0} reads/s, mark-all {mark_all:.0} ms, {errors} errors",
                percentile_ms(&pages, 0.5),
                percentile_ms(&pages, 0.99),
                percentile_ms(&counts, 0.5),
                percentile_ms(&counts, 0.99),
                (pages.len() + counts.len()) as f64 / READ_SECS as f64,
            ),
            errors == 0,
        );
    }
    // What keeping events costs publishing: S3 (two instances on Redis) with the inbox
    // off, then on one PostgreSQL, in the same run.
    for variant in ["off", "on"] {
        eprintln!("S7: S3 with the inbox {variant}");
        let url = (variant == "on").then(|| postgres.database("s3"));
        let env: Vec<(&str, &str)> = url.iter().map(|u| ("SSE_INBOX_URL", u.as_str())).collect();
        let redis = RedisServer::start_with(&["--maxclients", "10000"]);
        let cluster = Cluster::start_on(&args.server_bin, 2, Some(redis), &env).await;
        let pool = targeted_on(
            &format!("s7_s3_{variant}"),
            &cluster,
            TargetedLoad::s3(args),
            2,
            report,
        )
        .await;
        pool.close().await;
        cluster.stop().await;
    }
    let throughput = report.get("s7_s3_on_rate_per_second") / report.get("s7_s3_off_rate_per_second");
    let p99 = report.get("s7_s3_on_p99_ms") / report.get("s7_s3_off_p99_ms");
    let lost = report.get("s7_s3_on_lost") + report.get("s7_s3_off_lost");
    report.put("s7_s3_throughput_on_vs_off", json!(throughput));
    report.put("s7_s3_p99_on_vs_off", json!(p99));
    report.target(
        "S7 S3",
        "S3 with the inbox on (PostgreSQL) vs off: >= 0.8x the throughput, p99 within 2x, 0 lost",
        format!(
            "{throughput:.2}x the throughput, p99 {:.1} vs {:.1} ms ({p99:.2}x), {lost} lost",
            report.get("s7_s3_on_p99_ms"),
            report.get("s7_s3_off_p99_ms")
        ),
        throughput >= 0.8 && p99 <= 2.0 && lost == 0.0,
    );
}

/// The schema (through the store, as the server makes it), then 1M items in one SQL
/// statement, every second one read, and the marker's 1,000.
async fn fill(url: &str, postgres: bool) {
    let store = sse_notify::server::inbox::SqlInbox::connect(url, 1_000)
        .await
        .expect("the store opens");
    drop(store);
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.expect("connects");
    let numbers = |to: u64| {
        if postgres {
            format!("SELECT n FROM generate_series(1, {to}) AS g(n)")
        } else {
            format!("WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {to}) SELECT n FROM g")
        }
    };
    let data = r#"'{"title":"Your report is ready","message":"Open it from the reports page.","type":"info","timestamp":0}'"#;
    let statements = [
        format!(
            "INSERT INTO sse_inbox_items (id, user_id, event, data, created_ms)
             SELECT n, 'bench-' || (n % {USERS}), 'notification', {data}, 1700000000000 + n FROM ({}) AS numbers",
            numbers(ITEMS)
        ),
        format!(
            "INSERT INTO sse_inbox_items (id, user_id, event, data, created_ms)
             SELECT {ITEMS} + n, '{MARKER}', 'notification', {data}, 1700000000000 + {ITEMS} + n FROM ({}) AS numbers",
            numbers(1_000)
        ),
        "INSERT INTO sse_inbox_state (user_id, item_id, read_ms)
         SELECT user_id, id, 1 FROM sse_inbox_items WHERE id % 2 = 0 AND user_id <> 'bench-marker'"
            .to_string(),
    ];
    for sql in statements {
        sqlx::query(&sql).execute(&pool).await.expect("fill");
    }
    // Fresh statistics, as a database that grew over time would have.
    sqlx::query("ANALYZE").execute(&pool).await.expect("analyze");
}

/// `READERS` connections for `READ_SECS`, each asking for a random user's first page and
/// unread count in turn: the latencies (µs, sorted) of each, and how many failed.
async fn read_load(addr: std::net::SocketAddr) -> (Vec<u32>, Vec<u32>, usize) {
    let auth = Auth::new(Some(&SECRET.into()));
    let tokens: Vec<String> = (0..1_000)
        .map(|u| {
            auth.issue(&format!("bench-{}", u * 10), None, Duration::from_secs(3_600))
                .expect("token")
        })
        .collect();
    let tokens = std::sync::Arc::new(tokens);
    let until = Instant::now() + Duration::from_secs(READ_SECS);
    let mut tasks = Vec::new();
    for reader in 0..READERS {
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let (mut pages, mut counts, mut errors) = (Vec::new(), Vec::new(), 0usize);
            let Ok(mut client) = Publisher::connect(addr).await else {
                return (pages, counts, 1);
            };
            let mut turn = reader;
            while Instant::now() < until {
                turn += 1;
                let token = &tokens[(turn * 7_919) % tokens.len()];
                let count = turn % 2 == 0;
                let path = if count {
                    format!("{}?status=unread&limit=1", api::INBOX_PATH)
                } else {
                    format!("{}?limit=20", api::INBOX_PATH)
                };
                let started = Instant::now();
                match client.send("GET", &path, token, "").await {
                    Ok(200) => {
                        let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        if count {
                            counts.push(us)
                        } else {
                            pages.push(us)
                        }
                    }
                    _ => errors += 1,
                }
            }
            (pages, counts, errors)
        }));
    }
    let (mut pages, mut counts, mut errors) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (p, c, e) = task.await.expect("reader");
        pages.extend(p);
        counts.extend(c);
        errors += e;
    }
    pages.sort_unstable();
    counts.sort_unstable();
    (pages, counts, errors)
}

/// The median time of `POST /api/inbox/read {"all":true}` over the marker's 1,000 unread
/// items, five rounds (each after marking them all unread again).
async fn mark_all_read(addr: std::net::SocketAddr) -> f64 {
    let token = Auth::new(Some(&SECRET.into()))
        .issue(MARKER, None, Duration::from_secs(3_600))
        .expect("token");
    let mut client = Publisher::connect(addr).await.expect("connects");
    let all = r#"{"all":true}"#;
    let mut times = Vec::new();
    for _ in 0..5 {
        let unread = format!("{}/unread", api::INBOX_PATH);
        client.send("POST", &unread, &token, all).await.expect("unread");
        let read = format!("{}/read", api::INBOX_PATH);
        let started = Instant::now();
        let status = client.send("POST", &read, &token, all).await.expect("read");
        times.push(if status == 200 {
            started.elapsed().as_secs_f64() * 1_000.0
        } else {
            f64::NAN
        });
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
