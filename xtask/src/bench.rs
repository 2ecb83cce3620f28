//! `cargo xtask bench`: each scenario under `bench/scenarios/` built by Kiln and by a
//! reference on the same machine in the same run (Docker's BuildKit from the same base image
//! bytes when Docker is installed; `skopeo copy` for pushes and pulls); runs interleaved
//! after a warm-up; median, min and max wall time, overhead over the critical path, and the
//! ratio. Then the coordinator's dispatch with fake workers (`dispatch.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{base_image, burst, cargo, dispatch, setup, warmup, workspace_root};

/// How a scenario's runs are made.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Every step executes (`--no-cache`).
    Cold,
    /// Warm rebuilds.
    Cached,
    /// One context file changes before every run.
    Edit,
    /// The generated context's every file changes before every run, so all of it moves
    /// (Kiln over TCP: hashed, find-missing, uploaded).
    Upload,
    /// The generated context stays the same: a warm rebuild that still has to check it.
    Reupload,
    /// A cached build pushing its image to a new repository of the local registry, against
    /// `skopeo copy` of the same image from an OCI layout.
    Push,
    /// A build `FROM` the scenario's image on a daemon with an empty store (pull, unpack and
    /// one trivial step), against `skopeo copy` of the image into an empty OCI layout.
    Pull,
    /// A cached build exporting its cache (mode=max) to a new registry ref, against BuildKit
    /// building with the inline cache and pushing the image to a new repository.
    CacheExport,
    /// A daemon with an empty store building with `--cache-from` until every step is cached,
    /// against BuildKit with an empty build cache and `--cache-from` the inline-cache image.
    CacheImport,
    /// A build from an empty store whose image goes to a new repository of the local
    /// registry: its steps, then tar, compression (gzip), digests and upload of its layers.
    /// Against BuildKit building with `--no-cache` and `docker push` of the image. Each run's
    /// layer is new (the Dockerfile draws random bytes), so neither reuses a compressed blob.
    Export,
    /// `kiln bake --no-cache` of the scenario's `docker-bake.hcl` (a `base` target and
    /// `svc*` targets using it as `target:base`), against BuildKit building `base/` and then
    /// every `svc*/` at once (`docker build &`; Docker 20.10 has no bake).
    Bake,
    /// [`Mode::Bake`], BuildKit building the services one after another.
    BakeSequential,
}

impl Mode {
    fn parse(text: &str) -> anyhow::Result<Mode> {
        Ok(match text {
            "cold" => Mode::Cold,
            "cached" => Mode::Cached,
            "edit" => Mode::Edit,
            "upload" => Mode::Upload,
            "reupload" => Mode::Reupload,
            "push" => Mode::Push,
            "export" => Mode::Export,
            "pull" => Mode::Pull,
            "cache-export" => Mode::CacheExport,
            "cache-import" => Mode::CacheImport,
            "bake" => Mode::Bake,
            "bake-sequential" => Mode::BakeSequential,
            other => bail!(
                "unknown mode {other:?} (cold, cached, edit, upload, reupload, push, export, pull, cache-export, \
                 cache-import, bake, bake-sequential)"
            ),
        })
    }
}

/// Files the xtask writes into the scenario's copy: `files` files of `bytes / files` bytes
/// of pseudo-random (incompressible) content under `data/`.
#[derive(Clone, Copy)]
struct Generate {
    files: usize,
    bytes: u64,
}

/// A scenario's `scenario.json`.
struct Scenario {
    name: String,
    /// The build context with the Dockerfile: the scenario's own directory, or another
    /// scenario's (`"context": "../NAME"`) when only the mode or limits differ.
    dir: PathBuf,
    /// The critical path in seconds (what an ideal scheduler with no overhead would take);
    /// none for transfer scenarios.
    ideal: Option<f64>,
    mode: Mode,
    concurrent: usize,
    max_parallelism: Option<u32>,
    /// The scenario runs on a daemon of its own started with this `--max-parallelism` (the
    /// shared daemon runs with the default, adaptive admission).
    daemon_max_parallelism: Option<u32>,
    edit: Option<String>,
    executions: Option<u64>,
    generate: Option<Generate>,
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
            ideal: spec["ideal"].as_f64(),
            mode: Mode::parse(spec["mode"].as_str().unwrap_or("cold"))
                .with_context(|| format!("{name}/scenario.json"))?,
            concurrent: spec["concurrent"].as_u64().unwrap_or(1) as usize,
            max_parallelism: spec["max_parallelism"].as_u64().map(|n| n as u32),
            daemon_max_parallelism: spec["daemon_max_parallelism"].as_u64().map(|n| n as u32),
            edit: spec["edit"].as_str().map(str::to_string),
            executions: spec["executions"].as_u64(),
            generate: spec.get("generate").map(|g| Generate {
                files: g["files"].as_u64().unwrap_or(1).max(1) as usize,
                bytes: g["bytes"].as_u64().unwrap_or(0),
            }),
            dir: match spec["context"].as_str() {
                Some(other) => dir.join(other),
                None => dir.clone(),
            },
            name,
        });
    }
    Ok(scenarios)
}

/// A `kilnd --standalone` of the bench, stopped when dropped.
struct Kilnd {
    child: Child,
    root: PathBuf,
    /// `--addr` for clients that should go over TCP (and so upload their context).
    addr: String,
}

/// Loopback ports of the bench daemons' TCP listeners: the shared daemon's, and the one of
/// a scenario's own daemon.
const SHARED_PORT: u16 = 17_331;
const OWN_PORT: u16 = 17_332;

impl Kilnd {
    /// Stops a daemon left on `root` (by its pid file), optionally empties `root`, and
    /// starts a fresh release daemon with default settings (its parallelism adapts to the
    /// machine's pressure) or `--max-parallelism N`, also listening on loopback TCP.
    fn start(root: &Path, fresh: bool, port: u16, max_parallelism: Option<u32>) -> anyhow::Result<Kilnd> {
        stop_pid_file(&root.join("kilnd.pid"));
        if fresh {
            remove_tree(root)?;
        }
        std::fs::create_dir_all(root)?;
        let log = std::fs::File::create(root.join("kilnd.log"))?;
        let listen = format!("127.0.0.1:{port}");
        use std::os::unix::process::CommandExt as _;
        let mut command = Command::new(workspace_root().join("target/release/kilnd"));
        if let Some(n) = max_parallelism {
            command.args(["--max-parallelism", &n.to_string()]);
        }
        let child = command
            .args(["--standalone", "--insecure", "--listen", &listen, "--root"])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting kilnd")?;
        let kilnd = Kilnd { child, root: root.to_path_buf(), addr: format!("http://{listen}") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !root.join("kilnd.sock").exists() || std::net::TcpStream::connect(&listen).is_err() {
            if Instant::now() > deadline {
                bail!("kilnd did not start; see {}", root.join("kilnd.log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(kilnd)
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// Samples the machine's memory in use (`MemTotal - MemAvailable`) every 10 ms on a thread
/// until stopped: the peak above the start, whichever processes used it (a build's daemon,
/// its containers, Docker's daemons).
struct PeakMemory {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<u64>>,
    start: u64,
}

impl PeakMemory {
    fn start() -> PeakMemory {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = memory_in_use();
        let stopped = std::sync::Arc::clone(&stop);
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(memory_in_use());
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        PeakMemory { stop, sampler: Some(sampler), start }
    }

    /// The peak above the start, MiB.
    fn stop(mut self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = self.sampler.take().and_then(|s| s.join().ok()).unwrap_or(0);
        peak.saturating_sub(self.start) as f64 / 1024.0
    }
}

impl Drop for PeakMemory {
    /// A run that failed stops its sampler too.
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `MemTotal - MemAvailable` in KiB.
fn memory_in_use() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

fn stop_pid_file(pid_file: &Path) {
    let Ok(pid) = std::fs::read_to_string(pid_file) else { return };
    let _ = Command::new("kill").arg(pid.trim()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}", pid.trim())).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes a daemon's state directory (its overlay mounts are gone with the daemon).
fn remove_tree(root: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", root.display())),
    }
}

/// The tools being compared.
struct Bench {
    kiln: PathBuf,
    base: String,
    /// The registry the base image lives in (pushes go there too).
    registry: String,
    /// Makes repository names of this run unique, so a push always sends its blobs.
    nonce: u64,
    docker: Option<Dockerd>,
    bench_dir: PathBuf,
    /// This run's copies of the scenarios (`work-NONCE`).
    work: PathBuf,
}

pub(crate) struct Dockerd {
    child: Child,
    /// Its `DOCKER_HOST`.
    pub(crate) host: String,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// A scenario's timed runs.
#[derive(Default)]
struct Measured {
    kiln: Vec<f64>,
    reference: Vec<f64>,
    /// The machine's peak memory in use over each timed run above its start (MiB), when
    /// measured.
    kiln_memory: Vec<f64>,
    reference_memory: Vec<f64>,
    /// The reference's name.
    tool: &'static str,
    /// Kiln's last timed run.
    last: Option<RunResult>,
}

/// What one timed build (or set of concurrent builds) did.
struct RunResult {
    seconds: f64,
    /// The machine's peak memory in use above the run's start (MiB).
    peak_mib: f64,
    executed: u64,
    uploaded_files: u64,
    uploaded_bytes: u64,
}

/// A cluster scenario's report when it is `wanted`: its results, or its error (the rest of
/// the run goes on).
fn optional(wanted: bool, name: &str, run: impl FnOnce() -> anyhow::Result<Value>) -> Value {
    if !wanted {
        return Value::Null;
    }
    run().unwrap_or_else(|e| {
        eprintln!("{name}: {e:#}");
        json!({"error": format!("{e:#}")})
    })
}

/// Runs the benchmark.
pub fn run(only: Option<String>, runs: usize, json_path: Option<PathBuf>) -> anyhow::Result<()> {
    setup::ensure_packages()?;
    // What earlier runs pushed (export-1gib alone leaves 0.5 GiB a run) goes first.
    base_image::prune_registry("bench")?;
    let base = base_image::run()?;
    cargo(&["build", "--release", "--quiet", "--workspace", "--bins", "--examples"])?;
    let root = workspace_root();
    let bench_dir = root.join("target/kiln-bench");
    std::fs::create_dir_all(&bench_dir)?;
    let scenarios = load_scenarios(only.as_deref())?;
    let with_dispatch = only.as_deref().is_none_or(|o| o == "dispatch");
    let with_fleet = only.as_deref().is_none_or(|o| o == "fleet");
    let with_burst = only.as_deref().is_none_or(|o| o == "ci-burst");
    let with_wide = only.as_deref().is_none_or(|o| o == "cluster-wide");
    if scenarios.is_empty() && !with_dispatch && !with_fleet && !with_burst && !with_wide {
        bail!("no scenario matches {only:?} under {}", root.join("bench/scenarios").display());
    }

    // Dispatch first, on a quiet machine: after the scenarios the kernel is still discarding
    // the gigabytes they removed.
    let dispatch = if with_dispatch { dispatch::run(&root.join("target/release/examples/dispatch"))? } else { vec![] };
    let failover =
        if with_dispatch { dispatch::failover(&root.join("target/release/examples/failover"))? } else { vec![] };
    let (warmup, tracing) = if with_fleet {
        (
            warmup::run(&base, &bench_dir)?,
            dispatch::trace_overhead(&root.join("target/release/examples/trace_overhead"))?,
        )
    } else {
        (vec![], Value::Null)
    };
    let mut results = Vec::new();
    let mut docker_used = false;
    if !scenarios.is_empty() {
        let kilnd = Kilnd::start(&bench_dir.join("kiln"), false, SHARED_PORT, None)?;
        let docker = start_docker(&bench_dir, &root.join("target/kiln-base/oci"))?;
        docker_used = docker.is_some();
        let registry = base.split('/').next().unwrap_or(base_image::DEFAULT_REGISTRY).to_string();
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let bench = Bench {
            kiln: root.join("target/release/kiln"),
            base: base.clone(),
            registry,
            nonce,
            docker,
            work: bench_dir.join(format!("work-{nonce}")),
            bench_dir: bench_dir.clone(),
        };
        for scenario in &scenarios {
            eprintln!("== {}", scenario.name);
            // One scenario failing (say, the reference tripping) does not lose the others.
            results.push(bench.scenario(scenario, &kilnd, runs).unwrap_or_else(|e| {
                eprintln!("{}: {e:#}", scenario.name);
                json!({"name": scenario.name, "error": format!("{e:#}")})
            }));
        }
        // Large trees go only now, this run's and any a failed run left: removing them
        // sooner would slow the next scenario's file creation (ext4 skips recently freed
        // inodes for a while).
        bench.docker_prune();
        for entry in std::fs::read_dir(&bench_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("work-") || name.starts_with("kiln-") {
                remove_tree(&entry.path())?;
            }
        }
    }
    // The burst last: it starts its own cluster and three Docker daemons.
    let burst = optional(with_burst, "ci-burst", || burst::run(&base, &bench_dir));
    let cluster_wide = optional(with_wide, "cluster-wide", || burst::wide(&base, &bench_dir));
    let report = json!({
        "date": kiln_date(),
        "machine": machine(),
        "runs": runs,
        "docker": docker_used,
        "scenarios": results,
        "dispatch": dispatch,
        "failover": failover,
        "warmup": warmup,
        "tracing": tracing,
        "burst": burst,
        "cluster_wide": cluster_wide,
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
    fn scenario(&self, scenario: &Scenario, kilnd: &Kilnd, runs: usize) -> anyhow::Result<Value> {
        let dir = self.work.join(&scenario.name);
        remove_tree(&dir)?;
        copy_dir(&scenario.dir, &dir)?;
        if let Some(generate) = scenario.generate {
            generate_files(&dir, generate, 0)?;
        }
        let Measured { kiln, reference, kiln_memory, reference_memory, tool, last } = match scenario.mode {
            Mode::Push => self.push(scenario, &dir, runs)?,
            Mode::Export => self.export(scenario, &dir, runs)?,
            Mode::Pull => self.pull(scenario, &dir, kilnd, runs)?,
            Mode::CacheExport => self.cache_export(scenario, &dir, kilnd, runs)?,
            Mode::CacheImport => self.cache_import(scenario, &dir, kilnd, runs)?,
            Mode::Bake | Mode::BakeSequential => self.bakes(scenario, &dir, kilnd, runs)?,
            Mode::Upload | Mode::Reupload => {
                // Their own daemon, so hundreds of megabytes do not stay in the shared store.
                let root = self.bench_dir.join(format!("kiln-{}-{}", scenario.name, self.nonce));
                let own = Kilnd::start(&root, true, OWN_PORT, None)?;
                self.builds(scenario, &dir, &own, runs)?
            }
            _ => match scenario.daemon_max_parallelism {
                Some(n) => {
                    let root = self.bench_dir.join(format!("kiln-{}-{}", scenario.name, self.nonce));
                    let own = Kilnd::start(&root, true, OWN_PORT, Some(n))?;
                    self.builds(scenario, &dir, &own, runs)?
                }
                None => self.builds(scenario, &dir, kilnd, runs)?,
            },
        };
        let kiln = stats(&kiln);
        let reference = (!reference.is_empty()).then(|| stats(&reference));
        let median = |v: &Value| v["median"].as_f64().unwrap_or(0.0);
        let ratio = reference.as_ref().map(|r| median(&kiln) / median(r));
        let median_of = |values: &[f64]| (!values.is_empty()).then(|| stats(values)["median"].clone());
        Ok(json!({
            "name": scenario.name,
            "kiln_peak_mib": median_of(&kiln_memory),
            "reference_peak_mib": median_of(&reference_memory),
            "mode": format!("{:?}", scenario.mode).to_lowercase(),
            "ideal": scenario.ideal,
            "kiln": kiln,
            "reference": reference,
            "reference_tool": reference.as_ref().map(|_| tool),
            "overhead": scenario.ideal.map(|ideal| median(&kiln) - ideal),
            "ratio": ratio,
            "executions": last.as_ref().map(|r| r.executed),
            "expected_executions": scenario.executions,
            "uploaded_files": last.as_ref().filter(|_| scenario.generate.is_some()).map(|r| r.uploaded_files),
            "uploaded_bytes": last.as_ref().filter(|_| scenario.generate.is_some()).map(|r| r.uploaded_bytes),
        }))
    }

    /// Builds of the scenario by Kiln and BuildKit, interleaved after one warm-up each.
    fn builds(&self, scenario: &Scenario, dir: &Path, kilnd: &Kilnd, runs: usize) -> anyhow::Result<Measured> {
        let (mut kiln_times, mut kiln_memory) = (Vec::new(), Vec::new());
        let (mut docker_times, mut docker_memory) = (Vec::new(), Vec::new());
        let mut last = None;
        for round in 0..=runs {
            self.prepare(scenario, dir, round * 2)?;
            let result = self.kiln_run(scenario, dir, kilnd, round)?;
            if round > 0 {
                kiln_times.push(result.seconds);
                kiln_memory.push(result.peak_mib);
                last = Some(result);
            }
            if self.docker.is_some() {
                self.prepare(scenario, dir, round * 2 + 1)?;
                let (seconds, peak_mib) = self.docker_run(scenario, dir)?;
                if round > 0 {
                    docker_times.push(seconds);
                    docker_memory.push(peak_mib);
                }
            }
        }
        Ok(Measured {
            kiln: kiln_times,
            reference: docker_times,
            kiln_memory,
            reference_memory: docker_memory,
            tool: "BuildKit",
            last,
        })
    }

    /// `kiln bake` of the scenario against BuildKit building the same targets: the base, then
    /// the services at once or one after another; interleaved after one warm-up each.
    fn bakes(&self, scenario: &Scenario, dir: &Path, kilnd: &Kilnd, runs: usize) -> anyhow::Result<Measured> {
        let (mut kiln_times, mut docker_times, mut last) = (Vec::new(), Vec::new(), None);
        for round in 0..=runs {
            let metadata = self.work.join(format!("{}-{round}.json", scenario.name));
            let started = Instant::now();
            let status = Command::new(&self.kiln)
                .env("KILN_ROOT", &kilnd.root)
                .env_remove("KILN_ADDR")
                .env("BASE", &self.base)
                .args(["bake", "--no-cache", "--progress", "plain", "--metadata-file"])
                .arg(&metadata)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            let seconds = started.elapsed().as_secs_f64();
            if !status.success() {
                bail!("kiln bake of {} failed (see {})", scenario.name, metadata.display());
            }
            let metadata: Value = serde_json::from_slice(&std::fs::read(&metadata)?)?;
            // A vertex several targets share counts once: its executing target's record.
            let executed = metadata
                .as_object()
                .into_iter()
                .flat_map(|targets| targets.values())
                .flat_map(|target| target["vertices"].as_array().into_iter().flatten())
                .filter(|v| v["kind"] == "exec" && v["status"] == "executed")
                .count() as u64;
            if round > 0 {
                kiln_times.push(seconds);
                last = Some(RunResult { seconds, executed, uploaded_files: 0, uploaded_bytes: 0, peak_mib: 0.0 });
            }
            if self.docker.is_some() {
                let seconds = self.docker_bake(scenario, dir)?;
                if round > 0 {
                    docker_times.push(seconds);
                }
            }
        }
        let tool = match scenario.mode {
            Mode::BakeSequential => "BuildKit, one after another",
            _ => "BuildKit, `docker build &` × 6",
        };
        Ok(Measured { kiln: kiln_times, reference: docker_times, tool, last, ..Measured::default() })
    }

    /// BuildKit building a bake scenario's base, then its `svc*` directories (at once, or
    /// one after another for [`Mode::BakeSequential`]), every step executed.
    fn docker_bake(&self, scenario: &Scenario, dir: &Path) -> anyhow::Result<f64> {
        let base_tag = format!("kiln-bench-bake-base:{}", self.nonce);
        let build = |args: &[&str], context: &Path, log: &Path| -> anyhow::Result<Child> {
            let mut command = self.docker_command(&["build", "--no-cache", "--network=none", "--progress=plain"]);
            command.args(args).arg(context).stdout(Stdio::null()).stderr(std::fs::File::create(log)?);
            Ok(command.spawn()?)
        };
        let mut services: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("svc")))
            .collect();
        services.sort();
        let started = Instant::now();
        let log = self.work.join(format!("{}-docker-base.log", scenario.name));
        let base = ["--build-arg", "BASE=kiln/busybox:latest", "-t", base_tag.as_str()];
        if !build(&base, &dir.join("base"), &log)?.wait()?.success() {
            bail!("docker build of {} base failed (see {})", scenario.name, log.display());
        }
        let arg = format!("BASE_IMAGE={base_tag}");
        let mut running = Vec::new();
        for (i, service) in services.iter().enumerate() {
            let log = self.work.join(format!("{}-docker-{i}.log", scenario.name));
            let child = build(&["--build-arg", &arg], service, &log)?;
            running.push((child, log));
            if scenario.mode == Mode::BakeSequential {
                let (mut child, log) = running.pop().expect("pushed");
                if !child.wait()?.success() {
                    bail!("docker build of {} failed (see {})", service.display(), log.display());
                }
            }
        }
        for (mut child, log) in running {
            if !child.wait()?.success() {
                bail!("docker build of {} failed (see {})", scenario.name, log.display());
            }
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Changes the context before a run as the mode wants; `salt` differs for every run.
    fn prepare(&self, scenario: &Scenario, dir: &Path, salt: usize) -> anyhow::Result<()> {
        if let Some(file) = &scenario.edit {
            // The nonce too: the daemons' caches outlive a bench run.
            std::fs::write(dir.join(file), format!("edited {} {salt}\n", self.nonce))?;
        }
        if let (Mode::Upload, Some(generate)) = (scenario.mode, scenario.generate) {
            generate_files(dir, generate, salt as u64 + 1)?;
        }
        Ok(())
    }

    fn kiln_command(&self, kilnd: &Kilnd, tcp: bool) -> Command {
        let mut command = Command::new(&self.kiln);
        command.env("KILN_ROOT", &kilnd.root).env_remove("KILN_ADDR");
        command.arg("build");
        if tcp {
            command.args(["--addr", &kilnd.addr]);
        }
        command.args(["--progress", "plain", "--build-arg", &format!("BASE={}", self.base)]);
        command
    }

    /// One timed Kiln run (all concurrent builds), with its executed RUN steps and uploads
    /// summed over the builds' metadata files.
    fn kiln_run(&self, scenario: &Scenario, dir: &Path, kilnd: &Kilnd, round: usize) -> anyhow::Result<RunResult> {
        let tcp = matches!(scenario.mode, Mode::Upload | Mode::Reupload);
        let memory = PeakMemory::start();
        let started = Instant::now();
        let children: Vec<(Child, PathBuf)> = (0..scenario.concurrent)
            .map(|i| {
                let metadata = self.work.join(format!("{}-{round}-{i}.json", scenario.name));
                let mut command = self.kiln_command(kilnd, tcp);
                if scenario.mode == Mode::Cold {
                    command.arg("--no-cache");
                }
                if let Some(n) = scenario.max_parallelism {
                    command.args(["--max-parallelism", &n.to_string()]);
                }
                command.arg("--metadata-file").arg(&metadata).arg(dir).stdout(Stdio::null()).stderr(Stdio::null());
                command.spawn().map(|child| (child, metadata))
            })
            .collect::<Result<_, _>>()?;
        let mut result = RunResult { seconds: 0.0, executed: 0, uploaded_files: 0, uploaded_bytes: 0, peak_mib: 0.0 };
        let mut metadata_files = Vec::new();
        for (mut child, metadata) in children {
            if !child.wait()?.success() {
                bail!("kiln build of {} failed (see {})", scenario.name, metadata.display());
            }
            metadata_files.push(metadata);
        }
        result.seconds = started.elapsed().as_secs_f64();
        result.peak_mib = memory.stop();
        for metadata in metadata_files {
            let metadata: Value = serde_json::from_slice(&std::fs::read(&metadata)?)?;
            result.executed += metadata["vertices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["kind"] == "exec" && v["status"] == "executed")
                .count() as u64;
            result.uploaded_files += metadata["context"]["uploaded_files"].as_u64().unwrap_or(0);
            result.uploaded_bytes += metadata["context"]["uploaded_bytes"].as_u64().unwrap_or(0);
        }
        Ok(result)
    }

    fn docker_command(&self, args: &[&str]) -> Command {
        let docker = self.docker.as_ref().expect("checked");
        let mut command = Command::new("/usr/bin/docker");
        command.env("DOCKER_HOST", &docker.host).env("DOCKER_BUILDKIT", "1").args(args);
        command
    }

    /// One timed BuildKit run (all concurrent builds): seconds, and the machine's peak memory
    /// (MiB). A run where a build failed is made once more before giving up (BuildKit 0.8
    /// occasionally fails one of 20 parallel containers), and reported with its log.
    fn docker_run(&self, scenario: &Scenario, dir: &Path) -> anyhow::Result<(f64, f64)> {
        let mut failure = None;
        for _ in 0..2 {
            let memory = PeakMemory::start();
            let started = Instant::now();
            let children: Vec<(Child, PathBuf)> = (0..scenario.concurrent)
                .map(|i| {
                    let log = self.work.join(format!("{}-docker-{i}.log", scenario.name));
                    let mut command = self.docker_command(&[
                        "build",
                        "--network=none",
                        "--progress=plain",
                        "--build-arg",
                        "BASE=kiln/busybox:latest",
                    ]);
                    if scenario.mode == Mode::Cold {
                        command.arg("--no-cache");
                    }
                    let file = std::fs::File::create(&log)?;
                    command.arg(dir).stdout(Stdio::null()).stderr(file).spawn().map(|child| (child, log))
                })
                .collect::<Result<_, std::io::Error>>()?;
            let mut failed = None;
            for (mut child, log) in children {
                if !child.wait()?.success() {
                    failed = Some(log);
                }
            }
            match failed {
                None => return Ok((started.elapsed().as_secs_f64(), memory.stop())),
                Some(log) => {
                    eprintln!("docker build of {} failed (see {}); once more", scenario.name, log.display());
                    failure = Some(log);
                }
            }
        }
        bail!("docker build of {} failed twice (see {})", scenario.name, failure.unwrap_or_default().display())
    }

    /// Drops Docker's build cache and dangling images (the large scenarios leave gigabytes).
    fn docker_prune(&self) {
        if self.docker.is_some() {
            let _ = self.docker_command(&["builder", "prune", "-af"]).stdout(Stdio::null()).status();
            let _ = self.docker_command(&["image", "prune", "-f"]).stdout(Stdio::null()).status();
        }
    }

    /// Kiln pushing the scenario's (cached) image to a new repository per run, against
    /// `skopeo copy` of the same image from an OCI layout to a new repository per run. Both
    /// upload: Kiln's daemon is restarted before each run (on the same store), so it does not
    /// remember the repositories it could mount the blobs from, as skopeo's blob-info cache
    /// is removed.
    fn push(&self, scenario: &Scenario, dir: &Path, runs: usize) -> anyhow::Result<Measured> {
        let layout = self.work.join(format!("{}-layout", scenario.name));
        let root = self.bench_dir.join(format!("kiln-{}-{}", scenario.name, self.nonce));
        let (mut kiln_times, mut skopeo_times) = (Vec::new(), Vec::new());
        for round in 0..=runs {
            let name = format!("{}/bench/{}-kiln-{}-{round}:latest", self.registry, scenario.name, self.nonce);
            let kilnd = Kilnd::start(&root, round == 0, OWN_PORT, None)?;
            let seconds = self.kiln_push(&kilnd, dir, &name)?;
            drop(kilnd);
            if round == 0 {
                // The reference copies the very image Kiln pushed.
                remove_tree(&layout)?;
                skopeo(&["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{name}"), &oci(&layout)])?;
            } else {
                kiln_times.push(seconds);
            }
            let target =
                format!("docker://{}/bench/{}-skopeo-{}-{round}:latest", self.registry, scenario.name, self.nonce);
            let started = Instant::now();
            skopeo(&["copy", "--quiet", "--dest-tls-verify=false", &oci(&layout), &target])?;
            if round > 0 {
                skopeo_times.push(started.elapsed().as_secs_f64());
            }
        }
        remove_tree(&layout)?;
        remove_tree(&root)?;
        Ok(Measured { kiln: kiln_times, reference: skopeo_times, tool: "skopeo copy", ..Measured::default() })
    }

    fn export(&self, scenario: &Scenario, dir: &Path, runs: usize) -> anyhow::Result<Measured> {
        let root = self.bench_dir.join(format!("kiln-{}-{}", scenario.name, self.nonce));
        let (mut kiln_times, mut docker_times) = (Vec::new(), Vec::new());
        for round in 0..=runs {
            let name =
                |tool: &str| format!("{}/bench/{}-{tool}-{}-{round}:latest", self.registry, scenario.name, self.nonce);
            let kilnd = Kilnd::start(&root, true, OWN_PORT, None)?;
            let kiln = self.kiln_push(&kilnd, dir, &name("kiln"))?;
            drop(kilnd);
            let tag = name("docker");
            let docker =
                self.docker_build(dir, &["--no-cache", "-t", &tag])? + self.docker_timed(&["push", "--quiet", &tag])?;
            self.docker_timed(&["rmi", "--force", &tag])?;
            if round > 0 {
                kiln_times.push(kiln);
                docker_times.push(docker);
            }
        }
        remove_tree(&root)?;
        Ok(Measured {
            kiln: kiln_times,
            reference: docker_times,
            tool: "BuildKit + docker push",
            ..Measured::default()
        })
    }

    /// One `kiln build` pushing the image to `name`; its wall time.
    fn kiln_push(&self, kilnd: &Kilnd, dir: &Path, name: &str) -> anyhow::Result<f64> {
        let started = Instant::now();
        let output = self
            .kiln_command(kilnd, false)
            .arg("--output")
            .arg(format!("type=image,name={name},push=true"))
            .arg(dir)
            .output()?;
        if !output.status.success() {
            bail!("kiln build --output ...push=true of {name} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// One `kiln build` of `dir` with `args` on `kilnd`; its wall time and executed RUN steps.
    fn kiln_timed(&self, kilnd: &Kilnd, dir: &Path, args: &[&str]) -> anyhow::Result<(f64, u64)> {
        let metadata = self.work.join(format!("timed-{}.json", self.nonce));
        let started = Instant::now();
        let output =
            self.kiln_command(kilnd, false).args(args).arg("--metadata-file").arg(&metadata).arg(dir).output()?;
        let seconds = started.elapsed().as_secs_f64();
        if !output.status.success() {
            bail!("kiln build {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let metadata: Value = serde_json::from_slice(&std::fs::read(&metadata)?)?;
        let executed = metadata["vertices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["kind"] == "exec" && v["status"] == "executed")
            .count() as u64;
        Ok((seconds, executed))
    }

    /// One docker command that must succeed; its wall time.
    fn docker_timed(&self, args: &[&str]) -> anyhow::Result<f64> {
        let started = Instant::now();
        let output = self.docker_command(args).output()?;
        if !output.status.success() {
            bail!("docker {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// One timed `docker build` of `dir` from the bench's base image, with `args`.
    fn docker_build(&self, dir: &Path, args: &[&str]) -> anyhow::Result<f64> {
        let mut all = vec!["build", "--network=none", "--build-arg", "BASE=kiln/busybox:latest"];
        all.extend_from_slice(args);
        let dir = dir.to_string_lossy();
        all.push(&dir);
        self.docker_timed(&all)
    }

    /// BuildKit building `dir` with the inline cache into `tag`, then pushing it.
    fn docker_export(&self, dir: &Path, tag: &str) -> anyhow::Result<f64> {
        let build = self.docker_build(dir, &["--build-arg", "BUILDKIT_INLINE_CACHE=1", "-t", tag])?;
        Ok(build + self.docker_timed(&["push", "--quiet", tag])?)
    }

    /// Kiln exporting the (cached) scenario's cache with mode=max to a new ref per run,
    /// against BuildKit's inline cache export (build and push) to a new repository per run.
    /// The re-export of an unchanged cache to the same ref is reported apart.
    fn cache_export(&self, scenario: &Scenario, dir: &Path, kilnd: &Kilnd, runs: usize) -> anyhow::Result<Measured> {
        let (mut kiln_times, mut docker_times, mut again) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=runs {
            let reference = format!("{}/bench/{}-kiln-{}-{round}:cache", self.registry, scenario.name, self.nonce);
            let to = format!("type=registry,ref={reference},mode=max");
            let (seconds, _) = self.kiln_timed(kilnd, dir, &["--cache-to", &to])?;
            let (unchanged, _) = self.kiln_timed(kilnd, dir, &["--cache-to", &to])?;
            if self.docker.is_some() {
                let tag = format!("{}/bench/{}-docker-{}-{round}:latest", self.registry, scenario.name, self.nonce);
                let seconds = self.docker_export(dir, &tag)?;
                if round > 0 {
                    docker_times.push(seconds);
                }
            }
            if round > 0 {
                kiln_times.push(seconds);
                again.push(unchanged);
            }
        }
        eprintln!("{}: unchanged re-export, median {:.2} s", scenario.name, median(&again));
        Ok(Measured { kiln: kiln_times, reference: docker_times, tool: "BuildKit inline cache", ..Measured::default() })
    }

    /// An empty Kiln daemon importing the scenario's cache (exported once, mode=max) until
    /// every step is cached, against BuildKit with its build cache pruned building with
    /// `--cache-from` an image pushed with the inline cache.
    fn cache_import(&self, scenario: &Scenario, dir: &Path, kilnd: &Kilnd, runs: usize) -> anyhow::Result<Measured> {
        let reference = format!("{}/bench/{}-kiln-{}:cache", self.registry, scenario.name, self.nonce);
        self.kiln_timed(kilnd, dir, &["--cache-to", &format!("type=registry,ref={reference},mode=max")])?;
        let tag = format!("{}/bench/{}-docker-{}:latest", self.registry, scenario.name, self.nonce);
        if self.docker.is_some() {
            self.docker_export(dir, &tag)?;
        }
        let root = self.bench_dir.join(format!("kiln-{}-{}", scenario.name, self.nonce));
        let from = format!("type=registry,ref={reference}");
        let (mut kiln_times, mut docker_times) = (Vec::new(), Vec::new());
        for round in 0..=runs {
            let empty = Kilnd::start(&root, true, OWN_PORT, None)?;
            let (seconds, executed) = self.kiln_timed(&empty, dir, &["--cache-from", &from])?;
            drop(empty);
            if executed > 0 {
                bail!("{executed} steps executed on import; every one should be cached");
            }
            if self.docker.is_some() {
                self.docker_prune();
                let _ = self.docker_command(&["rmi", "-f", &tag]).stdout(Stdio::null()).stderr(Stdio::null()).status();
                let seconds = self.docker_build(dir, &["--cache-from", &tag])?;
                if round > 0 {
                    docker_times.push(seconds);
                }
            }
            if round > 0 {
                kiln_times.push(seconds);
            }
        }
        remove_tree(&root)?;
        Ok(Measured { kiln: kiln_times, reference: docker_times, tool: "BuildKit inline cache", ..Measured::default() })
    }

    /// A daemon with an empty store building `FROM` the scenario's image (pushed once by the
    /// shared daemon), against `skopeo copy` of the image into an empty OCI layout.
    fn pull(&self, scenario: &Scenario, dir: &Path, kilnd: &Kilnd, runs: usize) -> anyhow::Result<Measured> {
        let image = format!("{}/bench/{}-{}:latest", self.registry, scenario.name, self.nonce);
        self.kiln_push(kilnd, dir, &image)?;
        let from = self.work.join(format!("{}-from", scenario.name));
        remove_tree(&from)?;
        std::fs::create_dir_all(&from)?;
        std::fs::write(from.join("Dockerfile"), format!("FROM {image}\nRUN true\n"))?;
        let root = self.bench_dir.join(format!("kiln-{}-{}", scenario.name, self.nonce));
        let layout = self.work.join(format!("{}-layout", scenario.name));
        let (mut kiln_times, mut skopeo_times) = (Vec::new(), Vec::new());
        let mut last = None;
        for round in 0..=runs {
            let empty = Kilnd::start(&root, true, OWN_PORT, None)?;
            let result = self.kiln_run(
                &Scenario {
                    name: scenario.name.clone(),
                    dir: from.clone(),
                    ideal: None,
                    mode: Mode::Cold,
                    concurrent: 1,
                    max_parallelism: None,
                    daemon_max_parallelism: None,
                    edit: None,
                    executions: None,
                    generate: None,
                },
                &from,
                &empty,
                round,
            )?;
            drop(empty);
            remove_tree(&layout)?;
            let started = Instant::now();
            skopeo(&["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{image}"), &oci(&layout)])?;
            if round > 0 {
                skopeo_times.push(started.elapsed().as_secs_f64());
                kiln_times.push(result.seconds);
                last = Some(result);
            }
        }
        remove_tree(&root)?;
        remove_tree(&layout)?;
        Ok(Measured { kiln: kiln_times, reference: skopeo_times, tool: "skopeo copy", last, ..Measured::default() })
    }
}

fn oci(layout: &Path) -> String {
    format!("oci:{}:image", layout.display())
}

/// Runs skopeo without its blob-info cache, which would otherwise turn a push into a
/// cross-repository mount of blobs it saw before and measure nothing.
fn skopeo(args: &[&str]) -> anyhow::Result<()> {
    let _ = std::fs::remove_file("/var/lib/containers/cache/blob-info-cache-v1.boltdb");
    let output = Command::new("skopeo").args(args).output().context("running skopeo")?;
    if !output.status.success() {
        bail!("skopeo {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// Writes the generated files under `dir/data/`, their content a function of `salt` (so a
/// new salt changes every file) and of the file's index.
fn generate_files(dir: &Path, generate: Generate, salt: u64) -> anyhow::Result<()> {
    let size = (generate.bytes / generate.files as u64) as usize;
    let mut buffer = vec![0u8; size];
    for index in 0..generate.files {
        let sub = dir.join(format!("data/{:03}", index / 100));
        if index % 100 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        // splitmix64: fast, and incompressible enough that gzip cannot shrink it.
        let mut state = salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_add(1);
        for word in buffer.chunks_mut(8) {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            word.copy_from_slice(&z.to_le_bytes()[..word.len()]);
        }
        std::fs::write(sub.join(format!("{index:05}.bin")), &buffer)?;
    }
    Ok(())
}

fn stats(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({"median": sorted[sorted.len() / 2], "min": sorted[0], "max": sorted[sorted.len() - 1], "samples": samples})
}

fn median(samples: &[f64]) -> f64 {
    stats(samples)["median"].as_f64().unwrap_or(0.0)
}

fn markdown(report: &Value) -> String {
    let mut out = format!(
        "Machine: {}. Date: {}. {} timed runs per tool after one warm-up, interleaved. Times in seconds (median, min–max).\n\n",
        report["machine"].as_str().unwrap_or("?"),
        report["date"].as_str().unwrap_or("?"),
        report["runs"]
    );
    let scenarios = report["scenarios"].as_array().cloned().unwrap_or_default();
    if !scenarios.is_empty() {
        out.push_str(
            "| scenario | ideal | Kiln | overhead | reference | Kiln/reference | executions (expected) | uploaded |\n|---|---|---|---|---|---|---|---|\n",
        );
    }
    let cell = |v: &Value| match v.get("median") {
        Some(m) => format!(
            "{:.2} ({:.2}–{:.2})",
            m.as_f64().unwrap_or(0.0),
            v["min"].as_f64().unwrap_or(0.0),
            v["max"].as_f64().unwrap_or(0.0)
        ),
        None => "n/a".into(),
    };
    for s in &scenarios {
        if let Some(error) = s["error"].as_str() {
            out.push_str(&format!(
                "| {} | failed: {} |||||||\n",
                s["name"].as_str().unwrap_or("?"),
                error.replace('|', "/")
            ));
            continue;
        }
        let ratio = s["ratio"].as_f64().map_or("n/a".into(), |r| format!("{r:.2}"));
        let executions = match (s["executions"].as_u64(), s["expected_executions"].as_u64()) {
            (Some(got), Some(want)) => format!("{got} ({want})"),
            (Some(got), None) => got.to_string(),
            _ => "".into(),
        };
        let reference = match s["reference_tool"].as_str() {
            Some(tool) => format!("{tool} {}", cell(&s["reference"])),
            None => "n/a".into(),
        };
        let uploaded = match (s["uploaded_files"].as_u64(), s["uploaded_bytes"].as_u64()) {
            (Some(files), Some(bytes)) => format!("{files} files, {:.1} MiB", bytes as f64 / 1048576.0),
            _ => "".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {reference} | {ratio} | {executions} | {uploaded} |\n",
            s["name"].as_str().unwrap_or("?"),
            s["ideal"].as_f64().map_or("–".into(), |i| format!("{i:.2}")),
            cell(&s["kiln"]),
            s["overhead"].as_f64().map_or("–".into(), |o| format!("{o:+.2}")),
        ));
    }
    out.push_str(&dispatch::markdown(report["dispatch"].as_array().map(Vec::as_slice).unwrap_or_default()));
    out.push_str(&dispatch::failover_markdown(report["failover"].as_array().map(Vec::as_slice).unwrap_or_default()));
    out.push_str(&warmup::markdown(report["warmup"].as_array().map(Vec::as_slice).unwrap_or_default()));
    out.push_str(&dispatch::trace_overhead_markdown(&report["tracing"]));
    out.push_str(&burst::markdown(&report["burst"]));
    out.push_str(&burst::wide_markdown(&report["cluster_wide"]));
    out
}

/// A private dockerd with the base image loaded from the same OCI layout, when Docker is
/// installed.
fn start_docker(bench_dir: &Path, layout: &Path) -> anyhow::Result<Option<Dockerd>> {
    start_dockerd(bench_dir, layout, "docker")
}

/// A dockerd named `name` (its data root `BENCH/NAME`, its log `BENCH/NAME.log`, its socket
/// of its own), with the base image loaded, when Docker is installed.
pub(crate) fn start_dockerd(bench_dir: &Path, layout: &Path, name: &str) -> anyhow::Result<Option<Dockerd>> {
    if !Path::new("/usr/sbin/dockerd").exists() {
        eprintln!("Docker is not installed: measuring Kiln alone");
        return Ok(None);
    }
    let exec_root = PathBuf::from(format!("/tmp/kiln-bench-{name}-{}", std::process::id()));
    let host = format!("unix://{}/docker.sock", exec_root.display());
    std::fs::create_dir_all(&exec_root)?;
    let child = Command::new("dockerd")
        .args(["--iptables=false", "--bridge=none", "-H", &host])
        .arg("--data-root")
        .arg(bench_dir.join(name))
        .arg("--exec-root")
        .arg(exec_root.join("x"))
        .arg("--pidfile")
        .arg(exec_root.join("docker.pid"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(bench_dir.join(format!("{name}.log")))?)
        .spawn()
        .context("starting dockerd")?;
    let docker = Dockerd { child, host };
    let docker_cmd =
        |args: &[&str]| Command::new("/usr/bin/docker").args(args).env("DOCKER_HOST", &docker.host).output();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker_cmd(&["info"])?.status.success() {
        if Instant::now() > deadline {
            bail!("dockerd did not start; see {}", bench_dir.join(format!("{name}.log")).display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let archive = bench_dir.join(format!("{name}-base.tar"));
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
