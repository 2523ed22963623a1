//! `GET /metrics`: every Prometheus series moves by exactly what happened.
//!
//! A test binary of its own with a single test: the recorder is process-wide, so no other
//! test may move the counters while this one reads them.

mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use serde_json::json;
use sse_notify::server::BrokerHealth;
use tokio::io::AsyncWriteExt;

/// The samples of a Prometheus text page: `name{labels}` -> value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(server: &TestServer) -> HashMap<String, f64> {
    let text = server
        .http
        .get(server.url("/metrics"))
        .bearer_auth(PUBLISH_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse(&text)
}

/// How much each series moved between two scrapes (absent counts as 0).
fn moved(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn every_series_counts_what_happened() {
    let mut redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    let limited = start_server(test_config().connect_rate_per_user(1).queue_capacity(2)).await;
    let start = scrape(&server).await;
    assert_eq!(start.get("sse_broker_healthy"), Some(&1.0));

    // Publishing and delivery: 2 notifications to a user with two connections, 1 broadcast
    // to 3 connections.
    let mut a1 = server.connect("m-a", "", None).await;
    let mut a2 = server.connect("m-a", "", None).await;
    let mut b = server.connect("m-b", "", None).await;
    let connected = scrape(&server).await;
    assert_eq!(moved(&start, &connected, "sse_connections"), 3.0);
    for title in ["one", "two"] {
        server
            .service
            .send_notification("m-a", note(title))
            .await
            .unwrap();
    }
    server
        .service
        .send_system_alert(sse_notify::events::SystemAlert {
            message: "all".into(),
            kind: Default::default(),
            duration: None,
        })
        .await
        .unwrap();
    for client in [&mut a1, &mut a2] {
        for _ in 0..3 {
            client.next().await;
        }
    }
    let seen = b.next().await;
    let after = scrape(&server).await;
    let published = r#"sse_events_published_total{event="notification"}"#;
    let delivered = r#"sse_events_delivered_total{event="notification"}"#;
    assert_eq!(moved(&start, &after, published), 2.0);
    assert_eq!(moved(&start, &after, delivered), 4.0);
    assert_eq!(
        moved(
            &start,
            &after,
            r#"sse_events_published_total{event="system_alert"}"#
        ),
        1.0
    );
    assert_eq!(
        moved(
            &start,
            &after,
            r#"sse_events_delivered_total{event="system_alert"}"#
        ),
        3.0
    );

    // Replays and resyncs: a resume that replays 2 events, and one from an unknown id.
    drop(b);
    server.wait_for_clients("m-b", 0).await;
    server
        .service
        .send_notification("m-b", note("missed 1"))
        .await
        .unwrap();
    server
        .service
        .send_notification("m-b", note("missed 2"))
        .await
        .unwrap();
    let before = scrape(&server).await;
    let mut resumed = server.connect("m-b", "", Some(&seen.id)).await;
    resumed.next().await;
    resumed.next().await;
    // (the in-process broker knows that 5 is from before it started)
    let mut stale = limited.connect("m-c", "", Some("5")).await;
    assert_eq!(stale.next().await.event, "resync");
    let after = scrape(&server).await;
    assert_eq!(moved(&before, &after, "sse_replays_total"), 2.0);
    assert_eq!(moved(&before, &after, "sse_replayed_events_total"), 2.0);
    assert_eq!(moved(&before, &after, "sse_resyncs_total"), 1.0);

    // A replay read in several pages is one replay.
    // (the alert above is offline-delivered to a new user first: wait for our own event)
    let mut first = server.connect("m-d", "", None).await;
    server
        .service
        .send_custom_event("m-d", "job.start", json!({}))
        .await
        .unwrap();
    let long_seen = loop {
        let e = first.next().await;
        if e.event == "job.start" {
            break e.id;
        }
    };
    drop(first);
    server.wait_for_clients("m-d", 0).await;
    for n in 0..600 {
        server
            .service
            .send_custom_event("m-d", "job.step", json!({ "n": n }))
            .await
            .unwrap();
    }
    let before = scrape(&server).await;
    let mut long = server.connect("m-d", "", Some(&long_seen)).await;
    for n in 0..600 {
        assert_eq!(data(&long.next().await)["n"], n);
    }
    assert!(long.nothing_within(Duration::from_millis(300)).await);
    let after = scrape(&server).await;
    assert_eq!(moved(&before, &after, "sse_replays_total"), 1.0);
    assert_eq!(moved(&before, &after, "sse_replayed_events_total"), 600.0);

    // Refusals, by reason.
    let before = scrape(&server).await;
    let anonymous = server.http.get(server.url("/api/sse")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let _first = limited.connect("eager", "", None).await;
    let second = limited
        .http
        .get(limited.url("/api/sse"))
        .bearer_auth(limited.token("eager"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    let after = scrape(&server).await;
    assert_eq!(
        moved(
            &before,
            &after,
            r#"sse_connections_refused_total{reason="unauthorized"}"#
        ),
        1.0
    );
    assert_eq!(
        moved(
            &before,
            &after,
            r#"sse_connections_refused_total{reason="rate_limited"}"#
        ),
        1.0
    );

    // Clients that found SSE held back and came over WebSocket, counted by why.
    let before = scrape(&server).await;
    let _buffered = server.connect_ws("m-ws", "?fallback=buffered").await;
    let _plain = server.connect_ws("m-ws", "").await;
    let after = scrape(&server).await;
    assert_eq!(moved(&before, &after, "sse_buffered_clients_total"), 1.0);
    assert_eq!(moved(&before, &after, "sse_connections"), 2.0);

    // A slow client: a queue of 2 on `limited`, a reader that never reads, big events.
    let before = scrape(&server).await;
    let mut socket = tokio::net::TcpStream::connect(limited.addr).await.unwrap();
    let request = format!(
        "GET /api/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        limited.token("sloth")
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    limited.wait_for_clients("sloth", 1).await;
    let big = serde_json::json!({ "blob": "x".repeat(60_000) });
    for _ in 0..5_000 {
        limited
            .service
            .send_custom_event("sloth", "bulk", big.clone())
            .await
            .unwrap();
        if limited.service.client_count_for_user("sloth") == 0 {
            break;
        }
    }
    assert_eq!(limited.service.client_count_for_user("sloth"), 0, "never cut off");
    let after = scrape(&server).await;
    assert_eq!(moved(&before, &after, "sse_slow_client_disconnects_total"), 1.0);
    drop(socket);

    // The broker fails: the send is counted as failed and health drops to 0, then back to 1.
    redis.kill();
    let before = scrape(&server).await;
    assert!(server
        .service
        .send_notification("m-a", note("lost"))
        .await
        .is_err());
    let after = scrape(&server).await;
    assert_eq!(
        moved(
            &before,
            &after,
            r#"sse_events_failed_total{event="notification",reason="broker"}"#
        ),
        1.0
    );
    assert_eq!(after.get("sse_broker_healthy"), Some(&0.0));
    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.service.broker_health() != BrokerHealth::Healthy
        || server
            .service
            .send_notification("m-a", note("back"))
            .await
            .is_err()
    {
        assert!(tokio::time::Instant::now() < deadline, "never healthy again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(scrape(&server).await.get("sse_broker_healthy"), Some(&1.0));
}
