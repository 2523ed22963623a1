//! `POST /api/events`: other backends publish events over HTTP.
//!
//! ```text
//! curl -X POST http://127.0.0.1:3000/api/events \
//!   -H "Authorization: Bearer $SSE_PUBLISH_KEY" -H 'Content-Type: application/json' \
//!   -d '{"user_id":"alice","event":"notification","data":{"title":"Hi","message":"from curl"}}'
//! # 202 {"ids":["1764189000000001"]}
//! ```
//!
//! The body is one object or an array of them. Every item is validated before any is
//! published, so a batch is taken whole or refused whole with the first bad field named
//! (`[2].data.title`). With an `Idempotency-Key` header, a retry of the same body within
//! the window answers with the first publish's ids and publishes nothing (see
//! [`idempotency`](crate::server::core::idempotency)).

use std::{future::Future, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::{
    events::{Event, ValidationError},
    server::{
        auth::{self, bearer_token},
        core::{
            idempotency::check_idempotency_key,
            service::{SendError, SseService},
        },
        event::{Envelope, EventId, Target},
    },
};

/// How long a request body may take to arrive: one that trickles in is cut off.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks `Authorization: Bearer <SSE_PUBLISH_KEY>`: 403 when no key is configured (the
/// routes that need it are off), 401 without a key, 403 with a wrong one.
pub(crate) fn check_publish_key(service: &SseService, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = service.config().publish_key.as_ref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this route is disabled: set SSE_PUBLISH_KEY to enable it",
        ));
    };
    match bearer_token(headers) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "send `Authorization: Bearer <SSE_PUBLISH_KEY>`",
        )
        .field("Authorization")),
        // Compared without stopping at the first difference, so timing does not leak the key.
        Some(given) if !bool::from(given.as_bytes().ct_eq(key.expose_secret().as_bytes())) => {
            Err(ApiError::new(StatusCode::FORBIDDEN, "wrong publish key").field("Authorization"))
        }
        Some(_) => Ok(()),
    }
}

/// Reads a body of at most `limit` bytes within [`BODY_TIMEOUT`]: 413 past the limit, 408
/// when it trickles in too slowly.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        )
        .field("body")),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {limit} bytes"),
        )
        .field("body")),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// `POST /api/events`. The key is checked before a byte of the body is read.
pub async fn publish_handler(
    State(service): State<SseService>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    check_publish_key(&service, &parts.headers)?;
    let config = service.config();
    let body = read_body(body, config.max_body_bytes).await?;
    let envelopes = match fast::envelopes(&service, &body) {
        Some(envelopes) => envelopes,
        None => envelopes_naming_errors(&service, &body)?,
    };
    let key = idempotency_key(&parts.headers)?.map(str::to_owned);
    let publishing = async move {
        match key {
            None => service.publish_envelopes(envelopes).await,
            Some(key) => service.publish_once(&key, &body, envelopes).await,
        }
    };
    publish_to_the_end(publishing, IDEMPOTENCY_KEY).await
}

/// Runs a publish to the end in a task of its own, whatever the client does: one that
/// hangs up mid-publish must not leave it half done (its idempotency record "in
/// progress"). Answers 202 `{"ids": [...]}`, or the failure, naming `key_field` (where the
/// idempotency key came from) when the key is the problem.
pub(super) async fn publish_to_the_end(
    publishing: impl Future<Output = Result<Vec<EventId>, SendError>> + Send + 'static,
    key_field: &'static str,
) -> Result<Response, ApiError> {
    let ids = tokio::spawn(publishing)
        .await
        .map_err(|_| ApiError::unavailable("the publish was interrupted"))?
        .map_err(|e| send_error(e, key_field))?;
    Ok(accepted(ids))
}

/// A failed publish as its HTTP answer; `key_field` names where the idempotency key came from.
fn send_error(e: SendError, key_field: &str) -> ApiError {
    match e {
        SendError::Invalid(e) => ApiError::from(e),
        SendError::Inbox(_) => ApiError::unavailable(e.to_string()).field("inbox"),
        SendError::KeyInProgress => ApiError::new(StatusCode::CONFLICT, e.to_string())
            .field(key_field)
            .retry_after(1),
        SendError::KeyReused => ApiError::new(StatusCode::CONFLICT, e.to_string()).field(key_field),
        SendError::Broker(_) | SendError::ShuttingDown => ApiError::unavailable(e.to_string()),
    }
}

/// 202 `{"ids": [...]}`: what a publish answers.
fn accepted(ids: Vec<EventId>) -> Response {
    #[derive(serde::Serialize)]
    struct Published {
        ids: Vec<EventId>,
    }
    (StatusCode::ACCEPTED, Json(Published { ids })).into_response()
}

/// The header that makes a publish idempotent.
const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// The `Idempotency-Key`, if sent: 1 to 255 visible ASCII characters, else 400.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default();
    match check_idempotency_key(key) {
        Ok(()) => Ok(Some(key)),
        Err(message) => Err(ApiError::bad_request(message).field(IDEMPOTENCY_KEY)),
    }
}

/// The body's events through a `serde_json::Value` tree, which can name the first bad
/// field of a refused body. [`fast::envelopes`] takes well-formed bodies without the tree.
fn envelopes_naming_errors(service: &SseService, body: &[u8]) -> Result<Vec<Envelope>, ApiError> {
    let config = service.config();
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")).field("body"))?;

    let envelopes = match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::bad_request("the array holds no events").field("body"));
            }
            if items.len() > config.max_batch {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{} events in one batch, at most {} allowed",
                        items.len(),
                        config.max_batch
                    ),
                )
                .field("body"));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| envelope(service, item).map_err(|e| e.under(&format!("[{i}]"))))
                .collect::<Result<Vec<_>, _>>()?
        }
        item => vec![envelope(service, item)?],
    };
    Ok(envelopes)
}

/// One item: `{"user_id": "..", "event": "..", "data": {..}}` or `{"broadcast": true, ...}`.
fn envelope(service: &SseService, item: Value) -> Result<Envelope, ValidationError> {
    let Value::Object(mut item) = item else {
        return Err(ValidationError::new("", "each event must be a JSON object"));
    };
    let target = target(&mut item)?;
    let name = match item.remove("event") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(ValidationError::new("event", "must be a string")),
        None => return Err(ValidationError::new("event", "is required")),
    };
    let data = item.remove("data").unwrap_or_else(|| Value::Object(Map::new()));
    if let Some(unknown) = item.keys().next() {
        return Err(ValidationError::new(
            unknown.as_str(),
            "unknown field; expected user_id or broadcast, event, data",
        ));
    }
    let event = Event::from_value(&name, data)?;
    service.prepare(target, event)
}

fn target(item: &mut Map<String, Value>) -> Result<Target, ValidationError> {
    let broadcast = match item.remove("broadcast") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(ValidationError::new("broadcast", "must be true or false")),
    };
    match (item.remove("user_id"), broadcast) {
        (Some(Value::String(user)), false) => Ok(Target::User(user.into())),
        (Some(Value::String(_)), true) => Err(ValidationError::new(
            "broadcast",
            "give either user_id or broadcast: true, not both",
        )),
        (Some(_), _) => Err(ValidationError::new("user_id", "must be a string")),
        (None, true) => Ok(Target::Broadcast),
        (None, false) => Err(ValidationError::new(
            "user_id",
            "is required (or set broadcast: true)",
        )),
    }
}

/// Well-formed publish bodies, read straight into typed events.
///
/// The S3 profile found a fifth of a targeted delivery's server CPU in the publish API,
/// most of it building and dropping the `Value` tree of every body (a `String` or `Map`
/// per field). Here each item borrows from the body and its `data` is parsed once, into
/// its typed event. Anything this path does not take whole (a wrong type, an unknown or
/// duplicated field, a `null`, a `timestamp` in a built-in event's data, too many items)
/// returns `None`, and the body goes through [`envelopes_naming_errors`], which accepts or
/// refuses it exactly as before and names the field. So this path decides nothing: it
/// either agrees with the `Value` path or leaves the body to it.
mod fast {
    use std::borrow::Cow;

    use serde::{Deserialize, Deserializer};
    use serde_json::value::RawValue;

    use super::{Envelope, SseService, Target};
    use crate::events::Event;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item<'a> {
        #[serde(default, borrow, deserialize_with = "present")]
        user_id: Option<Cow<'a, str>>,
        #[serde(default)]
        broadcast: bool,
        #[serde(borrow)]
        event: Cow<'a, str>,
        #[serde(default, borrow, deserialize_with = "present")]
        data: Option<&'a RawValue>,
    }

    /// A field that is there, never `null`: `Option<T>` alone would read `null` as
    /// missing, where the `Value` path refuses it.
    fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
        T::deserialize(d).map(Some)
    }

    /// The body's events, or `None` to leave the body to the `Value` path.
    pub(super) fn envelopes(service: &SseService, body: &[u8]) -> Option<Vec<Envelope>> {
        // One object or an array of them: the first byte decides (an `untagged` enum would
        // buffer the body into serde's own tree).
        let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
        // (`data` gets serde_json's nesting limit of its own here, where the `Value` path
        // counts the two levels around it: data nested 127 deep passes only here. Harmless.)
        let items = if *first == b'[' {
            let raw: Vec<&RawValue> = serde_json::from_slice(body).ok()?;
            if raw.is_empty() || raw.len() > service.config().max_batch {
                return None;
            }
            // Only objects: a derived `Deserialize` also reads a struct from an array of
            // its fields in order (`["alice", false, "notification", ...]`).
            raw.into_iter()
                .map(|item| {
                    item.get()
                        .starts_with('{')
                        .then(|| serde_json::from_str::<Item>(item.get()).ok())?
                })
                .collect::<Option<Vec<_>>>()?
        } else {
            vec![serde_json::from_slice::<Item>(body).ok()?]
        };
        items.into_iter().map(|item| envelope(service, item)).collect()
    }

    fn envelope(service: &SseService, item: Item) -> Option<Envelope> {
        let target = match (item.user_id, item.broadcast) {
            (Some(user), false) => Target::User(user.as_ref().into()),
            (None, true) => Target::Broadcast,
            _ => return None,
        };
        let data = item.data.map_or("{}", RawValue::get);
        let event = Event::from_json_object(&item.event, data)?;
        service.prepare(target, event).ok()
    }
}

/// `POST /api/disconnect` `{"user_id": "..."}`: ends every stream of that user on every
/// instance (e.g. at logout); `200 {"closed": n}`.
pub async fn disconnect_handler(
    State(service): State<SseService>,
    request: Request,
) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Disconnect {
        user_id: String,
    }
    let (parts, body) = request.into_parts();
    check_publish_key(&service, &parts.headers)?;
    let body = read_body(body, 4 * 1024).await?;
    let request: Disconnect = serde_json::from_slice(&body).map_err(|e| {
        let field = if e.to_string().contains("user_id") {
            "user_id"
        } else {
            "body"
        };
        ApiError::bad_request(format!("expected {{\"user_id\": \"...\"}}: {e}")).field(field)
    })?;
    auth::validate_user_id(&request.user_id).map_err(|e| ApiError::bad_request(e).field("user_id"))?;
    let closed = service
        .disconnect_user(&request.user_id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(serde_json::json!({ "closed": closed })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn service() -> (tokio::runtime::Runtime, SseService) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = crate::server::config::SseConfig::default().jwt_secret("publish-tests-secret-123");
        let service = runtime.block_on(SseService::start(config)).unwrap();
        (runtime, service)
    }

    /// What a publish would send, without the time it was accepted at.
    fn sent(envelopes: &[Envelope]) -> Vec<(Target, String, String, Option<String>)> {
        envelopes
            .iter()
            .map(|e| {
                // `{..,"timestamp":N}`, or `{"timestamp":N}` for empty data.
                let own = format!("\"timestamp\":{}}}", e.timestamp_ms);
                let data = match e.data.strip_suffix(&own) {
                    Some(rest) => format!("{}}}", rest.trim_end_matches(',')),
                    None => e.data.clone(),
                };
                (
                    e.target.clone(),
                    e.name.to_string(),
                    data,
                    e.coalesce_key.as_deref().map(Into::into),
                )
            })
            .collect()
    }

    /// One item built from fields that are right (most often), wrong, `null`, missing or
    /// doubled.
    fn item() -> impl Strategy<Value = String> {
        let user = prop::sample::select(vec![
            "",
            r#""user_id":"alice","#,
            r#""user_id":"alice","#,
            r#""user_id":null,"#,
            r#""user_id":5,"#,
            r#""user_id":"bad id!","#,
        ]);
        let broadcast = prop::sample::select(vec![
            "",
            "",
            "",
            r#""broadcast":true,"#,
            r#""broadcast":false,"#,
            r#""broadcast":null,"#,
        ]);
        let event = prop::sample::select(vec![
            "",
            r#""event":"notification","#,
            r#""event":"notification","#,
            r#""event":"order.shipped","#,
            r#""event":"reel_upload_progress","#,
            r#""event":"system_alert","#,
            r#""event":"order.shipped","#,
            r#""event":"heartbeat","#,
            r#""event":"error","#,
            r#""event":"Bad Name","#,
            r#""event":null,"#,
            r#""event":"notification","event":"order.shipped","#,
        ]);
        let data = prop::sample::select(vec![
            "",
            r#""data":null,"#,
            r#""data":{},"#,
            r#""data":[1],"#,
            r#""data":{"a":1},"#,
            r#""data":{"title":"t","message":"m"},"#,
            r#""data":{"title":"t","message":"m"},"#,
            r#""data":{"title":"t","message":"m"},"#,
            r#""data":{"title":"t","message":"m","timestamp":5},"#,
            r#""data":{"title":" ","message":"m"},"#,
            r#""data":{"title":"t","message":"m","type":"bogus"},"#,
            r#""data":{"title":"t","title":"u","message":"m"},"#,
            r#""data":{"message":"m","type":"maintenance"},"#,
            r#""data":{"reelId":"r","progress":50,"status":"uploading"},"#,
            r#""data":{"reelId":"r","progress":150,"status":"uploading"},"#,
        ]);
        let extra = prop::sample::select(vec!["", r#""x":1,"#]);
        // Arrays that read as the fields of a struct, in order.
        let data = prop_oneof![
            4 => data,
            1 => prop::sample::select(vec![
                r#""data":["t","m"],"#, r#""data":["m"],"#, r#""data":["m","maintenance"],"#,
                r#""data":["r",5,"uploading"],"#, r#""data":["profile"],"#,
            ]),
        ];
        (user, broadcast, event, data, extra, any::<prop::sample::Index>()).prop_map(
            |(u, b, e, d, x, order)| {
                let mut fields = [u, b, e, d, x];
                let by = order.index(fields.len());
                fields.rotate_left(by);
                format!("{{{}}}", fields.concat().trim_end_matches(','))
            },
        )
    }

    /// An item, or the same fields as an array in struct order (which a derived
    /// `Deserialize` would read as the struct).
    fn item_or_array() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => item(),
            1 => prop::sample::select(vec![
                r#"["alice",false,"order.shipped",{"a":1}]"#,
                r#"["alice",false,"notification",{"title":"t","message":"m"}]"#,
                r#"[null,true,"system_alert",{"message":"m"}]"#,
            ])
            .prop_map(String::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The typed fast path never decides anything the `Value` path would not: whatever
        /// it takes, the `Value` path takes too, with the same events.
        #[test]
        fn the_fast_path_agrees_with_the_value_path(items in prop::collection::vec(item_or_array(), 0..4), one in any::<bool>()) {
            let (_runtime, service) = service();
            let body = if one && items.len() == 1 { items[0].clone() } else { format!("[{}]", items.join(",")) };
            if let Some(fast) = fast::envelopes(&service, body.as_bytes()) {
                let slow = envelopes_naming_errors(&service, body.as_bytes());
                prop_assert!(slow.is_ok(), "fast path took {body}, the Value path refused it: {:?}", slow.err());
                prop_assert_eq!(sent(&fast), sent(&slow.unwrap()), "{}", body);
            }
        }
    }

    /// The fast path does take well-formed bodies (else the test above proves nothing).
    #[test]
    fn the_fast_path_takes_well_formed_bodies() {
        let (_runtime, service) = service();
        let batch = r#"[{"user_id":"alice","event":"notification","data":{"title":"t","message":"m"}},
            {"broadcast":true,"event":"system_alert","data":{"message":"m"}},
            {"user_id":"bob","event":"order.shipped","data":{"orderId":42}},
            {"user_id":"bob","event":"reel_upload_progress","data":{"reelId":"r","progress":5,"status":"uploading"}}]"#;
        let envelopes = fast::envelopes(&service, batch.as_bytes()).expect("taken");
        assert_eq!(
            sent(&envelopes),
            sent(&envelopes_naming_errors(&service, batch.as_bytes()).unwrap())
        );
        assert_eq!(envelopes.len(), 4);
        assert_eq!(envelopes[3].coalesce_key.as_deref(), Some("r"));
        assert!(fast::envelopes(&service, br#" {"user_id":"alice","event":"order.shipped"}"#).is_some());
        // A `timestamp` in a built-in event is the `Value` path's to drop.
        assert!(fast::envelopes(
            &service,
            br#"{"user_id":"a","event":"notification","data":{"title":"t","message":"m","timestamp":1}}"#
        )
        .is_none());
    }

    #[test]
    fn target_needs_exactly_one_of_user_and_broadcast() {
        let t = |v: Value| target(&mut v.as_object().unwrap().clone());
        assert_eq!(
            t(serde_json::json!({"user_id": "a"})).unwrap(),
            Target::User("a".into())
        );
        assert_eq!(
            t(serde_json::json!({"broadcast": true})).unwrap(),
            Target::Broadcast
        );
        assert_eq!(t(serde_json::json!({})).unwrap_err().field, "user_id");
        assert_eq!(t(serde_json::json!({"user_id": 5})).unwrap_err().field, "user_id");
        assert_eq!(
            t(serde_json::json!({"user_id": "a", "broadcast": true}))
                .unwrap_err()
                .field,
            "broadcast"
        );
    }
}
