//! The worker role's gRPC control plane: [`kiln_worker::agent`] runs the session loop; this
//! plugs in the coordinator's worker service (through `kiln-client`) and peers' blob services.

use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_client::{ClientError, NodeTls, WorkerLink, WorkerSession};
use kiln_model::{BoxFuture, Executed, Failed, JobId, Layers, LogLine, PushedLayer, WorkerInfo};
use kiln_types::Digest;
use kiln_worker::BlobFetcher;
use kiln_worker::agent::{ControlPlane, Session, SessionLink};

/// Fetches blobs from peers' (or the coordinator's) blob services, as this node (`None`:
/// plain TCP).
pub struct PeerFetcher(pub Option<NodeTls>);

impl BlobFetcher for PeerFetcher {
    fn fetch(&self, digest: Digest, peers: Vec<String>, store: Arc<BlobStore>) -> BoxFuture<Result<(), String>> {
        let tls = self.0.clone();
        Box::pin(async move {
            kiln_client::fetch_from_any(&peers, tls.as_ref(), &digest, &store).await.map_err(|e| e.to_string())
        })
    }
}

/// A coordinator's worker service at `http://HOST:PORT` (or `https://`, connected to as this
/// node).
pub struct Coordinator {
    /// Its address.
    pub address: String,
    /// This node's TLS.
    pub tls: Option<NodeTls>,
}

impl ControlPlane for Coordinator {
    type Link = Link;
    type Error = ClientError;

    fn connect(&self, info: WorkerInfo, layers: Vec<Digest>) -> BoxFuture<Result<Session<Link>, ClientError>> {
        let (address, tls) = (self.address.clone(), self.tls.clone());
        Box::pin(async move {
            let WorkerSession { link, lease_ms, incoming } =
                WorkerSession::connect(&address, tls.as_ref(), &info, &layers).await?;
            Ok(Session { link: Link(link), lease_ms, incoming })
        })
    }

    fn address(&self) -> String {
        self.address.clone()
    }
}

/// The sending half of a gRPC session.
#[derive(Clone)]
pub struct Link(WorkerLink);

impl SessionLink for Link {
    fn heartbeat(&self, free_disk: u64) {
        self.0.heartbeat(free_disk);
    }

    fn drain(&self) {
        self.0.drain();
    }

    fn evicted(&self, layers: &[Digest]) {
        self.0.evicted(layers);
    }

    fn pushed(&self, request: u64, result: Result<Vec<PushedLayer>, String>) {
        self.0.pushed(request, result);
    }

    fn log(&self, job: JobId, epoch: u32, line: LogLine) {
        self.0.log(job, epoch, line);
    }

    fn result(&self, job: JobId, epoch: u32, result: Result<Executed<Layers>, Failed>) {
        self.0.result(job, epoch, result);
    }

    fn is_open(&self) -> bool {
        self.0.is_open()
    }
}
