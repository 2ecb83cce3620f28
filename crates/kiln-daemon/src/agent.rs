//! The worker role's gRPC control plane: [`kiln_worker::agent`] runs the session loop; this
//! plugs in the coordinator's worker service (through `kiln-client`) and peers' blob services.

use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_client::{ClientError, NodeTls, Target, WorkerLink, WorkerSession};
use kiln_model::{BoxFuture, Executed, Failed, HeldWork, JobId, Layers, LogLine, PushedLayer, WorkerInfo};
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

/// The worker service of a coordinator at `http://HOST:PORT` (or `https://`, connected to as
/// this node), or of whichever of several replicated coordinators leads.
pub struct Coordinator {
    /// Their addresses (`worker.coordinator`, a comma-separated list, or a name with several
    /// addresses: `kiln_client::resolve`).
    addresses: Vec<String>,
    /// The one to try first: the last that accepted, or the leader the last refusal named.
    preferred: Arc<std::sync::Mutex<Option<Target>>>,
    /// This node's TLS.
    tls: Option<NodeTls>,
}

impl Coordinator {
    /// The coordinators of `list` (comma-separated URLs), reached as this node (`tls`).
    pub fn new(list: &str, tls: Option<NodeTls>) -> Coordinator {
        let addresses: Vec<String> = kiln_config::coordinator_urls(list).into_iter().map(str::to_string).collect();
        Coordinator { addresses, preferred: Arc::default(), tls }
    }
}

impl ControlPlane for Coordinator {
    type Link = Link;
    type Error = ClientError;

    /// Registers with the preferred coordinator; a follower's refusal sends the worker to the
    /// leader it names, and a coordinator that does not answer to the next in the list. What
    /// the last one tried said is the error (the agent retries with backoff).
    fn connect(
        &self,
        info: WorkerInfo,
        layers: Vec<Digest>,
        held: Vec<HeldWork>,
    ) -> BoxFuture<Result<Session<Link>, ClientError>> {
        let (addresses, preferred, tls) = (self.addresses.clone(), Arc::clone(&self.preferred), self.tls.clone());
        Box::pin(async move {
            let first = preferred.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut candidates: Vec<Target> = first.iter().cloned().collect();
            for target in kiln_client::resolve(&addresses).await {
                if !candidates.contains(&target) {
                    candidates.push(target);
                }
            }
            let mut failure = None;
            let mut tried = 0;
            while tried < candidates.len() {
                let target = candidates[tried].clone();
                tried += 1;
                match WorkerSession::connect(&target, tls.as_ref(), &info, &layers, &held).await {
                    Ok(WorkerSession { link, lease_ms, incoming }) => {
                        *preferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(target);
                        return Ok(Session { link: Link(link), lease_ms, incoming });
                    }
                    Err(error) => {
                        if let Some(leader) = error.leader().map(Target::url)
                            && !candidates[..tried].contains(&leader)
                        {
                            // Try the leader next.
                            candidates.retain(|c| *c != leader);
                            candidates.insert(tried, leader);
                        }
                        failure = Some(error);
                    }
                }
            }
            Err(failure.unwrap_or_else(|| ClientError::Address {
                address: String::new(),
                reason: "worker.coordinator names no coordinator".into(),
            }))
        })
    }

    fn address(&self) -> String {
        match &*self.preferred.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(target) => target.to_string(),
            None => self.addresses.join(","),
        }
    }
}

/// The sending half of a gRPC session.
#[derive(Clone)]
pub struct Link(WorkerLink);

impl SessionLink for Link {
    fn heartbeat(&self, beat: kiln_model::Beat) {
        self.0.heartbeat(beat);
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
