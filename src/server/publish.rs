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
//! (`[2].data.title`).

use std::time::Duration;

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

use super::{
    auth::bearer_token,
    event::{Envelope, Target},
    ApiError, SendError, SseService,
};
use crate::events::{Event, ValidationError};

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
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
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
    let value: Value = serde_json::from_slice(&body)
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
                .map(|(i, item)| envelope(&service, item).map_err(|e| e.under(&format!("[{i}]"))))
                .collect::<Result<Vec<_>, _>>()?
        }
        item => vec![envelope(&service, item)?],
    };
    let ids = service.publish_envelopes(envelopes).await.map_err(|e| match e {
        SendError::Invalid(e) => ApiError::from(e),
        other => ApiError::unavailable(other.to_string()),
    })?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "ids": ids }))).into_response())
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
    super::auth::validate_user_id(&request.user_id).map_err(|e| ApiError::bad_request(e).field("user_id"))?;
    let closed = service
        .disconnect_user(&request.user_id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(serde_json::json!({ "closed": closed })).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

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
