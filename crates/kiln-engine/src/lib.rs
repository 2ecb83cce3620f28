//! The build engine: what `kilnd` runs for each build request.
//!
//! Dockerfile text and a context directory go in; the front end converts them (twice: once
//! to learn which base images the build uses, once more with their configs, so `ENV`, `USER`
//! and `WORKDIR` of a base image reach the graph); the solver runs the graph on the worker;
//! the result is exported (an image in the store, pushed, tarballs, plain files).

mod build;
mod cache;
mod error;
mod export;
mod history;
mod uploads;

pub use build::{BuildFailure, BuildSummary, ClusterData, SpooledFile};
pub use error::BuildError;
pub use kiln_model::{BuildRequest, OutputSpec};
pub use kiln_solver::Parallelism;

use std::path::PathBuf;
use std::sync::Arc;

use kiln_cluster::{Cluster, ClusterExecutor, ClusterSettings};
use kiln_kv::{SharedKv, SledKv};
use kiln_solver::{Solver, SolverConfig};
use kiln_worker::{BlobFetcher, Gc, LocalExecutor, Stores, Worker, WorkerConfig};

/// How an engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The worker's settings (its root holds blobs, layers, caches and the solver's index).
    pub worker: WorkerConfig,
    /// Executions at once on this worker.
    pub parallelism: Parallelism,
    /// The worker's name in records.
    pub name: String,
    /// Platforms it executes RUN steps for (default: [`kiln_worker::runnable_platforms`]).
    pub platforms: Vec<kiln_types::Platform>,
}

/// The stores of this daemon and the solver that schedules builds: on its own worker
/// (standalone), or on a cluster of remote workers (a coordinator, whose own stores then
/// only hold uploaded contexts and what it exports).
pub struct Engine {
    /// Where contexts arrive, results are brought in and exports are made from.
    stores: Arc<Stores>,
    /// The metadata store (the solver's cache index lives in it).
    kv: SharedKv,
    mode: Mode,
    name: String,
    platforms: Vec<kiln_types::Platform>,
    /// What this daemon's own worker grants (standalone); a coordinator asks its workers.
    entitlements: Vec<kiln_model::Entitlement>,
    next_build: std::sync::atomic::AtomicU64,
    /// A coordinator's shared cache tier: every build imports from it and exports to it.
    shared_cache: Option<kiln_model::CacheSpec>,
    /// The worker's garbage collector (standalone).
    gc: Option<Arc<Gc>>,
}

enum Mode {
    Local(Solver<LocalExecutor>),
    Cluster {
        solver: Solver<ClusterExecutor<ClusterData>>,
        cluster: Arc<Cluster<ClusterData>>,
        fetcher: Arc<dyn BlobFetcher>,
    },
}

/// The execution slots of a coordinator's solver: placement bounds the work per worker.
const CLUSTER_SLOTS: usize = 1 << 20;

/// Why an engine could not start, naming its state directory.
#[derive(Debug, thiserror::Error)]
#[error("starting the engine in {}: {source}", root.display())]
pub struct EngineError {
    root: PathBuf,
    #[source]
    source: StartError,
}

/// What failed while an engine started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its state directory could not be created.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Its metadata store could not be opened or read.
    #[error(transparent)]
    Kv(#[from] kiln_kv::KvError),
    /// Its worker or stores could not be opened.
    #[error(transparent)]
    Worker(Box<kiln_worker::WorkerError>),
}

impl From<kiln_worker::WorkerError> for StartError {
    fn from(error: kiln_worker::WorkerError) -> StartError {
        StartError::Worker(Box::new(error))
    }
}

impl Engine {
    /// Opens the worker's stores (one sled database under the root) and starts the solver.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let root = config.worker.root.clone();
        let fail = |source: StartError| EngineError { root: root.clone(), source };
        std::fs::create_dir_all(&root).map_err(|e| fail(e.into()))?;
        let kv: SharedKv = Arc::new(SledKv::open(&root.join("db")).map_err(|e| fail(e.into()))?);
        Engine::with_kv(config, kv).map_err(fail)
    }

    /// Like [`Engine::start`] with a given metadata store.
    pub fn with_kv(config: EngineConfig, kv: SharedKv) -> Result<Engine, StartError> {
        let entitlements = config.worker.entitlements.clone();
        let worker = WorkerConfig { name: config.name.clone(), ..config.worker };
        let worker = Arc::new(Worker::open(worker, Arc::clone(&kv))?);
        let stores = Arc::clone(worker.stores());
        let gc = Some(Arc::clone(worker.gc()));
        let executor = Arc::new(LocalExecutor::new(worker, &config.name));
        let solver = Solver::start(
            executor,
            SolverConfig { parallelism: config.parallelism, ..SolverConfig::default() },
            Some(Arc::clone(&kv)),
        )?;
        let platforms = if config.platforms.is_empty() { kiln_worker::runnable_platforms() } else { config.platforms };
        Ok(Engine {
            stores,
            kv,
            mode: Mode::Local(solver),
            name: config.name,
            platforms,
            entitlements,
            next_build: 1.into(),
            shared_cache: None,
            gc,
        })
    }

    /// Opens the metadata store of a daemon rooted at `root` (`ROOT/db`), which a coordinator
    /// shares with its replicated log.
    pub fn open_store(root: &std::path::Path) -> Result<SharedKv, EngineError> {
        let fail = |source: StartError| EngineError { root: root.to_path_buf(), source };
        std::fs::create_dir_all(root).map_err(|e| fail(e.into()))?;
        Ok(Arc::new(SledKv::open(&root.join("db")).map_err(|e| fail(e.into()))?))
    }

    /// A coordinator over `kv` (from [`Engine::open_store`]): builds run on the cluster's
    /// workers, which connect to it; `fetcher` brings result layers from them for export.
    /// With a `shared_cache`, every build imports from it and exports to it. The cache
    /// index is kept through `cache_index`: `kv` itself, or a replicated coordinator's
    /// store whose writes go through the log, with `durable` committing each finished
    /// step's entry before the step counts as done.
    pub fn start_coordinator(
        config: EngineConfig,
        settings: ClusterSettings,
        fetcher: Arc<dyn BlobFetcher>,
        shared_cache: Option<kiln_model::CacheSpec>,
        kv: SharedKv,
        (cache_index, durable): (SharedKv, Option<kiln_solver::Durable>),
    ) -> Result<Engine, EngineError> {
        let root = config.worker.root.clone();
        let fail = |source: StartError| EngineError { root: root.clone(), source };
        // A coordinator executes nothing itself: its stores and registry client, no runner.
        let stores = Stores::open(&config.worker.root, config.worker.registry.clone(), Arc::clone(&kv))
            .map_err(|e| fail(e.into()))?;
        let stores = Arc::new(stores);
        let gc = Gc::for_stores(Arc::clone(&stores), Arc::clone(&kv), &config.worker.root, &config.worker.gc);
        let cluster = Cluster::new(settings);
        cluster.start_ticker(std::time::Duration::from_millis(200));
        let executor = Arc::new(ClusterExecutor(Arc::clone(&cluster)));
        let solver = Solver::start(
            executor,
            SolverConfig { parallelism: Parallelism::Fixed(CLUSTER_SLOTS), durable },
            Some(cache_index),
        )
        .map_err(|e| fail(e.into()))?;
        Ok(Engine {
            stores,
            kv,
            mode: Mode::Cluster { solver, cluster, fetcher },
            name: config.name,
            platforms: config.platforms,
            entitlements: Vec::new(),
            next_build: 1.into(),
            shared_cache,
            gc: Some(Arc::new(gc)),
        })
    }

    /// Learns a cache index entry a replicated coordinator's leader stored (`Some`) or
    /// forgot (`None`), as the bytes of the solver's cache tree ([`kiln_solver::CACHE_TREE`]).
    pub fn learn_cache_entry(&self, key: &[u8], value: Option<&[u8]>) {
        if let Mode::Cluster { solver, .. } = &self.mode {
            solver.learn(key, value);
        }
    }

    /// Replaces the cache index by `entries` (a replicated coordinator's snapshot).
    pub fn relearn_cache(&self, entries: Vec<(Vec<u8>, Vec<u8>)>) {
        if let Mode::Cluster { solver, .. } = &self.mode {
            solver.relearn(entries);
        }
    }

    /// A standalone daemon's executions waiting for a slot and holding one (`None` on a
    /// coordinator: its cluster knows its queues).
    pub fn local_load(&self) -> Option<(usize, usize)> {
        match &self.mode {
            Mode::Local(solver) => Some(solver.load()),
            Mode::Cluster { .. } => None,
        }
    }

    /// A standalone daemon's executions at once (`None` on a coordinator).
    pub fn local_slots(&self) -> Option<usize> {
        match &self.mode {
            Mode::Local(solver) => Some(solver.slots()),
            Mode::Cluster { .. } => None,
        }
    }

    /// A standalone daemon's own worker, as a coordinator's are listed (`None` on a
    /// coordinator). It holds no coordinator's lease: its heartbeat is now.
    pub fn local_worker(&self) -> Option<kiln_model::WorkerStatus> {
        let (_, running) = self.local_load()?;
        let slots = self.local_slots()?;
        let gc = self.gc.as_ref();
        let info = kiln_model::WorkerInfo {
            name: self.name.clone(),
            platforms: self.platforms.clone(),
            labels: Default::default(),
            max_parallelism: slots,
            capacity: 0,
            free_disk: gc.map_or(0, |gc| gc.free_disk()),
            address: String::new(),
            entitlements: self.entitlements.clone(),
            cache_bytes: gc.map_or(0, |gc| gc.used()),
        };
        Some(kiln_model::WorkerStatus {
            info,
            running,
            draining: false,
            last_heartbeat: kiln_types::now_ms(),
            layers: 0,
        })
    }

    /// The cluster, on a coordinator.
    pub fn cluster(&self) -> Option<&Arc<Cluster<ClusterData>>> {
        match &self.mode {
            Mode::Cluster { cluster, .. } => Some(cluster),
            Mode::Local(_) => None,
        }
    }

    /// The daemon's key-value store (the cache index, records, the build history).
    pub fn store(&self) -> &SharedKv {
        &self.kv
    }

    /// Makes every cache entry and record so far durable (blocking: call it off the async
    /// threads).
    pub fn flush(&self) -> Result<(), kiln_kv::KvError> {
        self.kv.flush()
    }

    /// The stores builds use: contexts, results brought in, exports.
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// The garbage collector of this daemon's stores: a standalone daemon's worker, or a
    /// coordinator's own store (its workers collect theirs).
    pub fn gc(&self) -> Option<&Arc<Gc>> {
        self.gc.as_ref()
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The platforms it executes RUN steps for (a coordinator: its workers').
    pub fn platforms(&self) -> Vec<kiln_types::Platform> {
        match self.cluster() {
            Some(cluster) => {
                let mut platforms: Vec<_> = cluster.workers().into_iter().flat_map(|w| w.info.platforms).collect();
                platforms.sort_by_key(|p| p.to_string());
                platforms.dedup();
                platforms
            }
            None => self.platforms.clone(),
        }
    }
}
