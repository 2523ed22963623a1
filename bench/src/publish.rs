//! Publishing load: a keep-alive HTTP publisher and paced targeted batches.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use sse_notify::api;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::{
    cli::{Dialect, PUBLISH_KEY},
    processes::now_us,
};

/// A keep-alive HTTP/1.1 client for `POST /api/events`.
pub(crate) struct Publisher {
    pub(crate) stream: BufReader<TcpStream>,
}

impl Publisher {
    pub(crate) async fn connect(server: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Posts `body` to `POST /api/events`; returns the status.
    pub(crate) async fn post(&mut self, body: &str) -> std::io::Result<u16> {
        self.post_to(api::PUBLISH_PATH, body).await
    }

    /// Posts `body` to `path` (with the publish key, which peers ignore); returns the status.
    pub(crate) async fn post_to(&mut self, path: &str, body: &str) -> std::io::Result<u16> {
        self.send("POST", path, PUBLISH_KEY, body).await
    }

    /// `method path` with `Authorization: Bearer <bearer>` and a JSON `body` (none when
    /// empty); reads the whole answer and returns its status.
    pub(crate) async fn send(
        &mut self,
        method: &str,
        path: &str,
        bearer: &str,
        body: &str,
    ) -> std::io::Result<u16> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut length = 0;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 || line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok(status)
    }
}

/// Paces one publishing lane at `rate` events per second: every 10 ms, the events owed
/// since it started, at most `cap` at once (a lane that fell behind catches up in steps).
pub(crate) struct Pacer {
    rate: f64,
    cap: u64,
    started: Instant,
    sent: u64,
    ticker: tokio::time::Interval,
}

impl Pacer {
    pub(crate) fn new(rate: f64, cap: u64) -> Self {
        Self {
            rate,
            cap,
            started: Instant::now(),
            sent: 0,
            ticker: tokio::time::interval(Duration::from_millis(10)),
        }
    }

    /// Waits for the next tick; the indexes (counted from 0 since the start) of the events
    /// to send now, empty when none is owed yet.
    pub(crate) async fn owed(&mut self) -> std::ops::Range<u64> {
        self.ticker.tick().await;
        let owed = (self.rate * self.started.elapsed().as_secs_f64()) as u64;
        let count = owed.saturating_sub(self.sent).min(self.cap);
        let first = self.sent;
        self.sent += count;
        first..self.sent
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

pub(crate) fn bench_message(sent_us: u64, seq: u32) -> String {
    format!("bench:{sent_us}:{seq}")
}

/// The `POST /api/events` body of one targeted `notification` per `(seq, user)`, titled
/// `title`, each carrying its send time and sequence number.
pub(crate) fn targeted_batch(batch: &[(u32, u32)], sent_us: u64, title: &str) -> String {
    Value::Array(
        batch
            .iter()
            .map(|(seq, user)| {
                json!({"user_id": format!("bench-{user}"), "event": "notification",
                       "data": {"title": title, "message": bench_message(sent_us, *seq)}})
            })
            .collect(),
    )
    .to_string()
}

/// One request of a publishing run: path, body, and the `(seq, user)` of its events.
pub(crate) type PublishRequest = (String, String, Vec<(u32, u32)>);

/// What a publishing run got back.
#[derive(Default)]
pub(crate) struct Published {
    /// seq -> user of every event a server accepted.
    pub(crate) accepted: HashMap<u32, u32>,
    /// Events a server answered with anything but 202.
    pub(crate) refused: usize,
    /// A publisher could not connect or lost its connection.
    pub(crate) failed: bool,
}

impl Published {
    /// What the publishing tasks got back, added up.
    async fn gather(tasks: Vec<tokio::task::JoinHandle<Published>>) -> Self {
        let mut all = Self::default();
        for task in tasks {
            let part = task.await.expect("publisher task");
            all.accepted.extend(part.accepted);
            all.refused += part.refused;
            all.failed |= part.failed;
        }
        all
    }
}

/// Sends targeted `notification`s at `rate` per second for `secs`, round-robin over
/// `users` and over the servers, in 10 ms batches (one request per batch to sse-notify,
/// one per event to nchan, which takes no batches). Each server gets up to `in_flight`
/// requests at once, each on a keep-alive connection of its own, as a backend with a few
/// workers would send them; with 1, a slow answer holds back the next batch (which then
/// grows: events are stamped when their batch is made).
pub(crate) async fn publish_targeted(
    dialect: Dialect,
    servers: Vec<SocketAddr>,
    rate: u64,
    secs: f64,
    users: u32,
    first_seq: u32,
    in_flight: usize,
) -> Published {
    let mut tasks = Vec::new();
    let lanes = servers.len() as u32;
    for (lane, server) in servers.into_iter().enumerate() {
        let lane = lane as u32;
        tasks.push(tokio::spawn(async move {
            // The pacer makes a request only once one of `in_flight` places is free, so events
            // are stamped when they can be sent (with 1, after the previous answer, as a
            // serial publisher does); the sender holding the request frees its place when
            // the answer is in.
            let places = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
            let (requests_tx, requests_rx) = tokio::sync::mpsc::channel::<(
                Vec<PublishRequest>,
                tokio::sync::OwnedSemaphorePermit,
            )>(in_flight.max(1));
            let requests_rx = std::sync::Arc::new(tokio::sync::Mutex::new(requests_rx));
            let mut senders = Vec::new();
            for _ in 0..in_flight.max(1) {
                let requests_rx = requests_rx.clone();
                senders.push(tokio::spawn(async move {
                    let mut out = Published::default();
                    let Ok(mut publisher) = Publisher::connect(server).await else {
                        eprintln!("publisher: cannot connect to {server}");
                        out.failed = true;
                        return out;
                    };
                    loop {
                        let next = requests_rx.lock().await.recv().await;
                        let Some((requests, _place)) = next else {
                            return out;
                        };
                        for (path, body, events) in requests {
                            match publisher.post_to(&path, &body).await {
                                Ok(200..=299) => out.accepted.extend(events),
                                Ok(_) => out.refused += events.len(),
                                Err(e) => {
                                    eprintln!("publisher: lost its connection to {server}: {e}");
                                    out.failed = true;
                                    return out;
                                }
                            }
                        }
                    }
                }));
            }
            let mut pacer = Pacer::new(rate as f64 / f64::from(lanes), 1_000);
            while pacer.elapsed().as_secs_f64() < secs {
                let place = places.clone().acquire_owned().await.expect("never closed");
                let owed = pacer.owed().await;
                if owed.is_empty() {
                    continue;
                }
                let sent_us = now_us();
                let batch: Vec<(u32, u32)> = owed
                    .map(|k| {
                        let seq = first_seq + (k as u32) * lanes + lane;
                        (seq, seq % users)
                    })
                    .collect();
                let requests: Vec<PublishRequest> = if dialect == Dialect::Nchan {
                    batch
                        .iter()
                        .map(|&(seq, user)| {
                            (
                                format!("/pub/bench-{user}"),
                                bench_message(sent_us, seq),
                                vec![(seq, user)],
                            )
                        })
                        .collect()
                } else {
                    let body = targeted_batch(&batch, sent_us, "bench");
                    vec![(api::PUBLISH_PATH.into(), body, batch)]
                };
                if requests_tx.send((requests, place)).await.is_err() {
                    break; // every sender lost its connection
                }
            }
            drop(requests_tx);
            Published::gather(senders).await
        }));
    }
    Published::gather(tasks).await
}
