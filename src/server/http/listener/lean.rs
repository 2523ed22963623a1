//! The lean stream path: the head read into a short-lived buffer, the router called once,
//! then only the socket and the response stream stay.

use super::*;

/// Reads the head (the first bytes already read are `first`), runs the router, writes the
/// response and streams its body until either side ends. Nothing from the request outlives
/// the router call.
pub(super) async fn serve_lean(
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
pub(super) async fn respond(
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
pub(super) async fn stream_body(mut stream: TcpStream, mut body: BodyDataStream, chunked: bool) {
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
pub(super) fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    let mut rest = &mut buf[..];
    // 16 hex digits and CRLF always fit.
    let _ = write!(rest, "{len:x}\r\n");
    let written = 18 - rest.len();
    &buf[..written]
}

/// Reads until the request head is complete, starting from `buf` (bytes already read), and
/// parses it; the buffer is freed on return. Errors are the status to answer with.
pub(super) async fn read_head<R: AsyncRead + Unpin>(
    stream: &mut R,
    mut buf: Vec<u8>,
) -> Result<Request<Body>, u16> {
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
pub(super) async fn write_plain(stream: &mut TcpStream, status: u16) -> io::Result<()> {
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
