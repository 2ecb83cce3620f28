//! The coordinator's dispatch with fake workers: `crates/kiln-daemon/examples/dispatch.rs`
//! over 100 and 1,000 concurrent builds of 50 vertices on 10 and 100 workers, then with the
//! coordinator replicated (three raft members on loopback, synced: every finished vertex's
//! cache entry commits), each row the median of three runs by throughput. Then failover
//! (`crates/kiln-daemon/examples/failover.rs`): 20 leader kills under load, three runs.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Vertices per build.
const VERTICES: usize = 50;
/// Runs per row.
const RUNS: usize = 3;

/// (builds, workers, slots per worker, milliseconds each vertex takes, replicas): saturation
/// with instant workers, then 1,000 builds whose vertices take 40 ms on average (20–60 ms:
/// about 20,000 vertices/s offered, the target rate) on enough slots for every build; then
/// replicated, saturated and at about 20,000 and 12,500 vertices/s offered (80 ms: the
/// replicated goal is 10,000/s with p99 under 10 ms), beside the same load unreplicated.
const ROWS: &[(usize, usize, usize, u64, usize)] = &[
    (100, 10, 16, 0, 0),
    (1000, 10, 16, 0, 0),
    (100, 100, 16, 0, 0),
    (1000, 100, 16, 0, 0),
    (1000, 10, 100, 40, 0),
    (1000, 100, 16, 40, 0),
    (1000, 10, 16, 0, 3),
    (1000, 10, 100, 40, 3),
    (1000, 10, 100, 80, 0),
    (1000, 10, 100, 80, 3),
];

/// Runs every row; one JSON object per row (the example's output).
pub fn run(example: &Path) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &(builds, workers, slots, exec_ms, replicas) in ROWS {
        eprintln!(
            "== dispatch: {builds} builds × {VERTICES} on {workers} workers × {slots}, vertices take {exec_ms} ms, \
             {replicas} replicas"
        );
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let output = Command::new(example)
                .args([builds, VERTICES, slots, workers, exec_ms as usize, replicas].map(|n| n.to_string()))
                .output()
                .with_context(|| format!("running {}", example.display()))?;
            if !output.status.success() {
                bail!("{} failed: {}", example.display(), String::from_utf8_lossy(&output.stderr));
            }
            let row: Value = serde_json::from_slice(&output.stdout)
                .with_context(|| format!("{}: {}", example.display(), String::from_utf8_lossy(&output.stdout)))?;
            runs.push(row);
        }
        runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
        rows.push(runs.swap_remove(RUNS / 2));
    }
    Ok(rows)
}

fn rate(row: &Value) -> f64 {
    row["dispatches_per_second"].as_f64().unwrap_or(0.0)
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Value]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nCoordinator dispatch with fake workers (median of 3 runs; vertex time is the mean, spread ±50%; replicas: raft members on loopback, each finished vertex's cache entry committed):\n\n| builds × vertices | workers × slots | vertex time | replicas | dispatches/s | p50 | p99 | commit p50 | commit p99 | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let number = |key: &str| row[key].as_f64().unwrap_or(0.0);
        let commit =
            |key: &str| row.get(key).and_then(Value::as_f64).map_or("–".to_string(), |ms| format!("{ms:.1} ms"));
        out.push_str(&format!(
            "| {} × {} | {} × {} | {} ms | {} | {:.0} | {:.1} ms | {:.1} ms | {} | {} | {:.0} MB |\n",
            row["builds"],
            row["vertices_per_build"],
            row["workers"],
            row["slots"],
            row["exec_ms"],
            row["replicas"].as_u64().unwrap_or(0),
            number("dispatches_per_second"),
            number("p50_ms"),
            number("p99_ms"),
            commit("commit_p50_ms"),
            commit("commit_p99_ms"),
            number("peak_rss_mb"),
        ));
    }
    out
}

/// Leader kills per failover run.
const KILLS: usize = 20;

/// Runs the failover example three times; one JSON object per run (the example's output).
pub fn failover(example: &Path) -> anyhow::Result<Vec<Value>> {
    let mut runs = Vec::new();
    for run in 1..=RUNS {
        eprintln!("== failover: {KILLS} leader kills under load, run {run} of {RUNS}");
        let output = Command::new(example)
            .arg(KILLS.to_string())
            .output()
            .with_context(|| format!("running {}", example.display()))?;
        if !output.status.success() {
            bail!("{} failed: {}", example.display(), String::from_utf8_lossy(&output.stderr));
        }
        runs.push(
            serde_json::from_slice(&output.stdout).with_context(|| format!("{}: its output", example.display()))?,
        );
    }
    Ok(runs)
}

/// The failover runs as a Markdown table.
pub fn failover_markdown(runs: &[Value]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nFailover: a leader killed under load, the time to the new leader's first commit (in-process members, gRPC on loopback, synced):\n\n| run | kills | p50 | p99 | max |\n|---|---|---|---|---|\n",
    );
    for (i, run) in runs.iter().enumerate() {
        let ms = |key: &str| run[key].as_f64().unwrap_or(0.0);
        out.push_str(&format!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms |\n",
            i + 1,
            run["kills"],
            ms("p50_ms"),
            ms("p99_ms"),
            ms("max_ms")
        ));
    }
    out
}

/// Runs the tracing overhead example against its own OTLP receiver on a free port.
pub fn trace_overhead(example: &Path) -> anyhow::Result<Value> {
    eprintln!("== tracing: the spans of one executed vertex, with and without the OTLP exporter");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let output = Command::new(example)
        .arg(port.to_string())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"))
        // Room for the whole burst: every span is exported, as a build's few per step are.
        .env("OTEL_BSP_MAX_QUEUE_SIZE", "131072")
        .output()
        .with_context(|| format!("running {}", example.display()))?;
    if !output.status.success() {
        bail!("{} failed: {}", example.display(), String::from_utf8_lossy(&output.stderr));
    }
    serde_json::from_slice(&output.stdout).with_context(|| format!("{}: its output", example.display()))
}

/// The tracing overhead as a Markdown line.
pub fn trace_overhead_markdown(report: &Value) -> String {
    if report.is_null() {
        return String::new();
    }
    let us = |key: &str| report[key].as_f64().unwrap_or(0.0);
    format!(
        "\nTracing, per executed vertex (its vertex span and four phase spans, the trace context carried to the worker; {} vertices): \
         {:.1} µs with the log alone, {:.1} µs with the OTLP exporter too: **{:.1} µs per vertex**; {} of {} spans received.\n",
        report["vertices"],
        us("off_us"),
        us("on_us"),
        us("overhead_us"),
        report["spans_received"],
        report["spans_made"]
    )
}
