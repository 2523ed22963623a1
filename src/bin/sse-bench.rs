//! `sse-bench`: the load harness behind `make bench`.
//!
//! It starts the release server itself (in-process broker, rate limits off), opens N
//! long-lived SSE connections from worker processes (each under the per-process file limit,
//! each on its own source address 127.0.0.x), publishes through `POST /api/events` with the
//! send time in the payload, and reports what arrived and how fast, with the server's RSS and
//! CPU read from `/proc`. Everything stays on loopback and ends by itself.
//!
//! ```text
//! sse-bench [--connections 19000] [--workers 2] [--idle-secs 10] [--json bench.json]
//! sse-bench worker ...   (started by the harness)
//! ```

#[cfg(not(feature = "ssr"))]
fn main() {}

#[cfg(feature = "ssr")]
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    if args.get(1).map(String::as_str) == Some("worker") {
        runtime.block_on(bench::worker(bench::Args::parse(&args[2..])))
    } else {
        runtime.block_on(bench::harness(bench::Args::parse(&args[1..])))
    }
}

#[cfg(feature = "ssr")]
mod bench {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr, SocketAddr},
        process::{ExitCode, Stdio},
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Mutex,
        },
        time::{Duration, Instant, SystemTime, UNIX_EPOCH},
    };

    use serde_json::{json, Value};
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::{TcpSocket, TcpStream},
        process::{Child, Command},
        sync::Semaphore,
    };

    const SECRET: &str = "bench-secret-0123456789abcdef";
    const PUBLISH_KEY: &str = "bench-publish-key";

    /// Command-line options, `--name value` pairs.
    pub struct Args(HashMap<String, String>);

    impl Args {
        pub fn parse(raw: &[String]) -> Self {
            let mut map = HashMap::new();
            let mut it = raw.iter();
            while let Some(key) = it.next() {
                if let Some(name) = key.strip_prefix("--") {
                    map.insert(name.to_string(), it.next().cloned().unwrap_or_default());
                }
            }
            Self(map)
        }
        fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
            self.0.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
        }
        fn text(&self, name: &str, default: &str) -> String {
            self.0.get(name).cloned().unwrap_or_else(|| default.to_string())
        }
    }

    fn now_us() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }

    // ---------------------------------------------------------------- worker

    /// Holds `--connections` streams from `--source`; prints `ready` once they are open, then
    /// answers each `report` line on stdin with the latencies seen so far; exits on EOF.
    pub async fn worker(args: Args) -> ExitCode {
        let server: SocketAddr = args.text("server", "127.0.0.1:3000").parse().expect("--server");
        let source: Ipv4Addr = args.text("source", "127.0.0.1").parse().expect("--source");
        let n: usize = args.get("connections", 100);
        let first_user: usize = args.get("first-user", 0);
        let auth = sse_notify::server::Auth::new(Some(SECRET));
        let connected = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        // (sequence number, latency in µs) of every bench event received.
        let seen = Arc::new(Mutex::new(Vec::<(u32, u32)>::new()));
        let gate = Arc::new(Semaphore::new(256));
        for i in 0..n {
            let token = auth
                .issue(
                    &format!("bench-{}", first_user + i),
                    None,
                    Duration::from_secs(3600),
                )
                .expect("token");
            let (connected, failed, seen, gate) =
                (connected.clone(), failed.clone(), seen.clone(), gate.clone());
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await.ok();
                match open_stream(server, source, &token).await {
                    Ok(reader) => {
                        connected.fetch_add(1, Ordering::Relaxed);
                        drop(permit);
                        read_events(reader, &seen).await;
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let start = Instant::now();
        while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n
            && start.elapsed() < Duration::from_secs(120)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "{}",
            json!({"ready": connected.load(Ordering::Relaxed), "failed": failed.load(Ordering::Relaxed)})
        );
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "report" {
                let seen = seen.lock().unwrap().clone();
                let open = connected.load(Ordering::Relaxed);
                println!("{}", json!({"seen": seen, "open": open}));
            }
        }
        ExitCode::SUCCESS
    }

    async fn open_stream(
        server: SocketAddr,
        source: Ipv4Addr,
        token: &str,
    ) -> std::io::Result<BufReader<TcpStream>> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
        let mut stream = tokio::time::timeout(Duration::from_secs(30), socket.connect(server)).await??;
        let request = format!("GET /api/sse HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n");
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
        Ok(reader)
    }

    /// Reads the (chunked) body line by line; a `data:` line with `"message":"bench:<sent>:<seq>"`
    /// is a bench event.
    async fn read_events(mut reader: BufReader<TcpStream>, seen: &Mutex<Vec<(u32, u32)>>) {
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let Some(at) = line.find("bench:") else { continue };
            let mut parts = line[at + 6..].split([':', '"']);
            let (Some(sent), Some(seq)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(sent), Ok(seq)) = (sent.parse::<u64>(), seq.parse::<u32>()) else {
                continue;
            };
            let latency = now_us().saturating_sub(sent).min(u32::MAX as u64) as u32;
            seen.lock().unwrap().push((seq, latency));
        }
    }

    // ---------------------------------------------------------------- harness

    struct Worker {
        child: Child,
        lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    }

    impl Worker {
        async fn request(&mut self, line: &str) -> Value {
            let stdin = self.child.stdin.as_mut().expect("stdin");
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .expect("worker stdin");
            self.next().await
        }
        async fn next(&mut self) -> Value {
            let line = self
                .lines
                .next_line()
                .await
                .expect("worker stdout")
                .expect("worker exited");
            serde_json::from_str(&line).expect("worker JSON")
        }
    }

    fn proc_figures(pid: u32) -> (u64, f64) {
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

    async fn publish(server: SocketAddr, body: &Value) -> std::io::Result<u16> {
        let body = body.to_string();
        let mut stream = TcpStream::connect(server).await?;
        let request = format!(
            "POST /api/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {PUBLISH_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0))
    }

    fn percentile(sorted: &[u32], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i] as f64 / 1000.0
    }

    fn gzip_size(path: &std::path::Path) -> u64 {
        std::process::Command::new("gzip")
            .args(["-9c"])
            .arg(path)
            .output()
            .map_or(0, |o| o.stdout.len() as u64)
    }

    pub async fn harness(args: Args) -> ExitCode {
        let connections: usize = args.get("connections", 19_000);
        let workers: usize = args.get("workers", 2).max(1);
        let idle_secs: u64 = args.get("idle-secs", 10);
        let binary = args.text("server-bin", "target/release/sse-notify");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut results = serde_json::Map::new();

        // S5 needs no server: the release bundle on disk.
        let pkg = std::path::Path::new("target/site/pkg");
        let bundle: u64 = ["sse-notify.wasm", "sse-notify.js", "sse-notify.css"]
            .iter()
            .map(|f| gzip_size(&pkg.join(f)))
            .sum();
        results.insert("s5_bundle_gzip_kib".into(), json!(bundle as f64 / 1024.0));

        eprintln!("starting {binary} on {server}");
        let mut server_proc = Command::new(&binary)
            .env("LEPTOS_SITE_ADDR", server.to_string())
            .env("SSE_JWT_SECRET", SECRET)
            .env("SSE_PUBLISH_KEY", PUBLISH_KEY)
            .env("SSE_CONNECT_RATE_PER_IP", "0")
            .env("SSE_CONNECT_RATE_PER_USER", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("server binary (make build first)");
        let pid = server_proc.id().expect("server pid");
        for _ in 0..200 {
            if TcpStream::connect(server).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (rss_before, _) = proc_figures(pid);

        // S1: open and hold the connections.
        let exe = std::env::current_exe().expect("own path");
        let per_worker = connections.div_ceil(workers);
        let opened_at = Instant::now();
        let mut pool = Vec::new();
        for w in 0..workers {
            let n = per_worker.min(connections - w * per_worker);
            let mut child = Command::new(&exe)
                .args([
                    "worker",
                    "--server",
                    &server.to_string(),
                    "--source",
                    &format!("127.0.0.{}", 2 + w),
                ])
                .args([
                    "--connections",
                    &n.to_string(),
                    "--first-user",
                    &(w * per_worker).to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("worker");
            let lines = BufReader::new(child.stdout.take().unwrap()).lines();
            pool.push(Worker { child, lines });
        }
        let mut held = 0;
        for worker in &mut pool {
            let ready = worker.next().await;
            held += ready["ready"].as_u64().unwrap_or(0) as usize;
        }
        let open_secs = opened_at.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss_held, cpu_before_idle) = proc_figures(pid);
        tokio::time::sleep(Duration::from_secs(idle_secs)).await;
        let (_, cpu_after_idle) = proc_figures(pid);
        let per_conn_kib = (rss_held.saturating_sub(rss_before)) as f64 / held.max(1) as f64;
        let idle_cpu_pct = (cpu_after_idle - cpu_before_idle) / idle_secs as f64 * 100.0;
        results.insert("s1_connections_requested".into(), json!(connections));
        results.insert("s1_connections_held".into(), json!(held));
        results.insert("s1_open_seconds".into(), json!(open_secs));
        results.insert("s1_rss_before_kib".into(), json!(rss_before));
        results.insert("s1_rss_held_kib".into(), json!(rss_held));
        results.insert("s1_rss_per_connection_kib".into(), json!(per_conn_kib));
        results.insert("s1_idle_cpu_percent_of_a_core".into(), json!(idle_cpu_pct));

        // S2: one broadcast to everyone, publish-to-receive latency.
        let (_, cpu_before) = proc_figures(pid);
        let sent = now_us();
        let status = publish(
            server,
            &json!({"broadcast": true, "event": "system_alert", "data": {"message": format!("bench:{sent}:1")}}),
        )
        .await
        .unwrap_or(0);
        let mut latencies = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            latencies.clear();
            for worker in &mut pool {
                let report = worker.request("report").await;
                for pair in report["seen"].as_array().into_iter().flatten() {
                    latencies.push(pair[1].as_u64().unwrap_or(0) as u32);
                }
            }
            if latencies.len() >= held || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (rss_after, cpu_after) = proc_figures(pid);
        latencies.sort_unstable();
        let received = latencies.len();
        results.insert("s2_publish_status".into(), json!(status));
        results.insert("s2_expected".into(), json!(held));
        results.insert("s2_received".into(), json!(received));
        results.insert("s2_lost".into(), json!(held.saturating_sub(received)));
        results.insert("s2_duplicated".into(), json!(received.saturating_sub(held)));
        results.insert("s2_p50_ms".into(), json!(percentile(&latencies, 0.50)));
        results.insert("s2_p99_ms".into(), json!(percentile(&latencies, 0.99)));
        results.insert("s2_p999_ms".into(), json!(percentile(&latencies, 0.999)));
        results.insert("s2_max_ms".into(), json!(percentile(&latencies, 1.0)));
        results.insert(
            "s2_server_cpu_s_per_million_deliveries".into(),
            json!((cpu_after - cpu_before) / received.max(1) as f64 * 1e6),
        );
        results.insert("server_rss_after_kib".into(), json!(rss_after));

        for mut worker in pool {
            drop(worker.child.stdin.take());
            let _ = worker.child.wait().await;
        }
        let _ = server_proc.kill().await;

        let report = Value::Object(results);
        println!("{:<42} value", "figure");
        for (k, v) in report.as_object().unwrap() {
            let shown = v.as_f64().map_or_else(
                || v.to_string(),
                |f| {
                    if f.fract() == 0.0 {
                        format!("{f}")
                    } else {
                        format!("{f:.2}")
                    }
                },
            );
            println!("{k:<42} {shown}");
        }
        if let Some(path) = args.0.get("json") {
            std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).expect("write --json");
        }
        let ok = held == connections && received == held;
        if ok {
            ExitCode::SUCCESS
        } else {
            eprintln!("not every connection was held or reached");
            ExitCode::FAILURE
        }
    }
}
