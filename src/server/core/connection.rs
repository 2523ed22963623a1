//! One open event stream: what it sends first (retry hint, resync, replay, start id), then
//! its queue of live events and heartbeats, until the hub closes it or the client goes away.
//! Built by [`SseService::open_stream`](super::service::SseService::open_stream); dropping it runs the
//! closing half of the protocol (unregister, record how far it got, stop listening for the
//! user if it was their last connection here).

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use futures::Stream;

use super::{
    mailbox::{CloseReason, Outbound, Received, Receiver},
    replay::{Page, ReplayRest},
};
use crate::{
    events::names,
    server::{
        clock::now_ms,
        event::{encode_frame, id_line, Cursor},
    },
};

/// Most bytes handed to the socket in one write when several events are waiting.
const MAX_BATCH_BYTES: usize = 32 * 1024;

/// The body of one SSE response, as bytes ready for the wire.
pub struct EventStream {
    pub(super) prelude: VecDeque<Bytes>,
    /// The rest of a backlog longer than a page: sent before anything from the mailbox.
    /// Boxed: it is rare, and inline it would double the size of every stream.
    pub(super) rest: Option<Box<ReplayRest>>,
    /// Live events up to here came through the replay: skipped.
    pub(super) replayed_through: Cursor,
    pub(super) mailbox: Receiver,
    /// The mailbox ended or closed: nothing more comes after what is pending.
    pub(super) ended: bool,
    pub(super) closer: Closer,
    /// Its place among the server's `max_connections`.
    pub(super) _permit: ConnectionPermit,
}

/// One place among `SseConfig::max_connections`, held by a long-lived response.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<AtomicUsize>);

impl ConnectionPermit {
    /// A place counted in `open` (already incremented), given back when dropped.
    pub(super) fn new(open: Arc<AtomicUsize>) -> Self {
        Self(open)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a stream tells when it ends (the service: unregister, record the position, let the
/// broker stop listening), so that this file needs nothing of the service.
pub(super) trait StreamEnded: Send + Sync + 'static {
    /// Stream `id` of `user` ended; `position` is where its client got to, when it may become
    /// the user's offline-delivery start.
    fn stream_ended(self: Arc<Self>, user: Arc<str>, id: u64, position: Option<Cursor>);
}

/// Runs the closing half of the protocol when its stream is dropped.
pub(super) struct Closer {
    /// Told when the stream ends: the service, which runs the closing half of the protocol.
    pub(super) ended: Arc<dyn StreamEnded>,
    pub(super) user: Arc<str>,
    pub(super) id: u64,
    /// How far this connection got: what the replay and the live events handed to the
    /// client. Live events it covers were sent already and are skipped.
    pub(super) delivered_through: Cursor,
    /// Where the prelude told the client it starts (its `id:`): in lanes, the id written
    /// with each event is never behind it, even in a lane with nothing delivered yet.
    pub(super) announced: Cursor,
    /// Whether its position may become the user's offline-delivery start: only a stream
    /// that was sent every event of the user (no `events=` filter).
    pub(super) records_position: bool,
}

impl Closer {
    /// The client's resume point: how far it got, not behind where it started.
    fn position(&self) -> Cursor {
        self.delivered_through.max(self.announced)
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        let position = self.records_position.then(|| self.position());
        self.ended
            .clone()
            .stream_ended(self.user.clone(), self.id, position);
    }
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(bytes) = this.prelude.pop_front() {
            return Poll::Ready(Some(Ok(bytes)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        while let Some(rest) = &mut this.rest {
            let (bytes, last) = match rest.poll_page(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Page::Frames(bytes)) => (bytes, false),
                Poll::Ready(Page::Last(bytes)) => (bytes, true),
                Poll::Ready(Page::Failed) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
            };
            this.closer.delivered_through = this.closer.delivered_through.max(rest.handled());
            if last {
                this.closer.announced = this.closer.delivered_through;
                this.rest = None;
            }
            if !bytes.is_empty() {
                return Poll::Ready(Some(Ok(bytes)));
            }
        }
        // Hand over everything that is ready in one chunk: one write for a burst.
        let mut chunk = Chunk::default();
        loop {
            match this.mailbox.poll_recv(cx) {
                Poll::Ready(Received::Frame(Outbound::Event(event)))
                    if this.replayed_through.covers(&event)
                        || this.closer.delivered_through.covers(&event) => {}
                Poll::Ready(Received::Frame(Outbound::Event(event))) => {
                    this.closer.delivered_through.advance(&event);
                    if let Cursor::Lanes { .. } = this.closer.delivered_through {
                        // Frames of a lane carry no id: the client's is its place in both.
                        chunk.push(id_line(this.closer.position()));
                    }
                    chunk.push(event.frame.clone());
                }
                Poll::Ready(Received::Frame(Outbound::Control(bytes))) => chunk.push(bytes),
                Poll::Ready(Received::Closed(reason)) => {
                    this.ended = true;
                    // Last words: why it closes, so the client knows whether to come back.
                    let (name, reason) = match reason {
                        CloseReason::Replaced => {
                            (names::CONNECTION_REPLACED, "this user opened a newer connection")
                        }
                        CloseReason::Expired => (names::SESSION_ENDED, "expired"),
                        CloseReason::Disconnected => (names::SESSION_ENDED, "disconnected"),
                        CloseReason::SlowClient | CloseReason::Shutdown => break,
                    };
                    let data = format!(r#"{{"reason":"{reason}","timestamp":{}}}"#, now_ms());
                    chunk.push(encode_frame(name, &data));
                    break;
                }
                Poll::Ready(Received::Ended) => {
                    this.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
            if chunk.len() >= MAX_BATCH_BYTES {
                break;
            }
        }
        match chunk.finish() {
            Some(bytes) => Poll::Ready(Some(Ok(bytes))),
            None if this.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

/// Frames handed to the socket in one write: a lone frame is passed on as it is (shared,
/// not copied); several are copied into one buffer.
#[derive(Default)]
struct Chunk {
    first: Option<Bytes>,
    batch: BytesMut,
}

impl Chunk {
    fn push(&mut self, bytes: Bytes) {
        match self.first.take() {
            None if self.batch.is_empty() => self.first = Some(bytes),
            Some(prev) => {
                self.batch.extend_from_slice(&prev);
                self.batch.extend_from_slice(&bytes);
            }
            None => self.batch.extend_from_slice(&bytes),
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(self.batch.len(), Bytes::len)
    }

    fn finish(self) -> Option<Bytes> {
        self.first
            .or_else(|| (!self.batch.is_empty()).then(|| self.batch.freeze()))
    }
}
