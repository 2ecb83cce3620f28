//! `kiln`: the Kiln client. Today it plans builds (`kiln plan`); building arrives with the
//! solver.

mod plan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kiln: a distributed container build cluster.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the build graph Kiln would execute, without running anything.
    Plan(plan::PlanArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
