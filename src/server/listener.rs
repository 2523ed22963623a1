//! [`SseListener`]: a TCP listener for `axum::serve` that serves long-lived SSE streams on a
//! lean HTTP/1.1 path of its own and hands every other connection to axum unchanged.
//!
//! Why: hyper keeps a read buffer (8-16 KiB) and its write buffers for the whole life of
//! every HTTP/1 connection. That is right for request/response traffic but dominates the
//! memory of an SSE server, whose connections live for hours and never send a second
//! request. This path reads the request head into a short-lived buffer, runs the same axum
//! router (so auth, limits, CORS and the handler are the ones every other request gets),
//! then keeps only the socket and the response stream: about a quarter of the memory per
//! connection (see the README's benchmark section).
//!
//! A connection takes this path when its first bytes are `GET <sse_path>` followed by a
//! space or `?`; anything else (other routes, HTTP/2, TLS from a proxy that misroutes, a
//! reused keep-alive connection) goes to axum/hyper as it would without this listener.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, HeaderName, HeaderValue, Method, Request, Version},
    serve::{ListenerExt, TapIo},
    Router,
};
use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tower::ServiceExt;

/// Pending connections the kernel queues before `accept`, per accept queue (capped by
/// `net.core.somaxconn`, 4096 on most systems).
const BACKLOG: u32 = 4096;
/// Accept queues on the one port (`SO_REUSEPORT`; the kernel spreads new connections over
/// them). A reconnect storm completes thousands of handshakes within milliseconds while the
/// runtime is busy with the streams just opened; one 4096-deep queue overflowed at 19,000
/// clients, and each dropped handshake costs its client a 1 s, then 3 s, retransmit.
const ACCEPT_QUEUES: usize = 8;
/// Largest request head the SSE path reads; larger ones get 431.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a new connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long means the client stopped reading: the
/// connection is dropped so its buffers are freed (the events stay replayable).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts TCP connections for `axum::serve`, serving `GET /api/sse` itself.
///
/// ```no_run
/// # async fn run(app: axum::Router) -> std::io::Result<()> {
/// use std::net::SocketAddr;
/// use sse_notify::server::SseListener;
///
/// let listener = SseListener::bind("127.0.0.1:3000".parse().unwrap(), app.clone()).await?;
/// axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
/// # Ok(()) }
/// ```
///
/// `app` must be the same router that `axum::serve` gets (with [`router`](super::router)
/// merged in), so both paths answer alike.
pub struct SseListener {
    local_addr: SocketAddr,
    others: mpsc::Receiver<(TcpStream, SocketAddr)>,
    acceptors: Vec<JoinHandle<()>>,
}

impl SseListener {
    /// Listens on `addr` (port 0 picks a free one) with deep accept queues.
    ///
    /// The listener comes wrapped in axum's [`TapIo`], which turns on `TCP_NODELAY` for the
    /// connections axum serves and lets `into_make_service_with_connect_info::<SocketAddr>()`
    /// see client addresses.
    pub async fn bind(addr: SocketAddr, app: Router) -> io::Result<TapIo<Self, fn(&mut TcpStream)>> {
        let (tx, others) = mpsc::channel(1024);
        let app = Arc::new(app);
        // A plain bind first: `SO_REUSEPORT` alone would let a second server on the same
        // port silently share its connections instead of failing with "address in use".
        let probe = new_socket(addr)?;
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
        let local_addr = probe.local_addr()?;
        drop(probe);
        let prefix: Arc<[u8]> = format!("GET {}", crate::api::STREAM_PATH).into_bytes().into();
        let mut acceptors = Vec::with_capacity(ACCEPT_QUEUES);
        for _ in 0..ACCEPT_QUEUES {
            let socket = new_socket(addr)?;
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(local_addr)?;
            let listener = socket.listen(BACKLOG)?;
            // Unconstrained: drain the queue on each wake-up rather than yield every 128 accepts.
            let accept = accept_loop(listener, app.clone(), prefix.clone(), tx.clone());
            let accept = tokio::task::unconstrained(accept);
            acceptors.push(tokio::spawn(accept));
        }
        let listener = Self {
            local_addr,
            others,
            acceptors,
        };
        Ok(listener.tap_io(no_delay as fn(&mut TcpStream)))
    }
}

impl Drop for SseListener {
    /// axum drops the listener when a graceful shutdown starts: stop accepting then too.
    fn drop(&mut self) {
        for acceptor in &self.acceptors {
            acceptor.abort();
        }
    }
}

impl axum::serve::Listener for SseListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.others.recv().await {
            Some(connection) => connection,
            // The accept loops only end when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

fn new_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

fn no_delay(stream: &mut TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Accepts from one queue; each connection becomes a task: the SSE path, or a hand-over
/// to axum.
async fn accept_loop(
    listener: TcpListener,
    app: Arc<Router>,
    prefix: Arc<[u8]>,
    others: mpsc::Sender<(TcpStream, SocketAddr)>,
) {
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
        let (app, prefix, others) = (app.clone(), prefix.clone(), others.clone());
        tokio::spawn(async move {
            if is_sse_request(&stream, &prefix).await {
                serve_sse(stream, peer, &app).await;
            } else {
                let _ = others.send((stream, peer)).await;
            }
        });
    }
}

/// Peeks (without consuming) until the first bytes show whether this is `GET <stream path>`.
async fn is_sse_request(stream: &TcpStream, prefix: &[u8]) -> bool {
    let mut peeked = vec![0u8; prefix.len() + 1];
    let wait = async {
        loop {
            let n = stream.peek(&mut peeked).await.unwrap_or(0);
            if n == 0 {
                return false; // closed, or an error: let hyper see it.
            }
            let common = n.min(prefix.len());
            if peeked[..common] != prefix[..common] {
                return false;
            }
            if n == peeked.len() {
                return matches!(peeked[prefix.len()], b' ' | b'?');
            }
            // A partial packet: wait for more.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, wait).await.unwrap_or(false)
}

/// Reads the head, runs the router, writes the response and streams its body until either
/// side ends. Nothing from the request outlives the router call.
async fn serve_sse(mut stream: TcpStream, peer: SocketAddr, app: &Router) {
    let _ = stream.set_nodelay(true);
    let request = match Box::pin(tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))).await {
        Ok(Ok(request)) => request,
        Ok(Err(status)) => {
            let _ = write_plain(&mut stream, status).await;
            return;
        }
        Err(_) => return,
    };
    let http11 = request.version() == Version::HTTP_11;
    let mut request = request;
    request.extensions_mut().insert(ConnectInfo(peer));
    let Ok(response) = Box::pin(app.clone().oneshot(request)).await;
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
    if write_with_timeout(&mut stream, &head).await.is_err() {
        return;
    }
    drop(head);

    let mut body = body.into_data_stream();
    let mut probe = [0u8; 16];
    loop {
        tokio::select! {
            next = body.next() => match next {
                Some(Ok(data)) => {
                    let sent = if chunked {
                        let mut chunk = Vec::with_capacity(data.len() + 12);
                        chunk.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        chunk.extend_from_slice(&data);
                        chunk.extend_from_slice(b"\r\n");
                        write_with_timeout(&mut stream, &chunk).await
                    } else {
                        write_with_timeout(&mut stream, &data).await
                    };
                    if sent.is_err() {
                        return;
                    }
                }
                Some(Err(_)) => return,
                None => break,
            },
            // An SSE client sends nothing after its request: data or EOF here means it is
            // gone (or misbehaving), so the stream and its registration are dropped now.
            readable = stream.readable() => {
                if readable.is_err() {
                    return;
                }
                match stream.try_read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    _ => return,
                }
            }
        }
    }
    if chunked {
        let _ = write_with_timeout(&mut stream, b"0\r\n\r\n").await;
    }
    let _ = stream.shutdown().await;
}

/// Reads and parses the request head; the buffer is freed on return.
async fn read_head(stream: &mut TcpStream) -> Result<Request<Body>, u16> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(431);
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => return build_request(&parsed),
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(431),
            Err(_) => return Err(400),
        }
    }
}

fn build_request(parsed: &httparse::Request<'_, '_>) -> Result<Request<Body>, u16> {
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
    builder.body(Body::empty()).map_err(|_| 400)
}

async fn write_with_timeout(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// A bare error response for a request the router never saw (unparseable head).
async fn write_plain(stream: &mut TcpStream, status: u16) -> io::Result<()> {
    let reason = if status == 431 {
        "Request Header Fields Too Large"
    } else {
        "Bad Request"
    };
    let body = format!(r#"{{"error":"{reason}","field":"request"}}"#);
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_with_timeout(stream, response.as_bytes()).await?;
    stream.shutdown().await
}
