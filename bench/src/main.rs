//! `sse-bench`: the load harness behind `make bench`.
//!
//! It starts the release server itself (rate limits off; the in-process broker, or several
//! instances on a `redis-server` it starts on a free port), opens long-lived SSE connections
//! from worker processes (each under the per-process file limit, each on its own source
//! address 127.0.0.x), publishes through `POST /api/events` with the send time in the payload,
//! and reports what arrived and how fast, with the servers' RSS and CPU read from `/proc`.
//! Everything stays on loopback and ends by itself.
//!
//! Scenarios: `s1` hold connections, `s2` one broadcast, `s4` reconnect storm (on one
//! instance, in-process broker); `s1x`/`s2x` the same at cluster scale on Redis; `s3`
//! targeted events through Redis at a steady rate; `s5` the release bundle size.
//! `sse-bench --help` lists every option; `sse-bench soak` is the fault-injection run
//! behind `make soak` (see `soak.rs`).
//!
//! The exit status is non-zero when an event was lost, duplicated or delivered to the wrong
//! user, a publisher could not publish, or a connection could not be held; a missed speed
//! target only shows in the table.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.command {
        Some(cli::Sub::Worker(args)) => runtime.block_on(worker::run(args)),
        Some(cli::Sub::Soak(args)) => runtime.block_on(soak::soak(args)),
        None => runtime.block_on(harness::harness(cli.args)),
    }
}

mod cli;
mod harness;
mod inbox;
mod processes;
mod publish;
mod report;
mod soak;
mod worker;
