//! The worker role: a session with the coordinator (reconnecting when it drops), each
//! assignment run as its own task (inputs fetched from peers, context files from the
//! coordinator, then [`Worker::execute`]), heartbeats within the lease, and drain on
//! shutdown: running jobs finish, nothing new is taken.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_cas::BlobStore;
use kiln_client::{Assignment, FromCoordinator, WorkerLink, WorkerSession};
use kiln_cluster::LOST_INPUT;
use kiln_context::{BuildContext, StoredContext};
use kiln_graph::{Op, SourceOp};
use kiln_model::{BoxFuture, Executed, JobId, Layers, LogSink, WorkerInfo};
use kiln_types::Digest;
use kiln_worker::{BlobFetcher, BuildInputs, Worker, select_context};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// Fetches blobs from peers' (or the coordinator's) blob services.
pub struct PeerFetcher;

impl BlobFetcher for PeerFetcher {
    fn fetch(&self, digest: Digest, peers: Vec<String>, store: Arc<BlobStore>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move { kiln_client::fetch_from_any(&peers, &digest, &store).await })
    }
}

/// Runs the worker role until `stop` is cancelled (then drains).
pub async fn run(
    worker: Arc<Worker>,
    root: std::path::PathBuf,
    info: WorkerInfo,
    coordinator: String,
    stop: CancellationToken,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if stop.is_cancelled() {
            return;
        }
        let layers: Vec<Digest> = worker.cas().list().unwrap_or_default().into_iter().map(|b| b.digest).collect();
        let mut current = info.clone();
        current.free_disk = free_disk(&root);
        match WorkerSession::connect(&coordinator, &current, &layers).await {
            Ok(session) => {
                tracing::info!(worker = %info.name, "registered with {coordinator}");
                delay = Duration::from_millis(200);
                match serve(Arc::clone(&worker), &root, session, &coordinator, &stop).await {
                    None => return,
                    Some(why) => tracing::warn!("lost the session with {coordinator}: {why}; reconnecting"),
                }
            }
            Err(e) => tracing::warn!("{e}; retrying in {} ms", delay.as_millis()),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Serves one session: `None` when it ended by draining, else why it broke.
async fn serve(
    worker: Arc<Worker>,
    disk_root: &std::path::Path,
    session: WorkerSession,
    coordinator: &str,
    stop: &CancellationToken,
) -> Option<String> {
    let WorkerSession { link, lease_ms, mut incoming } = session;
    let mut heartbeat = tokio::time::interval(Duration::from_millis((lease_ms / 3).max(100)));
    let mut jobs: JoinSet<JobId> = JoinSet::new();
    let mut running: HashMap<JobId, AbortHandle> = HashMap::new();
    let mut draining = stop.is_cancelled();
    if draining {
        link.drain();
    }
    loop {
        if draining && running.is_empty() {
            // Close our side and wait for the coordinator to close its own: it has then
            // seen every result sent.
            drop(link);
            let _ =
                tokio::time::timeout(Duration::from_secs(5), async { while incoming.recv().await.is_some() {} }).await;
            return None;
        }
        tokio::select! {
            _ = heartbeat.tick() => link.heartbeat(free_disk(disk_root)),
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
                    let task = run_job(Arc::clone(&worker), *assignment, link.clone(), coordinator.to_string());
                    running.insert(job, jobs.spawn(async move { task.await; job }));
                }
                Some(Ok(FromCoordinator::Unreadable { job, epoch, error })) => {
                    tracing::warn!(job, "unreadable assignment: {error}");
                    link.result(job, epoch, Err(error));
                }
                Some(Ok(FromCoordinator::Cancel(job))) => {
                    if let Some(task) = running.remove(&job) {
                        task.abort();
                    }
                }
                Some(Err(why)) => {
                    // The coordinator ended the session: it requeues these jobs elsewhere.
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

async fn run_job(worker: Arc<Worker>, assignment: Assignment, link: WorkerLink, coordinator: String) {
    let (job, epoch) = (assignment.job, assignment.epoch);
    let span = tracing::info_span!("job", job, epoch, vertex = %assignment.vertex.meta.name);
    let result = execute(&worker, assignment, &link, &coordinator).instrument(span.clone()).await;
    if let Err(error) = &result {
        span.in_scope(|| tracing::info!("failed: {error}"));
    }
    link.result(job, epoch, result);
}

async fn execute(
    worker: &Worker,
    assignment: Assignment,
    link: &WorkerLink,
    coordinator: &str,
) -> Result<Executed<Layers>, String> {
    let (job, epoch) = (assignment.job, assignment.epoch);
    let fetcher = PeerFetcher;
    let mut inputs = Vec::with_capacity(assignment.inputs.len());
    for layers in &assignment.inputs {
        // The coordinator recomputes an input that vanished with its worker, then retries.
        let chain = worker.ensure_layers(&layers.layers, &assignment.sources, &fetcher).await;
        inputs.push(chain.map_err(|e| format!("{LOST_INPUT}{e}"))?);
    }
    let address = if assignment.context_address.is_empty() { coordinator } else { &assignment.context_address };
    let mut contexts: HashMap<String, Arc<dyn BuildContext>> = HashMap::new();
    for (name, manifest) in &assignment.contexts {
        let context = StoredContext::new(manifest, Arc::clone(worker.cas()));
        // Only the files this source selects travel.
        if let Op::Source(SourceOp::Local { include, exclude, .. }) = &assignment.vertex.op {
            let selected = select_context(&context, include, exclude)?;
            worker
                .ensure_blobs(&manifest.digests_of(selected.iter().map(|e| e.path.as_str())), address, &fetcher)
                .await?;
        }
        contexts.insert(name.clone(), Arc::new(context));
    }
    let build = BuildInputs { contexts, secrets: assignment.secrets };
    let log_link = link.clone();
    let logs = LogSink::new(move |line| {
        log_link.log(job, epoch, line);
        log_link.is_open()
    });
    let output = worker.execute(&assignment.vertex, &inputs, &build, Some(&logs)).await.map_err(|e| e.to_string())?;
    let layers = worker.describe(&output.snapshot).await?;
    Ok(Executed { output: Layers { layers }, pin: output.image.map(|i| i.manifest_digest), worker: None })
}

/// Free bytes on the filesystem holding `path`.
fn free_disk(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path).map(|s| s.blocks_available() * s.fragment_size()).unwrap_or(0)
}
