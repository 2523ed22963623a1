//! One open event stream: what it sends first (retry hint, resync, replay, start id), then
//! its queue of live events and heartbeats, until the hub closes it or the client goes away.
//! Built by [`SseService::open_stream`](super::SseService::open_stream); dropping it runs the
//! closing half of the protocol (unregister, record how far it got, stop listening for the
//! user if it was their last connection here).

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::{
    event::{encode_frame, EventId},
    hub::{CloseReason, Outbound},
    now_ms, SseService,
};
use crate::events::names;

/// Most bytes handed to the socket in one write when several events are waiting.
const MAX_BATCH_BYTES: usize = 32 * 1024;

/// The body of one SSE response, as bytes ready for the wire.
pub struct EventStream {
    pub(super) prelude: VecDeque<Bytes>,
    pub(super) queue: mpsc::Receiver<Outbound>,
    pub(super) closed: Option<oneshot::Receiver<CloseReason>>,
    /// Live events up to this id were already sent by the replay.
    pub(super) skip_through: EventId,
    pub(super) closer: Closer,
    /// Its place among the server's `max_connections`.
    pub(super) _permit: super::service::ConnectionPermit,
}

/// Runs the closing half of the protocol when its stream is dropped.
pub(super) struct Closer {
    pub(super) service: SseService,
    pub(super) user: Arc<str>,
    pub(super) id: u64,
    /// The highest id this connection handed to the client.
    pub(super) delivered_through: EventId,
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.service
            .stream_closed(self.user.clone(), self.id, self.delivered_through);
    }
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
            // Last words: why it closes, so the client knows whether to come back.
            let (name, reason) = match reason {
                Ok(CloseReason::Replaced) => {
                    (names::CONNECTION_REPLACED, "this user opened a newer connection")
                }
                Ok(CloseReason::Expired) => (names::SESSION_ENDED, "expired"),
                Ok(CloseReason::Disconnected) => (names::SESSION_ENDED, "disconnected"),
                Ok(CloseReason::SlowClient | CloseReason::Shutdown) | Err(_) => return Poll::Ready(None),
            };
            let data = format!(r#"{{"reason":"{reason}","timestamp":{}}}"#, now_ms());
            return Poll::Ready(Some(Ok(encode_frame(name, &data))));
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
                            this.closer.delivered_through = this.closer.delivered_through.max(event.id);
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
