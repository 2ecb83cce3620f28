//! The async driver around [`SolverState`]: one task owns the state and handles one event at
//! a time; executions run as their own tasks and report back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use kiln_graph::{Graph, Op};
use kiln_kv::{KvError, SharedKv};
use kiln_model::{BuildEvent, Executed, Executor, Failed, LogLine, LogSink, LogStream};
use kiln_types::{Digest, now_ms};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::Event;
use crate::state::{BuildId, BuildOptions, Command, Effect, SolverState};

/// The key-value tree of the cache index: cache key (text) → the result (JSON).
pub const CACHE_TREE: &str = "solver-cache";

/// How the driver runs executions.
#[derive(Clone)]
pub struct SolverConfig {
    /// The worker's max-parallelism: executions of exec and file vertices at once, held only
    /// around the execution itself (not around cache lookups or source resolution).
    pub worker_parallelism: usize,
    /// Makes a finished job's cache entry durable before the solver acts on the result.
    pub durable: Option<Durable>,
}

/// Records a finished job's cache entry (the cache key, and the entry's bytes as the cache
/// tree keeps them) before the solver reports the vertex done: a replicated coordinator
/// commits it to the log, so a step reported done is never executed again after a failover.
/// A failure to record is the recorder's to report; the build goes on.
pub type Durable = Arc<dyn Fn(Digest, Vec<u8>) -> kiln_model::BoxFuture<()> + Send + Sync>;

impl std::fmt::Debug for SolverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SolverConfig")
            .field("worker_parallelism", &self.worker_parallelism)
            .field("durable", &self.durable.is_some())
            .finish()
    }
}

impl Default for SolverConfig {
    fn default() -> Self {
        SolverConfig { worker_parallelism: 16, durable: None }
    }
}

enum Message<E: Executor> {
    Submit {
        graph: Graph,
        options: BuildOptions,
        build: Arc<E::Build>,
        events: mpsc::UnboundedSender<Event<E::Output>>,
        id: BuildId,
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
        /// The result's cache entry is durable already ([`SolverConfig::durable`]).
        recorded: bool,
    },
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
        let driver = Driver {
            state,
            executor,
            kv,
            slots: Arc::new(Semaphore::new(config.worker_parallelism.max(1))),
            sender: sender.clone(),
            builds: HashMap::new(),
            running: HashMap::new(),
            logs: HashMap::new(),
            durable: config.durable,
            recorded: HashSet::new(),
        };
        tokio::spawn(driver.run(receiver).instrument(tracing::info_span!("solver")));
        Ok(Solver { sender, next_build: std::sync::atomic::AtomicU64::new(1) })
    }

    /// Learns a cache entry another member of a replicated coordinator stored (`Some`, the
    /// bytes the cache tree keeps) or forgot (`None`). An entry that does not parse is
    /// ignored: a lost entry only costs an execution.
    pub fn learn(&self, key: &[u8], value: Option<&[u8]>) {
        if let Some(command) = learnt(key, value) {
            let _ = self.sender.send(Message::Learn(command));
        }
    }

    /// Submits a build; its progress arrives on the handle.
    pub fn submit(&self, graph: Graph, options: BuildOptions, build: Arc<E::Build>) -> BuildHandle<E::Output> {
        let id = self.next_build.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        let _ = self.sender.send(Message::Submit { graph, options, build, events, id });
        let sender = self.sender.clone();
        BuildHandle { id, events: receiver, cancel: Box::new(move || drop(sender.send(Message::Cancel(id)))) }
    }
}

/// Makes the cache entry of a finished job durable through `durable`; whether it did.
async fn record<O: serde::Serialize>(durable: Option<&Durable>, key: Digest, output: &O) -> bool {
    let Some(durable) = durable else { return false };
    durable(key, serde_json::to_vec(output).expect("outputs serialise")).await;
    true
}

/// The command that records the cache tree's entry `key` (`value`: stored; `None`: gone).
fn learnt<O: serde::de::DeserializeOwned>(key: &[u8], value: Option<&[u8]>) -> Option<Command<O>> {
    let key = std::str::from_utf8(key).ok()?.parse::<Digest>().ok()?;
    match value {
        Some(value) => Some(Command::Restore { key, output: serde_json::from_slice(value).ok()? }),
        None => Some(Command::Forget { key }),
    }
}

/// A build's executor inputs and where its events go.
type BuildEntry<E> = (Arc<<E as Executor>::Build>, mpsc::UnboundedSender<Event<<E as Executor>::Output>>);

struct Driver<E: Executor> {
    state: SolverState<E::Output>,
    executor: Arc<E>,
    kv: Option<SharedKv>,
    slots: Arc<Semaphore>,
    sender: mpsc::UnboundedSender<Message<E>>,
    builds: HashMap<BuildId, BuildEntry<E>>,
    running: HashMap<Digest, JoinHandle<()>>,
    /// Output so far of each running job, replayed to builds that join it late.
    logs: HashMap<Digest, Vec<LogLine>>,
    durable: Option<Durable>,
    /// Finished jobs whose cache entries `durable` recorded (their `Store` is done).
    recorded: HashSet<Digest>,
}

impl<E: Executor> Driver<E> {
    async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Message<E>>) {
        while let Some(message) = receiver.recv().await {
            self.handle(message);
        }
    }

    fn handle(&mut self, message: Message<E>) {
        let effects = match message {
            Message::Submit { graph, options, build, events, id } => {
                self.builds.insert(id, (build, events));
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
            Message::Finished { key, result, at, recorded } => {
                self.running.remove(&key);
                self.logs.remove(&key);
                if recorded {
                    self.recorded.insert(key);
                }
                self.state.apply(Command::Finished { key, result, at })
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
    }

    fn emit(&mut self, build: BuildId, event: Event<E::Output>) {
        let finished = matches!(event, Event::Finished(..));
        if let Some((_, events)) = self.builds.get(&build) {
            let _ = events.send(event);
        }
        if finished {
            self.builds.remove(&build);
        }
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
                if self.recorded.remove(&key) {
                    return Vec::new();
                }
                if let Some(kv) = &self.kv {
                    let value = serde_json::to_vec(&output).expect("outputs serialise");
                    // A lost cache entry only costs a re-execution; never fail a build for it.
                    let _ = kv.put(CACHE_TREE, key.to_string().as_bytes(), &value);
                }
            }
            Effect::Forget { key } => {
                if let Some(kv) = &self.kv {
                    let _ = kv.delete(CACHE_TREE, key.to_string().as_bytes());
                }
            }
            Effect::CheckCached { build, index, key, output } => {
                // A build that is gone (cancelled) uses nothing more.
                let context = self.builds.get(&build).map(|(context, _)| context);
                let source = context.and_then(|context| self.executor.available(&output, context));
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
                let Some((context, _)) = self.builds.get(&build) else { return Vec::new() };
                let imported = if import { self.executor.import(&key, &vertex, &inputs, context) } else { None };
                let (executor, context, sender) =
                    (Arc::clone(&self.executor), Arc::clone(context), self.sender.clone());
                // Sources resolve and transfer; only real work takes a worker slot.
                let slots = matches!(vertex.op, Op::Exec(_) | Op::File(_)).then(|| Arc::clone(&self.slots));
                let task = tokio::spawn(async move {
                    // Lines go straight into the driver's queue, tagged with the job, ahead of
                    // the job's result (no task per job).
                    let log_sender = sender.clone();
                    let logs = LogSink::new(move |line| log_sender.send(Message::Log { key, line }).is_ok());
                    // An imported result needs no slot; a failed import is a miss.
                    let tried_import = imported.is_some();
                    if let Some(imported) = imported {
                        let _ = sender.send(Message::Started { key, at: now_ms() });
                        match imported.await {
                            Ok(executed) => {
                                let recorded = record(durable.as_ref(), key, &executed.output).await;
                                let finished = Message::Finished { key, result: Ok(executed), at: now_ms(), recorded };
                                let _ = sender.send(finished);
                                return;
                            }
                            Err(reason) => {
                                let line = format!("WARNING: {reason}; executing the step");
                                let _ = logs.send(LogLine { stream: LogStream::Stderr, line });
                            }
                        }
                    }
                    let _slot = match slots {
                        Some(slots) => Some(slots.acquire_owned().await.expect("the semaphore is never closed")),
                        None => None,
                    };
                    if !tried_import {
                        let _ = sender.send(Message::Started { key, at: now_ms() });
                    }
                    let result = executor.execute(*vertex, inputs, context, logs).await;
                    let recorded = match &result {
                        Ok(executed) => record(durable.as_ref(), key, &executed.output).await,
                        Err(_) => false,
                    };
                    let _ = sender.send(Message::Finished { key, result, at: now_ms(), recorded });
                });
                self.running.insert(key, task);
            }
        }
        Vec::new()
    }
}
