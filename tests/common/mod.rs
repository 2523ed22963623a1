//! Test helpers: the real router served on a free port, and a real SSE client over TCP.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use sse_notify::{
    events::{Notification, NotificationKind},
    server::{router, SseConfig, SseListener, SseService},
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
        .jwt_secret(Some(SECRET.into()))
        .publish_key(Some(PUBLISH_KEY.into()))
        .connect_rate_per_ip(0)
        .connect_rate_per_user(0)
}

pub async fn start_server(config: SseConfig) -> TestServer {
    let service = SseService::start(config).await.expect("service starts");
    let app: axum::Router = router(service.clone());
    let listener = SseListener::bind("127.0.0.1:0".parse().unwrap(), app.clone())
        .await
        .unwrap();
    let addr = axum::serve::Listener::local_addr(&listener).unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .unwrap();
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

    /// `POST /api/events` with the publish key.
    pub async fn publish(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.publish_raw(body.to_string(), Some(PUBLISH_KEY)).await
    }

    pub async fn publish_raw(&self, body: String, key: Option<&str>) -> (u16, serde_json::Value) {
        let mut request = self
            .http
            .post(self.url("/api/events"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let json = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or_default(),
        )
    }

    /// Connects as `user`, receives one notification, disconnects and waits until the server
    /// has noticed: the id returned is the `Last-Event-ID` a browser would resume from.
    pub async fn resume_point(&self, user: &str) -> String {
        let mut client = self.connect(user, "", None).await;
        self.service.send_notification(user, note("seen")).await.unwrap();
        let seen = client.next().await;
        drop(client);
        self.wait_for_clients(user, 0).await;
        seen.id
    }

    /// Waits until `user` has `n` connections registered (connects are asynchronous).
    pub async fn wait_for_clients(&self, user: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.service.client_count_for_user(user) != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user} never had {n} connections"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
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

    /// The next event of any name; `None` when the stream ended.
    pub async fn next_any(&mut self) -> Option<Event> {
        tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("timed out waiting for an event")
            .map(|r| r.expect("stream error"))
    }

    /// The next event that is not a heartbeat.
    pub async fn next(&mut self) -> Event {
        loop {
            let event = self.next_any().await.expect("stream ended");
            if event.event != "heartbeat" {
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
                Ok(Some(Ok(e))) if e.event == "heartbeat" => continue,
                Ok(_) => return false,
            }
        }
    }

    /// Reads until the stream ends; returns the non-heartbeat events seen on the way.
    pub async fn until_end(&mut self) -> Vec<Event> {
        let mut seen = Vec::new();
        while let Some(event) = self.next_any().await {
            if event.event != "heartbeat" {
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
