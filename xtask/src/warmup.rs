//! A new worker becoming useful (issue 18, "Autoscaling, measured"): a coordinator with an S3
//! shared tier (moto) and real `kilnd` workers on loopback. A graph is built on a first worker,
//! which then goes with its store (as a pod scaled away does); the same graph plus one new step
//! is submitted with no worker connected, and a fresh worker is started. Measured: the time from
//! that worker's process start to its first assignment (the earliest of the build's jobs, from
//! their records: the moment each was queued plus its queue phase; the base image's source
//! comes first), how much of the earlier graph the shared tier served the fresh worker's build,
//! and the bytes the worker fetched from the shared tier.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::workspace_root;

/// Runs of the measurement (each with fresh stores and a fresh bucket prefix).
const RUNS: usize = 3;

/// Steps of the graph built first (and found again in the shared tier).
const STEPS: usize = 12;

/// A process of the measurement, killed when dropped.
pub(crate) struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).stderr(Stdio::null()).status();
        let _ = self.0.wait();
    }
}

/// Starts moto's S3 server on a free port with a bucket `warm`; its endpoint.
fn start_s3(dir: &Path) -> anyhow::Result<(Process, String)> {
    crate::setup::ensure_moto()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let venv = crate::setup::moto_venv().join("bin/moto_server");
    let program = if venv.exists() { venv } else { PathBuf::from("moto_server") };
    let log = std::fs::File::create(dir.join("moto.log"))?;
    let child = Command::new(program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting moto_server")?;
    let process = Process(child);
    let address = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    // moto answers once it listens; then the bucket is made with one PUT.
    loop {
        if http(&address, "PUT", "/warm").is_ok_and(|status| status == 200) {
            break;
        }
        if Instant::now() > deadline {
            bail!("moto_server did not start; see {}", dir.join("moto.log").display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((process, format!("http://{address}")))
}

/// One plain HTTP/1.0 request; the status.
fn http(address: &str, method: &str, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0))
}

pub(crate) fn kilnd(config: &Path, log: &Path) -> anyhow::Result<Process> {
    let log = std::fs::File::create(log)?;
    let child = Command::new(workspace_root().join("target/release/kilnd"))
        .arg("--config")
        .arg(config)
        .env("KILN_RUNNER", workspace_root().join("target/release/kiln-runner"))
        .envs([("AWS_ACCESS_KEY_ID", "kiln"), ("AWS_SECRET_ACCESS_KEY", "kiln"), ("AWS_EC2_METADATA_DISABLED", "true")])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting kilnd")?;
    Ok(Process(child))
}

fn worker_config(dir: &Path, name: &str, host: u8) -> anyhow::Result<PathBuf> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[worker]\ncoordinator = \"http://127.0.40.1:7070\"\nname = \"{name}\"\nlisten = \"127.0.40.{host}:7071\"\n\
             root = \"{}\"\nmax-parallelism = 4\nmetrics-listen = \"127.0.40.{host}:9091\"\n\n[tls]\ninsecure = true\n",
            dir.join(name).display()
        ),
    )?;
    Ok(config)
}

/// Polls `path` on the coordinator's metrics port until `done` holds for the JSON body.
fn wait_for_queue(what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(body) = get_json("127.0.40.1:9090", "/v1/queue")
            && done(&body)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn get_json(address: &str, path: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&get_text(address, path)?)?)
}

/// The body of `GET path`.
pub(crate) fn get_text(address: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `kiln build` of `context` on the coordinator; the metadata file's JSON.
fn build(kiln: &Path, context: &Path, metadata: &Path, extra: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new(kiln)
        .args(["--addr", "http://127.0.40.1:7070", "build", "--progress", "plain", "--metadata-file"])
        .arg(metadata)
        .args(extra)
        .arg(context)
        .output()
        .context("running kiln build")?;
    if !output.status.success() {
        bail!("kiln build failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&std::fs::read(metadata)?)?)
}

/// One run: the first worker's build, its loss, the fresh worker's.
fn measure(dir: &Path, base: &str, s3: &str, run: usize) -> anyhow::Result<Value> {
    let kiln = workspace_root().join("target/release/kiln");
    let coordinator = dir.join("coordinator.toml");
    std::fs::write(
        &coordinator,
        format!(
            "[coordinator]\nlisten = \"127.0.40.1:7070\"\nroot = \"{}\"\nmetrics-listen = \"127.0.40.1:9090\"\n\n\
             [coordinator.cache]\nshared = \"type=s3,bucket=warm,region=us-east-1,endpoint_url={s3},use_path_style=true,prefix=run{run}-{}/\"\n\n\
             [tls]\ninsecure = true\n",
            dir.join("coordinator").display(),
            now_ms()
        ),
    )?;
    let _coordinator = kilnd(&coordinator, &dir.join("coordinator.log"))?;
    wait_for_queue("the coordinator", |_| true)?;
    let context = dir.join("context");
    std::fs::create_dir_all(&context)?;
    let mut dockerfile = format!("FROM {base}\n");
    for step in 0..STEPS {
        dockerfile += &format!("RUN echo step {step} {run} > /step-{step}\n");
    }
    dockerfile += "ARG NONCE\nRUN echo $NONCE > /nonce\n";
    std::fs::write(context.join("Dockerfile"), dockerfile)?;

    // The first worker builds the graph; the shared tier keeps it.
    let first = kilnd(&worker_config(dir, "first", 2)?, &dir.join("first.log"))?;
    build(&kiln, &context, &dir.join("first.json"), &["--build-arg", "NONCE=first"])?;
    drop(first);
    std::fs::remove_dir_all(dir.join("first")).context("removing the first worker's store")?;
    wait_for_queue("the first worker to go", |queue| {
        queue["platforms"].as_object().is_some_and(|p| p.values().all(|l| l["workers"] == 0 && l["draining"] == 0))
    })?;

    // The same graph and one new step, with no worker: it waits in the queue.
    let metadata = dir.join("fresh.json");
    let waiting = Command::new(&kiln)
        .args(["--addr", "http://127.0.40.1:7070", "build", "--progress", "plain", "--metadata-file"])
        .arg(&metadata)
        .args(["--build-arg", "NONCE=fresh"])
        .arg(&context)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for_queue("the build's first job to queue", |queue| {
        queue["platforms"].as_object().is_some_and(|p| p.values().any(|l| l["queued"].as_u64() > Some(0)))
    })?;
    let config = worker_config(dir, "fresh", 3)?;
    let started = now_ms();
    let _fresh = kilnd(&config, &dir.join("fresh.log"))?;
    let output = waiting.wait_with_output()?;
    if !output.status.success() {
        bail!("the fresh worker's build failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let records: Vec<Value> = serde_json::from_slice::<Value>(&std::fs::read(&metadata)?)?["vertices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let new_step = records
        .iter()
        .find(|r| r["name"].as_str().is_some_and(|n| n.contains("$NONCE")))
        .context("no record of the new step")?;
    new_step["phases"]["fetch_ms"].as_u64().context("the new step fetched nothing")?;
    // Each job's assignment: when it was queued, plus its queue phase.
    let mut assigned = Vec::new();
    for record in &records {
        if let (Some(queued), Some(queue_ms)) = (record["started"].as_str(), record["phases"]["queue_ms"].as_u64()) {
            assigned.push(rfc3339_ms(queued)? + queue_ms);
        }
    }
    let first = assigned.into_iter().min().context("no job of the fresh worker's build was assigned")?;
    let earlier: Vec<&Value> = records.iter().filter(|r| r["digest"] != new_step["digest"]).collect();
    let shared = earlier.iter().filter(|r| r["status"] == "cached" && r["cache_source"] == "shared").count();
    // What the fresh worker brought from the shared tier (the layers under the new step).
    let page = get_text("127.0.40.3:9091", "/metrics")?;
    let series = "kiln_transfer_bytes_total{direction=\"in\",kind=\"shared\"} ";
    let fetched: f64 = page.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0);
    if fetched <= 0.0 {
        bail!("the fresh worker fetched nothing from the shared tier");
    }
    Ok(json!({
        "first_assignment_ms": first.saturating_sub(started),
        "shared_bytes_in": fetched,
        "earlier_vertices": earlier.len(),
        "from_shared_tier": shared,
        "hit_rate": shared as f64 / earlier.len().max(1) as f64,
        "statuses": earlier.iter().map(|r| format!("{}:{}", r["status"].as_str().unwrap_or("?"), r["cache_source"].as_str().unwrap_or("-"))).collect::<Vec<_>>(),
    }))
}

/// `2026-12-03T20:33:31.587Z` as ms since the epoch (the metadata file's times).
fn rfc3339_ms(text: &str) -> anyhow::Result<u64> {
    let parse = || -> Option<u64> {
        let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
        let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
        let (y, m, d) = (date.next()??, date.next()??, date.next()??);
        let (hms, millis) = time.split_once('.').unwrap_or((time, "0"));
        let mut hms = hms.split(':').map(|p| p.parse::<i64>().ok());
        let (h, min, s) = (hms.next()??, hms.next()??, hms.next()??);
        // Days from the civil date (Howard Hinnant's algorithm).
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let seconds = days * 86_400 + h * 3_600 + min * 60 + s;
        Some(seconds as u64 * 1000 + millis.parse::<u64>().ok()?)
    };
    parse().with_context(|| format!("{text:?} is not an RFC 3339 time"))
}

/// The measurement, [`RUNS`] times; one JSON object per run.
pub fn run(base: &str, bench_dir: &Path) -> anyhow::Result<Vec<Value>> {
    let dir = bench_dir.join("warmup");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (_s3, endpoint) = start_s3(&dir)?;
    let mut runs = Vec::new();
    for run in 1..=RUNS {
        eprintln!("== warm-up: a fresh worker after the first one left, run {run} of {RUNS}");
        let run_dir = dir.join(format!("run-{run}"));
        std::fs::create_dir_all(&run_dir)?;
        runs.push(measure(&run_dir, base, &endpoint, run)?);
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(runs)
}

/// The runs as a Markdown table.
pub fn markdown(runs: &[Value]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\nA fresh worker (coordinator with an S3 shared tier, real kilnd processes on loopback; the first worker and its store gone): \
         from its process start to its first assignment, and the share of the earlier graph its first build took from the shared tier:\n\n\
         | run | first assignment | from the shared tier | bytes fetched from it |\n|---|---|---|---|\n",
    );
    for (i, run) in runs.iter().enumerate() {
        out.push_str(&format!(
            "| {} | {} ms | {} of {} ({:.0}%) | {:.1} KiB |\n",
            i + 1,
            run["first_assignment_ms"],
            run["from_shared_tier"],
            run["earlier_vertices"],
            run["hit_rate"].as_f64().unwrap_or(0.0) * 100.0,
            run["shared_bytes_in"].as_f64().unwrap_or(0.0) / 1024.0
        ));
    }
    out
}
