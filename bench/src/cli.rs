//! The command line: scenarios, sizes and peers for the harness, and a worker's arguments.

use std::net::SocketAddr;

use serde_json::json;
use sse_notify::api;

pub const SECRET: &str = "bench-secret-0123456789abcdef";
pub(crate) const PUBLISH_KEY: &str = "bench-publish-key";

/// Source addresses per worker process (see `Pool::plan`).
pub const SOURCES_PER_WORKER: usize = 32;

/// The load harness behind `make bench`.
#[derive(clap::Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Sub>,
    #[command(flatten)]
    pub args: Args,
}

#[derive(clap::Subcommand)]
pub enum Sub {
    /// A worker process holding connections (started by the harness itself).
    Worker(WorkerArgs),
    /// The fault-injection run behind `make soak`.
    Soak(crate::soak::SoakArgs),
}

/// Which scenarios to run, and at what size.
#[derive(clap::Args)]
pub struct Args {
    /// Comma-separated scenarios: s1, s2, s4 (one instance), s1x, s2x (several on Redis),
    /// s3 (targeted via Redis), s5 (bundle), s6 (several on a Redis Cluster: targeted at
    /// the S3 rate to `--cluster-connections` users, then a broadcast), s4n (the S4 storm
    /// with every client behind 4 addresses), s4r (the S4 storm on Redis), s7 (the inbox's
    /// store under load, on SQLite and PostgreSQL), s8 (Redis memory per active uploader).
    /// s4n and s4r run beside nchan when `--compare` has it.
    #[arg(
        long,
        default_value = "s1,s2,s4,s4n,s4r,s1x,s2x,s3,s5,s6,s7,s8",
        value_delimiter = ','
    )]
    pub scenarios: Vec<String>,
    /// What else S1/S2 (and S4 where it applies) run against, side by side with sse-notify
    /// over SSE, in the same run: `ws` (sse-notify over WebSocket), `nchan` (nginx + nchan,
    /// in-memory store), `floor` (the least an SSE broadcast can cost). `none` for none.
    #[arg(long, default_value = "ws,nchan,floor", value_delimiter = ',')]
    pub compare: Vec<String>,
    /// Where the peers live (nchan's start/stop scripts; the floor's binary is
    /// `target/floor/release/floor`, which `make bench` builds).
    #[arg(long, default_value = "../shared/peers")]
    pub peers: std::path::PathBuf,
    /// Connections held by the one instance of S1, S2 and S4.
    #[arg(long, default_value_t = 19_000)]
    pub connections: usize,
    /// Connections held by the instances of S1x, S2x and S6.
    #[arg(long, default_value_t = 100_000)]
    pub cluster_connections: usize,
    /// Instances of S1x, S2x and S6.
    #[arg(long, default_value_t = 6)]
    pub instances: usize,
    /// Seconds of idling over which S1 measures CPU (and during which nothing may reconnect).
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    /// Users (one connection each) of S3.
    #[arg(long, default_value_t = 20_000)]
    pub s3_users: usize,
    /// Targeted events per second of S3.
    #[arg(long, default_value_t = 20_000)]
    pub s3_rate: u64,
    /// Seconds S3 publishes for.
    #[arg(long, default_value_t = 30.0)]
    pub s3_secs: f64,
    /// Requests each instance gets at once in S3, S6 and S7's S3 (a backend with several
    /// workers); the storms always publish one at a time.
    #[arg(long, default_value_t = 1)]
    pub publish_in_flight: usize,
    /// Targeted events per second during the S4 storm.
    #[arg(long, default_value_t = 1_000)]
    pub s4_rate: u64,
    /// Where to write the figures as JSON.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// The server binary (build it with `cargo leptos build --release`).
    #[arg(long, default_value = "target/release/sse-notify")]
    pub server_bin: String,
}

impl Args {
    pub(crate) fn runs(&self, scenario: &str) -> bool {
        self.scenarios
            .iter()
            .any(|s| s.trim().eq_ignore_ascii_case(scenario))
    }
    pub(crate) fn compares(&self, dialect: Dialect) -> bool {
        self.compare
            .iter()
            .any(|s| s.trim().eq_ignore_ascii_case(dialect.name()))
    }
}

/// What the load is pointed at, and how a client speaks to it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Dialect {
    /// sse-notify's `GET /api/sse`, publishing through `POST /api/events`.
    Sse,
    /// sse-notify's `GET /api/ws`: the same stream over WebSocket.
    Ws,
    /// nginx + nchan: `GET /sub/<user>`, `POST /pub/<user>`, `POST /pub-all`.
    Nchan,
    /// The floor server: any `GET` subscribes, any `POST` broadcasts its body.
    Floor,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sse => "sse",
            Dialect::Ws => "ws",
            Dialect::Nchan => "nchan",
            Dialect::Floor => "floor",
        }
    }
    /// Figures of this subject are named `<scenario><suffix>_...`.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Dialect::Sse => "",
            Dialect::Ws => "_ws",
            Dialect::Nchan => "_nchan",
            Dialect::Floor => "_floor",
        }
    }
    /// The request that broadcasts `message`: path and body.
    pub(crate) fn broadcast(self, message: &str) -> (&'static str, String) {
        match self {
            Dialect::Sse | Dialect::Ws => (
                api::PUBLISH_PATH,
                json!({"broadcast": true, "event": "system_alert", "data": {"message": message}}).to_string(),
            ),
            Dialect::Nchan => ("/pub-all", message.to_string()),
            Dialect::Floor => ("/pub", message.to_string()),
        }
    }
}

/// What one worker holds.
#[derive(clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub server: SocketAddr,
    /// The first of its source addresses.
    #[arg(long)]
    pub source: std::net::Ipv4Addr,
    #[arg(long)]
    pub connections: usize,
    /// User `i` is `bench-<first_user + i>`.
    #[arg(long)]
    pub first_user: usize,
    #[arg(long, value_enum, default_value_t = Dialect::Sse)]
    pub dialect: Dialect,
    /// How many source addresses its connections come from.
    #[arg(long, default_value_t = SOURCES_PER_WORKER)]
    pub sources: usize,
}
