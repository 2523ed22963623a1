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
