//! The processes a run starts and measures: sse-notify instances (on the in-process broker,
//! one Redis or a Redis Cluster), the peers (nchan, the floor), and the worker processes
//! that hold the connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

use sse_notify_testkit::{free_port, RedisCluster, RedisServer};

use crate::{
    cli::{Dialect, PUBLISH_KEY, SECRET, SOURCES_PER_WORKER},
    report::{audit, AUDIT_GRACE},
};

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// [`sse_notify_testkit::wait_listening`], off the runtime's threads.
pub(crate) async fn wait_listening(addr: SocketAddr) {
    tokio::task::spawn_blocking(move || sse_notify_testkit::wait_listening(addr, Duration::from_secs(20)))
        .await
        .expect("waiting for a listener");
}

/// RSS in KiB and CPU seconds (user + system) of one process, from `/proc`.
pub(crate) fn proc_figures(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (rss_kib, ticks / 100.0)
}

/// [`proc_figures`] summed over `pid` and its children (nginx's master and workers).
pub(crate) fn proc_tree_figures(pid: u32) -> (u64, f64) {
    let children = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let parent = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1));
            parent.and_then(|p| p.parse::<u32>().ok()) == Some(pid)
        });
    std::iter::once(pid)
        .chain(children)
        .map(proc_figures)
        .fold((0, 0.0), |(r, c), (r2, c2)| (r + r2, c + c2))
}

/// Servers under load: where they listen, and their summed RSS (KiB) and CPU seconds.
pub(crate) trait Subject {
    fn addrs(&self) -> Vec<SocketAddr>;
    fn figures(&self) -> (u64, f64);
}

impl Subject for Cluster {
    fn addrs(&self) -> Vec<SocketAddr> {
        Cluster::addrs(self)
    }
    fn figures(&self) -> (u64, f64) {
        Cluster::figures(self)
    }
}

/// A peer server from `--peers`, started for one comparison and stopped after it.
pub(crate) struct Peer {
    pub(crate) dialect: Dialect,
    pub(crate) addr: SocketAddr,
    pub(crate) pid: u32,
    /// The floor runs as our child; nchan daemonizes under its own scripts.
    pub(crate) child: Option<Child>,
    pub(crate) dir: std::path::PathBuf,
}

impl Peer {
    /// Starts `dialect`'s peer on a free port (nchan with its store on a `redis-server` of
    /// its own when `on_redis`); `None` (with the reason printed) when it cannot run here.
    pub(crate) async fn start(dialect: Dialect, dir: &std::path::Path, on_redis: bool) -> Option<Self> {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let (pid, child) = match dialect {
            Dialect::Nchan => {
                let started = std::process::Command::new("bash")
                    .arg(dir.join("nchan/start.sh"))
                    .args([
                        port.to_string().as_str(),
                        if on_redis { "redis" } else { "memory" },
                    ])
                    .stdout(Stdio::null())
                    .status();
                if !matches!(started, Ok(s) if s.success()) {
                    eprintln!("nchan: could not start (apt-get install nginx libnginx-mod-nchan); skipped");
                    return None;
                }
                let pid = std::fs::read_to_string(format!("/tmp/sse-nchan-{port}/nginx.pid")).ok()?;
                (pid.trim().parse().ok()?, None)
            }
            Dialect::Floor => {
                let Ok(child) = Command::new("target/floor/release/floor")
                    .arg(port.to_string())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                else {
                    eprintln!("floor: target/floor/release/floor is missing (make bench builds it); skipped");
                    return None;
                };
                (child.id()?, Some(child))
            }
            Dialect::Sse | Dialect::Ws => unreachable!("sse-notify is not a peer"),
        };
        wait_listening(addr).await;
        Some(Self {
            dialect,
            addr,
            pid,
            child,
            dir: dir.to_path_buf(),
        })
    }

    pub(crate) async fn stop(mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill().await;
        }
        if self.dialect == Dialect::Nchan {
            let _ = std::process::Command::new("bash")
                .arg(self.dir.join("nchan/stop.sh"))
                .arg(self.addr.port().to_string())
                .stdout(Stdio::null())
                .status();
        }
    }
}

impl Subject for Peer {
    fn addrs(&self) -> Vec<SocketAddr> {
        vec![self.addr]
    }
    fn figures(&self) -> (u64, f64) {
        proc_tree_figures(self.pid)
    }
}

/// Server instances on free ports, all on the same broker.
pub(crate) struct Cluster {
    pub(crate) servers: Vec<(Child, u32, SocketAddr)>,
    pub(crate) binary: String,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) redis: Option<RedisServer>,
    /// A Redis Cluster instead of `redis` (S6).
    pub(crate) redis_cluster: Option<RedisCluster>,
}

impl Cluster {
    pub(crate) async fn start(binary: &str, instances: usize, with_redis: bool) -> Self {
        let redis = with_redis.then(|| RedisServer::start_with(&["--maxclients", "10000"]));
        Self::start_on(binary, instances, redis, &[]).await
    }

    /// `instances` servers with `env` added, on `redis` (or the in-process broker).
    pub(crate) async fn start_on(
        binary: &str,
        instances: usize,
        redis: Option<RedisServer>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut cluster = Self {
            servers: Vec::new(),
            binary: binary.to_string(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            redis,
            redis_cluster: None,
        };
        cluster.spawn_all(instances).await;
        cluster
    }

    /// `instances` servers on a Redis Cluster of 3 primaries with a replica each.
    pub(crate) async fn start_on_redis_cluster(binary: &str, instances: usize) -> Self {
        let redis_cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 1))
            .await
            .expect("redis cluster");
        let mut cluster = Self {
            servers: Vec::new(),
            binary: binary.to_string(),
            env: vec![("SSE_REDIS_CLUSTER".into(), "1".into())],
            redis: None,
            redis_cluster: Some(redis_cluster),
        };
        cluster.spawn_all(instances).await;
        cluster
    }

    /// Starts `instances` servers on free ports and waits until they listen.
    pub(crate) async fn spawn_all(&mut self, instances: usize) {
        for _ in 0..instances {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let child = self.spawn(addr);
            let pid = child.id().expect("server pid");
            self.servers.push((child, pid, addr));
        }
        for (_, _, addr) in &self.servers {
            wait_listening(*addr).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    pub(crate) fn spawn(&self, addr: SocketAddr) -> Child {
        let mut command = Command::from(sse_notify_testkit::server_command(
            &self.binary,
            addr,
            SECRET,
            PUBLISH_KEY,
        ));
        command
            // The default cap leaves 1,024 of the file limit (20,000 here) for other files;
            // the bench holds 19,000 streams and nothing else.
            .env("SSE_MAX_CONNECTIONS", "19500")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(if std::env::var_os("SSE_BENCH_DEBUG_LOST").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true);
        if let Some(redis) = &self.redis {
            command.env("REDIS_URL", redis.url());
        }
        if let Some(redis_cluster) = &self.redis_cluster {
            command.env("REDIS_URL", redis_cluster.urls());
        }
        command.spawn().expect("server binary (make build first)")
    }

    /// The Redis the instances share.
    pub(crate) fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("a cluster on Redis")
    }

    /// Kills instance `index` (`SIGKILL`, as a crash) and starts it again on its port.
    pub(crate) async fn crash_and_restart(&mut self, index: usize) {
        let addr = self.servers[index].2;
        let _ = self.servers[index].0.kill().await;
        let child = self.spawn(addr);
        let pid = child.id().expect("server pid");
        self.servers[index] = (child, pid, addr);
        wait_listening(addr).await;
    }

    pub(crate) fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.2).collect()
    }

    /// CPU seconds of each Redis primary so far (one for a lone Redis).
    pub(crate) fn redis_cpu(&self) -> Vec<f64> {
        let primaries: Vec<&RedisServer> = match (&self.redis, &self.redis_cluster) {
            (Some(redis), _) => vec![redis],
            (None, Some(cluster)) => cluster.nodes[..3].iter().collect(),
            (None, None) => Vec::new(),
        };
        primaries
            .iter()
            .filter_map(|r| r.pid())
            .map(|pid| proc_figures(pid).1)
            .collect()
    }

    /// Summed RSS (KiB) and CPU seconds of every instance.
    pub(crate) fn figures(&self) -> (u64, f64) {
        self.servers
            .iter()
            .map(|s| proc_figures(s.1))
            .fold((0, 0.0), |(r, c), (r2, c2)| (r + r2, c + c2))
    }

    pub(crate) async fn stop(mut self) {
        for (child, _, _) in &mut self.servers {
            let _ = child.kill().await;
        }
        drop(self.redis.take());
        drop(self.redis_cluster.take());
    }
}

/// One worker process and its JSON-lines conversation.
pub(crate) struct Worker {
    pub(crate) child: Child,
    pub(crate) lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    pub(crate) async fn send(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("worker stdin");
    }
    pub(crate) async fn next(&mut self) -> Value {
        let line = self
            .lines
            .next_line()
            .await
            .expect("worker stdout")
            .expect("worker exited");
        serde_json::from_str(&line).expect("worker JSON")
    }
}

/// Worker processes holding connections; user `i` is `bench-<i>`, one connection each.
pub(crate) struct Pool {
    pub(crate) workers: Vec<Worker>,
    pub(crate) held: usize,
    pub(crate) open_secs: f64,
}

/// One worker's share: which server, from which source address, which users.
pub(crate) struct Share {
    pub(crate) dialect: Dialect,
    pub(crate) server: SocketAddr,
    pub(crate) source: String,
    /// Source addresses, from `source` on.
    pub(crate) sources: usize,
    pub(crate) connections: usize,
    pub(crate) first_user: usize,
}

impl Pool {
    /// Spreads `connections` users over the servers, at most `per_worker` per process.
    ///
    /// Each worker gets 32 source addresses, 127.<2 x phase>.<run>.<2 + 32 x worker + k>,
    /// about 300 connections each, like clients behind NATs: the kernel's search for a free port when binding gets slow with thousands of
    /// sockets on one address (perf: S1x spent its 97 s opening in `inet_bhash2_conflict`
    /// in the clients), and a closed socket holds its port in TIME_WAIT for 60 s, so no
    /// phase or run reuses another's addresses (a reconnect storm moves to the next
    /// second octet).
    pub(crate) fn plan(
        servers: &[SocketAddr],
        connections: usize,
        per_worker: usize,
        phase: u8,
        dialect: Dialect,
    ) -> Vec<Share> {
        let run = (now_us() / 1_000_000 % 250) as u8 + 1;
        let workers = connections.div_ceil(per_worker).max(servers.len()).max(1);
        let each = connections.div_ceil(workers);
        (0..workers)
            .map(|w| Share {
                dialect,
                server: servers[w % servers.len()],
                source: format!("127.{}.{run}.{}", 2 * phase, 2 + SOURCES_PER_WORKER * w),
                sources: SOURCES_PER_WORKER,
                connections: each.min(connections.saturating_sub(w * each)),
                first_user: w * each,
            })
            .filter(|s| s.connections > 0)
            .collect()
    }

    pub(crate) async fn open(shares: &[Share]) -> Self {
        let exe = std::env::current_exe().expect("own path");
        let started = Instant::now();
        let mut workers = Vec::new();
        for share in shares {
            let mut child = Command::new(&exe)
                .args(["worker", "--server", &share.server.to_string()])
                .args(["--source", &share.source])
                .args(["--connections", &share.connections.to_string()])
                .args(["--first-user", &share.first_user.to_string()])
                .args(["--dialect", share.dialect.name()])
                .args(["--sources", &share.sources.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("worker");
            let lines = BufReader::new(child.stdout.take().unwrap()).lines();
            workers.push(Worker { child, lines });
        }
        let mut held = 0;
        for worker in &mut workers {
            held += worker.next().await["ready"].as_u64().unwrap_or(0) as usize;
        }
        Self {
            workers,
            held,
            open_secs: started.elapsed().as_secs_f64(),
        }
    }

    /// Sends one command to every worker at once and collects the answers.
    pub(crate) async fn ask(&mut self, command: &str) -> Vec<Value> {
        for worker in &mut self.workers {
            worker.send(command).await;
        }
        let mut answers = Vec::new();
        for worker in &mut self.workers {
            answers.push(worker.next().await);
        }
        answers
    }

    /// Every `[user, seq, latency_us]` the workers saw since the last `clear`.
    pub(crate) async fn seen(&mut self) -> Vec<[u32; 3]> {
        let mut all = Vec::new();
        for answer in self.ask("report").await {
            if let Ok(mut part) = serde_json::from_value::<Vec<[u32; 3]>>(answer["seen"].clone()) {
                all.append(&mut part);
            }
        }
        all
    }

    /// Polls the workers until every event in `expected` (seq -> user) has arrived or
    /// `wait` is over, then keeps listening for [`AUDIT_GRACE`] so late duplicates and
    /// wrong-user deliveries count too; returns what was seen and its audit (lost,
    /// duplicated, wrong user).
    pub(crate) async fn settle(
        &mut self,
        expected: &HashMap<u32, u32>,
        wait: Duration,
        poll: Duration,
    ) -> (Vec<[u32; 3]>, (usize, usize, usize)) {
        let deadline = Instant::now() + wait;
        while audit(&self.seen().await, expected).0 > 0 && Instant::now() < deadline {
            tokio::time::sleep(poll).await;
        }
        tokio::time::sleep(AUDIT_GRACE).await;
        let seen = self.seen().await;
        let audit = audit(&seen, expected);
        (seen, audit)
    }

    /// Streams the server ended that the workers opened again, so far.
    pub(crate) async fn reconnects(&mut self) -> u64 {
        self.ask("report")
            .await
            .iter()
            .map(|a| a["reconnects"].as_u64().unwrap_or(0))
            .sum()
    }

    pub(crate) async fn close(self) {
        for mut worker in self.workers {
            drop(worker.child.stdin.take());
            let _ = worker.child.wait().await;
        }
    }
}
