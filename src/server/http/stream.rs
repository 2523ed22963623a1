//! `GET /api/sse`: HTTP glue around [`SseService::open_stream`]. It admits the request
//! (see [`admission`](super::admission)) and wraps the stream in a response with the
//! headers SSE needs.
//!
//! The frames are written as bytes encoded once per event (see
//! [`PublishedEvent`](crate::server::event::PublishedEvent)) instead of through
//! `axum::response::sse::Event`, which would encode every event again for every connection.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::BytesMut;
use futures::StreamExt;

pub use super::admission::{StreamQuery, MAX_FILTER_NAMES};
use super::{
    admission::{admit, Transport},
    ApiError,
};
use crate::{
    api,
    server::{
        auth::Identity,
        core::service::{OpenError, SseService},
    },
};

/// `GET /api/sse`; `HEAD /api/sse` answers whether a `GET` would be let in (204 or 401)
/// without opening a stream, for a browser that cannot see why its `EventSource` failed.
/// A 204 carries the identity tag ([`api::IDENTITY_TAG_HEADER`]), so a tab knows which
/// other tabs it may share a stream with before it opens one.
pub async fn sse_handler(State(service): State<SseService>, request: Request) -> Result<Response, ApiError> {
    let (parts, _) = request.into_parts();
    let probe = parts.method == Method::HEAD;
    let admitted = admit(&service, parts, Transport::Sse).await?;
    if probe {
        let tag = service.identity_tag(&admitted.identity);
        let tag = HeaderValue::from_str(&tag).expect("a base64url tag is a valid header value");
        return Ok((StatusCode::NO_CONTENT, [(api::IDENTITY_TAG_HEADER, tag)]).into_response());
    }
    let body = if admitted.probe {
        transport_probe(&service, &admitted.identity)?
    } else {
        let stream = service
            .open_stream(&admitted.identity, admitted.resume, admitted.filter)
            .await?;
        Body::from_stream(stream)
    };
    let mut response = body.into_response();
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

/// How long a transport probe stays open: longer than any client waits for its `ready`,
/// so a proxy that flushes only when a response ends cannot pass it.
pub const PROBE_HOLD: Duration = Duration::from_secs(15);

/// The body of a transport probe: a retry hint that keeps `EventSource` from coming back
/// by itself, the `ready` event, then nothing until [`PROBE_HOLD`] passes or the server
/// shuts down. It holds a connection permit, not a place in the hub.
fn transport_probe(service: &SseService, identity: &Identity) -> Result<Body, ApiError> {
    let permit = service
        .hold_connection()
        .ok_or(OpenError::TooManyConnections(service.config().max_connections))?;
    let mut first = BytesMut::from(&b"retry: 3600000\n\n"[..]);
    first.extend_from_slice(&service.ready_frame(identity));
    let shutting_down = service.shutting_down();
    let held = async move {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_HOLD) => {}
            _ = shutting_down => {}
        }
        drop(permit);
        None
    };
    let body = futures::stream::once(async move { Some(first.freeze()) })
        .chain(futures::stream::once(held))
        .filter_map(|chunk| async move { chunk.map(Ok::<_, std::convert::Infallible>) });
    Ok(Body::from_stream(body))
}
