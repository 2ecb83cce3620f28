//! Coordinator scale with fake workers: BUILDS concurrent builds, each a chain of VERTICES
//! vertices, on an executor that finishes every vertex at once. Prints one JSON object:
//! dispatch throughput, p50/p99 dispatch latency (an input finishing → its user starting)
//! and peak RSS.
//!
//! With WORKERS, vertices go through the coordinator's cluster path instead: placement in
//! `ClusterState`, assignments over each fake worker's channel, results reported back. Each
//! fake worker has SLOTS slots; latency is an input's report → its user's assignment arriving.
//! With EXEC_MS, each fake worker holds every vertex for EXEC_MS on average (uniformly
//! between half and one and a half times) before reporting it: a load below saturation,
//! about BUILDS ÷ EXEC_MS vertices per millisecond.
//!
//! With REPLICAS (after EXEC_MS; 0: none), the coordinator is replicated: REPLICAS raft
//! members in this process, each on its own sled directory (synced) and serving the raft
//! service on 127.0.0.ID over gRPC, and every finished vertex's cache entry commits through
//! the log before the solver reports it done (as a replicated `kilnd` does). The row adds the
//! commit latency per entry and the entries the log took.
//!
//! `cargo run --release -p kiln-daemon --example dispatch -- BUILDS VERTICES SLOTS [WORKERS [EXEC_MS [REPLICAS]]]`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_cluster::{Cluster, ClusterBuild, ClusterExecutor, ClusterSettings, ToWorker};
use kiln_graph::{ExecOp, GraphBuilder, Input, NetworkMode, Op, Output, SecurityMode, SourceOp, Vertex, VertexMeta};
use kiln_model::{BoxFuture, Executed, Executor, Failed, Layers, LogSink, WorkerInfo};
use kiln_raft::ReplicatedKv;
use kiln_solver::{BuildOptions, CACHE_TREE, Durable, Solver, SolverConfig};
use kiln_types::{Digest, Platform};

// Killing and restarting members is the failover benchmark's.
#[allow(dead_code)]
#[path = "common/members.rs"]
mod members;

use members::Members;

#[derive(Default)]
struct Fake {
    /// When each vertex finished, and when each started, by digest.
    finished: Mutex<HashMap<Digest, Instant>>,
    latencies: Mutex<Vec<Duration>>,
}

impl Executor for Fake {
    type Output = u64;
    type Build = ();

    fn execute(&self, vertex: Vertex, _: Vec<u64>, _: Arc<()>, _: LogSink) -> BoxFuture<Result<Executed<u64>, Failed>> {
        let now = Instant::now();
        let mut finished = self.finished.lock().unwrap();
        if let Some(input) = vertex.inputs.first().and_then(|d| finished.get(d)) {
            self.latencies.lock().unwrap().push(now.saturating_duration_since(*input));
        }
        finished.insert(vertex.digest, Instant::now());
        Box::pin(async { Ok(Executed::new(1)) })
    }

    fn worker_name(&self) -> String {
        "fake".into()
    }
}

fn chain(build: usize, vertices: usize) -> kiln_graph::Graph {
    let meta = |name: String| VertexMeta { name, stage: None, platform: None, lines: None };
    let mut graph = GraphBuilder::new();
    let source = Op::Source(SourceOp::Local {
        name: "context".into(),
        include: vec![],
        exclude: vec![],
        content: Digest::of(format!("build {build}").as_bytes()),
    });
    let mut last = graph.add(source, vec![], meta("source".into())).unwrap();
    for step in 1..vertices {
        let op = Op::Exec(ExecOp {
            args: vec![format!("step {step}")],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::None,
            security: SecurityMode::Sandbox,
            rootfs: Input::Index(0),
            mounts: vec![],
            platform: Platform::host(),
        });
        last = graph.add(op, vec![last], meta(format!("step {step}"))).unwrap();
    }
    graph.finish(vec![Output { platform: Platform::host(), digest: Some(last) }])
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Fake workers on a cluster: each answers every assignment at once, or after about `exec`.
fn start_fake_workers(
    cluster: &Arc<Cluster<()>>,
    workers: usize,
    slots: usize,
    exec: Duration,
) -> Arc<Mutex<Vec<Duration>>> {
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let finished: Arc<Mutex<HashMap<Digest, Instant>>> = Arc::default();
    for n in 0..workers {
        let info = WorkerInfo {
            name: format!("fake-{n}"),
            platforms: vec![Platform::host()],
            labels: Default::default(),
            max_parallelism: slots,
            capacity: 0,
            free_disk: 0,
            cache_bytes: 0,
            address: format!("http://fake-{n}"),
            entitlements: Vec::new(),
        };
        let (session, mut assignments) =
            cluster.register(info, vec![], vec![]).expect("fake workers have unique names");
        let (cluster, latencies, finished) = (Arc::clone(cluster), Arc::clone(&latencies), Arc::clone(&finished));
        tokio::spawn(async move {
            let name = format!("fake-{n}");
            let mut beat = Instant::now();
            while let Some(message) = assignments.recv().await {
                let ToWorker::Assign(job) = message else { continue };
                let now = Instant::now();
                if let Some(input) = job.vertex.inputs.first().and_then(|d| finished.lock().unwrap().get(d).copied()) {
                    latencies.lock().unwrap().push(now.saturating_duration_since(input));
                }
                let id = job.id;
                let report = {
                    let (cluster, finished, name) = (Arc::clone(&cluster), Arc::clone(&finished), name.clone());
                    move || {
                        finished.lock().unwrap().insert(job.vertex.digest, Instant::now());
                        let output = Layers::default();
                        cluster.report(&name, job.id, job.epoch, Ok(Executed::new(output)));
                    }
                };
                if exec.is_zero() {
                    report();
                } else {
                    // Uniform in [exec/2, 3·exec/2) by job: steps of real builds do not end
                    // in lockstep.
                    let spread = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
                    let exec = exec.mul_f64(0.5 + spread);
                    tokio::spawn(async move {
                        tokio::time::sleep(exec).await;
                        report();
                    });
                }
                if beat.elapsed() > Duration::from_secs(1) {
                    cluster.heartbeat(&name, session, kiln_model::Beat::default());
                    beat = Instant::now();
                }
            }
        });
    }
    latencies
}

/// A replicated coordinator's log, in this process: the members and what commits through it.
struct Replicated {
    members: Members,
    leader: u64,
    durable: Durable,
    /// Each cache entry's time from the write to its commit on the leader.
    commits: Arc<Mutex<Vec<Duration>>>,
}

impl Replicated {
    /// `count` raft members; returns once one leads.
    async fn start(count: u64) -> Replicated {
        let members = Members::start(count).await;
        let leader = members.leader(None).await;
        let (replicated, proposer) = ReplicatedKv::new(Arc::clone(&members.member(leader).kv), &[CACHE_TREE]);
        tokio::spawn(proposer.run(Arc::downgrade(&members.member(leader).node)));
        let replicated = Arc::new(replicated);
        let commits: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let recorded = Arc::clone(&commits);
        let durable: Durable = Arc::new(move |key, value| {
            let started = Instant::now();
            let mut batch = kiln_kv::Batch::default();
            batch.put(key.to_string(), value);
            let written = replicated.write_durably(CACHE_TREE, batch);
            let recorded = Arc::clone(&recorded);
            Box::pin(async move {
                written.await.expect("the leader commits");
                recorded.lock().unwrap().push(started.elapsed());
                true
            })
        });
        Replicated { members, leader, durable, commits }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (builds, vertices, slots) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(50),
        args.get(2).copied().unwrap_or(100),
    );
    let workers = args.get(3).copied();
    let exec = Duration::from_millis(args.get(4).copied().unwrap_or(0) as u64);
    let replicas = args.get(5).copied().unwrap_or(0);
    let replicated = if replicas > 0 { Some(Replicated::start(replicas as u64).await) } else { None };
    let graphs: Vec<_> = (0..builds).map(|b| chain(b, vertices)).collect();
    let peak = Arc::new(Mutex::new(rss_mb()));
    let sampler = {
        let peak = Arc::clone(&peak);
        tokio::spawn(async move {
            loop {
                let rss = rss_mb();
                {
                    let mut peak = peak.lock().unwrap();
                    *peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let latencies = match workers {
        None => {
            let fake = Arc::new(Fake::default());
            let solver = Solver::start(
                Arc::clone(&fake),
                SolverConfig { parallelism: kiln_solver::Parallelism::Fixed(slots), ..SolverConfig::default() },
                None,
            )
            .unwrap();
            let mut handles: Vec<_> =
                graphs.into_iter().map(|g| solver.submit(g, BuildOptions::default(), Arc::new(()))).collect();
            for handle in &mut handles {
                let (result, _) = handle.wait().await;
                result.expect("fake builds succeed");
            }
            fake.latencies.lock().unwrap().clone()
        }
        Some(workers) => {
            let cluster = Cluster::<()>::new(ClusterSettings { lease_ms: 60_000, ..ClusterSettings::default() });
            let latencies = start_fake_workers(&cluster, workers, slots, exec);
            let executor = Arc::new(ClusterExecutor(Arc::clone(&cluster)));
            let durable = replicated.as_ref().map(|replicated| Arc::clone(&replicated.durable));
            let solver = Solver::start(
                executor,
                SolverConfig { parallelism: kiln_solver::Parallelism::Fixed(1 << 20), durable },
                None,
            )
            .unwrap();
            let mut handles: Vec<_> = graphs
                .into_iter()
                .enumerate()
                .map(|(id, g)| {
                    solver.submit(
                        g,
                        BuildOptions::default(),
                        Arc::new(ClusterBuild { id: id as u64, data: (), imports: None, cache_group: None }),
                    )
                })
                .collect();
            for handle in &mut handles {
                let (result, _) = handle.wait().await;
                result.expect("fake builds succeed");
            }
            latencies.lock().unwrap().clone()
        }
    };
    let elapsed = started.elapsed();
    sampler.abort();
    let mut latencies = latencies;
    latencies.sort();
    let total = builds * vertices;
    let mut row = serde_json::json!({
        "builds": builds, "vertices_per_build": vertices, "slots": slots, "workers": workers,
        "exec_ms": exec.as_millis() as u64,
        "vertices": total,
        "seconds": elapsed.as_secs_f64(),
        "dispatches_per_second": total as f64 / elapsed.as_secs_f64(),
        "p50_ms": percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        "p99_ms": percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        "peak_rss_mb": *peak.lock().unwrap(),
        "replicas": replicas,
    });
    if let Some(replicated) = &replicated {
        let mut commits = replicated.commits.lock().unwrap().clone();
        commits.sort();
        row["commit_p50_ms"] = (percentile(&commits, 0.50).as_secs_f64() * 1000.0).into();
        row["commit_p99_ms"] = (percentile(&commits, 0.99).as_secs_f64() * 1000.0).into();
        row["cache_entries"] = commits.len().into();
        row["log_entries"] = replicated.members.member(replicated.leader).node.status().commit.into();
    }
    println!("{row}");
}
