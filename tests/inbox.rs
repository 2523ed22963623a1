//! The notification center: the store's behaviour on SQLite and on a real PostgreSQL, the
//! HTTP routes over TCP with real SSE clients, and two instances sharing Redis and one
//! PostgreSQL.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use serde_json::{json, Value};
use sse_notify::{
    api::InboxPage,
    events::{SystemAlert, SystemAlertKind},
    server::{
        inbox::{InboxCursor, InboxOp, InboxQuery, InboxStatus, InboxStore, NewItem, Selection, SqlInbox},
        EventId, SendError, SseService,
    },
};
use sse_notify_testkit::{PostgresServer, TempDir};

fn item(id: u64, user: Option<&str>, created_ms: u64) -> NewItem {
    NewItem {
        id,
        user: user.map(Arc::from),
        event: "notification".into(),
        data: format!(r#"{{"title":"n{id}","message":"m","timestamp":{created_ms}}}"#),
        created_ms,
    }
}

fn ids(page: &InboxPage) -> Vec<&str> {
    page.items.iter().map(|i| i.id.as_str()).collect()
}

async fn list(store: &dyn InboxStore, user: &str, status: InboxStatus) -> InboxPage {
    let query = InboxQuery {
        status,
        ..Default::default()
    };
    store.list(user, &query).await.unwrap()
}

/// What every store must do, run against each backend.
async fn behaves_as_an_inbox(url: &str) {
    let store = SqlInbox::connect(url, 5).await.expect("store opens");
    let store: &dyn InboxStore = &store;
    // alice: 1..=3, bob: 4, a kept broadcast: 5.
    store
        .keep(&[
            item(1, Some("alice"), 1_000),
            item(2, Some("alice"), 2_000),
            item(3, Some("alice"), 3_000),
            item(4, Some("bob"), 3_500),
            item(5, None, 4_000),
        ])
        .await
        .unwrap();
    let page = list(store, "alice", InboxStatus::All).await;
    assert_eq!(
        ids(&page),
        ["5", "3", "2", "1"],
        "newest first, the broadcast included"
    );
    assert_eq!((page.unread, page.total), (4, 4));
    assert_eq!(page.items[1].data["title"], "n3");
    assert_eq!(page.items[1].created, 3_000);
    assert_eq!(
        ids(&list(store, "bob", InboxStatus::All).await),
        ["5", "4"],
        "never alice's"
    );

    // Pages of two, cursor to cursor: every item once.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let query = InboxQuery {
            before,
            limit: 2,
            ..Default::default()
        };
        let page = store.list("alice", &query).await.unwrap();
        seen.extend(page.items.iter().map(|i| i.id.clone()));
        match page.next {
            Some(next) => before = Some(InboxCursor::parse(&next).unwrap()),
            None => break,
        }
    }
    assert_eq!(seen, ["5", "3", "2", "1"]);

    // Read one; another user's id and an unknown one are ignored.
    store
        .change("alice", InboxOp::Read, &Selection::Ids(vec![3, 4, 999]), 10_000)
        .await
        .unwrap();
    let page = list(store, "alice", InboxStatus::All).await;
    assert_eq!(page.unread, 3);
    assert_eq!(page.items[1].read, Some(10_000));
    assert_eq!(
        ids(&list(store, "alice", InboxStatus::Unread).await),
        ["5", "2", "1"]
    );
    assert_eq!(
        list(store, "bob", InboxStatus::All).await.unread,
        2,
        "bob's item stays unread"
    );

    // A broadcast has read state per user.
    store
        .change("alice", InboxOp::Read, &Selection::Ids(vec![5]), 11_000)
        .await
        .unwrap();
    assert_eq!(store.counts("alice").await.unwrap().unread, 2);
    let bob = list(store, "bob", InboxStatus::Unread).await;
    assert_eq!(ids(&bob), ["5", "4"], "alice reading it does not read it for bob");

    // Unread, archive, unarchive.
    store
        .change("alice", InboxOp::Unread, &Selection::Ids(vec![3]), 12_000)
        .await
        .unwrap();
    assert_eq!(store.counts("alice").await.unwrap().unread, 3);
    store
        .change("alice", InboxOp::Archive, &Selection::Ids(vec![1, 2]), 13_000)
        .await
        .unwrap();
    let counts = store.counts("alice").await.unwrap();
    assert_eq!(
        (counts.unread, counts.total),
        (1, 2),
        "archived items count for neither"
    );
    let archived = list(store, "alice", InboxStatus::Archived).await;
    assert_eq!(ids(&archived), ["2", "1"]);
    assert_eq!(archived.items[0].archived, Some(13_000));
    store
        .change("alice", InboxOp::Unarchive, &Selection::Ids(vec![2]), 14_000)
        .await
        .unwrap();
    assert_eq!(
        ids(&list(store, "alice", InboxStatus::All).await),
        ["5", "3", "2"]
    );

    // All at once.
    store
        .change("alice", InboxOp::Read, &Selection::All, 15_000)
        .await
        .unwrap();
    assert_eq!(store.counts("alice").await.unwrap().unread, 0);
    assert_eq!(store.counts("bob").await.unwrap().unread, 2, "only alice's");
    store.keep(&[item(6, Some("alice"), 16_000)]).await.unwrap();
    assert_eq!(
        store.counts("alice").await.unwrap().unread,
        1,
        "a new item after all read"
    );

    // Kept once: the same id again changes nothing.
    store.keep(&[item(6, Some("alice"), 16_000)]).await.unwrap();
    assert_eq!(store.counts("alice").await.unwrap().total, 4);

    // At most 5 per user: the oldest go, once the owner is trimmed (the core does it off
    // the publish path); an owner within the limit and the broadcasts lose nothing.
    let more: Vec<NewItem> = (7..=10).map(|i| item(i, Some("alice"), 20_000 + i)).collect();
    store.keep(&more).await.unwrap();
    assert_eq!(
        store.counts("alice").await.unwrap().total,
        8,
        "keep alone trims nothing"
    );
    store.trim(&["alice", "bob"], true).await.unwrap();
    assert_eq!(store.counts("bob").await.unwrap().total, 2);
    let all: Vec<String> = {
        let mut query = InboxQuery {
            limit: 100,
            ..Default::default()
        };
        let mut ids = Vec::new();
        for status in [InboxStatus::All, InboxStatus::Archived] {
            query.status = status;
            ids.extend(
                store
                    .list("alice", &query)
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .map(|i| i.id),
            );
        }
        ids
    };
    assert_eq!(all.len(), 6, "5 of alice's own and the broadcast: {all:?}");
    assert!(!all.contains(&"1".to_string()) && !all.contains(&"2".to_string()));

    // Pruned by age in batches: bob's 4 (3,500 ms) and the broadcast (4,000 ms), one per
    // batch; alice's newer ones stay.
    assert_eq!(store.prune(4_500, 1).await.unwrap(), 1);
    assert_eq!(store.prune(4_500, 100).await.unwrap(), 1);
    assert_eq!(store.prune(4_500, 100).await.unwrap(), 0);
    assert_eq!(
        ids(&list(store, "bob", InboxStatus::All).await),
        Vec::<&str>::new()
    );
    assert_eq!(store.counts("alice").await.unwrap().total, 5);

    // A batch larger than one insert statement, and many owners at once.
    let big: Vec<NewItem> = (0..1_200u64)
        .map(|i| {
            let owner = if i % 2 == 0 {
                "carol".to_string()
            } else {
                format!("u{i}")
            };
            item(100_000 + i, Some(&owner), 50_000 + i)
        })
        .collect();
    store.keep(&big).await.unwrap();
    let owners: Vec<String> = big
        .iter()
        .filter_map(|i| i.user.as_deref().map(String::from))
        .collect();
    let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
    store.trim(&owners, false).await.unwrap();
    let carol = list(store, "carol", InboxStatus::All).await;
    assert_eq!(
        carol.total, 5,
        "trimmed to the limit, owners past one query's 500 too"
    );
    assert_eq!(carol.items[0].id, "101198", "the newest kept");
    assert_eq!(store.counts("u1199").await.unwrap().total, 1);
}

#[tokio::test]
async fn the_store_behaves_on_sqlite() {
    let dir = TempDir::new("inbox-sqlite");
    let url = format!("sqlite://{}/nested/inbox.db", dir.path().display());
    behaves_as_an_inbox(&url).await;
}

#[tokio::test]
async fn the_store_behaves_on_postgres() {
    let pg = PostgresServer::start();
    behaves_as_an_inbox(&pg.database("behaviour")).await;
}

#[tokio::test]
async fn instances_starting_together_migrate_once() {
    let pg = PostgresServer::start();
    let url = pg.database("together");
    let opened = futures::future::join_all((0..4).map(|_| SqlInbox::connect(&url, 10))).await;
    assert!(opened.iter().all(Result::is_ok), "{opened:?}");
}

/// A server with the inbox on `url`.
async fn inbox_server(url: &str) -> TestServer {
    start_server(test_config().inbox_url(url.to_string())).await
}

fn sqlite_url(dir: &TempDir) -> String {
    format!("sqlite://{}/inbox.db", dir.path().display())
}

/// The next event named `name`, skipping others.
async fn next_named(client: &mut SseClient, name: &str) -> Value {
    loop {
        let event = client.next().await;
        if event.event == name {
            return data(&event);
        }
    }
}

async fn get_inbox(server: &TestServer, user: &str, query: &str) -> (u16, Value) {
    let response = server
        .http
        .get(server.url(&format!("/api/inbox{query}")))
        .bearer_auth(server.token(user))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn post_inbox(server: &TestServer, user: &str, op: &str, body: Value) -> (u16, Value) {
    let response = server
        .http
        .post(server.url(&format!("/api/inbox/{op}")))
        .bearer_auth(server.token(user))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn kept_events_are_listed_and_every_change_reaches_every_stream() {
    let dir = TempDir::new("inbox-http");
    let server = inbox_server(&sqlite_url(&dir)).await;
    let mut laptop = server.connect("alice", "", None).await;
    // Another device, streaming only reels: still hears the inbox change.
    let mut phone = server.connect("alice", "?events=reel_ready", None).await;

    let id = server
        .service
        .send_notification("alice", note("hello"))
        .await
        .unwrap();
    let shown = laptop.next().await;
    assert_eq!(
        (shown.event.as_str(), shown.id.clone()),
        ("notification", id.to_string())
    );
    let added = next_named(&mut laptop, "inbox").await;
    assert_eq!(
        added,
        json!({"op": "added", "ids": [id.to_string()], "all": false, "unread": null})
    );
    assert_eq!(next_named(&mut phone, "inbox").await["op"], "added");
    // Not kept: no inbox change.
    server
        .service
        .send_user_update(
            "alice",
            sse_notify::events::UserUpdate {
                kind: sse_notify::events::UserUpdateKind::Profile,
                data: json!({}),
            },
        )
        .await
        .unwrap();
    assert_eq!(laptop.next().await.event, "user_update");

    let (status, page) = get_inbox(&server, "alice", "").await;
    assert_eq!(status, 200);
    assert_eq!(page["unread"], 1);
    assert_eq!(page["total"], 1);
    assert_eq!(page["items"][0]["id"], id.to_string());
    assert_eq!(page["items"][0]["event"], "notification");
    assert_eq!(page["items"][0]["data"]["title"], "hello");
    assert_eq!(page["items"][0]["read"], Value::Null);

    // Read on one device: every stream of alice hears it, with the new count.
    let (status, counts) = post_inbox(&server, "alice", "read", json!({"ids": [id.to_string()]})).await;
    assert_eq!((status, counts), (200, json!({"unread": 0, "total": 1})));
    let change = json!({"op": "read", "ids": [id.to_string()], "all": false, "unread": 0});
    assert_eq!(next_named(&mut phone, "inbox").await, change);
    assert_eq!(next_named(&mut laptop, "inbox").await, change);

    // Bob cannot touch alice's item, and learns nothing about it.
    post_inbox(&server, "alice", "unread", json!({"all": true})).await;
    let (status, counts) = post_inbox(&server, "bob", "read", json!({"ids": [id.to_string()]})).await;
    assert_eq!((status, counts), (200, json!({"unread": 0, "total": 0})));
    assert_eq!(get_inbox(&server, "alice", "").await.1["unread"], 1);
    assert_eq!(get_inbox(&server, "bob", "").await.1["items"], json!([]));

    // Archive and the archived view.
    post_inbox(&server, "alice", "archive", json!({"ids": [id.to_string()]})).await;
    assert_eq!(
        get_inbox(&server, "alice", "?status=archived").await.1["items"][0]["id"],
        id.to_string()
    );
    assert_eq!(get_inbox(&server, "alice", "").await.1["total"], 0);
}

#[tokio::test]
async fn bad_requests_name_the_field_and_strangers_are_refused() {
    let dir = TempDir::new("inbox-bad");
    let server = inbox_server(&sqlite_url(&dir)).await;
    for (query, field) in [
        ("?status=new", "status"),
        ("?limit=500", "limit"),
        ("?before=junk", "before"),
    ] {
        let (status, body) = get_inbox(&server, "alice", query).await;
        assert_eq!((status, body["field"].as_str()), (400, Some(field)), "{query}");
    }
    for (body, field) in [
        (json!({"ids": []}), "ids"),
        (json!({"ids": ["1", "two"]}), "ids[1]"),
        (json!({"ids": ["1"], "all": true}), "all"),
        (json!("read everything"), "body"),
    ] {
        let (status, answer) = post_inbox(&server, "alice", "read", body.clone()).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{body}");
    }
    // No session.
    let response = server.http.get(server.url("/api/inbox")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    // A page on another site, riding alice's cookie.
    let response = server
        .http
        .post(server.url("/api/inbox/read"))
        .header("cookie", format!("sse_session={}", server.token("alice")))
        .header("origin", "https://evil.example")
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["field"], "origin");
    // The same cookie from the server's own page is fine.
    let response = server
        .http
        .get(server.url("/api/inbox"))
        .header("cookie", format!("sse_session={}", server.token("alice")))
        .header("origin", format!("http://{}", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn without_a_store_the_inbox_says_how_to_turn_it_on() {
    let server = start_server(test_config()).await;
    let (status, body) = get_inbox(&server, "alice", "").await;
    assert_eq!(status, 404);
    assert_eq!(body["field"], "SSE_INBOX_URL");
    assert!(body["error"].as_str().unwrap().contains("sqlite://"));
    assert!(server.service.inbox("alice").is_err());
    // Publishing is untouched.
    server
        .service
        .send_notification("alice", note("x"))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_inbox_outlives_a_restart() {
    let dir = TempDir::new("inbox-restart");
    let url = sqlite_url(&dir);
    let first = SseService::start(test_config().inbox_url(url.clone()))
        .await
        .unwrap();
    let id = first.send_notification("alice", note("before")).await.unwrap();
    first.inbox("alice").unwrap().mark_read(&[id]).await.unwrap();
    first.shutdown().await;
    drop(first);
    let second = SseService::start(test_config().inbox_url(url)).await.unwrap();
    let page = second
        .inbox("alice")
        .unwrap()
        .list(&InboxQuery::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].id, id.to_string());
    assert!(page.items[0].read.is_some(), "read state kept too");
}

/// The limit is applied after the publish answers, by the service's follow-up: within
/// about a second, the newest kept.
#[tokio::test]
async fn the_per_user_limit_follows_publishes() {
    let dir = TempDir::new("inbox-limit");
    let mut config = test_config().inbox_url(sqlite_url(&dir));
    config.inbox_max_per_user = 3;
    let service = SseService::start(config).await.unwrap();
    let mut sent = Vec::new();
    for n in 0..6 {
        sent.push(
            service
                .send_notification("alice", note(&format!("n{n}")))
                .await
                .unwrap(),
        );
    }
    let inbox = service.inbox("alice").unwrap();
    let mut total = u64::MAX;
    for _ in 0..50 {
        total = inbox.counts().await.unwrap().total;
        if total == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(total, 3, "trimmed to the limit within 5 s");
    let page = inbox.list(&InboxQuery::default()).await.unwrap();
    let newest: Vec<String> = sent[3..].iter().rev().map(ToString::to_string).collect();
    assert_eq!(ids(&page), newest);
    service.shutdown().await;
}

/// A batch with more owners than one `added` publish takes: every owner is still told.
#[tokio::test]
async fn every_owner_of_a_large_batch_hears_what_was_added() {
    let dir = TempDir::new("inbox-many-owners");
    let server = inbox_server(&sqlite_url(&dir)).await;
    let users: Vec<String> = (0..300).map(|n| format!("user{n}")).collect();
    // Streams of reels only: of this batch, they hear the `inbox` change alone.
    let mut streams = Vec::new();
    for user in &users {
        streams.push(server.connect(user, "?events=reel_ready", None).await);
    }
    let batch: Vec<Value> = users
        .iter()
        .map(|u| json!({"user_id": u, "event": "notification", "data": {"title": u, "message": "m"}}))
        .collect();
    let (status, body) = server.publish(json!(batch)).await;
    assert_eq!(status, 202, "{body}");
    for ((user, stream), id) in users
        .iter()
        .zip(&mut streams)
        .zip(body["ids"].as_array().unwrap())
    {
        let added = next_named(stream, "inbox").await;
        assert_eq!(added["op"], "added", "{user}");
        assert_eq!(added["ids"], json!([id.as_str().unwrap()]), "{user}");
    }
}

#[tokio::test]
async fn a_store_that_is_down_fails_the_publish_and_nothing_else() {
    let mut pg = PostgresServer::start();
    let server = inbox_server(&pg.database("down")).await;
    pg.kill();
    let err = server
        .service
        .send_notification("alice", note("lost?"))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Inbox(_)), "{err}");
    let response = server
        .http
        .post(server.url("/api/events"))
        .bearer_auth(PUBLISH_KEY)
        .json(&json!({"user_id": "alice", "event": "notification", "data": {"title": "t", "message": "m"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["field"], "inbox");
    // Events the inbox does not keep go on.
    server
        .service
        .send_custom_event("alice", "job.done", json!({"ok": true}))
        .await
        .unwrap();
    let (status, body) = get_inbox(&server, "alice", "").await;
    assert_eq!((status, body["field"].as_str()), (503, Some("inbox")));
    // Back: kept again.
    pg.restart();
    let mut kept = None;
    for _ in 0..50 {
        match server.service.send_notification("alice", note("kept")).await {
            Ok(id) => {
                kept = Some(id);
                break;
            }
            Err(e) => eprintln!("still failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = kept.expect("publishing works again once the store is back");
    let page = server
        .service
        .inbox("alice")
        .unwrap()
        .list(&InboxQuery::default())
        .await
        .unwrap();
    assert_eq!(page.items[0].id, id.to_string());
}

#[tokio::test]
async fn a_kept_broadcast_is_stored_once_for_everyone() {
    let dir = TempDir::new("inbox-broadcast");
    let config = test_config()
        .inbox_url(sqlite_url(&dir))
        .inbox_events(vec!["notification".into(), "system_alert".into()]);
    let server = start_server(config).await;
    let mut alice = server.connect("alice", "", None).await;
    let id = server
        .service
        .send_system_alert(SystemAlert {
            message: "maintenance at 10".into(),
            kind: SystemAlertKind::Info,
            duration: None,
        })
        .await
        .unwrap();
    assert_eq!(alice.next().await.event, "system_alert");
    let added = next_named(&mut alice, "inbox").await;
    assert_eq!(added["ids"], json!([id.to_string()]));
    assert_eq!(added["unread"], Value::Null, "everyone's count went up by one");
    for user in ["alice", "bob"] {
        assert_eq!(get_inbox(&server, user, "").await.1["unread"], 1, "{user}");
    }
    post_inbox(&server, "alice", "read", json!({"all": true})).await;
    assert_eq!(get_inbox(&server, "alice", "").await.1["unread"], 0);
    assert_eq!(get_inbox(&server, "bob", "").await.1["unread"], 1);
}

/// Two instances on one Redis and one PostgreSQL: a read through A reaches a tab streaming
/// from B at once, and either instance shows the same inbox.
#[tokio::test]
async fn two_instances_share_one_inbox() {
    let redis = RedisServer::start();
    let pg = PostgresServer::start();
    let url = pg.database("shared");
    let config = || test_config().redis_url(redis.url()).inbox_url(url.clone());
    let a = start_server(config()).await;
    let b = start_server(config()).await;
    let mut tab_on_b = b.connect("alice", "", None).await;
    let id: EventId = a.service.send_notification("alice", note("via A")).await.unwrap();
    assert_eq!(tab_on_b.next().await.id, id.to_string());
    assert_eq!(next_named(&mut tab_on_b, "inbox").await["op"], "added");
    assert_eq!(
        get_inbox(&b, "alice", "").await.1["items"][0]["id"],
        id.to_string()
    );

    let started = std::time::Instant::now();
    post_inbox(&a, "alice", "read", json!({"ids": [id.to_string()]})).await;
    let change = next_named(&mut tab_on_b, "inbox").await;
    assert_eq!(
        (change["op"].as_str(), change["unread"].as_u64()),
        (Some("read"), Some(0))
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(get_inbox(&b, "alice", "").await.1["unread"], 0);
}
