//! `GET /api/ws`: the stream over WebSocket, for when something in between buffers SSE.
//! Real router over TCP, a real WebSocket client (tokio-tungstenite), frames read by the
//! same SSE parser as the other tests: what holds for SSE must hold here.

mod common;

use std::time::Duration;

use common::*;
use sse_notify::events::Notification;

/// Same prelude as SSE (retry hint, start id, `ready`), then each user's events only.
#[tokio::test]
async fn websocket_streams_carry_the_same_frames_and_only_their_users_events() {
    let server = start_server(test_config()).await;
    server
        .service
        .send_notification("someone", note("moves the head"))
        .await
        .unwrap();
    let mut alice = server.connect_ws("ws-alice", "").await;
    let mut bob = server.connect_ws("ws-bob", "").await;
    let ready = alice.next_any().await.unwrap();
    assert_eq!(ready.event, "ready");
    assert!(!ready.id.is_empty(), "the start id came before ready");
    assert!(data(&ready)["heartbeatMs"].as_u64().unwrap() > 0);

    let id = server
        .service
        .send_notification("ws-alice", note("for alice"))
        .await
        .unwrap();
    server
        .service
        .send_notification("ws-bob", note("for bob"))
        .await
        .unwrap();
    let event = alice.next().await;
    assert_eq!(event.event, "notification");
    assert_eq!(event.id, id.to_string());
    assert_eq!(data(&event)["title"], "for alice");
    assert_eq!(data(&bob.next().await)["title"], "for bob");
    assert!(alice.nothing_within(Duration::from_millis(200)).await);
}

/// A client moves SSE → WebSocket → SSE, resuming by last id each time, while events are
/// published in between: each arrives exactly once.
#[tokio::test]
async fn switching_transports_by_last_id_loses_and_repeats_nothing() {
    let server = start_server(test_config()).await;
    let user = "switcher";
    let mut sse = server.connect(user, "", None).await;
    let first = server.service.send_notification(user, note("1")).await.unwrap();
    assert_eq!(sse.next().await.id, first.to_string());
    drop(sse);
    server.wait_for_clients(user, 0).await;

    let mut missed = Vec::new();
    for title in ["2", "3"] {
        missed.push(server.service.send_notification(user, note(title)).await.unwrap());
    }
    let mut ws = server.connect_ws(user, &format!("?lastEventId={first}")).await;
    for id in &missed {
        assert_eq!(ws.next().await.id, id.to_string(), "replayed over WebSocket");
    }
    let live = server.service.send_notification(user, note("4")).await.unwrap();
    let last_seen = ws.next().await;
    assert_eq!(last_seen.id, live.to_string());
    drop(ws);
    server.wait_for_clients(user, 0).await;

    let away = server.service.send_notification(user, note("5")).await.unwrap();
    let mut sse = server.connect(user, "", Some(&last_seen.id)).await;
    assert_eq!(sse.next().await.id, away.to_string(), "back on SSE");
    assert!(
        sse.nothing_within(Duration::from_millis(200)).await,
        "a duplicate"
    );
}

/// The WebSocket answers refusals as the stream does: 401 without a session, 400 naming the
/// field for a bad filter or resume point, 400 for a plain `GET` that is no upgrade.
#[tokio::test]
async fn websocket_refuses_what_the_stream_refuses() {
    let server = start_server(test_config()).await;
    let (status, body) = server.try_connect_ws("", None).await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["field"], "token");
    let token = server.token("p");
    for (query, field) in [
        ("?events=ok,Not%20Ok", "events"),
        ("?lastEventId=abc", "lastEventId"),
        ("?resumeAgoMs=3600000", "resumeAgoMs"),
    ] {
        let (status, body) = server.try_connect_ws(query, Some(&token)).await.err().unwrap();
        assert_eq!((status, body["field"].as_str()), (400, Some(field)), "{query}");
    }
    let plain = server
        .http
        .get(server.url("/api/ws"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 400);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["field"], "upgrade");
}

/// WebSocket streams share the hub with SSE: the `events=` filter applies, and they count
/// toward the same per-user limit (a sixth connection replaces the oldest, whatever its
/// transport).
#[tokio::test]
async fn websocket_streams_share_the_filter_and_the_per_user_limit() {
    let server = start_server(test_config()).await;
    let user = "mixed";
    let mut oldest = server.connect_ws(user, "?events=reel_ready").await;
    server.wait_for_clients(user, 1).await;
    server
        .service
        .send_notification(user, note("filtered out"))
        .await
        .unwrap();
    server
        .service
        .send_reel_ready(
            user,
            sse_notify::events::ReelReady {
                reel_id: "r1".into(),
                playback_url: "https://cdn.example/r1.m3u8".into(),
                thumbnail_url: None,
                duration: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(oldest.next().await.event, "reel_ready", "the filter applies");
    for n in 2..=5 {
        let _sse = std::mem::ManuallyDrop::new(server.connect(user, "", None).await);
        server.wait_for_clients(user, n).await;
    }
    let _newest = server.connect(user, "", None).await;
    let seen = oldest.until_end().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].event, "connection_replaced");
    assert_eq!(server.service.client_count_for_user(user), 5);
}

/// A WebSocket client that never reads is cut off when its queue fills, as on SSE.
#[tokio::test]
async fn a_websocket_client_that_never_reads_is_disconnected() {
    let server = start_server(test_config().queue_capacity(16)).await;
    let ws = server.connect_ws("ws-slow", "").await;
    server.wait_for_clients("ws-slow", 1).await;
    let big = "x".repeat(1900);
    for n in 0..50_000 {
        server
            .service
            .send_notification(
                "ws-slow",
                Notification {
                    message: big.clone(),
                    ..note(&n.to_string())
                },
            )
            .await
            .unwrap();
        if server.service.client_count_for_user("ws-slow") == 0 {
            break;
        }
    }
    assert_eq!(
        server.service.client_count_for_user("ws-slow"),
        0,
        "never cut off"
    );
    assert_eq!(server.service.stats().slow_client_disconnects, 1);
    drop(ws);
}

/// A page whose first (SSE) stream opened but whose events a proxy held back has no id to
/// resume from. It asks for `resumeAgoMs=` instead: what was published since comes again
/// (over either transport); without it, those events would be lost.
#[tokio::test]
async fn a_stream_without_an_id_resumes_from_some_time_ago() {
    let server = start_server(test_config()).await;
    let user = "held-back";
    server
        .service
        .send_notification(user, note("before"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The held-back stream: open, never read.
    let mut held = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut held, stream_request(&server, user).as_bytes())
        .await
        .unwrap();
    server.wait_for_clients(user, 1).await;
    let held_back = server
        .service
        .send_notification(user, note("held"))
        .await
        .unwrap();
    let held_at = std::time::Instant::now();
    // Back far enough for "held", not for "before" (400 ms older).
    let age = || format!("?resumeAgoMs={}", held_at.elapsed().as_millis() + 150);
    drop(held);
    server.wait_for_clients(user, 0).await;

    let mut plain = server.connect_ws(user, "").await;
    assert!(
        plain.nothing_within(Duration::from_millis(200)).await,
        "a fresh stream starts now"
    );
    drop(plain);
    server.wait_for_clients(user, 0).await;

    let mut resumed = server.connect_ws(user, &age()).await;
    let event = resumed.next().await;
    assert_eq!(event.id, held_back.to_string());
    assert_eq!(data(&event)["title"], "held", "and not the older one");
    assert!(resumed.nothing_within(Duration::from_millis(200)).await);

    let mut over_sse = server.connect(user, &age(), None).await;
    assert_eq!(over_sse.next().await.id, held_back.to_string());

    // Nothing published within the age: no replay, and no false resync.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut quiet = server.connect_ws(user, "?resumeAgoMs=100").await;
    assert!(quiet.nothing_within(Duration::from_millis(200)).await);
}

/// `GET /api/sse?probe=1` (what a client on WebSocket opens now and then to see whether SSE
/// gets through again): the `ready` event and nothing else, no place in the hub, and the
/// same session check as the stream.
#[tokio::test]
async fn a_transport_probe_sends_ready_and_holds_no_stream() {
    let server = start_server(test_config()).await;
    let response = server
        .http
        .get(server.url("/api/sse?probe=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let mut probe = server.connect("prober", "?probe=1", None).await;
    assert_eq!(
        probe.headers["content-type"], "text/event-stream",
        "an SSE response, so proxies treat it as the stream"
    );
    assert_eq!(probe.next_any().await.unwrap().event, "ready");
    assert_eq!(server.service.client_count_for_user("prober"), 0);
    server
        .service
        .send_notification("prober", note("not for probes"))
        .await
        .unwrap();
    assert!(probe.nothing_within(Duration::from_millis(300)).await);
}

/// Browsers apply no CORS to a WebSocket handshake: one from a page on another origin is
/// refused (403, JSON naming `origin`) before anything is read, whatever credentials it
/// carries; the server's own origin, a listed one, and a client without `Origin` (not a
/// browser) are judged by their credentials alone.
#[tokio::test]
async fn websocket_handshakes_from_foreign_origins_are_refused() {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
    let listed = "https://app.example";
    let server = start_server(test_config().allowed_origins(vec![listed.into()])).await;
    let cookie = format!("sse_session={}", server.token("ws-victim"));
    let own = format!("http://{}", server.addr);
    let handshake = |origin: Option<&str>| {
        let mut request = format!("ws://{}/api/ws?lastEventId=0", server.addr)
            .into_client_request()
            .unwrap();
        request.headers_mut().insert("cookie", cookie.parse().unwrap());
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    for origin in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        match handshake(Some(origin)).await {
            Err(Error::Http(response)) => {
                assert_eq!(response.status(), 403, "{origin}");
                let body: serde_json::Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
                assert_eq!(body["field"], "origin", "{origin}");
            }
            other => panic!("{origin}: {:?}", other.map(|(_, r)| r.status())),
        }
    }
    assert_eq!(server.service.client_count_for_user("ws-victim"), 0);
    for origin in [Some(own.as_str()), Some(listed), None] {
        let (_socket, response) = handshake(origin).await.unwrap();
        assert_eq!(response.status(), 101, "{origin:?}");
    }
}
