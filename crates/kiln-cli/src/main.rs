//! `kiln`: the Kiln client. `kiln plan` prints a build graph offline; `kiln build` runs a
//! build on a daemon (the embedded one, started on demand, unless `--addr`).

mod bake;
mod build;
mod cluster;
mod disk;
mod embedded;
mod exports;
mod history;
mod input;
mod plan;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kiln: a distributed container build cluster.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    /// Daemon to use (`unix:///path`, `https://host:port` or `http://host:port`, or several
    /// replicated coordinators, comma-separated: the leader is found); default: the embedded
    /// one.
    #[arg(long, global = true, env = "KILN_ADDR")]
    addr: Option<String>,
    /// The CA certificate that signed the daemon's (for `https://` addresses).
    #[arg(long, global = true, env = "KILN_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// The token the daemon knows this client by.
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the build graph Kiln would execute, without running anything.
    Plan(plan::PlanArgs),
    /// Build an image from a Dockerfile.
    Build(Box<build::BuildArgs>),
    /// Build the targets of bake files (docker-bake.hcl, docker-bake.json).
    Bake(bake::BakeArgs),
    /// List the cluster's workers with their load.
    Workers(cluster::WorkersArgs),
    /// Describe the daemon (a coordinator or a standalone one).
    Info(cluster::InfoArgs),
    /// Show what the worker stores hold (with --addr to a coordinator: every worker's).
    Du(disk::DuArgs),
    /// Remove what no build uses from the worker stores, least recently used first.
    Prune(disk::PruneArgs),
    /// The builds the daemon remembers.
    History(history::HistoryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = embedded::Daemon { address: cli.addr, tls_ca: cli.tls_ca, token: cli.token };
    let address = &daemon;
    let run = |future: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<bool>>>>| {
        tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|runtime| runtime.block_on(future))
    };
    let result = match cli.command {
        Command::Plan(args) => plan::run(args).map(|()| true),
        Command::Build(args) => run(Box::pin(build::run(*args, address))),
        Command::Bake(args) => run(Box::pin(bake::run(args, address))),
        Command::Workers(args) => run(Box::pin(cluster::workers(args, address))),
        Command::Info(args) => run(Box::pin(cluster::info(args, address))),
        Command::Du(args) => run(Box::pin(disk::du(args, address))),
        Command::Prune(args) => run(Box::pin(disk::prune(args, address))),
        Command::History(args) => run(Box::pin(history::run(args, address))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
