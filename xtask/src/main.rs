//! `cargo xtask`: Kiln's single automation entry point (ci, conformance, demo).

mod base_image;
mod conformance;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Kiln automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Everything CI checks: formatting, clippy, tests, the conformance corpus.
    Ci {
        /// BuildKit Dockerfile conformance corpus (default: found next to the repository).
        #[arg(long)]
        corpus: Option<PathBuf>,
    },
    /// Run the BuildKit Dockerfile conformance corpus and print pass counts per part.
    Conformance {
        /// The `buildkit-dockerfile` corpus directory.
        #[arg(long)]
        corpus: PathBuf,
    },
    /// Show Kiln planning the example builds under tests/fixtures.
    Demo,
    /// Build a small busybox base image (OCI layout under target/kiln-base/oci), push it to
    /// the local registry (started when none answers) and print its reference last.
    BaseImage,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Ci { corpus } => ci(corpus),
        Task::Conformance { corpus } => {
            let totals = conformance::run(&corpus)?;
            if totals.failed > 0 {
                bail!("{} conformance cases failed", totals.failed);
            }
            Ok(())
        }
        Task::Demo => demo(),
        Task::BaseImage => {
            let reference = base_image::run()?;
            println!("{reference}");
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO")).args(args).current_dir(workspace_root()).status()?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Where CI finds the corpus when not told: `KILN_CONFORMANCE_CORPUS`, or the shared
/// folder next to the checkout.
fn find_corpus() -> Option<PathBuf> {
    let from_env = std::env::var_os("KILN_CONFORMANCE_CORPUS").map(PathBuf::from);
    let root = workspace_root();
    let beside = root.parent().map(|p| p.join("shared/conformance/buildkit-dockerfile"));
    let fixed = Some(PathBuf::from("/work/shared/conformance/buildkit-dockerfile"));
    [from_env, beside, fixed].into_iter().flatten().find(|p| p.join("parser-cases").is_dir())
}

fn ci(corpus: Option<PathBuf>) -> anyhow::Result<()> {
    setup::ensure_packages()?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    cargo(&["test", "--workspace", "--quiet"])?;
    match corpus.or_else(find_corpus) {
        Some(corpus) => {
            let totals = conformance::run(&corpus)?;
            if totals.failed > 0 {
                bail!("{} conformance cases failed", totals.failed);
            }
        }
        None => eprintln!("conformance corpus not found (set KILN_CONFORMANCE_CORPUS); skipped"),
    }
    eprintln!("ci: all green");
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    cargo(&["build", "--quiet", "--bin", "kiln"])?;
    let kiln = workspace_root().join("target/debug/kiln");
    let fixtures = workspace_root().join("tests/fixtures");
    for name in ["parallel", "identical", "env-differ", "unused", "context"] {
        println!("\n== kiln plan tests/fixtures/{name}");
        let status = Command::new(&kiln).arg("plan").arg(fixtures.join(name)).status().context("running kiln")?;
        if !status.success() {
            bail!("kiln plan {name} failed");
        }
    }
    println!("\n== kiln plan tests/fixtures/multi-platform --platform linux/amd64,linux/arm64");
    let status = Command::new(&kiln)
        .args(["plan", "--platform", "linux/amd64,linux/arm64"])
        .arg(fixtures.join("multi-platform"))
        .status()?;
    if !status.success() {
        bail!("kiln plan multi-platform failed");
    }
    Ok(())
}
