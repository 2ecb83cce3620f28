//! The worker agent's core: execute one build-graph vertex over its inputs' snapshots.
//!
//! - Exec vertices run in a container through the `kiln-runner` child process (libcontainer
//!   never runs in this multi-threaded process) over an overlay of the rootfs chain; the
//!   upper directory becomes the vertex's layer.
//! - File vertices are applied by the worker itself to an overlay of the base chain, with
//!   every path resolved inside its root.
//! - Sources pull images (once per layer: unpacked layers are reused) and materialise
//!   context files; merges stack chains.
//!
//! Invariants: no mount, container or temporary directory outlives the call that created
//! it, on success, failure or cancellation (drop of the future); secrets are only ever in a
//! per-step directory outside every snapshot.

pub mod agent;
mod chmod;
mod exec;
mod executor;
mod export;
mod fileop;
mod gc;
mod mounts;
mod netns;
mod platforms;
mod runners;
mod runtime;
mod source;
mod stores;
mod transfer;
mod user;

pub use executor::LocalExecutor;
pub use gc::{BLOB_GRACE, Collected, GC_INTERVAL, Gc, GcLimits, GcPolicy, free_space};
use kiln_model::{LogLine, LogSink, LogStream};
pub use platforms::runnable_platforms;
pub(crate) use source::select_context;
pub use stores::{StoreError, Stores};
pub use transfer::BlobFetcher;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_context::BuildContext;
use kiln_graph::{Input, Op, Vertex};
use kiln_kv::SharedKv;
use kiln_layer::LayerId;
use kiln_registry::{Credentials, RegistryOptions, ResolvedImage};
use kiln_runner_spec::Limits;
use serde::{Deserialize, Serialize};

/// A vertex result: a chain of layers, bottom first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Snapshot {
    /// The layers.
    pub layers: Vec<LayerId>,
}

/// What executing a vertex produced.
#[derive(Debug, Clone)]
pub struct VertexOutput {
    /// The result filesystem.
    pub snapshot: Snapshot,
    /// For image sources: the resolved image (pinned manifest, config).
    pub image: Option<ResolvedImage>,
}

/// Per-build inputs the graph refers to by name.
#[derive(Default, Clone)]
pub struct BuildInputs {
    /// Local contexts by name (`context` is the main one), and those of nested builds
    /// (`target:` named contexts) and directory contexts by the digest of the source vertices
    /// reading them.
    pub contexts: HashMap<String, Arc<dyn BuildContext>>,
    /// Secrets by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// The records of the caches the build imports (`--cache-from`).
    pub cache: Arc<kiln_cache::Imports>,
    /// The layers the build (or job) uses, kept from garbage collection until it ends.
    pub hold: Option<Arc<kiln_layer::Hold>>,
    /// The build's cache group (`None`: the default group): its cache mounts are the
    /// group's, never another tenant's.
    pub cache_group: Option<String>,
}

impl BuildInputs {
    /// Holds `layers` for the build; a layer that is gone (collected since it was found) is
    /// the error, naming it.
    pub fn hold(&self, layers: &[LayerId]) -> Result<(), String> {
        match &self.hold {
            Some(hold) => hold.add(layers).map_err(|gone| format!("layer {gone} was removed from the store")),
            None => Ok(()),
        }
    }
}

/// How a worker runs steps.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// State directory (blobs, layers, cache mounts; the runner's state goes to the runtime
    /// directory, `runtime.rs`).
    pub root: PathBuf,
    /// The worker's name, in errors.
    pub name: String,
    /// The `kiln-runner` executable.
    pub runner: PathBuf,
    /// cgroup path prefix for step containers.
    pub cgroup_parent: String,
    /// cgroup limits per step.
    pub limits: Limits,
    /// Kill a step after this long.
    pub step_timeout: Option<Duration>,
    /// Registry access.
    pub registry: RegistryOptions,
    /// Garbage collection of the store.
    pub gc: GcPolicy,
    /// What steps may do beyond the sandbox (`worker.entitlements`); a step needing another
    /// fails before it runs.
    pub entitlements: Vec<kiln_model::Entitlement>,
    /// The network of RUN steps without `--network`.
    pub default_network: kiln_model::DefaultNetwork,
    /// Addresses steps in the isolated network must not reach (the coordinator's).
    pub unreachable: Vec<std::net::SocketAddr>,
}

impl WorkerConfig {
    /// Defaults for a worker rooted at `root`, using the runner found next to this program
    /// and the credentials of `~/.docker/config.json` (an unreadable file is an error).
    pub fn new(root: &Path) -> Result<WorkerConfig, kiln_registry::CredentialsError> {
        let credentials = match Credentials::default_path() {
            Some(path) => Credentials::load(&path)?,
            None => Credentials::default(),
        };
        Ok(WorkerConfig {
            root: root.to_path_buf(),
            name: "local".to_string(),
            runner: kiln_runner_spec::locate().unwrap_or_else(|| PathBuf::from("kiln-runner")),
            cgroup_parent: "/kiln".to_string(),
            limits: Limits::default(),
            step_timeout: None,
            registry: RegistryOptions { credentials, ..RegistryOptions::default() },
            gc: GcPolicy::default(),
            entitlements: Vec::new(),
            default_network: kiln_model::DefaultNetwork::default(),
            unreachable: Vec::new(),
        })
    }
}

/// Why a vertex failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A RUN step exited non-zero (or was killed).
    #[error("{vertex}: process {command:?} did not complete successfully: {status}{}", tail_text(.tail))]
    StepFailed {
        /// The vertex's name, with its Dockerfile line.
        vertex: String,
        /// The command as run.
        command: String,
        /// `exit code: N`, `killed by signal N` or `timed out`.
        status: String,
        /// The last output lines.
        tail: Vec<String>,
    },
    /// The disk under the worker's state directory filled while the step ran; the step's
    /// changes were thrown away and the store is as before.
    #[error("{vertex}: worker {worker}: no space left on the disk holding {} ({free} bytes free): {cause}", path.display())]
    DiskFull {
        /// The vertex's name, with its Dockerfile line.
        vertex: String,
        /// The worker's name.
        worker: String,
        /// The worker's state directory.
        path: PathBuf,
        /// Free bytes after the step's changes were removed.
        free: u64,
        /// What failed, as it was reported.
        cause: String,
    },
    /// Anything else: a missing path, a bad user, a registry or store failure.
    #[error("{vertex}: {message}")]
    Failed {
        /// The vertex's name, with its Dockerfile line.
        vertex: String,
        /// What went wrong.
        message: String,
    },
}

/// Free space under which a failed step is taken to have filled the disk.
const FULL_DISK: u64 = 1 << 20;

/// Whether a step failed because a disk filled: it was seen full, or the process's own
/// error output, or Kiln's writing of its layer, says ENOSPC ("No space left on device";
/// `EDQUOT` says "Disk quota exceeded").
fn says_out_of_space(error: &WorkerError) -> bool {
    const SIGNS: [&str; 2] = ["No space left on device", "Disk quota exceeded"];
    let text = match error {
        WorkerError::StepFailed { tail, .. } => tail.join("\n"),
        WorkerError::Failed { message, .. } => message.clone(),
        WorkerError::DiskFull { .. } => return true,
    };
    SIGNS.iter().any(|sign| text.contains(sign))
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() { String::new() } else { format!("\n{}", tail.join("\n")) }
}

/// A worker: the node's [`Stores`] (which it dereferences to) and what executing steps
/// needs besides them (the runner, cache mounts).
pub struct Worker {
    config: WorkerConfig,
    stores: Arc<Stores>,
    cache_mounts: mounts::CacheMounts,
    gc: Arc<Gc>,
    /// The namespaces of steps in the isolated network.
    networks: Option<Arc<netns::NetPool>>,
    /// Runners started ahead of the steps.
    runners: Arc<runners::RunnerPool>,
    /// What lives only as long as a step: the runner's state (`runner`) and the step
    /// directories (`steps`), locked while the worker lives; see [`runtime::open`].
    runtime: runtime::Runtime,
}

impl std::ops::Deref for Worker {
    type Target = Stores;

    fn deref(&self) -> &Stores {
        &self.stores
    }
}

impl Worker {
    /// Opens the worker's stores under `config.root` (clearing what a crash left) with
    /// metadata in `kv`, ready to execute steps with `config.runner`.
    pub fn open(config: WorkerConfig, kv: SharedKv) -> Result<Worker, WorkerError> {
        let failed = |message: String| WorkerError::Failed { vertex: "worker".into(), message };
        let stores = Arc::new(Stores::open(&config.root, config.registry.clone(), kv.clone())?);
        let runtime = runtime::open(&config.root).map_err(failed)?;
        let steps = runtime.dir.join("steps");
        let _ = std::fs::remove_dir_all(&steps);
        std::fs::create_dir_all(&steps).map_err(|e| failed(format!("{}: {e}", steps.display())))?;
        // Containers a crash left, and those of a version that kept them in the state
        // directory.
        for state_root in [runtime.dir.join("runner"), config.root.join("runner")] {
            let cleanup =
                std::process::Command::new(&config.runner).args(["cleanup", "--state-root"]).arg(&state_root).status();
            if !cleanup.map(|s| s.success()).unwrap_or(false) {
                return Err(failed(format!("cannot run {} to clean up old containers", config.runner.display())));
            }
        }
        let _ = std::fs::remove_dir_all(config.root.join("steps"));
        let cache_mounts = mounts::CacheMounts::new(config.root.join("cache"), kv);
        mounts::clear_trash(cache_mounts.root()).map_err(failed)?;
        let gc = Gc::new(
            Arc::clone(&stores),
            Arc::clone(cache_mounts.uses()),
            cache_mounts.root().to_path_buf(),
            config.root.clone(),
            &config.gc,
        );
        let networks = (config.default_network == kiln_model::DefaultNetwork::Isolated)
            .then(|| Arc::new(netns::NetPool::new(config.unreachable.clone())));
        let runners = runners::RunnerPool::new(config.runner.clone(), steps);
        Ok(Worker { config, stores, cache_mounts, gc: Arc::new(gc), networks, runners, runtime })
    }

    /// Where the runner's state and the step directories are (`runtime.rs`).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime.dir
    }

    /// The worker's garbage collector.
    pub fn gc(&self) -> &Arc<Gc> {
        &self.gc
    }

    /// The stores this worker executes over (shared with whoever exports from them).
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// Executes `vertex` given the outputs of its inputs, in order; a RUN step's output
    /// lines go to `logs` when given.
    pub async fn execute(
        &self,
        vertex: &Vertex,
        inputs: &[Snapshot],
        build: &BuildInputs,
        logs: Option<&LogSink>,
    ) -> Result<VertexOutput, WorkerError> {
        let name = vertex_name(vertex);
        let fail = |message: String| WorkerError::Failed { vertex: name.clone(), message };
        if inputs.len() != vertex.inputs.len() {
            return Err(fail(format!("expected {} inputs, got {}", vertex.inputs.len(), inputs.len())));
        }
        let plain = |snapshot: Snapshot| VertexOutput { snapshot, image: None };
        // The coordinator places such steps only on workers that grant what they need; this
        // worker checks again, whoever asked.
        if let Some(missing) =
            kiln_model::Entitlement::needed_by(&vertex.op).into_iter().find(|e| !self.config.entitlements.contains(e))
        {
            return Err(fail(format!(
                "{} needs the entitlement {missing}, which worker {} does not grant (worker.entitlements)",
                missing.flag(),
                self.config.name
            )));
        }
        if matches!(vertex.op, Op::Exec(_) | Op::File(_)) && self.gc.disk_low() {
            // Below `min-free-space`: make room before the step writes.
            if let Err(error) = self.gc.collect().await {
                tracing::warn!("garbage collection before {name}: {error}");
            }
        }
        let result = match &vertex.op {
            Op::Source(source) => self.source(source, build).await.map_err(fail),
            Op::Exec(exec) => self.exec(exec, inputs, build, logs, &name).await.map(plain),
            Op::File(file) => self.file(file, inputs).await.map(plain).map_err(fail),
            Op::Merge(_) => {
                Ok(plain(Snapshot { layers: inputs.iter().flat_map(|s| s.layers.iter().cloned()).collect() }))
            }
        };
        let error = match result {
            Err(error) if says_out_of_space(&error) => self.out_of_space(error),
            other => return other,
        };
        // The step's mounts are gone by now, and what it wrote with them: collect garbage so
        // that the next step has room.
        if let Err(gc_error) = self.gc.collect().await {
            tracing::warn!("garbage collection after a full disk: {gc_error}");
        }
        Err(error)
    }

    /// `failed` as [`WorkerError::DiskFull`] when the disk under the state directory is
    /// (nearly) full now.
    fn out_of_space_if_full(&self, failed: WorkerError) -> WorkerError {
        if free_space(&self.config.root) < FULL_DISK { self.out_of_space(failed) } else { failed }
    }

    /// `failed` as [`WorkerError::DiskFull`] (unchanged if it is one), naming the worker and
    /// the state directory.
    fn out_of_space(&self, failed: WorkerError) -> WorkerError {
        let vertex = match &failed {
            WorkerError::DiskFull { .. } => return failed,
            WorkerError::StepFailed { vertex, .. } | WorkerError::Failed { vertex, .. } => vertex.clone(),
        };
        WorkerError::DiskFull {
            vertex: vertex.clone(),
            worker: self.config.name.clone(),
            path: self.config.root.clone(),
            free: free_space(&self.config.root),
            cause: failed.to_string().trim_start_matches(&format!("{vertex}: ")).to_string(),
        }
    }

    /// A container id unique on this machine: the process id and a process-wide counter
    /// (several workers may share a process, as in tests).
    fn step_id(&self) -> String {
        static NEXT_STEP: AtomicU64 = AtomicU64::new(0);
        format!("k{}-{}", std::process::id(), NEXT_STEP.fetch_add(1, Ordering::Relaxed))
    }
}

/// The chain an op input refers to; a missing input is a message the vertex wraps.
fn chain<'a>(input: &Input, inputs: &'a [Snapshot]) -> Result<&'a [LayerId], String> {
    match input {
        Input::Scratch => Ok(&[]),
        Input::Index(i) => inputs.get(*i).map(|s| s.layers.as_slice()).ok_or_else(|| format!("input {i} is missing")),
    }
}

/// `NAME (line N)` for messages, so failures point at the Dockerfile.
fn vertex_name(vertex: &Vertex) -> String {
    match vertex.meta.lines {
        Some((start, end)) if start == end => format!("{} (line {start})", vertex.meta.name),
        Some((start, end)) => format!("{} (lines {start}-{end})", vertex.meta.name),
        None => vertex.meta.name.clone(),
    }
}

/// Runs blocking cleanup from a `Drop` that may happen on an async thread (a cancelled
/// step): the runtime is told the thread blocks, so its other tasks move on, while the
/// cleanup still finishes before the drop returns (later drops, such as the overlay unmount,
/// rely on it).
fn blocking_in_drop(cleanup: impl FnOnce()) {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread { tokio::task::block_in_place(cleanup) } else { cleanup() }
}

/// A mounted snapshot held across awaits: if it is dropped there (a failed or cancelled
/// step), the unmount runs as blocking work, not on the async thread as a plain drop would.
struct Mounted(Option<kiln_layer::ActiveSnapshot>);

impl Mounted {
    fn new(active: kiln_layer::ActiveSnapshot) -> Mounted {
        Mounted(Some(active))
    }

    fn root(&self) -> PathBuf {
        self.0.as_ref().expect("mounted until taken").root()
    }

    /// The snapshot, to commit it (off the async threads).
    fn into_inner(mut self) -> kiln_layer::ActiveSnapshot {
        self.0.take().expect("mounted until taken")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(active) = self.0.take() {
            blocking_in_drop(move || drop(active));
        }
    }
}

/// Runs blocking filesystem work off the async threads, for the step internals whose errors
/// are messages (each module says how they reach a typed error).
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work).await.map_err(|e| format!("worker task failed: {e}"))?
}
