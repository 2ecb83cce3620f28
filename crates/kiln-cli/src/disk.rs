//! `kiln du` and `kiln prune`: what the worker stores hold (the standalone daemon's, or with
//! `--addr` to a coordinator every worker's) and removing what nobody uses.

use std::time::Duration;

use clap::Args;
use kiln_model::{PruneOptions, UsageRecord};
use kiln_types::rfc3339_millis;

use crate::cluster::{Format, human_bytes};
use crate::embedded;

/// Arguments of `kiln du`.
#[derive(Args)]
pub struct DuArgs {
    /// Every field of every record.
    #[arg(long)]
    verbose: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Arguments of `kiln prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// Also remove cache mounts (`RUN --mount=type=cache` directories).
    #[arg(long)]
    all: bool,
    /// Keep this much (e.g. `10GB`): remove least recently used records until the store is
    /// no bigger.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    keep_storage: Option<u64>,
    /// `until=DURATION` (e.g. `until=24h`): only records unused for at least that long.
    #[arg(long, value_name = "FILTER", value_parser = parse_filter)]
    filter: Vec<Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

fn parse_size(text: &str) -> Result<u64, String> {
    kiln_config::parse_size(text).map_err(|e| e.to_string())
}

fn parse_filter(text: &str) -> Result<Duration, String> {
    match text.split_once('=') {
        Some(("until", duration)) => kiln_config::parse_duration(duration).map_err(|e| e.to_string()),
        _ => Err(format!("{text:?}: the filter kiln prune takes is until=DURATION")),
    }
}

/// Warnings about workers that did not answer.
fn warn_unanswered(errors: &[String]) {
    for error in errors {
        eprintln!("warning: {error}");
    }
}

/// One record as `--format json` prints it (a stable shape).
fn record_json(record: &UsageRecord) -> serde_json::Value {
    serde_json::json!({
        "id": record.id,
        "kind": record.kind.as_str(),
        "size": record.size,
        "last_used": record.last_used.map(rfc3339_millis),
        "usage_count": record.usage_count,
        "in_use": record.in_use,
        "worker": record.worker,
    })
}

/// Runs `kiln du`.
pub async fn du(args: DuArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let client = daemon.connect().await?;
    let (mut records, errors) = client.disk_usage().await.map_err(anyhow::Error::msg)?;
    warn_unanswered(&errors);
    // Biggest first, as `docker buildx du` lists them.
    records.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.id.cmp(&b.id)));
    let total: u64 = records.iter().map(|r| r.size).sum();
    let reclaimable: u64 = records.iter().filter(|r| !r.in_use).map(|r| r.size).sum();
    match args.format {
        Format::Json => {
            let value = serde_json::json!({
                "records": records.iter().map(record_json).collect::<Vec<_>>(),
                "total": total,
                "reclaimable": reclaimable,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Format::Table if args.verbose => {
            for record in &records {
                println!("ID:           {}", record.id);
                println!("Kind:         {}", record.kind.as_str());
                println!("Worker:       {}", record.worker);
                println!("Size:         {}", human_bytes(record.size));
                println!("In use:       {}", record.in_use);
                println!("Last used:    {}", record.last_used.map_or_else(|| "never".into(), rfc3339_millis));
                println!("Usage count:  {}", record.usage_count);
                println!();
            }
            println!("Reclaimable:  {}", human_bytes(reclaimable));
            println!("Total:        {}", human_bytes(total));
        }
        Format::Table => {
            println!("{:<24} {:<12} {:<12} {:>10} {:<25} WORKER", "ID", "KIND", "RECLAIMABLE", "SIZE", "LAST USED");
            for record in &records {
                let id: String = record.id.trim_start_matches("sha256:").chars().take(24).collect();
                println!(
                    "{:<24} {:<12} {:<12} {:>10} {:<25} {}",
                    id,
                    record.kind.as_str(),
                    !record.in_use,
                    human_bytes(record.size),
                    record.last_used.map_or_else(|| "never".into(), rfc3339_millis),
                    record.worker
                );
            }
            println!("Reclaimable:  {}", human_bytes(reclaimable));
            println!("Total:        {}", human_bytes(total));
        }
    }
    Ok(errors.is_empty())
}

/// Runs `kiln prune`.
pub async fn prune(args: PruneArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let options = PruneOptions { all: args.all, keep_storage: args.keep_storage, until: args.filter.into_iter().max() };
    let client = daemon.connect().await?;
    let (report, errors) = client.prune(&options).await.map_err(anyhow::Error::msg)?;
    warn_unanswered(&errors);
    match args.format {
        Format::Json => {
            let value = serde_json::json!({"reclaimed": report.reclaimed, "records": report.records});
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        Format::Table => println!("Total:  {}", human_bytes(report.reclaimed)),
    }
    Ok(errors.is_empty())
}
