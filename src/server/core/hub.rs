//! The [`Hub`]: this process's registry of open SSE connections.
//!
//! Connections are indexed by user. Each has a bounded queue; the hub only ever
//! `try_send`s into it, so a client that stops reading fills its queue and is closed
//! instead of growing memory. Closing loses nothing: the event is in the broker's history
//! and the client's reconnect with `Last-Event-ID` replays it.
//!
//! The inner `Mutex` is a std mutex, never held across an `.await`: every operation under
//! it is a map update or a non-blocking `try_send`.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use bytes::Bytes;

use super::mailbox::{self, CloseReason, Outbound, Refused};
use crate::server::{
    event::{PublishedEvent, Target},
    metrics as m,
};

/// The receiving half of a registered connection, owned by its HTTP stream, which must
/// [`unregister`](Hub::unregister) it exactly once when it ends.
pub struct Registration {
    pub id: u64,
    pub mailbox: mailbox::Receiver,
    /// No other registration of the user is held here: the broker should start listening
    /// for them.
    pub first_for_user: bool,
}

struct Connection {
    id: u64,
    mailbox: mailbox::Sender,
    /// Only these event names are sent (control frames always are); `None` sends all.
    filter: Option<Arc<[String]>>,
    /// When its session ends, seconds since the Unix epoch.
    expires_at: Option<u64>,
    /// When it opened, ms since the Unix epoch: the per-user limit across instances closes
    /// the oldest first.
    opened_ms: u64,
}

/// One open connection as the presence across instances sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpenConnection {
    /// When it opened, ms since the Unix epoch.
    pub opened_ms: u64,
    /// Its id in its instance's hub.
    pub id: u64,
}

impl Connection {
    fn wants(&self, name: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }

    fn close(&mut self, reason: CloseReason) {
        self.mailbox.close(reason);
    }

    /// Queues `item`; `false` when the connection must go (full or gone).
    fn offer(&mut self, item: Outbound, counters: &HubCounters) -> bool {
        match self.mailbox.offer(item) {
            Ok(()) => true,
            Err(Refused::Full) => {
                m::slow_client_disconnected();
                counters.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                self.close(CloseReason::SlowClient);
                false
            }
            Err(Refused::Gone) => false,
        }
    }
}

#[derive(Default)]
struct Inner {
    /// The connections events are dispatched to.
    users: HashMap<Arc<str>, Vec<Connection>>,
    /// Registrations per user not yet unregistered, whether or not the hub has closed
    /// them (cut as slow, replaced, expired, disconnected): the broker listens for a user
    /// from their first registration until their last one is unregistered, so a stream
    /// the hub ended still releases the subscription, exactly once.
    held: HashMap<Arc<str>, usize>,
    /// Users whose `held` count changed since the presence last took them (only while
    /// [`Hub::track_presence`] is on: nobody else drains it).
    presence_changed: HashSet<Arc<str>>,
    track_presence: bool,
    connections: usize,
    next_id: u64,
    closed: bool,
    /// `(expires_at, id, user)` of connections whose session ends, soonest first.
    expiries: BTreeSet<(u64, u64, Arc<str>)>,
}

/// The open connections in `conns`, oldest first.
fn open_of(conns: Option<&Vec<Connection>>) -> Vec<OpenConnection> {
    conns.map_or_else(Vec::new, |conns| {
        conns
            .iter()
            .map(|c| OpenConnection {
                opened_ms: c.opened_ms,
                id: c.id,
            })
            .collect()
    })
}

impl Inner {
    fn forget_expiry(&mut self, user: &Arc<str>, conn: &Connection) {
        if let Some(at) = conn.expires_at {
            self.expiries.remove(&(at, conn.id, user.clone()));
        }
    }
}

/// Counters this hub keeps for `/api/stats` (the Prometheus ones are process-wide).
#[derive(Debug, Default)]
pub struct HubCounters {
    pub delivered: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub replaced: AtomicU64,
}

/// The registry of this process's connections.
pub struct Hub {
    inner: Mutex<Inner>,
    max_per_user: usize,
    queue_capacity: usize,
    pub counters: HubCounters,
}

impl Hub {
    pub fn new(max_per_user: usize, queue_capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            max_per_user: max_per_user.max(1),
            queue_capacity: queue_capacity.max(1),
            counters: HubCounters::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection for `user`, whose session ends at `expires_at` (seconds since the
    /// Unix epoch) if given. When the user already holds the maximum, the oldest is closed
    /// with [`CloseReason::Replaced`]: the newest tab wins. `None` once shut down.
    pub fn register(
        &self,
        user: &Arc<str>,
        filter: Option<Arc<[String]>>,
        expires_at: Option<u64>,
    ) -> Option<Registration> {
        let (sender, receiver) = mailbox::mailbox(self.queue_capacity);
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let mut replaced = Vec::new();
        let held = inner.held.entry(user.clone()).or_default();
        *held += 1;
        let first_for_user = *held == 1;
        if inner.track_presence {
            inner.presence_changed.insert(user.clone());
        }
        let conns = inner.users.entry(user.clone()).or_default();
        while conns.len() >= self.max_per_user {
            let mut oldest = conns.remove(0);
            oldest.close(CloseReason::Replaced);
            replaced.push(oldest);
        }
        conns.push(Connection {
            id,
            mailbox: sender,
            filter,
            expires_at,
            opened_ms: crate::server::clock::now_ms(),
        });
        for old in &replaced {
            inner.forget_expiry(user, old);
        }
        if let Some(at) = expires_at {
            inner.expiries.insert((at, id, user.clone()));
        }
        let replaced = replaced.len();
        inner.connections = inner.connections + 1 - replaced;
        drop(inner);
        self.counters
            .replaced
            .fetch_add(replaced as u64, Ordering::Relaxed);
        m::connections_changed(1 - replaced as isize);
        Some(Registration {
            id,
            mailbox: receiver,
            first_for_user,
        })
    }

    /// Ends a registration (its stream is gone), whether the hub had already closed the
    /// connection or not. Returns `true` when it was the user's last registration here:
    /// the broker may stop listening for them. Call once per registration.
    pub fn unregister(&self, user: &str, id: u64) -> bool {
        let mut inner = self.lock();
        if inner.track_presence {
            if let Some((user, _)) = inner.held.get_key_value(user) {
                let user = user.clone();
                inner.presence_changed.insert(user);
            }
        }
        let last = match inner.held.get_mut(user) {
            Some(held) if *held > 1 => {
                *held -= 1;
                false
            }
            Some(_) => {
                inner.held.remove(user);
                true
            }
            None => false,
        };
        let Some((user, conns)) = inner.users.get_key_value(user) else {
            return last;
        };
        let Some(at) = conns.iter().position(|c| c.id == id) else {
            return last;
        };
        let user = user.clone();
        let conns = inner.users.get_mut(&user).expect("present");
        let gone = conns.remove(at);
        if conns.is_empty() {
            inner.users.remove(&user);
        }
        inner.forget_expiry(&user, &gone);
        inner.connections -= 1;
        drop(inner);
        m::connections_changed(-1);
        last
    }

    /// Starts noting which users' connection counts change, for
    /// [`presence_changes`](Self::presence_changes) to take.
    pub fn track_presence(&self) {
        self.lock().track_presence = true;
    }

    /// Up to `max` users whose connections changed since the last call, with those open
    /// now (none: no connection left here).
    pub fn presence_changes(&self, max: usize) -> Vec<(Arc<str>, Vec<OpenConnection>)> {
        let mut inner = self.lock();
        let taken: Vec<Arc<str>> = inner.presence_changed.iter().take(max).cloned().collect();
        taken
            .into_iter()
            .map(|user| {
                inner.presence_changed.remove(&user);
                let open = open_of(inner.users.get(&user));
                (user, open)
            })
            .collect()
    }

    /// Notes `users` as changed again (their write failed).
    pub fn note_presence_changes(&self, users: impl IntoIterator<Item = Arc<str>>) {
        let mut inner = self.lock();
        if inner.track_presence {
            inner.presence_changed.extend(users);
        }
    }

    /// Every user connected here with their open connections, for a full presence write;
    /// the changes noted so far are covered by it.
    pub fn presence_snapshot(&self) -> Vec<(Arc<str>, Vec<OpenConnection>)> {
        let mut inner = self.lock();
        inner.presence_changed.clear();
        inner
            .users
            .iter()
            .map(|(user, conns)| (user.clone(), open_of(Some(conns))))
            .collect()
    }

    /// `user`'s open connections here.
    pub fn open_connections(&self, user: &str) -> Vec<OpenConnection> {
        open_of(self.lock().users.get(user))
    }

    /// Closes `user`'s connections among `ids` as [`CloseReason::Replaced`] (the per-user
    /// limit across instances chose them); returns how many were open.
    pub fn replace_connections(&self, user: &str, ids: &[u64]) -> usize {
        let mut inner = self.lock();
        let Some((user, conns)) = inner.users.remove_entry(user) else {
            return 0;
        };
        let (mut replaced, kept): (Vec<Connection>, Vec<Connection>) =
            conns.into_iter().partition(|c| ids.contains(&c.id));
        if !kept.is_empty() {
            inner.users.insert(user.clone(), kept);
        }
        for old in &mut replaced {
            old.close(CloseReason::Replaced);
        }
        for old in &replaced {
            inner.forget_expiry(&user, old);
        }
        inner.connections -= replaced.len();
        drop(inner);
        self.counters
            .replaced
            .fetch_add(replaced.len() as u64, Ordering::Relaxed);
        m::connections_changed(-(replaced.len() as isize));
        replaced.len()
    }

    /// Whether any registration of `user` is held here (open, or closed by the hub but
    /// not yet unregistered by its stream).
    pub fn holds_user(&self, user: &str) -> bool {
        self.lock().held.contains_key(user)
    }

    /// Closes every connection of `user` with `reason`; returns how many there were.
    pub fn close_user(&self, user: &str, reason: CloseReason) -> usize {
        let mut inner = self.lock();
        let Some((user, mut conns)) = inner.users.remove_entry(user) else {
            return 0;
        };
        for conn in &mut conns {
            conn.close(reason);
            inner.forget_expiry(&user, conn);
        }
        inner.connections -= conns.len();
        drop(inner);
        m::connections_changed(-(conns.len() as isize));
        conns.len()
    }

    /// Closes the connections whose session ended by `now` (seconds since the Unix epoch)
    /// with [`CloseReason::Expired`]; returns how many.
    pub fn expire(&self, now: u64) -> usize {
        let mut inner = self.lock();
        let mut expired = 0;
        while let Some((at, id, user)) = inner.expiries.first().cloned() {
            if at > now {
                break;
            }
            inner.expiries.pop_first();
            if let Some(conns) = inner.users.get_mut(&user) {
                if let Some(i) = conns.iter().position(|c| c.id == id) {
                    let mut conn = conns.remove(i);
                    conn.close(CloseReason::Expired);
                    if conns.is_empty() {
                        inner.users.remove(&user);
                    }
                    inner.connections -= 1;
                    expired += 1;
                }
            }
        }
        drop(inner);
        m::connections_changed(-(expired as isize));
        expired
    }

    /// Queues `event` for every matching connection. Connections whose queue is full are
    /// closed and dropped from the registry.
    pub fn dispatch(&self, event: &Arc<PublishedEvent>) {
        let mut delivered = 0u64;
        let mut inner = self.lock();
        let before = inner.connections;
        let Inner {
            users, connections, ..
        } = &mut *inner;
        let mut offer_all = |conns: &mut Vec<Connection>| {
            conns.retain_mut(|c| {
                if !c.wants(&event.name) {
                    return true;
                }
                let kept = c.offer(Outbound::Event(event.clone()), &self.counters);
                if kept {
                    delivered += 1;
                } else {
                    *connections -= 1;
                }
                kept
            });
        };
        match &event.target {
            Target::User(user) => {
                if let Some(conns) = users.get_mut(user) {
                    offer_all(conns);
                    if conns.is_empty() {
                        users.remove(user);
                    }
                }
            }
            Target::Broadcast => {
                users.values_mut().for_each(&mut offer_all);
                users.retain(|_, conns| !conns.is_empty());
            }
        }
        let after = *connections;
        drop(inner);
        self.counters.delivered.fetch_add(delivered, Ordering::Relaxed);
        m::event_delivered(&event.name, delivered);
        m::connections_changed(after as isize - before as isize);
    }

    /// Queues a control frame (heartbeat) on every connection whose id is `slice` modulo
    /// `slices`, whatever its filter; `(0, 1)` is every connection.
    pub fn send_control(&self, frame: Bytes, slice: u64, slices: u64) {
        let slices = slices.max(1);
        self.retain_connections(|c, counters| {
            c.id % slices != slice || c.offer(Outbound::Control(frame.clone()), counters)
        });
    }

    /// Drops connections whose stream is gone without having unregistered.
    pub fn sweep(&self) {
        self.retain_connections(|c, _| !c.mailbox.is_closed());
    }

    /// Closes every connection and refuses new ones.
    pub fn close_all(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for conns in inner.users.values_mut() {
            conns.iter_mut().for_each(|c| c.close(CloseReason::Shutdown));
        }
        inner.users.clear();
        inner.expiries.clear();
        m::connections_changed(-(inner.connections as isize));
        inner.connections = 0;
    }

    fn retain_connections(&self, mut keep: impl FnMut(&mut Connection, &HubCounters) -> bool) {
        let mut inner = self.lock();
        let Inner {
            users, connections, ..
        } = &mut *inner;
        let mut removed = 0;
        for conns in users.values_mut() {
            let before = conns.len();
            conns.retain_mut(|c| keep(c, &self.counters));
            removed += before - conns.len();
        }
        *connections -= removed;
        users.retain(|_, conns| !conns.is_empty());
        m::connections_changed(-(removed as isize));
    }

    /// Open connections in this process.
    pub fn client_count(&self) -> usize {
        self.lock().connections
    }

    /// Open connections of one user in this process.
    pub fn client_count_for_user(&self, user: &str) -> usize {
        self.lock().users.get(user).map_or(0, Vec::len)
    }

    /// Users with at least one open connection in this process.
    pub fn user_count(&self) -> usize {
        self.lock().users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::core::mailbox::Received;
    use crate::server::event::{Envelope, EventId};

    fn event(id: u64, target: Target, name: &str) -> Arc<PublishedEvent> {
        let envelope = Envelope {
            target,
            name: name.into(),
            data: "{}".into(),
            timestamp_ms: 0,
            coalesce_key: None,
        };
        Arc::new(PublishedEvent::new(EventId(id), envelope))
    }

    fn user(name: &str) -> Arc<str> {
        name.into()
    }

    #[test]
    fn targeted_events_reach_only_their_user() {
        let hub = Hub::new(5, 8);
        let mut a = hub.register(&user("a"), None, None).unwrap();
        let mut b = hub.register(&user("b"), None, None).unwrap();
        hub.dispatch(&event(1, Target::User(user("a")), "notification"));
        assert!(
            matches!(a.mailbox.try_recv(), Some(Received::Frame(Outbound::Event(e))) if e.id == EventId(1))
        );
        assert!(b.mailbox.try_recv().is_none());
        hub.dispatch(&event(2, Target::Broadcast, "system_alert"));
        assert!(matches!(a.mailbox.try_recv(), Some(Received::Frame(_))));
        assert!(matches!(b.mailbox.try_recv(), Some(Received::Frame(_))));
    }

    #[test]
    fn one_connection_over_the_limit_replaces_the_oldest() {
        let hub = Hub::new(2, 8);
        let mut first = hub.register(&user("a"), None, None).unwrap();
        assert!(first.first_for_user);
        let second = hub.register(&user("a"), None, None).unwrap();
        assert!(!second.first_for_user);
        let _third = hub.register(&user("a"), None, None).unwrap();
        assert!(matches!(
            first.mailbox.try_recv(),
            Some(Received::Closed(CloseReason::Replaced))
        ));
        assert_eq!(hub.client_count_for_user("a"), 2);
        assert_eq!(hub.client_count(), 2);
    }

    #[test]
    fn presence_sees_open_connections_and_replacing_closes_only_those_named() {
        let hub = Hub::new(5, 4);
        hub.track_presence();
        let mut first = hub.register(&user("a"), None, None).unwrap();
        let second = hub.register(&user("a"), None, None).unwrap();
        let _other = hub.register(&user("b"), None, None).unwrap();
        let mut changed = hub.presence_changes(10);
        changed.sort();
        assert_eq!(changed.len(), 2);
        assert_eq!(changed[0].0.as_ref(), "a");
        let ids: Vec<u64> = changed[0].1.iter().map(|c| c.id).collect();
        assert_eq!(ids, [first.id, second.id]);
        assert!(changed[0].1[0].opened_ms <= changed[0].1[1].opened_ms);
        assert!(hub.presence_changes(10).is_empty(), "taken once");

        assert_eq!(hub.replace_connections("a", &[first.id, 999]), 1);
        assert!(matches!(
            first.mailbox.try_recv(),
            Some(Received::Closed(CloseReason::Replaced))
        ));
        let left: Vec<u64> = hub.open_connections("a").iter().map(|c| c.id).collect();
        assert_eq!(left, [second.id]);
        assert_eq!(hub.client_count(), 2);
        assert_eq!(hub.replace_connections("nobody", &[1]), 0);
        // Its stream ends and unregisters: a change for the presence.
        hub.unregister("a", first.id);
        assert_eq!(hub.presence_changes(10).len(), 1);
    }

    #[test]
    fn a_full_queue_closes_the_connection_and_memory_stays_bounded() {
        let hub = Hub::new(5, 4);
        let mut slow = hub.register(&user("a"), None, None).unwrap();
        for id in 1..=10 {
            hub.dispatch(&event(id, Target::User(user("a")), "notification"));
        }
        assert_eq!(slow.mailbox.queued(), 4, "queue grew past its capacity");
        assert!(matches!(
            slow.mailbox.try_recv(),
            Some(Received::Closed(CloseReason::SlowClient))
        ));
        assert_eq!(hub.client_count(), 0, "slow connection still registered");
    }

    #[test]
    fn filters_apply_to_events_but_not_to_control_frames() {
        let hub = Hub::new(5, 8);
        let only: Arc<[String]> = vec!["reel_ready".to_string()].into();
        let mut conn = hub.register(&user("a"), Some(only), None).unwrap();
        hub.dispatch(&event(1, Target::User(user("a")), "notification"));
        hub.dispatch(&event(2, Target::User(user("a")), "reel_ready"));
        hub.send_control(Bytes::from_static(b"event: heartbeat\ndata: {}\n\n"), 0, 1);
        assert!(
            matches!(conn.mailbox.try_recv(), Some(Received::Frame(Outbound::Event(e))) if e.id == EventId(2))
        );
        assert!(matches!(
            conn.mailbox.try_recv(),
            Some(Received::Frame(Outbound::Control(_)))
        ));
        assert!(conn.mailbox.try_recv().is_none());
    }

    #[test]
    fn sessions_end_at_their_expiry_and_a_user_can_be_disconnected() {
        let hub = Hub::new(5, 8);
        let mut soon = hub.register(&user("a"), None, Some(100)).unwrap();
        let mut later = hub.register(&user("a"), None, Some(200)).unwrap();
        let mut never = hub.register(&user("b"), None, None).unwrap();
        assert_eq!(hub.expire(99), 0);
        assert_eq!(hub.expire(100), 1);
        assert!(matches!(
            soon.mailbox.try_recv(),
            Some(Received::Closed(CloseReason::Expired))
        ));
        assert!(later.mailbox.try_recv().is_none());
        assert_eq!(hub.client_count(), 2);
        // Unregistered before its expiry: nothing left to expire. The expired one is held
        // until its stream unregisters it too.
        assert!(!hub.unregister("a", soon.id));
        assert!(hub.unregister("a", later.id));
        assert_eq!(hub.expire(1_000), 0);
        let _b2 = hub.register(&user("b"), None, None).unwrap();
        assert_eq!(hub.close_user("b", CloseReason::Disconnected), 2);
        assert!(matches!(
            never.mailbox.try_recv(),
            Some(Received::Closed(CloseReason::Disconnected))
        ));
        assert_eq!(hub.client_count(), 0);
        assert_eq!(hub.close_user("b", CloseReason::Disconnected), 0);
    }

    /// However a stream ends (the client went, or the hub cut it as slow, replaced it,
    /// expired it, disconnected the user, or shut down), unregistering its registrations
    /// reports the user's last one exactly once, so the broker's subscription is released
    /// exactly once.
    #[test]
    fn every_way_a_stream_ends_releases_the_user_exactly_once() {
        type End = fn(&Hub, &[Registration]);
        let ends: [(&str, End); 6] = [
            ("client gone", |_, _| {}),
            ("slow", |hub, _| {
                for id in 1..=10 {
                    hub.dispatch(&event(id, Target::User(user("a")), "n"));
                }
            }),
            ("replaced", |hub, _| {
                let extra = hub.register(&user("a"), None, None).unwrap();
                assert!(!extra.first_for_user);
                assert!(!hub.unregister("a", extra.id));
            }),
            ("expired", |hub, _| {
                hub.expire(u64::MAX);
            }),
            ("disconnected", |hub, _| {
                hub.close_user("a", CloseReason::Disconnected);
            }),
            ("shutdown", |hub, _| hub.close_all()),
        ];
        for (how, end) in ends {
            let hub = Hub::new(2, 4);
            let regs: Vec<_> = (0..2)
                .map(|_| hub.register(&user("a"), None, Some(100)).unwrap())
                .collect();
            assert!(regs[0].first_for_user && !regs[1].first_for_user, "{how}");
            end(&hub, &regs);
            assert!(hub.holds_user("a"), "{how}: held until unregistered");
            let lasts: Vec<bool> = regs.iter().map(|r| hub.unregister("a", r.id)).collect();
            assert_eq!(lasts, [false, true], "{how}");
            assert!(!hub.holds_user("a"), "{how}");
            assert_eq!(hub.client_count(), 0, "{how}");
            // Unregistering again changes nothing.
            assert!(!hub.unregister("a", regs[1].id), "{how}");
        }
    }

    #[test]
    fn unregister_reports_the_last_connection_and_close_all_refuses_new_ones() {
        let hub = Hub::new(5, 8);
        let one = hub.register(&user("a"), None, None).unwrap();
        let two = hub.register(&user("a"), None, None).unwrap();
        assert!(!hub.unregister("a", one.id));
        assert!(hub.unregister("a", two.id));
        assert_eq!(hub.user_count(), 0);
        let mut three = hub.register(&user("a"), None, None).unwrap();
        hub.close_all();
        assert!(matches!(
            three.mailbox.try_recv(),
            Some(Received::Closed(CloseReason::Shutdown))
        ));
        assert!(hub.register(&user("a"), None, None).is_none());
    }
}
