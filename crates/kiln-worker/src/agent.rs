//! The worker role: a session with a control plane (reconnecting when it drops), each
//! assignment run as its own task (inputs fetched from peers, context files from the
//! coordinator, then [`Worker::execute`]), heartbeats within the lease, and drain on stop:
//! running jobs finish, nothing new is taken.
//!
//! Its `RUN` and file steps take a slot of its [`Admission`] (docs/parallelism.md), as a
//! standalone daemon's do: an adaptive worker holds a placed step back while its machine is
//! under pressure, and tells the coordinator its capacity (a heartbeat whenever it changes),
//! which is how many jobs the coordinator places on it.
//!
//! A lost session does not stop its jobs. They run on as orphans, and a result that comes
//! while no session is open is kept. The next registration reports them by what they compute
//! ([`kiln_model::work_of`]); an assignment of the same work, under whatever job id and epoch
//! the (possibly new) coordinator gives it, attaches to the orphan or takes its kept result
//! instead of running the step again. What nobody adopts within [`ADOPTION_GRACE`] of the
//! registration is stopped and dropped.
//!
//! The control plane is a trait ([`ControlPlane`], [`SessionLink`]): the daemon plugs in the
//! gRPC session with a coordinator, tests an in-process one.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_context::{BuildContext, StoredContext};
use kiln_graph::{Op, SourceOp};
use kiln_model::{
    Assignment, Beat, BoxFuture, Executed, Failed, FromCoordinator, HeldWork, JobId, Layers, LogLine, LogSink, Phases,
    PushedLayer, Work, WorkerInfo,
};
use kiln_solver::admission::Admission;
use kiln_telemetry::Phase;
use kiln_types::{Digest, elapsed_ms};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{BlobFetcher, BuildInputs, StoreError, Worker, free_space, select_context};

/// The first wait before reconnecting; it doubles up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// The longest wait between two registration attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// A capacity change goes to the control plane at once, but at most this often: a machine
/// near the calm threshold could change it every pressure tick.
const CAPACITY_BEAT: Duration = Duration::from_millis(100);
/// How long a drained worker waits for the control plane to close its side.
const DRAIN_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long after registering again the jobs of a lost session wait to be adopted
/// ([`kiln_model::ADOPTION_GRACE_MS`]). Then running ones are stopped and kept results dropped.
pub const ADOPTION_GRACE: Duration = Duration::from_millis(kiln_model::ADOPTION_GRACE_MS);
/// Results of orphaned jobs kept at most (the oldest are dropped first), and results sent
/// remembered at most.
const MAX_KEPT_RESULTS: usize = 256;
/// How long a result sent is remembered: if the session is lost within this time, the
/// coordinator may have died before it recorded the result, and the result is kept for the
/// next one. It covers a dead coordinator's detection (the keepalive, a few seconds).
const RECENT: Duration = Duration::from_secs(10);

/// What a worker sends on a session (cheap to clone; one clone per running job).
pub trait SessionLink: Clone + Send + Sync + 'static {
    /// Renews the lease, with the free bytes on the state directory's disk, the bytes its
    /// cache holds (as the last garbage collection measured) and its capacity.
    fn heartbeat(&self, beat: Beat);
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

    /// Registers `info` with the layers this worker already holds and the jobs it kept from a
    /// lost session, and opens a session.
    fn connect(
        &self,
        info: WorkerInfo,
        layers: Vec<Digest>,
        held: Vec<HeldWork>,
    ) -> BoxFuture<Result<Session<Self::Link>, Self::Error>>;

    /// Where the control plane is, for logs (`http://HOST:PORT`).
    fn address(&self) -> String;
}

/// Runs the worker role until `stop` is cancelled, then drains: registers (again after a
/// broken session, backing off), runs assignments, and returns once the running jobs are done.
/// Its steps take slots of `admission` ([`Admission::for_cluster`]), whose capacity it tells.
/// `disk` is the directory whose free space heartbeats report; `registered` says whether a
/// session is open.
pub async fn run<C: ControlPlane>(
    worker: Arc<Worker>,
    control: Arc<C>,
    fetcher: Arc<dyn BlobFetcher>,
    (info, admission): (WorkerInfo, Arc<Admission>),
    disk: PathBuf,
    (stop, registered): (CancellationToken, tokio::sync::watch::Sender<bool>),
) {
    let address = control.address();
    let mut delay = FIRST_RECONNECT_DELAY;
    let mut jobs = Jobs::default();
    loop {
        if stop.is_cancelled() {
            return;
        }
        // The blob index can be large: listed off the async threads.
        let cas = Arc::clone(worker.cas());
        let listed = tokio::task::spawn_blocking(move || cas.list().unwrap_or_default()).await;
        let layers: Vec<Digest> = listed.unwrap_or_default().into_iter().map(|b| b.digest).collect();
        let current = WorkerInfo {
            free_disk: free_space(&disk),
            cache_bytes: worker.gc().used(),
            capacity: admission.current_capacity(),
            ..info.clone()
        };
        jobs.collect();
        let held = jobs.held();
        match control.connect(current, layers, held.clone()).await {
            Ok(session) => {
                tracing::info!(worker = %info.name, "registered with {address}, holding {} jobs of its lost session", held.len());
                delay = FIRST_RECONNECT_DELAY;
                let served = Served {
                    worker: Arc::clone(&worker),
                    fetcher: Arc::clone(&fetcher),
                    admission: Arc::clone(&admission),
                    address: &address,
                };
                registered.send_replace(true);
                let ended = served.serve(session, &mut jobs, &disk, &stop).await;
                registered.send_replace(false);
                match ended {
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

/// Where a job's logs and result go.
enum Route<L> {
    /// A session's link, and the job as that session knows it (id, epoch).
    Session(L, JobId, u32),
    /// Nowhere yet: its session was lost, and it runs on for whoever adopts it.
    Orphan,
    /// It ended with no open session to tell: its result is on its way to [`Jobs::kept`].
    Kept,
}

/// A job's route, shared by its task and the session loop.
type Binding<L> = Arc<Mutex<Route<L>>>;

fn route<L>(binding: &Binding<L>) -> MutexGuard<'_, Route<L>> {
    binding.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a finished job's result goes now: an open session (its link and the job as that
/// session knows it), or, when there is none, nowhere (the route becomes [`Route::Kept`] and
/// the result is to be kept). Decided under the route's lock, so an adoption either happens
/// before (and gets the result) or sees `Kept` (and takes the kept result).
fn destination<L: SessionLink>(binding: &Binding<L>) -> Option<(L, JobId, u32)> {
    let mut route = route(binding);
    match &*route {
        Route::Session(link, job, epoch) if link.is_open() => Some((link.clone(), *job, *epoch)),
        _ => {
            *route = Route::Kept;
            None
        }
    }
}

/// A running job.
struct Task<L> {
    /// What it computes (`None`: it cannot be adopted).
    work: Option<Work>,
    binding: Binding<L>,
    abort: AbortHandle,
}

/// A job's result kept for whoever asks for its work: its layers stay held from garbage
/// collection meanwhile (when they still were at the end).
struct Kept {
    result: Result<Executed<Layers>, Failed>,
    _hold: Option<Arc<kiln_layer::Hold>>,
}

/// How a job's task ended.
enum Ended {
    /// Its result went to its session; kept a while in case that session is lost before the
    /// coordinator recorded it.
    Sent(Kept),
    /// No open session: its result is kept.
    Kept(Kept),
}

/// The jobs a worker runs, across its sessions.
struct Jobs<L> {
    set: JoinSet<(u64, Ended)>,
    tasks: HashMap<u64, Task<L>>,
    /// Results waiting to be adopted, by work.
    kept: HashMap<Work, Kept>,
    /// Kept results, oldest first.
    kept_order: VecDeque<Work>,
    /// Results sent in the last [`RECENT`], newest last: when the session is lost they are
    /// kept, as the coordinator may have died before it recorded them.
    recent: VecDeque<(tokio::time::Instant, Work, Kept)>,
    next: u64,
}

impl<L> Default for Jobs<L> {
    fn default() -> Self {
        Jobs {
            set: JoinSet::new(),
            tasks: HashMap::new(),
            kept: HashMap::new(),
            kept_order: VecDeque::new(),
            recent: VecDeque::new(),
            next: 0,
        }
    }
}

impl<L: SessionLink> Jobs<L> {
    /// Runs a job bound to a session.
    fn spawn(&mut self, work: Option<Work>, binding: Binding<L>, job: impl Future<Output = Ended> + Send + 'static) {
        let id = self.next;
        self.next += 1;
        let abort = self.set.spawn(async move { (id, job.await) });
        self.tasks.insert(id, Task { work, binding, abort });
    }

    /// A job's task ended: a result nobody received is kept for whoever adopts its work; one
    /// sent is remembered for [`RECENT`].
    fn finished(&mut self, id: u64, ended: Ended) {
        let Some(Task { work: Some(work), .. }) = self.tasks.remove(&id) else { return };
        match ended {
            Ended::Kept(kept) => self.keep(work, kept),
            Ended::Sent(sent) => {
                let now = tokio::time::Instant::now();
                self.recent.push_back((now, work, sent));
                while self.recent.len() > MAX_KEPT_RESULTS
                    || self.recent.front().is_some_and(|(at, ..)| *at + RECENT < now)
                {
                    self.recent.pop_front();
                }
            }
        }
    }

    fn keep(&mut self, work: Work, kept: Kept) {
        if self.kept.insert(work, kept).is_none() {
            self.kept_order.push_back(work);
        }
        while self.kept_order.len() > MAX_KEPT_RESULTS {
            if let Some(old) = self.kept_order.pop_front() {
                self.kept.remove(&old);
            }
        }
    }

    /// Takes in the jobs that ended since the last look (between sessions nobody waits for
    /// them).
    fn collect(&mut self) {
        while let Some(done) = self.set.try_join_next() {
            if let Ok((id, ended)) = done {
                self.finished(id, ended);
            }
        }
    }

    /// The orphans, as a registration reports them.
    fn held(&self) -> Vec<HeldWork> {
        let mut held: Vec<HeldWork> = Vec::new();
        for task in self.tasks.values() {
            let finished = match &*route(&task.binding) {
                Route::Session(..) => continue,
                Route::Orphan => false,
                Route::Kept => true,
            };
            held.extend(task.work.map(|work| HeldWork { work, finished }));
        }
        held.extend(self.kept_order.iter().map(|work| HeldWork { work: *work, finished: true }));
        held
    }

    fn has_orphans(&self) -> bool {
        !self.kept.is_empty() || self.tasks.values().any(|t| !matches!(&*route(&t.binding), Route::Session(..)))
    }

    /// The session is lost: its jobs run on as orphans (except those nobody could adopt), and
    /// the results it received last are kept.
    fn orphan_all(&mut self) {
        self.tasks.retain(|_, task| {
            let mut route = route(&task.binding);
            if matches!(&*route, Route::Session(..)) {
                *route = Route::Orphan;
            }
            if task.work.is_none() {
                task.abort.abort();
            }
            task.work.is_some()
        });
        let now = tokio::time::Instant::now();
        while let Some((at, work, kept)) = self.recent.pop_front() {
            if at + RECENT >= now {
                self.keep(work, kept);
            }
        }
    }

    /// Stops the orphans and drops kept results: returns how many there were.
    fn drop_orphans(&mut self) -> usize {
        let before = self.tasks.len() + self.kept.len();
        self.tasks.retain(|_, task| {
            let orphan = matches!(&*route(&task.binding), Route::Orphan);
            if orphan {
                task.abort.abort();
            }
            !orphan
        });
        self.kept.clear();
        self.kept_order.clear();
        before - self.tasks.len()
    }

    /// Stops the job the session knows as `job`.
    fn cancel(&mut self, job: JobId) {
        self.tasks.retain(|_, task| {
            let cancelled = matches!(&*route(&task.binding), Route::Session(_, j, _) if *j == job);
            if cancelled {
                task.abort.abort();
            }
            !cancelled
        });
    }

    /// Attaches an assignment to the orphan computing the same work, or answers it with the
    /// result kept for that work: `false` when this worker holds no such work.
    async fn adopt(&mut self, assignment: &Assignment, link: &L) -> bool {
        let Some(work) = assignment.work() else { return false };
        let (job, epoch) = (assignment.job, assignment.epoch);
        let name = &assignment.vertex.meta.name;
        loop {
            if let Some(kept) = self.kept.remove(&work) {
                self.kept_order.retain(|w| *w != work);
                tracing::info!(job, epoch, vertex = %name, "adopted: it finished while no coordinator was connected");
                link.result(job, epoch, kept.result);
                return true;
            }
            let mut ending = false;
            for task in self.tasks.values().filter(|t| t.work == Some(work)) {
                let mut route = route(&task.binding);
                match &*route {
                    Route::Orphan => {
                        *route = Route::Session(link.clone(), job, epoch);
                        tracing::info!(job, epoch, vertex = %name, "adopted: it ran on across the lost session");
                        return true;
                    }
                    Route::Kept => ending = true,
                    Route::Session(..) => {}
                }
            }
            if !ending {
                return false;
            }
            // Its result is on its way to being kept: take in the jobs that end until it is.
            match self.set.join_next().await {
                Some(Ok((id, ended))) => self.finished(id, ended),
                Some(Err(_)) => {}
                None => return false,
            }
        }
    }
}

/// What every job of a session shares.
struct Served<'a> {
    worker: Arc<Worker>,
    fetcher: Arc<dyn BlobFetcher>,
    admission: Arc<Admission>,
    /// The control plane's blob service, for context files.
    address: &'a str,
}

impl Served<'_> {
    /// Serves one session: `None` when it ended by draining, else why it broke.
    async fn serve<L: SessionLink>(
        &self,
        session: Session<L>,
        jobs: &mut Jobs<L>,
        disk: &Path,
        stop: &CancellationToken,
    ) -> Option<String> {
        let Session { link, lease_ms, mut incoming } = session;
        let mut heartbeat = tokio::time::interval(Duration::from_millis((lease_ms / 3).max(100)));
        let mut capacity = self.admission.capacity();
        // Measured by the periodic heartbeats; a capacity change sends the last measure.
        let mut free_disk = free_space(disk);
        let beat = |free_disk, capacity: &mut tokio::sync::watch::Receiver<usize>| Beat {
            free_disk,
            cache_bytes: self.worker.gc().used(),
            capacity: *capacity.borrow_and_update(),
        };
        let (mut capacity_changed, mut next_capacity_beat) = (false, tokio::time::Instant::now());
        let mut collect = tokio::time::interval(crate::GC_INTERVAL);
        // The orphans of the lost session wait this long to be adopted.
        let mut adoption = jobs.has_orphans().then(|| tokio::time::Instant::now() + ADOPTION_GRACE);
        let mut draining = stop.is_cancelled();
        if draining {
            jobs.drop_orphans();
            link.drain();
        }
        loop {
            // What the coordinator counts against the capacity.
            self.admission.set_placed(jobs.tasks.len());
            if draining && jobs.tasks.is_empty() {
                // Close our side and wait for the control plane to close its own: it has then
                // seen every result sent.
                drop(link);
                let _ =
                    tokio::time::timeout(DRAIN_CLOSE_GRACE, async { while incoming.recv().await.is_some() {} }).await;
                return None;
            }
            tokio::select! {
                _ = heartbeat.tick() => {
                    free_disk = free_space(disk);
                    link.heartbeat(beat(free_disk, &mut capacity));
                }
                // The admission outlives the session: its capacity never stops changing.
                Ok(()) = capacity.changed(), if !capacity_changed => capacity_changed = true,
                () = tokio::time::sleep_until(next_capacity_beat), if capacity_changed => {
                    capacity_changed = false;
                    next_capacity_beat = tokio::time::Instant::now() + CAPACITY_BEAT;
                    link.heartbeat(beat(free_disk, &mut capacity));
                }
                _ = collect.tick() => {
                    let (gc, link) = (Arc::clone(self.worker.gc()), link.clone());
                    tokio::spawn(async move { collected(gc.collect().await, &link) });
                }
                () = sleep_until(adoption), if adoption.is_some() => {
                    adoption = None;
                    let dropped = jobs.drop_orphans();
                    if dropped > 0 {
                        tracing::info!("stopped or dropped {dropped} jobs of the lost session: no coordinator adopted them");
                    }
                }
                () = stop.cancelled(), if !draining => {
                    draining = true;
                    jobs.drop_orphans();
                    link.drain();
                    tracing::info!("draining: finishing {} running jobs", jobs.tasks.len());
                }
                Some(done) = jobs.set.join_next(), if !jobs.set.is_empty() => {
                    if let Ok((id, ended)) = done {
                        jobs.finished(id, ended);
                    }
                }
                message = incoming.recv() => match message {
                    Some(Ok(FromCoordinator::Assign(assignment))) => {
                        if !jobs.adopt(&assignment, &link).await {
                            let work = assignment.work();
                            let session = Route::Session(link.clone(), assignment.job, assignment.epoch);
                            let binding = Arc::new(Mutex::new(session));
                            let task = run_job(
                                Arc::clone(&self.worker),
                                Arc::clone(&self.fetcher),
                                Arc::clone(&self.admission),
                                *assignment,
                                Arc::clone(&binding),
                                self.address.to_string(),
                            );
                            jobs.spawn(work, binding, task);
                        }
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
                    Some(Ok(FromCoordinator::Cancel(job))) => jobs.cancel(job),
                    Some(Err(why)) => {
                        // The control plane ended the session; the jobs run on for whichever
                        // coordinator adopts them.
                        jobs.orphan_all();
                        return Some(why);
                    }
                    None => {
                        jobs.orphan_all();
                        return Some("the connection closed".into());
                    }
                }
            }
        }
    }
}

/// Waits until `deadline` (forever when there is none).
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Runs a job and reports its result to the session its route names then; with no open
/// session, the result is returned to be kept.
async fn run_job<L: SessionLink>(
    worker: Arc<Worker>,
    fetcher: Arc<dyn BlobFetcher>,
    admission: Arc<Admission>,
    assignment: Assignment,
    binding: Binding<L>,
    coordinator: String,
) -> Ended {
    let (job, epoch) = (assignment.job, assignment.epoch);
    let span = tracing::info_span!("job", job, epoch, vertex = %assignment.vertex.meta.name);
    span.in_scope(|| tracing::info!("started"));
    // The job's layers stay until it is done (garbage collection leaves them), and after it
    // for as long as its result is kept.
    let hold = Arc::new(worker.snapshots().hold());
    let run = Run { worker: &worker, fetcher: fetcher.as_ref(), admission: &admission, coordinator: &coordinator };
    let result = run.execute(assignment, &binding, &hold).instrument(span.clone()).await;
    if let Err(error) = &result {
        span.in_scope(|| tracing::info!("failed: {error}"));
    }
    if destination(&binding).is_none() {
        span.in_scope(|| tracing::info!("ended with no coordinator connected: its result is kept"));
        return Ended::Kept(Kept { result, _hold: Some(hold) });
    }
    drop(hold);
    // The job's layers are released: collect if the store may be over its limits, started
    // before the result goes out (so a `du` that follows the build sees it done).
    let collecting = worker.gc().collect_soon().await;
    // The session may have been lost meanwhile, or the job adopted under another.
    let Some((link, job, epoch)) = destination(&binding) else {
        span.in_scope(|| tracing::info!("its session was lost as it ended: its result is kept"));
        return Ended::Kept(Kept { result, _hold: None });
    };
    link.result(job, epoch, result.clone());
    match collecting.await {
        Ok(collection) => collected(collection, &link),
        Err(error) => tracing::warn!("garbage collection: {error}"),
    }
    Ended::Sent(Kept { result, _hold: None })
}

/// Tells the coordinator which layers a collection removed.
fn collected<L: SessionLink>(result: Result<crate::Collected, StoreError>, link: &L) {
    match result {
        Ok(collected) if !collected.evicted.is_empty() => link.evicted(&collected.evicted),
        Ok(_) => {}
        Err(error) => tracing::warn!("garbage collection: {error}"),
    }
}

/// What a job runs with.
struct Run<'a> {
    worker: &'a Worker,
    fetcher: &'a dyn BlobFetcher,
    admission: &'a Arc<Admission>,
    /// The control plane's blob service, for context files.
    coordinator: &'a str,
}

impl Run<'_> {
    /// Fetches the job's inputs, waits for a slot (`RUN` and file steps), executes it and
    /// describes its output.
    async fn execute<L: SessionLink>(
        &self,
        assignment: Assignment,
        binding: &Binding<L>,
        hold: &Arc<kiln_layer::Hold>,
    ) -> Result<Executed<Layers>, Failed> {
        let Run { worker, fetcher, admission, coordinator } = *self;
        // The phases' spans go under the coordinator's span of the vertex (none when it is not
        // traced: they would be traces of their own).
        let traced = |phase| {
            let trace = assignment.trace.as_ref()?;
            let span = kiln_telemetry::phase_span(phase);
            kiln_telemetry::set_parent(&span, &trace.traceparent, &trace.tracestate);
            Some(span)
        };
        let fetching = Instant::now();
        let fetch_span = traced(Phase::Fetch);
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
                let sizes: HashMap<Digest, u64> = manifest.blobs().into_iter().collect();
                let blobs: Vec<(Digest, u64)> =
                    digests.iter().map(|d| (*d, sizes.get(d).copied().unwrap_or(0))).collect();
                worker.ensure_blobs(&blobs, address, fetcher).await.map_err(|e| Failed::from(e.to_string()))?;
            }
            contexts.insert(name.clone(), Arc::new(context));
        }
        let mut phases = Phases { fetch_ms: Some(elapsed_ms(fetching)), ..Phases::default() };
        drop(fetch_span);
        let build = BuildInputs {
            contexts,
            secrets: assignment.secrets,
            hold: Some(Arc::clone(hold)),
            cache_group: assignment.cache_group,
            ..BuildInputs::default()
        };
        // Lines go to the job's session; an orphan's are dropped.
        let binding = Arc::clone(binding);
        let logs = LogSink::new(move |line| {
            let session = match &*route(&binding) {
                Route::Session(link, job, epoch) => Some((link.clone(), *job, *epoch)),
                Route::Orphan | Route::Kept => None,
            };
            match session {
                Some((link, job, epoch)) => {
                    link.log(job, epoch, line);
                    link.is_open()
                }
                None => true,
            }
        });
        // Only real work takes a slot; a step past the CPUs waits while the machine is busy.
        let _slot = match &assignment.vertex.op {
            Op::Exec(_) | Op::File(_) => {
                let (slot, waited) = admission.slot(|| traced(Phase::Queue)).await;
                if let Some(waited) = waited {
                    phases.queue_ms = Some(waited.ms);
                    if let Some(line) = waited.line {
                        let _ = logs.send(line);
                    }
                }
                Some(slot)
            }
            _ => None,
        };
        let executing = Instant::now();
        let execute_span = traced(Phase::Execute);
        let output =
            worker.execute(&assignment.vertex, &inputs, &build, Some(&logs)).await.map_err(|e| e.to_string())?;
        build.hold(&output.snapshot.layers)?;
        phases.execute_ms = Some(elapsed_ms(executing));
        drop(execute_span);
        let exporting = Instant::now();
        let export_span = traced(Phase::Export);
        let layers = worker.describe(&output.snapshot).await.map_err(|e| Failed::from(e.to_string()))?;
        phases.export_ms = Some(elapsed_ms(exporting));
        drop(export_span);
        Ok(Executed { pin: output.image.map(|i| i.manifest_digest), phases, ..Executed::new(Layers { layers }) })
    }
}
