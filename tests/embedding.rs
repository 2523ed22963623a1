//! Using the library in a host app, and the binary as a standalone server: routes under a
//! prefix, identity from the host's own session, ending a user's streams, sessions that
//! expire, the auth probe, and production mode (no demo sign-in, stats behind the key).

mod common;

use std::time::Duration;

use axum::http::request::Parts;
use common::*;
use serde_json::json;
use sse_notify::server::{AuthError, Identity, Routes, SseService};

/// Routes under `/notify`: the stream, the publish API and health answer there and not at
/// the root, and the stream takes the lean path (it answers `Connection: close`, which
/// hyper's keep-alive path never adds).
#[tokio::test]
async fn routes_nest_under_a_prefix_and_the_lean_path_follows() {
    let service = SseService::start(test_config()).await.unwrap();
    let server = serve(service, |sse| Routes::new(sse).prefix("/notify/").build()).await;
    assert_eq!(server.service.stream_path().as_ref(), "/notify/api/sse");
    assert_eq!(server.service.routes_prefix(), "/notify");

    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /notify/api/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token("nested")
    );
    let (head, _) = raw_exchange(&mut socket, &request, Duration::from_millis(300)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "not the lean path: {head}");
    server.wait_for_clients("nested", 1).await;

    let (status, body) = server
        .publish_to(
            "/notify/api/events",
            json!({"user_id": "nested", "event": "notification", "data": {"title": "t", "message": "m"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let received = read_for(&mut socket, Duration::from_millis(300)).await;
    assert!(received.contains("event: notification"), "{received:?}");

    assert_eq!(server.get_json("/notify/healthz").await.0, 200);
    for path in ["/api/sse", "/healthz", "/api/events"] {
        let status = server.http.get(server.url(path)).send().await.unwrap().status();
        assert_eq!(status, 404, "{path} answered at the root");
    }
}

/// Routes can be left out: a host that keeps its own `/healthz` and `/metrics` turns ours off.
#[tokio::test]
async fn routes_can_be_left_out() {
    let service = SseService::start(test_config()).await.unwrap();
    let server = serve(service, |sse| {
        Routes::new(sse)
            .health(false)
            .metrics(false)
            .stats(false)
            .publish(false)
            .disconnect(false)
            .build()
    })
    .await;
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/api/stats"),
        ("POST", "/api/events"),
        ("POST", "/api/disconnect"),
        ("POST", "/api/session"),
    ] {
        let request = server.http.request(method.parse().unwrap(), server.url(path));
        let status = request.bearer_auth(PUBLISH_KEY).send().await.unwrap().status();
        assert_eq!(status, 404, "{method} {path}");
    }
    let _stream = server.connect("still-streams", "", None).await;
}

/// The host's own identity: a hook reads the user from the request (here a header a
/// session layer would have set); no token is needed, and without a session it is 401.
#[tokio::test]
async fn identity_comes_from_the_host_hook() {
    async fn from_header(parts: Parts) -> Result<Identity, AuthError> {
        let user = parts
            .headers
            .get("x-session-user")
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Missing)?;
        Ok(Identity::new(user))
    }
    let service = SseService::builder(test_config())
        .authenticate(from_header)
        .start()
        .await
        .unwrap();
    let server = serve(service, |sse| Routes::new(sse).build()).await;
    let response = server
        .http
        .get(server.url("/api/sse"))
        .header("x-session-user", "hosted")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut client = SseClient::new(response);
    server
        .service
        .send_notification("hosted", note("via the host"))
        .await
        .unwrap();
    assert_eq!(data(&client.next().await)["title"], "via the host");
    // A valid token is not an identity here: the hook decides.
    let response = server
        .http
        .get(server.url("/api/sse"))
        .bearer_auth(server.token("hosted"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// A hook that cannot tell who a request is from right now (the host's session store is
/// down) answers 503 with `Retry-After` and a JSON error, on the stream and on the `HEAD`
/// probe: the browser retries instead of taking it for a sign-out (401).
#[tokio::test]
async fn a_session_store_outage_is_a_503_not_a_sign_out() {
    async fn store_down(parts: Parts) -> Result<Identity, AuthError> {
        match parts.headers.get("x-session-user").and_then(|v| v.to_str().ok()) {
            Some(user) => Ok(Identity::new(user)),
            None => Err(AuthError::Unavailable("the session store did not answer".into())),
        }
    }
    let service = SseService::builder(test_config())
        .authenticate(store_down)
        .start()
        .await
        .unwrap();
    let server = serve(service, |sse| Routes::new(sse).build()).await;
    for request in [
        server.http.get(server.url("/api/sse")),
        server.http.head(server.url("/api/sse")),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
    }
    let response = server.http.get(server.url("/api/sse")).send().await.unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("did not answer"),
        "{body}"
    );
    assert_eq!(server.service.client_count(), 0);
}

/// `POST /api/disconnect` ends every stream of the user with `session_ended`
/// (`disconnected`), answers how many, leaves other users alone, and needs the key.
#[tokio::test]
async fn disconnect_ends_a_users_streams() {
    let server = start_server(test_config()).await;
    let mut tabs = vec![
        server.connect("leaving", "", None).await,
        server.connect("leaving", "", None).await,
    ];
    let mut other = server.connect("staying", "", None).await;
    server.wait_for_clients("leaving", 2).await;
    let (status, body) = server
        .post_json("/api/disconnect", json!({"user_id": "leaving"}))
        .await;
    assert_eq!((status, body["closed"].as_u64()), (200, Some(2)), "{body}");
    for tab in &mut tabs {
        let last = tab.until_end().await;
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].event, "session_ended");
        assert_eq!(data(&last[0])["reason"], "disconnected");
    }
    server
        .service
        .send_notification("staying", note("still here"))
        .await
        .unwrap();
    assert_eq!(data(&other.next().await)["title"], "still here");

    let (status, body) = server
        .post_json("/api/disconnect", json!({"user_id": "nobody"}))
        .await;
    assert_eq!((status, body["closed"].as_u64()), (200, Some(0)));
    let (status, body) = server.post_json("/api/disconnect", json!({"user": "x"})).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("user_id")), "{body}");
    let response = server
        .http
        .post(server.url("/api/disconnect"))
        .json(&json!({"user_id": "staying"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(server.service.client_count_for_user("staying"), 1);
}

/// A stream ends when its token expires, with `session_ended` (`expired`), so a revoked
/// session cannot listen forever.
#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let server = start_server(test_config()).await;
    let started = tokio::time::Instant::now();
    let mut client = server.connect_expiring("brief", Duration::from_secs(2)).await;
    let last = client.until_end().await;
    assert_eq!(last.last().map(|e| e.event.as_str()), Some("session_ended"));
    assert_eq!(data(last.last().unwrap())["reason"], "expired");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.service.client_count_for_user("brief"), 0);
}

/// `HEAD /api/sse` tells a browser whether its session would be let in, without opening
/// a stream, and with which identity tag: the one its stream's `ready` will carry, another
/// for another user, and never the user id itself.
#[tokio::test]
async fn head_probes_the_session_without_opening_a_stream() {
    let server = start_server(test_config()).await;
    let tag_of = |user: &'static str| {
        let request = server
            .http
            .head(server.url("/api/sse"))
            .bearer_auth(server.token(user));
        async move {
            let ok = request.send().await.unwrap();
            assert_eq!(ok.status(), 204);
            ok.headers()[sse_notify::api::IDENTITY_TAG_HEADER]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    let tag = tag_of("probe").await;
    assert_eq!(server.service.client_count_for_user("probe"), 0);
    assert!(!tag.is_empty() && !tag.contains("probe"), "{tag}");
    assert_ne!(tag, tag_of("other-probe").await);
    let mut client = server.connect("probe", "", None).await;
    let ready = client.next_any().await.unwrap();
    assert_eq!(ready.event, "ready");
    assert_eq!(data(&ready)["tag"], tag.as_str());
    let refused = server.http.head(server.url("/api/sse")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(!refused
        .headers()
        .contains_key(sse_notify::api::IDENTITY_TAG_HEADER));
}

/// The standalone binary without `SSE_DEMO`: no sign-in, a status page at `/`, stats and
/// metrics only with the publish key, health for everyone. With `SSE_DEMO=1`, the demo's
/// sign-in; with a bad value, it refuses to start and names the variable.
#[tokio::test]
async fn production_mode_has_no_sign_in_and_guards_stats() {
    let server = ServerProcess::start(&[]).await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", server.addr);
    let sign_in = http
        .post(url("/api/session"))
        .json(&json!({"user_id": "mallory"}))
        .send()
        .await
        .unwrap();
    assert!(sign_in.headers().get("set-cookie").is_none());
    assert!(
        sign_in.status() == 404 || sign_in.status() == 405,
        "{}",
        sign_in.status()
    );
    let page = http.get(url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("notification server is running"));
    for path in ["/api/stats", "/metrics", "/api/stats/stream"] {
        let status = http.get(url(path)).send().await.unwrap().status();
        assert_eq!(status, 401, "{path} without the key");
        let status = http
            .get(url(path))
            .bearer_auth("not-the-key")
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 403, "{path} with a wrong key");
    }
    let stats = http
        .get(url("/api/stats"))
        .bearer_auth(PUBLISH_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(stats.status(), 200);
    assert_eq!(http.get(url("/healthz")).send().await.unwrap().status(), 200);

    let demo = ServerProcess::start(&[("SSE_DEMO", "1")]).await;
    let sign_in = http
        .post(format!("http://{}/api/session", demo.addr))
        .json(&json!({"user_id": "guest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sign_in.status(), 200);

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sse-notify"))
        // What cargo-leptos sets when it builds the binary (`cargo test` does not).
        .env("LEPTOS_OUTPUT_NAME", "sse-notify")
        .env("SSE_DEMO", "yes")
        .env("LEPTOS_SITE_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("SSE_DEMO"));
}

/// A bad configuration stops the binary at start with the variable named.
#[tokio::test]
async fn bad_configuration_stops_the_start() {
    for (variable, value) in [
        ("SSE_MAX_CONNECTIONS", "0"),
        ("UPSTASH_REDIS_REST_URL", "https://x.upstash.io"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sse-notify"))
            // What cargo-leptos sets when it builds the binary (`cargo test` does not).
            .env("LEPTOS_OUTPUT_NAME", "sse-notify")
            .env(variable, value)
            .env("LEPTOS_SITE_ADDR", "127.0.0.1:0")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{stderr}");
    }
}

/// A host hook's identity is checked like a token's subject: a user id nobody could
/// publish to (a control character in it) is refused, and so is one whose `expires_at`
/// has passed; a valid one with an expiry streams until then.
#[tokio::test]
async fn host_identities_are_validated_and_expire() {
    async fn from_headers(parts: Parts) -> Result<Identity, AuthError> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let user = header("x-session-user").ok_or(AuthError::Missing)?;
        let identity = Identity::new(user.replace("%0A", "\n"));
        Ok(match header("x-session-expires") {
            Some(at) => identity.expires_at(at.parse().unwrap()),
            None => identity,
        })
    }
    let service = SseService::builder(test_config())
        .authenticate(from_headers)
        .start()
        .await
        .unwrap();
    let server = serve(service, |sse| Routes::new(sse).build()).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let open = |user: &str, expires: Option<u64>| {
        let mut request = server
            .http
            .get(server.url("/api/sse"))
            .header("x-session-user", user);
        if let Some(at) = expires {
            request = request.header("x-session-expires", at.to_string());
        }
        request.send()
    };
    for (user, expires) in [("a%0Ab", None), ("late", Some(now - 1))] {
        let refused = open(user, expires).await.unwrap();
        assert_eq!(refused.status(), 401, "{user}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["field"], "token", "{user}");
    }
    let response = open("brief", Some(now + 2)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut brief = SseClient::new(response);
    assert_eq!(brief.next().await.event, "session_ended");
}

/// A prefix long enough that `GET <stream path>` no longer fits the listener's first read
/// still takes the lean path (it used to panic every connection past 251 bytes).
#[tokio::test]
async fn a_long_prefix_still_streams_on_the_lean_path() {
    let prefix = format!("/{}", "p".repeat(400));
    let service = SseService::start(test_config()).await.unwrap();
    let server = serve(service, |sse| Routes::new(sse).prefix(&prefix).build()).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET {prefix}/api/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token("long")
    );
    let (head, _) = raw_exchange(&mut socket, &request, Duration::from_millis(300)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "not the lean path: {head}");
    server.wait_for_clients("long", 1).await;
}
