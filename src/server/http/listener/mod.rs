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

mod budget;
mod hyper_path;
mod lean;

pub(crate) use budget::RequestConnection;
use budget::{AddressBudget, AddressSlot, PendingBudget, PendingSlot, SocketSlot};
use hyper_path::{serve_hyper, Rewind, StallTimeout};
use lean::{serve_lean, write_plain};

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
        let trusted_proxies = service.config().trusted_proxies.clone();
        let shared = Arc::new(Shared {
            app,
            stream_prefix: format!("GET {}", service.stream_path()).into_bytes().into(),
            sockets: AtomicUsize::new(0),
            max_sockets: config::file_limit().saturating_sub(FD_HEADROOM).max(64),
            pending: PendingBudget::new(trusted_proxies.clone()),
            requests: AddressBudget::new(MAX_REQUEST_CONNECTIONS_PER_ADDRESS, trusted_proxies),
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

#[cfg(test)]
mod tests {
    use super::{
        lean::{chunk_size_line, parse_head, write_with_progress},
        *,
    };
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
