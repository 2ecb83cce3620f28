//! `kiln history`: the builds a daemon (or a replicated coordinator's log) remembers, modelled
//! on `docker buildx history`.

use clap::{Args, Subcommand};
use kiln_model::BuildEntry;
use kiln_types::rfc3339_millis;

use crate::cluster::Format;
use crate::embedded;

/// Arguments of `kiln history`.
#[derive(Args)]
pub struct HistoryArgs {
    #[command(subcommand)]
    command: HistoryCommand,
}

#[derive(Subcommand)]
enum HistoryCommand {
    /// List the builds, oldest first.
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// One build as `--format json` prints it (the shape DESIGN.md names).
fn entry_json(entry: &BuildEntry) -> serde_json::Value {
    serde_json::json!({
        "id": entry.id,
        "status": entry.status,
        "started": rfc3339_millis(entry.started),
        "completed": entry.completed.map(rfc3339_millis),
        "target": entry.target,
        "platforms": entry.platforms,
        "submissions": entry.submissions,
        "counts": {
            "executed": entry.counts.executed,
            "cached": entry.counts.cached,
            "deduplicated": entry.counts.deduplicated,
            "failed": entry.counts.failed,
        },
        "error": entry.error,
    })
}

/// Runs `kiln history`.
pub async fn run(args: HistoryArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let HistoryCommand::Ls { format } = args.command;
    let client = daemon.connect().await?;
    let builds = client.builds().await.map_err(anyhow::Error::msg)?;
    match format {
        Format::Json => {
            let list: Vec<serde_json::Value> = builds.iter().map(entry_json).collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Format::Table => {
            println!(
                "{:<26} {:<10} {:<24} {:>8} {:>6} {:>6} TARGET",
                "ID", "STATUS", "STARTED", "DURATION", "RUN", "CACHED"
            );
            for build in &builds {
                let duration = build.completed.map_or_else(
                    || "-".to_string(),
                    |end| format!("{:.1}s", end.saturating_sub(build.started) as f64 / 1000.0),
                );
                println!(
                    "{:<26} {:<10} {:<24} {:>8} {:>6} {:>6} {}",
                    build.id,
                    build.status,
                    rfc3339_millis(build.started),
                    duration,
                    build.counts.executed,
                    build.counts.cached,
                    build.target.as_deref().unwrap_or("-"),
                );
            }
        }
    }
    Ok(true)
}
