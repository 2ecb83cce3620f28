//! Executing on a cluster of remote workers: [`Cluster`] implements the solver's
//! [`Executor`] by queueing each execution as a job in [`state::ClusterState`] and sending
//! assignments to the workers' connections; the gRPC layer feeds worker messages back in.
//!
//! A job's result is the first report for its current assignment (worker and epoch). A worker
//! that disconnects or misses its lease loses its jobs: they are requeued with a new epoch,
//! so whatever it reports later is dropped as late, never counted twice.
//!
//! A lost worker also takes the only copy of layers it produced. Each result remembers its
//! recipe (vertex, inputs, build); before a job runs, inputs that no connected worker holds
//! any more are recomputed from their recipes (recursively), and the new layers stand in for
//! the lost ones from then on. A worker that finds an input gone while fetching it reports
//! a lost input ([`Failed::lost_input`]), and the job is prepared and placed again.

pub mod state;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_graph::{Op, SourceOp, Vertex};
use kiln_model::{
    Beat, BoxFuture, CacheCompression, Executed, Executor, Failed, HeldWork, JobId, LayerDesc, Layers, LogLine,
    LogSink, LogStream, PushRequest, PushTarget, PushedLayer, TierBlob, Work, WorkerInfo, WorkerStatus,
};
use kiln_types::{Digest, now_ms};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

pub use state::ClusterSettings;
use state::{ClusterCommand, ClusterEffect, ClusterState, JobSpec};

/// Why a worker's registration was refused (its name is taken); the message names both
/// workers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Times a job is prepared again after a lost input ([`Failed::lost_input`]).
const LOST_INPUT_RETRIES: u32 = 3;

/// Recipes kept for recomputing lost results (oldest forgotten first).
const MAX_RECIPES: usize = 100_000;

/// Shared-cache layer locations kept (oldest forgotten first; a forgotten one is found again
/// in the cache's manifest by the next build that imports it).
const MAX_TIER_LAYERS: usize = 1_000_000;

/// Recipes followed, one below the other, to recover one input: more than any chain of
/// layers an overlay mount can stack (500), so only a broken recipe table reaches it.
const MAX_RECOVERY_DEPTH: usize = 1024;

/// How a result was made.
struct Recipe<B> {
    vertex: Vertex,
    inputs: Vec<Layers>,
    build: Arc<ClusterBuild<B>>,
}

impl<B> Clone for Recipe<B> {
    fn clone(&self) -> Self {
        Recipe { vertex: self.vertex.clone(), inputs: self.inputs.clone(), build: Arc::clone(&self.build) }
    }
}

/// A build's inputs as the cluster carries them: an id (builds take turns), whatever the
/// workers need (contexts, secrets), and the caches it imports.
pub struct ClusterBuild<B> {
    /// The build's id.
    pub id: u64,
    /// What workers need.
    pub data: B,
    /// The build's imported caches, when it has any.
    pub imports: Option<ImportFn>,
    /// The cache group whose cache mounts its steps see (`None`: the default): part of what
    /// a job computes ([`kiln_model::work_of`]).
    pub cache_group: Option<String>,
}

impl<B: std::fmt::Debug> std::fmt::Debug for ClusterBuild<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuild").field("id", &self.id).field("data", &self.data).finish_non_exhaustive()
    }
}

/// Looks a cache key up in a build's imported caches: `None` when none has it, otherwise a
/// future that checks the cache still has every layer blob (an error is a miss).
pub type ImportFn = Arc<dyn Fn(&Digest) -> Option<BoxFuture<Result<TierHit, String>>> + Send + Sync>;

/// A result an imported cache holds, with its blobs checked to be there.
#[derive(Debug, Clone)]
pub struct TierHit {
    /// Each layer (its size is the blob's, as the cache does not record the tar's) and the
    /// blob that holds it.
    pub layers: Vec<(LayerDesc, TierBlob)>,
    /// The cache, as records name it.
    pub source: String,
}

/// Everything a worker needs for one job.
#[derive(Debug)]
pub struct Job<B> {
    /// The job.
    pub id: JobId,
    /// The assignment's epoch (echoed in reports).
    pub epoch: u32,
    /// The vertex.
    pub vertex: Vertex,
    /// Its inputs' layers, in order.
    pub inputs: Vec<Layers>,
    /// Peers (blob addresses) holding each input layer the worker may lack.
    pub sources: Vec<(Digest, Vec<String>)>,
    /// Shared-cache blobs of input layers, for those no peer serves.
    pub tier: Vec<(Digest, TierBlob)>,
    /// The build's inputs.
    pub build: Arc<ClusterBuild<B>>,
    /// The trace context of the vertex's span, when traced.
    pub trace: Option<kiln_model::TraceContext>,
}

/// A message for a worker.
#[derive(Debug)]
pub enum ToWorker<B> {
    /// Run a job.
    Assign(Box<Job<B>>),
    /// Stop a job.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Push layers it holds to a cache or a registry.
    Push(PushRequest),
}

/// What a push answered with: the layers as pushed, or why not.
pub type Pushed = Result<Vec<PushedLayer>, String>;

struct Pending<B> {
    vertex: Vertex,
    inputs: Vec<Layers>,
    /// What it computes, when a worker may hold it across a lost session.
    work: Option<Work>,
    build: Arc<ClusterBuild<B>>,
    logs: LogSink,
    done: oneshot::Sender<Result<Executed<Layers>, Failed>>,
    epoch: u32,
    /// When it was submitted, when it was first assigned to a worker, and how many times
    /// (a lost worker's jobs are assigned again; an adopted one was running already).
    submitted: Instant,
    assigned: Option<Instant>,
    assignments: u32,
    adopted: bool,
    /// Its queue phase's span, ended when it is assigned; the vertex span's trace context.
    queue_span: Option<tracing::Span>,
    trace: Option<kiln_model::TraceContext>,
}

/// What hears of workers registering and being lost ([`Cluster::observe_membership`]).
pub type Membership = Arc<dyn Fn(&str, bool) + Send + Sync>;

struct Inner<B> {
    state: ClusterState,
    links: HashMap<String, (u64, mpsc::UnboundedSender<ToWorker<B>>)>,
    pending: HashMap<JobId, Pending<B>>,
    late: u64,
    recipes: HashMap<Layers, Recipe<B>>,
    recipe_order: std::collections::VecDeque<Layers>,
    /// Recomputed results standing in for lost ones.
    substitutes: HashMap<Layers, Layers>,
    /// Layers a shared cache holds, by diff id: results no worker holds can be fetched from
    /// there instead of being recomputed. At most [`MAX_TIER_LAYERS`], oldest forgotten first.
    tier: HashMap<Digest, TierBlob>,
    tier_order: std::collections::VecDeque<Digest>,
    /// Pushes sent to workers and not answered yet, by request: the worker and the waiter.
    pushes: HashMap<u64, (String, oneshot::Sender<Pushed>)>,
    /// Hears of every worker that registers (`true`) or is lost (`false`).
    membership: Option<Membership>,
    /// Work that connected workers kept across a lost session (running or finished), as
    /// they registered with it: the worker holding it and when it registered. Taken by the
    /// first job that needs it within [`kiln_model::ADOPTION_GRACE_MS`] (the worker drops
    /// it then); a worker's entries go when it is lost.
    held_work: HashMap<Work, (String, u64)>,
    /// Counts registrations: a change tells of a worker that registered.
    registrations: tokio::sync::watch::Sender<u64>,
}

/// The coordinator's view of its workers, and the solver's executor over them.
pub struct Cluster<B> {
    inner: Mutex<Inner<B>>,
    next_job: AtomicU64,
}

impl<B: Send + Sync + 'static> Cluster<B> {
    /// An empty cluster; [`Cluster::start_ticker`] runs its lease clock.
    pub fn new(settings: ClusterSettings) -> Arc<Cluster<B>> {
        Arc::new(Cluster {
            inner: Mutex::new(Inner {
                state: ClusterState::new(settings),
                links: HashMap::new(),
                pending: HashMap::new(),
                late: 0,
                recipes: HashMap::new(),
                recipe_order: std::collections::VecDeque::new(),
                substitutes: HashMap::new(),
                tier: HashMap::new(),
                tier_order: std::collections::VecDeque::new(),
                pushes: HashMap::new(),
                membership: None,
                held_work: HashMap::new(),
                registrations: tokio::sync::watch::Sender::new(0),
            }),
            next_job: AtomicU64::new(1),
        })
    }

    /// Tells `observer` of every worker that registers (`true`) and every worker lost
    /// (`false`; its lease ran out or it drained): a replicated coordinator records who its
    /// workers are, so that a new leader knows whom to wait for. Called under the cluster's
    /// lock: it must not block.
    pub fn observe_membership(&self, observer: Membership) {
        self.lock().membership = Some(observer);
    }

    /// The workers registered now, by name.
    pub fn registered(&self) -> Vec<String> {
        self.lock().links.keys().cloned().collect()
    }

    /// Changes each time a worker registers (then [`Cluster::registered`] names it).
    pub fn watch_registrations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.lock().registrations.subscribe()
    }

    /// Ticks the state every `period` (leases, placement timeouts) while the cluster lives.
    pub fn start_ticker(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        let ticks = async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                let Some(cluster) = weak.upgrade() else { return };
                cluster.apply(ClusterCommand::Tick { at: now_ms() });
            }
        };
        tokio::spawn(ticks.instrument(tracing::info_span!("cluster_ticker")));
    }

    fn lock(&self) -> MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, command: ClusterCommand) -> Vec<ClusterEffect> {
        self.lock().apply(command)
    }

    /// A worker connected, holding `layers` and the work it kept from a lost session
    /// (`held`): returns its session and the channel of its assignments, or why it was refused
    /// (another worker holds its name). Jobs waiting for work it holds (queued, or its own
    /// from that session) are adopted by it at once; jobs placed later take the rest of its
    /// held work.
    pub fn register(
        &self,
        info: WorkerInfo,
        layers: Vec<Digest>,
        held: Vec<HeldWork>,
    ) -> Result<(u64, mpsc::UnboundedReceiver<ToWorker<B>>), Refused> {
        let name = info.name.clone();
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        // Jobs needing work it kept (one per work) go back to it before anything is placed.
        let held: HashSet<Work> = held.iter().map(|h| h.work).collect();
        let mut adopt: HashMap<Work, JobId> = HashMap::new();
        for (job, pending) in &inner.pending {
            if let Some(work) = pending.work.filter(|w| held.contains(w)) {
                adopt.entry(work).and_modify(|j| *j = (*j).min(*job)).or_insert(*job);
            }
        }
        // The link exists before the state may assign to it.
        let previous = inner.links.insert(name.clone(), (0, sender));
        let at = now_ms();
        let adopt_jobs = adopt.values().copied().collect();
        let effects = inner.state.apply(ClusterCommand::Register { info, layers, adopt: adopt_jobs, at });
        let mut session = None;
        for effect in &effects {
            match effect {
                ClusterEffect::Registered { session: new, .. } => session = Some(*new),
                ClusterEffect::Refused { reason, .. } => {
                    match previous {
                        Some(link) => inner.links.insert(name, link),
                        None => inner.links.remove(&name),
                    };
                    return Err(Refused(reason.clone()));
                }
                _ => {}
            }
        }
        let session = session.ok_or_else(|| Refused(format!("worker {name}: the registration was not recorded")))?;
        if let Some(link) = inner.links.get_mut(&name) {
            link.0 = session;
        }
        for effect in &effects {
            inner.perform(effect);
        }
        if !held.is_empty() {
            let adopted: HashSet<JobId> = effects
                .iter()
                .filter_map(|e| match e {
                    ClusterEffect::Assign { job, adopted: true, .. } => Some(*job),
                    _ => None,
                })
                .collect();
            tracing::info!(worker = %name, "it kept {} jobs across its lost session; {} adopted at once", held.len(), adopted.len());
            // The rest waits for the jobs that will need it, for as long as the worker keeps it.
            for work in held {
                if !adopt.get(&work).is_some_and(|job| adopted.contains(job)) {
                    inner.held_work.insert(work, (name.clone(), at));
                }
            }
        }
        Ok((session, receiver))
    }

    /// A worker renewed its lease.
    pub fn heartbeat(&self, worker: &str, session: u64, beat: Beat) {
        self.apply(ClusterCommand::Heartbeat { worker: worker.into(), session, beat, at: now_ms() });
    }

    /// A worker's garbage collection removed these layers.
    pub fn evicted(&self, worker: &str, session: u64, layers: Vec<Digest>) {
        self.apply(ClusterCommand::Evicted { worker: worker.into(), session, layers });
    }

    /// Layers a worker removed when its coordinator asked it to prune (its current session).
    pub fn evicted_by(&self, worker: &str, layers: Vec<Digest>) {
        let session = self.lock().links.get(worker).map(|(session, _)| *session);
        if let Some(session) = session {
            self.evicted(worker, session, layers);
        }
    }

    /// A worker's connection ended.
    pub fn disconnect(&self, worker: &str, session: u64) {
        self.apply(ClusterCommand::Disconnect { worker: worker.into(), session, at: now_ms() });
        let mut inner = self.lock();
        if inner.links.get(worker).is_some_and(|(s, _)| *s == session) {
            inner.links.remove(worker);
            // Its pushes will not be answered: their waiters hear so.
            inner.pushes.retain(|_, (pusher, _)| pusher != worker);
        }
    }

    /// Ends every worker's session (the coordinator is stopping): their streams close and
    /// the workers register again with whichever coordinator answers next. Returns how many.
    pub fn close_sessions(&self) -> usize {
        let mut inner = self.lock();
        let closed = inner.links.len();
        inner.links.clear();
        inner.pushes.clear();
        closed
    }

    /// The least loaded connected worker holding all of `layers`, if any.
    pub fn holder_of_all(&self, layers: &[Digest]) -> Option<String> {
        self.lock().state.holder_of_all(layers)
    }

    /// Asks `worker` to push `layers` (which it holds) to `target`, and waits for its answer:
    /// the layers as pushed, or why not (it failed, or left before answering).
    pub async fn push(
        &self,
        worker: &str,
        layers: Vec<Digest>,
        target: PushTarget,
        compression: CacheCompression,
        source_date_epoch: Option<u64>,
    ) -> Pushed {
        let (sender, answer) = oneshot::channel();
        {
            let mut inner = self.lock();
            let request = self.next_job.fetch_add(1, Ordering::Relaxed);
            let Some((_, link)) = inner.links.get(worker) else {
                return Err(format!("worker {worker} is not connected"));
            };
            let push = PushRequest { request, layers, target, compression, source_date_epoch };
            if link.send(ToWorker::Push(push)).is_err() {
                return Err(format!("worker {worker} is not connected"));
            }
            inner.pushes.insert(request, (worker.to_string(), sender));
        }
        answer.await.unwrap_or_else(|_| Err(format!("worker {worker} left before it answered a push")))
    }

    /// A worker's answer to a push (one it was not asked, or another worker's, is dropped).
    pub fn pushed(&self, worker: &str, request: u64, result: Pushed) {
        let mut inner = self.lock();
        if inner.pushes.get(&request).is_some_and(|(pusher, _)| pusher == worker)
            && let Some((_, waiter)) = inner.pushes.remove(&request)
        {
            let _ = waiter.send(result);
        }
    }

    /// A worker drains: it takes no new jobs.
    pub fn drain(&self, worker: &str, session: u64) {
        self.apply(ClusterCommand::Drain { worker: worker.into(), session });
    }

    /// A line of a job's output (dropped unless from the current assignment).
    pub fn log(&self, job: JobId, epoch: u32, line: LogLine) {
        let inner = self.lock();
        if let Some(pending) = inner.pending.get(&job).filter(|p| p.epoch == epoch) {
            let _ = pending.logs.send(line);
        }
    }

    /// A worker's result for a job.
    pub fn report(&self, worker: &str, job: JobId, epoch: u32, result: Result<Executed<Layers>, Failed>) {
        let layers = result.as_ref().map(|e| e.output.layers.clone()).unwrap_or_default();
        let mut inner = self.lock();
        let effects = inner.state.apply(ClusterCommand::Report { job, epoch, worker: worker.into(), layers });
        let mut result = Some(result);
        for effect in &effects {
            if let ClusterEffect::Accept { job, worker } = effect
                && let Some(pending) = inner.pending.remove(job)
                && let Some(result) = result.take()
            {
                let result = match result {
                    Ok(executed) => Ok(Executed { worker: Some(worker.clone()), ..pending.timed(executed) }),
                    Err(failed) => Err(failed.on(worker.clone())),
                };
                let _ = pending.done.send(result);
            } else {
                inner.perform(effect);
            }
        }
    }

    /// The connected workers.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.lock().state.workers()
    }

    /// The steps the workers run now.
    pub fn running_steps(&self) -> Vec<kiln_model::RunningStep> {
        let inner = self.lock();
        let now = now_ms();
        let steps = inner.state.running_jobs().into_iter().filter_map(|(worker, job)| {
            let pending = inner.pending.get(&job)?;
            let running = pending.assigned.map_or(0, |at| at.elapsed().as_millis() as u64);
            let vertex = &pending.vertex;
            Some(kiln_model::RunningStep {
                worker,
                name: vertex.meta.name.clone(),
                vertex: vertex.digest,
                since: now.saturating_sub(running),
            })
        });
        steps.collect()
    }

    /// Jobs waiting for a worker and jobs running, per required platform (`None`: any).
    pub fn jobs_by_platform(&self) -> std::collections::BTreeMap<Option<kiln_types::Platform>, (usize, usize)> {
        self.lock().state.jobs_by_platform()
    }

    /// Bytes of the shared tier's layers this coordinator knows of.
    pub fn tier_bytes(&self) -> u64 {
        self.lock().tier.values().map(|blob| blob.size).sum()
    }

    /// The blob addresses of the workers holding a layer.
    pub fn holders(&self, diff_id: &Digest) -> Vec<String> {
        self.lock().state.holders(diff_id, "")
    }

    /// Records that a shared cache holds these layers (an export wrote them, or an import
    /// found them), so a result whose workers are gone is fetched from there.
    pub fn add_tier(&self, layers: impl IntoIterator<Item = (Digest, TierBlob)>) {
        let mut inner = self.lock();
        for (diff_id, blob) in layers {
            if inner.tier.insert(diff_id, blob).is_none() {
                inner.tier_order.push_back(diff_id);
            }
        }
        while inner.tier_order.len() > MAX_TIER_LAYERS {
            if let Some(old) = inner.tier_order.pop_front() {
                inner.tier.remove(&old);
            }
        }
    }

    /// Forgets the shared cache's blobs of the layers among `inputs` that no worker holds
    /// (after a worker could not fetch one of them).
    fn forget_unheld_tier(&self, inputs: &[Layers]) {
        let mut inner = self.lock();
        for layer in inputs.iter().flat_map(|l| &l.layers) {
            if inner.state.holder_name(&layer.diff_id).is_none() {
                inner.tier.remove(&layer.diff_id);
            }
        }
    }

    /// The shared cache's blob of a layer, if one holds it.
    pub fn tier_blob(&self, diff_id: &Digest) -> Option<TierBlob> {
        self.lock().tier.get(diff_id).cloned()
    }

    /// Jobs waiting for a worker, and late reports dropped so far.
    pub fn counters(&self) -> (usize, u64) {
        let inner = self.lock();
        (inner.state.queued(), inner.late)
    }

    fn cancel(&self, job: JobId) {
        let mut inner = self.lock();
        inner.pending.remove(&job);
        inner.apply(ClusterCommand::Cancel { job });
    }
}

impl<B> Pending<B> {
    /// `executed` with its queue (submitted until first assigned), and the round trip's
    /// overhead beyond the worker's own time counted as dispatch latency (for a job run by
    /// the one worker it was assigned to: a job assigned again, or adopted while it ran, has
    /// no such round trip).
    fn timed(&self, mut executed: Executed<Layers>) -> Executed<Layers> {
        let Some(assigned) = self.assigned else { return executed };
        // The wait for a worker, then for a slot on it (an adaptive worker's admission).
        let on_worker_queue = executed.phases.queue_ms.unwrap_or(0);
        let queue = assigned.saturating_duration_since(self.submitted);
        let queue = u64::try_from(queue.as_millis()).unwrap_or(u64::MAX);
        executed.phases.queue_ms = Some(queue.saturating_add(on_worker_queue));
        if self.assignments == 1 && !self.adopted {
            let on_worker = Duration::from_millis(executed.phases.on_worker_ms().saturating_add(on_worker_queue));
            kiln_telemetry::metrics().dispatched(assigned.elapsed().saturating_sub(on_worker));
        }
        executed
    }
}

impl<B> Inner<B> {
    /// Applies a command to the state and performs its effects.
    fn apply(&mut self, command: ClusterCommand) -> Vec<ClusterEffect> {
        let effects = self.state.apply(command);
        for effect in &effects {
            self.perform(effect);
        }
        effects
    }

    fn perform(&mut self, effect: &ClusterEffect) {
        match effect {
            ClusterEffect::Registered { worker, .. } => {
                if let Some(membership) = &self.membership {
                    membership(worker, true);
                }
                self.registrations.send_modify(|count| *count += 1);
            }
            ClusterEffect::Refused { .. } | ClusterEffect::Accept { .. } => {}
            ClusterEffect::Lost { worker, session } => {
                if self.links.get(worker).is_some_and(|(s, _)| s == session) {
                    self.links.remove(worker);
                }
                self.held_work.retain(|_, (by, _)| by != worker);
                if let Some(membership) = &self.membership {
                    membership(worker, false);
                }
            }
            ClusterEffect::Assign { job, epoch, worker, adopted } => {
                let Some(pending) = self.pending.get_mut(job) else { return };
                pending.epoch = *epoch;
                pending.assigned.get_or_insert_with(Instant::now);
                pending.assignments += 1;
                pending.adopted |= *adopted;
                pending.queue_span = None;
                if *adopted {
                    let line = format!("adopted: worker {worker} kept this step running across its lost session");
                    let _ = pending.logs.send(LogLine { stream: LogStream::Stderr, line });
                }
                let mut sources = Vec::new();
                let mut tier = Vec::new();
                for layer in pending.inputs.iter().flat_map(|l| &l.layers) {
                    if !sources.iter().any(|(d, _)| *d == layer.diff_id) {
                        sources.push((layer.diff_id, self.state.holders(&layer.diff_id, worker)));
                        if let Some(blob) = self.tier.get(&layer.diff_id) {
                            tier.push((layer.diff_id, blob.clone()));
                        }
                    }
                }
                let assignment = Job {
                    id: *job,
                    epoch: *epoch,
                    vertex: pending.vertex.clone(),
                    inputs: pending.inputs.clone(),
                    sources,
                    tier,
                    build: Arc::clone(&pending.build),
                    trace: pending.trace.clone(),
                };
                if let Some((_, link)) = self.links.get(worker) {
                    // A closed link shows up as a disconnect, which requeues the job.
                    let _ = link.send(ToWorker::Assign(Box::new(assignment)));
                }
            }
            ClusterEffect::Revoke { job, worker } => {
                if let Some((_, link)) = self.links.get(worker) {
                    let _ = link.send(ToWorker::Cancel { job: *job });
                }
            }
            ClusterEffect::Late { .. } => self.late += 1,
            ClusterEffect::Fail { job, error } => {
                if let Some(pending) = self.pending.remove(job) {
                    let _ = pending.done.send(Err(format!("{}: {error}", pending.vertex.meta.name).into()));
                }
            }
            ClusterEffect::Waiting { job, message } => {
                if let Some(pending) = self.pending.get(job) {
                    let _ = pending.logs.send(LogLine { stream: LogStream::Stderr, line: message.clone() });
                }
            }
        }
    }
}

/// Cancels the job when the solver drops the execution.
struct CancelOnDrop<B: Send + Sync + 'static> {
    cluster: Arc<Cluster<B>>,
    job: JobId,
    armed: bool,
}

impl<B: Send + Sync + 'static> Drop for CancelOnDrop<B> {
    fn drop(&mut self) {
        if self.armed {
            self.cluster.cancel(self.job);
        }
    }
}

/// The platform a vertex must run on: RUN steps and image sources need theirs; file steps
/// stay with their stage's platform; contexts and merges run anywhere.
fn required_platform(vertex: &Vertex) -> Option<kiln_types::Platform> {
    match &vertex.op {
        Op::Exec(exec) => Some(exec.platform.clone()),
        Op::Source(SourceOp::Image { platform, .. }) => Some(platform.clone()),
        Op::File(_) => vertex.meta.platform.clone(),
        _ => None,
    }
}

/// The solver's executor over a shared [`Cluster`].
pub struct ClusterExecutor<B: Send + Sync + 'static>(pub Arc<Cluster<B>>);

impl<B: Send + Sync + 'static> Executor for ClusterExecutor<B> {
    type Output = Layers;
    type Build = ClusterBuild<B>;

    fn execute(
        &self,
        vertex: Vertex,
        inputs: Vec<Layers>,
        build: Arc<ClusterBuild<B>>,
        logs: LogSink,
    ) -> BoxFuture<Result<Executed<Layers>, Failed>> {
        Box::pin(run(Arc::clone(&self.0), vertex, inputs, build, logs))
    }

    fn worker_name(&self) -> String {
        "cluster".to_string()
    }

    /// Layers some connected worker holds, or that recipes can make again down to layers
    /// that are held (what [`Cluster::recover`] would do, without doing it). After a
    /// coordinator restart the recipes are gone, so a cached result whose worker left is a
    /// miss and runs again.
    ///
    /// The source is `worker:NAME` when connected workers hold every layer (NAME holds the
    /// top one), `shared` when the shared cache holds the ones no worker does, `local` when
    /// it would be recomputed.
    fn available(&self, output: &Layers, _build: &Arc<ClusterBuild<B>>) -> Option<String> {
        let current = self.0.substitute(output);
        let inner = self.0.lock();
        let on_workers = current.layers.iter().all(|l| inner.state.holder_name(&l.diff_id).is_some());
        if on_workers {
            let top = current.layers.last().and_then(|l| inner.state.holder_name(&l.diff_id));
            return Some(top.map_or_else(|| "local".into(), |name| format!("worker:{name}")));
        }
        drop(inner);
        self.0.recoverable(output).then(|| if self.0.held(&current) { "shared" } else { "local" }.to_string())
    }

    fn imports_caches(&self, build: &Arc<ClusterBuild<B>>) -> bool {
        build.imports.is_some()
    }

    /// An imported result is used where the cache holds it: nothing moves until a step
    /// needs its layers, which its worker then fetches from the cache. Its recipe is kept,
    /// so a blob the cache loses later means a recomputation, not a failed build.
    fn import(
        &self,
        key: &Digest,
        vertex: &Vertex,
        inputs: &[Layers],
        build: &Arc<ClusterBuild<B>>,
    ) -> Option<BoxFuture<Result<Executed<Layers>, String>>> {
        let checked = (build.imports.as_ref()?)(key)?;
        let cluster = Arc::clone(&self.0);
        let recipe = Recipe { vertex: vertex.clone(), inputs: inputs.to_vec(), build: Arc::clone(build) };
        Some(Box::pin(async move {
            let hit = checked.await?;
            cluster.add_tier(hit.layers.iter().map(|(layer, blob)| (layer.diff_id, blob.clone())));
            let output = Layers { layers: hit.layers.iter().map(|(layer, _)| *layer).collect() };
            cluster.remember(&output, recipe);
            Ok(Executed { cache_source: Some(hit.source), ..Executed::new(output) })
        }))
    }
}

/// Executes a vertex on the cluster: recovers lost inputs, places the job, waits for its
/// result, and remembers the recipe.
fn run<B: Send + Sync + 'static>(
    cluster: Arc<Cluster<B>>,
    vertex: Vertex,
    inputs: Vec<Layers>,
    build: Arc<ClusterBuild<B>>,
    logs: LogSink,
) -> BoxFuture<Result<Executed<Layers>, Failed>> {
    Box::pin(async move {
        // A merge stacks its inputs' layers: nothing to run.
        if matches!(vertex.op, Op::Merge(_)) {
            return Ok(cluster.merge(vertex, &inputs, build));
        }
        let mut attempt = 0;
        loop {
            let mut ready = Vec::with_capacity(inputs.len());
            for input in &inputs {
                ready.push(Arc::clone(&cluster).recover(input.clone(), logs.clone()).await?);
            }
            let result = cluster.place(vertex.clone(), ready.clone(), Arc::clone(&build), logs.clone()).await;
            match result {
                Err(error) if error.lost_input && attempt < LOST_INPUT_RETRIES => {
                    // A layer the shared cache was to serve may be gone from it: recompute it
                    // rather than send the next worker there again.
                    cluster.forget_unheld_tier(&ready);
                    attempt += 1;
                }
                Ok(executed) => {
                    cluster.remember(&executed.output, Recipe { vertex, inputs: ready, build });
                    return Ok(executed);
                }
                Err(error) => return Err(error),
            }
        }
    })
}

impl<B: Send + Sync + 'static> Cluster<B> {
    /// What stands in for `layers` (itself unless it was recomputed).
    fn substitute(&self, layers: &Layers) -> Layers {
        let inner = self.lock();
        let mut current = layers;
        // Bounded: a recomputation never yields layers that were substituted before.
        for _ in 0..16 {
            match inner.substitutes.get(current) {
                Some(next) => current = next,
                None => break,
            }
        }
        current.clone()
    }

    /// Remembers how `output` was made. A step whose output is one of its inputs (a RUN that
    /// changed nothing, a merge of one input) made nothing: its recipe would name the result
    /// as its own input, so it is not kept. The first recipe of a result stays; a later one
    /// made the same layers again and adds nothing.
    fn remember(&self, output: &Layers, recipe: Recipe<B>) {
        // A step that mounts secrets cannot be made again once its build (and with it the
        // secrets) is gone: losing its result is a miss, which a later build runs itself.
        if output.layers.is_empty() || recipe.inputs.contains(output) || !recipe.vertex.op.secret_ids().is_empty() {
            return;
        }
        let mut inner = self.lock();
        if let std::collections::hash_map::Entry::Vacant(slot) = inner.recipes.entry(output.clone()) {
            slot.insert(recipe);
            inner.recipe_order.push_back(output.clone());
        }
        while inner.recipe_order.len() > MAX_RECIPES {
            if let Some(old) = inner.recipe_order.pop_front() {
                inner.recipes.remove(&old);
            }
        }
    }

    /// A merge's output: its inputs' layers stacked (as they stand now), remembered.
    fn merge(&self, vertex: Vertex, inputs: &[Layers], build: Arc<ClusterBuild<B>>) -> Executed<Layers> {
        let inputs: Vec<Layers> = inputs.iter().map(|i| self.substitute(i)).collect();
        let output = Layers { layers: inputs.iter().flat_map(|l| l.layers.iter().copied()).collect() };
        self.remember(&output, Recipe { vertex, inputs, build });
        Executed::new(output)
    }

    /// Whether `layers` are held, or recipes lead from them to held layers (at most
    /// [`MAX_RECOVERY_DEPTH`] recipes deep, as recovery goes).
    fn recoverable(&self, layers: &Layers) -> bool {
        let mut pending = vec![(self.substitute(layers), 0)];
        let mut seen = std::collections::HashSet::new();
        while let Some((current, depth)) = pending.pop() {
            if self.held(&current) || !seen.insert(current.clone()) {
                continue;
            }
            let inputs = match self.lock().recipes.get(&current) {
                Some(recipe) if depth < MAX_RECOVERY_DEPTH => recipe.inputs.clone(),
                _ => return false,
            };
            pending.extend(inputs.iter().map(|input| (self.substitute(input), depth + 1)));
        }
        true
    }

    /// Whether every layer is on a connected worker or in the shared cache.
    fn held(&self, layers: &Layers) -> bool {
        let inner = self.lock();
        layers
            .layers
            .iter()
            .all(|l| inner.tier.contains_key(&l.diff_id) || !inner.state.holders(&l.diff_id, "").is_empty())
    }

    /// `layers` where some connected worker holds every layer: itself, what replaced it, or
    /// a recomputation from its recipe, whose own lost inputs are recomputed first. The
    /// results still to recompute are an explicit stack, never a recursion, so a long chain
    /// of lost steps costs no stack; past [`MAX_RECOVERY_DEPTH`] the input counts as lost.
    pub fn recover(self: Arc<Self>, layers: Layers, logs: LogSink) -> BoxFuture<Result<Layers, Failed>> {
        Box::pin(async move {
            let mut pending = vec![layers];
            let mut attempt = 0;
            while let Some(wanted) = pending.last() {
                let current = self.substitute(wanted);
                if self.held(&current) {
                    pending.pop();
                    if pending.is_empty() {
                        return Ok(current);
                    }
                    continue;
                }
                let recipe = self.lock().recipes.get(&current).cloned();
                let Some(recipe) = recipe else {
                    return Err(Failed::lost_input("layers of an earlier result were lost with their worker"));
                };
                let inputs: Vec<Layers> = recipe.inputs.iter().map(|i| self.substitute(i)).collect();
                if let Some(missing) = inputs.iter().find(|i| !self.held(i)) {
                    if pending.len() >= MAX_RECOVERY_DEPTH {
                        return Err(Failed::lost_input(format!(
                            "recomputing {} needs more than {MAX_RECOVERY_DEPTH} lost results recomputed first",
                            recipe.vertex.meta.name
                        )));
                    }
                    pending.push(missing.clone());
                    continue;
                }
                let _ = logs.send(LogLine {
                    stream: LogStream::Stderr,
                    line: format!("recomputing {}: its result was lost with its worker", recipe.vertex.meta.name),
                });
                let made = if matches!(recipe.vertex.op, Op::Merge(_)) {
                    self.merge(recipe.vertex, &inputs, recipe.build)
                } else {
                    let placed =
                        self.place(recipe.vertex.clone(), inputs.clone(), Arc::clone(&recipe.build), logs.clone());
                    match placed.await {
                        Ok(executed) => {
                            self.remember(&executed.output, Recipe { inputs, ..recipe });
                            executed
                        }
                        // An input vanished between the check and the fetch: look again.
                        Err(failed) if failed.lost_input && attempt < LOST_INPUT_RETRIES => {
                            attempt += 1;
                            continue;
                        }
                        Err(failed) => return Err(failed),
                    }
                };
                if made.output != current {
                    self.lock().substitutes.insert(current, made.output);
                }
            }
            Err(Failed::lost_input("nothing to recover"))
        })
    }

    /// Queues one job and waits for its result; dropping the future cancels the job.
    async fn place(
        self: &Arc<Self>,
        vertex: Vertex,
        inputs: Vec<Layers>,
        build: Arc<ClusterBuild<B>>,
        logs: LogSink,
    ) -> Result<Executed<Layers>, Failed> {
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        let work = kiln_model::work_of(&vertex, &inputs, build.cache_group.as_deref());
        let spec = JobSpec {
            build: build.id,
            platform: required_platform(&vertex),
            inputs: inputs.iter().flat_map(|l| l.layers.iter().copied()).collect(),
            entitlements: kiln_model::Entitlement::needed_by(&vertex.op),
        };
        let (done, result) = oneshot::channel();
        {
            let mut inner = self.lock();
            let submitted = Instant::now();
            let trace = kiln_telemetry::context_of(&tracing::Span::current())
                .map(|(traceparent, tracestate)| kiln_model::TraceContext { traceparent, tracestate });
            let queue_span = Some(kiln_telemetry::phase_span(kiln_telemetry::Phase::Queue));
            let pending = Pending {
                vertex,
                inputs,
                work,
                build,
                logs,
                done,
                epoch: 0,
                submitted,
                assigned: None,
                assignments: 0,
                adopted: false,
                queue_span,
                trace,
            };
            inner.pending.insert(job, pending);
            let at = now_ms();
            let held_by = work
                .and_then(|w| inner.held_work.remove(&w))
                .filter(|(_, since)| at.saturating_sub(*since) < kiln_model::ADOPTION_GRACE_MS)
                .map(|(worker, _)| worker);
            inner.apply(ClusterCommand::Submit { job, spec, held_by, at });
        }
        let mut guard = CancelOnDrop { cluster: Arc::clone(self), job, armed: true };
        let result = result.await.unwrap_or_else(|_| Err(String::from("the cluster dropped the job").into()));
        guard.armed = false;
        result
    }
}
