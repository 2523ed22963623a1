//! The OpenAPI document: the checked-in `docs/openapi.json` is the generated one, and the
//! running server's answers match what it declares for each operation, status by status.

mod common;

use std::path::PathBuf;

use base64::{engine::general_purpose::STANDARD, Engine};
use common::*;
use reqwest::{RequestBuilder, Response};
use serde_json::{json, Value};
use sse_notify::server::{openapi, Routes, SseService, WebhookSecrets};
use sse_notify_testkit::TempDir;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

/// `docs/openapi.json` is what the code generates; `SSE_UPDATE_OPENAPI=1` (`make openapi`)
/// rewrites it.
#[test]
fn the_checked_in_document_is_the_generated_one() {
    let generated = openapi::openapi_json();
    if std::env::var_os("SSE_UPDATE_OPENAPI").is_some() {
        std::fs::write(checked_in(), &generated).unwrap();
    }
    let file = std::fs::read_to_string(checked_in()).unwrap_or_default();
    assert!(
        file == generated,
        "docs/openapi.json differs from the document the code generates: run `make openapi` and commit it"
    );
}

/// The document, to look operations up in and to validate bodies against.
struct Contract {
    doc: Value,
}

impl Contract {
    fn new() -> Self {
        Self {
            doc: serde_json::to_value(openapi::openapi("")).unwrap(),
        }
    }

    /// Checks one real answer of `method path` (the path as the document writes it): its
    /// status is documented for that operation, its content type is the documented one and
    /// a JSON body validates against the documented schema. Returns the body.
    async fn check(&self, method: &str, path: &str, response: Response) -> Value {
        let status = response.status().as_u16().to_string();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let operation = &self.doc["paths"][path][method.to_ascii_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not in the document");
        let documented = &operation["responses"][&status];
        assert!(
            documented.is_object(),
            "{method} {path} answered {status}, which the document does not list"
        );
        let Some(content) = documented["content"].as_object() else {
            return Value::Null;
        };
        let content_type =
            content_type.unwrap_or_else(|| panic!("{method} {path} {status}: no content type"));
        let mime = content_type.split(';').next().unwrap().trim();
        let (_, media) = content
            .iter()
            .find(|(documented, _)| documented.as_str() == mime)
            .unwrap_or_else(|| {
                panic!(
                    "{method} {path} {status}: content type {mime}, documented {:?}",
                    content.keys()
                )
            });
        if mime != "application/json" {
            return Value::Null;
        }
        let body: Value = response.json().await.unwrap();
        self.validate(&media["schema"], &body, &format!("{method} {path} {status}"));
        body
    }

    /// Validates `value` against `schema`, whose `$ref`s point into the document.
    fn validate(&self, schema: &Value, value: &Value, what: &str) {
        // The document as the root of the schema, so `#/components/schemas/..` resolves
        // (2020-12 ignores the document's other keys).
        let mut root = self.doc.clone();
        let root_object = root.as_object_mut().unwrap();
        for (key, rule) in schema.as_object().unwrap() {
            root_object.insert(key.clone(), rule.clone());
        }
        let validator =
            jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{what}: bad schema: {e}"));
        let errors: Vec<String> = validator.iter_errors(value).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{what}: {value} does not match the document: {errors:?}"
        );
    }
}

/// The check above refuses what the document does not allow (else it would pass anything).
#[test]
fn the_contract_refuses_what_the_document_does_not_allow() {
    let contract = Contract::new();
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let refused = |name: &str, value: Value| {
        let outcome = std::panic::catch_unwind(|| contract.validate(&schema(name), &value, name));
        assert!(outcome.is_err(), "{name} took {value}");
    };
    refused("ErrorBody", json!({"error": "x", "detail": 1}));
    refused("ErrorBody", json!({"field": "x"}));
    refused("Published", json!({"ids": [1]}));
    refused(
        "InboxPage",
        json!({"items": [], "unread": -1, "total": 0, "next": null}),
    );
    refused("PublishBody", json!({"One": {"event": "x"}}));
    contract.validate(
        &schema("PublishBody"),
        &json!([{"event": "x", "broadcast": true}]),
        "batch",
    );
    contract.validate(
        &schema("InboxCounts"),
        &json!({"unread": 1, "total": 2}),
        "counts",
    );
}

const WEBHOOK_KEY: &[u8] = b"the upload service's webhook key";

fn signed(request: RequestBuilder, id: &str, body: &str) -> RequestBuilder {
    let timestamp = (sse_notify::server::now_ms() / 1000).to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_KEY);
    let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{body}").as_bytes());
    request
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp)
        .header(
            "webhook-signature",
            format!("v1,{}", STANDARD.encode(tag.as_ref())),
        )
        .body(body.to_owned())
}

/// Every operation, called on a real server over TCP in the ways that give each of its
/// documented answers that a test can cause, checked against the document.
#[tokio::test]
async fn every_answer_matches_the_document() {
    let contract = Contract::new();
    let dir = TempDir::new("openapi");
    let secrets = format!("uploads=whsec_{}", STANDARD.encode(WEBHOOK_KEY));
    let config = test_config()
        .inbox_url(format!("sqlite://{}/inbox.db", dir.path().display()))
        .webhook_secrets(WebhookSecrets::parse(&secrets).unwrap())
        .max_body_bytes(64 * 1024);
    let server = start_server(config).await;
    let http = &server.http;
    let url = |path: &str| server.url(path);
    let alice = server.token("alice");

    // The document serves itself, as generated.
    let served = contract
        .check(
            "GET",
            "/api/openapi.json",
            http.get(url("/api/openapi.json")).send().await.unwrap(),
        )
        .await;
    assert_eq!(served, contract.doc);

    // Operate.
    contract
        .check("GET", "/healthz", http.get(url("/healthz")).send().await.unwrap())
        .await;
    for (key, status) in [(Some(PUBLISH_KEY), 200), (None, 401), (Some("wrong"), 403)] {
        for path in ["/api/stats", "/metrics"] {
            let mut request = http.get(url(path));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), status, "{path}");
            contract.check("GET", path, response).await;
        }
    }
    let stats_stream = http
        .get(url("/api/stats/stream"))
        .bearer_auth(PUBLISH_KEY)
        .send()
        .await
        .unwrap();
    contract.check("GET", "/api/stats/stream", stats_stream).await;
    let presence = |query: &str, key: Option<&str>| {
        let mut request = http.get(url(&format!("/api/presence{query}")));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for (query, key, status) in [
        ("?user_id=alice", Some(PUBLISH_KEY), 200),
        ("", Some(PUBLISH_KEY), 400),
        ("?user_id=a%0Ab", Some(PUBLISH_KEY), 400),
        ("?user_id=alice", None, 401),
        ("?user_id=alice", Some("wrong"), 403),
    ] {
        let response = presence(query, key).await.unwrap();
        assert_eq!(response.status(), status, "presence{query}");
        contract.check("GET", "/api/presence", response).await;
    }

    // Publish: one, a batch, bad bodies, keys, an idempotency conflict, too big.
    let publish = |body: String| http.post(url("/api/events")).bearer_auth(PUBLISH_KEY).body(body);
    let note =
        json!({"user_id": "alice", "event": "notification", "data": {"title": "Hi", "message": "there"}});
    let answers = [
        (publish(note.to_string()), 202),
        (
            publish(
                json!([note, {"broadcast": true, "event": "system_alert", "data": {"message": "m"}}])
                    .to_string(),
            ),
            202,
        ),
        (
            publish(json!({"user_id": "alice", "event": "notification", "data": {"title": 1}}).to_string()),
            400,
        ),
        (publish("[".into()), 400),
        (http.post(url("/api/events")).body(note.to_string()), 401),
        (
            http.post(url("/api/events"))
                .bearer_auth("wrong")
                .body(note.to_string()),
            403,
        ),
        (publish("x".repeat(65 * 1024)), 413),
    ];
    for (request, status) in answers {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status);
        let body = contract.check("POST", "/api/events", response).await;
        if status == 400 {
            assert!(body["field"].is_string(), "{body}");
        }
    }
    let keyed = |body: String| publish(body).header("Idempotency-Key", "order-42");
    let first = keyed(note.to_string()).send().await.unwrap();
    contract.check("POST", "/api/events", first).await;
    let other = keyed(json!({"broadcast": true, "event": "x", "data": {}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409);
    contract.check("POST", "/api/events", other).await;

    // Disconnect.
    let disconnect = |body: Value| {
        http.post(url("/api/disconnect"))
            .bearer_auth(PUBLISH_KEY)
            .json(&body)
    };
    for (request, status) in [
        (disconnect(json!({"user_id": "bob"})), 200),
        (disconnect(json!({"user": "bob"})), 400),
        (
            http.post(url("/api/disconnect")).json(&json!({"user_id": "bob"})),
            401,
        ),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status);
        contract.check("POST", "/api/disconnect", response).await;
    }

    // Webhooks.
    let upload =
        json!({"type": "reel.ready", "data": {"userId": "alice", "reelId": "r1", "playbackUrl": "/r1"}});
    let hook = |name: &str| http.post(url(&format!("/api/webhooks/{name}")));
    for (request, status) in [
        (signed(hook("uploads"), "msg_1", &upload.to_string()), 202),
        (signed(hook("uploads"), "msg_2", "{\"type\": \"other\"}"), 400),
        (hook("uploads").body(upload.to_string()), 401),
        (signed(hook("payments"), "msg_3", &upload.to_string()), 404),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status);
        contract.check("POST", "/api/webhooks/{name}", response).await;
    }

    // The stream and its probe.
    let stream = http
        .get(url("/api/sse"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    contract.check("GET", "/api/sse", stream).await;
    let refused = http.get(url("/api/sse")).send().await.unwrap();
    contract.check("GET", "/api/sse", refused).await;
    let many = (0..40).map(|i| format!("e{i}")).collect::<Vec<_>>().join(",");
    let bad = http
        .get(url(&format!("/api/sse?events={many}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    contract.check("GET", "/api/sse", bad).await;
    let probe = http
        .head(url("/api/sse"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 204);
    assert!(probe.headers().contains_key("x-sse-identity-tag"));
    contract.check("HEAD", "/api/sse", probe).await;
    let not_websocket = http.get(url("/api/ws")).bearer_auth(&alice).send().await.unwrap();
    contract.check("GET", "/api/ws", not_websocket).await;
    let no_session = http.get(url("/api/ws")).send().await.unwrap();
    contract.check("GET", "/api/ws", no_session).await;

    // The inbox, with the notifications published above in it.
    let page = contract
        .check(
            "GET",
            "/api/inbox",
            http.get(url("/api/inbox?limit=1"))
                .bearer_auth(&alice)
                .send()
                .await
                .unwrap(),
        )
        .await;
    let id = page["items"][0]["id"].as_str().expect("an item").to_owned();
    assert!(page["next"].is_string(), "{page}");
    for query in ["?limit=0", "?status=new", "?before=nonsense"] {
        let response = http
            .get(url(&format!("/api/inbox{query}")))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        contract.check("GET", "/api/inbox", response).await;
    }
    let anonymous = http.get(url("/api/inbox")).send().await.unwrap();
    contract.check("GET", "/api/inbox", anonymous).await;
    for op in ["read", "unread", "archive", "unarchive"] {
        let path = format!("/api/inbox/{op}");
        for (body, status) in [(json!({"ids": [id]}), 200), (json!({"ids": "all"}), 400)] {
            let response = http
                .post(url(&path))
                .bearer_auth(&alice)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{path} {body}");
            contract.check("POST", &path, response).await;
        }
        let anonymous = http
            .post(url(&path))
            .json(&json!({"all": true}))
            .send()
            .await
            .unwrap();
        contract.check("POST", &path, anonymous).await;
    }

    // Without a store the inbox says so, as documented.
    let off = start_server(test_config()).await;
    let response = off
        .http
        .get(off.url("/api/inbox"))
        .bearer_auth(off.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    contract.check("GET", "/api/inbox", response).await;
}

/// Under a prefix the document is served there and names the prefix as its server.
#[tokio::test]
async fn under_a_prefix_the_document_names_it() {
    let service = SseService::start(test_config()).await.unwrap();
    let server = serve(service, |sse| Routes::new(sse).prefix("/notify").build()).await;
    let doc: Value = server
        .http
        .get(server.url("/notify/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["servers"][0]["url"], "/notify");
    assert_eq!(doc["paths"], Contract::new().doc["paths"]);
}

/// The operators' dashboard: the sign-in form without a cookie; a wrong key is refused; the
/// right one sets an `HttpOnly`, `SameSite=Strict` cookie that opens the dashboard and the
/// stats routes (a forged one does not, nor one sent by another site's page) and never
/// publishes; signing out clears it; every answer as documented.
#[tokio::test]
async fn the_dashboard_signs_operators_in_with_the_publish_key() {
    let contract = Contract::new();
    let service = SseService::start(test_config()).await.unwrap();
    let server = serve(service, |sse| Routes::new(sse).dashboard(true).build()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |path: &str| server.url(path);

    contract
        .check(
            "GET",
            "/dashboard",
            http.get(url("/dashboard")).send().await.unwrap(),
        )
        .await;
    let page = http.get(url("/dashboard")).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'nonce-"),
        "{csp}"
    );
    assert!(
        page.text().await.unwrap().contains(r#"name="key""#),
        "the sign-in form"
    );

    let sign_in = |key: &str| {
        http.post(url("/dashboard/sign-in"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("key={key}"))
            .send()
    };
    let wrong = sign_in("not-the-key").await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert!(wrong.headers().get("set-cookie").is_none());
    contract.check("POST", "/dashboard/sign-in", wrong).await;
    let too_big = sign_in(&"k".repeat(2000)).await.unwrap();
    assert_eq!(too_big.status(), 413);
    contract.check("POST", "/dashboard/sign-in", too_big).await;

    let right = sign_in(PUBLISH_KEY).await.unwrap();
    assert_eq!(right.status(), 303);
    assert_eq!(right.headers()["location"], "/dashboard");
    let set_cookie = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set_cookie.contains(attribute), "{set_cookie} lacks {attribute}");
    }
    contract.check("POST", "/dashboard/sign-in", right).await;
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let dashboard = http
        .get(url("/dashboard"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(dashboard.status(), 200);
    let html = dashboard.text().await.unwrap();
    let id = server.service.instance_id();
    assert!(
        html.contains(&format!(r#"data-instance="{id}""#)),
        "this instance's row"
    );
    assert!(html.contains("Refused connections by reason"));

    let stats_with = |cookie: &str| {
        http.get(url("/api/stats"))
            .header("cookie", cookie.to_owned())
            .send()
    };
    let stats = stats_with(&cookie).await.unwrap();
    assert_eq!(stats.status(), 200);
    let report = contract.check("GET", "/api/stats", stats).await;
    assert_eq!(report["instance"], id);
    assert!(report["refused"]["unauthorized"].is_u64(), "{report}");
    let stream = http
        .get(url("/api/stats/stream"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    let forged = cookie.replace(|c: char| c.is_ascii_digit(), "9");
    assert_eq!(
        stats_with(&forged).await.unwrap().status(),
        401,
        "a forged cookie"
    );
    let from_another_site = http
        .get(url("/api/stats"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(from_another_site.status(), 401, "another site's page");
    // The cookie never stands in for the publish key anywhere else.
    let publish = http
        .post(url("/api/events"))
        .header("cookie", &cookie)
        .json(&json!({"user_id": "u", "event": "notification", "data": {"title": "t", "message": "m"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 401);

    let out = http
        .post(url("/dashboard/sign-out"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    assert!(out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    contract.check("POST", "/dashboard/sign-out", out).await;

    // Without a publish key there is nothing to sign in with.
    let mut config = test_config();
    config.publish_key = None;
    let service = SseService::start(config).await.unwrap();
    let keyless = serve(service, |sse| Routes::new(sse).dashboard(true).build()).await;
    let refused = http.get(keyless.url("/dashboard")).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    contract.check("GET", "/dashboard", refused).await;
}
