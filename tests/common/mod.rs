//! Test helpers: the real router served on a free port, and a real SSE client over TCP.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use sse_notify::{
    events::{Notification, NotificationKind},
    server::{Routes, SseConfig, SseListener, SseService},
};

pub const SECRET: &str = "integration-test-secret-0123456789";
pub const PUBLISH_KEY: &str = "integration-publish-key";
/// Generous: only ever waited out when a test is about to fail anyway.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server on 127.0.0.1:<free port>, stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: SseService,
    pub http: reqwest::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Defaults for tests: known secret and publish key, no rate limits.
pub fn test_config() -> SseConfig {
    SseConfig::default()
        .jwt_secret(SECRET)
        .publish_key(PUBLISH_KEY)
        .connect_rate_per_ip(0)
        .connect_rate_per_user(0)
}

/// Starts `service` with every route (the demo sign-in too) on a free port.
pub async fn start_server(config: SseConfig) -> TestServer {
    let service = SseService::start(config).await.expect("service starts");
    serve(service, |sse| Routes::new(sse).demo_session(true).build()).await
}

/// Serves `service` with the router `routes` builds, on a free port, as the binary does.
pub async fn serve(service: SseService, routes: impl FnOnce(&SseService) -> axum::Router) -> TestServer {
    let app = routes(&service);
    let listener = SseListener::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr();
    let serving = service.clone();
    let task = tokio::spawn(async move {
        listener.serve(app, &serving).await.unwrap();
    });
    TestServer {
        addr,
        service,
        http: reqwest::Client::new(),
        task,
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(&self, user: &str) -> String {
        self.service
            .issue_token(user, None, Duration::from_secs(3600))
            .unwrap()
    }

    /// Opens `/api/sse` as `user` with an optional query and `Last-Event-ID`.
    pub async fn connect(&self, user: &str, query: &str, last_event_id: Option<&str>) -> SseClient {
        let mut request = self
            .http
            .get(self.url(&format!("/api/sse{query}")))
            .bearer_auth(self.token(user));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("request sent");
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        SseClient::new(response)
    }

    /// Opens `/api/sse` as `user` on a session token that expires after `ttl`.
    pub async fn connect_expiring(&self, user: &str, ttl: Duration) -> SseClient {
        let token = self.service.issue_token(user, None, ttl).unwrap();
        let response = self
            .http
            .get(self.url("/api/sse"))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        SseClient::new(response)
    }

    /// Opens `/api/ws` (the same stream over WebSocket) as `user` with an optional query
    /// (`?lastEventId=`, `?events=`); its frames read like the SSE stream's.
    pub async fn connect_ws(&self, user: &str, query: &str) -> SseClient {
        self.try_connect_ws(query, Some(&self.token(user)))
            .await
            .unwrap_or_else(|(status, body)| panic!("WebSocket refused: {status} {body}"))
    }

    /// Opens `/api/ws{query}` with an optional bearer token: the stream, or the status and
    /// JSON body of the refusal.
    pub async fn try_connect_ws(
        &self,
        query: &str,
        token: Option<&str>,
    ) -> Result<SseClient, (u16, serde_json::Value)> {
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error};
        let mut request = format!("ws://{}/api/ws{query}", self.addr)
            .into_client_request()
            .unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, response)) => Ok(SseClient::from_websocket(socket, response.headers().clone())),
            Err(Error::Http(response)) => {
                let body = response.body().as_deref().unwrap_or_default();
                Err((
                    response.status().as_u16(),
                    serde_json::from_slice(body).unwrap_or_default(),
                ))
            }
            Err(e) => panic!("WebSocket handshake failed: {e}"),
        }
    }

    /// `POST /api/events` with the publish key.
    pub async fn publish(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.publish_raw(body.to_string(), Some(PUBLISH_KEY)).await
    }

    /// `POST path` with the publish key and a JSON body; the status and the JSON answer.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(PUBLISH_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Publishes through the publish API at `path` (e.g. under a prefix).
    pub async fn publish_to(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.post_json(path, body).await
    }

    pub async fn publish_raw(&self, body: String, key: Option<&str>) -> (u16, serde_json::Value) {
        self.post_events(body, key, None).await
    }

    /// `POST /api/events` with the publish key and `Idempotency-Key: idempotency_key`.
    pub async fn publish_once(&self, idempotency_key: &str, body: &str) -> (u16, serde_json::Value) {
        self.post_events(body.to_string(), Some(PUBLISH_KEY), Some(idempotency_key))
            .await
    }

    async fn post_events(
        &self,
        body: String,
        key: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .post(self.url("/api/events"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(idempotency_key) = idempotency_key {
            request = request.header("idempotency-key", idempotency_key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let json = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    /// `GET path` with the publish key (which stats and metrics need), as JSON.
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(PUBLISH_KEY)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or_default(),
        )
    }

    /// Connects as `user`, receives one notification, disconnects and waits until the server
    /// has noticed: the id returned is the `Last-Event-ID` a browser would resume from.
    /// A connection without an id may first be handed what the user's earlier connections
    /// had not yet marked delivered (offline delivery is at least once): those pass.
    pub async fn resume_point(&self, user: &str) -> String {
        let mut client = self.connect(user, "", None).await;
        self.service.send_notification(user, note("seen")).await.unwrap();
        let seen = loop {
            let event = client.next().await;
            let data: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
            if data["title"] == "seen" {
                break event;
            }
        };
        drop(client);
        self.wait_for_clients(user, 0).await;
        seen.id
    }

    /// Waits until `user` has `n` connections registered (connects are asynchronous).
    pub async fn wait_for_clients(&self, user: &str, n: usize) {
        self.wait_for_clients_within(user, n, WAIT).await;
    }

    /// Like [`wait_for_clients`](Self::wait_for_clients), failing after `within`.
    pub async fn wait_for_clients_within(&self, user: &str, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.service.client_count_for_user(user) != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} did not have {n} connections within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The events every stream carries on its own: `heartbeat`, and `ready` after the replay.
/// The helpers below skip them unless a test asks for every event.
pub fn is_control(event: &Event) -> bool {
    event.event == "heartbeat" || event.event == "ready"
}

/// A parsed SSE stream.
pub struct SseClient {
    pub headers: reqwest::header::HeaderMap,
    events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>,
}

impl SseClient {
    pub fn new(response: reqwest::Response) -> Self {
        let headers = response.headers().clone();
        let events = response
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| e.to_string()));
        Self {
            headers,
            events: Box::pin(events),
        }
    }

    /// A WebSocket of `/api/ws`: its text messages hold SSE frames, read by the same parser
    /// (pings and pongs are answered by the socket itself).
    pub fn from_websocket<S>(socket: S, headers: reqwest::header::HeaderMap) -> Self
    where
        S: Stream<
                Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>,
            > + Send
            + 'static,
    {
        use tokio_tungstenite::tungstenite::Message;
        let bytes = socket
            .take_while(|m| futures::future::ready(!matches!(m, Ok(Message::Close(_)))))
            .filter_map(|m| async move {
                match m {
                    Ok(Message::Text(text)) => Some(Ok(bytes::Bytes::from(text.as_str().to_owned()))),
                    Ok(_) => None,
                    Err(e) => Some(Err(e.to_string())),
                }
            });
        let events = bytes.eventsource().map(|r| r.map_err(|e| e.to_string()));
        Self {
            headers,
            events: Box::pin(events),
        }
    }

    /// The next event of any name; `None` when the stream ended.
    pub async fn next_any(&mut self) -> Option<Event> {
        tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("timed out waiting for an event")
            .map(|r| r.expect("stream error"))
    }

    /// The next event that is not a heartbeat or `ready`.
    pub async fn next(&mut self) -> Event {
        loop {
            let event = self.next_any().await.expect("stream ended");
            if !is_control(&event) {
                return event;
            }
        }
    }

    /// Whether a non-heartbeat event arrives within `wait`.
    pub async fn nothing_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Err(_) => return true,
                Ok(Some(Ok(e))) if is_control(&e) => continue,
                Ok(_) => return false,
            }
        }
    }

    /// Reads until the stream ends or breaks (a server that died resets it); returns the
    /// non-heartbeat events seen on the way.
    pub async fn until_closed(&mut self) -> Vec<Event> {
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.events.next()).await {
                Err(_) => panic!("the stream did not end"),
                Ok(Some(Ok(event))) if !is_control(&event) => seen.push(event),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return seen,
            }
        }
    }

    /// Reads until the stream ends; returns the non-heartbeat events seen on the way.
    pub async fn until_end(&mut self) -> Vec<Event> {
        let mut seen = Vec::new();
        while let Some(event) = self.next_any().await {
            if !is_control(&event) {
                seen.push(event);
            }
        }
        seen
    }
}

pub fn data(event: &Event) -> serde_json::Value {
    serde_json::from_str(&event.data).expect("data is JSON")
}

/// A plain info notification with `title`.
pub fn note(title: &str) -> Notification {
    Notification {
        title: title.into(),
        message: "m".into(),
        kind: NotificationKind::Info,
        action_url: None,
    }
}

/// Notifications for one user published without pause from an OS thread of their own (with
/// its own runtime), so they race whatever the test does on its runtime's threads.
pub struct Publishing {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    published: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<sse_notify::server::EventId>>,
}

impl Publishing {
    pub fn start(service: SseService, user: &str) -> Self {
        use std::sync::{
            atomic::{AtomicBool, AtomicUsize, Ordering},
            Arc,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicUsize::new(0));
        let (user, flag, count) = (user.to_string(), stop.clone(), published.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut ids = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    let title = ids.len().to_string();
                    ids.push(service.send_notification(&user, note(&title)).await.unwrap());
                    count.fetch_add(1, Ordering::Relaxed);
                }
                ids
            })
        });
        Self {
            stop,
            published,
            thread,
        }
    }

    /// Lets `more` events go out after this call, then stops; returns every id published.
    pub async fn stop_after(self, more: usize) -> Vec<sse_notify::server::EventId> {
        use std::sync::atomic::Ordering;
        let target = self.published.load(Ordering::Relaxed) + more;
        while self.published.load(Ordering::Relaxed) < target {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || self.thread.join().expect("publisher thread"))
            .await
            .unwrap()
    }
}

/// The real `sse-notify` binary in a process of its own, so a test can crash it
/// (`SIGKILL`: no shutdown code runs). Killed on drop.
pub struct ServerProcess {
    pub addr: SocketAddr,
    child: std::process::Child,
}

impl ServerProcess {
    /// Starts the binary with the test secrets and `env`, and waits until `/healthz` answers.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child =
            sse_notify_testkit::server_command(env!("CARGO_BIN_EXE_sse-notify"), addr, SECRET, PUBLISH_KEY)
                .envs(env.iter().copied())
                .spawn()
                .expect("the sse-notify binary");
        let server = Self { addr, child };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while http.get(format!("http://{addr}/healthz")).send().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server process did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Opens `/api/sse` on this process as `user`.
    pub async fn connect(&self, user: &str) -> SseClient {
        let token = sse_notify::server::Auth::new(Some(&SECRET.into()))
            .issue(user, None, Duration::from_secs(3600))
            .unwrap();
        let response = reqwest::Client::new()
            .get(format!("http://{}/api/sse", self.addr))
            .bearer_auth(token)
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), 200);
        SseClient::new(response)
    }

    /// Its process id, for CPU and memory figures from `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `SIGKILL`: the process dies at once, as in a crash.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.crash();
    }
}

/// A real `redis-server` on a free port (from the shared test kit), with a query helper.
pub use sse_notify_testkit::RedisServer;

/// Runs one command on `redis` and returns its reply.
pub async fn redis_query<T: redis::FromRedisValue>(redis: &RedisServer, cmd: &mut redis::Cmd) -> T {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// A bare `GET /api/sse` request head for `user`, as a raw TCP client sends it.
pub fn stream_request(server: &TestServer, user: &str) -> String {
    format!(
        "GET /api/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token(user)
    )
}

/// Sends `request` on a fresh TCP connection and reads the response head (status line and
/// headers, lower-cased names) plus whatever body bytes arrive within `wait`.
pub async fn raw_exchange(
    socket: &mut tokio::net::TcpStream,
    request: &str,
    wait: Duration,
) -> (String, String) {
    use tokio::io::AsyncWriteExt;
    socket.write_all(request.as_bytes()).await.unwrap();
    let text = read_for(socket, wait).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_lowercase(), body.to_string())
}

/// Whatever arrives on `socket` within `wait` (or until it closes).
pub async fn read_for(socket: &mut tokio::net::TcpStream, wait: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&received).to_string()
}
