//! A worker process: holds SSE connections like browsers would and reports what arrived.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde_json::json;
use sse_notify::api;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    sync::{watch, Semaphore},
};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, Message},
    WebSocketStream,
};

use crate::{
    cli::{Dialect, WorkerArgs, SECRET},
    processes::now_us,
};

#[derive(Default)]
struct Counters {
    connected: AtomicUsize,
    failed: AtomicUsize,
    open: AtomicUsize,
    /// Streams the server ended that were opened again.
    reconnects: AtomicUsize,
    /// Streams back after the last storm, and when the last came back.
    back: AtomicUsize,
    last_back_us: AtomicU64,
    /// `[user, seq, latency_us]` of every bench event, committed at the frame's end.
    seen: Mutex<Vec<[u32; 3]>>,
    /// Until when every tenth user stops reading (a slow client), µs since the epoch.
    pause_until_us: AtomicU64,
}

/// Holds `--connections` streams from `--source`; prints `ready` once they are open, then
/// answers `report`, `clear`, `storm` and `pause <ms>` lines on stdin; exits on EOF.
pub async fn run(args: WorkerArgs) -> ExitCode {
    let WorkerArgs {
        server,
        source,
        connections: n,
        first_user,
        dialect,
        sources,
    } = args;
    let auth = sse_notify::server::Auth::new(Some(&SECRET.into()));
    let counters = Arc::new(Counters::default());
    let gate = Arc::new(Semaphore::new(256));
    let (storm_tx, storm_rx) = watch::channel(0u64);
    for i in 0..n {
        let user = (first_user + i) as u32;
        let token = auth
            .issue(&format!("bench-{user}"), None, Duration::from_secs(3600))
            .expect("token");
        let link = Link {
            server,
            source: Ipv4Addr::from(u32::from(source) + (i % sources.max(1)) as u32),
            token,
            user,
            dialect,
        };
        tokio::spawn(link.hold(counters.clone(), gate.clone(), storm_rx.clone()));
    }
    let start = Instant::now();
    while counters.connected.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed) < n
        && start.elapsed() < Duration::from_secs(180)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{}",
        json!({"ready": counters.connected.load(Ordering::Relaxed), "failed": counters.failed.load(Ordering::Relaxed)})
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match line.trim() {
            "report" => {
                let seen = counters.seen.lock().unwrap().clone();
                println!(
                    "{}",
                    json!({"seen": seen, "open": counters.open.load(Ordering::Relaxed),
                           "reconnects": counters.reconnects.load(Ordering::Relaxed)})
                );
            }
            "clear" => {
                counters.seen.lock().unwrap().clear();
                println!("{}", json!({"cleared": true}));
            }
            "storm" => {
                let expected = counters.open.load(Ordering::Relaxed);
                counters.back.store(0, Ordering::Relaxed);
                counters.last_back_us.store(0, Ordering::Relaxed);
                storm_tx.send_modify(|generation| *generation += 1);
                let started = Instant::now();
                while counters.back.load(Ordering::Relaxed) < expected
                    && started.elapsed() < Duration::from_secs(30)
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                println!(
                    "{}",
                    json!({"back": counters.back.load(Ordering::Relaxed), "expected": expected,
                           "last_back_us": counters.last_back_us.load(Ordering::Relaxed)})
                );
            }
            command if command.starts_with("pause ") => {
                let ms: u64 = command[6..].trim().parse().unwrap_or(0);
                counters
                    .pause_until_us
                    .store(now_us() + ms * 1_000, Ordering::Relaxed);
                println!("{}", json!({"paused_ms": ms}));
            }
            _ => {}
        }
    }
    ExitCode::SUCCESS
}

/// One simulated browser tab: a user, a token, and where to connect.
struct Link {
    server: SocketAddr,
    source: Ipv4Addr,
    token: String,
    user: u32,
    dialect: Dialect,
}

/// An open stream: SSE read line by line, or a WebSocket whose text messages each hold
/// one SSE frame (split into lines, so both are read by the same loop).
enum Conn {
    Sse(BufReader<TcpStream>),
    Ws {
        socket: Box<WebSocketStream<TcpStream>>,
        lines: VecDeque<String>,
    },
}

impl Conn {
    /// The next `\n`-terminated line into `line`; 0 bytes when the stream ended.
    /// Cancel-safe for the WebSocket (its pending lines stay in `lines`).
    async fn next_line(&mut self, line: &mut String) -> std::io::Result<usize> {
        match self {
            Conn::Sse(reader) => reader.read_line(line).await,
            Conn::Ws { socket, lines } => loop {
                if let Some(next) = lines.pop_front() {
                    line.push_str(&next);
                    return Ok(next.len());
                }
                match socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        lines.extend(text.as_str().split_inclusive('\n').map(str::to_owned))
                    }
                    // Pings are answered by the socket itself.
                    Some(Ok(
                        Message::Ping(_) | Message::Pong(_) | Message::Binary(_) | Message::Frame(_),
                    )) => {}
                    Some(Ok(Message::Close(_))) | None => return Ok(0),
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                }
            },
        }
    }
}

impl Link {
    /// Opens the stream and keeps it open, reconnecting with `Last-Event-ID` when the
    /// server ends it or a storm is called, as `EventSource` does.
    async fn hold(self, counters: Arc<Counters>, gate: Arc<Semaphore>, mut storm: watch::Receiver<u64>) {
        let mut last_id: Option<String> = None;
        let mut first = true;
        let mut permit = gate.acquire_owned().await.ok();
        let mut attempts = 0;
        let mut round = 0;
        loop {
            let opened = self.open(last_id.as_deref(), round).await;
            round += 1;
            drop(permit.take());
            let reader = match opened {
                Ok(reader) => reader,
                Err(_) if first => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) if attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => return,
            };
            attempts = 0;
            counters.open.fetch_add(1, Ordering::Relaxed);
            if first {
                first = false;
                counters.connected.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.back.fetch_add(1, Ordering::Relaxed);
                counters.last_back_us.fetch_max(now_us(), Ordering::Relaxed);
            }
            let stormed = self.read(reader, &counters, &mut last_id, &mut storm).await;
            counters.open.fetch_sub(1, Ordering::Relaxed);
            if !stormed {
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Connects from `--source` on even rounds and from the next second octet on odd
    /// ones: the ports of the streams just closed sit in TIME_WAIT on the client, and
    /// real clients reconnecting are many machines, not one address out of ports.
    async fn open(&self, last_id: Option<&str>, round: u32) -> std::io::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        let source = Ipv4Addr::from(u32::from(self.source) + (round % 2) * (1 << 16));
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
        let connect = socket.connect(self.server);
        let mut stream = tokio::time::timeout(Duration::from_secs(30), connect).await??;
        if self.dialect == Dialect::Ws {
            let resume = last_id.map_or(String::new(), |id| format!("?lastEventId={id}"));
            let mut request = format!("ws://{}{}{resume}", self.server, api::WS_PATH)
                .into_client_request()
                .map_err(std::io::Error::other)?;
            let bearer = format!("Bearer {}", self.token)
                .parse()
                .map_err(std::io::Error::other)?;
            request.headers_mut().insert("authorization", bearer);
            let (socket, _) = tokio_tungstenite::client_async(request, stream)
                .await
                .map_err(std::io::Error::other)?;
            return Ok(Conn::Ws {
                socket: Box::new(socket),
                lines: VecDeque::new(),
            });
        }
        let resume = last_id.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
        let path = match self.dialect {
            Dialect::Nchan => format!("/sub/bench-{}", self.user),
            Dialect::Floor => "/sub".to_string(),
            Dialect::Sse | Dialect::Ws => api::STREAM_PATH.to_string(),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n{resume}\r\n",
            self.token
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reader = BufReader::with_capacity(2048, stream);
        let mut status = String::new();
        reader.read_line(&mut status).await?;
        if !status.contains(" 200 ") {
            return Err(std::io::Error::other(status));
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
                break;
            }
        }
        Ok(Conn::Sse(reader))
    }

    /// Reads frames until the stream ends (false) or a storm is called (true). A frame
    /// counts, and its id becomes the resume point, only once its blank line arrives.
    async fn read(
        &self,
        mut conn: Conn,
        counters: &Counters,
        last_id: &mut Option<String>,
        storm: &mut watch::Receiver<u64>,
    ) -> bool {
        let mut line = String::new();
        let mut frame_id: Option<String> = None;
        let mut frame_bench: Option<(u32, u32)> = None;
        loop {
            // A slow client: every tenth user stops reading while a pause is on.
            if self.user.is_multiple_of(10) {
                let until = counters.pause_until_us.load(Ordering::Relaxed);
                let now = now_us();
                if now < until {
                    tokio::time::sleep(Duration::from_micros(until - now)).await;
                }
            }
            line.clear();
            let read = tokio::select! {
                read = conn.next_line(&mut line) => read,
                changed = storm.changed() => {
                    if changed.is_ok() {
                        return true;
                    }
                    continue;
                }
            };
            match read {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
            if let Some(id) = line.strip_prefix("id: ") {
                frame_id = Some(id.trim_end().to_string());
            } else if line.starts_with("data: ") {
                frame_bench = parse_bench(&line);
            } else if line == "\n" {
                if let Some(id) = frame_id.take() {
                    *last_id = Some(id);
                }
                if let Some((seq, latency)) = frame_bench.take() {
                    counters.seen.lock().unwrap().push([self.user, seq, latency]);
                }
            }
        }
    }
}

/// `..."bench:<sent_us>:<seq>"...` -> (seq, latency in µs).
fn parse_bench(line: &str) -> Option<(u32, u32)> {
    let at = line.find("bench:")?;
    let mut parts = line[at + 6..].split([':', '"', '\n', '\r']);
    let sent: u64 = parts.next()?.parse().ok()?;
    let seq: u32 = parts.next()?.parse().ok()?;
    let latency = now_us().saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
    Some((seq, latency))
}
