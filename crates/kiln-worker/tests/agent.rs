//! The worker's session loop in-process, over a control plane made of channels: registration,
//! heartbeats, assignments (run, unreadable, with a lost input), reconnection after a broken
//! session, and drain on stop. Every wait is for an event, bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_cas::BlobStore;
use kiln_context::FsContext;
use kiln_dockerfile::image::NoImageMetadata;
use kiln_dockerfile::{ConvertOptions, convert};
use kiln_graph::{Op, SourceOp, Vertex};
use kiln_kv::MemoryKv;
use kiln_model::{
    Assignment, BoxFuture, ContextManifest, Executed, Failed, FromCoordinator, HeldWork, JobId, LayerDesc, Layers,
    LogLine, WorkerInfo,
};
use kiln_solver::admission::{Admission, Parallelism};
use kiln_types::{Digest, Platform};
use kiln_worker::agent::{self, ControlPlane, Session, SessionLink};
use kiln_worker::{BlobFetcher, Worker, WorkerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The longest any awaited event may take on a loaded machine.
const EVENT: Duration = Duration::from_secs(30);

/// What the worker sent.
#[derive(Debug)]
enum Sent {
    Heartbeat,
    Drain,
    Result(JobId, Result<Executed<Layers>, Failed>),
}

/// One registration as the control plane saw it.
struct Registered {
    info: WorkerInfo,
    held: Vec<HeldWork>,
    to_worker: mpsc::Sender<Result<FromCoordinator, String>>,
    sent: mpsc::UnboundedReceiver<Sent>,
}

impl Registered {
    /// The next message that is not a heartbeat or a log line.
    async fn next(&mut self) -> Sent {
        loop {
            match tokio::time::timeout(EVENT, self.sent.recv()).await.expect("the worker answers").expect("open") {
                Sent::Heartbeat => continue,
                other => return other,
            }
        }
    }

    async fn heartbeat(&mut self) {
        loop {
            if let Sent::Heartbeat = tokio::time::timeout(EVENT, self.sent.recv()).await.expect("a heartbeat").unwrap()
            {
                return;
            }
        }
    }

    async fn assign(&self, assignment: Assignment) {
        self.to_worker.send(Ok(FromCoordinator::Assign(Box::new(assignment)))).await.unwrap();
    }
}

#[derive(Clone)]
struct Link(mpsc::UnboundedSender<Sent>);

impl SessionLink for Link {
    fn heartbeat(&self, _: kiln_model::Beat) {
        let _ = self.0.send(Sent::Heartbeat);
    }
    fn drain(&self) {
        let _ = self.0.send(Sent::Drain);
    }
    fn evicted(&self, _: &[kiln_types::Digest]) {}
    fn pushed(&self, _: u64, _: Result<Vec<kiln_model::PushedLayer>, String>) {}
    fn log(&self, _: JobId, _: u32, _: LogLine) {}
    fn result(&self, job: JobId, _: u32, result: Result<Executed<Layers>, Failed>) {
        let _ = self.0.send(Sent::Result(job, result));
    }
    fn is_open(&self) -> bool {
        !self.0.is_closed()
    }
}

struct Plane(mpsc::UnboundedSender<Registered>);

impl ControlPlane for Plane {
    type Link = Link;
    type Error = std::convert::Infallible;

    fn connect(
        &self,
        info: WorkerInfo,
        _: Vec<Digest>,
        held: Vec<HeldWork>,
    ) -> BoxFuture<Result<Session<Link>, Self::Error>> {
        let (to_worker, incoming) = mpsc::channel(16);
        let (link, sent) = mpsc::unbounded_channel();
        let _ = self.0.send(Registered { info, held, to_worker, sent });
        Box::pin(async move { Ok(Session { link: Link(link), lease_ms: 300, incoming }) })
    }

    fn address(&self) -> String {
        "http://control.test".into()
    }
}

/// Serves blobs from memory and remembers what was asked of it.
#[derive(Default)]
struct Blobs {
    held: HashMap<Digest, Vec<u8>>,
    asked: Mutex<Vec<(Digest, Vec<String>)>>,
}

impl BlobFetcher for Blobs {
    fn fetch(&self, digest: Digest, peers: Vec<String>, store: Arc<BlobStore>) -> BoxFuture<Result<(), String>> {
        self.asked.lock().unwrap().push((digest, peers.clone()));
        let bytes = self.held.get(&digest).cloned();
        Box::pin(async move {
            let bytes = bytes.ok_or_else(|| format!("{digest}: none of {peers:?} has it"))?;
            store.put(&bytes, Some(&digest)).map(|_| ()).map_err(|e| e.to_string())
        })
    }
}

/// Holds every fetch until its digest is released, then fails it (nobody has the blob);
/// tells of each fetch as it starts.
struct Gated {
    asked: mpsc::UnboundedSender<Digest>,
    released: Mutex<HashMap<Digest, Arc<tokio::sync::Notify>>>,
}

impl Gated {
    fn gate(&self, digest: Digest) -> Arc<tokio::sync::Notify> {
        Arc::clone(self.released.lock().unwrap().entry(digest).or_default())
    }
}

impl BlobFetcher for Gated {
    fn fetch(&self, digest: Digest, _: Vec<String>, _: Arc<BlobStore>) -> BoxFuture<Result<(), String>> {
        let _ = self.asked.send(digest);
        let gate = self.gate(digest);
        Box::pin(async move {
            gate.notified().await;
            Err(format!("{digest}: nobody has it"))
        })
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    worker: Arc<Worker>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut config = WorkerConfig::new(&dir.path().join("worker")).unwrap();
        config.runner = kiln_testkit::runner_binary();
        let worker = Arc::new(Worker::open(config, Arc::new(MemoryKv::new())).unwrap());
        Fixture { dir, worker }
    }

    /// The context source vertex of `COPY . /` over a directory holding `files`, and the
    /// directory's manifest and file contents.
    fn context_source(&self, files: &[(&str, &str)]) -> (Vertex, ContextManifest, HashMap<Digest, Vec<u8>>) {
        let root = self.dir.path().join("context");
        std::fs::create_dir_all(&root).unwrap();
        for (name, content) in files {
            std::fs::write(root.join(name), content).unwrap();
        }
        let context = FsContext::walk(&root, &Default::default()).unwrap();
        let options = ConvertOptions {
            file_name: "Dockerfile".into(),
            target: None,
            build_args: Default::default(),
            platforms: vec!["linux/amd64".parse::<Platform>().unwrap()],
            build_platform: Platform::host(),
            context: &context,
            images: &NoImageMetadata,
            named: &Default::default(),
        };
        let graph = convert("FROM scratch\nCOPY . /\n", &options).unwrap().graph;
        let source = graph
            .vertices
            .into_iter()
            .find(|v| matches!(v.op, Op::Source(SourceOp::Local { .. })))
            .expect("a context source");
        let blobs = files.iter().map(|(_, content)| (Digest::of(content.as_bytes()), content.as_bytes().to_vec()));
        (source, context.manifest().unwrap(), blobs.collect())
    }
}

fn info() -> WorkerInfo {
    WorkerInfo {
        name: "w-test".into(),
        platforms: vec![Platform::host()],
        labels: Default::default(),
        max_parallelism: 2,
        capacity: 0,
        free_disk: 0,
        cache_bytes: 0,
        address: "http://127.0.0.1:1".into(),
        entitlements: Vec::new(),
    }
}

fn assignment(job: JobId, vertex: Vertex) -> Assignment {
    Assignment {
        job,
        epoch: 1,
        vertex,
        inputs: Vec::new(),
        sources: HashMap::new(),
        tier: HashMap::new(),
        secrets: HashMap::new(),
        contexts: HashMap::new(),
        context_address: String::new(),
        cache_group: None,
        trace: None,
    }
}

#[tokio::test]
async fn a_session_runs_its_assignments_reports_failures_and_drains_on_stop() {
    let fixture = Fixture::new();
    let (vertex, manifest, blobs) = fixture.context_source(&[("a.txt", "alpha\n"), ("b.txt", "beta\n")]);
    let blobs = Arc::new(Blobs { held: blobs, ..Blobs::default() });
    let (plane, mut registrations) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let agent = tokio::spawn(agent::run(
        Arc::clone(&fixture.worker),
        Arc::new(Plane(plane)),
        blobs.clone(),
        (info(), Admission::for_cluster(Parallelism::Fixed(2), None)),
        fixture.dir.path().to_path_buf(),
        (stop.clone(), tokio::sync::watch::Sender::new(false)),
    ));
    let mut session = tokio::time::timeout(EVENT, registrations.recv()).await.unwrap().unwrap();
    assert_eq!(session.info.name, "w-test");
    assert!(session.info.free_disk > 0, "heartbeats and registrations carry the free disk");
    session.heartbeat().await;

    // An assignment the worker could not read fails its job; the session goes on.
    let unreadable = FromCoordinator::Unreadable { job: 1, epoch: 1, error: "job 1: bad vertex".into() };
    session.to_worker.send(Ok(unreadable)).await.unwrap();
    match session.next().await {
        Sent::Result(1, Err(failed)) => assert!(!failed.lost_input && failed.message.contains("bad vertex")),
        other => panic!("{other:?}"),
    }

    // An input nobody holds any more is a lost input, not a failed step.
    let gone = Layers { layers: vec![LayerDesc { diff_id: Digest::of(b"gone"), size: 4 }] };
    session.assign(Assignment { inputs: vec![gone], ..assignment(2, vertex.clone()) }).await;
    match session.next().await {
        Sent::Result(2, Err(failed)) => assert!(failed.lost_input, "{failed}"),
        other => panic!("{other:?}"),
    }

    // A context source: its files come from the context's blob service, the result is layers.
    let contexts = HashMap::from([("context".to_string(), manifest)]);
    let context_address = "http://context.test".to_string();
    session.assign(Assignment { contexts, context_address, ..assignment(3, vertex) }).await;
    match session.next().await {
        Sent::Result(3, Ok(executed)) => assert_eq!(executed.output.layers.len(), 1),
        other => panic!("{other:?}"),
    }
    let asked = blobs.asked.lock().unwrap().clone();
    assert!(asked.iter().any(|(d, peers)| *d == Digest::of(b"alpha\n") && peers == &["http://context.test"]));

    // Stop: the worker drains, closes its side, and returns once the control plane closes.
    stop.cancel();
    assert!(matches!(session.next().await, Sent::Drain));
    drop(session.to_worker);
    tokio::time::timeout(EVENT, agent).await.expect("the agent returns after draining").unwrap();
}

#[tokio::test]
async fn a_broken_session_is_registered_again() {
    let fixture = Fixture::new();
    let (plane, mut registrations) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let agent = tokio::spawn(agent::run(
        Arc::clone(&fixture.worker),
        Arc::new(Plane(plane)),
        Arc::new(Blobs::default()),
        (info(), Admission::for_cluster(Parallelism::Fixed(2), None)),
        fixture.dir.path().to_path_buf(),
        (stop.clone(), tokio::sync::watch::Sender::new(false)),
    ));
    let first = tokio::time::timeout(EVENT, registrations.recv()).await.unwrap().unwrap();
    first.to_worker.send(Err("worker w-test: the coordinator ended session 1".into())).await.unwrap();
    let mut second = tokio::time::timeout(EVENT, registrations.recv()).await.expect("registers again").unwrap();
    second.heartbeat().await;
    stop.cancel();
    assert!(matches!(second.next().await, Sent::Drain));
    drop(second.to_worker);
    tokio::time::timeout(EVENT, agent).await.expect("the agent returns after draining").unwrap();
}

#[tokio::test]
async fn jobs_of_a_lost_session_run_on_and_are_adopted_under_the_next_sessions_job_ids() {
    let fixture = Fixture::new();
    let (source, ..) = fixture.context_source(&[("a.txt", "alpha\n")]);
    // A step that is not a context source (those are never adopted): its input fetch is where
    // the job waits, as long as the test wants.
    let step = Vertex { op: Op::Merge(Default::default()), ..source };
    let input = |name: &str| Layers { layers: vec![LayerDesc { diff_id: Digest::of(name.as_bytes()), size: 1 }] };
    // Job `job` of `step` over the input named `name`, which a peer is said to hold.
    let job = |job: JobId, epoch: u32, name: &str| {
        let sources = HashMap::from([(Digest::of(name.as_bytes()), vec!["http://peer.test".to_string()])]);
        Assignment { epoch, inputs: vec![input(name)], sources, ..assignment(job, step.clone()) }
    };
    let (asked, mut fetches) = mpsc::unbounded_channel();
    let gated = Arc::new(Gated { asked, released: Mutex::new(HashMap::new()) });
    let (plane, mut registrations) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let agent = tokio::spawn(agent::run(
        Arc::clone(&fixture.worker),
        Arc::new(Plane(plane)),
        gated.clone(),
        (info(), Admission::for_cluster(Parallelism::Fixed(2), None)),
        fixture.dir.path().to_path_buf(),
        (stop.clone(), tokio::sync::watch::Sender::new(false)),
    ));
    let first = tokio::time::timeout(EVENT, registrations.recv()).await.unwrap().unwrap();
    assert!(first.held.is_empty());
    for (id, name) in [(1, "a"), (2, "b")] {
        first.assign(job(id, 1, name)).await;
        let digest = tokio::time::timeout(EVENT, fetches.recv()).await.unwrap().unwrap();
        assert_eq!(digest, Digest::of(name.as_bytes()));
    }
    // The session breaks while both wait on their inputs: they run on, and the next
    // registration reports them by what they compute.
    first.to_worker.send(Err("the coordinator died".into())).await.unwrap();
    let mut second = tokio::time::timeout(EVENT, registrations.recv()).await.unwrap().unwrap();
    let work = |name: &str| job(0, 0, name).work().expect("a step's work");
    let mut held = second.held.clone();
    held.sort_by_key(|h| h.work);
    let mut expected =
        vec![HeldWork { work: work("a"), finished: false }, HeldWork { work: work("b"), finished: false }];
    expected.sort_by_key(|h| h.work);
    assert_eq!(held, expected);

    // The new coordinator assigns the same work under its own job ids: the orphans answer.
    second.assign(job(11, 3, "a")).await;
    gated.gate(Digest::of(b"a")).notify_one();
    match second.next().await {
        Sent::Result(11, Err(failed)) => assert!(failed.lost_input, "{failed}"),
        other => panic!("{other:?}"),
    }
    // Released before or after its adoption, the other one answers too.
    gated.gate(Digest::of(b"b")).notify_one();
    second.assign(job(12, 3, "b")).await;
    match second.next().await {
        Sent::Result(12, Err(failed)) => assert!(failed.lost_input, "{failed}"),
        other => panic!("{other:?}"),
    }
    // Neither ran again: each input was fetched once.
    assert!(fetches.try_recv().is_err(), "a step ran twice");

    // Work it no longer holds runs as any job does.
    second.assign(job(13, 3, "a")).await;
    assert_eq!(tokio::time::timeout(EVENT, fetches.recv()).await.unwrap().unwrap(), Digest::of(b"a"));
    gated.gate(Digest::of(b"a")).notify_one();
    assert!(matches!(second.next().await, Sent::Result(13, Err(_))));
    stop.cancel();
    assert!(matches!(second.next().await, Sent::Drain));
    drop(second.to_worker);
    tokio::time::timeout(EVENT, agent).await.expect("the agent returns after draining").unwrap();
}
