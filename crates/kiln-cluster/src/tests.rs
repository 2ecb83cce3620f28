//! The cluster driver with in-process fake workers: results, lost workers, recomputation.

use std::sync::Mutex;

use kiln_graph::{ExecOp, Input, NetworkMode, SecurityMode, VertexMeta};
use kiln_types::Platform;

use kiln_model::{LayerDesc, TierBlob};

use super::*;

fn info(name: &str) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        platforms: vec![Platform::host()],
        labels: Default::default(),
        max_parallelism: 4,
        capacity: 0,
        free_disk: 0,
        cache_bytes: 0,
        address: format!("http://{name}"),
        entitlements: Vec::new(),
    }
}

fn exec(name: &str, inputs: Vec<Digest>) -> Vertex {
    let op = Op::Exec(ExecOp {
        args: vec![name.to_string()],
        env: vec![],
        cwd: "/".into(),
        user: String::new(),
        network: NetworkMode::None,
        security: SecurityMode::Sandbox,
        rootfs: if inputs.is_empty() { Input::Scratch } else { Input::Index(0) },
        mounts: vec![],
        platform: Platform::host(),
    });
    let meta = VertexMeta { name: name.into(), stage: None, platform: None, lines: None };
    Vertex { digest: kiln_graph::vertex_digest(&op, &inputs), op, inputs, meta }
}

/// A fake worker that answers each assignment with one layer named after the vertex and the
/// worker (so a recomputation elsewhere gives different layers), logging what it ran.
fn fake(cluster: &Arc<Cluster<()>>, name: &str, ran: Arc<Mutex<Vec<(String, String)>>>) -> u64 {
    fake_holding(cluster, name, ran, vec![])
}

/// [`fake`], registering with `layers` already held.
fn fake_holding(
    cluster: &Arc<Cluster<()>>,
    name: &str,
    ran: Arc<Mutex<Vec<(String, String)>>>,
    layers: Vec<Digest>,
) -> u64 {
    fake_failing(cluster, name, ran, layers, |_| None)
}

/// [`fake_holding`], failing the jobs `fail` answers for instead of running them.
fn fake_failing(
    cluster: &Arc<Cluster<()>>,
    name: &str,
    ran: Arc<Mutex<Vec<(String, String)>>>,
    layers: Vec<Digest>,
    mut fail: impl FnMut(&Job<()>) -> Option<Failed> + Send + 'static,
) -> u64 {
    let (session, mut assignments) = cluster.register(info(name), layers, vec![]).unwrap();
    let (cluster, name) = (Arc::clone(cluster), name.to_string());
    tokio::spawn(async move {
        while let Some(ToWorker::Assign(job)) = assignments.recv().await {
            if let Some(failed) = fail(&job) {
                cluster.report(&name, job.id, job.epoch, Err(failed));
                continue;
            }
            ran.lock().unwrap().push((job.vertex.meta.name.clone(), name.clone()));
            let layer =
                LayerDesc { diff_id: Digest::of(format!("{}@{name}", job.vertex.meta.name).as_bytes()), size: 10 };
            // A step named `noop…` changes nothing, like `RUN cat /x`: its output is its input.
            let new = Some(layer).filter(|_| !job.vertex.meta.name.starts_with("noop"));
            let output = Layers { layers: job.inputs.iter().flat_map(|l| l.layers.clone()).chain(new).collect() };
            cluster.report(&name, job.id, job.epoch, Ok(Executed::new(output)));
        }
    });
    session
}

/// A log sink, and the lines it received.
fn collecting() -> (LogSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::clone(&lines);
    let sink = LogSink::new(move |line| {
        received.lock().unwrap().push(line.line);
        true
    });
    (sink, lines)
}

fn build() -> Arc<ClusterBuild<()>> {
    Arc::new(ClusterBuild { id: 1, data: (), imports: None, cache_group: None })
}

#[tokio::test]
async fn a_result_lost_with_its_worker_is_recomputed_before_its_user_runs() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let ran = Arc::new(Mutex::new(Vec::new()));
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let a = fake(&cluster, "a", Arc::clone(&ran));

    let base = exec("base", vec![]);
    let first = executor.execute(base.clone(), vec![], build(), LogSink::new(|_| true)).await.unwrap();
    assert_eq!(first.worker.as_deref(), Some("a"));

    // Worker a goes away with the only copy of base's layer; b arrives.
    cluster.disconnect("a", a);
    fake(&cluster, "b", Arc::clone(&ran));
    let (sink, lines) = collecting();
    let user = exec("user", vec![base.digest]);
    let second = executor.execute(user, vec![first.output.clone()], build(), sink).await.unwrap();
    assert_eq!(
        *ran.lock().unwrap(),
        [("base".to_string(), "a".to_string()), ("base".into(), "b".into()), ("user".into(), "b".into())]
    );
    // The user ran over the recomputed layer, which now stands in for the lost one.
    let recomputed = LayerDesc { diff_id: Digest::of(b"base@b"), size: 10 };
    assert_eq!(second.output.layers[0], recomputed);
    assert_eq!(cluster.substitute(&first.output).layers, [recomputed]);
    assert_eq!(*lines.lock().unwrap(), ["recomputing base: its result was lost with its worker"]);
}

#[tokio::test]
async fn a_lost_step_that_added_no_layer_is_recovered_through_its_producer() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let ran = Arc::new(Mutex::new(Vec::new()));
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let a = fake(&cluster, "a", Arc::clone(&ran));
    let sink = || LogSink::new(|_| true);
    let base = exec("base", vec![]);
    let first = executor.execute(base.clone(), vec![], build(), sink()).await.unwrap();
    let noop = exec("noop cat", vec![base.digest]);
    let same = executor.execute(noop.clone(), vec![first.output.clone()], build(), sink()).await.unwrap();
    assert_eq!(same.output, first.output);

    cluster.disconnect("a", a);
    fake(&cluster, "b", Arc::clone(&ran));
    let recovered = Arc::clone(&cluster).recover(same.output, sink()).await.unwrap();
    assert_eq!(recovered.layers, [LayerDesc { diff_id: Digest::of(b"base@b"), size: 10 }]);
    assert_eq!(ran.lock().unwrap().last(), Some(&("base".to_string(), "b".to_string())));
    let user = executor.execute(exec("user", vec![noop.digest]), vec![first.output], build(), sink()).await.unwrap();
    assert_eq!(user.output.layers[0], recovered.layers[0]);
}

#[tokio::test]
async fn recovery_deeper_than_the_bound_fails_as_a_lost_input() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let a = fake(&cluster, "a", Arc::new(Mutex::new(Vec::new())));
    let mut output = Layers::default();
    let mut parent = vec![];
    for n in 0..=MAX_RECOVERY_DEPTH {
        let step = exec(&format!("step{n}"), parent);
        let inputs = if output.layers.is_empty() { vec![] } else { vec![output] };
        output = executor.execute(step.clone(), inputs, build(), LogSink::new(|_| true)).await.unwrap().output;
        parent = vec![step.digest];
    }
    cluster.disconnect("a", a);
    fake(&cluster, "b", Arc::new(Mutex::new(Vec::new())));
    let error = Arc::clone(&cluster).recover(output, LogSink::new(|_| true)).await.unwrap_err();
    assert!(error.lost_input && error.message.contains("more than 1024"), "{error}");
}

#[tokio::test]
async fn a_lost_result_without_a_recipe_fails_as_a_lost_input() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    fake(&cluster, "b", Arc::new(Mutex::new(Vec::new())));
    let ghost = Layers { layers: vec![LayerDesc { diff_id: Digest::of(b"ghost"), size: 1 }] };
    let error = Arc::clone(&cluster).recover(ghost, LogSink::new(|_| true)).await.unwrap_err();
    assert!(error.lost_input && error.to_string().starts_with("lost input: "), "{error}");
}

#[tokio::test]
async fn merges_run_nowhere_and_a_dropped_execution_cancels_its_job() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let layer = |n: &[u8]| LayerDesc { diff_id: Digest::of(n), size: 1 };
    let merge = Vertex {
        digest: Digest::of(b"merge"),
        op: Op::Merge(kiln_graph::MergeOp {}),
        inputs: vec![Digest::of(b"x"), Digest::of(b"y")],
        meta: VertexMeta { name: "merge".into(), stage: None, platform: None, lines: None },
    };
    let inputs = vec![Layers { layers: vec![layer(b"1")] }, Layers { layers: vec![layer(b"2")] }];
    let merged = executor.execute(merge, inputs, build(), LogSink::new(|_| true)).await.unwrap();
    assert_eq!(merged.output.layers, [layer(b"1"), layer(b"2")]);

    // No worker: the job queues; dropping the execution removes it.
    let pending = executor.execute(exec("waits", vec![]), vec![], build(), LogSink::new(|_| true));
    let timed_out = tokio::time::timeout(std::time::Duration::from_millis(50), pending).await;
    assert!(timed_out.is_err());
    assert_eq!(cluster.counters().0, 0);
}

#[tokio::test]
async fn outputs_are_available_while_held_or_recomputable() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let a = fake(&cluster, "a", Arc::new(Mutex::new(Vec::new())));
    let made = executor.execute(exec("base", vec![]), vec![], build(), LogSink::new(|_| true)).await.unwrap();
    assert_eq!(executor.available(&made.output, &build()).as_deref(), Some("worker:a"));
    cluster.disconnect("a", a);
    assert_eq!(executor.available(&made.output, &build()).as_deref(), Some("local"), "its recipe can make it again");
    // What a restarted coordinator knows from its cache index: layers, no recipe.
    let restored = Layers { layers: vec![LayerDesc { diff_id: Digest::of(b"from before"), size: 1 }] };
    assert_eq!(executor.available(&restored, &build()), None);
    assert!(executor.available(&Layers::default(), &build()).is_some());
    // Unless the shared cache holds them: then they are fetched from there.
    let blob = TierBlob {
        cache: "type=local,src=/c".into(),
        digest: Digest::of(b"blob"),
        size: 1,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    cluster.add_tier([(Digest::of(b"from before"), blob.clone())]);
    assert_eq!(executor.available(&restored, &build()).as_deref(), Some("shared"));
    assert_eq!(cluster.tier_blob(&Digest::of(b"from before")), Some(blob));
}

#[tokio::test]
async fn an_output_is_unavailable_when_its_recipes_lead_to_lost_layers() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let executor = ClusterExecutor(Arc::clone(&cluster));
    // What a restarted coordinator knows of an earlier result: layers, no recipe; the
    // worker that comes back still holds them.
    let restored = Layers { layers: vec![LayerDesc { diff_id: Digest::of(b"restored"), size: 1 }] };
    let a = fake_holding(&cluster, "a", Arc::new(Mutex::new(Vec::new())), vec![Digest::of(b"restored")]);
    assert!(executor.available(&restored, &build()).is_some());
    let user = exec("user", vec![Digest::of(b"x")]);
    let made = executor.execute(user, vec![restored.clone()], build(), LogSink::new(|_| true)).await.unwrap();
    cluster.disconnect("a", a);
    fake(&cluster, "b", Arc::new(Mutex::new(Vec::new())));
    // The user's recipe needs the restored layers, which nothing holds and nothing can make.
    assert!(executor.available(&restored, &build()).is_none());
    assert!(executor.available(&made.output, &build()).is_none(), "a recipe over lost inputs is no way back");
}

#[tokio::test]
async fn a_shared_layer_a_worker_cannot_fetch_is_recomputed_not_trusted_again() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let ran = Arc::new(Mutex::new(Vec::new()));
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let a = fake(&cluster, "a", Arc::clone(&ran));
    let base = exec("base", vec![]);
    let first = executor.execute(base.clone(), vec![], build(), LogSink::new(|_| true)).await.unwrap();
    let layer = first.output.layers[0].diff_id;
    let blob = TierBlob {
        cache: "type=local,src=/gone".into(),
        digest: Digest::of(b"blob"),
        size: 1,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    cluster.add_tier([(layer, blob)]);
    cluster.disconnect("a", a);

    // Worker b finds the shared blob gone on its first job, then works.
    let mut fresh = true;
    fake_failing(&cluster, "b", Arc::clone(&ran), vec![], move |_| {
        std::mem::take(&mut fresh).then(|| Failed::lost_input("cache local:/gone: no such object"))
    });
    let user = exec("user", vec![base.digest]);
    let done = executor.execute(user, vec![first.output], build(), LogSink::new(|_| true)).await.unwrap();
    assert_eq!(done.worker.as_deref(), Some("b"));
    assert_eq!(cluster.tier_blob(&layer), None, "the stale tier entry is forgotten");
    let ran = ran.lock().unwrap().clone();
    assert!(ran.contains(&("base".to_string(), "b".to_string())), "base recomputed on b: {ran:?}");
}

#[tokio::test]
async fn work_a_worker_kept_across_a_lost_session_is_adopted_by_it_not_placed_by_locality() {
    let cluster = Cluster::<()>::new(ClusterSettings::default());
    let ran = Arc::new(Mutex::new(Vec::new()));
    let executor = ClusterExecutor(Arc::clone(&cluster));
    let base = Layers { layers: vec![LayerDesc { diff_id: Digest::of(b"base"), size: 1000 }] };
    let step = exec("step", vec![Digest::of(b"base vertex")]);
    // b holds the step's input, so locality would send the step there; a kept the step
    // running when it lost its coordinator, and registers saying so.
    fake_holding(&cluster, "b", Arc::clone(&ran), vec![Digest::of(b"base")]);
    let work = kiln_model::work_of(&step, std::slice::from_ref(&base), None).unwrap();
    let (_, mut assignments) = cluster.register(info("a"), vec![], vec![HeldWork { work, finished: false }]).unwrap();
    let (sink, lines) = collecting();
    let running = tokio::spawn(executor.execute(step.clone(), vec![base.clone()], build(), sink));
    let Some(ToWorker::Assign(job)) = assignments.recv().await else { panic!("no assignment for the holder") };
    assert_eq!(job.vertex.digest, step.digest);
    let output = Layers { layers: vec![LayerDesc { diff_id: Digest::of(b"kept"), size: 1 }] };
    cluster.report("a", job.id, job.epoch, Ok(Executed::new(output.clone())));
    let executed = running.await.unwrap().unwrap();
    assert_eq!((executed.output, executed.worker.as_deref()), (output, Some("a")));
    assert!(ran.lock().unwrap().is_empty(), "b ran it too");
    assert_eq!(*lines.lock().unwrap(), ["adopted: worker a kept this step running across its lost session"]);

    // The held work was taken: the same step again is placed by locality.
    let again = executor.execute(step, vec![base], build(), LogSink::new(|_| true)).await.unwrap();
    assert_eq!(again.worker.as_deref(), Some("b"));
}
