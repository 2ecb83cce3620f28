//! The async driver around [`SolverState`]: one task owns the state and handles one event at
//! a time; executions run as their own tasks and report back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use crate::admission::{Admission, Parallelism};
use kiln_graph::{Graph, Op};
use kiln_kv::{KvError, SharedKv};
use kiln_model::{BuildEvent, Executed, Executor, Failed, LogLine, LogSink, LogStream};
use kiln_telemetry::{Phase, Tier, metrics, phase_span};
use kiln_types::{Digest, now_ms};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::Event;
use crate::state::{BuildId, BuildOptions, Command, Effect, SolverState};

/// The key-value tree of the cache index: cache key (text) → the result (JSON).
pub const CACHE_TREE: &str = "solver-cache";

/// How the driver runs executions.
#[derive(Clone)]
pub struct SolverConfig {
    /// The worker's parallelism: executions of exec and file vertices at once, held only
    /// around the execution itself (not around cache lookups or source resolution).
    pub parallelism: Parallelism,
    /// Makes a finished job's cache entry durable before any build is told it is done.
    pub durable: Option<Durable>,
}

/// Records a finished job's cache entry (the cache key, and the entry's bytes as the cache
/// tree keeps them); resolves with whether it did. A replicated coordinator commits it to the
/// log. The solver goes on at once (the job's users are dispatched) but holds back every
/// event of the builds that waited on the job until the entry is recorded: a step reported
/// done is never executed again after a failover. An entry that could not be recorded keeps
/// those builds' events back until they end (a deposed leader's builds are ended).
pub type Durable = Arc<dyn Fn(Digest, Vec<u8>) -> kiln_model::BoxFuture<bool> + Send + Sync>;

impl std::fmt::Debug for SolverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolverConfig")
            .field("parallelism", &self.parallelism)
            .field("durable", &self.durable.is_some())
            .finish()
    }
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig { parallelism: Parallelism::Fixed(16), durable: None }
    }
}

enum Message<E: Executor> {
    Submit {
        graph: Graph,
        options: BuildOptions,
        build: Arc<E::Build>,
        events: mpsc::UnboundedSender<Event<E::Output>>,
        id: BuildId,
        span: tracing::Span,
    },
    Cancel(BuildId),
    Started {
        key: Digest,
        at: u64,
    },
    Log {
        key: Digest,
        line: LogLine,
    },
    Finished {
        key: Digest,
        result: Result<Executed<E::Output>, Failed>,
        at: u64,
        /// The result's cache entry is being recorded ([`SolverConfig::durable`]):
        /// [`Message::Recorded`] follows.
        recording: bool,
    },
    /// A finished job's cache entry is recorded (`true`), or will not be.
    Recorded(Digest, bool),
    /// A cache entry stored or forgotten elsewhere (a replicated coordinator's leader).
    Learn(Command<E::Output>),
}

/// A handle on a running build: its events and a way to cancel it.
pub struct BuildHandle<O> {
    /// The build's id.
    pub id: BuildId,
    /// Progress events, ending with [`Event::Finished`].
    pub events: mpsc::UnboundedReceiver<Event<O>>,
    cancel: Box<dyn Fn() + Send + Sync>,
}

impl<O> Drop for BuildHandle<O> {
    /// Dropping the handle cancels the build (a no-op once it finished).
    fn drop(&mut self) {
        (self.cancel)();
    }
}

impl<O> BuildHandle<O> {
    /// Cancels the build; shared work continues for other builds that wait on it.
    pub fn cancel(&self) {
        (self.cancel)();
    }

    /// Waits for the end, dropping progress events (the error as in [`Event::Finished`]).
    pub async fn wait(&mut self) -> (Result<Vec<Option<O>>, String>, Vec<crate::VertexRecord>) {
        while let Some(event) = self.events.recv().await {
            if let Event::Finished(result, records) = event {
                return (result, records);
            }
        }
        (Err("the solver stopped".into()), Vec::new())
    }
}

/// The solver service.
pub struct Solver<E: Executor> {
    sender: mpsc::UnboundedSender<Message<E>>,
    next_build: std::sync::atomic::AtomicU64,
    admission: Arc<Admission>,
}

impl<E: Executor> Solver<E> {
    /// Starts the driver task. Cache entries persist in `kv` when given (and are loaded
    /// from it now).
    pub fn start(executor: Arc<E>, config: SolverConfig, kv: Option<SharedKv>) -> Result<Solver<E>, KvError> {
        let mut state = SolverState::default();
        if let Some(kv) = &kv {
            for (key, value) in kv.scan_prefix(CACHE_TREE, b"")? {
                if let Some(command) = learnt(&key, Some(&value)) {
                    state.apply(command);
                }
            }
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let admission = Admission::new(config.parallelism, config.parallelism.pressure());
        let driver = Driver {
            state,
            executor,
            kv,
            admission: Arc::clone(&admission),
            sender: sender.clone(),
            builds: HashMap::new(),
            running: HashMap::new(),
            logs: HashMap::new(),
            durable: config.durable,
            stored_by_durable: HashSet::new(),
            uncommitted: HashSet::new(),
            holding: Vec::new(),
            gates: HashMap::new(),
            gated: HashMap::new(),
            spans: HashMap::new(),
        };
        tokio::spawn(driver.run(receiver).instrument(tracing::info_span!("solver")));
        Ok(Solver { sender, next_build: std::sync::atomic::AtomicU64::new(1), admission })
    }

    /// Learns a cache entry another member of a replicated coordinator stored (`Some`, the
    /// bytes the cache tree keeps) or forgot (`None`). An entry that does not parse is
    /// ignored: a lost entry only costs an execution.
    pub fn learn(&self, key: &[u8], value: Option<&[u8]>) {
        if let Some(command) = learnt(key, value) {
            let _ = self.sender.send(Message::Learn(command));
        }
    }

    /// Replaces the whole cache index by `entries` (the bytes the cache tree keeps), as a
    /// replicated coordinator's snapshot does.
    pub fn relearn(&self, entries: Vec<(Vec<u8>, Vec<u8>)>) {
        let _ = self.sender.send(Message::Learn(Command::ForgetAll));
        for (key, value) in entries {
            self.learn(&key, Some(&value));
        }
    }

    /// Executions waiting for a worker slot, and executions holding one (exec and file
    /// steps; sources take none).
    pub fn load(&self) -> (usize, usize) {
        self.admission.load()
    }

    /// The most executions it lets run at once (an adaptive admission's ceiling).
    pub fn slots(&self) -> usize {
        self.admission.ceiling()
    }

    /// Submits a build; its progress arrives on the handle.
    pub fn submit(&self, graph: Graph, options: BuildOptions, build: Arc<E::Build>) -> BuildHandle<E::Output> {
        let id = self.next_build.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        // The caller's span (a build's) is the parent of its vertices' spans.
        let span = tracing::Span::current();
        let _ = self.sender.send(Message::Submit { graph, options, build, events, id, span });
        let sender = self.sender.clone();
        BuildHandle { id, events: receiver, cancel: Box::new(move || drop(sender.send(Message::Cancel(id)))) }
    }
}

/// Hands a job's result to the driver, then records its cache entry through `durable`
/// (when given and the job succeeded) and says so.
async fn finish<E: Executor>(
    sender: mpsc::UnboundedSender<Message<E>>,
    durable: Option<Durable>,
    key: Digest,
    result: Result<Executed<E::Output>, Failed>,
) {
    let entry = match (&durable, &result) {
        (Some(_), Ok(executed)) => Some(serde_json::to_vec(&executed.output).expect("outputs serialise")),
        _ => None,
    };
    let _ = sender.send(Message::Finished { key, result, at: now_ms(), recording: entry.is_some() });
    if let (Some(durable), Some(entry)) = (durable, entry) {
        let recorded = durable(key, entry).await;
        let _ = sender.send(Message::Recorded(key, recorded));
    }
}

/// A vertex's span (a CI task run, in its build's trace), under `parent` (the build's).
fn vertex_span(
    name: &str,
    digest: &Digest,
    platform: Option<&kiln_types::Platform>,
    parent: &tracing::Span,
) -> tracing::Span {
    let platform = platform.map(ToString::to_string).unwrap_or_default();
    tracing::info_span!(
        target: kiln_telemetry::TRACE_TARGET,
        parent: parent,
        "vertex",
        otel.name = name,
        otel.status_code = tracing::field::Empty,
        cicd.pipeline.task.name = name,
        cicd.pipeline.task.run.id = tracing::field::Empty,
        kiln.vertex.digest = %digest,
        kiln.platform = platform,
        kiln.worker = tracing::field::Empty,
        kiln.cache = tracing::field::Empty,
        kiln.cache_source = tracing::field::Empty,
    )
}

/// Counts an execution's phases in the metrics.
fn observe(phases: &kiln_model::Phases) {
    let measured = [
        (Phase::Queue, phases.queue_ms),
        (Phase::Fetch, phases.fetch_ms),
        (Phase::Execute, phases.execute_ms),
        (Phase::Export, phases.export_ms),
    ];
    for (phase, ms) in measured {
        if let Some(ms) = ms {
            metrics().phase(phase, std::time::Duration::from_millis(ms));
        }
    }
}

/// A build's events held back, in order, each with the cache entries it waits for.
type Gate<O> = VecDeque<(Vec<Digest>, Event<O>)>;

/// The command that records the cache tree's entry `key` (`value`: stored; `None`: gone).
fn learnt<O: serde::de::DeserializeOwned>(key: &[u8], value: Option<&[u8]>) -> Option<Command<O>> {
    let key = std::str::from_utf8(key).ok()?.parse::<Digest>().ok()?;
    match value {
        Some(value) => Some(Command::Restore { key, output: serde_json::from_slice(value).ok()? }),
        None => Some(Command::Forget { key }),
    }
}

/// A build's executor inputs and where its events go.
/// A build's executor context, its events, and the span its vertices' spans go under.
type BuildEntry<E> =
    (Arc<<E as Executor>::Build>, mpsc::UnboundedSender<Event<<E as Executor>::Output>>, tracing::Span);

struct Driver<E: Executor> {
    state: SolverState<E::Output>,
    executor: Arc<E>,
    kv: Option<SharedKv>,
    admission: Arc<Admission>,
    sender: mpsc::UnboundedSender<Message<E>>,
    builds: HashMap<BuildId, BuildEntry<E>>,
    running: HashMap<Digest, JoinHandle<()>>,
    /// Output so far of each running job, replayed to builds that join it late.
    logs: HashMap<Digest, Vec<LogLine>>,
    durable: Option<Durable>,
    /// Finished jobs whose cache entries `durable` records (their `Store` is done there).
    stored_by_durable: HashSet<Digest>,
    /// Cache entries `durable` is recording.
    uncommitted: HashSet<Digest>,
    /// While a message is handled: the entries the events it emits report.
    holding: Vec<Digest>,
    /// Builds whose events are held back, by build.
    gates: HashMap<BuildId, Gate<E::Output>>,
    /// The builds held back by each entry being recorded.
    gated: HashMap<Digest, Vec<BuildId>>,
    /// The spans of jobs running, by the build that runs each and the vertex.
    spans: HashMap<(BuildId, Digest), tracing::Span>,
}

impl<E: Executor> Driver<E> {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Message<E>>) {
        while let Some(message) = receiver.recv().await {
            self.handle(message);
        }
    }

    fn handle(&mut self, message: Message<E>) {
        let effects = match message {
            Message::Submit { graph, options, build, events, id, span } => {
                self.builds.insert(id, (build, events, span));
                self.state.apply(Command::Submit { build: id, graph, options, at: now_ms() })
            }
            Message::Cancel(id) => self.state.apply(Command::Cancel { build: id }),
            Message::Started { key, at } => {
                self.state.apply(Command::Started { key, worker: self.executor.worker_name(), at })
            }
            Message::Log { key, line } => {
                for (build, vertex) in self.state.waiters(&key) {
                    self.emit(build, Event::Progress(BuildEvent::Log { vertex, line: line.clone() }));
                }
                self.logs.entry(key).or_default().push(line);
                Vec::new()
            }
            Message::Finished { key, result, at, recording } => {
                self.running.remove(&key);
                self.logs.remove(&key);
                if recording {
                    self.stored_by_durable.insert(key);
                    self.uncommitted.insert(key);
                    self.holding.push(key);
                }
                self.state.apply(Command::Finished { key, result, at })
            }
            Message::Recorded(key, recorded) => {
                self.release(key, recorded);
                Vec::new()
            }
            Message::Learn(command) => self.state.apply(command),
        };
        // Effects in order; answering a cache check adds more, which run right after it.
        let mut queue: VecDeque<Effect<E::Output>> = effects.into();
        while let Some(effect) = queue.pop_front() {
            for (i, effect) in self.perform(effect).into_iter().enumerate() {
                queue.insert(i, effect);
            }
        }
        self.holding.clear();
    }

    /// Sends `event` to `build`, unless it must wait: an event that reports a job whose cache
    /// entry is not recorded yet (emitted while that job's result, or a cache hit on it, is
    /// handled) waits for the entry, and every later event of the build waits behind it.
    fn emit(&mut self, build: BuildId, event: Event<E::Output>) {
        if let Event::Progress(BuildEvent::Completed { record, .. }) = &event {
            self.trace_completed(build, record);
        }
        let keys: Vec<Digest> = self.holding.iter().filter(|key| self.uncommitted.contains(key)).copied().collect();
        if keys.is_empty() && !self.gates.contains_key(&build) {
            return self.deliver(build, event);
        }
        for key in &keys {
            self.gated.entry(*key).or_default().push(build);
        }
        self.gates.entry(build).or_default().push_back((keys, event));
    }

    /// The entry of `key` is recorded (or will not be): the builds waiting on it get the
    /// events that wait for nothing else, in order.
    fn release(&mut self, key: Digest, recorded: bool) {
        self.uncommitted.remove(&key);
        self.stored_by_durable.remove(&key);
        let mut builds = self.gated.remove(&key).unwrap_or_default();
        builds.sort_unstable();
        builds.dedup();
        for build in builds {
            if !recorded {
                // Nothing that waits on it may be reported done: the build ends here (a leader
                // that cannot commit is deposed, and its builds' clients go elsewhere).
                self.gates.remove(&build);
                self.forget(build);
                continue;
            }
            let Some(gate) = self.gates.get_mut(&build) else { continue };
            let mut ready = Vec::new();
            while let Some((keys, _)) = gate.front() {
                if keys.iter().any(|key| self.uncommitted.contains(key)) {
                    break;
                }
                ready.extend(gate.pop_front().map(|(_, event)| event));
            }
            if gate.is_empty() {
                self.gates.remove(&build);
            }
            for event in ready {
                self.deliver(build, event);
            }
        }
    }

    /// A vertex of `build` ended: its span (the job's, for the build that ran it; otherwise
    /// one at its end: a cache hit, another build's run) says how, and closes.
    fn trace_completed(&mut self, build: BuildId, record: &crate::VertexRecord) {
        let span = match self.spans.remove(&(build, record.digest)) {
            Some(span) => span,
            None => {
                let Some((_, _, parent)) = self.builds.get(&build) else { return };
                let platform = record.platform.as_deref().and_then(|p| p.parse().ok());
                vertex_span(&record.name, &record.digest, platform.as_ref(), parent)
            }
        };
        span.record("kiln.cache", record.status.as_str());
        if let Some(worker) = &record.worker {
            span.record("kiln.worker", worker.as_str());
        }
        if let Some(source) = &record.cache_source {
            span.record("kiln.cache_source", source.as_str());
        }
        if record.status == kiln_model::Status::Failed {
            span.record("otel.status_code", "ERROR");
        }
    }

    fn deliver(&mut self, build: BuildId, event: Event<E::Output>) {
        let finished = matches!(event, Event::Finished(..));
        if let Some((_, events, _)) = self.builds.get(&build) {
            let _ = events.send(event);
        }
        if finished {
            self.forget(build);
        }
    }

    /// A build is over here: its entry and its jobs' spans go (a job still running for
    /// other builds keeps its span, which says its build went, until it ends).
    fn forget(&mut self, build: BuildId) {
        self.builds.remove(&build);
        self.spans.retain(|(owner, _), span| {
            let gone = *owner == build;
            if gone {
                span.record("kiln.cache", "abandoned");
            }
            !gone
        });
    }

    /// Performs one effect; returns the effects of the command it answered, if any.
    fn perform(&mut self, effect: Effect<E::Output>) -> Vec<Effect<E::Output>> {
        match effect {
            Effect::Emit { build, event } => self.emit(build, event),
            Effect::Replay { key, build, vertex } => {
                for line in self.logs.get(&key).cloned().unwrap_or_default() {
                    self.emit(build, Event::Progress(BuildEvent::Log { vertex, line }));
                }
            }
            Effect::Store { key, output } => {
                if self.stored_by_durable.remove(&key) {
                    return Vec::new();
                }
                if let Some(kv) = &self.kv {
                    let value = serde_json::to_vec(&output).expect("outputs serialise");
                    // A lost cache entry only costs a re-execution; never fail a build for it.
                    if let Err(error) = kv.put(CACHE_TREE, key.to_string().as_bytes(), &value) {
                        tracing::warn!("cache entry {key} not recorded: {error}");
                    }
                }
            }
            Effect::Forget { key } => {
                if let Some(kv) = &self.kv {
                    let _ = kv.delete(CACHE_TREE, key.to_string().as_bytes());
                }
            }
            Effect::CheckCached { build, index, key, output } => {
                // A hit on an entry still being recorded is reported once it is.
                if self.uncommitted.contains(&key) {
                    self.holding.push(key);
                }
                // A build that is gone (cancelled) uses nothing more.
                let context = self.builds.get(&build).map(|(context, _, _)| context);
                let source = context.and_then(|context| self.executor.available(&output, context));
                // Misses are counted when the job runs (a stale entry is one miss, not two).
                if source.is_some() {
                    metrics().cache_lookup(Tier::Local, true);
                }
                return self.state.apply(Command::CacheChecked { build, index, key, source, at: now_ms() });
            }
            Effect::Abort { key } => {
                if let Some(task) = self.running.remove(&key) {
                    task.abort();
                }
                self.logs.remove(&key);
            }
            Effect::Run { key, vertex, inputs, build, import, cacheable } => {
                let durable = if cacheable { self.durable.clone() } else { None };
                let Some((context, _, parent)) = self.builds.get(&build) else { return Vec::new() };
                // The job's span, under its build's; it says how the vertex ended when it does.
                let span = vertex_span(&vertex.meta.name, &vertex.digest, vertex.meta.platform.as_ref(), parent);
                span.record("cicd.pipeline.task.run.id", key.to_string());
                let imported = if import { self.executor.import(&key, &vertex, &inputs, context) } else { None };
                if import {
                    metrics().cache_lookup(Tier::Local, false);
                    if imported.is_none() && self.executor.imports_caches(context) {
                        metrics().cache_lookup(Tier::Shared, false);
                    }
                }
                let (executor, context, sender) =
                    (Arc::clone(&self.executor), Arc::clone(context), self.sender.clone());
                self.spans.insert((build, vertex.digest), span.clone());
                // Sources resolve and transfer; only real work takes a worker slot.
                let admission = matches!(vertex.op, Op::Exec(_) | Op::File(_)).then(|| Arc::clone(&self.admission));
                let task = tokio::spawn(
                    async move {
                        // Lines go straight into the driver's queue, tagged with the job, ahead of
                        // the job's result (no task per job).
                        let log_sender = sender.clone();
                        let logs = LogSink::new(move |line| log_sender.send(Message::Log { key, line }).is_ok());
                        // An imported result needs no slot; a failed import is a miss.
                        let tried_import = imported.is_some();
                        if let Some(imported) = imported {
                            let _ = sender.send(Message::Started { key, at: now_ms() });
                            let imported = imported.await;
                            metrics().cache_lookup(Tier::Shared, imported.is_ok());
                            match imported {
                                Ok(executed) => return finish(sender, durable, key, Ok(executed)).await,
                                Err(reason) => {
                                    let line = format!("WARNING: {reason}; executing the step");
                                    let _ = logs.send(LogLine { stream: LogStream::Stderr, line });
                                }
                            }
                        }
                        // Only a step that waits for a slot has a queue phase here.
                        let (_slot, waited) = match admission {
                            Some(admission) => {
                                let (slot, waited) = admission.slot(|| phase_span(Phase::Queue)).await;
                                // Why a step past the CPUs was let in: for `--debug`.
                                if let Some(line) = waited.as_ref().and_then(|w| w.line.clone()) {
                                    let _ = logs.send(line);
                                }
                                (Some(slot), waited.map(|w| w.ms))
                            }
                            None => (None, None),
                        };
                        if !tried_import {
                            let _ = sender.send(Message::Started { key, at: now_ms() });
                        }
                        let result = executor.execute(*vertex, inputs, context, logs).await.map(|mut executed| {
                            // The wait for a slot here comes before any queue of the executor's.
                            let queue = &mut executed.phases.queue_ms;
                            *queue = match (waited, *queue) {
                                (None, None) => None,
                                (waited, queue) => Some(waited.unwrap_or(0) + queue.unwrap_or(0)),
                            };
                            observe(&executed.phases);
                            executed
                        });
                        finish(sender, durable, key, result).await;
                    }
                    .instrument(span),
                );
                self.running.insert(key, task);
            }
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use kiln_graph::{ExecOp, GraphBuilder, Input, NetworkMode, Output, SecurityMode, SourceOp, Vertex, VertexMeta};
    use kiln_model::BoxFuture;
    use kiln_types::Platform;
    use tokio::sync::oneshot;

    use super::*;

    /// Runs every vertex at once, telling the test which.
    struct Instant(mpsc::UnboundedSender<Digest>);

    impl Executor for Instant {
        type Output = u64;
        type Build = ();

        fn execute(
            &self,
            vertex: Vertex,
            _: Vec<u64>,
            _: Arc<()>,
            _: LogSink,
        ) -> BoxFuture<Result<Executed<u64>, Failed>> {
            let _ = self.0.send(vertex.digest);
            Box::pin(async { Ok(Executed::new(1)) })
        }

        fn worker_name(&self) -> String {
            "instant".into()
        }
    }

    /// A context source and two exec steps on it, one after the other.
    fn chain() -> Graph {
        let meta = |name: &str| VertexMeta { name: name.into(), stage: None, platform: None, lines: None };
        let mut graph = GraphBuilder::new();
        let source = Op::Source(SourceOp::Local {
            name: "context".into(),
            include: vec![],
            exclude: vec![],
            content: Digest::of(b"context"),
        });
        let mut last = graph.add(source, vec![], meta("source")).unwrap();
        for step in ["one", "two"] {
            let op = Op::Exec(ExecOp {
                args: vec![step.into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                network: NetworkMode::None,
                security: SecurityMode::Sandbox,
                rootfs: Input::Index(0),
                mounts: vec![],
                platform: Platform::host(),
            });
            last = graph.add(op, vec![last], meta(step)).unwrap();
        }
        graph.finish(vec![Output { platform: Platform::host(), digest: Some(last) }])
    }

    /// A solver whose cache entries are recorded when the test says.
    fn solver() -> (Solver<Instant>, mpsc::UnboundedReceiver<Digest>, mpsc::UnboundedReceiver<oneshot::Sender<bool>>) {
        let (executed, runs) = mpsc::unbounded_channel();
        let (asked, records) = mpsc::unbounded_channel();
        let durable: Durable = Arc::new(move |_, _| {
            let (answer, answered) = oneshot::channel();
            let _ = asked.send(answer);
            Box::pin(async move { answered.await.unwrap_or(false) })
        });
        let config = SolverConfig { parallelism: Parallelism::Fixed(4), durable: Some(durable) };
        (Solver::start(Arc::new(Instant(executed)), config, None).unwrap(), runs, records)
    }

    fn completed(event: &Event<u64>) -> bool {
        matches!(event, Event::Output { .. } | Event::Progress(BuildEvent::Completed { .. }) | Event::Finished(..))
    }

    #[tokio::test]
    async fn a_step_is_reported_done_only_once_recorded_while_its_users_run_at_once() {
        let (solver, mut runs, mut records) = solver();
        let mut build = solver.submit(chain(), BuildOptions::default(), Arc::new(()));
        // The source's entry is being recorded: its user runs, but nothing is reported done.
        let source = records.recv().await.unwrap();
        let one = runs.recv().await.unwrap();
        let second = records.recv().await.unwrap();
        while let Ok(event) = build.events.try_recv() {
            assert!(!completed(&event), "reported before its entry was recorded: {event:?}");
        }
        source.send(true).unwrap();
        second.send(true).unwrap();
        let two = runs.recv().await.unwrap();
        assert_ne!(one, two);
        records.recv().await.unwrap().send(true).unwrap();
        let (result, records) = build.wait().await;
        assert_eq!(result.unwrap(), vec![Some(1)]);
        assert_eq!(records.len(), 3);
    }

    #[tokio::test]
    async fn a_build_waiting_on_an_entry_that_is_not_recorded_is_never_told_it_is_done() {
        let (solver, _runs, mut records) = solver();
        let mut build = solver.submit(chain(), BuildOptions::default(), Arc::new(()));
        records.recv().await.unwrap().send(false).unwrap();
        // Its events end without a result: the build is ended elsewhere (a deposed leader).
        while let Some(event) = build.events.recv().await {
            assert!(!completed(&event), "{event:?}");
        }
    }
}
