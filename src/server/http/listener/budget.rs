//! What one address (IPv6: one /64) and the whole listener may hold: sockets, connections
//! still sending their first request, and request connections.

use super::*;
use crate::server::TrustedProxies;

/// Connections that have not sent a complete request yet, per address (IPv6: per /64): at
/// most [`MAX_PENDING_PER_ADDRESS`] read at once, up to [`MAX_PARKED_PER_ADDRESS`] more
/// waiting unread, in order of arrival.
pub(super) struct PendingBudget {
    addresses: Mutex<HashMap<IpAddr, PendingAddress>>,
    /// Trusted proxies (`SSE_TRUSTED_PROXIES`), which no address budget counts: a proxy
    /// sends whole heads, and its clients are counted by the forwarded address.
    exempt: TrustedProxies,
}

#[derive(Default)]
pub(super) struct PendingAddress {
    reading: usize,
    parked: std::collections::VecDeque<Accepted>,
}

impl PendingBudget {
    pub(super) fn new(exempt: TrustedProxies) -> Self {
        Self {
            addresses: Mutex::default(),
            exempt,
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PendingAddress>> {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `accepted` now if its address has a place, parks it if its queue has room,
    /// and closes it otherwise.
    pub(super) fn admit(shared: &Arc<Shared>, accepted: Accepted) {
        if shared.pending.exempt.contains(accepted.peer.ip()) {
            // Still under the head deadline and the socket budget, not the address's.
            let slot = PendingSlot::uncounted(shared);
            return spawn_handle(accepted, slot, shared.clone());
        }
        let key = address_key(accepted.peer.ip());
        let mut addresses = shared.pending.lock();
        let address = addresses.entry(key).or_default();
        if address.reading < MAX_PENDING_PER_ADDRESS {
            address.reading += 1;
            drop(addresses);
            let slot = PendingSlot::new(shared, key);
            spawn_handle(accepted, slot, shared.clone());
        } else if address.parked.len() < MAX_PARKED_PER_ADDRESS {
            address.parked.push_back(accepted);
        } else {
            drop(addresses);
            m::connection_refused("pending_per_address");
        }
    }

    /// One of `key`'s places is free: the next parked connection still in time takes it.
    pub(super) fn hand_on(shared: &Arc<Shared>, key: IpAddr) {
        let now = tokio::time::Instant::now();
        let mut late = Vec::new();
        let next = {
            let mut addresses = shared.pending.lock();
            let Some(address) = addresses.get_mut(&key) else {
                return;
            };
            let next = loop {
                match address.parked.pop_front() {
                    Some(accepted) if accepted.head_by <= now => late.push(accepted),
                    other => break other,
                }
            };
            if next.is_none() {
                address.reading -= 1;
                if address.reading == 0 {
                    addresses.remove(&key);
                }
            }
            next
        };
        // Closed outside the lock.
        late.iter().for_each(|_| m::connection_refused("head_timeout"));
        drop(late);
        if let Some(accepted) = next {
            spawn_handle(accepted, PendingSlot::new(shared, key), shared.clone());
        }
    }

    /// Closes every parked connection (at shutdown).
    pub(super) fn close_parked(&self) {
        let parked: Vec<Accepted> = self
            .lock()
            .values_mut()
            .flat_map(|address| std::mem::take(&mut address.parked))
            .collect();
        drop(parked);
    }
}

/// One of an address's [`PendingBudget`] places, handed on when released or dropped.
pub(crate) struct PendingSlot {
    shared: std::sync::Weak<Shared>,
    key: IpAddr,
    released: bool,
}

impl PendingSlot {
    pub(super) fn new(shared: &Arc<Shared>, key: IpAddr) -> Self {
        Self {
            shared: Arc::downgrade(shared),
            key,
            released: false,
        }
    }

    /// A place for a trusted proxy's connection, which no address budget counts.
    pub(super) fn uncounted(shared: &Arc<Shared>) -> Self {
        Self {
            shared: Arc::downgrade(shared),
            key: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            released: true,
        }
    }

    pub(super) fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        if let Some(shared) = self.shared.upgrade() {
            PendingBudget::hand_on(&shared, self.key);
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// One open client socket, counted against the budget while it lives.
pub(super) struct SocketSlot(pub(super) Arc<Shared>);

impl SocketSlot {
    pub(super) fn take(shared: &Arc<Shared>) -> Option<Self> {
        let open = shared.sockets.fetch_add(1, Ordering::Relaxed);
        if open >= shared.max_sockets {
            shared.sockets.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Self(shared.clone()))
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections per address (IPv6: per /64), at most `limit` each; trusted proxies are not
/// counted.
pub(super) struct AddressBudget {
    limit: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    exempt: TrustedProxies,
}

impl AddressBudget {
    pub(super) fn new(limit: usize, exempt: TrustedProxies) -> Self {
        Self {
            limit,
            counts: Arc::default(),
            exempt,
        }
    }

    /// A place for one more connection from `ip`; `None` when it holds `limit` already.
    pub(super) fn take(&self, ip: IpAddr) -> Option<AddressSlot> {
        if self.exempt.contains(ip) {
            return Some(AddressSlot::uncounted());
        }
        let key = address_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.counts.clone(),
            key,
            released: false,
        })
    }
}

/// One connection's place in an [`AddressBudget`], given back when dropped or released.
pub(crate) struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
    released: bool,
}

impl AddressSlot {
    /// A place no budget counts (a trusted proxy's connection).
    fn uncounted() -> Self {
        Self {
            counts: Arc::default(),
            key: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            released: true,
        }
    }

    pub(super) fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// In the extensions of every request hyper serves: a handler that turns its connection
/// into an event stream (the WebSocket upgrade) gives its place among the address's
/// request connections back, since streams have limits of their own.
#[derive(Clone)]
pub(crate) struct RequestConnection(pub(super) Arc<Mutex<Option<AddressSlot>>>);

impl RequestConnection {
    /// The connection now carries a stream.
    pub(crate) fn became_stream(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
