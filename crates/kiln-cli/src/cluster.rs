//! `kiln workers` and `kiln info`: what the daemon (a coordinator or a standalone one) says
//! about itself and its workers.

use clap::{Args, ValueEnum};
use kiln_model::WorkerStatus;

use crate::embedded;

/// Output format of listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table.
    Table,
    /// JSON.
    Json,
}

/// Arguments of `kiln workers`.
#[derive(Args)]
pub struct WorkersArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Arguments of `kiln info`.
#[derive(Args)]
pub struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Runs `kiln workers`.
pub async fn workers(args: WorkersArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let client = daemon.connect().await?;
    let workers = client.workers().await.map_err(anyhow::Error::msg)?;
    match args.format {
        Format::Json => {
            let list: Vec<serde_json::Value> = workers.iter().map(WorkerStatus::to_json).collect();
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        Format::Table => {
            println!(
                "{:<24} {:<28} {:>7} {:>9} {:>9} {:<9} ADDRESS",
                "NAME", "PLATFORMS", "RUNNING", "CACHE", "FREE DISK", "STATE"
            );
            for w in &workers {
                let platforms: Vec<String> = w.info.platforms.iter().map(|p| p.to_string()).collect();
                println!(
                    "{:<24} {:<28} {:>7} {:>9} {:>9} {:<9} {}",
                    w.info.name,
                    platforms.join(","),
                    format!("{}/{}", w.running, w.info.slots()),
                    human_bytes(w.info.cache_bytes),
                    human_bytes(w.info.free_disk),
                    if w.draining { "draining" } else { "ready" },
                    w.info.address
                );
            }
        }
    }
    Ok(true)
}

/// Runs `kiln info`.
pub async fn info(args: InfoArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let client = daemon.connect().await?;
    let info = client.info().await.map_err(anyhow::Error::msg)?;
    match args.format {
        Format::Json => {
            let mut value = serde_json::json!({
                "version": info.version,
                "role": info.role,
                "root": info.root,
                "platforms": info.platforms,
                "workers": info.workers,
                "queued": info.queued,
            });
            if let Some(raft) = &info.raft {
                value["raft"] = raft_json(raft);
            }
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Format::Table => {
            println!("Version:   {}", info.version);
            println!("Role:      {}", info.role);
            println!("Root:      {}", info.root);
            println!("Platforms: {}", info.platforms.join(", "));
            if info.role == "coordinator" {
                println!("Workers:   {}", info.workers);
                println!("Queued:    {}", info.queued);
            }
            if let Some(raft) = &info.raft {
                println!("Raft:      member {} answered, term {}", raft.node_id, raft.term);
                for member in &raft.members {
                    let role = if member.role.is_empty() { "unknown" } else { &member.role };
                    println!("  {:>3} {:<10} applied {:>8}  {}", member.id, role, member.applied, member.address);
                }
            }
        }
    }
    Ok(true)
}

/// The replica set as `kiln info --format json` prints it (DESIGN.md "High availability").
fn raft_json(raft: &kiln_client::RaftInfo) -> serde_json::Value {
    serde_json::json!({
        "node_id": raft.node_id,
        "leader": (raft.leader != 0).then_some(raft.leader),
        "term": raft.term,
        "members": raft.members.iter().map(|member| serde_json::json!({
            "id": member.id,
            "address": member.address,
            "role": if member.role.is_empty() { None } else { Some(&member.role) },
            "applied": member.applied,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes}B") } else { format!("{value:.1}{}", UNITS[unit]) }
}
