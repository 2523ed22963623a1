//! The figures: what arrived (the audit), latencies, and the printed and JSON report.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use serde_json::{json, Map, Value};

/// The report: ordered figures plus a verdict per target.
#[derive(Default)]
pub(crate) struct Report {
    pub(crate) figures: Map<String, Value>,
    pub(crate) targets: Vec<(String, String, String, bool)>,
    pub(crate) correct: bool,
}

impl Report {
    pub(crate) fn put(&mut self, key: &str, value: Value) {
        self.figures.insert(key.to_string(), value);
    }
    /// A figure, or NaN when it was not measured.
    pub(crate) fn get(&self, key: &str) -> f64 {
        self.figures.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
    }
    pub(crate) fn target(&mut self, scenario: &str, target: &str, measured: String, met: bool) {
        self.targets.push((scenario.into(), target.into(), measured, met));
    }
    /// Prints the figures and the target table.
    pub(crate) fn print(&self) {
        println!("{:<50} value", "figure");
        for (k, v) in &self.figures {
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
            println!("{k:<50} {shown}");
        }
        if self.targets.is_empty() {
            return;
        }
        println!();
        println!("{:<5} {:<4} {:<66} measured", "", "met", "target");
        for (scenario, target, measured, met) in &self.targets {
            println!(
                "{scenario:<5} {:<4} {target:<66} {measured}",
                if *met { "yes" } else { "no" }
            );
        }
    }

    /// Writes the figures and targets as JSON to `path`.
    pub(crate) fn write(&self, path: &std::path::Path) {
        let mut out = self.figures.clone();
        out.insert(
            "targets".into(),
            json!(self
                .targets
                .iter()
                .map(|(s, t, m, met)| json!({"scenario": s, "target": t, "measured": m, "met": met}))
                .collect::<Vec<_>>()),
        );
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(out)).unwrap())
            .expect("write --json");
    }

    pub(crate) fn latencies(&mut self, prefix: &str, mut latencies: Vec<u32>) -> f64 {
        latencies.sort_unstable();
        let p = |q: f64| percentile_ms(&latencies, q);
        self.put(&format!("{prefix}_p50_ms"), json!(p(0.50)));
        self.put(&format!("{prefix}_p99_ms"), json!(p(0.99)));
        self.put(&format!("{prefix}_p999_ms"), json!(p(0.999)));
        self.put(&format!("{prefix}_max_ms"), json!(p(1.0)));
        p(0.99)
    }
}

/// The `q` quantile of `sorted` latencies (µs), in ms; NaN when there are none.
pub(crate) fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// How long the audit keeps listening after the last expected event arrived, so late
/// duplicates and wrong-user deliveries are counted too.
pub(crate) const AUDIT_GRACE: Duration = Duration::from_secs(2);

/// Compares what arrived with what was sent (`expected` maps seq -> user).
/// Returns (lost, duplicated, delivered to the wrong user).
pub(crate) fn audit(seen: &[[u32; 3]], expected: &HashMap<u32, u32>) -> (usize, usize, usize) {
    let mut got = HashSet::new();
    let (mut duplicated, mut wrong) = (0, 0);
    for [user, seq, _] in seen {
        match expected.get(seq) {
            Some(to) if to == user && !got.insert(*seq) => duplicated += 1,
            Some(to) if to != user => wrong += 1,
            _ => {}
        }
    }
    (expected.len() - got.len(), duplicated, wrong)
}

/// Every one of `users` expects `seq` once: (lost, duplicated, latencies).
pub(crate) fn audit_broadcast(seen: &[[u32; 3]], seq: u32, users: usize) -> (usize, usize, Vec<u32>) {
    let mut got = HashSet::new();
    let mut duplicated = 0;
    let mut latencies = Vec::new();
    for [user, s, latency] in seen {
        if *s == seq {
            latencies.push(*latency);
            if !got.insert(*user) {
                duplicated += 1;
            }
        }
    }
    (users.saturating_sub(got.len()), duplicated, latencies)
}
