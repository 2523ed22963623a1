//! `POST /api/webhooks/<name>`: a service that signs its callbacks as Standard Webhooks do
//! (an upload service reporting progress, then "ready") publishes to the user its payload
//! names, without holding the publish key. The payload:
//!
//! ```json
//! {"type": "reel.upload_progress", "timestamp": "2026-12-04T05:00:00Z",
//!  "data": {"userId": "alice", "reelId": "reel-7", "progress": 40, "status": "uploading"}}
//! {"type": "reel.ready",
//!  "data": {"userId": "alice", "reelId": "reel-7", "playbackUrl": "https://cdn.example.com/reel-7.m3u8"}}
//! ```
//!
//! `data` is the event's data as on the stream, plus `userId`. The signature is checked
//! before the body is parsed; its `webhook-id` is the publish's idempotency key, so a
//! redelivery (or a replay within the timestamp's five minutes) publishes nothing again.

use axum::{
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde_json::Value;

use super::{
    publish::{publish_to_the_end, read_body},
    ApiError,
};
use crate::{
    events::{names, Event},
    server::{
        clock::now_ms,
        core::{idempotency::check_idempotency_key, service::SseService},
        event::Target,
        webhook::{check_timestamp, Delivery, WebhookError},
    },
};

/// A webhook's body at most: a progress report or a "ready" is a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The longest `webhook-id` accepted (it becomes an idempotency key with the name).
const MAX_ID_LEN: usize = 180;

/// Which payload `type` publishes which event.
const TYPES: [(&str, &str); 2] = [
    ("reel.upload_progress", names::REEL_UPLOAD_PROGRESS),
    ("reel.ready", names::REEL_READY),
];

/// `POST /api/webhooks/{name}`: 202 `{"ids": [..]}` as `POST /api/events`; 404 for a name
/// without a secret; 401 naming the header for a missing, stale or wrong signature; 400
/// naming the field for a payload that is not one of [`TYPES`].
pub async fn webhook_handler(
    State(service): State<SseService>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let secrets = &service.config().webhook_secrets;
    if !secrets.has(&name) {
        let how = if secrets.is_empty() {
            "webhooks are off: set SSE_WEBHOOK_SECRETS=<name>=whsec_<base64> to turn one on"
        } else {
            "no webhook of this name (SSE_WEBHOOK_SECRETS)"
        };
        return Err(ApiError::new(StatusCode::NOT_FOUND, how).field("name"));
    }
    let (parts, body) = request.into_parts();
    let id = header(&parts.headers, "webhook-id")?;
    if id.len() > MAX_ID_LEN || check_idempotency_key(id).is_err() {
        return Err(
            ApiError::bad_request(format!("expected 1 to {MAX_ID_LEN} visible ASCII characters"))
                .field("webhook-id"),
        );
    }
    let timestamp = header(&parts.headers, "webhook-timestamp")?;
    let signature = header(&parts.headers, "webhook-signature")?;
    let now_secs = now_ms() / 1000;
    // A stale or bogus timestamp is refused before a byte of the body is read.
    check_timestamp(timestamp, now_secs).map_err(unauthorized)?;
    let body = read_body(body, MAX_BODY_BYTES.min(service.config().max_body_bytes)).await?;
    let delivery = Delivery {
        id,
        timestamp,
        signature,
        body: &body,
    };
    secrets.verify(&name, &delivery, now_secs).map_err(unauthorized)?;

    let (user, event) = parse_payload(&body)?;
    let once = service.with_idempotency_key(format!("webhook:{name}:{id}"));
    let publishing = async move { once.publish(vec![(Target::User(user.into()), event)]).await };
    publish_to_the_end(publishing, "webhook-id").await
}

/// A required header as text; 401 naming it when missing.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, format!("{name} is missing")).field(name))
}

fn unauthorized(e: WebhookError) -> ApiError {
    let field = match e {
        WebhookError::UnknownName => "name",
        WebhookError::Timestamp(_) => "webhook-timestamp",
        WebhookError::Signature => "webhook-signature",
    };
    ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).field(field)
}

/// The user and the event a verified payload names; 400 naming the field otherwise.
fn parse_payload(body: &[u8]) -> Result<(String, Event), ApiError> {
    let mut payload: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")).field("body"))?;
    let kind = payload["type"].as_str().unwrap_or_default();
    let Some((_, event_name)) = TYPES.iter().find(|(t, _)| *t == kind) else {
        let known: Vec<&str> = TYPES.iter().map(|(t, _)| *t).collect();
        return Err(ApiError::bad_request(format!("expected one of {}", known.join(", "))).field("type"));
    };
    let Some(data) = payload.get_mut("data").and_then(Value::as_object_mut) else {
        return Err(ApiError::bad_request("expected an object").field("data"));
    };
    let Some(Value::String(user)) = data.remove("userId") else {
        return Err(ApiError::bad_request("expected the user's id as a string").field("data.userId"));
    };
    let event = Event::from_value(event_name, Value::Object(std::mem::take(data)))
        .and_then(|event| event.validate().map(|()| event))
        .map_err(|e| {
            ApiError::bad_request(e.message).field(format!("data.{}", e.field.trim_start_matches("data.")))
        })?;
    Ok((user, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_map_to_events_for_the_user_they_name() {
        let (user, event) = parse_payload(
            br#"{"type":"reel.upload_progress","data":{"userId":"alice","reelId":"r7","progress":40,"status":"uploading"}}"#,
        )
        .unwrap();
        assert_eq!(
            (user.as_str(), event.name()),
            ("alice", names::REEL_UPLOAD_PROGRESS)
        );
        let (_, event) = parse_payload(
            br#"{"type":"reel.ready","data":{"userId":"bob","reelId":"r7","playbackUrl":"https://cdn.example.com/r7.m3u8"}}"#,
        )
        .unwrap();
        assert_eq!(event.name(), names::REEL_READY);
    }

    #[test]
    fn bad_payloads_name_the_field() {
        let field = |body: &str| parse_payload(body.as_bytes()).unwrap_err().field.unwrap();
        assert_eq!(field("not json"), "body");
        assert_eq!(field(r#"{"type":"user.deleted","data":{}}"#), "type");
        assert_eq!(field(r#"{"type":"reel.ready","data":[]}"#), "data");
        assert_eq!(
            field(r#"{"type":"reel.ready","data":{"reelId":"r"}}"#),
            "data.userId"
        );
        assert_eq!(
            field(
                r#"{"type":"reel.upload_progress","data":{"userId":"a","reelId":"r","progress":140,"status":"uploading"}}"#
            ),
            "data.progress"
        );
    }
}
