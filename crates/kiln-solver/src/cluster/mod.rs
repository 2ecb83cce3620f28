//! Executing on a cluster of remote workers: [`Cluster`] implements the solver's
//! [`Executor`] by queueing each execution as a job in [`state::ClusterState`] and sending
//! assignments to the workers' connections; the gRPC layer feeds worker messages back in.
//!
//! A job's result is the first report for its current assignment (worker and epoch). A worker
//! that disconnects or misses its lease loses its jobs: they are requeued with a new epoch,
//! so whatever it reports later is dropped as late, never counted twice.

pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_graph::{Op, SourceOp, Vertex};
use kiln_types::Digest;
use tokio::sync::{mpsc, oneshot};

use state::{ClusterCommand, ClusterEffect, ClusterState, JobSpec};
pub use state::{ClusterSettings, JobId, LayerDesc, Layers, WorkerInfo, WorkerStatus};

use crate::{BoxFuture, Executed, Executor, LogLine, LogSink, LogStream, now_ms};

/// A build's inputs as the cluster carries them: an id (builds take turns) and whatever the
/// workers need (contexts, secrets).
#[derive(Debug)]
pub struct ClusterBuild<B> {
    /// The build's id.
    pub id: u64,
    /// What workers need.
    pub data: B,
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
    /// The build's inputs.
    pub build: Arc<ClusterBuild<B>>,
}

/// A message for a worker.
#[derive(Debug)]
pub enum ToWorker<B> {
    /// Run a job.
    Assign(Job<B>),
    /// Stop a job.
    Cancel {
        /// The job.
        job: JobId,
    },
}

struct Pending<B> {
    vertex: Vertex,
    inputs: Vec<Layers>,
    build: Arc<ClusterBuild<B>>,
    logs: LogSink,
    done: oneshot::Sender<Result<Executed<Layers>, String>>,
    epoch: u32,
}

struct Inner<B> {
    state: ClusterState,
    links: HashMap<String, (u64, mpsc::UnboundedSender<ToWorker<B>>)>,
    pending: HashMap<JobId, Pending<B>>,
    late: u64,
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
            }),
            next_job: AtomicU64::new(1),
        })
    }

    /// Ticks the state every `period` (leases, placement timeouts) while the cluster lives.
    pub fn start_ticker(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                let Some(cluster) = weak.upgrade() else { return };
                cluster.apply(ClusterCommand::Tick { at: now_ms() });
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, command: ClusterCommand) -> Vec<ClusterEffect> {
        let mut inner = self.lock();
        let effects = inner.state.apply(command);
        for effect in &effects {
            inner.perform(effect);
        }
        effects
    }

    /// A worker connected: returns its session and the channel of its assignments.
    pub fn register(&self, info: WorkerInfo, layers: Vec<Digest>) -> (u64, mpsc::UnboundedReceiver<ToWorker<B>>) {
        let name = info.name.clone();
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        // The link exists before the state may assign to it.
        inner.links.insert(name.clone(), (0, sender));
        let effects = inner.state.apply(ClusterCommand::Register { info, layers, at: now_ms() });
        let session = effects
            .iter()
            .find_map(|e| match e {
                ClusterEffect::Registered { session, .. } => Some(*session),
                _ => None,
            })
            .expect("registering yields a session");
        if let Some(link) = inner.links.get_mut(&name) {
            link.0 = session;
        }
        for effect in &effects {
            inner.perform(effect);
        }
        (session, receiver)
    }

    /// A worker renewed its lease.
    pub fn heartbeat(&self, worker: &str, session: u64, free_disk: u64) {
        self.apply(ClusterCommand::Heartbeat { worker: worker.into(), session, free_disk, at: now_ms() });
    }

    /// A worker's connection ended.
    pub fn disconnect(&self, worker: &str, session: u64) {
        self.apply(ClusterCommand::Disconnect { worker: worker.into(), session, at: now_ms() });
        let mut inner = self.lock();
        if inner.links.get(worker).is_some_and(|(s, _)| *s == session) {
            inner.links.remove(worker);
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
    pub fn report(&self, worker: &str, job: JobId, epoch: u32, result: Result<Executed<Layers>, String>) {
        let layers = result.as_ref().map(|e| e.output.layers.clone()).unwrap_or_default();
        let mut inner = self.lock();
        let effects = inner.state.apply(ClusterCommand::Report { job, epoch, worker: worker.into(), layers });
        let mut result = Some(result);
        for effect in &effects {
            if let ClusterEffect::Accept { job, worker } = effect
                && let Some(pending) = inner.pending.remove(job)
                && let Some(result) = result.take()
            {
                let result = result.map(|mut executed| {
                    executed.worker = Some(worker.clone());
                    executed
                });
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

    /// The blob addresses of the workers holding a layer.
    pub fn holders(&self, diff_id: &Digest) -> Vec<String> {
        self.lock().state.holders(diff_id, "")
    }

    /// Jobs waiting for a worker, and late reports dropped so far.
    pub fn counters(&self) -> (usize, u64) {
        let inner = self.lock();
        (inner.state.queued(), inner.late)
    }

    fn cancel(&self, job: JobId) {
        let mut inner = self.lock();
        inner.pending.remove(&job);
        let effects = inner.state.apply(ClusterCommand::Cancel { job });
        for effect in &effects {
            inner.perform(effect);
        }
    }
}

impl<B> Inner<B> {
    fn perform(&mut self, effect: &ClusterEffect) {
        match effect {
            ClusterEffect::Registered { .. } | ClusterEffect::Accept { .. } => {}
            ClusterEffect::Lost { worker, session } => {
                if self.links.get(worker).is_some_and(|(s, _)| s == session) {
                    self.links.remove(worker);
                }
            }
            ClusterEffect::Assign { job, epoch, worker } => {
                let Some(pending) = self.pending.get_mut(job) else { return };
                pending.epoch = *epoch;
                let mut sources = Vec::new();
                for layer in pending.inputs.iter().flat_map(|l| &l.layers) {
                    if !sources.iter().any(|(d, _)| *d == layer.diff_id) {
                        sources.push((layer.diff_id, self.state.holders(&layer.diff_id, worker)));
                    }
                }
                let assignment = Job {
                    id: *job,
                    epoch: *epoch,
                    vertex: pending.vertex.clone(),
                    inputs: pending.inputs.clone(),
                    sources,
                    build: Arc::clone(&pending.build),
                };
                if let Some((_, link)) = self.links.get(worker) {
                    // A closed link shows up as a disconnect, which requeues the job.
                    let _ = link.send(ToWorker::Assign(assignment));
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
                    let _ = pending.done.send(Err(format!("{}: {error}", pending.vertex.meta.name)));
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
    ) -> BoxFuture<Result<Executed<Layers>, String>> {
        // A merge stacks its inputs' layers: nothing to run.
        if matches!(vertex.op, Op::Merge(_)) {
            let layers = inputs.into_iter().flat_map(|l| l.layers).collect();
            return Box::pin(async move { Ok(Executed { output: Layers { layers }, pin: None, worker: None }) });
        }
        let cluster = Arc::clone(&self.0);
        Box::pin(async move {
            let job = cluster.next_job.fetch_add(1, Ordering::Relaxed);
            let spec = JobSpec {
                build: build.id,
                platform: required_platform(&vertex),
                inputs: inputs.iter().flat_map(|l| l.layers.iter().copied()).collect(),
            };
            let (done, result) = oneshot::channel();
            {
                let mut inner = cluster.lock();
                inner.pending.insert(job, Pending { vertex, inputs, build, logs, done, epoch: 0 });
                let effects = inner.state.apply(ClusterCommand::Submit { job, spec, at: now_ms() });
                for effect in &effects {
                    inner.perform(effect);
                }
            }
            let mut guard = CancelOnDrop { cluster: Arc::clone(&cluster), job, armed: true };
            let result = result.await.unwrap_or_else(|_| Err("the cluster dropped the job".into()));
            guard.armed = false;
            result
        })
    }

    fn worker_name(&self) -> String {
        "cluster".to_string()
    }
}
