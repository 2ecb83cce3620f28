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
    /// Show one build: its request, outcome and every vertex's record.
    Inspect {
        /// The build's id.
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print a build's kept step output (one step's: a vertex digest, or a unique part of a
    /// step's name).
    Logs {
        /// The build's id.
        id: String,
        /// The step.
        vertex: Option<String>,
    },
    /// Print the web page of a build (the daemon's `web-listen`).
    Open {
        /// The build's id.
        id: String,
    },
    /// Remove a build that ended from the history, with its records and logs.
    Rm {
        /// The builds' ids.
        #[arg(required = true)]
        ids: Vec<String>,
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
        "counts": entry.counts,
        "error": entry.error,
    })
}

/// Runs `kiln history`.
pub async fn run(args: HistoryArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let client = daemon.connect().await?;
    let format = match args.command {
        HistoryCommand::Ls { format } => format,
        HistoryCommand::Inspect { id, format } => return inspect(&client, &id, format).await,
        HistoryCommand::Logs { id, vertex } => return logs(&client, &id, vertex.as_deref()).await,
        HistoryCommand::Open { id } => {
            // The build must be one the caller may see.
            client.inspect_build(&id).await.map_err(anyhow::Error::msg)?;
            let info = client.info().await.map_err(anyhow::Error::msg)?;
            let Some(web) = info.web else {
                anyhow::bail!(
                    "the daemon serves no web UI (kilnd --web-listen HOST:PORT, or web-listen in its config)"
                );
            };
            println!("{web}/builds/{id}");
            return Ok(true);
        }
        HistoryCommand::Rm { ids } => {
            for id in &ids {
                client.remove_build(id).await.map_err(anyhow::Error::msg)?;
                println!("{id}");
            }
            return Ok(true);
        }
    };
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

/// `kiln history inspect`: the entry with its request and records.
async fn inspect(client: &kiln_client::Client, id: &str, format: Format) -> anyhow::Result<bool> {
    let (entry, records) = client.inspect_build(id).await.map_err(anyhow::Error::msg)?;
    match format {
        Format::Json => {
            let mut json = entry_json(&entry);
            json["file_name"] = entry.request.file_name.clone().into();
            json["dockerfile"] = entry.request.dockerfile.clone().into();
            json["build_args"] = serde_json::json!(entry.request.build_args);
            json["submitted_by"] = entry.request.submitted_by.clone().into();
            json["vertices"] = crate::progress::records_json(&records);
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Format::Table => {
            let duration = entry.completed.map_or_else(
                || "-".to_string(),
                |end| format!("{:.1}s", end.saturating_sub(entry.started) as f64 / 1000.0),
            );
            println!("ID:        {}", entry.id);
            println!("Status:    {}", entry.status);
            println!("Started:   {}", rfc3339_millis(entry.started));
            println!("Duration:  {duration}");
            println!("Dockerfile: {}", entry.request.file_name);
            println!("By:        {}", entry.request.submitted_by);
            if let Some(error) = &entry.error {
                println!("Error:     {error}");
            }
            println!();
            println!("{:<13} {:<8} {:>8} {:<16} NAME", "STATUS", "KIND", "TIME", "WORKER");
            for record in &records {
                let time = match (record.started, record.completed) {
                    (Some(start), Some(end)) => format!("{:.2}s", end.saturating_sub(start) as f64 / 1000.0),
                    _ => "-".to_string(),
                };
                let status = match &record.deduplicated_from {
                    Some(from) => format!("{} ({from})", record.status),
                    None => record.status.to_string(),
                };
                println!(
                    "{:<13} {:<8} {:>8} {:<16} {}",
                    status,
                    record.kind,
                    time,
                    record.worker.as_deref().unwrap_or("-"),
                    record.name
                );
            }
        }
    }
    Ok(true)
}

/// `kiln history logs`: every step's kept output, or one step's.
async fn logs(client: &kiln_client::Client, id: &str, step: Option<&str>) -> anyhow::Result<bool> {
    let (_, records) = client.inspect_build(id).await.map_err(anyhow::Error::msg)?;
    let vertex = match step {
        None => None,
        Some(step) => {
            let matching: Vec<&kiln_model::VertexRecord> =
                records.iter().filter(|r| r.digest.to_string() == step || r.name.contains(step)).collect();
            match matching.as_slice() {
                [one] => Some(one.digest),
                [] => anyhow::bail!("build {id}: no step {step:?}"),
                many => anyhow::bail!(
                    "build {id}: {step:?} names {} steps ({}); give more of the name or the digest",
                    many.len(),
                    many.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join("; ")
                ),
            }
        }
    };
    let names: std::collections::HashMap<_, _> = records.iter().map(|r| (r.digest, r.name.as_str())).collect();
    for (digest, log) in client.build_logs(id, vertex.as_ref()).await.map_err(anyhow::Error::msg)? {
        println!("# {}", names.get(&digest).copied().unwrap_or("?"));
        if log.dropped > 0 {
            println!("# ({} earlier lines were not kept)", log.dropped);
        }
        for line in &log.lines {
            println!("{}", line.line);
        }
    }
    Ok(true)
}
