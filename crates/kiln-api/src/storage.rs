//! Disk usage and pruning. A worker serves its store as the `Storage` service (its
//! coordinator calls it); the control service answers `DiskUsage` and `Prune` from the
//! daemon's own worker (standalone) or from every connected worker of its cluster, in
//! parallel, each record naming its worker and each worker that did not answer named in
//! `errors`.

use kiln_proto::tls::NodeTls;
use std::sync::Arc;
use std::time::Duration;

use kiln_cluster::Cluster;
use kiln_engine::ClusterData;
use kiln_proto::MAX_MESSAGE;
use kiln_proto::convert::{prune_from_proto, usage_to_proto};
use kiln_proto::v1::storage_client::StorageClient;
use kiln_proto::v1::storage_server::Storage;
use kiln_proto::v1::{DiskUsageRequest, DiskUsageResponse, PruneRequest, PruneResponse};
use kiln_types::Digest;
use kiln_worker::Gc;
use tonic::{Request, Response, Status};

use crate::error::ApiError;

/// How long a coordinator waits for one worker's answer (a prune may remove gigabytes).
const WORKER_TIMEOUT: Duration = Duration::from_secs(300);

/// A worker's store, as its coordinator sees it.
pub struct StorageService {
    gc: Arc<Gc>,
}

impl StorageService {
    /// A service over a worker's garbage collector.
    pub fn new(gc: Arc<Gc>) -> StorageService {
        StorageService { gc }
    }
}

#[tonic::async_trait]
impl Storage for StorageService {
    async fn disk_usage(&self, _: Request<DiskUsageRequest>) -> Result<Response<DiskUsageResponse>, Status> {
        Ok(Response::new(local_usage(&self.gc, "").await?))
    }

    async fn prune(&self, request: Request<PruneRequest>) -> Result<Response<PruneResponse>, Status> {
        Ok(Response::new(local_prune(&self.gc, request.get_ref()).await?))
    }
}

/// The records of this daemon's worker, named `worker`.
pub(crate) async fn local_usage(gc: &Arc<Gc>, worker: &str) -> Result<DiskUsageResponse, ApiError> {
    let records = gc.usage().await.map_err(|e| ApiError::Storage(e.to_string()))?;
    let records = records
        .into_iter()
        .map(|mut record| {
            record.worker = worker.to_string();
            usage_to_proto(&record)
        })
        .collect();
    Ok(DiskUsageResponse { records, errors: Vec::new() })
}

/// Prunes this daemon's worker.
pub(crate) async fn local_prune(gc: &Arc<Gc>, request: &PruneRequest) -> Result<PruneResponse, ApiError> {
    let collected = gc.prune(prune_from_proto(request)).await.map_err(|e| ApiError::Storage(e.to_string()))?;
    Ok(PruneResponse {
        reclaimed: collected.report.reclaimed,
        records: collected.report.records,
        errors: Vec::new(),
        evicted: collected.evicted.iter().map(ToString::to_string).collect(),
    })
}

/// Asks every connected worker at once; returns each worker's name with its answer or why
/// there is none.
async fn ask_workers<T: Send + 'static, F>(
    cluster: &Arc<Cluster<ClusterData>>,
    tls: Option<&NodeTls>,
    ask: impl Fn(StorageClient<tonic::transport::Channel>) -> F,
) -> Vec<(String, Result<T, String>)>
where
    F: Future<Output = Result<Response<T>, Status>> + Send + 'static,
{
    let mut asked = tokio::task::JoinSet::new();
    for worker in cluster.workers() {
        let name = worker.info.name.clone();
        let address = worker.info.address.clone();
        let endpoint = tonic::transport::Endpoint::from_shared(address.clone())
            .map(|e| e.connect_timeout(Duration::from_secs(5)).timeout(WORKER_TIMEOUT))
            .and_then(|e| match tls {
                Some(tls) if address.starts_with("https://") => e.tls_config(tls.client()),
                _ => Ok(e),
            });
        let channel = match endpoint {
            Ok(endpoint) => endpoint.connect_lazy(),
            Err(e) => {
                asked.spawn(async move { (name, Err(e.to_string())) });
                continue;
            }
        };
        let call = ask(StorageClient::new(channel).max_decoding_message_size(MAX_MESSAGE));
        asked.spawn(async move { (name, call.await.map(Response::into_inner).map_err(|s| s.message().to_string())) });
    }
    let mut answers = Vec::new();
    while let Some(answer) = asked.join_next().await {
        answers.extend(answer.ok());
    }
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    answers
}

/// Every connected worker's records.
pub(crate) async fn cluster_usage(cluster: &Arc<Cluster<ClusterData>>, tls: Option<&NodeTls>) -> DiskUsageResponse {
    let mut response = DiskUsageResponse::default();
    for (worker, answer) in
        ask_workers(cluster, tls, |mut client| async move { client.disk_usage(DiskUsageRequest {}).await }).await
    {
        match answer {
            Ok(answer) => response.records.extend(answer.records.into_iter().map(|mut record| {
                record.worker = worker.clone();
                record
            })),
            Err(reason) => response.errors.push(format!("worker {worker}: {reason}")),
        }
    }
    response
}

/// Prunes every connected worker; the layers each removed are no longer expected there.
pub(crate) async fn cluster_prune(
    cluster: &Arc<Cluster<ClusterData>>,
    tls: Option<&NodeTls>,
    request: PruneRequest,
) -> PruneResponse {
    let mut response = PruneResponse::default();
    let answers = ask_workers(cluster, tls, |mut client| async move { client.prune(request).await }).await;
    for (worker, answer) in answers {
        match answer {
            Ok(answer) => {
                response.reclaimed += answer.reclaimed;
                response.records += answer.records;
                let evicted: Vec<Digest> = answer.evicted.iter().filter_map(|d| d.parse().ok()).collect();
                cluster.evicted_by(&worker, evicted);
            }
            Err(reason) => response.errors.push(format!("worker {worker}: {reason}")),
        }
    }
    response
}
