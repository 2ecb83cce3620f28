//! The solver's placement interface implemented by a worker in the same process.

use std::sync::Arc;

use kiln_graph::Vertex;
use kiln_model::{BoxFuture, Executed, Executor, Failed, LogSink, Phases};
use kiln_types::{Digest, elapsed_ms};

use crate::{BuildInputs, Snapshot, Worker};

/// Executes vertices on a local [`Worker`].
pub struct LocalExecutor {
    worker: Arc<Worker>,
    name: String,
}

impl LocalExecutor {
    /// An executor for `worker`, reported as `name` in records.
    pub fn new(worker: Arc<Worker>, name: &str) -> LocalExecutor {
        LocalExecutor { worker, name: name.to_string() }
    }
}

impl Executor for LocalExecutor {
    type Output = Snapshot;
    type Build = BuildInputs;

    fn execute(
        &self,
        vertex: Vertex,
        inputs: Vec<Snapshot>,
        build: Arc<BuildInputs>,
        logs: LogSink,
    ) -> BoxFuture<Result<Executed<Snapshot>, Failed>> {
        let worker = Arc::clone(&self.worker);
        Box::pin(async move {
            let started = std::time::Instant::now();
            let _span = kiln_telemetry::phase_span(kiln_telemetry::Phase::Execute);
            let output =
                worker.execute(&vertex, &inputs, &build, Some(&logs)).await.map_err(|e| Failed::from(e.to_string()))?;
            build.hold(&output.snapshot.layers).map_err(Failed::from)?;
            let phases = Phases { execute_ms: Some(elapsed_ms(started)), ..Phases::default() };
            Ok(Executed {
                pin: output.image.map(|image| image.manifest_digest),
                phases,
                ..Executed::new(output.snapshot)
            })
        })
    }

    fn worker_name(&self) -> String {
        self.name.clone()
    }

    /// A cached snapshot is usable while every layer is in the store (a layer removed since,
    /// by hand or by GC, makes the hit a miss); the build holds them from then on. One stat
    /// per layer, on the directory cache.
    fn available(&self, output: &Snapshot, build: &Arc<BuildInputs>) -> Option<String> {
        let snapshots = self.worker.snapshots();
        let present = output.layers.iter().all(|layer| snapshots.has_layer(layer));
        (present && build.hold(&output.layers).is_ok()).then(|| "local".to_string())
    }

    fn imports_caches(&self, build: &Arc<BuildInputs>) -> bool {
        !build.cache.is_empty()
    }

    fn import(
        &self,
        key: &Digest,
        _vertex: &Vertex,
        _inputs: &[Snapshot],
        build: &Arc<BuildInputs>,
    ) -> Option<BoxFuture<Result<Executed<Snapshot>, String>>> {
        let hit = build.cache.get(key)?.clone();
        let (worker, build) = (Arc::clone(&self.worker), Arc::clone(build));
        Some(Box::pin(async move {
            let snapshot = worker.import_cached(&hit).await.map_err(|e| e.to_string())?;
            build.hold(&snapshot.layers)?;
            Ok(Executed { cache_source: Some(hit.store.label().to_string()), ..Executed::new(snapshot) })
        }))
    }
}
