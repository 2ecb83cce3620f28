//! The coordinator's dispatch with fake workers: `crates/kiln-cluster/examples/dispatch.rs`
//! over 100 and 1,000 concurrent builds of 50 vertices on 10 and 100 workers, each row the
//! median of three runs by throughput.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Vertices per build.
const VERTICES: usize = 50;
/// Runs per row.
const RUNS: usize = 3;

/// (builds, workers, slots per worker, milliseconds each vertex takes): saturation with
/// instant workers, then 1,000 builds whose vertices take 40 ms on average (20–60 ms:
/// about 20,000 vertices/s offered, the target rate) on enough slots for every build.
const ROWS: &[(usize, usize, usize, u64)] = &[
    (100, 10, 16, 0),
    (1000, 10, 16, 0),
    (100, 100, 16, 0),
    (1000, 100, 16, 0),
    (1000, 10, 100, 40),
    (1000, 100, 16, 40),
];

/// Runs every row; one JSON object per row (the example's output).
pub fn run(example: &Path) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &(builds, workers, slots, exec_ms) in ROWS {
        eprintln!(
            "== dispatch: {builds} builds × {VERTICES} on {workers} workers × {slots}, vertices take {exec_ms} ms"
        );
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            let output = Command::new(example)
                .args([builds, VERTICES, slots, workers, exec_ms as usize].map(|n| n.to_string()))
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
        "\nCoordinator dispatch with fake workers (median of 3 runs; vertex time is the mean, spread ±50%):\n\n| builds × vertices | workers × slots | vertex time | dispatches/s | p50 | p99 | peak RSS |\n|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let number = |key: &str| row[key].as_f64().unwrap_or(0.0);
        out.push_str(&format!(
            "| {} × {} | {} × {} | {} ms | {:.0} | {:.1} ms | {:.1} ms | {:.0} MB |\n",
            row["builds"],
            row["vertices_per_build"],
            row["workers"],
            row["slots"],
            row["exec_ms"],
            number("dispatches_per_second"),
            number("p50_ms"),
            number("p99_ms"),
            number("peak_rss_mb"),
        ));
    }
    out
}
