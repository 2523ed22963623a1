//! `GET /api/sse`: HTTP glue around [`SseService::open_stream`]. It authenticates, applies
//! the rate limits, parses the `events=` filter and the resume point, and wraps the stream
//! in a response with the headers SSE needs.
//!
//! The frames are written as bytes encoded once per event (see
//! [`PublishedEvent`](super::event::PublishedEvent)) instead of through
//! `axum::response::sse::Event`, which would encode every event again for every connection.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{ConnectInfo, Query, State},
    http::{header, Extensions, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::{event::EventId, metrics as m, service::OpenError, ApiError, SseService};
use crate::events::validate_event_name;

/// Query parameters of `GET /api/sse`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamQuery {
    /// Comma-separated event names; only these are sent (heartbeats always are).
    pub events: Option<String>,
    /// Resume after this id, for clients that cannot set the `Last-Event-ID` header.
    #[serde(rename = "lastEventId")]
    pub last_event_id: Option<String>,
    /// A session token, for clients that can send neither cookie nor header.
    pub token: Option<String>,
}

/// `GET /api/sse`.
pub async fn sse_handler(
    State(service): State<SseService>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    if service.is_shutting_down() {
        return Err(OpenError::ShuttingDown.into());
    }
    let claims = service
        .authenticate(&headers, query.token.as_deref())
        .map_err(|e| {
            m::connection_refused("unauthorized");
            ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).field("token")
        })?;
    let user: Arc<str> = claims.sub.into();
    let ip = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    service.admit(ip, &user).map_err(|limited| {
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, limited.to_string())
            .retry_after(limited.retry_after.as_secs())
    })?;
    let filter = parse_filter(query.events.as_deref())?;
    let resume_from = parse_last_event_id(&headers, query.last_event_id.as_deref())?;

    let stream = service.open_stream(&user, resume_from, filter).await?;
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

impl From<OpenError> for ApiError {
    fn from(e: OpenError) -> Self {
        if let OpenError::Broker(cause) = &e {
            tracing::warn!(error = %cause, "broker unavailable for a new stream");
        }
        // Nothing is lost: the client retries later with the same id.
        ApiError::unavailable(e.to_string())
    }
}

/// Parses `events=a,b`, checking each name.
fn parse_filter(events: Option<&str>) -> Result<Option<Arc<[String]>>, ApiError> {
    let Some(events) = events.filter(|e| !e.trim().is_empty()) else {
        return Ok(None);
    };
    let names = events
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            validate_event_name(n)
                .map(|()| n.to_string())
                .map_err(|e| ApiError::bad_request(e.message).field("events"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(names.into()))
}

/// The resume point: the `Last-Event-ID` header, else the `lastEventId` query parameter.
fn parse_last_event_id(headers: &HeaderMap, query: Option<&str>) -> Result<Option<EventId>, ApiError> {
    let (field, raw) = match headers.get("last-event-id") {
        Some(v) => ("Last-Event-ID", v.to_str().unwrap_or("\u{fffd}")),
        None => ("lastEventId", query.unwrap_or_default()),
    };
    if raw.trim().is_empty() {
        return Ok(None);
    }
    raw.parse::<EventId>().map(Some).map_err(|_| {
        ApiError::bad_request(format!("{raw:?} is not an event id this server issued")).field(field)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_names_are_validated() {
        assert!(parse_filter(None).unwrap().is_none());
        assert_eq!(&*parse_filter(Some("a, b")).unwrap().unwrap(), ["a", "b"]);
        assert!(parse_filter(Some("ok,Bad Name")).is_err());
    }

    #[test]
    fn header_wins_over_query_and_junk_is_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            parse_last_event_id(&headers, Some("7")).unwrap(),
            Some(EventId(7))
        );
        headers.insert("last-event-id", HeaderValue::from_static("9"));
        assert_eq!(
            parse_last_event_id(&headers, Some("7")).unwrap(),
            Some(EventId(9))
        );
        assert!(parse_last_event_id(&HeaderMap::new(), Some("abc")).is_err());
        assert_eq!(parse_last_event_id(&HeaderMap::new(), Some("")).unwrap(), None);
    }
}
