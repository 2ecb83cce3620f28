//! A CI burst on a fleet (issue 21): 24 builds from the six services of one monorepo, all
//! submitted within a second, on three builders.
//!
//! - Kiln: one coordinator and three workers (`max-parallelism = 2` each), separate `kilnd`
//!   processes on 127.0.41.x; then the same with the workers' default, adaptive capacity
//!   (docs/parallelism.md).
//! - The reference: three independent Docker daemons (their own data roots and sockets), each
//!   build given to one of them in turn, the way buildx gives a build to one node.
//!
//! Each service's Dockerfile has a shared base stage with a 2 s step, a 0.5 s tools stage
//! every service copies from, a 0.5 s lint step three services share, a deps step of its own
//! (0.5–1 s) and a trivial step of the build's revision. The steps are CPU work (busybox awk
//! loops, calibrated on this machine), as compilers are. Each service is built at four
//! revisions; the 24 builds arrive in a fixed shuffled order, 40 ms apart. Every run uses a
//! new nonce in the base step, so nothing is cached from an earlier run.
//!
//! Reported per run: the makespan (first submission to last build done), the p50 and p95 of
//! the builds' times, the RUN steps executed (Kiln: from the builds' records, with a check
//! that no step ran twice; Docker: the RUN steps its progress reports done rather than
//! cached, summed over builds), and the bytes Kiln's workers fetched from each other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::bench::{Dockerd, start_dockerd};
use crate::warmup::{Process, get_json, get_text, kilnd};
use crate::workspace_root;

/// Timed runs (after one warm-up).
const RUNS: usize = 3;
const SERVICES: usize = 6;
const REVISIONS: usize = 4;
const WORKERS: u8 = 3;
const SLOTS: usize = 2;
/// Between two submissions.
const STAGGER: Duration = Duration::from_millis(40);
/// The loopback network of the cluster: 127.0.NET.x.
const NET: u8 = 41;

/// awk loop iterations per CPU-second here, measured with the host's busybox.
fn calibrate() -> anyhow::Result<f64> {
    let iterations = 1_000_000u64;
    let started = Instant::now();
    let status = Command::new("busybox")
        .args(["awk", &format!("BEGIN {{ for (i = 0; i < {iterations}; i++) {{ a[i % 1000] = i; s += i }} }}")])
        .status()
        .context("busybox awk")?;
    if !status.success() {
        bail!("busybox awk failed");
    }
    Ok(iterations as f64 / started.elapsed().as_secs_f64())
}

/// A RUN step of about `seconds` of CPU, writing `out`.
fn work(per_second: f64, seconds: f64, tag: &str, out: &str) -> String {
    let n = (per_second * seconds) as u64;
    format!(
        "RUN awk 'BEGIN {{ for (i = 0; i < {n}; i++) {{ a[i % 1000] = i; s += i }}; print s, \"{tag}\" > \"{out}\" }}'"
    )
}

/// Service `i`'s Dockerfile.
fn dockerfile(i: usize, per_second: f64) -> String {
    let mut text = String::from("ARG BASE\nFROM ${BASE} AS base\nARG NONCE\n");
    text += &format!("{}\n", work(per_second, 2.0, "base $NONCE", "/base"));
    text += &format!("FROM base AS tools\n{}\n", work(per_second, 0.5, "tools", "/tools"));
    text += "FROM base\nCOPY --from=tools /tools /tools\n";
    if i < 3 {
        text += &format!("{}\n", work(per_second, 0.5, "lint", "/lint"));
    }
    text += &format!("{}\n", work(per_second, 0.5 + 0.1 * i as f64, &format!("deps of service {i}"), "/deps"));
    text += "ARG REV\nRUN echo $REV > /rev\n";
    text
}

/// The submissions in their order: (service, revision), shuffled by a fixed linear
/// congruential sequence so that services spread over Docker's daemons as they come.
fn submissions() -> Vec<(usize, usize)> {
    let mut order: Vec<(usize, usize)> =
        (0..REVISIONS).flat_map(|rev| (0..SERVICES).map(move |svc| (svc, rev))).collect();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..order.len()).rev() {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    order
}

/// The unique RUN steps of a run: the base, tools and lint steps once, each service's deps
/// once, each build's revision step.
fn unique_steps() -> usize {
    3 + SERVICES + SERVICES * REVISIONS
}

struct Build {
    child: Child,
    submitted: Instant,
    log: PathBuf,
    metadata: Option<PathBuf>,
}

/// One run's outcome for one tool.
struct Run {
    makespan: f64,
    times: Vec<f64>,
    logs: Vec<(PathBuf, Option<PathBuf>)>,
}

/// Submits every build (`start` makes build `k`'s process), waits for them all.
fn burst(start: &mut dyn FnMut(usize, usize, usize) -> anyhow::Result<Build>) -> anyhow::Result<Run> {
    let began = Instant::now();
    let mut builds = Vec::new();
    for (k, (service, revision)) in submissions().into_iter().enumerate() {
        if k > 0 {
            std::thread::sleep(STAGGER);
        }
        builds.push(start(k, service, revision)?);
    }
    // Each build's end is taken when it ends, whatever the order (one thread per build).
    let waits: Vec<_> = builds
        .into_iter()
        .map(|mut build| {
            std::thread::spawn(move || {
                let status = build.child.wait();
                (status, build.submitted.elapsed().as_secs_f64(), build.log, build.metadata)
            })
        })
        .collect();
    let (mut times, mut logs, mut failed) = (Vec::new(), Vec::new(), None);
    for wait in waits {
        let (status, seconds, log, metadata) = wait.join().map_err(|_| anyhow::anyhow!("a build's waiter panicked"))?;
        if !status?.success() {
            failed.get_or_insert(log.clone());
        }
        times.push(seconds);
        logs.push((log, metadata));
    }
    if let Some(log) = failed {
        bail!("a build failed; see {}", log.display());
    }
    Ok(Run { makespan: began.elapsed().as_secs_f64(), times, logs })
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The contexts: one directory per service with its Dockerfile.
fn contexts(dir: &Path, per_second: f64) -> anyhow::Result<Vec<PathBuf>> {
    (0..SERVICES)
        .map(|i| {
            let context = dir.join(format!("service-{i}"));
            std::fs::create_dir_all(&context)?;
            std::fs::write(context.join("Dockerfile"), dockerfile(i, per_second))?;
            Ok(context)
        })
        .collect()
}

/// The cluster: its coordinator and `workers` workers, with `slots` each (`None`: adaptive).
fn start_cluster(dir: &Path, workers: u8, slots: Option<usize>) -> anyhow::Result<Vec<Process>> {
    let slots = slots.map_or_else(String::new, |n| format!("max-parallelism = {n}\n"));
    let coordinator = dir.join("coordinator.toml");
    std::fs::write(
        &coordinator,
        format!(
            "[coordinator]\nlisten = \"127.0.{NET}.1:7070\"\nroot = \"{}\"\nmetrics-listen = \"127.0.{NET}.1:9090\"\n\n\
             [tls]\ninsecure = true\n",
            dir.join("coordinator").display()
        ),
    )?;
    let mut processes = vec![kilnd(&coordinator, &dir.join("coordinator.log"))?];
    for host in 2..2 + workers {
        let config = dir.join(format!("worker-{host}.toml"));
        std::fs::write(
            &config,
            format!(
                "[worker]\ncoordinator = \"http://127.0.{NET}.1:7070\"\nname = \"w{host}\"\nlisten = \"127.0.{NET}.{host}:7071\"\n\
                 root = \"{}\"\n{slots}metrics-listen = \"127.0.{NET}.{host}:9091\"\n\n[tls]\ninsecure = true\n",
                dir.join(format!("w{host}")).display()
            ),
        )?;
        processes.push(kilnd(&config, &dir.join(format!("worker-{host}.log")))?);
    }
    // Ready once every worker registered.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let registered = get_json(&format!("127.0.{NET}.1:9090"), "/v1/queue").ok().map(|queue| {
            queue["platforms"]
                .as_object()
                .map_or(0, |p| p.values().map(|l| l["workers"].as_u64().unwrap_or(0)).max().unwrap_or(0))
        });
        if registered == Some(u64::from(workers)) {
            return Ok(processes);
        }
        if Instant::now() > deadline {
            bail!("the cluster did not come up; see {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes the workers took in: from each other, from the registry (the base image) and from
/// a shared tier (none here).
fn transfer_in() -> f64 {
    (2..2 + WORKERS)
        .filter_map(|host| get_text(&format!("127.0.{NET}.{host}:9091"), "/metrics").ok())
        .flat_map(|page| {
            page.lines()
                .filter(|l| l.starts_with("kiln_transfer_bytes_total{") && l.contains("direction=\"in\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Kiln's executed RUN steps over a run's metadata files; fails if one ran twice.
fn kiln_executions(run: &Run) -> anyhow::Result<usize> {
    let mut executed = std::collections::HashMap::new();
    for (_, metadata) in &run.logs {
        let metadata: Value = serde_json::from_slice(&std::fs::read(metadata.as_ref().context("metadata")?)?)?;
        for vertex in metadata["vertices"].as_array().into_iter().flatten() {
            if vertex["kind"] == "exec" && vertex["status"] == "executed" {
                *executed.entry(vertex["digest"].as_str().unwrap_or_default().to_string()).or_insert(0) += 1;
            }
        }
    }
    if let Some((digest, times)) = executed.iter().find(|(_, n)| **n > 1) {
        bail!("step {digest} executed {times} times");
    }
    Ok(executed.len())
}

/// RUN steps BuildKit's progress reports done rather than cached, over a run's logs.
fn docker_executions(run: &Run) -> anyhow::Result<usize> {
    let mut total = 0;
    for (log, _) in &run.logs {
        let text = std::fs::read_to_string(log)?;
        let runs: std::collections::HashSet<&str> =
            text.lines().filter(|l| l.contains("] RUN ")).filter_map(|l| l.split_whitespace().next()).collect();
        let cached: std::collections::HashSet<&str> =
            text.lines().filter(|l| l.ends_with(" CACHED")).filter_map(|l| l.split_whitespace().next()).collect();
        total += runs.difference(&cached).count();
    }
    Ok(total)
}

fn summary(runs: &[(Run, usize, f64)]) -> Value {
    let makespans: Vec<f64> = runs.iter().map(|(r, _, _)| r.makespan).collect();
    let times: Vec<f64> = runs.iter().flat_map(|(r, _, _)| r.times.clone()).collect();
    json!({
        "makespan": {"median": percentile(&makespans, 0.5), "min": percentile(&makespans, 0.0), "max": percentile(&makespans, 1.0), "samples": makespans},
        "p50": percentile(&times, 0.5),
        "p95": percentile(&times, 0.95),
        "executions": runs.iter().map(|(_, e, _)| *e).collect::<Vec<_>>(),
        "bytes_in": runs.iter().map(|(_, _, b)| *b).collect::<Vec<_>>(),
    })
}

/// The burst on Kiln, [`RUNS`] times after a warm-up, on a cluster of workers with `slots`
/// each (`None`: adaptive).
fn kiln_burst(
    dir: &Path,
    contexts: &[PathBuf],
    base: &str,
    slots: Option<usize>,
) -> anyhow::Result<Vec<(Run, usize, f64)>> {
    let kiln = workspace_root().join("target/release/kiln");
    let nonce = |run: usize| format!("{}-{run}", std::process::id());
    let what = slots.map_or_else(|| "adaptive workers".to_string(), |n| format!("max-parallelism {n}"));
    // A cluster of its own, with nothing cached.
    let dir = &dir.join(slots.map_or_else(|| "adaptive".to_string(), |n| format!("fixed-{n}")));
    std::fs::create_dir_all(dir)?;
    let cluster = start_cluster(dir, WORKERS, slots)?;
    let mut kiln_runs = Vec::new();
    for run in 0..=RUNS {
        eprintln!("== ci-burst: Kiln ({what}), run {run} of {RUNS} (0: warm-up)");
        let before = transfer_in();
        let outcome = burst(&mut |k, service, revision| {
            let (log, metadata) = (dir.join(format!("kiln-{run}-{k}.log")), dir.join(format!("kiln-{run}-{k}.json")));
            let child = Command::new(&kiln)
                .args(["--addr", &format!("http://127.0.{NET}.1:7070"), "build", "--progress", "plain"])
                .args(["--build-arg", &format!("BASE={base}"), "--build-arg", &format!("NONCE={}", nonce(run))])
                .args(["--build-arg", &format!("REV={revision}"), "--metadata-file"])
                .arg(&metadata)
                .arg(&contexts[service])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()?;
            Ok(Build { child, submitted: Instant::now(), log, metadata: Some(metadata) })
        })?;
        let executions = kiln_executions(&outcome)?;
        if executions != unique_steps() {
            bail!("Kiln executed {executions} RUN steps, not the {} unique ones", unique_steps());
        }
        if run > 0 {
            let moved = transfer_in() - before;
            kiln_runs.push((outcome, executions, moved));
        }
    }
    drop(cluster);
    Ok(kiln_runs)
}

/// The burst, [`RUNS`] times after a warm-up, on Kiln (fixed and adaptive workers) and on
/// three Docker daemons.
pub fn run(base: &str, bench_dir: &Path) -> anyhow::Result<Value> {
    let dir = bench_dir.join("burst");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let per_second = calibrate()?;
    let contexts = contexts(&dir, per_second)?;
    let nonce = |run: usize| format!("{}-{run}", std::process::id());

    let kiln_runs = kiln_burst(&dir, &contexts, base, Some(SLOTS))?;
    let adaptive_runs = kiln_burst(&dir, &contexts, base, None)?;

    let layout = workspace_root().join("target/kiln-base/oci");
    let mut daemons: Vec<Dockerd> = Vec::new();
    for i in 0..WORKERS {
        match start_dockerd(&dir, &layout, &format!("docker-{i}"))? {
            Some(daemon) => daemons.push(daemon),
            None => break,
        }
    }
    let mut docker_runs = Vec::new();
    if daemons.len() == usize::from(WORKERS) {
        for run in 0..=RUNS {
            eprintln!("== ci-burst: three Docker daemons, run {run} of {RUNS} (0: warm-up)");
            let outcome = burst(&mut |k, service, revision| {
                let log = dir.join(format!("docker-{run}-{k}.log"));
                let child = Command::new("/usr/bin/docker")
                    .env("DOCKER_HOST", &daemons[k % daemons.len()].host)
                    .env("DOCKER_BUILDKIT", "1")
                    .args(["build", "--network=none", "--progress=plain", "--build-arg", "BASE=kiln/busybox:latest"])
                    .args(["--build-arg", &format!("NONCE={}", nonce(run)), "--build-arg", &format!("REV={revision}")])
                    .arg(&contexts[service])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log)?)
                    .spawn()?;
                Ok(Build { child, submitted: Instant::now(), log, metadata: None })
            })?;
            let executions = docker_executions(&outcome)?;
            if run > 0 {
                docker_runs.push((outcome, executions, 0.0));
            }
        }
    }
    drop(daemons);
    let kiln = summary(&kiln_runs);
    let adaptive = summary(&adaptive_runs);
    let reference = (!docker_runs.is_empty()).then(|| summary(&docker_runs));
    let ratio = reference
        .as_ref()
        .map(|r| kiln["makespan"]["median"].as_f64().unwrap_or(0.0) / r["makespan"]["median"].as_f64().unwrap_or(1.0));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "builds": SERVICES * REVISIONS,
        "unique_steps": unique_steps(),
        "cpu_per_second": per_second,
        "kiln": kiln,
        "kiln_adaptive": adaptive,
        "reference": reference,
        "ratio": ratio,
    }))
}

/// The burst as Markdown.
pub fn markdown(burst: &Value) -> String {
    if burst.is_null() {
        return String::new();
    }
    if let Some(error) = burst["error"].as_str() {
        return format!("\nCI burst: failed: {error}\n");
    }
    let row = |name: &str, v: &Value| {
        if v.is_null() {
            return format!("| {name} | n/a |||||\n");
        }
        let m = &v["makespan"];
        format!(
            "| {name} | {:.2} ({:.2}–{:.2}) | {:.2} | {:.2} | {:?} | {:?} |\n",
            m["median"].as_f64().unwrap_or(0.0),
            m["min"].as_f64().unwrap_or(0.0),
            m["max"].as_f64().unwrap_or(0.0),
            v["p50"].as_f64().unwrap_or(0.0),
            v["p95"].as_f64().unwrap_or(0.0),
            v["executions"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>())
                .unwrap_or_default(),
            v["bytes_in"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).map(|b| (b / 1024.0).round() as u64).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
    };
    format!(
        "\nCI burst: {} builds of {} services at once ({} unique RUN steps), one coordinator and three workers (max-parallelism 2) \
         against three Docker daemons given builds in turn; makespan and build times in seconds:\n\n\
         | tool | makespan (median, min–max) | p50 build | p95 build | RUN steps executed per run | KiB the workers took in per run |\n\
         |---|---|---|---|---|---|\n{}{}{}\nKiln/reference makespan: {}\n",
        burst["builds"],
        SERVICES,
        burst["unique_steps"],
        row("Kiln", &burst["kiln"]),
        row("Kiln, adaptive workers (no max-parallelism)", &burst["kiln_adaptive"]),
        row("three Docker daemons", &burst["reference"]),
        burst["ratio"].as_f64().map_or("n/a".into(), |r| format!("{r:.2}")),
    )
}

/// `wide-20-sleep1` (20 stages of `sleep 1`) on a cluster of one worker, [`RUNS`] times after
/// a warm-up each: with the worker's old default, four slots per CPU, and with its adaptive
/// capacity. Makespans in seconds.
pub fn wide(base: &str, bench_dir: &Path) -> anyhow::Result<Value> {
    let dir = bench_dir.join("cluster-wide");
    let _ = std::fs::remove_dir_all(&dir);
    let context = workspace_root().join("bench/scenarios/wide-20-sleep1");
    let kiln = workspace_root().join("target/release/kiln");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut results = serde_json::Map::new();
    for (name, slots) in [("fixed", Some(4 * cpus)), ("adaptive", None)] {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let cluster = start_cluster(&dir, 1, slots)?;
        let mut makespans = Vec::new();
        for run in 0..=RUNS {
            eprintln!("== cluster-wide: one worker ({name}), run {run} of {RUNS} (0: warm-up)");
            let log = dir.join(format!("build-{run}.log"));
            let began = Instant::now();
            let status = Command::new(&kiln)
                .args(["--addr", &format!("http://127.0.{NET}.1:7070"), "build", "--no-cache", "--progress", "plain"])
                .args(["--build-arg", &format!("BASE={base}")])
                .arg(&context)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .status()?;
            if !status.success() {
                bail!("the build failed; see {}", log.display());
            }
            if run > 0 {
                makespans.push(began.elapsed().as_secs_f64());
            }
        }
        drop(cluster);
        let stats = json!({"median": percentile(&makespans, 0.5), "min": percentile(&makespans, 0.0), "max": percentile(&makespans, 1.0), "samples": makespans, "slots": slots});
        results.insert(name.to_string(), stats);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Value::Object(results))
}

/// [`wide`] as Markdown.
pub fn wide_markdown(wide: &Value) -> String {
    if wide.is_null() {
        return String::new();
    }
    if let Some(error) = wide["error"].as_str() {
        return format!("\nwide-20-sleep1 on a cluster: failed: {error}\n");
    }
    let cell = |v: &Value| {
        format!(
            "{:.2} ({:.2}–{:.2})",
            v["median"].as_f64().unwrap_or(0.0),
            v["min"].as_f64().unwrap_or(0.0),
            v["max"].as_f64().unwrap_or(0.0)
        )
    };
    format!(
        "\nwide-20-sleep1 on a cluster of one worker (a coordinator and a worker, separate `kilnd`s), seconds:\n\n\
         | worker | makespan (median, min–max) |\n|---|---|\n\
         | max-parallelism {} (the old default, four per CPU) | {} |\n| adaptive (the default) | {} |\n",
        wide["fixed"]["slots"],
        cell(&wide["fixed"]),
        cell(&wide["adaptive"]),
    )
}
