//! `cargo xtask`: Kiln's single automation entry point (ci, conformance, demo).

mod base_image;
mod bench;
mod burst;
mod conformance;
mod dispatch;
mod fences;
mod setup;
mod warmup;

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
    /// Everything CI checks: formatting, clippy, the architecture's fences, licences and bans
    /// (cargo-deny), tests, the conformance corpus.
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
    /// Run a real build on the embedded default (after setting up packages, base image and
    /// registry) and show its progress and result.
    Demo,
    /// Measure the scenarios under bench/scenarios with Kiln and a reference (Docker's
    /// BuildKit, skopeo) side by side, then the coordinator's dispatch with fake workers.
    Bench {
        /// Only this scenario (`dispatch`: only the coordinator's dispatch; `fleet`: only a
        /// fresh worker's warm-up and the cost of tracing).
        #[arg(long)]
        scenario: Option<String>,
        /// Timed runs per tool (after one warm-up).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Write the results as JSON here (default: target/kiln-bench/results.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Check the architecture's fences: pure crates, one owner per heavy dependency, no
    /// unused dependencies.
    Fences,
    /// Check the deployment files without a cluster: render the Helm chart (helm/kiln) for
    /// several fleets and check every manifest and invariant (tests/helm/test_chart.py), and
    /// check deploy/compose.yaml with docker-compose.
    Deploy,
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
        Task::Fences => fences::check(&workspace_root()),
        Task::Deploy => deploy(),
        Task::Bench { scenario, runs, json } => bench::run(scenario, runs.max(1), json),
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
    setup::ensure_arm64()?;
    setup::ensure_moto()?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    fences::check(&workspace_root())?;
    setup::ensure_cargo_deny()?;
    cargo(&["deny", "--log-level", "error", "check", "licenses", "bans"])?;
    cargo(&["test", "--workspace", "--quiet"])?;
    deploy()?;
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

/// `cargo xtask deploy`: the chart's tests in the Helm library's virtual environment, against
/// the kilnd of this tree (which checks the configs the chart writes), and the compose file.
fn deploy() -> anyhow::Result<()> {
    setup::ensure_packages()?;
    let python = setup::ensure_helm_tools()?;
    cargo(&["build", "--quiet", "--bin", "kilnd"])?;
    let root = workspace_root();
    let status = Command::new(&python)
        .arg(root.join("tests/helm/test_chart.py"))
        .arg(root.join("helm/kiln"))
        .arg(root.join("target/debug/kilnd"))
        .status()
        .context("running tests/helm/test_chart.py")?;
    if !status.success() {
        bail!("the Helm chart's tests failed");
    }
    let compose = Command::new("docker-compose")
        .args(["--file"])
        .arg(root.join("deploy/compose.yaml"))
        .args(["config", "--quiet"])
        .status()
        .context("running docker-compose config")?;
    if !compose.success() {
        bail!("docker-compose refuses deploy/compose.yaml");
    }
    // The example configs, read as kilnd reads them.
    for dir in ["deploy/compose", "deploy/config"] {
        for entry in std::fs::read_dir(root.join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let checked =
                    Command::new(root.join("target/debug/kilnd")).arg("--config").arg(&path).arg("check").status()?;
                if !checked.success() {
                    bail!("kilnd refuses {}", path.display());
                }
            }
        }
    }
    eprintln!("deploy: the chart and the compose file check out");
    Ok(())
}

/// The README's first command: set up what a fresh machine lacks, then run a real build on
/// the embedded default (and once more, to show the cache), and show the result.
fn demo() -> anyhow::Result<()> {
    let base = base_image::run()?;
    cargo(&["build", "--quiet", "--workspace", "--bins"])?;
    let root = workspace_root();
    let kiln = root.join("target/debug/kiln");
    let out = root.join("target/kiln-demo");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let registry = std::env::var("KILN_REGISTRY").unwrap_or_else(|_| base_image::DEFAULT_REGISTRY.to_string());
    let image = format!("{registry}/kiln/demo:latest");
    let build = |label: &str, metadata: &str| -> anyhow::Result<serde_json::Value> {
        println!("\n== {label}: kiln build tests/fixtures/demo (base {base})");
        let metadata = out.join(metadata);
        let status = Command::new(&kiln)
            .args(["build", "--build-arg", &format!("BASE={base}")])
            .arg("--output")
            .arg(format!("type=image,name={image},push=true"))
            .arg("--output")
            .arg(format!("type=local,dest={}", out.join("rootfs").display()))
            .arg("--metadata-file")
            .arg(&metadata)
            .arg(root.join("tests/fixtures/demo"))
            .status()
            .context("running kiln build")?;
        if !status.success() {
            bail!("kiln build failed");
        }
        Ok(serde_json::from_slice(&std::fs::read(&metadata)?)?)
    };
    let first = build("first build", "first.json")?;
    let second = build("the same build again", "second.json")?;
    for (label, metadata) in [("first build", &first), ("second build", &second)] {
        let mut counts = std::collections::BTreeMap::new();
        for vertex in metadata["vertices"].as_array().into_iter().flatten() {
            *counts.entry(vertex["status"].as_str().unwrap_or("?").to_string()).or_insert(0) += 1;
        }
        println!("{label}: {counts:?}");
    }
    println!("\npushed {image} ({})", first["containerimage.digest"].as_str().unwrap_or("?"));
    for file in ["frontend.txt", "backend.txt", "docs.txt", "message.txt"] {
        let path = out.join("rootfs/app").join(file);
        print!(
            "/app/{file}: {}",
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
        );
    }
    println!("metadata: {}", out.join("first.json").display());
    Ok(())
}
