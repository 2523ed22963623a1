//! The server over real TCP with a real SSE client: delivery, isolation, filtering,
//! heartbeats, limits, replay, slow clients, bad input and shutdown.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sse_notify::{
    events::{
        Notification, NotificationKind, ReelReady, ReelUploadProgress, SystemAlert, SystemAlertKind,
        UploadStatus, UserUpdate, UserUpdateKind,
    },
    server::{SseConfig, TrustedProxies},
};

/// Every typed `send_*` reaches its user with the wire fields of the design, and never another user.
#[tokio::test]
async fn every_event_type_reaches_exactly_its_user() {
    let server = start_server(test_config()).await;
    let mut alice = server.connect("alice", "", None).await;
    let mut bob = server.connect("bob", "", None).await;
    let sse = &server.service;

    sse.send_notification(
        "alice",
        Notification {
            action_url: Some("/inbox".into()),
            kind: NotificationKind::Success,
            ..note("Hi")
        },
    )
    .await
    .unwrap();
    sse.send_reel_upload_progress(
        "alice",
        ReelUploadProgress {
            reel_id: "r1".into(),
            progress: 40,
            status: UploadStatus::Uploading,
            message: None,
        },
    )
    .await
    .unwrap();
    sse.send_reel_ready(
        "alice",
        ReelReady {
            reel_id: "r1".into(),
            playback_url: "https://cdn.example/r1.m3u8".into(),
            thumbnail_url: Some("/t/r1.jpg".into()),
            duration: Some(12.5),
        },
    )
    .await
    .unwrap();
    sse.send_user_update(
        "alice",
        UserUpdate {
            kind: UserUpdateKind::Settings,
            data: json!({"theme": "dark"}),
        },
    )
    .await
    .unwrap();
    sse.send_custom_event("alice", "order.shipped", json!({"orderId": 7}))
        .await
        .unwrap();

    let expected = [
        (
            "notification",
            json!({"title": "Hi", "type": "success", "actionUrl": "/inbox"}),
        ),
        (
            "reel_upload_progress",
            json!({"reelId": "r1", "progress": 40, "status": "uploading"}),
        ),
        (
            "reel_ready",
            json!({"reelId": "r1", "playbackUrl": "https://cdn.example/r1.m3u8", "thumbnailUrl": "/t/r1.jpg", "duration": 12.5}),
        ),
        (
            "user_update",
            json!({"type": "settings", "data": {"theme": "dark"}}),
        ),
        ("order.shipped", json!({"orderId": 7})),
    ];
    let mut last_id = 0u64;
    for (name, fields) in expected {
        let event = alice.next().await;
        assert_eq!(event.event, name);
        let id: u64 = event.id.parse().expect("numeric id");
        assert!(id > last_id, "ids must increase");
        last_id = id;
        let got = data(&event);
        for (k, v) in fields.as_object().unwrap() {
            assert_eq!(&got[k], v, "{name}.{k}");
        }
        assert!(got["timestamp"].is_u64(), "server adds timestamp");
    }
    assert!(
        bob.nothing_within(Duration::from_millis(300)).await,
        "bob saw alice's events"
    );

    sse.send_system_alert(SystemAlert {
        message: "maintenance".into(),
        kind: SystemAlertKind::Maintenance,
        duration: Some(5000),
    })
    .await
    .unwrap();
    for client in [&mut alice, &mut bob] {
        let event = client.next().await;
        assert_eq!(event.event, "system_alert");
        assert_eq!(data(&event)["type"], "maintenance");
    }
}

/// The SSE response carries the headers proxies and browsers need, and a retry hint.
#[tokio::test]
async fn stream_headers_and_retry_hint() {
    let server = start_server(test_config().retry(Duration::from_millis(1234))).await;
    let response = server
        .http
        .get(server.url("/api/sse"))
        .bearer_auth(server.token("h"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache, no-transform");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(
        headers.get("content-encoding").is_none(),
        "stream must not be compressed"
    );
    // The retry hint is the first thing on the wire, before any event.
    let mut response = response;
    let first = response.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"retry: 1234\n\n"), "{first:?}");
}

/// `events=` passes only the named events; heartbeats always pass.
#[tokio::test]
async fn events_filter_passes_only_named_events_and_heartbeats() {
    let server = start_server(test_config().heartbeat_interval(Duration::from_millis(200))).await;
    let mut client = server.connect("f", "?events=reel_ready,custom.one", None).await;
    let sse = &server.service;
    sse.send_notification("f", note("filtered out")).await.unwrap();
    sse.send_custom_event("f", "custom.one", json!({"n": 1}))
        .await
        .unwrap();
    sse.send_custom_event("f", "custom.two", json!({"n": 2}))
        .await
        .unwrap();
    sse.send_reel_ready(
        "f",
        ReelReady {
            reel_id: "r".into(),
            playback_url: "/p".into(),
            thumbnail_url: None,
            duration: None,
        },
    )
    .await
    .unwrap();
    let mut names = Vec::new();
    let mut heartbeats = 0;
    assert_eq!(
        client.next_any().await.unwrap().event,
        "ready",
        "control events pass the filter"
    );
    while names.len() < 2 || heartbeats == 0 {
        let event = client.next_any().await.unwrap();
        if event.event == "heartbeat" {
            heartbeats += 1;
        } else {
            names.push(event.event);
        }
    }
    assert_eq!(names, ["custom.one", "reel_ready"]);
}

/// Right after the replay comes `ready`, with the heartbeat interval: a client that sees
/// the response open but not this event soon after knows the stream is held back.
#[tokio::test]
async fn every_stream_opens_with_ready_after_its_replay() {
    let server = start_server(test_config().heartbeat_interval(Duration::from_millis(1_234))).await;
    let seen = server.resume_point("rdy").await;
    server
        .service
        .send_notification("rdy", note("missed"))
        .await
        .unwrap();
    let mut client = server.connect("rdy", "", Some(&seen)).await;
    let missed = client.next_any().await.unwrap();
    assert_eq!(data(&missed)["title"], "missed");
    let ready = client.next_any().await.unwrap();
    assert_eq!(ready.event, "ready");
    assert_eq!(data(&ready)["heartbeatMs"], 1_234);
    assert_eq!(ready.id, missed.id, "ready carries no id of its own");
}

/// Heartbeats come every interval (never early) and carry a timestamp.
#[tokio::test]
async fn heartbeats_arrive_every_interval() {
    let interval = Duration::from_millis(300);
    let server = start_server(test_config().heartbeat_interval(interval)).await;
    let mut client = server.connect("hb", "", None).await;
    assert_eq!(client.next_any().await.unwrap().event, "ready");
    let mut arrivals = Vec::new();
    while arrivals.len() < 4 {
        let event = client.next_any().await.unwrap();
        assert_eq!(event.event, "heartbeat");
        assert!(data(&event)["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
        arrivals.push(tokio::time::Instant::now());
    }
    for pair in arrivals.windows(2) {
        // Scheduling may delay a tick, never bring it forward much.
        assert!(
            pair[1] - pair[0] >= interval / 2,
            "heartbeats too close: {:?}",
            pair[1] - pair[0]
        );
    }
}

/// Heartbeats carry no `id:` line, so they never move a client's resume point: read off the
/// raw wire while events are published between the heartbeats (a heartbeat stamped with the
/// latest event id would show an `id:` here).
#[tokio::test]
async fn heartbeat_frames_carry_no_id() {
    let interval = Duration::from_millis(200);
    let server = start_server(test_config().heartbeat_interval(interval)).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (head, mut body) = raw_exchange(
        &mut socket,
        &stream_request(&server, "hb-raw"),
        Duration::from_millis(100),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    for n in 0..4 {
        server
            .service
            .send_notification("hb-raw", note(&format!("between {n}")))
            .await
            .unwrap();
        body.push_str(&read_for(&mut socket, interval + interval / 2).await);
    }
    let frames: Vec<&str> = body.split("\n\n").collect();
    let heartbeats: Vec<&&str> = frames.iter().filter(|f| f.contains("event: heartbeat")).collect();
    let events = frames
        .iter()
        .filter(|f| f.contains("event: notification"))
        .count();
    assert_eq!(events, 4, "{body:?}");
    assert!(heartbeats.len() >= 3, "{body:?}");
    for frame in heartbeats {
        assert!(!frame.contains("id:"), "a heartbeat with an id: {frame:?}");
    }
}

/// One connection more than the limit: the oldest gets `connection_replaced` and ends.
#[tokio::test]
async fn sixth_connection_replaces_the_oldest() {
    let server = start_server(test_config()).await;
    let mut oldest = server.connect("tabs", "", None).await;
    server.wait_for_clients("tabs", 1).await;
    let mut others = Vec::new();
    for n in 2..=5 {
        others.push(server.connect("tabs", "", None).await);
        server.wait_for_clients("tabs", n).await;
    }
    let _newest = server.connect("tabs", "", None).await;
    let seen = oldest.until_end().await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].event, "connection_replaced");
    assert_eq!(server.service.client_count_for_user("tabs"), 5);
    // The other four still receive events.
    server
        .service
        .send_notification("tabs", note("still here"))
        .await
        .unwrap();
    for client in &mut others {
        assert_eq!(data(&client.next().await)["title"], "still here");
    }
}

/// Events published from another thread while a client resumes with `Last-Event-ID` are
/// neither lost nor duplicated between the replay and the live stream. The runtime is
/// multi-threaded and the publisher runs on its own OS thread without pause, and the round
/// is repeated, so publishes land inside the window between registering the connection and
/// reading the replay (dropping the skip of replayed ids makes this fail with duplicates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gap_or_duplicate_between_replay_and_live() {
    // Room for every event published while the client catches up.
    let server = start_server(test_config().queue_capacity(100_000)).await;
    for round in 0..25 {
        let user = format!("race-{round}");
        let first_id = server
            .service
            .send_notification(&user, note("start"))
            .await
            .unwrap();
        let publishing = Publishing::start(server.service.clone(), &user);
        let mut client = server.connect(&user, "", Some(&first_id.to_string())).await;
        let ids = publishing.stop_after(20).await;
        for (n, id) in ids.iter().enumerate() {
            let event = client.next().await;
            assert_eq!(
                event.id,
                id.to_string(),
                "round {round}, event {n}: gap or duplicate"
            );
        }
        assert!(
            client.nothing_within(Duration::from_millis(50)).await,
            "round {round}: a duplicate after the last event"
        );
    }
}

/// A client that never reads is cut off when its queue fills, and the server stays healthy.
#[tokio::test]
async fn a_client_that_never_reads_is_disconnected() {
    use tokio::io::AsyncWriteExt;
    let capacity = 16;
    let server = start_server(test_config().queue_capacity(capacity)).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = stream_request(&server, "slow");
    socket.write_all(request.as_bytes()).await.unwrap();
    server.wait_for_clients("slow", 1).await;
    let big = "x".repeat(1900);
    // Enough to fill kernel socket buffers and hyper's write buffer many times over.
    for n in 0..50_000 {
        server
            .service
            .send_notification(
                "slow",
                Notification {
                    message: big.clone(),
                    ..note(&n.to_string())
                },
            )
            .await
            .unwrap();
        if server.service.client_count_for_user("slow") == 0 {
            break;
        }
    }
    assert_eq!(
        server.service.client_count_for_user("slow"),
        0,
        "slow client never cut off"
    );
    assert_eq!(server.service.stats().slow_client_disconnects, 1);
    let (status, _) = server.get_json("/healthz").await;
    assert_eq!(status, 200);
    drop(socket);
}

/// Bad tokens get 401 with a JSON error; a valid one of another user sees only their events.
#[tokio::test]
async fn bad_tokens_are_refused() {
    let server = start_server(test_config()).await;
    let other_secret = sse_notify::server::Auth::new(Some(&"some-other-secret-123456".into()));
    let forged = other_secret
        .issue("alice", None, Duration::from_secs(60))
        .unwrap();
    let expired = {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let claims = json!({"sub": "alice", "exp": 1_000});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    for (what, auth) in [
        ("missing", None),
        ("forged", Some(forged)),
        ("expired", Some(expired)),
        ("garbage", Some("not.a.jwt".to_string())),
    ] {
        let mut request = server.http.get(server.url("/api/sse"));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{what}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("token"),
            "{what}: {body}"
        );
    }
    // Identity comes only from the token: a user_id query parameter changes nothing. Alice
    // receives the event first, so mallory's silence is not just a slow server.
    let mut mallory = server.connect("mallory", "?user_id=alice", None).await;
    let mut alice = server.connect("alice", "", None).await;
    server
        .service
        .send_notification("alice", note("private"))
        .await
        .unwrap();
    assert_eq!(data(&alice.next().await)["title"], "private");
    assert!(mallory.nothing_within(Duration::from_millis(300)).await);
}

/// The session endpoint sets an HttpOnly cookie that opens the stream; `?token=` works too.
#[tokio::test]
async fn session_cookie_and_query_token_authenticate() {
    let server = start_server(test_config()).await;
    let response = server
        .http
        .post(server.url("/api/session"))
        .json(&json!({"user_id": "carol"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("sse_session=") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax")
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let response = server
        .http
        .get(server.url("/api/sse"))
        .header("cookie", pair)
        .send()
        .await
        .unwrap();
    let mut by_cookie = SseClient::new(response);
    let response = server
        .http
        .get(server.url(&format!("/api/sse?token={}", server.token("carol"))))
        .send()
        .await
        .unwrap();
    let mut by_query = SseClient::new(response);
    server
        .service
        .send_notification("carol", note("both"))
        .await
        .unwrap();
    assert_eq!(data(&by_cookie.next().await)["title"], "both");
    assert_eq!(data(&by_query.next().await)["title"], "both");

    let (status, body) = {
        let r = server
            .http
            .post(server.url("/api/session"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
    };
    assert_eq!(status, 400);
    assert_eq!(body["field"], "user_id");
}

/// The publish API: single object and array, 202 with ids, and each kind of bad input a
/// clear JSON error naming the field; the server is healthy afterwards.
#[tokio::test]
async fn publish_api_accepts_good_input_and_names_bad_fields() {
    let server = start_server(
        test_config()
            .max_body_bytes(64 * 1024)
            .max_payload_bytes(8 * 1024),
    )
    .await;
    let mut dave = server.connect("dave", "", None).await;

    let (status, body) = server
        .publish(
            json!({"user_id": "dave", "event": "notification", "data": {"title": "one", "message": "m"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let mut ids: Vec<String> = serde_json::from_value(body["ids"].clone()).unwrap();
    assert_eq!(ids.len(), 1);
    let (status, body) = server
        .publish(json!([
            {"user_id": "dave", "event": "notification", "data": {"title": "two", "message": "m"}},
            {"broadcast": true, "event": "system_alert", "data": {"message": "all"}},
        ]))
        .await;
    assert_eq!(status, 202, "{body}");
    let more: Vec<String> = serde_json::from_value(body["ids"].clone()).unwrap();
    assert_eq!(more.len(), 2);
    ids.extend(more);
    // Each returned id is the id the event arrives with.
    for (id, (field, value)) in ids
        .iter()
        .zip([("title", "one"), ("title", "two"), ("message", "all")])
    {
        let event = dave.next().await;
        assert_eq!(data(&event)[field], value);
        assert_eq!(&event.id, id);
    }

    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (
            json!({"event": "notification", "data": {"title": "t"}}),
            400,
            "user_id",
        ),
        (
            json!({"user_id": "dave", "event": "Bad Name", "data": {}}),
            400,
            "event",
        ),
        (
            json!({"user_id": "dave", "event": "evil\nevent: x", "data": {}}),
            400,
            "event",
        ),
        (
            json!({"user_id": "dave", "event": "heartbeat", "data": {"timestamp": 1}}),
            400,
            "event",
        ),
        (
            json!({"user_id": "dave", "event": "resync", "data": {}}),
            400,
            "event",
        ),
        (
            json!({"user_id": "dave", "event": "notification", "data": {"message": "no title"}}),
            400,
            "data.title",
        ),
        (
            json!({"user_id": "dave", "event": "notification", "data": {"title": "t", "message": "m", "actionUrl": "javascript:alert(1)"}}),
            400,
            "data.actionUrl",
        ),
        (
            json!({"user_id": "dave", "event": "reel_upload_progress", "data": {"reelId": "r", "progress": 101, "status": "uploading"}}),
            400,
            "data.progress",
        ),
        (
            json!({"user_id": "dave", "event": "custom.x", "data": [1, 2]}),
            400,
            "data",
        ),
        (
            json!({"user_id": "dave", "event": "custom.x", "data": {"blob": "y".repeat(9000)}}),
            400,
            "data",
        ),
        (
            json!([{"user_id": "dave", "event": "notification", "data": {"title": "ok", "message": "m"}}, {"user_id": "dave", "event": "notification", "data": {"title": ""}}]),
            400,
            "[1].data.message",
        ),
        (
            json!({"user_id": "dave", "event": "notification", "data": {}, "extra": 1}),
            400,
            "extra",
        ),
    ];
    for (body, want_status, want_field) in cases {
        let (status, json) = server.publish(body.clone()).await;
        assert_eq!(status, want_status, "{body} -> {json}");
        assert_eq!(json["field"], want_field, "{body} -> {json}");
        assert!(json["error"].is_string());
    }
    // Malformed JSON and oversized bodies.
    let (status, json) = server.publish_raw("{not json".into(), Some(PUBLISH_KEY)).await;
    assert_eq!((status, json["field"].as_str()), (400, Some("body")));
    let (status, json) = server
        .publish_raw("x".repeat(100 * 1024), Some(PUBLISH_KEY))
        .await;
    assert_eq!((status, json["field"].as_str()), (413, Some("body")));
    // Keys.
    let ok = json!({"user_id": "dave", "event": "notification", "data": {"title": "t", "message": "m"}})
        .to_string();
    assert_eq!(server.publish_raw(ok.clone(), None).await.0, 401);
    assert_eq!(server.publish_raw(ok, Some("wrong-key")).await.0, 403);

    // None of the refused events reached dave, and the server is healthy.
    assert!(dave.nothing_within(Duration::from_millis(300)).await);
    assert_eq!(server.get_json("/healthz").await.0, 200);
}

/// A newline inside a string is escaped by JSON: one event, no forged field.
#[tokio::test]
async fn newlines_in_data_cannot_forge_fields_or_events() {
    let server = start_server(test_config()).await;
    let mut client = server.connect("n", "", None).await;
    let evil = "line1\n\nevent: system_alert\ndata: {\"message\":\"forged\"}\r\nid: 1";
    let (status, _) = server
        .publish(
            json!({"user_id": "n", "event": "notification", "data": {"title": evil, "message": "\r\n\r\n"}}),
        )
        .await;
    assert_eq!(status, 202);
    let event = client.next().await;
    assert_eq!(event.event, "notification");
    assert_eq!(data(&event)["title"], evil);
    assert!(
        client.nothing_within(Duration::from_millis(300)).await,
        "a second event was forged"
    );
}

/// The publish API is off without a key.
#[tokio::test]
async fn publish_api_is_disabled_without_a_key() {
    let server = start_server(SseConfig {
        publish_key: None,
        ..test_config()
    })
    .await;
    let (status, json) = server
        .publish(json!({"user_id": "a", "event": "x", "data": {}}))
        .await;
    assert_eq!(status, 403);
    assert!(json["error"].as_str().unwrap().contains("SSE_PUBLISH_KEY"));
}

/// A bad `Last-Event-ID` or `events=` is a 400 naming the field.
#[tokio::test]
async fn bad_stream_parameters_are_refused() {
    let server = start_server(test_config()).await;
    let token = server.token("p");
    for (query, header, field) in [
        ("?lastEventId=abc", None, "lastEventId"),
        ("", Some("12ab"), "Last-Event-ID"),
        ("?events=ok,Not%20Ok", None, "events"),
    ] {
        let mut request = server
            .http
            .get(server.url(&format!("/api/sse{query}")))
            .bearer_auth(&token);
        if let Some(h) = header {
            request = request.header("last-event-id", h);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["field"], field);
    }
}

/// New connections past the per-user rate get 429 with `Retry-After`.
#[tokio::test]
async fn connection_rate_limit_answers_429() {
    let server = start_server(test_config().connect_rate_per_user(3)).await;
    let token = server.token("eager");
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for _ in 0..4 {
        let response = server
            .http
            .get(server.url("/api/sse"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        open.push(response);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
}

/// Stats and Prometheus metrics count what happened.
#[tokio::test]
async fn stats_and_metrics_report_activity() {
    let server = start_server(test_config()).await;
    let mut client = server.connect("s", "", None).await;
    server.service.send_notification("s", note("1")).await.unwrap();
    client.next().await;
    let (status, stats) = server.get_json("/api/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["clients"], 1);
    assert_eq!(stats["users"], 1);
    assert_eq!(stats["eventsPublished"], 1);
    assert_eq!(stats["eventsDelivered"], 1);
    assert_eq!(stats["broker"], "memory");
    assert_eq!(stats["brokerHealth"], "healthy");
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .bearer_auth(PUBLISH_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sse_events_published_total{event=\"notification\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("sse_connections"));
    let (status, health) = server.get_json("/healthz").await;
    assert_eq!((status, health["brokerHealth"].as_str()), (200, Some("healthy")));
}

/// Only origins in the allow-list get CORS headers.
#[tokio::test]
async fn cors_allows_only_listed_origins() {
    let server = start_server(test_config().allowed_origins(vec!["https://app.example".into()])).await;
    let response = server
        .http
        .get(server.url("/api/stats"))
        .bearer_auth(PUBLISH_KEY)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(response.headers()["access-control-allow-credentials"], "true");
    let response = server
        .http
        .get(server.url("/api/stats"))
        .bearer_auth(PUBLISH_KEY)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("access-control-allow-origin").is_none());
}

/// Shutdown ends open streams, the stats stream included (so clients reconnect elsewhere and
/// a graceful shutdown does not hang on them), and refuses new streams and new events.
#[tokio::test]
async fn shutdown_ends_streams_and_refuses_new_work() {
    let server = start_server(test_config()).await;
    let mut client = server.connect("z", "", None).await;
    server.wait_for_clients("z", 1).await;
    let stats = server
        .http
        .get(server.url("/api/stats/stream"))
        .bearer_auth(PUBLISH_KEY)
        .send()
        .await
        .unwrap();
    let mut stats = SseClient::new(stats);
    assert_eq!(stats.next().await.event, "stats");
    server.service.shutdown().await;
    assert!(client.until_end().await.is_empty());
    // The stats stream ends too, so a graceful shutdown does not wait on it.
    let rest = stats.until_end().await;
    assert!(rest.iter().all(|e| e.event == "stats"), "{rest:?}");
    let response = server
        .http
        .get(server.url("/api/sse"))
        .bearer_auth(server.token("z"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(server.service.send_notification("z", note("late")).await.is_err());
    assert_eq!(server.get_json("/healthz").await.0, 503);
}

/// The lean stream path: chunked SSE with the design's headers; an oversized head gets 431
/// with a JSON body naming the field; a missing token gets the router's 401; and a client
/// that hangs up is unregistered at once.
#[tokio::test]
async fn lean_stream_path_frames_errors_and_hang_ups() {
    let server = start_server(
        test_config()
            .heartbeat_interval(Duration::from_secs(3600))
            .cleanup_interval(Duration::from_secs(3600)),
    )
    .await;

    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = stream_request(&server, "lean");
    let (head, body) = raw_exchange(&mut socket, &request, Duration::from_millis(500)).await;
    assert!(head.starts_with("http/1.1 200 ok"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-cache, no-transform"), "{head}");
    assert!(
        body.contains("retry: "),
        "first chunk carries the retry hint: {body:?}"
    );
    server.wait_for_clients("lean", 1).await;
    server
        .service
        .send_notification("lean", note("over the lean path"))
        .await
        .unwrap();
    let body = read_for(&mut socket, Duration::from_millis(500)).await;
    assert!(body.contains("over the lean path"), "{body:?}");
    // No heartbeat or sweep runs within this test: only the hang-up unregisters it.
    drop(socket);
    server
        .wait_for_clients_within("lean", 0, Duration::from_secs(2))
        .await;

    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let huge = format!("GET /api/sse HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let (head, body) = raw_exchange(&mut socket, &huge, WAIT).await;
    assert!(head.starts_with("http/1.1 431"), "{head}");
    assert!(body.contains(r#""field":"request""#), "{body}");

    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (head, body) = raw_exchange(&mut socket, "GET /api/sse HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["field"], "token");
}

/// A stream requested on a keep-alive connection that already served another request is
/// served by axum/hyper instead, with the same events.
#[tokio::test]
async fn stream_on_a_reused_keep_alive_connection_still_works() {
    let server = start_server(test_config()).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (head, _) = raw_exchange(
        &mut socket,
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(300),
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let request = stream_request(&server, "reuser");
    let (head, _) = raw_exchange(&mut socket, &request, Duration::from_millis(500)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("connection: close"),
        "hyper keeps the connection: {head}"
    );
    server.wait_for_clients("reuser", 1).await;
    server
        .service
        .send_notification("reuser", note("through hyper"))
        .await
        .unwrap();
    let body = read_for(&mut socket, Duration::from_millis(500)).await;
    assert!(body.contains("through hyper"), "{body:?}");
}

/// Every stream starts with an id-only frame, so a tab that drops before its first event
/// resumes from where it started: here a second tab (not the user's first connection, so
/// no offline replay) drops, an event is sent, and the resume still delivers it.
#[tokio::test]
async fn a_stream_that_drops_before_its_first_event_resumes_without_loss() {
    let server = start_server(test_config()).await;
    server
        .service
        .send_notification("someone-else", note("moves the head"))
        .await
        .unwrap();
    let _first_tab = server.connect("tabs", "", None).await;
    server.wait_for_clients("tabs", 1).await;

    let mut second_tab = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = stream_request(&server, "tabs");
    let (_, body) = raw_exchange(&mut second_tab, &request, Duration::from_millis(500)).await;
    let start_id = body
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap_or_else(|| panic!("no id-only frame in {body:?}"))
        .to_string();
    let id_frame = body
        .split("\n\n")
        .find(|frame| frame.contains("id: "))
        .unwrap_or_default();
    assert!(
        !id_frame.contains("data:"),
        "the id frame fires no event: {body:?}"
    );
    drop(second_tab);
    server.wait_for_clients("tabs", 1).await;

    server
        .service
        .send_notification("tabs", note("sent while away"))
        .await
        .unwrap();
    let mut resumed = server.connect("tabs", "", Some(&start_id)).await;
    let event = resumed.next().await;
    assert_eq!(event.event, "notification");
    assert!(event.data.contains("sent while away"), "{}", event.data);
}

/// A second server on a port that is taken fails to start instead of sharing the port.
#[tokio::test]
async fn a_taken_port_is_refused() {
    let server = start_server(test_config()).await;
    let again = sse_notify::server::SseListener::bind(server.addr).await;
    assert!(again.is_err(), "bound twice to {}", server.addr);
}

/// New connections past the per-IP rate get 429 with a `Retry-After` in whole seconds and a
/// JSON error; other users from the same address are refused too (the key is the address).
#[tokio::test]
async fn connection_rate_limit_per_ip_answers_429_with_retry_after() {
    let server = start_server(test_config().connect_rate_per_ip(2)).await;
    let mut open = Vec::new();
    for user in ["ip-a", "ip-b"] {
        open.push(server.connect(user, "", None).await);
    }
    let response = server
        .http
        .get(server.url("/api/sse"))
        .bearer_auth(server.token("ip-c"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("this address"), "{body}");
}

/// `SSE_TRUSTED_PROXIES`: behind a trusted proxy the per-address limit counts the client
/// it forwards for, each on its own; from any other peer the header changes nothing.
#[tokio::test]
async fn behind_a_trusted_proxy_limits_count_the_forwarded_address() {
    async fn open(server: &TestServer, user: &str, client: &str) -> reqwest::Response {
        server
            .http
            .get(server.url("/api/sse"))
            .bearer_auth(server.token(user))
            .header("x-forwarded-for", client)
            .send()
            .await
            .unwrap()
    }
    let trusted = TrustedProxies::parse("127.0.0.1/32, ::1").unwrap();
    let proxied = start_server(test_config().connect_rate_per_ip(2).trusted_proxies(trusted)).await;
    let mut held = Vec::new();
    for user in ["p-a", "p-b"] {
        let response = open(&proxied, user, "203.0.113.1").await;
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    assert_eq!(open(&proxied, "p-c", "203.0.113.1").await.status(), 429);
    assert_eq!(
        open(&proxied, "p-c", "6.6.6.6, 203.0.113.2").await.status(),
        200,
        "another client behind the proxy, whatever it claimed itself"
    );

    let direct = start_server(test_config().connect_rate_per_ip(2)).await;
    for (user, client) in [("d-a", "203.0.113.1"), ("d-b", "203.0.113.2")] {
        let response = open(&direct, user, client).await;
        assert_eq!(response.status(), 200);
        held.push(response);
    }
    assert_eq!(
        open(&direct, "d-c", "203.0.113.3").await.status(),
        429,
        "a header from a peer that is not trusted is ignored"
    );
}

/// `SSE_MAX_BATCH`: a batch of the maximum is taken, one more is refused whole with 413.
#[tokio::test]
async fn publish_batches_are_capped() {
    let server = start_server(test_config().max_batch(3)).await;
    let item = json!({"user_id": "b", "event": "notification", "data": {"title": "t", "message": "m"}});
    let (status, body) = server.publish(json!([item, item, item])).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = server.publish(json!([item, item, item, item])).await;
    assert_eq!((status, body["field"].as_str()), (413, Some("body")), "{body}");
    assert_eq!(
        server.service.stats().events_published,
        3,
        "the refused batch published nothing"
    );
}

/// Offline delivery honours each type's age limit, set from the environment: `system_alert=0`
/// turns it off, a `reel_ready` older than its limit stays away, a notification within its
/// limit arrives.
#[tokio::test]
async fn offline_retention_ages_apply_end_to_end() {
    let vars = [(
        "SSE_OFFLINE_RETENTION_MS",
        "system_alert=0,reel_ready=300,notification=3600000",
    )];
    let from_env = SseConfig::from_vars(vars).unwrap();
    let server = start_server(
        test_config()
            .offline_retention(from_env.offline_retention)
            .event_retention(Duration::from_secs(60)),
    )
    .await;
    let sse = &server.service;
    sse.send_notification("away", note("kept")).await.unwrap();
    sse.send_system_alert(SystemAlert {
        message: "not kept offline".into(),
        kind: SystemAlertKind::Info,
        duration: None,
    })
    .await
    .unwrap();
    sse.send_reel_ready(
        "away",
        ReelReady {
            reel_id: "r".into(),
            playback_url: "/r".into(),
            thumbnail_url: None,
            duration: None,
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = server.connect("away", "", None).await;
    let event = client.next().await;
    assert_eq!(
        (event.event.as_str(), data(&event)["title"].as_str()),
        ("notification", Some("kept"))
    );
    assert!(
        client.nothing_within(Duration::from_millis(300)).await,
        "an expired or switched-off type was delivered offline"
    );
}

/// The cleanup sweep forgets events past retention: a resume from before them gets `resync`
/// and not the forgotten event (without the sweep, the in-process history would replay it).
#[tokio::test]
async fn the_cleanup_sweep_forgets_expired_history() {
    let server = start_server(
        test_config()
            .event_retention(Duration::from_millis(200))
            .offline_retention(Vec::new())
            .cleanup_interval(Duration::from_millis(100)),
    )
    .await;
    let seen = server.resume_point("sweep").await;
    server
        .service
        .send_notification("sweep", note("expires"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut client = server.connect("sweep", "", Some(&seen)).await;
    assert_eq!(client.next().await.event, "resync");
    assert!(
        client.nothing_within(Duration::from_millis(300)).await,
        "an expired event was replayed"
    );
}

/// CORS is same-origin by default: no `Access-Control-Allow-Origin` for any origin, on the
/// stream and the publish API.
#[tokio::test]
async fn cors_is_same_origin_by_default() {
    let server = start_server(test_config()).await;
    let stream = server
        .http
        .get(server.url("/api/sse"))
        .bearer_auth(server.token("c"))
        .header("origin", "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers().get("access-control-allow-origin").is_none());
    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, server.url("/api/events"))
        .header("origin", "https://elsewhere.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(preflight.headers().get("access-control-allow-origin").is_none());
}

/// With an allow-list, a preflight from a listed origin is answered on both the stream and
/// the publish route (methods and the headers clients send), and the stream itself, served
/// on the lean path, carries the CORS headers; an unlisted origin gets none.
#[tokio::test]
async fn cors_preflight_and_stream_for_listed_origins() {
    let origin = "https://app.example";
    let server = start_server(test_config().allowed_origins(vec![origin.into()])).await;
    for (path, method, header) in [
        ("/api/sse", "GET", "last-event-id"),
        ("/api/events", "POST", "authorization,content-type"),
    ] {
        let preflight = server
            .http
            .request(reqwest::Method::OPTIONS, server.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", header)
            .send()
            .await
            .unwrap();
        assert!(preflight.status().is_success(), "{path}: {}", preflight.status());
        let h = preflight.headers();
        assert_eq!(h["access-control-allow-origin"], origin, "{path}");
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains(method),
            "{path}"
        );
        for name in header.split(',') {
            assert!(
                h["access-control-allow-headers"].to_str().unwrap().contains(name),
                "{path}: {name}"
            );
        }
    }
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /api/sse HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token("cors")
    );
    let (head, _) = raw_exchange(&mut socket, &request, Duration::from_millis(300)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains(&format!("access-control-allow-origin: {origin}")),
        "{head}"
    );
    assert!(head.contains("access-control-allow-credentials: true"), "{head}");
    // A page on that origin may read the identity tag of its `HEAD` probe.
    let probe = server
        .http
        .head(server.url("/api/sse"))
        .header("origin", origin)
        .bearer_auth(server.token("cors"))
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 204);
    let exposed = probe.headers()["access-control-expose-headers"].to_str().unwrap();
    assert!(
        exposed.contains(sse_notify::api::IDENTITY_TAG_HEADER),
        "{exposed}"
    );
}

/// A page on another site cannot use the user's cookie for a stream: a cookie-authenticated
/// `/api/sse` from a foreign `Origin` is refused (403 naming `origin`) and never counts
/// against the user's connections, so it cannot push their real tabs out. The server's own
/// origin, a listed one, a request without `Origin`, and an explicit token pass.
#[tokio::test]
async fn cookie_streams_from_a_foreign_origin_are_refused() {
    let listed = "https://app.example";
    let server = start_server(test_config().allowed_origins(vec![listed.into()])).await;
    let cookie = format!("sse_session={}", server.token("victim"));
    let own = format!("http://{}", server.addr);
    let open = |origin: Option<&str>, token: bool| {
        let mut request = server.http.get(server.url("/api/sse")).header("cookie", &cookie);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if token {
            request = request.bearer_auth(server.token("victim"));
        }
        request.send()
    };
    for _ in 0..6 {
        let refused = open(Some("https://evil.example"), false).await.unwrap();
        assert_eq!(refused.status(), 403);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["field"], "origin", "{body}");
    }
    assert_eq!(server.service.client_count_for_user("victim"), 0);
    let mut streams = Vec::new();
    for (origin, token) in [(Some(own.as_str()), false), (Some(listed), false), (None, false)] {
        let response = open(origin, token).await.unwrap();
        assert_eq!(response.status(), 200, "{origin:?}");
        streams.push(SseClient::new(response));
    }
    // A page elsewhere that holds a token for the user (handed to it on purpose) may stream.
    let response = open(Some("https://evil.example"), true).await.unwrap();
    assert_eq!(response.status(), 200);
    streams.push(SseClient::new(response));
    server.wait_for_clients("victim", 4).await;
    server
        .service
        .send_notification("victim", note("mine"))
        .await
        .unwrap();
    for stream in &mut streams {
        assert_eq!(data(&stream.next().await)["title"], "mine");
    }
}

/// A stream that resumes by time (no id yet, as a tab taking over the stream may) from
/// before the server started gets what is kept and never `resync`: it has no state to
/// reload.
#[tokio::test]
async fn resuming_by_time_from_before_the_start_is_no_resync() {
    let server = start_server(test_config()).await;
    let mut client = server.connect("early", "?resumeAgoMs=60000", None).await;
    server
        .service
        .send_notification("early", note("first"))
        .await
        .unwrap();
    let event = client.next().await;
    assert_eq!(event.event, "notification", "{:?}", event.data);
}

/// The upload service's callbacks (`POST /api/webhooks/uploads`, Standard Webhooks
/// signatures) reach the user their payload names; a redelivery publishes once; a wrong,
/// stale or missing signature is 401 and publishes nothing; an unknown name is 404.
#[tokio::test]
async fn signed_webhooks_publish_to_the_user_they_name() {
    use base64::{engine::general_purpose::STANDARD, Engine};
    const KEY: &[u8] = b"the upload service's webhook key";
    let secrets = format!("uploads=whsec_{}", STANDARD.encode(KEY));
    let config = test_config().webhook_secrets(sse_notify::server::WebhookSecrets::parse(&secrets).unwrap());
    let server = start_server(config).await;
    let mut alice = server.connect("alice", "", None).await;
    let mut bob = server.connect("bob", "", None).await;

    let now = || (sse_notify::server::now_ms() / 1000).to_string();
    let sign = |id: &str, timestamp: &str, body: &str| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY);
        let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    };
    let deliver = |name: &str, id: &str, timestamp: String, signature: String, body: &str| {
        server
            .http
            .post(server.url(&format!("/api/webhooks/{name}")))
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
    };
    let answer = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.unwrap())
    };

    let progress = r#"{"type":"reel.upload_progress","data":{"userId":"alice","reelId":"reel-7","progress":40,"status":"uploading"}}"#;
    let ts = now();
    // Delivered, then retried (the sender's answer was lost), signed anew with a later
    // timestamp as senders do: the same ids both times, and published once (nothing more
    // reaches alice before the refusals below are checked).
    let earlier = (sse_notify::server::now_ms() / 1000 - 30).to_string();
    let mut answers = Vec::new();
    for sent in [&earlier, &ts] {
        let response = deliver(
            "uploads",
            "msg_1",
            sent.clone(),
            sign("msg_1", sent, progress),
            progress,
        );
        answers.push(answer(response.await.unwrap()).await);
    }
    assert_eq!(answers[0].0, 202, "{}", answers[0].1);
    assert_eq!(answers[1], answers[0]);
    let event = alice.next().await;
    assert_eq!(event.event, "reel_upload_progress");
    assert_eq!(
        (data(&event)["reelId"].as_str(), data(&event)["progress"].as_u64()),
        (Some("reel-7"), Some(40))
    );

    let refused = [
        // Signed with another key.
        (
            ts.clone(),
            format!("v1,{}", STANDARD.encode([7u8; 32])),
            "webhook-signature",
        ),
        // A valid signature of another body.
        (ts.clone(), sign("msg_2", &ts, "{}"), "webhook-signature"),
        // Signed, but ten minutes old.
        (
            ((sse_notify::server::now_ms() / 1000) - 600).to_string(),
            String::new(),
            "webhook-timestamp",
        ),
    ];
    let ready = r#"{"type":"reel.ready","data":{"userId":"alice","reelId":"reel-7","playbackUrl":"https://cdn.example.com/reel-7.m3u8"}}"#;
    for (timestamp, signature, field) in refused {
        let signature = if signature.is_empty() {
            sign("msg_2", &timestamp, ready)
        } else {
            signature
        };
        let (status, body) = answer(
            deliver("uploads", "msg_2", timestamp, signature, ready)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, body["field"].as_str()), (401, Some(field)), "{body}");
    }
    let unsigned = server
        .http
        .post(server.url("/api/webhooks/uploads"))
        .body(ready)
        .send()
        .await
        .unwrap();
    assert_eq!(answer(unsigned).await.0, 401);
    let (status, body) = answer(
        deliver("billing", "msg_2", ts.clone(), sign("msg_2", &ts, ready), ready)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body["field"].as_str()), (404, Some("name")), "{body}");
    assert!(
        alice.nothing_within(Duration::from_millis(300)).await,
        "a refused delivery published"
    );

    // Signed, but a payload it cannot map: 400 naming the field, nothing published.
    let wrong = r#"{"type":"reel.ready","data":{"reelId":"reel-7"}}"#;
    let (status, body) = answer(
        deliver("uploads", "msg_3", ts.clone(), sign("msg_3", &ts, wrong), wrong)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("data.userId")),
        "{body}"
    );

    let (status, _) = answer(
        deliver("uploads", "msg_4", ts.clone(), sign("msg_4", &ts, ready), ready)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202);
    let event = alice.next().await;
    assert_eq!(
        (event.event.as_str(), data(&event)["playbackUrl"].as_str()),
        ("reel_ready", Some("https://cdn.example.com/reel-7.m3u8"))
    );
    assert!(
        bob.nothing_within(Duration::from_millis(200)).await,
        "another user saw alice's webhook"
    );
}
