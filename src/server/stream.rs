//! `GET /api/sse`: authenticate, apply limits and the `events=` filter, replay what a
//! reconnecting client missed, then stream live events and heartbeats.
//!
//! The frames are written as bytes encoded once per event (see
//! [`PublishedEvent`](super::broker::PublishedEvent)) instead of through
//! `axum::response::sse::Event`, which would encode every event again for every connection.
//!
//! Ordering: the connection joins the hub *before* the replay is read, and live events
//! with an id the replay already sent are skipped, so nothing falls between replay and live
//! and nothing comes twice.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Query, State},
    http::{header, Extensions, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use governor::clock::{Clock, DefaultClock};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::{
    broker::{encode_frame, latest_progress_only, EventId, PublishedEvent},
    hub::{CloseReason, Outbound},
    metrics as m, now_ms, ApiError, SseService,
};
use crate::events::{names, validate_event_name};

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

/// Most bytes handed to the socket in one write when several events are waiting.
const MAX_BATCH_BYTES: usize = 32 * 1024;

/// `GET /api/sse`.
pub async fn sse_handler(
    State(service): State<SseService>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
    extensions: Extensions,
) -> Result<Response, ApiError> {
    let inner = &service.inner;
    if service.is_shutting_down() {
        return Err(ApiError::unavailable(
            "the server is shutting down; reconnect shortly",
        ));
    }
    let claims = inner
        .auth
        .authenticate(&headers, query.token.as_deref())
        .map_err(|e| {
            m::connection_refused("unauthorized");
            ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).field("token")
        })?;
    let user: Arc<str> = claims.sub.into();

    if let (Some(limiter), Some(ConnectInfo(addr))) =
        (&inner.ip_limiter, extensions.get::<ConnectInfo<SocketAddr>>())
    {
        limiter.check_key(&addr.ip()).map_err(|not_until| {
            too_many(
                "this address",
                not_until.wait_time_from(DefaultClock::default().now()),
            )
        })?;
    }
    if let Some(limiter) = &inner.user_limiter {
        limiter.check_key(&user).map_err(|not_until| {
            too_many(
                "this user",
                not_until.wait_time_from(DefaultClock::default().now()),
            )
        })?;
    }

    let filter = parse_filter(query.events.as_deref())?;
    let resume_from = parse_last_event_id(&headers, query.last_event_id.as_deref())?;

    let registration = inner
        .hub
        .register(&user, filter.clone())
        .ok_or_else(|| ApiError::unavailable("the server is shutting down; reconnect shortly"))?;
    let guard = ConnectionGuard {
        service: service.clone(),
        user: user.clone(),
        id: registration.id,
        delivered_through: EventId(0),
    };
    let unavailable = |e: super::BrokerError| {
        tracing::warn!(error = %e, "broker unavailable for a new stream");
        // Nothing is lost: the client retries later with the same id.
        ApiError::unavailable("the event broker is unavailable; retry shortly")
    };

    // What this connection gets before live events:
    // - resuming (`Last-Event-ID`): everything for the user after that id;
    // - the user's first connection here: what waited for them while they were offline,
    //   and anything published while the broker starts listening for them (after `head`).
    let replay_plan = match resume_from {
        Some(after) => Some((after, None)),
        None if registration.first_for_user => {
            let head = inner.broker.head().await.map_err(unavailable)?;
            let cursor = inner.broker.delivered_through(&user).await.map_err(unavailable)?;
            Some((cursor.unwrap_or_default().min(head), Some(head)))
        }
        None => None,
    };
    if registration.first_for_user {
        inner.broker.user_online(&user).await;
    }

    let mut prelude = BytesMut::new();
    prelude.extend_from_slice(format!("retry: {}\n\n", inner.config.retry.as_millis()).as_bytes());
    let mut replayed_through = EventId(0);
    if let Some((after, fresh_head)) = replay_plan {
        let replay = inner.broker.replay(&user, after).await.map_err(unavailable)?;
        let replay_through = replay.events.last().map_or(after, |e| e.id);
        let now = now_ms();
        let wanted = |e: &PublishedEvent| {
            let offline_ok = || {
                inner
                    .retention
                    .offline_for(&e.name)
                    .is_some_and(|keep| now.saturating_sub(e.published_at_ms) <= keep.as_millis() as u64)
            };
            let passes_filter = filter.as_ref().is_none_or(|f| f.iter().any(|n| **n == *e.name));
            passes_filter && fresh_head.is_none_or(|head| e.id > head || offline_ok())
        };
        let events = latest_progress_only(replay.events.into_iter().filter(|e| wanted(e)).collect());
        m::replayed(events.len(), replay.gap && fresh_head.is_none());
        if replay.gap && fresh_head.is_none() {
            let data = format!(
                r#"{{"reason":"events after this id are no longer kept; reload state","lastEventId":"{after}","timestamp":{now}}}"#
            );
            prelude.extend_from_slice(&encode_frame(None, names::RESYNC, &data));
        }
        for event in &events {
            prelude.extend_from_slice(&event.frame);
        }
        // Live events up to here came through the replay (or were meant for nobody yet).
        replayed_through = replay_through.max(after).max(fresh_head.unwrap_or_default());
    }
    // An id-only frame (no data, so no event fires) tells `EventSource` where this stream
    // starts: a client that drops before its first event still resumes from here, instead of
    // reconnecting without `Last-Event-ID` and missing what was sent in between. For another
    // tab of a connected user that is the head read after registering: anything newer is in
    // this connection's queue, behind this frame.
    let starts_after = match replayed_through {
        EventId(0) => inner.broker.head().await.map_err(unavailable)?,
        through => through,
    };
    if starts_after > EventId(0) {
        prelude.extend_from_slice(format!("id: {starts_after}\n\n").as_bytes());
    }
    tracing::debug!(user = %user, resume = ?resume_from, "sse connection opened");

    let mut guard = guard;
    guard.delivered_through = replayed_through;
    let stream = EventStream {
        prelude: VecDeque::from([prelude.freeze()]),
        queue: registration.queue,
        closed: Some(registration.closed),
        skip_through: replayed_through,
        guard,
    };
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

fn too_many(who: &str, wait: std::time::Duration) -> ApiError {
    m::connection_refused("rate_limited");
    let secs = wait.as_secs() + 1;
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many new connections from {who}; retry in {secs} s"),
    )
    .retry_after(secs)
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

/// When its stream is dropped (client gone or closed): removes the connection from the hub
/// and records how far it got, where the user's offline delivery starts next time.
struct ConnectionGuard {
    service: SseService,
    user: Arc<str>,
    id: u64,
    /// The highest id this connection handed to the client.
    delivered_through: EventId,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let last = self.service.inner.hub.unregister(&self.user, self.id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let service = self.service.clone();
        let user = self.user.clone();
        let delivered = self.delivered_through;
        runtime.spawn(async move {
            let broker = &service.inner.broker;
            if delivered.0 > 0 {
                broker.set_delivered_through(&user, delivered).await;
            }
            // The user may have come back while this was scheduled.
            if last && service.inner.hub.client_count_for_user(&user) == 0 {
                broker.user_offline(&user).await;
            }
        });
        tracing::debug!(user = %self.user, "sse connection closed");
    }
}

/// The body of one SSE response: the prelude (retry hint, resync, replay), then the
/// connection's queue, until the hub closes it or the client goes away.
struct EventStream {
    prelude: VecDeque<Bytes>,
    queue: mpsc::Receiver<Outbound>,
    closed: Option<oneshot::Receiver<CloseReason>>,
    /// Live events up to this id were already sent by the replay.
    skip_through: EventId,
    guard: ConnectionGuard,
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(bytes) = this.prelude.pop_front() {
            return Poll::Ready(Some(Ok(bytes)));
        }
        let Some(closed) = this.closed.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(reason) = Pin::new(closed).poll(cx) {
            this.closed = None;
            // Whatever is still queued stays replayable from the broker's history.
            return match reason {
                Ok(CloseReason::Replaced) => {
                    let data = format!(
                        r#"{{"reason":"this user opened a newer connection","timestamp":{}}}"#,
                        now_ms()
                    );
                    Poll::Ready(Some(Ok(encode_frame(None, names::CONNECTION_REPLACED, &data))))
                }
                _ => Poll::Ready(None),
            };
        }
        // Hand over everything that is ready in one chunk: one write for a burst.
        let mut first: Option<Bytes> = None;
        let mut batch = BytesMut::new();
        loop {
            match this.queue.poll_recv(cx) {
                Poll::Ready(Some(item)) => {
                    let bytes = match item {
                        Outbound::Event(event) if event.id <= this.skip_through => continue,
                        Outbound::Event(event) => {
                            this.guard.delivered_through = this.guard.delivered_through.max(event.id);
                            event.frame.clone()
                        }
                        Outbound::Control(bytes) => bytes,
                    };
                    match first.take() {
                        None if batch.is_empty() => first = Some(bytes),
                        Some(prev) => {
                            batch.extend_from_slice(&prev);
                            batch.extend_from_slice(&bytes);
                        }
                        None => batch.extend_from_slice(&bytes),
                    }
                    if batch.len() >= MAX_BATCH_BYTES {
                        break;
                    }
                }
                Poll::Ready(None) => {
                    this.closed = None;
                    break;
                }
                Poll::Pending => break,
            }
        }
        match (first, batch.is_empty()) {
            (Some(bytes), _) => Poll::Ready(Some(Ok(bytes))),
            (None, false) => Poll::Ready(Some(Ok(batch.freeze()))),
            (None, true) if this.closed.is_none() => Poll::Ready(None),
            (None, true) => Poll::Pending,
        }
    }
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
