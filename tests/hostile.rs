//! Hostile and broken clients: sockets that never finish a request, bodies that trickle
//! in, more streams than the server may hold, oversized filters, floods of history, and
//! the cookie and input rules that keep one user's session their own.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whether the server closed `socket` within `within` (EOF or a reset); any bytes it sent
/// first are read and dropped.
async fn closed_within(socket: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A socket that sends nothing, one that sends half a request line, and a keep-alive
/// connection idle after its first request are all closed after the 10 s head timeout.
#[tokio::test]
async fn idle_and_half_sent_sockets_are_closed() {
    let server = start_server(test_config()).await;
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    partial.write_all(b"G").await.unwrap();
    let mut half_head = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    half_head
        .write_all(b"GET /api/sse HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (head, mut keep_alive) = healthz_on_a_new_connection(&server, Duration::from_millis(200)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let started = tokio::time::Instant::now();
    for (what, socket) in [
        ("silent", &mut silent),
        ("one byte", &mut partial),
        ("half a head", &mut half_head),
        ("idle keep-alive", &mut keep_alive),
    ] {
        assert!(
            closed_within(socket, Duration::from_secs(14)).await,
            "{what} socket still open after {:?}",
            started.elapsed()
        );
    }
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "closed too early: {:?}",
        started.elapsed()
    );
}

/// CPU seconds (user + system) the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// Waiting for the rest of a request costs nothing: 500 sockets that sent `G` and stopped
/// keep the server's CPU near zero (a 5 ms polling loop per socket burned a core).
#[tokio::test]
async fn half_sent_requests_cost_no_cpu_while_they_wait() {
    let server = ServerProcess::start(&[]).await;
    let mut sockets = Vec::new();
    for _ in 0..500 {
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(b"G").await.unwrap();
        sockets.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu_seconds(server.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds(server.pid()) - before;
    assert!(used < 0.3, "500 waiting sockets used {used:.2} s of CPU in 3 s");
}

/// Past `SSE_MAX_CONNECTIONS` long-lived responses (streams and stats streams together), a
/// new one gets 503 with `Retry-After`; health and short requests keep answering; a freed
/// place can be taken again.
#[tokio::test]
async fn the_connection_cap_answers_503_and_health_keeps_answering() {
    let server = start_server(test_config().max_connections(2)).await;
    let first = server.connect("cap-a", "", None).await;
    let stats = server
        .http
        .get(server.url("/api/stats/stream"))
        .bearer_auth(PUBLISH_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 200);
    let refused = server
        .http
        .get(server.url("/api/sse"))
        .bearer_auth(server.token("cap-b"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("connections"), "{body}");
    assert_eq!(server.get_json("/healthz").await.0, 200);
    assert_eq!(server.get_json("/api/stats").await.0, 200);
    drop(first);
    server.wait_for_clients("cap-a", 0).await;
    let _again = server.connect("cap-b", "", None).await;
    drop(stats);
}

/// The publish key is checked before any of the body is read: a wrong key with a huge
/// announced body is refused at once.
#[tokio::test]
async fn the_publish_key_is_checked_before_the_body() {
    let server = start_server(test_config()).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\
                Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n";
    let (head, body) = raw_exchange(&mut socket, head, Duration::from_secs(2)).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(body.contains("Authorization"), "{body}");
}

/// A body that trickles in is cut off after 10 s with 408.
#[tokio::test]
async fn a_trickling_body_is_cut_off() {
    let server = start_server(test_config()).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUBLISH_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user_id\""
    );
    let started = tokio::time::Instant::now();
    let (head, body) = raw_exchange(&mut socket, &head, Duration::from_secs(14)).await;
    assert!(head.starts_with("http/1.1 408"), "{head}");
    assert!(body.contains(r#""field":"body""#), "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
}

/// `events=` with thousands of names is refused with 400 naming the field; duplicates of
/// a short list are fine.
#[tokio::test]
async fn huge_event_filters_are_refused() {
    let server = start_server(test_config()).await;
    let many: Vec<String> = (0..1_500).map(|i| format!("e{i}")).collect();
    let response = server
        .http
        .get(server.url(&format!("/api/sse?events={}", many.join(","))))
        .bearer_auth(server.token("f"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["field"], "events");
    let repeated = vec!["notification"; 1_000].join(",");
    let _ok = server.connect("f", &format!("?events={repeated}"), None).await;
}

/// Names the browser's `EventSource` fires on its own, and the server's control events,
/// cannot be published.
#[tokio::test]
async fn reserved_event_names_are_refused() {
    let server = start_server(test_config()).await;
    for name in ["error", "open", "message", "session_ended", "connection_replaced"] {
        let (status, body) = server
            .publish(json!({"user_id": "r", "event": name, "data": {}}))
            .await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("event")),
            "{name}: {body}"
        );
    }
    let (status, body) = server
        .publish(json!({"user_id": "r", "event": "notification",
                        "data": {"title": "t", "message": "m", "actionUrl": "/\\evil.example/x"}}))
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("data.actionUrl")),
        "{body}"
    );
}

/// Published events do not stay in memory past the byte bound: with
/// `SSE_HISTORY_MAX_BYTES` at 8 MiB, 100 MB of events leave the server's RSS far below
/// what went through it (without the bound, the 100,000-event history would keep them
/// all). `make soak` does the same with 600 MB on the release build.
#[tokio::test]
async fn history_does_not_keep_what_went_through() {
    let server = ServerProcess::start(&[("SSE_HISTORY_MAX_BYTES", "8388608")]).await;
    let http = reqwest::Client::new();
    let blob = "x".repeat(60_000);
    let batch: Vec<serde_json::Value> = (0..10)
        .map(|_| json!({"user_id": "hoard", "event": "bulk.data", "data": {"blob": blob}}))
        .collect();
    let body = serde_json::to_string(&batch).unwrap();
    for _ in 0..170 {
        let status = http
            .post(format!("http://{}/api/events", server.addr))
            .bearer_auth(PUBLISH_KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        rss_kib < 64 * 1024,
        "RSS {} MiB after 100 MB of events",
        rss_kib / 1024
    );
}

/// The demo sign-in: JSON only (a cross-site form cannot sign a browser in), the token
/// only in an HttpOnly cookie, `Secure` over HTTPS (as a proxy reports it), or always
/// when configured.
#[tokio::test]
async fn sign_in_is_json_only_and_its_cookie_is_secure_over_https() {
    let server = start_server(test_config()).await;
    let form = server
        .http
        .post(server.url("/api/session"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("user_id=victim")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 415);
    assert!(form.headers().get("set-cookie").is_none());

    let sign_in = |https: bool| {
        let mut request = server
            .http
            .post(server.url("/api/session"))
            .json(&json!({"user_id": "me"}));
        if https {
            request = request.header("x-forwarded-proto", "https");
        }
        request.send()
    };
    let plain = sign_in(false).await.unwrap();
    let cookie = plain.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "{cookie}");
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body, json!({"user_id": "me"}), "no token in the body");
    let secure = sign_in(true).await.unwrap();
    assert!(secure.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Secure"));

    let always = start_server(test_config().cookie_secure(sse_notify::server::CookieSecure::Always)).await;
    let cookie = always
        .http
        .post(always.url("/api/session"))
        .json(&json!({"user_id": "me"}))
        .send()
        .await
        .unwrap();
    assert!(cookie.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Secure"));
}

/// A client that pipelines requests and never reads leaves hyper's response writes blocked;
/// it can hold neither its connection nor the shutdown: `with_graceful_shutdown` returns
/// within the drain (10 s) and a little more, instead of never.
#[tokio::test]
async fn a_client_that_never_reads_cannot_hold_the_shutdown() {
    use sse_notify::server::{Routes, SseListener, SseService};
    let service = SseService::start(test_config()).await.unwrap();
    let app = Routes::new(&service).build();
    let listener = SseListener::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(listener.serve(app, &service).with_graceful_shutdown(async move {
        let _ = stopped.await;
    }));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut socket = socket.connect(addr).await.unwrap();
    let requests = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1_000);
    let mut blocked = false;
    for _ in 0..1_000 {
        if tokio::time::timeout(Duration::from_secs(2), socket.write_all(requests.as_bytes()))
            .await
            .is_err()
        {
            blocked = true;
            break;
        }
    }
    assert!(blocked, "the server kept reading without being able to answer");
    let _ = stop.send(());
    let started = tokio::time::Instant::now();
    // The drain is 10 s; hyper's write timeout alone (30 s without progress) would take
    // longer than this.
    let done = tokio::time::timeout(Duration::from_secs(20), serving).await;
    assert!(
        done.is_ok(),
        "shutdown still waiting on a client that never reads after {:?}",
        started.elapsed()
    );
    drop(socket);
}

/// One address cannot hold more than its budget of request (non-stream) connections:
/// with 256 keep-alive connections open from 127.0.0.1, the next gets a bare 503 with
/// `Retry-After`, while an event stream from the same address still opens (streams have
/// limits of their own); one closed connection frees a place.
#[tokio::test]
async fn one_address_cannot_hold_every_request_connection() {
    let server = start_server(test_config()).await;
    let mut held = Vec::new();
    for _ in 0..256 {
        let (head, socket) = healthz_on_a_new_connection(&server, Duration::from_millis(20)).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        held.push(socket);
    }
    let (head, _over) = healthz_on_a_new_connection(&server, Duration::from_millis(200)).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let _stream = server.connect("same-address", "", None).await;
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (head, _again) = healthz_on_a_new_connection(&server, Duration::from_millis(200)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
}

/// A trusted proxy (`SSE_TRUSTED_PROXIES`) carries every client's requests: it is spared
/// the per-address budget of request connections that would refuse its 257th.
#[tokio::test]
async fn a_trusted_proxy_is_not_held_to_one_addresss_budget() {
    let trusted = sse_notify::server::TrustedProxies::parse("127.0.0.1").unwrap();
    let server = start_server(test_config().trusted_proxies(trusted)).await;
    let mut held = Vec::new();
    for _ in 0..257 {
        let (head, socket) = healthz_on_a_new_connection(&server, Duration::from_millis(20)).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        held.push(socket);
    }
}

/// `GET /healthz` on a connection of its own, kept open (keep-alive); the answer's head
/// as read within `wait`.
async fn healthz_on_a_new_connection(server: &TestServer, wait: Duration) -> (String, tokio::net::TcpStream) {
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (head, _) = raw_exchange(&mut socket, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait).await;
    (head, socket)
}

/// An HTTP/2 connection (prior knowledge) that answers every ping but sends no request is
/// closed once idle, as an HTTP/1 keep-alive connection is: pings alone hold nothing.
#[tokio::test]
async fn an_idle_http2_connection_that_answers_pings_is_closed() {
    let server = start_server(test_config()).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // The preface, then an empty SETTINGS frame.
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(40);
    let closed = loop {
        let mut header = [0u8; 9];
        let read = tokio::time::timeout_at(deadline, socket.read_exact(&mut header)).await;
        let Ok(Ok(_)) = read else { break read.is_ok() };
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        if socket.read_exact(&mut payload).await.is_err() {
            break true;
        }
        let (kind, flags) = (header[3], header[4]);
        if kind == 0x4 && flags & 0x1 == 0 {
            // SETTINGS: acknowledge.
            let _ = socket.write_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00").await;
        } else if kind == 0x6 && flags & 0x1 == 0 {
            // PING: answer with an ACK carrying the same payload.
            let mut pong = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00".to_vec();
            pong.extend_from_slice(&payload);
            let _ = socket.write_all(&pong).await;
        } else if kind == 0x7 {
            // GOAWAY: the server is closing it.
            break true;
        }
    };
    assert!(closed, "an idle HTTP/2 connection stayed open for 40 s");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "closed too early: {:?}",
        started.elapsed()
    );
}

/// The head timeout is 10 s in total from the accept: a client that waits 8 s before its
/// first bytes has 2 s left for the rest of its head, not another 10, on the lean stream
/// path and through hyper alike.
#[tokio::test]
async fn the_head_timeout_counts_from_the_accept() {
    let server = start_server(test_config()).await;
    let mut lean = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut other = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let accepted = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    lean.write_all(b"GET /api/sse?x=1 HTTP/1.1\r\n").await.unwrap();
    other.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    for (what, socket) in [("lean", &mut lean), ("hyper", &mut other)] {
        assert!(
            closed_within(socket, Duration::from_secs(12) - accepted.elapsed()).await,
            "{what}: still open {:?} after the accept",
            accepted.elapsed()
        );
    }
}

/// The server's resident memory, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A backlog is replayed page by page as the client reads: five streams that ask for a
/// user's 40 MB of history on Redis and then read nothing hold a few pages each, not five
/// copies of the history (the whole backlog used to be read and framed at once).
#[tokio::test]
async fn a_client_that_stops_reading_a_long_replay_holds_only_a_page() {
    let redis = RedisServer::start();
    let server = ServerProcess::start(&[("REDIS_URL", &redis.url())]).await;
    let http = reqwest::Client::new();
    let seen = {
        let mut client = server.connect("hoarder").await;
        let body =
            json!({"user_id": "hoarder", "event": "notification", "data": {"title": "seen", "message": "m"}});
        let sent = http
            .post(format!("http://{}/api/events", server.addr))
            .bearer_auth(PUBLISH_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 202);
        client.next().await.id
    };
    let message = "x".repeat(2_000);
    for _ in 0..50 {
        let batch: Vec<_> = (0..400)
            .map(|_| json!({"user_id": "hoarder", "event": "notification", "data": {"title": "old", "message": message}}))
            .collect();
        let sent = http
            .post(format!("http://{}/api/events", server.addr))
            .bearer_auth(PUBLISH_KEY)
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 202);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(server.pid());
    let token = sse_notify::server::Auth::new(Some(&SECRET.into()))
        .issue("hoarder", None, Duration::from_secs(3600))
        .unwrap();
    let mut hoarders = Vec::new();
    for _ in 0..5 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut socket = socket.connect(server.addr).await.unwrap();
        let request = format!(
            "GET /api/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nLast-Event-ID: {seen}\r\n\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut first = [0u8; 1024];
        let n = socket.read(&mut first).await.unwrap();
        assert!(
            first[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&first[..n])
        );
        hoarders.push(socket);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_bytes(server.pid()).saturating_sub(before);
    assert!(
        grown < 40 * 1024 * 1024,
        "five stalled replays of a 40 MB backlog grew the server by {} MB",
        grown / (1024 * 1024)
    );
}

/// A reconnect storm from behind one NAT: 400 connections from one address open at once,
/// then each sends its stream request. Only 256 are read at a time; the rest wait, unread,
/// and are served in turn: every one gets its stream (before: 144 were closed at once). A
/// connection that waits and never sends anything is still closed 10 s after its accept.
#[tokio::test]
async fn a_storm_from_one_address_is_served_in_turn() {
    let server = start_server(test_config()).await;
    let mut sockets = Vec::new();
    for _ in 0..400 {
        sockets.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // Every one accepted, most of them past the address's 256 places.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut served = 0;
    for (i, socket) in sockets.iter_mut().enumerate() {
        if socket
            .write_all(stream_request(&server, &format!("nat{i}")).as_bytes())
            .await
            .is_err()
        {
            continue;
        }
        let mut status = [0u8; 12];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut status)).await;
        if matches!(read, Ok(Ok(_))) && &status == b"HTTP/1.1 200" {
            served += 1;
        }
    }
    assert_eq!(served, 400, "connections from one address refused in a storm");
    drop(sockets);

    // 256 silent connections hold the places; the one after them waits, and goes at its
    // head deadline all the same.
    let mut silent = Vec::new();
    for _ in 0..256 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut waiting = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    assert!(
        closed_within(&mut waiting, Duration::from_secs(14)).await,
        "a waiting connection outlived its head timeout"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "closed too early: {:?}",
        started.elapsed()
    );
}
