//! The brokers: one behaviour suite run on the in-process broker and on Redis, then what
//! only Redis does: several instances as one, per-user subscriptions, surviving outages.
//! Every Redis test starts its own `redis-server` on a free port.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use sse_notify::{
    events::{Event, ReelReady, ReelUploadProgress, SystemAlert, SystemAlertKind, UploadStatus},
    server::{broker::router, SendError, SseConfig, SseService, Target},
};
use sse_notify_testkit::RedisCluster;

fn alert(message: &str) -> SystemAlert {
    SystemAlert {
        message: message.into(),
        kind: SystemAlertKind::Info,
        duration: None,
    }
}

fn text(event: &eventsource_stream::Event) -> String {
    let d = data(event);
    d["title"]
        .as_str()
        .or(d["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// While `user` is away: a notification, a broadcast, one for someone else, another
/// notification. A resume brings back [`MISSED`], in order.
async fn publish_while_away(sse: &SseService, user: &str) {
    sse.send_notification(user, note("m1")).await.unwrap();
    sse.send_system_alert(alert("mb")).await.unwrap();
    sse.send_notification("someone-else", note("not yours"))
        .await
        .unwrap();
    sse.send_notification(user, note("m2")).await.unwrap();
}

/// What [`publish_while_away`] sent the user.
const MISSED: [&str; 3] = ["m1", "mb", "m2"];

/// The titles of the next `n` events on `client`.
async fn next_texts(client: &mut SseClient, n: usize) -> Vec<String> {
    let mut texts = Vec::with_capacity(n);
    for _ in 0..n {
        texts.push(text(&client.next().await));
    }
    texts
}

/// The user's lane in a stream's `id:`: all of it with one order, the first half of
/// `<user lane>.<broadcast lane>` on a Redis Cluster.
fn user_lane(id: &str) -> &str {
    id.split('.').next().unwrap_or(id)
}

// ---- The shared behaviour suite: each check runs on every broker. ----

/// Targeted and broadcast events arrive in order, exactly once, only where they belong.
async fn check_delivery(config: SseConfig) {
    let server = start_server(config).await;
    let mut a = server.connect("a", "", None).await;
    let mut b = server.connect("b", "", None).await;
    let sse = &server.service;
    sse.send_notification("a", note("a1")).await.unwrap();
    sse.send_system_alert(alert("all")).await.unwrap();
    sse.send_notification("a", note("a2")).await.unwrap();
    sse.send_notification("b", note("b1")).await.unwrap();
    let got_a = [a.next().await, a.next().await, a.next().await];
    assert_in_order(&got_a, &["a1", "all", "a2"]);
    assert_in_order(&[b.next().await, b.next().await], &["all", "b1"]);
    assert!(a.nothing_within(Duration::from_millis(300)).await);
}

/// `got` is `expected` (titles), in order; on a cluster (ids in two lanes) in order within
/// each lane: the user's events, and the broadcasts (`all...`), may interleave either way.
fn assert_in_order(got: &[eventsource_stream::Event], expected: &[&str]) {
    let titles: Vec<String> = got.iter().map(text).collect();
    if !got.iter().all(|e| e.id.contains('.')) {
        assert_eq!(titles, expected);
        return;
    }
    let lane = |broadcast: bool| move |t: &&str| t.starts_with("all") == broadcast;
    for broadcast in [false, true] {
        let got: Vec<&str> = titles
            .iter()
            .map(String::as_str)
            .filter(lane(broadcast))
            .collect();
        let want: Vec<&str> = expected.iter().copied().filter(lane(broadcast)).collect();
        assert_eq!(got, want, "in {titles:?}");
    }
}

/// A reconnect with `Last-Event-ID` replays what was missed, user and broadcast, once.
async fn check_replay(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    let seen = server.resume_point("r").await;
    publish_while_away(sse, "r").await;
    let mut again = server.connect("r", "", Some(&seen)).await;
    assert_eq!(next_texts(&mut again, 3).await, MISSED);
    sse.send_notification("r", note("live")).await.unwrap();
    assert_eq!(text(&again.next().await), "live");
    assert!(again.nothing_within(Duration::from_millis(300)).await);
    // The `lastEventId` query parameter works the same, for clients that cannot set headers.
    let mut by_query = server.connect("r", &format!("?lastEventId={seen}"), None).await;
    assert_eq!(text(&by_query.next().await), "m1");
}

/// An id older than the kept history gets `resync`, then what is still kept.
async fn check_resync(config: SseConfig) {
    let server = start_server(config.history_capacity(2)).await;
    let sse = &server.service;
    let old = sse.send_notification("t", note("0")).await.unwrap();
    for n in 1..=4 {
        sse.send_notification("t", note(&n.to_string())).await.unwrap();
    }
    let mut client = server.connect("t", "", Some(&old.to_string())).await;
    assert_eq!(client.next().await.event, "resync");
    assert_eq!(
        [text(&client.next().await), text(&client.next().await)],
        ["3", "4"]
    );
}

/// Connections that open (without `Last-Event-ID`) while another thread publishes to their
/// user miss nothing and get nothing twice: from the first event each receives, it gets
/// every later one once, in order. Repeated so publishes land between registering, reading
/// the head and the replay.
async fn check_connect_during_publishing(config: SseConfig) {
    let server = start_server(config.queue_capacity(100_000)).await;
    for round in 0..10 {
        let user = format!("busy-{round}");
        let publishing = Publishing::start(server.service.clone(), &user);
        let mut client = server.connect(&user, "", None).await;
        let ids = publishing.stop_after(20).await;
        let first = client.next().await;
        let start = ids
            .iter()
            .position(|id| id.to_string() == user_lane(&first.id))
            .expect("a known id");
        for expected in &ids[start + 1..] {
            assert_eq!(
                user_lane(&client.next().await.id),
                expected.to_string(),
                "round {round}"
            );
        }
        assert!(
            client.nothing_within(Duration::from_millis(50)).await,
            "round {round}: a duplicate after the last event"
        );
    }
}

fn progress(reel: &str, pct: u8) -> ReelUploadProgress {
    ReelUploadProgress {
        reel_id: reel.into(),
        progress: pct,
        status: UploadStatus::Uploading,
        message: None,
    }
}

/// Notifications, reel_ready and alerts sent while a user is away arrive on their next
/// connect, progress only as the newest per reel; custom events do not wait; what a closed
/// connection already received is not sent again.
async fn check_offline_delivery(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    sse.send_notification("off", note("n1")).await.unwrap();
    sse.send_reel_upload_progress("off", progress("r1", 10))
        .await
        .unwrap();
    sse.send_reel_upload_progress("off", progress("r1", 50))
        .await
        .unwrap();
    sse.send_reel_upload_progress("off", progress("r2", 20))
        .await
        .unwrap();
    sse.send_custom_event("off", "chat.typing", json!({}))
        .await
        .unwrap();
    sse.send_system_alert(alert("while away")).await.unwrap();

    let mut client = server.connect("off", "", None).await;
    let got: Vec<String> = [
        client.next().await,
        client.next().await,
        client.next().await,
        client.next().await,
    ]
    .iter()
    .map(|e| match e.event.as_str() {
        "reel_upload_progress" => format!("{}@{}", data(e)["reelId"].as_str().unwrap(), data(e)["progress"]),
        _ => text(e),
    })
    .collect();
    assert_eq!(got, ["n1", "r1@50", "r2@20", "while away"]);
    assert!(
        client.nothing_within(Duration::from_millis(300)).await,
        "custom or stale progress replayed"
    );
    drop(client);
    server.wait_for_clients("off", 0).await;

    sse.send_notification("off", note("n2")).await.unwrap();
    // The closed connection's position is recorded asynchronously; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = server.connect("off", "", None).await;
    assert_eq!(text(&again.next().await), "n2");
    assert!(
        again.nothing_within(Duration::from_millis(300)).await,
        "already-delivered events came again"
    );
}

/// A resume by `Last-Event-ID` sends only the newest progress of each reel.
async fn check_latest_progress_on_resume(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    let seen = server.resume_point("p").await;
    for pct in [10, 20, 30] {
        sse.send_reel_upload_progress("p", progress("r", pct))
            .await
            .unwrap();
    }
    let mut again = server.connect("p", "", Some(&seen)).await;
    let event = again.next().await;
    assert_eq!(data(&event)["progress"], 30);
    assert!(again.nothing_within(Duration::from_millis(300)).await);
}

/// A stream without an id that asks for `resumeAgoMs=` (a page whose earlier stream was
/// held back) gets what was published since then; when nothing was, neither a replay nor a
/// false `resync`, even with the last event past the retention. As the user's first
/// connection it also gets their offline backlog.
async fn check_resume_ago(config: SseConfig) {
    let server = start_server(config.event_retention(Duration::from_millis(300))).await;
    let mut seen = server.connect("ago", "", None).await;
    server
        .service
        .send_notification("ago", note("old"))
        .await
        .unwrap();
    assert_eq!(text(&seen.next().await), "old");
    drop(seen);
    server.wait_for_clients("ago", 0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut quiet = server.connect("ago", "?resumeAgoMs=200", None).await;
    assert!(quiet.nothing_within(Duration::from_millis(200)).await);
    drop(quiet);
    server.wait_for_clients("ago", 0).await;

    server
        .service
        .send_notification("ago", note("new"))
        .await
        .unwrap();
    let mut resumed = server.connect("ago", "?resumeAgoMs=250", None).await;
    assert_eq!(text(&resumed.next().await), "new");
    assert!(resumed.nothing_within(Duration::from_millis(200)).await);
    drop(resumed);
    server.wait_for_clients("ago", 0).await;

    // A page that joins its tabs before it streams asks by time too: as the user's first
    // connection, it also gets what waited for them while they were away, however old.
    server
        .service
        .send_notification("ago", note("while away"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut back = server.connect("ago", "?resumeAgoMs=20", None).await;
    assert_eq!(text(&back.next().await), "while away");
    assert!(back.nothing_within(Duration::from_millis(200)).await);
}

/// A publish retried with the same `Idempotency-Key` and body gets the first one's ids and
/// publishes nothing; the same key with another body is a 409 naming the header; a key
/// that is not one is a 400.
async fn check_idempotent_publish(config: SseConfig) {
    let server = start_server(config).await;
    let mut stream = server.connect("idem", "", None).await;
    let body = r#"{"user_id":"idem","event":"notification","data":{"title":"once","message":"m"}}"#;
    let (status, first) = server.publish_once("order-42-shipped", body).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = server.publish_once("order-42-shipped", body).await;
    assert_eq!((status, &again), (202, &first), "the original answer");
    assert_eq!(text(&stream.next().await), "once");
    assert!(
        stream.nothing_within(Duration::from_millis(300)).await,
        "published twice"
    );

    let other = body.replace("once", "twice");
    let (status, refused) = server.publish_once("order-42-shipped", &other).await;
    assert_eq!(
        (status, refused["field"].as_str()),
        (409, Some("Idempotency-Key")),
        "{refused}"
    );
    let (status, refused) = server.publish_once("with space", body).await;
    assert_eq!(
        (status, refused["field"].as_str()),
        (400, Some("Idempotency-Key")),
        "{refused}"
    );
    // Another key is another publish.
    let (status, _) = server.publish_once("order-43-shipped", body).await;
    assert_eq!(status, 202);
    assert_eq!(text(&stream.next().await), "once");

    // The Rust API: a job that runs twice sends once; its keys share the HTTP API's records.
    let sse = server.service.with_idempotency_key("job-7");
    let first = sse.send_notification("idem", note("from a job")).await.unwrap();
    let again = sse.send_notification("idem", note("from a job")).await.unwrap();
    assert_eq!(again, first, "the original id");
    assert_eq!(text(&stream.next().await), "from a job");
    assert!(
        stream.nothing_within(Duration::from_millis(300)).await,
        "sent twice"
    );
    assert!(matches!(
        sse.send_notification("idem", note("another")).await,
        Err(SendError::KeyReused)
    ));
    assert!(matches!(
        sse.send_notification("other-user", note("from a job")).await,
        Err(SendError::KeyReused)
    ));
    let reused_http_key = server.service.with_idempotency_key("order-42-shipped");
    assert!(matches!(
        reused_http_key.send_notification("idem", note("once")).await,
        Err(SendError::KeyReused)
    ));
    assert!(matches!(
        server.service.with_idempotency_key("").send_notification("idem", note("x")).await,
        Err(SendError::Invalid(e)) if e.field == "idempotencyKey"
    ));
    // The service it came from still sends every time.
    server
        .service
        .send_notification("idem", note("plain"))
        .await
        .unwrap();
    assert_eq!(text(&stream.next().await), "plain");
}

/// A user's second tab writes the same id as the first for the same event: its resume point
/// is as good as the first's (on a cluster, in both lanes, though it replayed nothing).
async fn check_second_tab(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    sse.send_system_alert(alert("before")).await.unwrap();
    let mut first = server.connect("tabs", "", None).await;
    assert_eq!(text(&first.next().await), "before", "offline delivery");
    let mut second = server.connect("tabs", "", None).await;
    server.wait_for_clients("tabs", 2).await;
    sse.send_notification("tabs", note("one")).await.unwrap();
    let (a, b) = (first.next().await, second.next().await);
    assert_eq!([text(&a), text(&b)], ["one", "one"]);
    assert_eq!(a.id, b.id);
}

/// A `Last-Event-ID` beyond anything the broker issued (a faster clock's, another
/// environment's) gets `resync`, and then the stream's position is the real head: live
/// events below the bogus id still arrive, and what the stream records as the user's
/// position still lets offline delivery find what comes while they are away.
async fn check_cursor_from_the_future(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    let seen = server.resume_point("future").await;
    // Every lane 10^15 ahead: about 31 years of ids.
    let ahead: Vec<String> = seen
        .split('.')
        .map(|lane| (lane.parse::<u64>().unwrap() + 1_000_000_000_000_000).to_string())
        .collect();
    let mut client = server.connect("future", "", Some(&ahead.join("."))).await;
    assert_eq!(client.next().await.event, "resync");
    sse.send_notification("future", note("live")).await.unwrap();
    assert_eq!(
        text(&client.next().await),
        "live",
        "a live event below the bogus id"
    );
    drop(client);
    server.wait_for_clients("future", 0).await;
    // The closed connection's position is recorded asynchronously; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sse.send_notification("future", note("while away")).await.unwrap();
    let mut again = server.connect("future", "", None).await;
    assert_eq!(
        text(&again.next().await),
        "while away",
        "offline delivery stopped"
    );
}

/// A stream filtered by `events=` never moves the user's offline-delivery position past
/// events it filtered out: they still wait for the next plain connection.
async fn check_filtered_stream_keeps_offline_delivery(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    let mut reels_only = server.connect("filtered", "?events=reel_ready", None).await;
    server.wait_for_clients("filtered", 1).await;
    sse.send_notification("filtered", note("not for that stream"))
        .await
        .unwrap();
    let ready = ReelReady {
        reel_id: "r".into(),
        playback_url: "https://cdn.example.com/r.m3u8".into(),
        thumbnail_url: None,
        duration: None,
    };
    sse.send_reel_ready("filtered", ready).await.unwrap();
    assert_eq!(reels_only.next().await.event, "reel_ready");
    drop(reels_only);
    server.wait_for_clients("filtered", 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut plain = server.connect("filtered", "", None).await;
    assert_eq!(text(&plain.next().await), "not for that stream");
}

/// A backlog longer than a replay page (256) comes whole, in order, once, with what was
/// published while it was being sent after it; a client that drops half-way resumes from
/// the last event it got.
async fn check_long_backlog_in_pages(config: SseConfig) {
    let server = start_server(config.queue_capacity(10_000)).await;
    let sse = &server.service;
    let seen = server.resume_point("backlog").await;
    let backlog: Vec<_> = (0..600)
        .map(|n| {
            (
                Target::User("backlog".into()),
                Event::Notification(note(&n.to_string())),
            )
        })
        .collect();
    sse.publish(backlog).await.unwrap();
    let mut client = server.connect("backlog", "", Some(&seen)).await;
    for n in 0..3 {
        sse.send_notification("backlog", note(&format!("live {n}")))
            .await
            .unwrap();
    }
    let expected: Vec<String> = (0..600)
        .map(|n| n.to_string())
        .chain((0..3).map(|n| format!("live {n}")))
        .collect();
    let mut last_id = String::new();
    for (i, want) in expected.iter().enumerate() {
        let event = client.next().await;
        assert_eq!(&text(&event), want, "event {i}");
        if i == 299 {
            last_id = event.id.clone();
        }
    }
    assert!(client.nothing_within(Duration::from_millis(300)).await);
    drop(client);
    let mut resumed = server.connect("backlog", "", Some(&last_id)).await;
    for want in &expected[300..] {
        assert_eq!(&text(&resumed.next().await), want);
    }
    assert!(resumed.nothing_within(Duration::from_millis(300)).await);
}

/// A stream opened before anything was ever published still tells its client where it
/// starts, so the client comes back by id and gets exactly what it missed. (Without an id
/// it would come back as a new client, and an event written just before its connection
/// died would count as delivered.)
async fn check_an_empty_broker_still_announces_an_id(config: SseConfig) {
    let server = start_server(config).await;
    let mut client = server.connect("early", "", None).await;
    let ready = client.next_any().await.expect("stream ended");
    assert_eq!(ready.event, "ready");
    assert!(!ready.id.is_empty(), "no id before the first event");
    drop(client);
    server.wait_for_clients("early", 0).await;
    server
        .service
        .send_notification("early", note("first"))
        .await
        .unwrap();
    let mut back = server.connect("early", "", Some(&ready.id)).await;
    assert_eq!(text(&back.next().await), "first", "a resync or nothing instead");
}
/// A user's streams are counted where they are and stop counting when they close;
/// `is_online` and `GET /api/presence` follow, and `/api/stats` names this instance among
/// the cluster's with its current figures.
async fn check_presence(config: SseConfig) {
    let server = start_server(config).await;
    let sse = &server.service;
    let own = sse.instance_id().to_string();
    assert!(!sse.is_online("here").await.unwrap());
    let first = server.connect("here", "", None).await;
    let second = server.connect("here", "", None).await;
    server.wait_for_clients("here", 2).await;
    assert!(sse.is_online("here").await.unwrap());
    let (status, presence) = server.get_json("/api/presence?user_id=here").await;
    assert_eq!(status, 200, "{presence}");
    assert_eq!(
        presence,
        json!({"userId": "here", "online": true, "connections": 2,
               "instances": [{"instance": own, "connections": 2}]})
    );
    let (_, stats) = server.get_json("/api/stats").await;
    assert_eq!(stats["instance"], own);
    assert_eq!(stats["clients"], 2);
    let listed = stats["cluster"]["instances"].as_array().unwrap();
    let this = listed
        .iter()
        .find(|i| i["instance"] == own)
        .expect("this instance listed");
    assert_eq!(this["stats"]["clients"], 2);

    drop((first, second));
    server.wait_for_clients("here", 0).await;
    let presence = sse.presence("here").await.unwrap();
    assert!(!presence.online);
    assert_eq!(presence.connections, 0);
    assert!(presence.instances.is_empty());
}

macro_rules! behaviour_suite {
    ($($check:ident),*) => {
        mod memory_broker {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() { super::$check(test_config()).await; })*
        }
        mod redis_broker {
            use super::*;
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let redis = RedisServer::start();
                super::$check(test_config().redis_url(redis.url())).await;
            })*
        }
        /// The behaviour suite on a Redis Cluster (3 primaries with a replica each): one
        /// cluster, the checks one after another, every primary emptied in between.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_behaviour_suite_passes_on_a_redis_cluster() {
            let cluster = start_cluster().await;
            $(
                eprintln!("on the cluster: {}", stringify!($check));
                $check(cluster_config(&cluster)).await;
                for primary in &cluster.nodes[..3] {
                    redis_query::<()>(primary, &mut redis::cmd("FLUSHALL")).await;
                }
            )*
        }
    };
}

behaviour_suite!(
    check_delivery,
    check_replay,
    check_resync,
    check_connect_during_publishing,
    check_offline_delivery,
    check_latest_progress_on_resume,
    check_resume_ago,
    check_idempotent_publish,
    check_second_tab,
    check_cursor_from_the_future,
    check_filtered_stream_keeps_offline_delivery,
    check_long_backlog_in_pages,
    check_an_empty_broker_still_announces_an_id,
    check_presence
);

// ---- Redis only. ----

/// A Redis Cluster (3 primaries, 3 replicas) is refused at start with a message that
/// says so, whichever node `REDIS_URL` names (every publish would otherwise fail with
/// CROSSSLOT).
#[tokio::test]
async fn a_redis_cluster_is_refused_at_start() {
    let cluster = tokio::task::spawn_blocking(|| sse_notify_testkit::RedisCluster::start(3, 1))
        .await
        .unwrap();
    for node in [&cluster.nodes[0], &cluster.nodes[5]] {
        let Err(err) = SseService::start(test_config().redis_url(node.url())).await else {
            panic!("a cluster node was accepted");
        };
        assert!(err.to_string().contains("Redis Cluster"), "{err}");
    }
}

/// Two instances on one Redis: events published on A reach clients on B, in order, once.
#[tokio::test]
async fn two_instances_act_as_one() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut on_b = b.connect("u", "", None).await;
    let mut other_on_a = a.connect("v", "", None).await;
    for n in 0..20 {
        a.service
            .send_notification("u", note(&n.to_string()))
            .await
            .unwrap();
    }
    a.service.send_system_alert(alert("everyone")).await.unwrap();
    for n in 0..20 {
        assert_eq!(text(&on_b.next().await), n.to_string());
    }
    assert_eq!(text(&on_b.next().await), "everyone");
    assert_eq!(text(&other_on_a.next().await), "everyone");
    assert!(
        on_b.nothing_within(Duration::from_millis(300)).await,
        "duplicate delivery"
    );
    assert!(
        other_on_a.nothing_within(Duration::from_millis(100)).await,
        "v saw u's events"
    );
}

/// Polls `probe` until it holds, failing after `within` with `what`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !probe().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Presence spans instances: a user with streams on A and B is online with both counted
/// on either, `/api/stats` sums both instances, each instance's part in Redis carries a
/// TTL, a stream that closes stops counting within a tick, and an instance that shuts down
/// leaves at once.
#[tokio::test]
async fn presence_and_counts_span_instances() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let (id_a, id_b) = (
        a.service.instance_id().to_string(),
        b.service.instance_id().to_string(),
    );
    assert_ne!(id_a, id_b);
    let on_a = [a.connect("p", "", None).await, a.connect("p", "", None).await];
    let on_b = b.connect("p", "", None).await;
    let _other = b.connect("q", "", None).await;
    a.wait_for_clients("p", 2).await;
    b.wait_for_clients("p", 1).await;

    async fn counted(server: &TestServer, expected: u64) -> bool {
        let (status, presence) = server.get_json("/api/presence?user_id=p").await;
        assert_eq!(status, 200, "{presence}");
        presence["connections"] == expected
    }
    eventually(WAIT, "B sees A's streams", || counted(&b, 3)).await;
    eventually(WAIT, "A sees B's stream", || counted(&a, 3)).await;
    let mut expected = vec![(id_a.clone(), 2), (id_b.clone(), 1)];
    expected.sort();
    let presence = a.service.presence("p").await.unwrap();
    let got: Vec<(String, u64)> = presence
        .instances
        .iter()
        .map(|i| (i.instance.clone(), i.connections))
        .collect();
    assert_eq!(got, expected);

    eventually(WAIT, "stats list both instances", || async {
        a.service.cluster_stats().clients == 4
    })
    .await;
    let (_, stats) = b.get_json("/api/stats").await;
    assert_eq!(stats["clients"], 2, "B's own figures");
    assert_eq!(stats["cluster"]["clients"], 4, "{stats}");
    let listed: Vec<&str> = stats["cluster"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&id_a.as_str()) && listed.contains(&id_b.as_str()));
    for key in [
        format!("sse:{{presence}}:u:{id_a}"),
        format!("sse:{{presence}}:i:{id_a}"),
    ] {
        let ttl: i64 = redis_query(&redis, redis::cmd("PTTL").arg(&key)).await;
        assert!(ttl > 0 && ttl <= 10_000, "{key} has PTTL {ttl}");
    }

    drop(on_b);
    eventually(WAIT, "B's closed stream stops counting on A", || counted(&a, 2)).await;
    drop(on_a);
    eventually(WAIT, "p goes offline everywhere", || async {
        !b.service.is_online("p").await.unwrap()
    })
    .await;

    // Published through each, summed in the cluster's figures.
    a.service.send_notification("nobody", note("x")).await.unwrap();
    b.service.send_notification("nobody", note("y")).await.unwrap();
    let published = |s: &sse_notify::server::Stats| s.events_published;
    let expected = published(&a.service.stats()) + published(&b.service.stats());
    eventually(WAIT, "the cluster sums what both published", || async {
        a.service.cluster_stats().events_published == expected
    })
    .await;

    // Well within the 10 s TTL: only the leave can take B out this fast.
    b.service.shutdown().await;
    eventually(Duration::from_secs(3), "B leaves A's figures", || async {
        a.service.cluster_stats().instances.len() == 1
    })
    .await;
    let live: Vec<String> = redis_query(
        &redis,
        redis::cmd("ZRANGE")
            .arg("sse:{presence}:instances")
            .arg(0)
            .arg(-1),
    )
    .await;
    assert_eq!(live, [id_a]);
}

/// `SSE_MAX_CLIENTS_PER_USER` holds across instances: with a limit of 2, a user holding
/// two streams on A who opens a third on B loses the oldest, on A, which ends with
/// `connection_replaced`; the two left still receive events.
async fn check_limit_across_instances(config: impl Fn() -> SseConfig) {
    let a = start_server(config().max_clients_per_user(2)).await;
    let b = start_server(config().max_clients_per_user(2)).await;
    for (one, other) in [(&a, &b), (&b, &a)] {
        let other = other.service.instance_id().to_string();
        eventually(WAIT, "the instances see each other", || async {
            one.service
                .cluster_stats()
                .instances
                .iter()
                .any(|i| i.instance == other)
        })
        .await;
    }
    let mut oldest = a.connect("lim", "", None).await;
    a.wait_for_clients("lim", 1).await;
    let mut second = a.connect("lim", "", None).await;
    a.wait_for_clients("lim", 2).await;
    eventually(WAIT, "B sees A's two streams", || async {
        b.service.presence("lim").await.unwrap().connections == 2
    })
    .await;
    let mut newest = b.connect("lim", "", None).await;
    let seen = oldest.until_end().await;
    assert_eq!(
        seen.last().map(|e| e.event.as_str()),
        Some("connection_replaced"),
        "{seen:?}"
    );
    a.wait_for_clients("lim", 1).await;
    assert_eq!(b.service.client_count_for_user("lim"), 1);
    b.service.send_notification("lim", note("after")).await.unwrap();
    assert_eq!(text(&second.next().await), "after");
    assert_eq!(text(&newest.next().await), "after");
}

/// A tab that moves from A to B (it dropped on A and reconnected to B at once) is not
/// counted on both: with a limit of 2, two streams on A, one of them moving to B, closes
/// nothing, though A's part read right after the move still listed it.
async fn check_a_moved_tab_is_not_counted_twice(config: impl Fn() -> SseConfig) {
    let a = start_server(config().max_clients_per_user(2)).await;
    let b = start_server(config().max_clients_per_user(2)).await;
    let other = b.service.instance_id().to_string();
    eventually(WAIT, "A sees B", || async {
        a.service
            .cluster_stats()
            .instances
            .iter()
            .any(|i| i.instance == other)
    })
    .await;
    let mut stays = a.connect("mover", "", None).await;
    a.wait_for_clients("mover", 1).await;
    let moving = a.connect("mover", "", None).await;
    a.wait_for_clients("mover", 2).await;
    eventually(WAIT, "B sees A's two streams", || async {
        b.service.presence("mover").await.unwrap().connections == 2
    })
    .await;
    drop(moving);
    let mut moved = b.connect("mover", "", None).await;
    a.wait_for_clients("mover", 1).await;
    // Past the check's delay and a tick: had it counted the moved tab twice, `stays` (the
    // oldest) would have been replaced by now.
    tokio::time::sleep(Duration::from_secs(5)).await;
    b.service.send_notification("mover", note("both")).await.unwrap();
    assert_eq!(text(&stays.next().await), "both");
    assert_eq!(text(&moved.next().await), "both");
    assert_eq!(a.service.client_count_for_user("mover"), 1);
}

#[tokio::test]
async fn a_moved_tab_is_not_counted_twice() {
    let redis = RedisServer::start();
    check_a_moved_tab_is_not_counted_twice(|| test_config().redis_url(redis.url())).await;
}

#[tokio::test]
async fn the_per_user_limit_holds_across_instances() {
    let redis = RedisServer::start();
    check_limit_across_instances(|| test_config().redis_url(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_user_limit_holds_across_instances_on_a_redis_cluster() {
    let cluster = start_cluster().await;
    check_limit_across_instances(|| cluster_config(&cluster)).await;
}

/// An instance that dies without a word (`SIGKILL`) stops counting within the presence
/// TTL: nothing has to clean up after it.
#[tokio::test]
async fn a_crashed_instance_drops_out_of_presence() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut crashing = ServerProcess::start(&[("REDIS_URL", &url)]).await;
    let survivor = start_server(test_config().redis_url(url.clone())).await;
    let _held = crashing.connect("gone").await;
    eventually(WAIT, "the survivor sees the stream", || async {
        survivor.service.is_online("gone").await.unwrap()
    })
    .await;
    crashing.crash();
    let crashed_at = tokio::time::Instant::now();
    eventually(
        Duration::from_secs(15),
        "the crashed instance drops out",
        || async { !survivor.service.is_online("gone").await.unwrap() },
    )
    .await;
    assert!(
        crashed_at.elapsed() >= Duration::from_secs(5),
        "it left before its TTL could have run out: something else removed it"
    );
    eventually(WAIT, "its figures go too", || async {
        survivor.service.cluster_stats().instances.len() == 1
    })
    .await;
}

/// A client of instance A reconnects to instance B with `Last-Event-ID` and gets every
/// missed event (user and broadcast) once, after A crashed: A is a real server process
/// killed with `SIGKILL`, so none of its shutdown code runs.
#[tokio::test]
async fn reconnect_to_another_instance_after_a_crash_resumes_without_loss() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut a = ServerProcess::start(&[("REDIS_URL", &url)]).await;
    let b = start_server(test_config().redis_url(url.clone())).await;
    let mut on_a = a.connect("w").await;
    b.service.send_notification("w", note("seen")).await.unwrap();
    let seen = on_a.next().await;
    a.crash();
    assert!(on_a.until_closed().await.is_empty());
    publish_while_away(&b.service, "w").await;
    let mut on_b = b.connect("w", "", Some(&seen.id)).await;
    assert_eq!(next_texts(&mut on_b, 3).await, MISSED);
    assert!(on_b.nothing_within(Duration::from_millis(300)).await);
}

/// An instance subscribes to a user's channel only while that user is connected to it.
#[tokio::test]
async fn instances_subscribe_only_to_their_users() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let numsub = |user: &str| {
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("sse:u:{user}"))
            .clone()
    };
    let subscribers = |reply: (String, u64)| reply.1;

    let client = a.connect("x", "", None).await;
    a.wait_for_clients("x", 1).await;
    assert_eq!(
        subscribers(redis_query(&redis, &mut numsub("x")).await),
        1,
        "only A listens for x"
    );
    let broadcast: (String, u64) =
        redis_query(&redis, redis::cmd("PUBSUB").arg("NUMSUB").arg("sse:broadcast")).await;
    assert_eq!(broadcast.1, 2, "both instances listen for broadcasts");
    let channels: Vec<String> =
        redis_query(&redis, redis::cmd("PUBSUB").arg("CHANNELS").arg("sse:u:*")).await;
    assert_eq!(channels, ["sse:u:x"]);
    let _ = &b;

    drop(client);
    a.wait_for_clients("x", 0).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while subscribers(redis_query(&redis, &mut numsub("x")).await) != 0 {
        assert!(tokio::time::Instant::now() < deadline, "A still subscribed to x");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When the server, not the client, ends a user's last stream (a disconnect, the session's
/// expiry), the instance still unsubscribes from the user's channel: no subscription
/// outlives the streams that needed it.
#[tokio::test]
async fn streams_the_server_ends_release_their_subscription() {
    let redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    let subscribers = |user: &str| {
        let redis = &redis;
        let channel = format!("sse:u:{user}");
        async move {
            let (_, n): (String, u64) =
                redis_query(redis, redis::cmd("PUBSUB").arg("NUMSUB").arg(channel)).await;
            n
        }
    };
    let wait_for = |user: &'static str, n: u64| {
        let subscribers = &subscribers;
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            while subscribers(user).await != n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{user}: not {n} subscriber(s)"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Ended by a disconnect (as at logout), two streams of one user.
    let mut first = server.connect("bye", "", None).await;
    let mut second = server.connect("bye", "", None).await;
    wait_for("bye", 1).await;
    assert_eq!(server.service.disconnect_user("bye").await.unwrap(), 2);
    for client in [&mut first, &mut second] {
        assert_eq!(client.next().await.event, "session_ended");
    }
    wait_for("bye", 0).await;

    // Ended by the session's expiry.
    let mut brief = server.connect_expiring("brief", Duration::from_secs(1)).await;
    wait_for("brief", 1).await;
    assert_eq!(brief.next().await.event, "session_ended");
    wait_for("brief", 0).await;
}

/// Redis dies mid-stream: sends fail with an error, health shows degraded, the streams stay
/// open; after Redis is back, new events are delivered again.
#[tokio::test]
async fn redis_outage_is_reported_and_survived() {
    let mut redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    let mut client = server.connect("o", "", None).await;
    server
        .service
        .send_notification("o", note("before"))
        .await
        .unwrap();
    assert_eq!(text(&client.next().await), "before");

    redis.kill();
    let failed = server.service.send_notification("o", note("during")).await;
    assert!(matches!(failed, Err(SendError::Broker(_))), "{failed:?}");
    let (status, health) = server.get_json("/healthz").await;
    assert_eq!((status, health["brokerHealth"].as_str()), (200, Some("degraded")));
    let (status, body) = server
        .publish(json!({"user_id": "o", "event": "notification", "data": {"title": "t", "message": "m"}}))
        .await;
    assert_eq!(status, 503, "{body}");

    redis.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if server.service.send_notification("o", note("after")).await.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The subscriber may still be reconnecting when the first send succeeds; the event is
    // recovered from the stream then. Every "after" that was accepted arrives.
    assert_eq!(text(&client.next().await), "after");
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.service.broker_health() != sse_notify::server::BrokerHealth::Healthy {
        assert!(tokio::time::Instant::now() < deadline, "still degraded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Instance A loses its subscriber connection while B publishes: A reads the missed events
/// back from the streams, so its clients miss nothing.
#[tokio::test]
async fn events_published_while_an_instance_was_cut_off_are_recovered() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut on_a = a.connect("k", "", None).await;
    b.service.send_notification("k", note("first")).await.unwrap();
    assert_eq!(text(&on_a.next().await), "first");
    // Cut every pub/sub connection (A's and B's), then publish before they come back.
    let _: u64 = redis_query(&redis, redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub")).await;
    for n in 0..5 {
        b.service
            .send_notification("k", note(&format!("missed {n}")))
            .await
            .unwrap();
    }
    b.service
        .send_system_alert(alert("missed broadcast"))
        .await
        .unwrap();
    for n in 0..5 {
        assert_eq!(text(&on_a.next().await), format!("missed {n}"));
    }
    assert_eq!(text(&on_a.next().await), "missed broadcast");
    assert!(
        on_a.nothing_within(Duration::from_millis(300)).await,
        "duplicates after recovery"
    );
}

/// Redis keys expire with the retention of what they hold: a user's stream of notifications
/// after 24 h (they wait that long for an offline user), a stream of custom events after
/// the replay retention, the delivery position after the longest retention; with a short
/// retention, the keys are gone once it has passed.
#[tokio::test]
async fn redis_keys_expire_with_their_retention() {
    let redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    let sse = &server.service;
    sse.send_notification("ttl", note("n")).await.unwrap();
    sse.send_custom_event("ttl-custom", "job.done", json!({}))
        .await
        .unwrap();
    let pttl = |key: &str| redis::cmd("PTTL").arg(key).clone();
    let day: i64 = 24 * 3600 * 1000;
    let notification_ttl: i64 = redis_query(&redis, &mut pttl("sse:stream:long:u:ttl")).await;
    assert!(
        day - 60_000 < notification_ttl && notification_ttl <= day,
        "{notification_ttl}"
    );
    let custom_ttl: i64 = redis_query(&redis, &mut pttl("sse:stream:u:ttl-custom")).await;
    assert!(240_000 < custom_ttl && custom_ttl <= 300_000, "{custom_ttl}");
    // A closed connection records its position with the longest retention.
    drop(server.resume_point("ttl").await);
    let deadline = tokio::time::Instant::now() + WAIT;
    let delivered_ttl = loop {
        let ttl: i64 = redis_query(&redis, &mut pttl("sse:delivered:u:ttl")).await;
        if ttl > 0 || tokio::time::Instant::now() > deadline {
            break ttl;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        day - 60_000 < delivered_ttl && delivered_ttl <= day,
        "{delivered_ttl}"
    );

    let short = start_server(
        test_config()
            .redis_url(redis.url())
            .event_retention(Duration::from_millis(300))
            .offline_retention(Vec::new()),
    )
    .await;
    short.service.send_notification("brief", note("n")).await.unwrap();
    let exists = || redis::cmd("EXISTS").arg("sse:stream:u:brief").clone();
    assert_eq!(redis_query::<i64>(&redis, &mut exists()).await, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        redis_query::<i64>(&redis, &mut exists()).await,
        0,
        "the stream outlived its retention"
    );
}

/// Ids never go back, even when Redis loses its data: an event published after `FLUSHALL`
/// gets a higher id than every one before, so no client mistakes it for one it has seen.
#[tokio::test]
async fn ids_never_go_back_when_redis_loses_its_data() {
    let redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    let mut before = Vec::new();
    for n in 0..50 {
        before.push(
            server
                .service
                .send_notification("i", note(&n.to_string()))
                .await
                .unwrap(),
        );
    }
    let _: String = redis_query(&redis, &mut redis::cmd("FLUSHALL")).await;
    let after = server
        .service
        .send_notification("i", note("after"))
        .await
        .unwrap();
    assert!(
        after > *before.last().unwrap(),
        "{after} after {:?}",
        before.last()
    );
}

/// Offline delivery across instances: the position a connection on A reached is where a
/// later first connection on B starts, so B sends only what came after it.
#[tokio::test]
async fn offline_delivery_continues_on_another_instance() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut on_a = a.connect("roam", "", None).await;
    a.service
        .send_notification("roam", note("seen on a"))
        .await
        .unwrap();
    assert_eq!(text(&on_a.next().await), "seen on a");
    drop(on_a);
    a.wait_for_clients("roam", 0).await;
    // The closed connection's position is recorded asynchronously; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.service
        .send_notification("roam", note("while away"))
        .await
        .unwrap();
    let mut on_b = b.connect("roam", "", None).await;
    assert_eq!(text(&on_b.next().await), "while away");
    assert!(
        on_b.nothing_within(Duration::from_millis(300)).await,
        "what A already delivered came again"
    );
}

/// A publish whose answer is lost (the connection cut once the request is sent), retried
/// with the same `Idempotency-Key` on the other instance, is delivered once: the retry gets
/// the first publish's ids (or "in progress" with `Retry-After` while it is not done yet).
#[tokio::test]
async fn a_retry_on_another_instance_after_a_lost_answer_publishes_once() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut stream = b.connect("retry", "", None).await;
    let body = r#"{"user_id":"retry","event":"notification","data":{"title":"paid","message":"m"}}"#;
    let request = format!(
        "POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
         Idempotency-Key: invoice-7\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut lost = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut lost, request.as_bytes())
        .await
        .unwrap();
    drop(lost);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ids = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the first publish never finished"
        );
        let (status, answer) = b.publish_once("invoice-7", body).await;
        match status {
            202 => break answer["ids"].clone(),
            409 if answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("in progress")) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => panic!("{status} {answer}"),
        }
    };
    let event = stream.next().await;
    assert_eq!(text(&event), "paid");
    assert_eq!(
        ids,
        serde_json::json!([event.id]),
        "the retry answered with the first id"
    );
    assert!(
        stream.nothing_within(Duration::from_millis(500)).await,
        "delivered twice"
    );
}

/// `POST /api/disconnect` on one instance ends the user's streams on every instance and
/// answers how many there were in all.
#[tokio::test]
async fn disconnect_reaches_every_instance() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut streams = vec![
        a.connect("bye", "", None).await,
        a.connect("bye", "", None).await,
        b.connect("bye", "", None).await,
    ];
    let mut other = a.connect("stay", "", None).await;
    a.wait_for_clients("bye", 2).await;
    b.wait_for_clients("bye", 1).await;
    let (status, body) = b.post_json("/api/disconnect", json!({"user_id": "bye"})).await;
    assert_eq!((status, body["closed"].as_u64()), (200, Some(3)), "{body}");
    for stream in &mut streams {
        let last = stream.until_end().await;
        assert_eq!(last.last().map(|e| e.event.as_str()), Some("session_ended"));
    }
    b.service
        .send_notification("stay", note("unaffected"))
        .await
        .unwrap();
    assert_eq!(text(&other.next().await), "unaffected");
    let (_, body) = a.post_json("/api/disconnect", json!({"user_id": "bye"})).await;
    assert_eq!(body["closed"], 0);
}

/// Streams are trimmed by time to the retention (`XADD ... MINID ~`), not only by length:
/// old entries go once newer ones are published.
#[tokio::test]
async fn redis_streams_are_trimmed_by_time() {
    // Small stream nodes, so approximate trimming can drop whole nodes of a short stream.
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "4"]);
    let server = start_server(
        test_config()
            .redis_url(redis.url())
            .event_retention(Duration::from_millis(300))
            .offline_retention(Vec::new()),
    )
    .await;
    for n in 0..40 {
        server
            .service
            .send_custom_event("old", "job.step", json!({"n": n}))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    server
        .service
        .send_custom_event("old", "job.step", json!({"n": "new"}))
        .await
        .unwrap();
    let length: usize = redis_query(&redis, redis::cmd("XLEN").arg("sse:stream:u:old")).await;
    assert!(length <= 4, "{length} entries left of 41");
}

/// Publishes a notification to `flood`, 40 short-lived custom events, waits past the
/// replay retention (300 ms), and publishes one more (trimming happens as events are added).
async fn publish_a_flood_beside_a_notification(server: &TestServer) {
    let sse = &server.service;
    sse.send_notification("flood", note("kept")).await.unwrap();
    for n in 0..40 {
        sse.send_custom_event("flood", "job.step", json!({"n": n}))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    sse.send_custom_event("flood", "job.step", json!({"n": "new"}))
        .await
        .unwrap();
}

/// Each type is kept only as long as its own retention: a flood of short-lived events is
/// trimmed by time although a notification kept 24 h is in the same user's history, and
/// that notification still reaches the user when they connect.
async fn check_types_are_trimmed_by_their_own_retention(
    server: &TestServer,
    xlen: impl AsyncFn(&str) -> usize,
    short_stream: &str,
    notification_stream: &str,
) {
    publish_a_flood_beside_a_notification(server).await;
    let short = xlen(short_stream).await;
    assert!(short <= 4, "{short} of 41 short-lived entries left");
    assert_eq!(xlen(notification_stream).await, 1);
    let mut client = server.connect("flood", "", None).await;
    assert_eq!(text(&client.next().await), "kept");
    assert!(client.nothing_within(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn types_are_trimmed_by_their_own_retention_on_redis() {
    // Small stream nodes, so approximate trimming can drop whole nodes of a short stream.
    let redis = RedisServer::start_with(&["--stream-node-max-entries", "4"]);
    let server = start_server(
        test_config()
            .redis_url(redis.url())
            .event_retention(Duration::from_millis(300)),
    )
    .await;
    let xlen = async |key: &str| redis_query::<usize>(&redis, redis::cmd("XLEN").arg(key)).await;
    check_types_are_trimmed_by_their_own_retention(
        &server,
        xlen,
        "sse:stream:u:flood",
        "sse:stream:long:u:flood",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_are_trimmed_by_their_own_retention_on_a_redis_cluster() {
    let cluster = start_cluster().await;
    for node in &cluster.nodes {
        let _: () = redis_query(
            node,
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("stream-node-max-entries")
                .arg(4),
        )
        .await;
    }
    let server = start_server(cluster_config(&cluster).event_retention(Duration::from_millis(300))).await;
    // The key lives on one primary; the others answer MOVED.
    let xlen = async |key: &str| {
        for node in &cluster.nodes[..3] {
            let client = redis::Client::open(node.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            if let Ok(n) = redis::cmd("XLEN").arg(key).query_async::<usize>(&mut conn).await {
                return n;
            }
        }
        panic!("no primary holds {key}")
    };
    check_types_are_trimmed_by_their_own_retention(
        &server,
        xlen,
        "sse:{u:flood}:stream",
        "sse:{u:flood}:stream:long",
    )
    .await;
}

/// A resume reads a long backlog in pages, and gets all of it in order, once.
#[tokio::test]
async fn a_long_backlog_is_replayed_in_full_in_pages() {
    let redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url()).queue_capacity(4_096)).await;
    let seen = server.resume_point("backlog").await;
    let mut ids = Vec::new();
    for n in 0..1_500 {
        ids.push(
            server
                .service
                .send_custom_event("backlog", "job.step", json!({"n": n}))
                .await
                .unwrap(),
        );
    }
    let mut client = server.connect("backlog", "?events=job.step", Some(&seen)).await;
    for id in &ids {
        assert_eq!(client.next().await.id, id.to_string());
    }
    assert!(client.nothing_within(Duration::from_millis(200)).await);
}

/// A `Last-Event-ID` older than the replay retention (or from a stream that expired
/// entirely) is answered with `resync`.
#[tokio::test]
async fn an_id_older_than_retention_gets_resync_on_redis() {
    let redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    server
        .service
        .send_notification("stale", note("recent"))
        .await
        .unwrap();
    let ten_minutes_ago = (sse_notify::server::now_ms() - 600_000) * 1000;
    let mut client = server
        .connect("stale", "", Some(&ten_minutes_ago.to_string()))
        .await;
    assert_eq!(client.next().await.event, "resync");
    assert_eq!(text(&client.next().await), "recent");
}

/// Messages on our channels that do not decode (junk, a bad name, an id absurdly far in
/// the future) are skipped, and dispatch goes on: later events still arrive.
#[tokio::test]
async fn malformed_messages_are_skipped_and_dispatch_goes_on() {
    let redis = RedisServer::start();
    let server = start_server(test_config().redis_url(redis.url())).await;
    let mut client = server.connect("target", "", None).await;
    server.wait_for_clients("target", 1).await;
    let absurd = u64::MAX / 2;
    for junk in [
        "garbage".to_string(),
        "12 Bad-Name {}".to_string(),
        "13 notification [1,2]".to_string(),
        format!(r#"{absurd} notification {{"title":"from the future","message":"m"}}"#),
    ] {
        let _: i64 = redis_query(&redis, redis::cmd("PUBLISH").arg("sse:u:target").arg(junk)).await;
    }
    server
        .service
        .send_notification("target", note("after the junk"))
        .await
        .unwrap();
    assert_eq!(text(&client.next().await), "after the junk");
    assert!(client.nothing_within(Duration::from_millis(200)).await);
}

/// Users who open their first stream while the subscriber connection is being rebuilt
/// are subscribed too: their live events arrive.
#[tokio::test]
async fn users_arriving_during_a_resubscribe_get_live_events() {
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    for round in 0..8 {
        let user = format!("arriving-{round}");
        let _: u64 = redis_query(&redis, redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub")).await;
        let mut client = a.connect(&user, "", None).await;
        a.wait_for_clients(&user, 1).await;
        // Wait until A listens again, then publish from B.
        let deadline = tokio::time::Instant::now() + WAIT;
        while a.service.broker_health() != sse_notify::server::BrokerHealth::Healthy {
            assert!(tokio::time::Instant::now() < deadline, "A never resubscribed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b.service.send_notification(&user, note("live")).await.unwrap();
        assert_eq!(text(&client.next().await), "live", "round {round}");
    }
}

/// A catch-up read that fails after a reconnect keeps the broker degraded and is tried
/// again: it never reports healthy with events missed, and the missed event arrives once
/// the read works.
#[tokio::test]
async fn a_failed_catch_up_keeps_the_broker_degraded_and_retries() {
    use sse_notify::server::BrokerHealth;
    let redis = RedisServer::start();
    let config = || test_config().redis_url(redis.url());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut client = a.connect("catch", "", None).await;
    b.service.send_notification("catch", note("first")).await.unwrap();
    assert_eq!(text(&client.next().await), "first");
    // A key of the wrong type makes A's catch-up read fail.
    let poison = "sse:trimmed:sse:stream:u:catch";
    let _: i64 = redis_query(&redis, redis::cmd("RPUSH").arg(poison).arg("x")).await;
    let _: u64 = redis_query(&redis, redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub")).await;
    b.service
        .send_notification("catch", note("missed"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(a.service.broker_health(), BrokerHealth::Degraded);
    assert!(
        client.nothing_within(Duration::from_millis(100)).await,
        "delivered without catching up"
    );
    let _: i64 = redis_query(&redis, redis::cmd("DEL").arg(poison)).await;
    assert_eq!(text(&client.next().await), "missed");
    let deadline = tokio::time::Instant::now() + WAIT;
    while a.service.broker_health() != BrokerHealth::Healthy {
        assert!(tokio::time::Instant::now() < deadline, "never healthy again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis older than 7.0 is refused at start with a message that says so. (No old Redis
/// is installed here, so a stand-in answers the handshake and `INFO` as Redis 6.2 would.)
#[tokio::test]
async fn an_old_redis_is_refused_at_start() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    // One reply per complete command (clients pipeline their handshake).
                    while let Some((command, used)) = resp_command(&pending) {
                        pending.drain(..used);
                        let reply = if command.eq_ignore_ascii_case("INFO") {
                            let info = "# Server\r\nredis_version:6.2.14\r\n";
                            format!("${}\r\n{info}\r\n", info.len())
                        } else {
                            "+OK\r\n".to_string()
                        };
                        if socket.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let err = sse_notify::server::SseService::start(test_config().redis_url(format!("redis://{addr}")))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("6.2.14") && message.contains("7.0"), "{message}");
}

/// The name of the first complete RESP command in `buf`, and how many bytes it takes.
fn resp_command(buf: &[u8]) -> Option<(String, usize)> {
    let text = std::str::from_utf8(buf).ok()?;
    let mut lines = text.split_inclusive("\r\n");
    let header = lines.next()?;
    let count: usize = header.strip_prefix('*')?.trim_end().parse().ok()?;
    let mut used = header.len();
    let mut name = None;
    for _ in 0..count {
        let len_line = lines.next()?;
        let len: usize = len_line.strip_prefix('$')?.trim_end().parse().ok()?;
        let value = lines.next()?;
        if value.len() != len + 2 {
            return None;
        }
        used += len_line.len() + value.len();
        name.get_or_insert_with(|| value.trim_end().to_string());
    }
    Some((name?, used))
}

/// `rediss://`: a real `redis-server` that speaks only TLS, with a certificate from a
/// private CA made for the test. With that CA (`SSE_REDIS_CA_CERT`) events flow; without
/// it the server refuses to start, so the certificate is really checked.
#[tokio::test]
async fn rediss_over_tls_with_a_private_ca() {
    let dir = sse_notify_testkit::TempDir::new("sse-tls");
    let path = |name: &str| dir.path().join(name).to_string_lossy().to_string();
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    std::fs::write(
        path("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("san.ext"),
        "-out",
        &path("server.pem"),
    ]);
    let tls_port = sse_notify_testkit::free_port().to_string();
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &path("server.pem"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.pem"),
        "--tls-auth-clients",
        "no",
    ]);
    sse_notify_testkit::wait_listening(([127, 0, 0, 1], tls_port.parse().unwrap()).into(), WAIT);
    let url = format!("rediss://127.0.0.1:{tls_port}");

    let refused = sse_notify::server::SseService::start(test_config().redis_url(url.clone())).await;
    assert!(refused.is_err(), "a certificate from an unknown CA was accepted");

    let config = test_config()
        .redis_url(url)
        .redis_ca_cert(std::path::PathBuf::from(path("ca.pem")));
    let server = start_server(config).await;
    let mut client = server.connect("tls", "", None).await;
    server
        .service
        .send_notification("tls", note("over TLS"))
        .await
        .unwrap();
    let seen = client.next().await;
    assert_eq!(text(&seen), "over TLS");
    drop(client);
    server.wait_for_clients("tls", 0).await;
    server
        .service
        .send_notification("tls", note("replayed over TLS"))
        .await
        .unwrap();
    let mut again = server.connect("tls", "", Some(&seen.id)).await;
    assert_eq!(text(&again.next().await), "replayed over TLS");
    drop(redis);
}

// ---- Redis Cluster. ----

async fn start_cluster() -> RedisCluster {
    tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .unwrap()
}

fn cluster_config(cluster: &RedisCluster) -> SseConfig {
    test_config().redis_url(cluster.urls()).redis_cluster(true)
}

/// Users whose lanes are on every shard of the cluster.
fn users_on_every_shard(prefix: &str) -> Vec<String> {
    let users: Vec<String> = (0..12).map(|i| format!("{prefix}{i}")).collect();
    let shards: std::collections::HashSet<u8> = users
        .iter()
        // `redis-cli --cluster create` gives 3 primaries slots 0-5460, 5461-10922, 10923-.
        .map(
            |u| match router::key_slot(format!("sse:{{u:{u}}}:stream").as_bytes()) {
                0..=5460 => 0,
                5461..=10922 => 1,
                _ => 2,
            },
        )
        .collect();
    assert_eq!(shards.len(), 3, "pick users whose lanes land on all three shards");
    users
}

/// Two instances on a cluster: events published on A reach clients on B, in order, once,
/// and only their own; a client of B resumes on A with its `<user>.<broadcast>` id and gets
/// exactly what it missed, user events and broadcasts; a disconnect reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_a_redis_cluster_act_as_one() {
    let cluster = start_cluster().await;
    let a = start_server(cluster_config(&cluster)).await;
    let b = start_server(cluster_config(&cluster)).await;
    let users = users_on_every_shard("c");
    let mut clients = Vec::new();
    for user in &users {
        clients.push(b.connect(user, "", None).await);
    }
    for n in 0..3 {
        for user in &users {
            a.service
                .send_notification(user, note(&format!("{user}-{n}")))
                .await
                .unwrap();
        }
    }
    a.service.send_system_alert(alert("everyone")).await.unwrap();
    for (user, client) in users.iter().zip(&mut clients) {
        let got = next_texts(client, 4).await;
        // The user's lane in order; the broadcast lane's one event anywhere among them.
        let own: Vec<&String> = got.iter().filter(|t| *t != "everyone").collect();
        assert_eq!(
            own,
            [&format!("{user}-0"), &format!("{user}-1"), &format!("{user}-2")]
        );
        assert_eq!(got.iter().filter(|t| *t == "everyone").count(), 1);
    }
    // One batch over every shard (one script per shard) and a broadcast: each gets its own.
    let batch: Vec<serde_json::Value> = users
        .iter()
        .map(|u| json!({"user_id": u, "event": "notification", "data": {"title": format!("{u}-batch"), "message": "m"}}))
        .chain([json!({"broadcast": true, "event": "system_alert", "data": {"message": "all-batch", "type": "info"}})])
        .collect();
    let (status, body) = a.publish(json!(batch)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(users.len() + 1));
    for (user, client) in users.iter().zip(&mut clients) {
        // Two lanes on two shards: either may come first.
        let mut got = [text(&client.next().await), text(&client.next().await)];
        got.sort();
        assert_eq!(got, ["all-batch".to_string(), format!("{user}-batch")]);
    }
    for client in &mut clients {
        assert!(
            client.nothing_within(Duration::from_millis(100)).await,
            "a duplicate or another's event"
        );
    }

    // Away from B, back on A with the last id B sent.
    drop(clients);
    b.wait_for_clients(&users[0], 0).await;
    let seen = b.resume_point(&users[0]).await;
    assert!(seen.contains('.'), "a cursor in two lanes: {seen}");
    publish_while_away(&b.service, &users[0]).await;
    let mut back = a.connect(&users[0], "", Some(&seen)).await;
    assert_eq!(next_texts(&mut back, 3).await, MISSED);
    assert!(back.nothing_within(Duration::from_millis(300)).await);

    let mut on_b = b.connect(&users[0], "", None).await;
    b.wait_for_clients(&users[0], 1).await;
    let (status, body) = a.post_json("/api/disconnect", json!({"user_id": users[0]})).await;
    assert_eq!((status, body["closed"].as_u64()), (200, Some(2)), "{body}");
    for stream in [&mut back, &mut on_b] {
        let last = stream.until_end().await;
        assert_eq!(last.last().map(|e| e.event.as_str()), Some("session_ended"));
    }
}

/// A primary killed (`SIGKILL`) while events flow to users on every shard: its replica
/// takes over, and every event whose publish succeeded reaches its client exactly once and
/// in order (an event whose publish failed may arrive, once); the broker is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_while_events_flow_loses_nothing() {
    let mut cluster = start_cluster().await;
    let a = start_server(cluster_config(&cluster)).await;
    let b = start_server(cluster_config(&cluster)).await;
    let users = users_on_every_shard("f");
    let mut clients = Vec::new();
    for user in &users {
        clients.push(b.connect(user, "", None).await);
    }
    let publisher = publish_for(a.service.clone(), users.clone(), 12);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Node 0 is the primary of slots 0-5460: some users' lanes.
    cluster.nodes[0].kill();
    let sent = publisher.await.unwrap();
    let failed: usize = sent.iter().flatten().filter(|(_, ok)| !ok).count();
    eprintln!("{} publishes, {failed} failed", sent.iter().flatten().count());
    assert_all_delivered_once(&users, &mut clients, &sent).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.service.broker_health() != sse_notify::server::BrokerHealth::Healthy {
        assert!(tokio::time::Instant::now() < deadline, "B stays degraded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes numbered notifications to each of `users` on `service` for `secs`, 20 ms
/// apart; returns per user each title and whether its publish succeeded, in publish order.
fn publish_for(
    service: SseService,
    users: Vec<String>,
    secs: u64,
) -> tokio::task::JoinHandle<Vec<Vec<(String, bool)>>> {
    tokio::spawn(async move {
        let mut sent: Vec<Vec<(String, bool)>> = vec![Vec::new(); users.len()];
        let started = tokio::time::Instant::now();
        let mut round = 0;
        while started.elapsed() < Duration::from_secs(secs) {
            for (i, user) in users.iter().enumerate() {
                let title = format!("{user}-{round}");
                let ok = service.send_notification(user, note(&title)).await.is_ok();
                sent[i].push((title, ok));
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    })
}

/// Every client got every event whose publish succeeded, once, in order; nothing else but
/// (once) events whose publish failed.
async fn assert_all_delivered_once(
    users: &[String],
    clients: &mut [SseClient],
    sent: &[Vec<(String, bool)>],
) {
    for ((user, client), sent) in users.iter().zip(clients).zip(sent) {
        let confirmed: Vec<&str> = sent
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(t, _)| t.as_str())
            .collect();
        let mut got: Vec<String> = Vec::new();
        while got.last().map(String::as_str) != confirmed.last().copied() {
            let event = tokio::time::timeout(Duration::from_secs(20), client.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{user}: stalled after {} of {} events",
                        got.len(),
                        confirmed.len()
                    )
                });
            got.push(text(&event));
        }
        assert!(
            client.nothing_within(Duration::from_millis(200)).await,
            "{user}: a duplicate at the end"
        );
        let order: Vec<&str> = sent.iter().map(|(t, _)| t.as_str()).collect();
        let positions: Vec<usize> = got
            .iter()
            .map(|t| {
                order
                    .iter()
                    .position(|o| o == t)
                    .unwrap_or_else(|| panic!("{user}: unknown {t}"))
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{user}: out of order or twice: {got:?}"
        );
        for title in &confirmed {
            assert!(got.iter().any(|g| g == title), "{user}: lost {title}");
        }
    }
}

/// The subscriber connections cut on every primary (`CLIENT KILL`) while events flow:
/// what was published until they are back is read from the streams, so every client gets
/// every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_subscriber_connections_catch_up_from_the_streams() {
    let cluster = start_cluster().await;
    let server = start_server(cluster_config(&cluster)).await;
    let users = users_on_every_shard("s");
    let mut clients = Vec::new();
    for user in &users {
        clients.push(server.connect(user, "", None).await);
    }
    let publisher = publish_for(server.service.clone(), users.clone(), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut cut = 0;
    for primary in &cluster.nodes[..3] {
        let list: String = redis_query(primary, redis::cmd("CLIENT").arg("LIST")).await;
        for line in list.lines().filter(|l| !l.contains(" ssub=0 ")) {
            let id = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("id="))
                .unwrap();
            let _: i64 = redis_query(primary, redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id)).await;
            cut += 1;
        }
    }
    assert_eq!(cut, 3, "one subscriber connection per primary");
    let sent = publisher.await.unwrap();
    assert!(
        sent.iter().flatten().all(|(_, ok)| *ok),
        "publishing is not affected"
    );
    assert_all_delivered_once(&users, &mut clients, &sent).await;
}

/// With `SSE_REDIS_WAIT_REPLICAS=1` a publish is acknowledged once a replica has it too:
/// right after the answer the replica holds it, and while the replica is stopped a publish
/// waits for it (up to 500 ms) before it is acknowledged on the primary alone.
#[tokio::test]
async fn publishes_wait_for_a_replica_when_asked() {
    let primary = RedisServer::start();
    let port = primary.url().rsplit(':').next().unwrap().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info: String = redis_query(&replica, redis::cmd("INFO").arg("replication")).await;
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server = start_server(test_config().redis_url(primary.url()).redis_wait_replicas(1)).await;
    let sse = &server.service;
    let id = sse.send_notification("w", note("kept twice")).await.unwrap();
    let on_replica: u64 = redis_query(&replica, redis::cmd("GET").arg("sse:seq")).await;
    assert!(on_replica >= id.0, "acknowledged before the replica had it");

    let pid = replica.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let started = tokio::time::Instant::now();
    let sent = sse.send_notification("w", note("primary only")).await;
    let waited = started.elapsed();
    signal("-CONT");
    sent.unwrap();
    assert!(
        waited >= Duration::from_millis(450),
        "acknowledged after {waited:?} without a replica's confirmation"
    );
}
