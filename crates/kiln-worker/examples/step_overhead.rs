//! Measures the per-step overhead of an exec vertex (`RUN true`): overlay mount, runner
//! spawn, container create/start/exit/delete, upper-dir capture. Run as root:
//! `cargo run --release -p kiln-worker --example step_overhead -- [RUNS]`, with `PAUSE_MS=N`
//! to wait N ms before each step of the first series.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_cas::BlobStore;
use kiln_graph::{ExecOp, Input, NetworkMode, Op, SecurityMode, Vertex, VertexMeta};
use kiln_kv::MemoryKv;
use kiln_registry::{RegistryClient, RegistryOptions};
use kiln_testkit::{TestRegistry, busybox_rootfs, runner_binary, store_image};
use kiln_types::{Digest, Platform};
use kiln_worker::{BuildInputs, Worker, WorkerConfig};

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label}: median {:.1} ms, min {:.1} ms, max {:.1} ms ({} runs)",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    );
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(30);
    let pause = Duration::from_millis(std::env::var("PAUSE_MS").ok().and_then(|p| p.parse().ok()).unwrap_or(0));
    let registry = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(BlobStore::open(&dir.path().join("cas"), Arc::new(MemoryKv::new())).unwrap());
    busybox_rootfs(&dir.path().join("rootfs"));
    let manifest = store_image(&cas, &dir.path().join("rootfs"), "linux/amd64");
    let base = registry.reference("kiln/busybox:bench");
    RegistryClient::new(RegistryOptions::default()).unwrap().push(&base, &manifest, &cas).await.unwrap();

    let mut config = WorkerConfig::new(&dir.path().join("worker")).unwrap();
    config.runner = runner_binary();
    let worker = Worker::open(config, Arc::new(MemoryKv::new())).unwrap();
    let build = BuildInputs { contexts: HashMap::new(), secrets: HashMap::new(), ..BuildInputs::default() };
    let meta = |name: &str| VertexMeta { name: name.into(), stage: None, platform: None, lines: None };
    let source = Vertex {
        digest: Digest::of(b"source"),
        op: Op::Source(kiln_graph::SourceOp::Image { reference: base, platform: Platform::host() }),
        inputs: vec![],
        meta: meta("FROM"),
    };
    let started = Instant::now();
    let image = worker.execute(&source, &[], &build, None).await.unwrap().snapshot;
    println!("pull + unpack of the base image: {:.1} ms", started.elapsed().as_secs_f64() * 1000.0);

    let exec = Vertex {
        digest: Digest::of(b"exec"),
        op: Op::Exec(ExecOp {
            args: vec!["/bin/true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::None,
            security: SecurityMode::Sandbox,
            rootfs: Input::Index(0),
            mounts: vec![],
            platform: Platform::host(),
        }),
        inputs: vec![source.digest],
        meta: meta("RUN true"),
    };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs + 2 {
        // A machine idle between steps, as between steps that take a while, pays for what the
        // kernel does only when it has been idle (`PAUSE_MS=500`).
        std::thread::sleep(pause);
        let started = Instant::now();
        worker.execute(&exec, std::slice::from_ref(&image), &build, None).await.unwrap();
        samples.push(started.elapsed());
    }
    summary("exec vertex RUN /bin/true, network=none (2 warm-up runs dropped)", samples.split_off(2));

    let mut exec_default_net = exec.clone();
    if let Op::Exec(op) = &mut exec_default_net.op {
        op.network = NetworkMode::Default;
    }
    // The default network: the first step creates a namespace, later ones reuse it.
    let started = Instant::now();
    worker.execute(&exec_default_net, std::slice::from_ref(&image), &build, None).await.unwrap();
    println!(
        "first step on the isolated network (creates its namespace): {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        worker.execute(&exec_default_net, std::slice::from_ref(&image), &build, None).await.unwrap();
        samples.push(started.elapsed());
    }
    summary("exec vertex RUN /bin/true, network=default (isolated, pooled namespace)", samples);

    let mut config = WorkerConfig::new(&dir.path().join("worker-net")).unwrap();
    config.runner = runner_binary();
    config.default_network = kiln_model::DefaultNetwork::Worker;
    let worker = Worker::open(config, Arc::new(MemoryKv::new())).unwrap();
    let image = worker.execute(&source, &[], &build, None).await.unwrap().snapshot;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        worker.execute(&exec_default_net, std::slice::from_ref(&image), &build, None).await.unwrap();
        samples.push(started.elapsed());
    }
    summary("exec vertex RUN /bin/true, network=default with default-network = worker", samples);
}
