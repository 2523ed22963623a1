//! Test support shared by `tests/` and the load harness (`bench/`): one launcher of real
//! `redis-server` processes on free ports, so every test and benchmark starts its own and
//! never depends on a server someone left running.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Ports handed out by [`free_port`]: below Linux's ephemeral range (32768-60999), so the
/// kernel never gives one to an outgoing connection or to another `bind(0)` between the
/// moment it is picked and the moment the server binds it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port nothing listens on right now, picked at random in [`TEST_PORTS`] so parallel tests
/// and processes rarely pick the same one; a collision shows as a failed start, which
/// [`RedisServer::start_with`] retries on other ports.
pub fn free_port() -> u16 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // SplitMix64's finaliser spreads nearby seeds over the whole range.
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    for step in 0..span {
        let port = TEST_PORTS.start + ((x + step) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

/// The `sse-notify` binary at `binary`, set up as every test and load run starts it:
/// listening on `addr`, with `secret` for session tokens and `publish_key` for the publish
/// API, connection rate limits off (the tests open many streams from one address), quiet
/// logs, and no `REDIS_URL` from the caller's environment (add one with `.env`).
pub fn server_command(
    binary: impl AsRef<std::ffi::OsStr>,
    addr: SocketAddr,
    secret: &str,
    publish_key: &str,
) -> Command {
    let mut command = Command::new(binary);
    command
        // What cargo-leptos sets when it builds the binary (`cargo test` does not).
        .env("LEPTOS_OUTPUT_NAME", "sse-notify")
        .env("LEPTOS_SITE_ADDR", addr.to_string())
        .env("SSE_JWT_SECRET", secret)
        .env("SSE_PUBLISH_KEY", publish_key)
        .env("SSE_CONNECT_RATE_PER_IP", "0")
        .env("SSE_CONNECT_RATE_PER_USER", "0")
        .env("RUST_LOG", "warn")
        .env_remove("REDIS_URL");
    command
}

/// Whether the `redis-server` answering on `port` is the process `pid` (and not another one
/// that won a race for the port), asked through `INFO server`.
fn answers_as(port: u16, pid: u32) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    let wanted = format!("process_id:{pid}\r\n");
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(read @ 1..) = stream.read(&mut chunk) {
        reply.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&reply);
        if text.contains(&wanted) {
            return true;
        }
        if text.contains("process_id:") && text.contains("\r\nexecutable:") {
            return false;
        }
    }
    false
}

/// Spawns `redis-server` with `args` and waits until it answers on `port` as itself; an
/// error if it exits first (its port was taken) or is not up within 10 s.
fn spawn_redis(args: &[String], port: u16) -> Result<Child, String> {
    let mut child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed (make setup)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server on port {port} exited at start: {status}"));
        }
        if answers_as(port, child.id()) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("redis-server on port {port} did not answer within 10 s"));
        }
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
        Self::start_on_free_ports(|| extra.iter().map(|a| a.to_string()).collect())
    }

    /// Starts one on a free port with the arguments `extra` gives, asked again with each
    /// attempt (so a second port in them can be picked afresh); tries other ports when one
    /// turns out to be taken.
    fn start_on_free_ports(extra: impl Fn() -> Vec<String>) -> Self {
        let mut failures = Vec::new();
        for _attempt in 0..5 {
            let port = free_port();
            let mut args: Vec<String> = ["--port", &port.to_string(), "--bind", "127.0.0.1"]
                .into_iter()
                .map(String::from)
                .collect();
            args.extend(["--save", "", "--appendonly", "no"].map(String::from));
            // A replica's first sync still writes an RDB file: into the temp dir, named
            // by port, never into the working directory (a checkout).
            let temp = std::env::temp_dir();
            args.extend([
                "--dir".to_string(),
                temp.to_str().expect("a UTF-8 temp dir").to_string(),
                "--dbfilename".to_string(),
                format!("sse-notify-redis-{port}.rdb"),
            ]);
            args.extend(extra());
            match spawn_redis(&args, port) {
                Ok(child) => {
                    return Self {
                        port,
                        args,
                        child: Some(child),
                    }
                }
                Err(failure) => failures.push(failure),
            }
        }
        panic!("redis-server did not start: {}", failures.join("; "))
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
        let child = spawn_redis(&self.args, self.port).unwrap_or_else(|failure| panic!("{failure}"));
        self.child = Some(child);
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
            let dir_path = dir.path().to_str().expect("a UTF-8 temp dir").to_owned();
            nodes.push(RedisServer::start_on_free_ports(|| {
                // The bus port defaults to the client port + 10000, which may be taken.
                let bus_port = free_port().to_string();
                [
                    "--cluster-enabled",
                    "yes",
                    "--dir",
                    &dir_path,
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
                ]
                .map(String::from)
                .to_vec()
            }));
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

/// A PostgreSQL server of its own (Debian's `postgresql` package) on a free port, in a
/// temporary data directory, gone on drop. `fsync=off`: a commit survives the server's
/// crash ([`kill`](Self::kill)), not the machine's.
/// Run as root, the server runs as the `postgres` user (it refuses root).
///
/// ```no_run
/// let pg = sse_notify_testkit::PostgresServer::start();
/// let url = pg.database("inbox_tests"); // postgres://postgres@127.0.0.1:<port>/inbox_tests
/// ```
pub struct PostgresServer {
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
    // Dropped after the server is killed.
    dir: TempDir,
}

/// The folder of the newest installed PostgreSQL's programs.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .expect("PostgreSQL is not installed (apt-get install postgresql; scripts/setup.sh does)")
}

/// Whether this process is root (asked once).
fn running_as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

/// `program` with `args`, as the `postgres` user when this process is root.
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    if running_as_root() {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
            .arg(program)
            .args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

impl PostgresServer {
    pub fn start() -> Self {
        let bin = postgres_bin();
        let dir = TempDir::new("sse-postgres");
        let data = dir.path().join("data");
        if running_as_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status();
            assert!(status.is_ok_and(|s| s.success()), "chown of the data folder");
        }
        let data_arg = data.to_str().expect("a UTF-8 temp path");
        let initdb = as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data_arg,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let mut server = Self {
            port: 0,
            bin,
            child: None,
            dir,
        };
        // Another port when one turns out to be taken.
        let mut failures = Vec::new();
        for _attempt in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(failure) => failures.push(failure),
            }
        }
        panic!("postgres did not start: {}", failures.join("; "))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let port = self.port.to_string();
        let socket_dir = self.dir.path().to_str().expect("a UTF-8 temp path").to_string();
        let mut child = as_postgres(
            &self.bin.join("postgres"),
            &[
                "-D",
                data.to_str().expect("a UTF-8 temp path"),
                "-p",
                &port,
                "-k",
                &socket_dir,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("postgres on port {port} exited at start: {status}"));
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("postgres on port {port} was not ready within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A new empty database `name` on this server, and its URL.
    pub fn database(&self, name: &str) -> String {
        let output = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ])
            .output()
            .expect("createdb");
        assert!(
            output.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops it at once (`SIGQUIT`, PostgreSQL's immediate shutdown: no checkpoint, the
    /// server's own children end too): an outage. [`restart`](Self::restart) brings it back
    /// with its data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let quit = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            if !quit.is_ok_and(|s| s.success()) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, after [`kill`](Self::kill), with the data it had.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("postgres restarts");
    }
}

impl Drop for PostgresServer {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// These tests take ports of their own; run one at a time, a port one of them found
    /// free is not taken by the other before it binds it again.
    static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A start on a port someone else holds fails instead of passing off the other
    /// listener (here another `redis-server`) as the new server.
    #[test]
    fn a_taken_port_is_an_error_not_someone_elses_server() {
        let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let other = RedisServer::start();
        let args: Vec<String> = [
            "--port",
            &other.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]
        .map(String::from)
        .to_vec();
        let failure = spawn_redis(&args, other.port).expect_err("started on a taken port");
        assert!(failure.contains("exited at start"), "{failure}");
        assert!(
            answers_as(other.port, other.pid().unwrap()),
            "the other server was disturbed"
        );
    }

    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_bindable() {
        let _ports = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..50 {
            let port = free_port();
            assert!(TEST_PORTS.contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
