//! The build engine: what `kilnd` runs for each build request.
//!
//! Dockerfile text and a context directory go in; the front end converts them (twice: once
//! to learn which base images the build uses, once more with their configs, so `ENV`, `USER`
//! and `WORKDIR` of a base image reach the graph); the solver runs the graph on the worker;
//! the result is exported (an image in the store, pushed, tarballs, plain files).

mod build;
mod export;
mod history;
mod output;

pub use build::{BuildFailure, BuildRequest, BuildSummary, Progress};
pub use output::OutputSpec;

use std::path::PathBuf;
use std::sync::Arc;

use kiln_kv::{SharedKv, SledKv};
use kiln_solver::{Solver, SolverConfig};
use kiln_worker::{LocalExecutor, Worker, WorkerConfig};

/// How an engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The worker's settings (its root holds blobs, layers, caches and the solver's index).
    pub worker: WorkerConfig,
    /// Executions at once on this worker.
    pub max_parallelism: usize,
    /// The worker's name in records.
    pub name: String,
    /// Platforms it executes RUN steps for (default: [`kiln_worker::runnable_platforms`]).
    pub platforms: Vec<kiln_types::Platform>,
}

/// A worker and the solver that schedules on it.
pub struct Engine {
    worker: Arc<Worker>,
    solver: Solver<LocalExecutor>,
    name: String,
    platforms: Vec<kiln_types::Platform>,
}

/// Why an engine could not start.
#[derive(Debug, thiserror::Error)]
#[error("starting the engine in {root}: {message}")]
pub struct EngineError {
    root: PathBuf,
    message: String,
}

impl Engine {
    /// Opens the worker's stores (one sled database under the root) and starts the solver.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let root = config.worker.root.clone();
        let fail = |message: String| EngineError { root: root.clone(), message };
        std::fs::create_dir_all(&root).map_err(|e| fail(e.to_string()))?;
        let kv: SharedKv = Arc::new(SledKv::open(&root.join("db")).map_err(|e| fail(e.to_string()))?);
        Engine::with_kv(config, kv).map_err(fail)
    }

    /// Like [`Engine::start`] with a given metadata store.
    pub fn with_kv(config: EngineConfig, kv: SharedKv) -> Result<Engine, String> {
        let worker = Arc::new(Worker::open(config.worker, Arc::clone(&kv)).map_err(|e| e.to_string())?);
        let executor = Arc::new(LocalExecutor::new(Arc::clone(&worker), &config.name));
        let solver = Solver::start(executor, SolverConfig { worker_parallelism: config.max_parallelism }, Some(kv))?;
        let platforms = if config.platforms.is_empty() { kiln_worker::runnable_platforms() } else { config.platforms };
        Ok(Engine { worker, solver, name: config.name, platforms })
    }

    /// The worker.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// The worker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The platforms it executes RUN steps for.
    pub fn platforms(&self) -> &[kiln_types::Platform] {
        &self.platforms
    }
}
