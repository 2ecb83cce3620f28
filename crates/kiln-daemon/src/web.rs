//! The build history's web UI (`web-listen`): `kiln-web` over this daemon's history entries,
//! the journals of its builds, and its cluster's workers and queues (those `metrics-listen`
//! shows).

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_api::BuildBook;
use kiln_model::{BuildEntry, RunningStep, StepLog, VertexRecord, WorkerStatus};
use kiln_telemetry::Probe as _;
use kiln_types::Digest;
use tracing::Instrument as _;

/// What the web UI reads, and who may.
pub struct History {
    pub book: BuildBook,
    /// The daemon's builds, queues and workers.
    pub load: crate::probe::Builds,
    /// The client tokens (none: whoever reaches the listener is an admin, as on the API).
    pub tokens: Vec<kiln_model::ClientToken>,
}

impl History {
    fn journal(&self) -> &kiln_api::Journal {
        self.load.runs.journal()
    }
}

impl kiln_web::Backend for History {
    fn caller(&self, token: Option<&str>) -> Option<kiln_model::Caller> {
        if self.tokens.is_empty() {
            return Some(kiln_model::Caller {
                name: "anonymous".into(),
                tenant: kiln_model::DEFAULT_TENANT.into(),
                role: kiln_model::Role::Admin,
            });
        }
        let hash = Digest::of(token?.as_bytes()).hex();
        let known = self.tokens.iter().find(|t| t.sha256 == hash)?;
        Some(kiln_model::Caller { name: known.name.clone(), tenant: known.tenant.clone(), role: known.role })
    }

    fn builds(&self) -> Result<Vec<BuildEntry>, String> {
        self.book.list(None).map_err(|e| e.to_string())
    }

    fn build(&self, id: &str) -> Result<Option<(BuildEntry, Vec<VertexRecord>)>, String> {
        let Some(entry) = self.book.get(id).map_err(|e| e.to_string())? else { return Ok(None) };
        let records = self.journal().records(id).map_err(|e| e.to_string())?;
        Ok(Some((entry, records)))
    }

    fn logs(&self, id: &str, vertex: &Digest) -> Result<Option<StepLog>, String> {
        let logs = self.journal().logs(id, Some(vertex)).map_err(|e| e.to_string())?;
        Ok(logs.into_iter().next().map(|(_, log)| log))
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        let engine = &self.load.engine;
        match engine.cluster() {
            Some(cluster) => cluster.workers(),
            None => engine.local_worker().into_iter().collect(),
        }
    }

    fn running(&self) -> Vec<RunningStep> {
        let engine = &self.load.engine;
        if let Some(cluster) = engine.cluster() {
            return cluster.running_steps();
        }
        // A standalone daemon's steps are its builds' started ones: a step several builds
        // wait on runs once.
        let mut steps: BTreeMap<Digest, RunningStep> = BTreeMap::new();
        for (_, record) in self.journal().running() {
            let since = record.started.unwrap_or_default();
            let step = steps.entry(record.digest).or_insert_with(|| RunningStep {
                worker: engine.name().to_string(),
                name: record.name.clone(),
                vertex: record.digest,
                since,
            });
            step.since = step.since.min(since);
        }
        steps.into_values().collect()
    }

    fn queues(&self) -> BTreeMap<String, kiln_web::Queue> {
        let platforms = self.load.state().platforms;
        platforms
            .into_iter()
            .map(|(p, load)| (p, kiln_web::Queue { queued: load.queued, running: load.running }))
            .collect()
    }

    fn saved_ms(&self, id: &str) -> Result<u64, String> {
        self.journal().saved_ms(id).map_err(|e| e.to_string())
    }

    fn watch(&self) -> tokio::sync::broadcast::Receiver<kiln_model::BuildChange> {
        self.journal().watch()
    }
}

/// Serves the web UI on `address` in the background, until `stopped`.
pub async fn serve(
    address: &str,
    history: History,
    stopped: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = crate::bind(address).await.context("web-listen")?;
    let serving = async move {
        if let Err(error) = kiln_web::serve(listener, Arc::new(history), async move { stopped.cancelled().await }).await
        {
            tracing::error!("the web listener failed: {error}");
        }
    };
    tokio::spawn(serving.instrument(tracing::info_span!("web_server")));
    Ok(())
}
