//! Prometheus metrics through the `metrics` crate, rendered at `GET /metrics`.
//!
//! The recorder is process-wide (one per process, however many services run in it), so
//! tests that start several servers in one process share it; per-service figures are in
//! `/api/stats`.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
};

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::events::names;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once; later calls return the same handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Fails only when the host app installed its own recorder first; ours then renders
        // nothing, and theirs collects the same metrics.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only this crate's own recorder"
            );
        }
        handle
    })
}

/// The label of an event name: built-in names as they are, any custom name as `custom`,
/// so publishers cannot grow the number of series without bound.
fn label(name: &str) -> &'static str {
    names::BUILT_IN
        .iter()
        .chain(names::CONTROL.iter())
        .find(|n| **n == name)
        .copied()
        .unwrap_or("custom")
}

/// Open connections moved by `delta`; the gauge sums every service in the process.
pub fn connections_changed(delta: isize) {
    if delta != 0 {
        gauge!("sse_connections").increment(delta as f64);
    }
}

pub fn event_published(name: &str) {
    counter!("sse_events_published_total", "event" => label(name)).increment(1);
}

pub fn event_delivered(name: &str, connections: u64) {
    if connections > 0 {
        counter!("sse_events_delivered_total", "event" => label(name)).increment(connections);
    }
}

pub fn event_failed(name: &str, reason: &'static str) {
    counter!("sse_events_failed_total", "event" => label(name), "reason" => reason).increment(1);
}

pub fn slow_client_disconnected() {
    counter!("sse_slow_client_disconnects_total").increment(1);
}

/// A stream opened with a replay (its first page): `events` sent, `gap` if it got `resync`.
pub fn replayed(events: usize, gap: bool) {
    counter!("sse_replays_total").increment(1);
    replayed_more(events);
    if gap {
        counter!("sse_resyncs_total").increment(1);
    }
}

/// A later page of a replay: counts its events, not another replay.
pub fn replayed_more(events: usize) {
    counter!("sse_replayed_events_total").increment(events as u64);
}

/// Every reason a connection may be refused for, as `sse_connections_refused_total` labels it.
pub const REFUSAL_REASONS: [&str; 9] = [
    "unauthorized",
    "auth_unavailable",
    "rate_limited",
    "max_connections",
    "head_timeout",
    "socket_limit",
    "pending_per_address",
    "connections_per_address",
    "origin",
];

/// The refusals by reason, kept beside the Prometheus counter for `/api/stats` (which
/// cannot read the recorder back).
static REFUSED: [AtomicU64; REFUSAL_REASONS.len()] = [const { AtomicU64::new(0) }; REFUSAL_REASONS.len()];

pub fn connection_refused(reason: &'static str) {
    counter!("sse_connections_refused_total", "reason" => reason).increment(1);
    if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
        REFUSED[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Connections refused by this process so far, by reason (every reason, zeros too).
pub fn refusals() -> BTreeMap<String, u64> {
    REFUSAL_REASONS
        .iter()
        .zip(&REFUSED)
        .map(|(reason, n)| (reason.to_string(), n.load(Ordering::Relaxed)))
        .collect()
}

pub fn broker_healthy(healthy: bool) {
    gauge!("sse_broker_healthy").set(if healthy { 1.0 } else { 0.0 });
}

/// A client found its event stream held back by something in between (a buffering proxy)
/// and came over WebSocket instead.
pub fn buffered_client() {
    counter!("sse_buffered_clients_total").increment(1);
}
