//! Test support shared by `tests/` and the load harness (`bench/`): one launcher of real
//! `redis-server` processes on free ports, so every test and benchmark starts its own and
//! never depends on a server someone left running.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A port nothing listens on right now (the OS picks it; a race with another process is
/// possible but rare, and shows as a failed start).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Blocks until something accepts TCP connections on `addr`; panics after `within`.
pub fn wait_listening(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` of its own on a free port, without persistence, killed on drop.
///
/// ```no_run
/// let mut redis = sse_notify_testkit::RedisServer::start();
/// let url = redis.url(); // redis://127.0.0.1:<port>
/// redis.kill();          // an outage
/// redis.restart();       // back, empty, on the same port
/// ```
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one with the defaults: loopback, no RDB or AOF.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with extra `redis-server` arguments (e.g. `["--maxclients", "10000"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(["--save", "", "--appendonly", "no"].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut server = Self {
            port,
            args,
            child: None,
        };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id, for CPU and memory figures; `None` while it is down.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts it again (after [`kill`](Self::kill)) on the same port, with no data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make setup)");
        self.child = Some(child);
        wait_listening(([127, 0, 0, 1], self.port).into(), Duration::from_secs(10));
    }

    /// Kills it at once, as in an outage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of its own: `masters` primaries with `replicas` replicas each, every
/// node a [`RedisServer`] on free ports (client and cluster bus), joined with
/// `redis-cli --cluster create`; killed and removed on drop.
///
/// ```no_run
/// let mut cluster = sse_notify_testkit::RedisCluster::start(3, 1);
/// let seeds = cluster.urls(); // redis://127.0.0.1:<port>,redis://127.0.0.1:<port>,...
/// cluster.nodes[0].kill();   // a primary lost; its replica takes over
/// ```
pub struct RedisCluster {
    /// The primaries first, in creation order, then their replicas.
    pub nodes: Vec<RedisServer>,
    _dirs: Vec<TempDir>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node reports
    /// `cluster_state:ok`; panics after 30 s.
    pub fn start(masters: usize, replicas: usize) -> Self {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs 3 primaries or more"
        );
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let dir = TempDir::new("redis-cluster-node");
            // The bus port defaults to the client port + 10000, which may be taken.
            let bus_port = free_port().to_string();
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--dir",
                dir.path().to_str().expect("a UTF-8 temp dir"),
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-port",
                &bus_port,
                "--cluster-node-timeout",
                "2000",
                // A replica takes over however long ago it last heard from its primary
                // (tests kill primaries moments after the cluster forms).
                "--cluster-replica-validity-factor",
                "0",
            ]));
            dirs.push(dir);
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        create.args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let output = create
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed (make setup)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self { nodes, _dirs: dirs };
        cluster.wait_ok(Duration::from_secs(30));
        cluster
    }

    /// Every live node's address as a seed list: `redis://127.0.0.1:<port>,...`.
    pub fn urls(&self) -> String {
        let live = self.nodes.iter().filter(|n| n.pid().is_some());
        live.map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    /// Blocks until every live node reports `cluster_state:ok` and every live replica is
    /// in sync with its primary; panics after `within`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let ask = |port: u16, args: &[&str]| {
            Command::new("redis-cli")
                .arg("-p")
                .arg(port.to_string())
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for node in self.nodes.iter().filter(|n| n.pid().is_some()) {
            loop {
                let state = ask(node.port, &["cluster", "info"]);
                let replication = ask(node.port, &["info", "replication"]);
                let has = |text: &str, line: &str| text.lines().any(|l| l.trim() == line);
                let synced = has(&replication, "role:master") || has(&replication, "master_link_status:up");
                if has(&state, "cluster_state:ok") && synced {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} not ready: {state}{replication}",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
