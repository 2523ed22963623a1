//! The router and the sharded subscriber against a real 3-primary, 3-replica Redis Cluster
//! (one per test, on free ports, killed on drop).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use rand::Rng;
use redis::{aio::MultiplexedConnection, Value};
use sse_notify::server::broker::{
    router::{key_slot, ClusterRouter, RouterOptions, SLOTS},
    subscriber::SubscriberEvent,
};
use sse_notify_testkit::RedisCluster;
use tokio::sync::mpsc;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn start() -> (RedisCluster, ClusterRouter) {
    init_tracing();
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
        .await
        .expect("cluster started");
    let seeds: Vec<String> = cluster.urls().split(',').map(String::from).collect();
    let router = ClusterRouter::connect(&seeds, RouterOptions::default())
        .await
        .expect("router connected");
    assert_eq!(router.primaries().len(), 3);
    (cluster, router)
}

async fn node(addr: &str) -> MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("node connection")
}

fn channels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sse:{{u:user{i}}}:live")).collect()
}

async fn spublish(router: &ClusterRouter, channel: &str, payload: &str) -> bool {
    let cmd = redis::cmd("SPUBLISH").arg(channel).arg(payload).clone();
    router.query::<i64>(channel, &cmd).await.is_ok()
}

/// Receives until `done` says so or `within` passes.
async fn receive_until(
    events: &mut mpsc::Receiver<SubscriberEvent>,
    within: Duration,
    mut on_event: impl FnMut(SubscriberEvent) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => {
                if on_event(event) {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slot_matches_cluster_keyslot() {
    let (_cluster, router) = start().await;
    let mut conn = node(&router.primaries()[0]).await;
    let mut rng = rand::thread_rng();
    let alphabet = b"ab{}:xyz01{}";
    let mut keys: Vec<Vec<u8>> = (0..400)
        .map(|i| {
            let len = rng.gen_range(0..16);
            if i % 4 == 0 {
                // Arbitrary bytes, not only UTF-8.
                (0..len).map(|_| rng.gen::<u8>()).collect()
            } else {
                (0..len)
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect()
            }
        })
        .collect();
    keys.extend(
        [
            "123456789",
            "{user1000}.following",
            "{}x",
            "a{b}c{d}",
            "{{}}",
            "x{y",
        ]
        .map(|k| k.as_bytes().to_vec()),
    );
    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(key);
    }
    let slots: Vec<u16> = pipe.query_async(&mut conn).await.expect("CLUSTER KEYSLOT");
    for (key, slot) in keys.iter().zip(slots) {
        assert_eq!(key_slot(key), slot, "key {:?}", String::from_utf8_lossy(key));
    }
    assert_eq!(key_slot(b"123456789"), 12739);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_routes_keys_and_scripts() {
    let (_cluster, router) = start().await;
    let started = Instant::now();
    let mut owners = HashSet::new();
    for i in 0..1000 {
        let key = format!("key:{i}");
        owners.insert(router.owner_of(key_slot(key.as_bytes())).expect("owner"));
        let set = redis::cmd("SET").arg(&key).arg(i).clone();
        let () = router.query(&key, &set).await.expect("SET");
    }
    for i in 0..1000 {
        let key = format!("key:{i}");
        let get = redis::cmd("GET").arg(&key).clone();
        let value: i64 = router.query(&key, &get).await.expect("GET");
        assert_eq!(value, i);
    }
    assert_eq!(owners.len(), 3, "keys spread over all primaries");
    println!("2000 routed commands in {:?}", started.elapsed());

    // EVALSHA built by hand: NOSCRIPT on first use, loaded and run again.
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    for (key, expected) in [("{s}:a", 5), ("{s}:a", 10), ("{t}:b", 5)] {
        let evalsha = redis::cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(1)
            .arg(key)
            .arg(5)
            .clone();
        let value: i64 = router.eval_script(key, &script, &evalsha).await.expect("script");
        assert_eq!(value, expected);
    }
    // A non-retryable error comes back at once.
    let bad = redis::cmd("INCR").arg("{s}:a:str").clone();
    let () = router
        .query("{s}:a:str", &redis::cmd("SET").arg("{s}:a:str").arg("x").clone())
        .await
        .unwrap();
    let err = router.query::<i64>("{s}:a:str", &bad).await.unwrap_err();
    assert!(
        matches!(err, sse_notify::server::broker::router::RouterError::Redis(_)),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_delivers() {
    let (_cluster, router) = start().await;
    let (subscriber, mut events) = router.subscriber(1024);
    let channels = channels(200);
    subscriber
        .subscribe_many(channels.clone())
        .await
        .expect("subscribed");
    assert_eq!(subscriber.live_channels().len(), 200);
    for channel in &channels {
        assert!(spublish(&router, channel, &format!("hello {channel}")).await);
    }
    let mut missing: HashSet<String> = channels.iter().cloned().collect();
    let all = receive_until(&mut events, Duration::from_secs(10), |event| {
        if let SubscriberEvent::Message { channel, payload } = event {
            assert_eq!(payload, format!("hello {channel}").into_bytes());
            missing.remove(&channel);
        }
        missing.is_empty()
    })
    .await;
    assert!(all, "missing {} channels", missing.len());

    // Unsubscribed channels deliver nothing more.
    subscriber.unsubscribe(&channels[0]).await;
    assert!(spublish(&router, &channels[0], "late").await);
    assert!(spublish(&router, &channels[1], "still").await);
    let mut seen = Vec::new();
    receive_until(&mut events, Duration::from_millis(500), |event| {
        seen.push(event);
        false
    })
    .await;
    assert_eq!(
        seen,
        vec![SubscriberEvent::Message {
            channel: channels[1].clone(),
            payload: b"still".to_vec()
        }]
    );
    // A full queue: messages that do not fit are dropped, and their channels come back
    // as Resubscribed (catch up from the streams) once there is room.
    let (small, mut small_events) = router.subscriber(4);
    let busy: Vec<String> = (0..20).map(|i| format!("sse:{{u:busy{i}}}:live")).collect();
    small.subscribe_many(busy.clone()).await.expect("subscribed");
    for channel in &busy {
        assert!(spublish(&router, channel, "burst").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut messages = HashSet::new();
    let mut caught_up = HashSet::new();
    let covered = receive_until(&mut small_events, Duration::from_secs(5), |event| {
        match event {
            SubscriberEvent::Message { channel, .. } => {
                messages.insert(channel);
            }
            SubscriberEvent::Resubscribed { channels } => caught_up.extend(channels),
            SubscriberEvent::Lost { .. } => panic!("nothing was lost"),
        }
        busy.iter().all(|c| messages.contains(c) || caught_up.contains(c))
    })
    .await;
    println!(
        "queue of 4: {} messages, {} channels to catch up",
        messages.len(),
        caught_up.len()
    );
    assert!(covered, "every channel delivered or marked for catch-up");
    assert_eq!(messages.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_primary_failover() {
    let (mut cluster, router) = start().await;
    let (subscriber, mut events) = router.subscriber(10_000);
    let channels = channels(200);
    subscriber
        .subscribe_many(channels.clone())
        .await
        .expect("subscribed");

    let victim = router.owner_of(key_slot(channels[0].as_bytes())).expect("owner");
    let victim_channels: HashSet<String> = channels
        .iter()
        .filter(|c| router.owner_of(key_slot(c.as_bytes())).as_deref() == Some(&victim))
        .cloned()
        .collect();
    let port: u16 = victim.rsplit_once(':').unwrap().1.parse().unwrap();
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == port)
        .expect("victim node")
        .kill();
    let killed = Instant::now();

    let mut delivered: HashSet<String> = HashSet::new();
    let mut lost: HashSet<String> = HashSet::new();
    let mut resubscribed: HashSet<String> = HashSet::new();
    let mut first_resubscribed = None;
    let mut failed_publishes = 0;
    let mut round = 0;
    while delivered.len() < channels.len() && killed.elapsed() < Duration::from_secs(25) {
        round += 1;
        let todo: Vec<&String> = channels.iter().filter(|c| !delivered.contains(*c)).collect();
        let payload = format!("after-{round}");
        let results = futures::future::join_all(todo.iter().map(|c| spublish(&router, c, &payload))).await;
        failed_publishes += results.iter().filter(|ok| !**ok).count();
        receive_until(&mut events, Duration::from_millis(300), |event| {
            match event {
                SubscriberEvent::Message { channel, payload } => {
                    if payload.starts_with(b"after-") {
                        delivered.insert(channel);
                    }
                }
                SubscriberEvent::Lost { channels } => lost.extend(channels),
                SubscriberEvent::Resubscribed { channels } => {
                    first_resubscribed.get_or_insert(killed.elapsed());
                    resubscribed.extend(channels);
                }
            }
            false
        })
        .await;
    }
    let all_delivered = killed.elapsed();
    println!(
        "victim {victim} ({} channels): first Resubscribed after {first_resubscribed:?}, \
         all {} delivered after {all_delivered:?}, {round} rounds, {failed_publishes} failed publishes",
        victim_channels.len(),
        delivered.len()
    );
    assert_eq!(delivered.len(), channels.len(), "every channel delivers again");
    assert!(all_delivered < Duration::from_secs(20), "{all_delivered:?}");
    assert!(
        victim_channels.is_subset(&lost),
        "Lost covers the victim's channels"
    );
    assert!(
        victim_channels.is_subset(&resubscribed),
        "Resubscribed covers the victim's channels"
    );
    assert!(!router.primaries().contains(&victim));

    // Writes to the failed shard's slots work on the promoted replica.
    let key = "{u:user0}:after-failover";
    let set = redis::cmd("SET").arg(key).arg("ok").clone();
    let () = router.query(key, &set).await.expect("SET after failover");
    let value: String = router
        .query(key, &redis::cmd("GET").arg(key).clone())
        .await
        .expect("GET");
    assert_eq!(value, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_slot_migration() {
    let (cluster, router) = start().await;
    let (subscriber, mut events) = router.subscriber(1024);
    // A second router without a subscriber: its table stays stale until a MOVED.
    let seeds: Vec<String> = cluster.urls().split(',').map(String::from).collect();
    let stale = ClusterRouter::connect(&seeds, RouterOptions::default())
        .await
        .unwrap();
    let channel = "sse:{u:mig}:live".to_string();
    let key = "{u:mig}:k";
    let slot = key_slot(key.as_bytes());
    assert_eq!(slot, key_slot(channel.as_bytes()));
    assert!(slot < SLOTS);

    let () = router
        .query(key, &redis::cmd("SET").arg(key).arg("v1").clone())
        .await
        .unwrap();
    subscriber.subscribe(channel.clone()).await.unwrap();
    assert!(spublish(&router, &channel, "before").await);
    assert!(
        receive_until(&mut events, Duration::from_secs(5), |e| matches!(
            e,
            SubscriberEvent::Message { .. }
        ))
        .await
    );

    let source = router.owner_of(slot).unwrap();
    let target = router.primaries().into_iter().find(|p| *p != source).unwrap();
    let mut source_conn = node(&source).await;
    let mut target_conn = node(&target).await;
    let myid = redis::cmd("CLUSTER").arg("MYID").clone();
    let source_id: String = myid.query_async(&mut source_conn).await.unwrap();
    let target_id: String = myid.query_async(&mut target_conn).await.unwrap();
    let setslot = |state: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(id)
            .clone()
    };
    let () = setslot("IMPORTING", &source_id)
        .query_async(&mut target_conn)
        .await
        .unwrap();
    let () = setslot("MIGRATING", &target_id)
        .query_async(&mut source_conn)
        .await
        .unwrap();

    // A key not on the source while the slot migrates: ASK, then ASKING + GET on the target.
    let absent: Option<String> = router
        .query("{u:mig}:absent", &redis::cmd("GET").arg("{u:mig}:absent").clone())
        .await
        .expect("GET via ASK");
    assert_eq!(absent, None);

    let (host, port) = target.rsplit_once(':').unwrap();
    let migrate = redis::cmd("MIGRATE")
        .arg(host)
        .arg(port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(key)
        .clone();
    let () = migrate.query_async(&mut source_conn).await.unwrap();
    let migrated = Instant::now();
    for conn in [&mut target_conn, &mut source_conn] {
        let () = setslot("NODE", &target_id).query_async(conn).await.unwrap();
    }
    for other in router.primaries() {
        if other != source && other != target {
            let () = setslot("NODE", &target_id)
                .query_async(&mut node(&other).await)
                .await
                .unwrap();
        }
    }

    // The second router's table still says `source`: MOVED, then the target answers.
    assert_eq!(stale.owner_of(slot).as_deref(), Some(source.as_str()));
    let value: String = stale
        .query(key, &redis::cmd("GET").arg(key).clone())
        .await
        .expect("GET after MOVED");
    assert_eq!(value, "v1");
    assert_eq!(stale.owner_of(slot).as_deref(), Some(target.as_str()));

    // The source unsubscribed the channel (sunsubscribe push); it is subscribed on the target.
    let resubscribed = receive_until(
        &mut events,
        Duration::from_secs(10),
        |e| matches!(e, SubscriberEvent::Resubscribed { ref channels } if channels.contains(&channel)),
    )
    .await;
    assert!(resubscribed, "Resubscribed after migration");
    println!("resubscribed {:?} after the slot moved", migrated.elapsed());
    assert!(spublish(&router, &channel, "after").await);
    let got = receive_until(&mut events, Duration::from_secs(5), |e| {
        e == SubscriberEvent::Message {
            channel: channel.clone(),
            payload: b"after".to_vec(),
        }
    })
    .await;
    assert!(got, "message after migration");
    let _: Value = router.query(key, &redis::cmd("PING").clone()).await.unwrap();
}
