//! [`SseListener`] and [`Serve`]: the server's sockets, and the loop that serves them.
//!
//! Why not `axum::serve`: it gives hyper no timer, so a socket that never sends a request
//! (or stops half-way, or idles between keep-alive requests) is held forever, and 20,000 of
//! them exhaust the process; and hyper keeps a read buffer (8-16 KiB) and its write buffers
//! for the whole life of every HTTP/1 connection, which is right for request/response
//! traffic but dominates the memory of an SSE server whose connections live for hours.
//!
//! So every accepted socket first shows its first bytes within [`HEAD_TIMEOUT`]:
//! - `GET <stream path>` (then a space or `?`): the lean path. The request head is read
//!   into a short-lived buffer, the same axum router answers it (auth, limits, CORS and the
//!   handler are the ones every other request gets), then only the socket and the response
//!   stream stay: about a quarter of the memory per connection.
//! - anything else: hyper (HTTP/1.1, or HTTP/2 with prior knowledge), with the bytes read so
//!   far replayed, a timer, and the same [`HEAD_TIMEOUT`] for every request head, so idle
//!   keep-alive connections are closed too.
//!
//! Reading the first bytes (instead of peeking) means a socket that sends one byte and
//! stops costs nothing while it waits: no polling loop.

use std::{
    collections::HashMap,
    future::{Future, IntoFuture},
    io::{self, IoSlice, Write as _},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, BodyDataStream},
    extract::ConnectInfo,
    http::{header, HeaderName, HeaderValue, Method, Request, Version},
    Router,
};
use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tower::ServiceExt;

use crate::server::{address::address_key, config, core::service::SseService, metrics as m};

/// Pending connections the kernel queues before `accept`, per accept queue (capped by
/// `net.core.somaxconn`, 4096 on most systems).
const BACKLOG: u32 = 4096;
/// Accept queues on the one port (`SO_REUSEPORT`; the kernel spreads new connections over
/// them). A reconnect storm completes thousands of handshakes within milliseconds while the
/// runtime is busy with the streams just opened; one 4096-deep queue overflowed at 19,000
/// clients, and each dropped handshake costs its client a 1 s, then 3 s, retransmit.
const ACCEPT_QUEUES: usize = 8;
/// Largest request head the lean path reads; larger ones get 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a connection may take to send a complete request head: the first one from the
/// moment it is accepted (its first bytes included), and on keep-alive each next one.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long means the client stopped reading: the
/// connection is dropped so its buffers are freed (the events stay replayable).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections from one address (IPv6: one /64) read at once while they have not sent a
/// complete request: more wait unread (see [`MAX_PARKED_PER_ADDRESS`]), so one client
/// cannot fill the socket budget with silent connections.
const MAX_PENDING_PER_ADDRESS: usize = 256;
/// Connections from one address that wait, unread, for one of its
/// [`MAX_PENDING_PER_ADDRESS`] places: a reconnect storm from behind one NAT (thousands of
/// clients on one address at once) is read in turn rather than refused. A parked
/// connection costs a socket and a few bytes, for at most [`HEAD_TIMEOUT`] from its accept;
/// past this many, more are closed at once.
const MAX_PARKED_PER_ADDRESS: usize = 16_384;
/// Connections from one address served by hyper (pages, publishes, stats: everything but
/// event streams, which have their own limits): past it, new ones get a bare 503, so one
/// client keeping thousands of keep-alive or HTTP/2 connections busy cannot hold the socket
/// budget that streams need. A browser keeps about 6 per origin; a backend's pool, tens.
const MAX_REQUEST_CONNECTIONS_PER_ADDRESS: usize = 256;
/// A hyper connection with no request in flight for this long is closed, HTTP/2 (whose
/// pings a client may keep answering) as HTTP/1.
const IDLE_TIMEOUT: Duration = HEAD_TIMEOUT;
/// After shutdown begins, how long connections get to finish what is in flight before
/// they are closed: a client that never reads cannot hold the shutdown.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);
/// File descriptors kept free of client sockets (Redis connections, files, the listeners).
const FD_HEADROOM: usize = 128;

/// The listening sockets: eight accept queues on one port.
///
/// ```no_run
/// # async fn run(app: axum::Router, sse: sse_notify::server::SseService) -> std::io::Result<()> {
/// use sse_notify::server::SseListener;
///
/// let listener = SseListener::bind("127.0.0.1:3000".parse().unwrap()).await?;
/// listener
///     .serve(app, &sse)
///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// # Ok(()) }
/// ```
pub struct SseListener {
    listeners: Vec<TcpListener>,
    local_addr: SocketAddr,
}

impl SseListener {
    /// Listens on `addr` (port 0 picks a free one) with deep accept queues. Fails if the
    /// port is taken (it is not silently shared).
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        // A plain bind first: `SO_REUSEPORT` alone would let a second server on the same
        // port silently share its connections instead of failing with "address in use".
        let probe = new_socket(addr)?;
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
        let local_addr = probe.local_addr()?;
        drop(probe);
        let mut listeners = Vec::with_capacity(ACCEPT_QUEUES);
        for _ in 0..ACCEPT_QUEUES {
            let socket = new_socket(addr)?;
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(local_addr)?;
            listeners.push(socket.listen(BACKLOG)?);
        }
        Ok(Self {
            listeners,
            local_addr,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves `app` (with [`Routes`](super::routes::Routes) merged in), taking the lean path for
    /// `sse`'s stream path. Await the result, or add
    /// [`with_graceful_shutdown`](Serve::with_graceful_shutdown).
    pub fn serve(self, app: Router, sse: &SseService) -> Serve {
        Serve {
            listener: self,
            app,
            service: sse.clone(),
        }
    }
}

/// A running server; see [`SseListener::serve`].
pub struct Serve {
    listener: SseListener,
    app: Router,
    service: SseService,
}

impl Serve {
    /// Serves until `signal` completes, then stops accepting, shuts the [`SseService`]
    /// down (which ends every stream, so clients reconnect elsewhere), lets requests in
    /// flight finish, and returns.
    pub async fn with_graceful_shutdown<F>(self, signal: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Serve {
            listener,
            app,
            service,
        } = self;
        let (shutdown, watching) = watch::channel(false);
        let shared = Arc::new(Shared {
            app,
            stream_prefix: format!("GET {}", service.stream_path()).into_bytes().into(),
            sockets: AtomicUsize::new(0),
            max_sockets: config::file_limit().saturating_sub(FD_HEADROOM).max(64),
            pending: PendingBudget::default(),
            requests: AddressBudget::new(MAX_REQUEST_CONNECTIONS_PER_ADDRESS),
            shutdown: watching,
        });
        // Accepting stops when this future completes or is dropped.
        let acceptors = AbortOnDrop(
            listener
                .listeners
                .into_iter()
                .map(|l| tokio::spawn(tokio::task::unconstrained(accept_loop(l, shared.clone()))))
                .collect(),
        );
        signal.await;
        tracing::info!("shutting down: no new connections");
        drop(acceptors);
        // Connections still waiting to be read are closed (they hold the shared state).
        shared.pending.close_parked();
        let _ = shutdown.send(true);
        service.shutdown().await;
        drop(shared);
        // Every connection holds a receiver until it is done; each drains for at most
        // SHUTDOWN_DRAIN, and a stream stuck in a write for at most WRITE_TIMEOUT: wait
        // for the drain and a little more, not for the slowest client.
        let drained = tokio::time::timeout(SHUTDOWN_DRAIN + Duration::from_secs(2), shutdown.closed()).await;
        if drained.is_err() {
            tracing::warn!("shutdown: connections still open after the drain; leaving them");
        }
        Ok(())
    }
}

impl IntoFuture for Serve {
    type Output = io::Result<()>;
    type IntoFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.with_graceful_shutdown(std::future::pending()))
    }
}

/// Tasks aborted when this is dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// What every connection task shares.
struct Shared {
    app: Router,
    /// `GET <stream path>`.
    stream_prefix: Arc<[u8]>,
    /// Open client sockets, and the most allowed (below the process's file limit).
    sockets: AtomicUsize,
    max_sockets: usize,
    /// Connections per address that have not sent a complete request yet.
    pending: PendingBudget,
    /// Connections per address that hyper serves.
    requests: AddressBudget,
    shutdown: watch::Receiver<bool>,
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Accepts from one queue; each connection becomes a task.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(socket) = SocketSlot::take(&shared) else {
            m::connection_refused("socket_limit");
            continue; // dropping the stream closes it
        };
        let accepted = Accepted {
            stream,
            peer,
            socket,
            head_by: tokio::time::Instant::now() + HEAD_TIMEOUT,
        };
        PendingBudget::admit(&shared, accepted);
    }
}

/// A connection just accepted, not read yet.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    socket: SocketSlot,
    /// When its first request head must be complete: [`HEAD_TIMEOUT`] after the accept.
    head_by: tokio::time::Instant,
}

/// Reads `accepted` in a task of its own, holding one of its address's pending places.
fn spawn_handle(accepted: Accepted, pending: PendingSlot, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let Accepted {
            stream,
            peer,
            socket,
            head_by,
        } = accepted;
        let _socket = socket;
        handle(stream, peer, pending, head_by, &shared).await;
    });
}

/// Connections that have not sent a complete request yet, per address (IPv6: per /64): at
/// most [`MAX_PENDING_PER_ADDRESS`] read at once, up to [`MAX_PARKED_PER_ADDRESS`] more
/// waiting unread, in order of arrival.
#[derive(Default)]
struct PendingBudget {
    addresses: Mutex<HashMap<IpAddr, PendingAddress>>,
}

#[derive(Default)]
struct PendingAddress {
    reading: usize,
    parked: std::collections::VecDeque<Accepted>,
}

impl PendingBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, PendingAddress>> {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `accepted` now if its address has a place, parks it if its queue has room,
    /// and closes it otherwise.
    fn admit(shared: &Arc<Shared>, accepted: Accepted) {
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
    fn hand_on(shared: &Arc<Shared>, key: IpAddr) {
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
    fn close_parked(&self) {
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
    fn new(shared: &Arc<Shared>, key: IpAddr) -> Self {
        Self {
            shared: Arc::downgrade(shared),
            key,
            released: false,
        }
    }

    fn release(&mut self) {
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
struct SocketSlot(Arc<Shared>);

impl SocketSlot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
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

/// Connections per address (IPv6: per /64), at most `limit` each.
struct AddressBudget {
    limit: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl AddressBudget {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            counts: Arc::default(),
        }
    }

    /// A place for one more connection from `ip`; `None` when it holds `limit` already.
    fn take(&self, ip: IpAddr) -> Option<AddressSlot> {
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
    fn release(&mut self) {
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
pub(crate) struct RequestConnection(Arc<Mutex<Option<AddressSlot>>>);

impl RequestConnection {
    /// The connection now carries a stream.
    pub(crate) fn became_stream(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Reads the first bytes, then serves the connection on the lean path or through hyper.
async fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut pending: PendingSlot,
    head_by: tokio::time::Instant,
    shared: &Shared,
) {
    // One deadline for the whole first head from the accept, however it is split between
    // reads (and however long the connection waited parked).
    let _ = stream.set_nodelay(true);
    let prefix = &shared.stream_prefix;
    let mut first = Vec::with_capacity(prefix.len() + 1);
    let lean = tokio::time::timeout_at(head_by, async {
        let mut buf = [0u8; 256];
        loop {
            // Never past the byte after the prefix (the rest is the head's), and never past
            // the buffer: a long prefixed stream path is read in several turns.
            let want = (prefix.len() + 1 - first.len()).min(buf.len());
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                return Ok::<_, io::Error>(None); // closed before deciding
            }
            first.extend_from_slice(&buf[..n]);
            let common = first.len().min(prefix.len());
            if first[..common] != prefix[..common] {
                return Ok(Some(false));
            }
            if first.len() > prefix.len() {
                return Ok(Some(matches!(first[prefix.len()], b' ' | b'?')));
            }
        }
    })
    .await;
    let lean = match lean {
        Ok(Ok(Some(lean))) => lean,
        Ok(Ok(None) | Err(_)) => return,
        Err(_) => {
            m::connection_refused("head_timeout");
            return;
        }
    };
    let shutdown = shared.shutdown.clone();
    if lean {
        serve_lean(stream, peer, first, pending, head_by, &shared.app, shutdown).await;
    } else {
        // hyper takes over, with its own timer for every request head; the connection
        // counts as pending only until this hand-over.
        // Boxed: hyper's connection state is kilobytes, and inline it would size the task
        // of every lean stream too (a task is as big as the largest path it may take).
        pending.release();
        let Some(slot) = shared.requests.take(peer.ip()) else {
            m::connection_refused("connections_per_address");
            let _ = write_plain(&mut stream, 503).await;
            return;
        };
        Box::pin(serve_hyper(
            StallTimeout::new(Rewind::new(first.into(), stream), WRITE_TIMEOUT),
            peer,
            head_by,
            slot,
            shared.app.clone(),
            shutdown,
        ))
        .await;
    }
}

/// Serves one connection through hyper (HTTP/1.1, or HTTP/2 with prior knowledge), with
/// upgrades (WebSocket), header-read timeouts, a write timeout, an idle limit, and a
/// graceful end on shutdown that lasts at most [`SHUTDOWN_DRAIN`].
async fn serve_hyper(
    io: StallTimeout<Rewind<TcpStream>>,
    peer: SocketAddr,
    head_by: tokio::time::Instant,
    slot: AddressSlot,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let budget = RequestConnection(Arc::new(Mutex::new(Some(slot))));
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(budget.clone());
            // In flight until the response body is done (or dropped).
            let in_flight = activity.begin();
            let response = app.clone().oneshot(request.map(Body::new));
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    use http_body_util::BodyExt;
                    Body::new(body.map_frame(move |frame| {
                        let _ = &in_flight;
                        frame
                    }))
                }))
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HEAD_TIMEOUT)
        .keep_alive_timeout(HEAD_TIMEOUT)
        .max_concurrent_streams(64);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut idle_check = tokio::time::interval(IDLE_TIMEOUT / 2);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut connection => return,
            _ = shutdown.wait_for(|down| *down) => break,
            // hyper times each head itself, but from its own start: the first head's time
            // counts from the accept.
            _ = tokio::time::sleep_until(head_by), if !activity.has_begun() => {
                m::connection_refused("head_timeout");
                return;
            }
            _ = idle_check.tick() => if activity.idle_for() >= IDLE_TIMEOUT { break },
        }
    }
    connection.as_mut().graceful_shutdown();
    // A client that never reads keeps a response in flight: bounded, like everything else.
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, connection).await;
}

/// Requests in flight on one hyper connection, and since when it has had none.
struct Activity {
    /// A request has come (its head was complete).
    begun: std::sync::atomic::AtomicBool,
    in_flight: AtomicUsize,
    /// When the last request ended, in ms after `epoch`.
    quiet_since_ms: std::sync::atomic::AtomicU64,
    epoch: tokio::time::Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            begun: Default::default(),
            in_flight: AtomicUsize::new(0),
            quiet_since_ms: Default::default(),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Counts a request until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.begun.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    /// How long no request has been in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.quiet_since_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(since)
    }
}

/// One request in flight on a hyper connection.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.quiet_since_ms.store(now, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An IO whose writes fail with `TimedOut` once one has made no progress for `stall`:
/// hyper has no write timeout of its own, and a client that pipelines requests and never
/// reads would otherwise hold its connection (and the shutdown) forever. One timer per
/// connection, armed only while a write is blocked.
struct StallTimeout<T> {
    inner: T,
    stall: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The deadline is set for the write blocked now.
    armed: bool,
}

impl<T> StallTimeout<T> {
    fn new(inner: T, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            deadline: Box::pin(tokio::time::sleep(stall)),
            armed: false,
        }
    }

    /// What a write's poll gave: on progress the deadline is disarmed; while blocked it is
    /// armed once, and past it the write fails.
    fn watch<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.armed = false;
            return poll;
        }
        if !self.armed {
            self.armed = true;
            let at = tokio::time::Instant::now() + self.stall;
            self.deadline.as_mut().reset(at);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads the head (the first bytes already read are `first`), runs the router, writes the
/// response and streams its body until either side ends. Nothing from the request outlives
/// the router call.
async fn serve_lean(
    stream: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    pending: PendingSlot,
    head_by: tokio::time::Instant,
    app: &Router,
    _shutdown: watch::Receiver<bool>,
) {
    // Boxed, so that what only the request needs (head buffer, router future, response
    // head) is freed before streaming, rather than sizing every stream's task for good.
    if let Some((stream, body, chunked)) = Box::pin(respond(stream, peer, first, pending, head_by, app)).await
    {
        stream_body(stream, body, chunked).await;
    }
}

/// The request half of [`serve_lean`]: the head, the router, the response head written.
/// Returns what is left to stream, or `None` when the response is complete.
async fn respond(
    mut stream: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    mut pending: PendingSlot,
    head_by: tokio::time::Instant,
    app: &Router,
) -> Option<(TcpStream, BodyDataStream, bool)> {
    let request = match tokio::time::timeout_at(head_by, read_head(&mut stream, first)).await {
        Ok(Ok(request)) => request,
        Ok(Err(status)) => {
            let _ = write_plain(&mut stream, status).await;
            return None;
        }
        Err(_) => {
            m::connection_refused("head_timeout");
            return None;
        }
    };
    pending.release();
    drop(pending);
    let http11 = request.version() == Version::HTTP_11;
    let mut request = request;
    request.extensions_mut().insert(ConnectInfo(peer));
    let Ok(response) = app.clone().oneshot(request).await;
    let (mut parts, body) = response.into_parts();

    // Known-length bodies (errors) go out as they are; streams are chunked on HTTP/1.1 and
    // delimited by the close on HTTP/1.0. Either way the connection ends with the body.
    let chunked = http11 && !parts.headers.contains_key(header::CONTENT_LENGTH);
    if chunked {
        parts
            .headers
            .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(if http11 { b"HTTP/1.1 " } else { b"HTTP/1.0 " });
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    drop(parts);
    write_with_progress(&mut stream, &mut [IoSlice::new(&head)], WRITE_TIMEOUT)
        .await
        .ok()?;
    Some((stream, body.into_data_stream(), chunked))
}

/// The streaming half of [`serve_lean`]: writes the body as it comes until either side ends.
///
/// One poll serves both halves: the body's next chunk, and the socket's read readiness
/// (an SSE client sends nothing after its request, so data or EOF means it is gone). The
/// socket's own reader slot holds the waker, rather than a `readable()` future that a
/// `select!` would build, register and drop again for every frame written.
async fn stream_body(mut stream: TcpStream, mut body: BodyDataStream, chunked: bool) {
    enum Next {
        Data(Bytes),
        Readable,
        End,
        Gone,
    }
    let mut probe = [0u8; 16];
    loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(next) = body.poll_next_unpin(cx) {
                return Poll::Ready(match next {
                    Some(Ok(data)) => Next::Data(data),
                    Some(Err(_)) => Next::Gone,
                    None => Next::End,
                });
            }
            stream.poll_read_ready(cx).map(|ready| match ready {
                Ok(()) => Next::Readable,
                Err(_) => Next::Gone,
            })
        })
        .await;
        match next {
            // An empty chunk would read as the end of a chunked body.
            Next::Data(data) if data.is_empty() => {}
            Next::Data(data) => {
                let sent = if chunked {
                    let mut size = [0u8; 18];
                    let size = chunk_size_line(data.len(), &mut size);
                    let mut parts = [IoSlice::new(size), IoSlice::new(&data), IoSlice::new(b"\r\n")];
                    write_with_progress(&mut stream, &mut parts, WRITE_TIMEOUT).await
                } else {
                    write_with_progress(&mut stream, &mut [IoSlice::new(&data)], WRITE_TIMEOUT).await
                };
                if sent.is_err() {
                    return;
                }
            }
            Next::Readable => match stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => return,
            },
            Next::End => break,
            Next::Gone => return,
        }
    }
    if chunked {
        let _ = write_with_progress(&mut stream, &mut [IoSlice::new(b"0\r\n\r\n")], WRITE_TIMEOUT).await;
    }
    let _ = stream.shutdown().await;
}

/// `len` in hex and CRLF, the line before each chunk of a chunked body, written into `buf`.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    let mut rest = &mut buf[..];
    // 16 hex digits and CRLF always fit.
    let _ = write!(rest, "{len:x}\r\n");
    let written = 18 - rest.len();
    &buf[..written]
}

/// Reads until the request head is complete, starting from `buf` (bytes already read), and
/// parses it; the buffer is freed on return. Errors are the status to answer with.
async fn read_head<R: AsyncRead + Unpin>(stream: &mut R, mut buf: Vec<u8>) -> Result<Request<Body>, u16> {
    loop {
        if let Some(parsed) = parse_head(&buf)? {
            return Ok(parsed);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(431);
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parses a complete `GET` request head; `Ok(None)` while it is incomplete, `Err(status)`
/// when it can never be valid. Never panics, whatever the bytes.
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<Request<Body>>, u16> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(431),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(431),
        Err(_) => return Err(400),
    }
    if parsed.method != Some("GET") {
        return Err(400);
    }
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(parsed.path.ok_or(400u16)?)
        .version(if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        });
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| 400u16)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| 400u16)?;
        builder = builder.header(name, value);
    }
    builder.body(Body::empty()).map(Some).map_err(|_| 400)
}

/// Writes all of `parts` (one vectored write each time, so a chunk's framing costs no
/// copy), failing only when no byte could be written for `stall`: a slow reader that keeps
/// taking data is never cut off, one that stopped reading is.
pub(crate) async fn write_with_progress<W: AsyncWrite + Unpin>(
    stream: &mut W,
    mut parts: &mut [IoSlice<'_>],
    stall: Duration,
) -> io::Result<()> {
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match tokio::time::timeout(stall, stream.write_vectored(parts)).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => IoSlice::advance_slices(&mut parts, n),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        }
    }
    stream.flush().await
}

/// A bare error response for a request the router never saw (an unparseable head, or a
/// connection over its address's budget: 503, come back in a second).
async fn write_plain(stream: &mut TcpStream, status: u16) -> io::Result<()> {
    let (reason, retry) = match status {
        431 => ("Request Header Fields Too Large", ""),
        503 => ("Service Unavailable", "Retry-After: 1\r\n"),
        _ => ("Bad Request", ""),
    };
    let body = format!(r#"{{"error":"{reason}","field":"request"}}"#);
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\n{retry}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_with_progress(stream, &mut [IoSlice::new(response.as_bytes())], WRITE_TIMEOUT).await?;
    stream.shutdown().await
}

/// An IO that first replays bytes already read from it.
struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let replay = self.prefix.split_to(n);
            buf.put_slice(&replay);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A write of 4 KiB that `client` reads 64 bytes every 20 s for 2,000 s (far longer
    /// than 30 s in all, never 30 s without progress), then stops reading: `writer` must
    /// still be going, then fail with `TimedOut` 30 s after the last progress.
    async fn cut_off_only_30_s_after_the_last_progress(
        writer: tokio::task::JoinHandle<(Result<(), io::ErrorKind>, tokio::time::Instant)>,
        mut client: tokio::io::DuplexStream,
    ) {
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 64];
        let mut read = 0;
        while read < 2048 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            read += client.read(&mut buf).await.unwrap();
        }
        assert!(started.elapsed() > Duration::from_secs(600));
        assert!(!writer.is_finished(), "cut off while still making progress");
        let stopped = tokio::time::Instant::now();
        let (result, failed_at) = writer.await.unwrap();
        assert_eq!(result, Err(io::ErrorKind::TimedOut));
        let after = failed_at - stopped;
        assert!(
            after <= WRITE_TIMEOUT && after >= WRITE_TIMEOUT - Duration::from_secs(1),
            "{after:?}"
        );
    }

    /// The lean path's writes: a reader that keeps taking bytes, however slowly, is never
    /// cut off; one that stops is cut off 30 s after its last progress (not 30 s after
    /// the write began).
    #[tokio::test(start_paused = true)]
    async fn the_write_timeout_is_no_progress_for_30_s() {
        let (mut server, client) = duplex(64);
        let payload = vec![b'x'; 4096];
        let writer = tokio::spawn(async move {
            let result = write_with_progress(&mut server, &mut [IoSlice::new(&payload)], WRITE_TIMEOUT).await;
            (result.map_err(|e| e.kind()), tokio::time::Instant::now())
        });
        cut_off_only_30_s_after_the_last_progress(writer, client).await;
    }

    /// hyper's writes through [`StallTimeout`], the same.
    #[tokio::test(start_paused = true)]
    async fn hyper_writes_fail_after_30_s_without_progress() {
        let (server, client) = duplex(64);
        let mut io = StallTimeout::new(server, WRITE_TIMEOUT);
        let writer = tokio::spawn(async move {
            let result = io.write_all(&[b'x'; 4096]).await;
            (result.map_err(|e| e.kind()), tokio::time::Instant::now())
        });
        cut_off_only_30_s_after_the_last_progress(writer, client).await;
    }

    /// A chunk goes out framed as `<hex len>\r\n<data>\r\n`, whole, even when the reader
    /// takes a few bytes at a time (each vectored write then covers part of one slice).
    #[tokio::test]
    async fn chunks_are_framed_whole_across_partial_vectored_writes() {
        for len in [1usize, 9, 10, 15, 16, 255, 256, 4095, 70_000] {
            let mut size = [0u8; 18];
            assert_eq!(chunk_size_line(len, &mut size), format!("{len:x}\r\n").as_bytes());
            let (mut server, mut client) = duplex(7);
            let data = vec![b'd'; len];
            let reader = tokio::spawn(async move {
                let mut all = Vec::new();
                client.read_to_end(&mut all).await.unwrap();
                all
            });
            let mut size = [0u8; 18];
            let size = chunk_size_line(len, &mut size);
            let mut parts = [IoSlice::new(size), IoSlice::new(&data), IoSlice::new(b"\r\n")];
            write_with_progress(&mut server, &mut parts, WRITE_TIMEOUT)
                .await
                .unwrap();
            drop(server);
            let expected = [format!("{len:x}\r\n").into_bytes(), data, b"\r\n".to_vec()].concat();
            assert_eq!(reader.await.unwrap(), expected, "len {len}");
        }
        let mut size = [0u8; 18];
        assert_eq!(
            chunk_size_line(usize::MAX, &mut size),
            format!("{:x}\r\n", usize::MAX).as_bytes()
        );
    }

    #[test]
    fn heads_parse_or_refuse_with_a_status() {
        let ok = parse_head(b"GET /api/sse?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(ok.uri(), "/api/sse?x=1");
        assert!(parse_head(b"GET /api/sse HTTP/1.1\r\nHost: a\r\n")
            .unwrap()
            .is_none());
        assert_eq!(parse_head(b"POST /api/sse HTTP/1.1\r\n\r\n").unwrap_err(), 400);
        assert_eq!(parse_head(b"GET /\x01 HTTP/1.1\r\n\r\n").unwrap_err(), 400);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse_head(big.as_bytes()).unwrap_err(), 431);
    }

    #[test]
    fn ipv6_addresses_share_a_budget_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    proptest::proptest! {
        /// Any bytes: no panic, and a parsed head is always a `GET` with headers taken
        /// verbatim (a value can never carry a line break into another header).
        #[test]
        fn any_head_parses_or_is_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            if let Ok(Some(request)) = parse_head(&bytes) {
                proptest::prop_assert_eq!(request.method(), Method::GET);
                for value in request.headers().values() {
                    proptest::prop_assert!(!value.as_bytes().contains(&b'\n'));
                }
            }
        }

        /// A valid head with any query and any header values either parses to exactly
        /// that, or is refused; it never turns into something else.
        #[test]
        fn valid_heads_keep_their_fields(query in "[a-zA-Z0-9=&%._-]{0,64}", value in "[ -~]{0,64}") {
            let head = format!("GET /api/sse?{query} HTTP/1.1\r\nX-Test: {value}\r\n\r\n");
            if let Ok(Some(request)) = parse_head(head.as_bytes()) {
                proptest::prop_assert_eq!(request.uri().query().unwrap_or(""), query.as_str());
                let got = request.headers()["x-test"].to_str().unwrap_or("").to_string();
                proptest::prop_assert_eq!(got, value.trim().to_string());
            }
        }
    }

    #[tokio::test]
    async fn rewind_replays_what_was_read_first() {
        let (mut far, near) = duplex(64);
        far.write_all(b"rest").await.unwrap();
        drop(far);
        let mut io = Rewind::new(Bytes::from_static(b"GET "), near);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET rest");
    }
}
