//! The build history's web UI (`web-listen`): `kiln-web` over this daemon's history entries,
//! the journals of its builds, and its cluster's workers.

use std::sync::Arc;

use kiln_api::{BuildBook, Runs};
use kiln_engine::Engine;
use kiln_model::{BuildEntry, StepLog, VertexRecord, WorkerStatus};
use kiln_types::Digest;
use tracing::Instrument as _;

/// What the web UI reads, and who may.
pub struct History {
    pub book: BuildBook,
    pub runs: Runs,
    pub engine: Arc<Engine>,
    /// The client tokens (none: whoever reaches the listener is an admin, as on the API).
    pub tokens: Vec<kiln_model::ClientToken>,
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
        let records = self.runs.journal().records(id).map_err(|e| e.to_string())?;
        Ok(Some((entry, records)))
    }

    fn logs(&self, id: &str, vertex: &Digest) -> Result<Option<StepLog>, String> {
        let logs = self.runs.journal().logs(id, Some(vertex)).map_err(|e| e.to_string())?;
        Ok(logs.into_iter().next().map(|(_, log)| log))
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        self.engine.cluster().map(|c| c.workers()).unwrap_or_default()
    }

    fn watch(&self) -> tokio::sync::broadcast::Receiver<kiln_model::BuildChange> {
        self.runs.journal().watch()
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
