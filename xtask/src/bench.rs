//! `cargo xtask bench`: each scenario under `bench/scenarios/` built by Kiln and, when Docker
//! is installed, by Docker's BuildKit from the same base image bytes; runs interleaved after a
//! warm-up; median, min and max wall time, overhead over the critical path, and the ratio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{base_image, cargo, setup, workspace_root};

/// A scenario's `scenario.json`.
struct Scenario {
    name: String,
    /// The build context with the Dockerfile: the scenario's own directory, or another
    /// scenario's (`"context": "../NAME"`) when only the mode or limits differ.
    dir: PathBuf,
    /// The critical path in seconds (what an ideal scheduler with no overhead would take).
    ideal: f64,
    /// `cold` (no cache), `cached` (warm cache), `edit` (one context file changes per run).
    mode: String,
    concurrent: usize,
    max_parallelism: Option<u32>,
    edit: Option<String>,
    executions: Option<u64>,
}

fn load_scenarios(only: Option<&str>) -> anyhow::Result<Vec<Scenario>> {
    let root = workspace_root().join("bench/scenarios");
    let mut scenarios = Vec::new();
    let mut names: Vec<_> =
        std::fs::read_dir(&root)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in names.into_iter().filter(|n| only.is_none_or(|only| only == n)) {
        let dir = root.join(&name);
        let spec: Value = serde_json::from_slice(
            &std::fs::read(dir.join("scenario.json")).with_context(|| format!("{name}/scenario.json"))?,
        )?;
        scenarios.push(Scenario {
            ideal: spec["ideal"].as_f64().unwrap_or(0.0),
            mode: spec["mode"].as_str().unwrap_or("cold").to_string(),
            concurrent: spec["concurrent"].as_u64().unwrap_or(1) as usize,
            max_parallelism: spec["max_parallelism"].as_u64().map(|n| n as u32),
            edit: spec["edit"].as_str().map(str::to_string),
            executions: spec["executions"].as_u64(),
            dir: match spec["context"].as_str() {
                Some(other) => dir.join(other),
                None => dir.clone(),
            },
            name,
        });
    }
    if scenarios.is_empty() {
        bail!("no scenario matches {only:?} under {}", root.display());
    }
    Ok(scenarios)
}

/// The tools being compared.
struct Bench {
    kiln: PathBuf,
    kiln_root: PathBuf,
    base: String,
    docker: Option<Dockerd>,
    work: PathBuf,
}

struct Dockerd {
    child: Child,
    host: String,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// Runs the benchmark.
pub fn run(only: Option<String>, runs: usize, json_path: Option<PathBuf>) -> anyhow::Result<()> {
    setup::ensure_packages()?;
    let base = base_image::run()?;
    cargo(&["build", "--release", "--quiet", "--workspace", "--bins"])?;
    let root = workspace_root();
    let bench_dir = root.join("target/kiln-bench");
    std::fs::create_dir_all(&bench_dir)?;
    let kiln_root = bench_dir.join("kiln");
    restart_kilnd(&root.join("target/release/kilnd"), &kiln_root)?;
    let docker = start_docker(&bench_dir, &root.join("target/kiln-base/oci"))?;
    let bench = Bench { kiln: root.join("target/release/kiln"), kiln_root, base, docker, work: bench_dir.join("work") };

    let mut results = Vec::new();
    for scenario in load_scenarios(only.as_deref())? {
        eprintln!("== {}", scenario.name);
        results.push(bench.scenario(&scenario, runs)?);
    }
    let report = json!({
        "date": kiln_date(),
        "machine": machine(),
        "runs": runs,
        "docker": bench.docker.is_some(),
        "scenarios": results,
    });
    let json_path = json_path.unwrap_or_else(|| bench_dir.join("results.json"));
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)?;
    let table = markdown(&report);
    println!("{table}");
    std::fs::write(bench_dir.join("results.md"), &table)?;
    eprintln!("results: {} and {}", json_path.display(), bench_dir.join("results.md").display());
    Ok(())
}

impl Bench {
    fn scenario(&self, scenario: &Scenario, runs: usize) -> anyhow::Result<Value> {
        let dir = self.work.join(&scenario.name);
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&scenario.dir, &dir)?;
        let mut kiln_times = Vec::new();
        let mut docker_times = Vec::new();
        let mut executions = None;
        // One warm-up each, then interleaved timed runs.
        for round in 0..=runs {
            if let Some(file) = &scenario.edit {
                std::fs::write(dir.join(file), format!("edited {round} kiln\n"))?;
            }
            let (seconds, executed) = self.kiln_run(scenario, &dir, round)?;
            if round > 0 {
                kiln_times.push(seconds);
                executions = Some(executed);
            }
            if self.docker.is_some() {
                if let Some(file) = &scenario.edit {
                    std::fs::write(dir.join(file), format!("edited {round} docker\n"))?;
                }
                let seconds = self.docker_run(scenario, &dir)?;
                if round > 0 {
                    docker_times.push(seconds);
                }
            }
        }
        let kiln = stats(&kiln_times);
        let docker = (!docker_times.is_empty()).then(|| stats(&docker_times));
        let ratio = docker.as_ref().map(|d| kiln["median"].as_f64().unwrap() / d["median"].as_f64().unwrap());
        Ok(json!({
            "name": scenario.name,
            "ideal": scenario.ideal,
            "kiln": kiln,
            "buildkit": docker,
            "overhead": kiln["median"].as_f64().unwrap() - scenario.ideal,
            "ratio": ratio,
            "executions": executions,
            "expected_executions": scenario.executions,
        }))
    }

    /// One timed Kiln run (all concurrent builds); returns seconds and executed exec vertices.
    fn kiln_run(&self, scenario: &Scenario, dir: &Path, round: usize) -> anyhow::Result<(f64, u64)> {
        let cold = scenario.mode == "cold";
        let started = Instant::now();
        let children: Vec<(Child, PathBuf)> = (0..scenario.concurrent)
            .map(|i| {
                let metadata = self.work.join(format!("{}-{round}-{i}.json", scenario.name));
                let mut command = Command::new(&self.kiln);
                command.env("KILN_ROOT", &self.kiln_root).env_remove("KILN_ADDR");
                command.args(["build", "--progress", "plain", "--build-arg", &format!("BASE={}", self.base)]);
                if cold {
                    command.arg("--no-cache");
                }
                if let Some(n) = scenario.max_parallelism {
                    command.args(["--max-parallelism", &n.to_string()]);
                }
                command.arg("--metadata-file").arg(&metadata).arg(dir).stdout(Stdio::null()).stderr(Stdio::null());
                command.spawn().map(|child| (child, metadata))
            })
            .collect::<Result<_, _>>()?;
        let mut executed = 0;
        for (mut child, metadata) in children {
            if !child.wait()?.success() {
                bail!("kiln build of {} failed (see {})", scenario.name, metadata.display());
            }
            let metadata: Value = serde_json::from_slice(&std::fs::read(&metadata)?)?;
            executed += metadata["vertices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["kind"] == "exec" && v["status"] == "executed")
                .count() as u64;
        }
        Ok((started.elapsed().as_secs_f64(), executed))
    }

    fn docker_run(&self, scenario: &Scenario, dir: &Path) -> anyhow::Result<f64> {
        let docker = self.docker.as_ref().expect("checked");
        let started = Instant::now();
        let children: Vec<Child> = (0..scenario.concurrent)
            .map(|_| {
                let mut command = Command::new("/usr/bin/docker");
                command.env("DOCKER_HOST", &docker.host).env("DOCKER_BUILDKIT", "1");
                command.args(["build", "--network=none", "-q", "--build-arg", "BASE=kiln/busybox:latest"]);
                if scenario.mode == "cold" {
                    command.arg("--no-cache");
                }
                command.arg(dir).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
            })
            .collect::<Result<_, _>>()?;
        for mut child in children {
            if !child.wait()?.success() {
                bail!("docker build of {} failed", scenario.name);
            }
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

fn stats(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({"median": sorted[sorted.len() / 2], "min": sorted[0], "max": sorted[sorted.len() - 1], "samples": samples})
}

fn markdown(report: &Value) -> String {
    let mut out = format!(
        "Machine: {}. Date: {}. {} timed runs per tool after one warm-up, interleaved. Times in seconds (median, min–max).\n\n",
        report["machine"].as_str().unwrap_or("?"),
        report["date"].as_str().unwrap_or("?"),
        report["runs"]
    );
    out.push_str("| scenario | ideal | Kiln | overhead | BuildKit | Kiln/BuildKit | executions (expected) |\n|---|---|---|---|---|---|---|\n");
    let cell = |v: &Value| match v.get("median") {
        Some(m) => format!(
            "{:.2} ({:.2}–{:.2})",
            m.as_f64().unwrap_or(0.0),
            v["min"].as_f64().unwrap_or(0.0),
            v["max"].as_f64().unwrap_or(0.0)
        ),
        None => "n/a".into(),
    };
    for s in report["scenarios"].as_array().into_iter().flatten() {
        let ratio = s["ratio"].as_f64().map_or("n/a".into(), |r| format!("{r:.2}"));
        let executions = match (s["executions"].as_u64(), s["expected_executions"].as_u64()) {
            (Some(got), Some(want)) => format!("{got} ({want})"),
            (Some(got), None) => got.to_string(),
            _ => "".into(),
        };
        out.push_str(&format!(
            "| {} | {:.2} | {} | {:+.2} | {} | {ratio} | {executions} |\n",
            s["name"].as_str().unwrap_or("?"),
            s["ideal"].as_f64().unwrap_or(0.0),
            cell(&s["kiln"]),
            s["overhead"].as_f64().unwrap_or(0.0),
            cell(&s["buildkit"]),
        ));
    }
    out
}

/// Stops a daemon left on the bench root and starts a fresh release one with a high worker
/// limit (so "unlimited" scenarios are limited only by the build).
fn restart_kilnd(kilnd: &Path, root: &Path) -> anyhow::Result<()> {
    if let Ok(pid) = std::fs::read_to_string(root.join("kilnd.pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", pid.trim())).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::fs::create_dir_all(root)?;
    let log = std::fs::File::create(root.join("kilnd.log"))?;
    use std::os::unix::process::CommandExt as _;
    Command::new(kilnd)
        .args(["--standalone", "--max-parallelism", "64", "--root"])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting kilnd")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root.join("kilnd.sock").exists() {
        if Instant::now() > deadline {
            bail!("kilnd did not start; see {}", root.join("kilnd.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A private dockerd with the base image loaded from the same OCI layout, when Docker is
/// installed.
fn start_docker(bench_dir: &Path, layout: &Path) -> anyhow::Result<Option<Dockerd>> {
    if !Path::new("/usr/sbin/dockerd").exists() {
        eprintln!("Docker is not installed: measuring Kiln alone");
        return Ok(None);
    }
    let exec_root = PathBuf::from(format!("/tmp/kiln-bench-docker-{}", std::process::id()));
    let host = format!("unix://{}/docker.sock", exec_root.display());
    std::fs::create_dir_all(&exec_root)?;
    let child = Command::new("dockerd")
        .args(["--iptables=false", "--bridge=none", "-H", &host])
        .arg("--data-root")
        .arg(bench_dir.join("docker"))
        .arg("--exec-root")
        .arg(exec_root.join("x"))
        .arg("--pidfile")
        .arg(exec_root.join("docker.pid"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(bench_dir.join("dockerd.log"))?)
        .spawn()
        .context("starting dockerd")?;
    let docker = Dockerd { child, host };
    let docker_cmd =
        |args: &[&str]| Command::new("/usr/bin/docker").args(args).env("DOCKER_HOST", &docker.host).output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker_cmd(&["info"])?.status.success() {
        if Instant::now() > deadline {
            bail!("dockerd did not start; see {}", bench_dir.join("dockerd.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let archive = bench_dir.join("base.tar");
    let _ = std::fs::remove_file(&archive);
    let status = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:busybox", layout.display()))
        .arg(format!("docker-archive:{}:kiln/busybox:latest", archive.display()))
        .status()?;
    if !status.success() || !docker_cmd(&["load", "-q", "-i", archive.to_str().unwrap_or_default()])?.status.success() {
        bail!("loading the base image into Docker failed");
    }
    Ok(Some(docker))
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<u64>().ok()))
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} vCPU {model}, {memory} GiB, kernel {}", kernel.trim())
}

fn kiln_date() -> String {
    let output = Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    output.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}
