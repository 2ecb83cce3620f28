//! The worker role: a session with a control plane (reconnecting when it drops), each
//! assignment run as its own task (inputs fetched from peers, context files from the
//! coordinator, then [`Worker::execute`]), heartbeats within the lease, and drain on stop:
//! running jobs finish, nothing new is taken.
//!
//! The control plane is a trait ([`ControlPlane`], [`SessionLink`]): the daemon plugs in the
//! gRPC session with a coordinator, tests an in-process one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_context::{BuildContext, StoredContext};
use kiln_graph::{Op, SourceOp};
use kiln_model::{
    Assignment, BoxFuture, Executed, Failed, FromCoordinator, JobId, Layers, LogLine, LogSink, PushedLayer, WorkerInfo,
};
use kiln_types::Digest;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{BlobFetcher, BuildInputs, StoreError, Worker, free_space, select_context};

/// The first wait before reconnecting; it doubles up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// The longest wait between two registration attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// How long a drained worker waits for the control plane to close its side.
const DRAIN_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What a worker sends on a session (cheap to clone; one clone per running job).
pub trait SessionLink: Clone + Send + Sync + 'static {
    /// Renews the lease, with the free bytes on the state directory's disk.
    fn heartbeat(&self, free_disk: u64);
    /// Takes no new work.
    fn drain(&self);
    /// Layers garbage collection removed (diff ids).
    fn evicted(&self, layers: &[Digest]);
    /// The answer to a push.
    fn pushed(&self, request: u64, result: Result<Vec<PushedLayer>, String>);
    /// A line of a job's output.
    fn log(&self, job: JobId, epoch: u32, line: LogLine);
    /// A job's result.
    fn result(&self, job: JobId, epoch: u32, result: Result<Executed<Layers>, Failed>);
    /// Whether the session is still open.
    fn is_open(&self) -> bool;
}

/// A registered session.
pub struct Session<L> {
    /// Sends to the control plane.
    pub link: L,
    /// The lease: heartbeats go three times within it.
    pub lease_ms: u64,
    /// What the control plane sends, until the session ends (`Err`: why it broke, a reason
    /// to log before registering again, never acted on by kind).
    pub incoming: mpsc::Receiver<Result<FromCoordinator, String>>,
}

/// Where a worker registers and gets its work.
pub trait ControlPlane: Send + Sync + 'static {
    /// The sending half of its sessions.
    type Link: SessionLink;
    /// Why a registration failed (logged before the next attempt).
    type Error: std::fmt::Display + Send;

    /// Registers `info` with the layers this worker already holds and opens a session.
    fn connect(&self, info: WorkerInfo, layers: Vec<Digest>) -> BoxFuture<Result<Session<Self::Link>, Self::Error>>;

    /// Where the control plane is, for logs (`http://HOST:PORT`).
    fn address(&self) -> String;
}

/// Runs the worker role until `stop` is cancelled, then drains: registers (again after a
/// broken session, backing off), runs assignments, and returns once the running jobs are done.
/// `disk` is the directory whose free space heartbeats report.
pub async fn run<C: ControlPlane>(
    worker: Arc<Worker>,
    control: Arc<C>,
    fetcher: Arc<dyn BlobFetcher>,
    info: WorkerInfo,
    disk: PathBuf,
    stop: CancellationToken,
) {
    let address = control.address();
    let mut delay = FIRST_RECONNECT_DELAY;
    loop {
        if stop.is_cancelled() {
            return;
        }
        // The blob index can be large: listed off the async threads.
        let cas = Arc::clone(worker.cas());
        let listed = tokio::task::spawn_blocking(move || cas.list().unwrap_or_default()).await;
        let layers: Vec<Digest> = listed.unwrap_or_default().into_iter().map(|b| b.digest).collect();
        let current = WorkerInfo { free_disk: free_space(&disk), ..info.clone() };
        match control.connect(current, layers).await {
            Ok(session) => {
                tracing::info!(worker = %info.name, "registered with {address}");
                delay = FIRST_RECONNECT_DELAY;
                let served = Served { worker: Arc::clone(&worker), fetcher: Arc::clone(&fetcher), address: &address };
                match served.serve(session, &disk, &stop).await {
                    None => return,
                    Some(why) => tracing::warn!("lost the session with {address}: {why}; reconnecting"),
                }
            }
            Err(e) => tracing::warn!("{e}; retrying in {} ms", delay.as_millis()),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => {}
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// What every job of a session shares.
struct Served<'a> {
    worker: Arc<Worker>,
    fetcher: Arc<dyn BlobFetcher>,
    /// The control plane's blob service, for context files.
    address: &'a str,
}

impl Served<'_> {
    /// Serves one session: `None` when it ended by draining, else why it broke.
    async fn serve<L: SessionLink>(
        &self,
        session: Session<L>,
        disk: &Path,
        stop: &CancellationToken,
    ) -> Option<String> {
        let Session { link, lease_ms, mut incoming } = session;
        let mut heartbeat = tokio::time::interval(Duration::from_millis((lease_ms / 3).max(100)));
        let mut collect = tokio::time::interval(crate::GC_INTERVAL);
        let mut jobs: JoinSet<JobId> = JoinSet::new();
        let mut running: HashMap<JobId, AbortHandle> = HashMap::new();
        let mut draining = stop.is_cancelled();
        if draining {
            link.drain();
        }
        loop {
            if draining && running.is_empty() {
                // Close our side and wait for the control plane to close its own: it has then
                // seen every result sent.
                drop(link);
                let _ =
                    tokio::time::timeout(DRAIN_CLOSE_GRACE, async { while incoming.recv().await.is_some() {} }).await;
                return None;
            }
            tokio::select! {
                _ = heartbeat.tick() => link.heartbeat(free_space(disk)),
                _ = collect.tick() => {
                    let (gc, link) = (Arc::clone(self.worker.gc()), link.clone());
                    tokio::spawn(async move { collected(gc.collect().await, &link) });
                }
                () = stop.cancelled(), if !draining => {
                    draining = true;
                    link.drain();
                    tracing::info!("draining: finishing {} running jobs", running.len());
                }
                Some(done) = jobs.join_next(), if !running.is_empty() => {
                    if let Ok(job) = done {
                        running.remove(&job);
                    }
                }
                message = incoming.recv() => match message {
                    Some(Ok(FromCoordinator::Assign(assignment))) => {
                        let job = assignment.job;
                        let task = run_job(
                            Arc::clone(&self.worker),
                            Arc::clone(&self.fetcher),
                            *assignment,
                            link.clone(),
                            self.address.to_string(),
                        );
                        running.insert(job, jobs.spawn(async move { task.await; job }));
                    }
                    Some(Ok(FromCoordinator::Unreadable { job, epoch, error })) => {
                        tracing::warn!(job, "unreadable assignment: {error}");
                        link.result(job, epoch, Err(Failed::from(error)));
                    }
                    Some(Ok(FromCoordinator::Push(push))) => {
                        // Not a job: nothing waits for it on drain (the coordinator falls back
                        // to exporting itself when the session ends first).
                        let (worker, link) = (Arc::clone(&self.worker), link.clone());
                        let span = tracing::info_span!("push", request = push.request);
                        tokio::spawn(async move {
                            let result = worker.push_layers(&push).await.map_err(|e| e.to_string());
                            link.pushed(push.request, result);
                        }.instrument(span));
                    }
                    Some(Ok(FromCoordinator::UnreadablePush { request, error })) => {
                        tracing::warn!(request, "unreadable push: {error}");
                        link.pushed(request, Err(error));
                    }
                    Some(Ok(FromCoordinator::Cancel(job))) => {
                        if let Some(task) = running.remove(&job) {
                            task.abort();
                        }
                    }
                    Some(Err(why)) => {
                        // The control plane ended the session: it requeues these jobs elsewhere.
                        jobs.abort_all();
                        return Some(why);
                    }
                    None => {
                        jobs.abort_all();
                        return Some("the connection closed".into());
                    }
                }
            }
        }
    }
}

async fn run_job<L: SessionLink>(
    worker: Arc<Worker>,
    fetcher: Arc<dyn BlobFetcher>,
    assignment: Assignment,
    link: L,
    coordinator: String,
) {
    let (job, epoch) = (assignment.job, assignment.epoch);
    let span = tracing::info_span!("job", job, epoch, vertex = %assignment.vertex.meta.name);
    let result = execute(&worker, fetcher.as_ref(), assignment, &link, &coordinator).instrument(span.clone()).await;
    if let Err(error) = &result {
        span.in_scope(|| tracing::info!("failed: {error}"));
    }
    // The job's layers are released: collect if the store may be over its limits, started
    // before the result goes out (so a `du` that follows the build sees it done).
    let collecting = worker.gc().collect_soon().await;
    link.result(job, epoch, result);
    match collecting.await {
        Ok(result) => collected(result, &link),
        Err(error) => tracing::warn!("garbage collection: {error}"),
    }
}

/// Tells the coordinator which layers a collection removed.
fn collected<L: SessionLink>(result: Result<crate::Collected, StoreError>, link: &L) {
    match result {
        Ok(collected) if !collected.evicted.is_empty() => link.evicted(&collected.evicted),
        Ok(_) => {}
        Err(error) => tracing::warn!("garbage collection: {error}"),
    }
}

async fn execute<L: SessionLink>(
    worker: &Worker,
    fetcher: &dyn BlobFetcher,
    assignment: Assignment,
    link: &L,
    coordinator: &str,
) -> Result<Executed<Layers>, Failed> {
    let (job, epoch) = (assignment.job, assignment.epoch);
    // The job's layers stay until it is done (garbage collection leaves them).
    let hold = Arc::new(worker.snapshots().hold());
    let mut inputs = Vec::with_capacity(assignment.inputs.len());
    for layers in &assignment.inputs {
        // The control plane recomputes an input that vanished with its worker, then retries.
        let chain = worker.ensure_layers(&layers.layers, &assignment.sources, &assignment.tier, fetcher).await;
        let chain = chain.map_err(|e| match e {
            // Gone with its worker, or no peer could send it: the coordinator makes it again.
            StoreError::Unavailable(_) | StoreError::Fetch { .. } => Failed::lost_input(e.to_string()),
            // A local failure (a full disk, a broken store) fails the step here.
            other => Failed::from(other.to_string()),
        })?;
        // Collected between the fetch and now: as good as never fetched.
        hold.add(&chain.layers).map_err(|gone| Failed::lost_input(format!("layer {gone} was collected")))?;
        inputs.push(chain);
    }
    let address = if assignment.context_address.is_empty() { coordinator } else { &assignment.context_address };
    let mut contexts: HashMap<String, Arc<dyn BuildContext>> = HashMap::new();
    for (name, manifest) in &assignment.contexts {
        let context = StoredContext::new(manifest, Arc::clone(worker.cas()));
        // Only the files this source selects travel.
        if let Op::Source(SourceOp::Local { include, exclude, .. }) = &assignment.vertex.op {
            let name = &assignment.vertex.meta.name;
            let selected =
                select_context(&context, include, exclude).map_err(|e| Failed::from(format!("{name}: {e}")))?;
            let digests = manifest.digests_of(selected.iter().map(|e| e.path.as_str()));
            worker.ensure_blobs(&digests, address, fetcher).await.map_err(|e| Failed::from(e.to_string()))?;
        }
        contexts.insert(name.clone(), Arc::new(context));
    }
    let build = BuildInputs {
        contexts,
        secrets: assignment.secrets,
        hold: Some(Arc::clone(&hold)),
        cache_group: assignment.cache_group,
        ..BuildInputs::default()
    };
    let log_link = link.clone();
    let logs = LogSink::new(move |line| {
        log_link.log(job, epoch, line);
        log_link.is_open()
    });
    let output = worker.execute(&assignment.vertex, &inputs, &build, Some(&logs)).await.map_err(|e| e.to_string())?;
    build.hold(&output.snapshot.layers)?;
    let layers = worker.describe(&output.snapshot).await.map_err(|e| Failed::from(e.to_string()))?;
    Ok(Executed { pin: output.image.map(|i| i.manifest_digest), ..Executed::new(Layers { layers }) })
}
