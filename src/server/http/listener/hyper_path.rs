//! Everything but a stream request: hyper, with timers, a write timeout, an idle limit
//! and a bounded graceful end.

use super::*;

/// Serves one connection through hyper (HTTP/1.1, or HTTP/2 with prior knowledge), with
/// upgrades (WebSocket), header-read timeouts, a write timeout, an idle limit, and a
/// graceful end on shutdown that lasts at most [`SHUTDOWN_DRAIN`].
pub(super) async fn serve_hyper(
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
pub(super) struct Activity {
    /// A request has come (its head was complete).
    begun: std::sync::atomic::AtomicBool,
    in_flight: AtomicUsize,
    /// When the last request ended, in ms after `epoch`.
    quiet_since_ms: std::sync::atomic::AtomicU64,
    epoch: tokio::time::Instant,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            begun: Default::default(),
            in_flight: AtomicUsize::new(0),
            quiet_since_ms: Default::default(),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Counts a request until the returned guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.begun.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub(super) fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    /// How long no request has been in flight (zero while one is).
    pub(super) fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.quiet_since_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(since)
    }
}

/// One request in flight on a hyper connection.
pub(super) struct InFlight(pub(super) Arc<Activity>);

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
pub(super) struct StallTimeout<T> {
    inner: T,
    stall: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The deadline is set for the write blocked now.
    armed: bool,
}

impl<T> StallTimeout<T> {
    pub(super) fn new(inner: T, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            deadline: Box::pin(tokio::time::sleep(stall)),
            armed: false,
        }
    }

    /// What a write's poll gave: on progress the deadline is disarmed; while blocked it is
    /// armed once, and past it the write fails.
    pub(super) fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
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

/// An IO that first replays bytes already read from it.
pub(super) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(super) fn new(prefix: Bytes, inner: T) -> Self {
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
