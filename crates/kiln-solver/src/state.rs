//! The scheduling state and its one deterministic transition function.
//!
//! Everything that decides what runs — builds, vertex states, the in-flight table keyed by
//! cache key, the cache index — lives in [`SolverState`] and changes only in
//! [`SolverState::apply`]. Commands carry every outside fact (results, times), so replaying
//! the same commands gives the same state and the same effects.

use std::collections::{BTreeMap, HashMap, VecDeque};

use kiln_graph::{Graph, Op, SourceOp, Vertex, vertex_digest};
use kiln_types::{Digest, Sha256Writer};

use kiln_model::{BuildEvent, Executed, Failed, Status, VertexRecord};

use crate::Event;

/// A build's id, unique within one solver.
pub type BuildId = u64;

/// Per-build settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Execute every cacheable vertex even when the cache has it (`--no-cache`).
    pub no_cache: bool,
    /// At most this many of the build's own executions at once (`--max-parallelism`).
    pub max_parallelism: Option<usize>,
    /// The cache group: builds of different groups neither share cache entries nor wait on
    /// each other's jobs (`None`: the default group, whose keys are unscoped).
    pub cache_group: Option<String>,
    /// The build's id, which the records of builds that wait on its jobs name
    /// ([`VertexRecord::deduplicated_from`](kiln_model::VertexRecord)).
    pub name: Option<String>,
}

/// An input to [`SolverState::apply`].
#[derive(Debug, Clone)]
pub enum Command<O> {
    /// A new build of `graph`.
    Submit {
        /// Its id.
        build: BuildId,
        /// The graph (topological, pruned to what the outputs need).
        graph: Graph,
        /// Its options.
        options: BuildOptions,
        /// The time.
        at: u64,
    },
    /// An execution began on `worker`.
    Started {
        /// The job's cache key.
        key: Digest,
        /// The worker.
        worker: String,
        /// The time.
        at: u64,
    },
    /// An execution ended.
    Finished {
        /// The job's cache key.
        key: Digest,
        /// The result or the error message.
        result: Result<Executed<O>, Failed>,
        /// The time.
        at: u64,
    },
    /// The build's client gave up.
    Cancel {
        /// The build.
        build: BuildId,
    },
    /// The answer to [`Effect::CheckCached`]: whether the cached output still exists
    /// somewhere the executor can use it.
    CacheChecked {
        /// The build.
        build: BuildId,
        /// The vertex (index in the build's graph).
        index: usize,
        /// The cache key.
        key: Digest,
        /// Where the output can still be used from (`None`: it is gone).
        source: Option<String>,
        /// The time.
        at: u64,
    },
    /// A cache entry known from earlier runs (or from a replicated coordinator's leader).
    Restore {
        /// The cache key.
        key: Digest,
        /// The result.
        output: O,
    },
    /// A cache entry a replicated coordinator's leader forgot.
    Forget {
        /// The cache key.
        key: Digest,
    },
    /// Every cache entry is forgotten (a replicated coordinator's snapshot replaces them).
    ForgetAll,
}

/// What the driver must do after a command.
#[derive(Debug, Clone)]
pub enum Effect<O> {
    /// Execute a job.
    Run {
        /// The job's cache key.
        key: Digest,
        /// The vertex.
        vertex: Box<Vertex>,
        /// Its inputs' outputs, in order.
        inputs: Vec<O>,
        /// The build whose inputs (contexts, secrets) the execution uses.
        build: BuildId,
        /// The result may come from a cache the build imports (it is cacheable and the
        /// build is not `--no-cache`).
        import: bool,
        /// Its result goes into the cache index.
        cacheable: bool,
    },
    /// Stop a job nobody waits for any more; its result must not be recorded.
    Abort {
        /// The job's cache key.
        key: Digest,
    },
    /// Send a progress event to a build.
    Emit {
        /// The build.
        build: BuildId,
        /// The event.
        event: Event<O>,
    },
    /// Replay a running job's output so far to a build that just started waiting on it.
    Replay {
        /// The job's cache key.
        key: Digest,
        /// The build.
        build: BuildId,
        /// The vertex as that build knows it.
        vertex: Digest,
    },
    /// Persist a cache entry.
    Store {
        /// The cache key.
        key: Digest,
        /// The result.
        output: O,
    },
    /// Ask the executor whether a cached output still exists (its layers may have gone with
    /// their worker) and answer with [`Command::CacheChecked`] before anything else.
    CheckCached {
        /// The build.
        build: BuildId,
        /// The vertex.
        index: usize,
        /// The cache key.
        key: Digest,
        /// The cached output.
        output: O,
    },
    /// Delete a persisted cache entry whose output is gone.
    Forget {
        /// The cache key.
        key: Digest,
    },
}

enum VertexState<O> {
    /// Waiting for this many inputs.
    Blocked(usize),
    /// Waiting for a job.
    Waiting,
    /// Done; `key` is the key its users compute theirs from.
    Done { output: O, key: Digest },
    /// Failed or abandoned.
    Failed,
}

struct Build<O> {
    vertices: Vec<Vertex>,
    index: HashMap<Digest, usize>,
    users: Vec<Vec<usize>>,
    states: Vec<VertexState<O>>,
    records: Vec<VertexRecord>,
    outputs: Vec<Option<usize>>,
    options: BuildOptions,
    /// Jobs this build owns that are executing.
    running: usize,
    /// Jobs this build owns that wait for one of its parallelism slots.
    queue: VecDeque<Digest>,
}

struct Job<O> {
    vertex: Vertex,
    /// May be imported from the owner's caches.
    import: bool,
    inputs: Vec<O>,
    owner: BuildId,
    waiters: Vec<(BuildId, usize)>,
    started: Option<(u64, String)>,
    cacheable: bool,
}

/// The solver's whole state.
pub struct SolverState<O> {
    builds: BTreeMap<BuildId, Build<O>>,
    jobs: BTreeMap<Digest, Job<O>>,
    cache: HashMap<Digest, O>,
}

impl<O> Default for SolverState<O> {
    fn default() -> Self {
        SolverState { builds: BTreeMap::new(), jobs: BTreeMap::new(), cache: HashMap::new() }
    }
}

/// The key of a vertex from its inputs' keys, and whether a result may be served from the
/// cache. Sources that resolve something remote run every build.
pub fn cache_key(vertex: &Vertex, input_keys: &[Digest]) -> (Digest, bool) {
    match &vertex.op {
        Op::Source(SourceOp::Local { .. }) | Op::Source(SourceOp::Http { checksum: Some(_), .. }) => {
            (vertex.digest, true)
        }
        Op::Source(_) => (vertex.digest, false),
        // Inputs keyed by their own digests (nothing pinned above): the key is the digest the
        // graph already computed, with no re-encoding and hashing of the op.
        _ if input_keys == vertex.inputs.as_slice() => (vertex.digest, true),
        op => (vertex_digest(op, input_keys), true),
    }
}

/// The key of a vertex in a cache group: distinct from every other group's, so a result
/// computed for one group is never served to (or joined by) another.
fn scoped_key(key: &Digest, scope: &str) -> Digest {
    let mut hasher = Sha256Writer::new();
    hasher.field(b"kiln.scope");
    hasher.field(scope.as_bytes());
    hasher.field(key.as_bytes());
    hasher.finish()
}

/// The key users of a source see once it resolved to `pin`.
fn pinned_key(key: &Digest, pin: &Digest) -> Digest {
    let mut hasher = Sha256Writer::new();
    hasher.field(b"kiln.pinned");
    hasher.field(key.as_bytes());
    hasher.field(pin.as_bytes());
    hasher.finish()
}

impl<O: Clone> SolverState<O> {
    /// Builds in progress.
    pub fn build_count(&self) -> usize {
        self.builds.len()
    }

    /// Jobs queued or executing.
    pub fn job_count(&self) -> usize {
        self.jobs.len()
    }

    /// The builds waiting on a job, with the vertex each knows it as.
    pub fn waiters(&self, key: &Digest) -> Vec<(BuildId, Digest)> {
        let Some(job) = self.jobs.get(key) else { return Vec::new() };
        job.waiters
            .iter()
            .filter_map(|(b, i)| self.builds.get(b).map(|build| (*b, build.vertices[*i].digest)))
            .collect()
    }

    /// Applies one command and returns what must happen because of it.
    pub fn apply(&mut self, command: Command<O>) -> Vec<Effect<O>> {
        let mut effects = Vec::new();
        match command {
            Command::Submit { build, graph, options, at: _ } => self.submit(build, graph, options, &mut effects),
            Command::Started { key, worker, at } => self.started(key, worker, at, &mut effects),
            Command::Finished { key, result, at } => self.finished(key, result, at, &mut effects),
            Command::Cancel { build } => self.fail_build(build, "the build was cancelled".into(), &mut effects),
            Command::CacheChecked { build, index, key, source, at } => {
                self.cache_checked(build, index, key, source, at, &mut effects);
            }
            Command::Restore { key, output } => {
                self.cache.insert(key, output);
            }
            Command::Forget { key } => {
                self.cache.remove(&key);
            }
            Command::ForgetAll => self.cache.clear(),
        }
        effects
    }

    fn submit(&mut self, id: BuildId, graph: Graph, options: BuildOptions, effects: &mut Vec<Effect<O>>) {
        let index: HashMap<Digest, usize> = graph.vertices.iter().enumerate().map(|(i, v)| (v.digest, i)).collect();
        let mut users = vec![Vec::new(); graph.vertices.len()];
        let mut states = Vec::with_capacity(graph.vertices.len());
        for (i, vertex) in graph.vertices.iter().enumerate() {
            for input in &vertex.inputs {
                users[index[input]].push(i);
            }
            states.push(VertexState::Blocked(vertex.inputs.len()));
        }
        let records = graph.vertices.iter().map(VertexRecord::planned).collect();
        let outputs = graph.outputs.iter().map(|o| o.digest.map(|d| index[&d])).collect();
        let build = Build {
            vertices: graph.vertices,
            index,
            users,
            states,
            records,
            outputs,
            options,
            running: 0,
            queue: VecDeque::new(),
        };
        let roots: Vec<usize> = (0..build.vertices.len()).filter(|i| build.vertices[*i].inputs.is_empty()).collect();
        self.builds.insert(id, build);
        for root in roots {
            self.ready(id, root, effects);
        }
        self.finish_if_done(id, effects);
    }

    /// All inputs of the vertex are done: serve it from the cache, join a job, or start one.
    fn ready(&mut self, id: BuildId, index: usize, effects: &mut Vec<Effect<O>>) {
        let Some(build) = self.builds.get_mut(&id) else { return };
        let vertex = &build.vertices[index];
        let mut input_keys = Vec::with_capacity(vertex.inputs.len());
        let mut inputs = Vec::with_capacity(vertex.inputs.len());
        for input in &vertex.inputs {
            match &build.states[build.index[input]] {
                VertexState::Done { output, key } => {
                    input_keys.push(*key);
                    inputs.push(output.clone());
                }
                _ => unreachable!("ready only after every input is done"),
            }
        }
        let (key, cacheable) = cache_key(vertex, &input_keys);
        let key = match &build.options.cache_group {
            Some(group) => scoped_key(&key, group),
            None => key,
        };
        if cacheable
            && !build.options.no_cache
            && let Some(output) = self.cache.get(&key).cloned()
        {
            build.states[index] = VertexState::Waiting;
            effects.push(Effect::CheckCached { build: id, index, key, output });
            return;
        }
        build.states[index] = VertexState::Waiting;
        let vertex_digest = vertex.digest;
        if let Some(job) = self.jobs.get_mut(&key) {
            job.waiters.push((id, index));
            if let Some((started, _)) = &job.started {
                build.records[index].started = Some(*started);
                effects.push(Effect::Emit {
                    build: id,
                    event: Event::Progress(BuildEvent::Started { vertex: vertex_digest, at: *started }),
                });
                effects.push(Effect::Replay { key, build: id, vertex: vertex_digest });
            }
            return;
        }
        let import = cacheable && !build.options.no_cache;
        let job = Job {
            vertex: vertex.clone(),
            import,
            inputs,
            owner: id,
            waiters: vec![(id, index)],
            started: None,
            cacheable,
        };
        self.jobs.insert(key, job);
        build.queue.push_back(key);
        self.start_queued(id, effects);
    }

    /// A cache hit was checked: serve it, or forget the entry and run the vertex.
    fn cache_checked(
        &mut self,
        id: BuildId,
        index: usize,
        key: Digest,
        source: Option<String>,
        at: u64,
        effects: &mut Vec<Effect<O>>,
    ) {
        let Some(build) = self.builds.get_mut(&id) else { return };
        if !matches!(build.states.get(index), Some(VertexState::Waiting)) {
            return;
        }
        match self.cache.get(&key).cloned().filter(|_| source.is_some()) {
            Some(output) => {
                build.records[index].started = Some(at);
                build.records[index].cache_source = source;
                self.complete(id, index, output, key, Status::Cached, at, effects);
            }
            None => {
                // A result whose layers exist nowhere any more is a miss, never a failure.
                if self.cache.remove(&key).is_some() {
                    effects.push(Effect::Forget { key });
                }
                self.ready(id, index, effects);
            }
        }
    }

    fn start_queued(&mut self, id: BuildId, effects: &mut Vec<Effect<O>>) {
        let Some(build) = self.builds.get_mut(&id) else { return };
        let limit = build.options.max_parallelism.unwrap_or(usize::MAX).max(1);
        while build.running < limit {
            let Some(key) = build.queue.pop_front() else { break };
            let Some(job) = self.jobs.get(&key) else { continue };
            build.running += 1;
            effects.push(Effect::Run {
                key,
                vertex: Box::new(job.vertex.clone()),
                inputs: job.inputs.clone(),
                build: id,
                import: job.import,
                cacheable: job.cacheable,
            });
        }
    }

    fn started(&mut self, key: Digest, worker: String, at: u64, effects: &mut Vec<Effect<O>>) {
        let Some(job) = self.jobs.get_mut(&key) else { return };
        job.started = Some((at, worker));
        for (id, index) in &job.waiters {
            if let Some(build) = self.builds.get_mut(id) {
                build.records[*index].started = Some(at);
                let vertex = build.vertices[*index].digest;
                effects.push(Effect::Emit { build: *id, event: Event::Progress(BuildEvent::Started { vertex, at }) });
            }
        }
    }

    fn finished(&mut self, key: Digest, result: Result<Executed<O>, Failed>, at: u64, effects: &mut Vec<Effect<O>>) {
        let Some(job) = self.jobs.remove(&key) else { return }; // aborted: nothing to record
        if let Some(owner) = self.builds.get_mut(&job.owner) {
            owner.running = owner.running.saturating_sub(1);
        }
        let mut worker = job.started.as_ref().map(|(_, w)| w.clone());
        match result {
            Ok(executed) => {
                if executed.worker.is_some() {
                    worker.clone_from(&executed.worker);
                }
                if job.cacheable {
                    self.cache.insert(key, executed.output.clone());
                    effects.push(Effect::Store { key, output: executed.output.clone() });
                }
                let user_key = executed.pin.map_or(key, |pin| pinned_key(&key, &pin));
                // A source that resolved to what an earlier build already had counts as cached
                // (an image already pulled and unpacked), as BuildKit reports it.
                let already_had = executed.pin.is_some() && self.cache.contains_key(&user_key);
                if executed.pin.is_some() && !already_had {
                    self.cache.insert(user_key, executed.output.clone());
                    effects.push(Effect::Store { key: user_key, output: executed.output.clone() });
                }
                // Imported from a cache, or (a source) resolved to what this node already had.
                let source = executed.cache_source.clone().or_else(|| already_had.then(|| "local".to_string()));
                let owner = self.builds.get(&job.owner).and_then(|b| b.options.name.clone());
                for (id, index) in job.waiters {
                    let status = match (id == job.owner, source.is_some()) {
                        (true, true) => Status::Cached,
                        (true, false) => Status::Executed,
                        (false, _) => Status::Deduplicated,
                    };
                    if let Some(build) = self.builds.get_mut(&id) {
                        build.records[index].worker = worker.clone();
                        if status == Status::Cached {
                            build.records[index].cache_source.clone_from(&source);
                        }
                        // The build whose job ran (a source that resolved to what was there
                        // already ran too): where its time went.
                        if id == job.owner {
                            build.records[index].phases = executed.phases;
                        } else {
                            build.records[index].deduplicated_from.clone_from(&owner);
                        }
                    }
                    self.complete(id, index, executed.output.clone(), user_key, status, at, effects);
                }
            }
            Err(failed) => {
                let error = failed.to_string();
                let failed_on = failed.worker;
                if failed_on.is_some() {
                    worker = failed_on;
                }
                for (id, index) in job.waiters {
                    let Some(build) = self.builds.get_mut(&id) else { continue };
                    build.states[index] = VertexState::Failed;
                    let record = &mut build.records[index];
                    record.status = Status::Failed;
                    record.worker = worker.clone();
                    record.completed = Some(at);
                    let record = record.clone();
                    let event =
                        Event::Progress(BuildEvent::Completed { record: Box::new(record), error: Some(error.clone()) });
                    effects.push(Effect::Emit { build: id, event });
                    self.fail_build(id, error.clone(), effects);
                }
            }
        }
        self.start_queued(job.owner, effects);
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        id: BuildId,
        index: usize,
        output: O,
        key: Digest,
        status: Status,
        at: u64,
        effects: &mut Vec<Effect<O>>,
    ) {
        let Some(build) = self.builds.get_mut(&id) else { return };
        build.states[index] = VertexState::Done { output: output.clone(), key };
        let record = &mut build.records[index];
        record.status = status;
        record.completed = Some(at);
        let completed = BuildEvent::Completed { record: Box::new(record.clone()), error: None };
        effects.push(Effect::Emit { build: id, event: Event::Output { vertex: record.digest, key, output } });
        effects.push(Effect::Emit { build: id, event: Event::Progress(completed) });
        let mut now_ready = Vec::new();
        for user in build.users[index].clone() {
            if let VertexState::Blocked(left) = &mut build.states[user] {
                *left -= 1;
                if *left == 0 {
                    now_ready.push(user);
                }
            }
        }
        for user in now_ready {
            self.ready(id, user, effects);
        }
        self.finish_if_done(id, effects);
    }

    fn finish_if_done(&mut self, id: BuildId, effects: &mut Vec<Effect<O>>) {
        let Some(build) = self.builds.get(&id) else { return };
        let done = |i: &usize| matches!(build.states[*i], VertexState::Done { .. });
        if !build.outputs.iter().flatten().all(done) {
            return;
        }
        let build = self.builds.remove(&id).expect("present");
        let outputs = build
            .outputs
            .iter()
            .map(|o| {
                o.map(|i| match &build.states[i] {
                    VertexState::Done { output, .. } => output.clone(),
                    _ => unreachable!("checked above"),
                })
            })
            .collect();
        effects.push(Effect::Emit { build: id, event: Event::Finished(Ok(outputs), build.records) });
    }

    /// Ends a build with an error: it stops waiting on every job; jobs nobody else waits for
    /// are aborted, the others pass to a remaining waiter.
    fn fail_build(&mut self, id: BuildId, error: String, effects: &mut Vec<Effect<O>>) {
        let Some(build) = self.builds.remove(&id) else { return };
        let mut new_owners = Vec::new();
        let keys: Vec<Digest> = self.jobs.keys().copied().collect();
        for key in keys {
            let job = self.jobs.get_mut(&key).expect("listed");
            job.waiters.retain(|(b, _)| *b != id);
            if job.waiters.is_empty() {
                let job = self.jobs.remove(&key).expect("listed");
                if job.owner == id && !build.queue.contains(&key) {
                    effects.push(Effect::Abort { key });
                }
            } else if job.owner == id {
                let heir = job.waiters[0].0;
                job.owner = heir;
                new_owners.push((heir, key, !build.queue.contains(&key)));
            }
        }
        for (heir, key, running) in new_owners {
            if let Some(heir_build) = self.builds.get_mut(&heir) {
                if running {
                    heir_build.running += 1;
                } else {
                    heir_build.queue.push_back(key);
                }
            }
            self.start_queued(heir, effects);
        }
        effects.push(Effect::Emit { build: id, event: Event::Finished(Err(error), build.records) });
    }
}

#[cfg(test)]
mod tests;
