//! What a stream replays, and how a long backlog is replayed page by page.
//!
//! A reconnect with an old `Last-Event-ID` (or `0`) may be owed the whole retained history.
//! Read at once, that history would sit in one connection's memory for as long as its
//! client keeps reading a byte now and then, five times over per user. So a stream reads
//! [`REPLAY_PAGE`] events at a time: the first page with its prelude, each next one only
//! once the client has taken the one before, up to the head the broker had when the stream
//! opened; what came after that is in the stream's queue and goes out live.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::{Bytes, BytesMut};

use crate::server::{
    broker::{coalesce_latest, Broker, BrokerError, Replay, Retention},
    event::{id_line, Cursor, PublishedEvent},
    metrics as m,
};

/// Most events one replay read brings in at once (the backing store may add one page of
/// its own, 512 events on Redis).
pub const REPLAY_PAGE: usize = 256;

/// Which replayed events a stream sends.
#[derive(Debug, Clone)]
pub(super) struct ReplaySelection {
    /// Only these names (`events=`); `None` sends all.
    pub(super) filter: Option<Arc<[String]>>,
    /// Offline delivery: events up to this head are sent only if their type waits for
    /// users who were away, and only as long as it waits.
    pub(super) fresh_head: Option<Cursor>,
    /// When the stream opened, ms since the Unix epoch.
    pub(super) now_ms: u64,
}

impl ReplaySelection {
    fn wants(&self, retention: &Retention, event: &PublishedEvent) -> bool {
        let offline_ok = || {
            retention.offline_for(&event.name).is_some_and(|keep| {
                self.now_ms.saturating_sub(event.published_at_ms) <= keep.as_millis() as u64
            })
        };
        let passes_filter = self
            .filter
            .as_ref()
            .is_none_or(|f| f.iter().any(|n| **n == *event.name));
        passes_filter
            && self
                .fresh_head
                .is_none_or(|head| !head.covers(event) || offline_ok())
    }

    /// The events of a page to send, the newest progress of each reel only.
    pub(super) fn select(
        &self,
        retention: &Retention,
        events: Vec<Arc<PublishedEvent>>,
    ) -> Vec<Arc<PublishedEvent>> {
        coalesce_latest(events.into_iter().filter(|e| self.wants(retention, e)).collect())
    }
}

/// Appends the frames of `events` to `out`; `sent` follows them (and, in lanes, where
/// events carry no `id:` of their own, an id line goes before each).
pub(super) fn write_frames(events: &[Arc<PublishedEvent>], sent: &mut Cursor, out: &mut BytesMut) {
    for event in events {
        sent.advance(event);
        if let Cursor::Lanes { .. } = sent {
            out.extend_from_slice(&id_line(*sent));
        }
        out.extend_from_slice(&event.frame);
    }
}

type PageRead = Pin<Box<dyn Future<Output = Result<Replay, BrokerError>> + Send>>;

/// The rest of a backlog longer than a page, read as the client takes it.
pub(super) struct ReplayRest {
    broker: Arc<dyn Broker>,
    retention: Arc<Retention>,
    user: Arc<str>,
    selection: ReplaySelection,
    /// Read on from here: every event up to it was sent or passed over.
    from: Cursor,
    /// Where the frames written so far put the client.
    sent: Cursor,
    /// The head when the stream opened: what came later is in the stream's queue.
    until: Cursor,
    reading: Option<PageRead>,
}

/// What the next page brought.
pub(super) enum Page {
    /// Frames to send; more pages follow.
    Frames(Bytes),
    /// The last frames, ending with the stream's start id.
    Last(Bytes),
    /// The broker could not be read: the stream ends and the client resumes from its id.
    Failed,
}

impl ReplayRest {
    pub(super) fn new(
        broker: Arc<dyn Broker>,
        retention: Arc<Retention>,
        user: Arc<str>,
        selection: ReplaySelection,
        from: Cursor,
        sent: Cursor,
        until: Cursor,
    ) -> Self {
        Self {
            broker,
            retention,
            user,
            selection,
            from,
            sent,
            until,
            reading: None,
        }
    }

    /// The head the stream opened at: live events up to it are skipped.
    pub(super) fn until(&self) -> Cursor {
        self.until
    }

    /// How far the stream got: every event up to here (and not past the head it opened
    /// at) was sent or passed over.
    pub(super) fn handled(&self) -> Cursor {
        self.from.min(self.until)
    }

    /// Reads and frames the next page.
    pub(super) fn poll_page(&mut self, cx: &mut Context<'_>) -> Poll<Page> {
        let reading = self.reading.get_or_insert_with(|| {
            let (broker, user, from) = (self.broker.clone(), self.user.clone(), self.from);
            Box::pin(async move { broker.replay_page(&user, from, REPLAY_PAGE).await })
        });
        let result = ready!(reading.as_mut().poll(cx));
        self.reading = None;
        let replay = match result {
            Ok(replay) => replay,
            Err(e) => {
                tracing::warn!(user = %self.user, error = %e, "replay page unavailable; the stream ends");
                return Poll::Ready(Page::Failed);
            }
        };
        replay.events.iter().for_each(|e| self.from.advance(e));
        // Past the head the stream opened at, events come from its queue.
        let owed: Vec<_> = replay
            .events
            .into_iter()
            .filter(|e| self.until.covers(e))
            .collect();
        let last = !replay.more || owed.is_empty();
        let events = self.selection.select(&self.retention, owed);
        m::replayed_more(events.len());
        let mut out = BytesMut::new();
        write_frames(&events, &mut self.sent, &mut out);
        Poll::Ready(if last {
            self.from = self.from.max(self.until);
            out.extend_from_slice(format!("id: {}\n\n", self.from).as_bytes());
            Page::Last(out.freeze())
        } else {
            Page::Frames(out.freeze())
        })
    }
}
