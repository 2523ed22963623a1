//! A connection's mailbox: its bounded queue of outbound frames and its close signal, in
//! one small allocation.
//!
//! The hub only ever pushes without waiting ([`Sender::offer`]); the connection's stream
//! pops ([`Receiver::poll_recv`]). It replaces a tokio `mpsc` channel plus a `oneshot`,
//! which cost about 1.6 KiB per idle connection (a 32-slot block and a cache-padded channel
//! allocated up front); this costs under a hundred bytes and grows only while frames wait,
//! never past its capacity.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;

use crate::server::event::PublishedEvent;

/// What a connection's queue carries.
#[derive(Debug, Clone)]
pub enum Outbound {
    Event(Arc<PublishedEvent>),
    /// A frame without an id (heartbeat), so it never moves the client's resume point.
    Control(Bytes),
}

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The user opened more than `max_clients_per_user` connections; this was the oldest.
    Replaced,
    /// Its queue was full: the client is not reading.
    SlowClient,
    /// The server is shutting down.
    Shutdown,
    /// Its session expired (the token's `exp` passed).
    Expired,
    /// The user's streams were ended on purpose (e.g. at logout).
    Disconnected,
}

struct State {
    frames: VecDeque<Outbound>,
    capacity: usize,
    /// Set once by [`Sender::close`]; the receiver reports it before any queued frame.
    close: Option<CloseReason>,
    sender_gone: bool,
    receiver_gone: bool,
    waker: Option<Waker>,
}

struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `change` under the lock, then wakes the receiver outside it.
    fn notify(&self, change: impl FnOnce(&mut State)) {
        let waker = {
            let mut state = self.lock();
            change(&mut state);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A mailbox holding at most `capacity` frames.
pub fn mailbox(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared(Mutex::new(State {
        frames: VecDeque::new(),
        capacity: capacity.max(1),
        close: None,
        sender_gone: false,
        receiver_gone: false,
        waker: None,
    })));
    (Sender(shared.clone()), Receiver(shared))
}

/// Why [`Sender::offer`] did not queue a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds `capacity` frames: the client is not reading.
    Full,
    /// The receiving stream is gone.
    Gone,
}

/// The hub's half.
pub struct Sender(Arc<Shared>);

impl Sender {
    /// Queues `frame` without waiting.
    pub fn offer(&self, frame: Outbound) -> Result<(), Refused> {
        let mut refused = None;
        self.0.notify(|state| {
            if state.receiver_gone {
                refused = Some(Refused::Gone);
            } else if state.frames.len() >= state.capacity {
                refused = Some(Refused::Full);
            } else {
                state.frames.push_back(frame);
            }
        });
        refused.map_or(Ok(()), Err)
    }

    /// Tells the receiver to end with `reason`; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        self.0.notify(|state| {
            state.close.get_or_insert(reason);
        });
    }

    /// The receiving stream was dropped.
    pub fn is_closed(&self) -> bool {
        self.0.lock().receiver_gone
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.notify(|state| state.sender_gone = true);
    }
}

/// What the receiver found.
#[derive(Debug)]
pub enum Received {
    Frame(Outbound),
    /// [`Sender::close`] was called (reported once, before anything still queued).
    Closed(CloseReason),
    /// The sender is gone and nothing is left.
    Ended,
}

/// The stream's half.
pub struct Receiver(Arc<Shared>);

impl Receiver {
    /// The next thing to act on, or `Pending` with the task registered for a wake-up.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        let mut state = self.0.lock();
        if let Some(received) = Self::take(&mut state) {
            return Poll::Ready(received);
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// [`poll_recv`](Self::poll_recv) without waiting: `None` when nothing is there yet.
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<Received> {
        Self::take(&mut self.0.lock())
    }

    /// Frames waiting.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.0.lock().frames.len()
    }

    fn take(state: &mut State) -> Option<Received> {
        if let Some(reason) = state.close.take() {
            // Whatever is still queued stays replayable from the broker's history.
            state.frames.clear();
            state.sender_gone = true;
            return Some(Received::Closed(reason));
        }
        match state.frames.pop_front() {
            Some(frame) => Some(Received::Frame(frame)),
            None if state.sender_gone => Some(Received::Ended),
            None => None,
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.receiver_gone = true;
        state.frames = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(text: &'static str) -> Outbound {
        Outbound::Control(Bytes::from_static(text.as_bytes()))
    }

    fn text(received: Option<Received>) -> Option<String> {
        match received {
            Some(Received::Frame(Outbound::Control(bytes))) => Some(String::from_utf8_lossy(&bytes).into()),
            _ => None,
        }
    }

    #[test]
    fn frames_come_out_in_order_and_the_queue_never_exceeds_its_capacity() {
        let (tx, mut rx) = mailbox(2);
        assert_eq!(tx.offer(frame("a")), Ok(()));
        assert_eq!(tx.offer(frame("b")), Ok(()));
        assert_eq!(tx.offer(frame("c")), Err(Refused::Full));
        assert_eq!(text(rx.try_recv()).as_deref(), Some("a"));
        assert_eq!(tx.offer(frame("d")), Ok(()));
        assert_eq!(text(rx.try_recv()).as_deref(), Some("b"));
        assert_eq!(text(rx.try_recv()).as_deref(), Some("d"));
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_close_comes_before_what_is_queued_and_ends_the_mailbox() {
        let (tx, mut rx) = mailbox(4);
        tx.offer(frame("a")).unwrap();
        tx.close(CloseReason::Replaced);
        tx.close(CloseReason::Shutdown);
        assert!(matches!(
            rx.try_recv(),
            Some(Received::Closed(CloseReason::Replaced))
        ));
        assert!(matches!(rx.try_recv(), Some(Received::Ended)));
    }

    #[test]
    fn a_dropped_sender_ends_after_the_queue_drains_and_a_dropped_receiver_refuses() {
        let (tx, mut rx) = mailbox(4);
        tx.offer(frame("a")).unwrap();
        drop(tx);
        assert_eq!(text(rx.try_recv()).as_deref(), Some("a"));
        assert!(matches!(rx.try_recv(), Some(Received::Ended)));

        let (tx, rx) = mailbox(4);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.offer(frame("a")), Err(Refused::Gone));
    }

    #[tokio::test]
    async fn an_offer_wakes_the_waiting_receiver() {
        let (tx, mut rx) = mailbox(4);
        let waiting = tokio::spawn(async move { std::future::poll_fn(|cx| rx.poll_recv(cx)).await });
        tokio::task::yield_now().await;
        tx.offer(frame("late")).unwrap();
        let received = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(text(Some(received)).as_deref(), Some("late"));
    }
}
