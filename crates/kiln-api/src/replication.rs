//! A replicated coordinator's side of the API: only the leader serves clients and workers
//! (the others answer with the leader's URL), reads that must be current wait for a read
//! index, and the raft service hands peers' messages to the local member.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::v1::raft_server::Raft;
use kiln_proto::v1::{RaftAck, RaftBatch, RaftMember, RaftPiece, RaftStatus};
use kiln_raft::{Node, RaftError};
use tonic::{Request, Response, Status, Streaming};

use crate::Access;
use crate::error::ApiError;

/// How long a linearizable read waits for the leader to confirm its office.
const READ_PATIENCE: Duration = Duration::from_secs(5);

/// Raft batches up to this many bytes are decoded on the async thread that received them.
const DECODE_IN_PLACE: usize = 256 * 1024;

/// The largest message a member takes in pieces (`SendLarge`): a snapshot of the replicated
/// state, held whole in memory while it is received.
const MAX_LARGE_MESSAGE: usize = 2 << 30;

/// This coordinator's member of the replica set, and every member's URL.
pub struct Replication {
    node: Arc<Node>,
    peers: BTreeMap<u64, String>,
    /// The last term whose leader (this member) has taken over: builds start once it is the
    /// current term.
    recovered: tokio::sync::watch::Sender<u64>,
    /// The store whose replicated trees hold the build history ([`crate::BUILDS_TREE`]).
    store: Option<Arc<kiln_raft::ReplicatedKv>>,
}

impl Replication {
    /// `node` among `peers` (every member's URL by id).
    pub fn new(node: Arc<Node>, peers: BTreeMap<u64, String>) -> Replication {
        Replication { node, peers, recovered: tokio::sync::watch::Sender::new(0), store: None }
    }

    /// Records builds in `store`, whose replicated trees include [`crate::BUILDS_TREE`].
    pub fn recording_builds_in(mut self, store: Arc<kiln_raft::ReplicatedKv>) -> Replication {
        self.store = Some(store);
        self
    }

    /// The store recording builds, if one was given.
    pub fn build_store(&self) -> Option<&Arc<kiln_raft::ReplicatedKv>> {
        self.store.as_ref()
    }

    /// Lets builds start in `term`, whose leader this member is, once it has taken over:
    /// a new leader first waits for the workers that served the old one (their layers back
    /// the cache index; a build that started sooner would find its cached steps' layers
    /// nowhere and run them again).
    pub fn set_recovered(&self, term: u64) {
        self.recovered.send_replace(term);
    }

    /// The last term this member has taken over, as it changes.
    pub fn is_recovered(&self, term: u64) -> bool {
        *self.recovered.borrow() >= term
    }

    /// Watches the last term taken over.
    pub fn watch_recovered(&self) -> tokio::sync::watch::Receiver<u64> {
        self.recovered.subscribe()
    }

    /// Resolves once this member, leading, has taken over its term.
    pub async fn recovered(&self) {
        let mut recovered = self.recovered.subscribe();
        let term = self.node.status().term;
        let _ = recovered.wait_for(|recovered| *recovered >= term).await;
    }

    /// The member.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Member `id`'s URL.
    pub fn address(&self, id: u64) -> Option<&str> {
        self.peers.get(&id).map(String::as_str)
    }

    /// Ok while this coordinator leads; otherwise [`ApiError::NotLeader`] with the leader's
    /// URL when one is known.
    pub fn leading(&self) -> Result<(), ApiError> {
        let status = self.node.status();
        if status.is_leader() {
            return Ok(());
        }
        Err(ApiError::NotLeader { leader: status.leader.and_then(|id| self.address(id)).map(str::to_string) })
    }

    /// Resolves once this member does not lead (at once when it does not now).
    pub async fn deposed(&self) {
        let mut status = self.node.subscribe();
        let _ = status.wait_for(|status| !status.is_leader()).await;
    }

    /// Waits until this leader has confirmed its office with a quorum and applied everything
    /// committed before: what it reads next is current.
    pub async fn read_barrier(&self) -> Result<(), ApiError> {
        match tokio::time::timeout(READ_PATIENCE, self.node.read_index()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::NotLeader { .. })) => {
                Err(self.leading().err().unwrap_or(ApiError::NotLeader { leader: None }))
            }
            Ok(Err(error)) => Err(ApiError::Replication(error.to_string())),
            Err(_) => Err(ApiError::Replication(format!(
                "the leader could not confirm it still leads within {} s (is a quorum reachable?)",
                READ_PATIENCE.as_secs()
            ))),
        }
    }

    /// The replica set as this member sees it.
    pub fn status(&self) -> RaftStatus {
        let status = self.node.status();
        RaftStatus {
            node_id: status.id,
            leader: status.leader.unwrap_or(0),
            term: status.term,
            members: status
                .members
                .iter()
                .map(|member| RaftMember {
                    id: member.id,
                    address: self.address(member.id).unwrap_or_default().to_string(),
                    role: member.role.map(|role| role.as_str().to_string()).unwrap_or_default(),
                    applied: member.applied.unwrap_or(0),
                })
                .collect(),
        }
    }
}

/// The raft service: messages from other members, as bytes.
pub struct RaftService {
    replication: Arc<Replication>,
    access: Access,
}

impl RaftService {
    /// Delivers to `replication`'s member.
    pub fn new(replication: Arc<Replication>) -> RaftService {
        RaftService { replication, access: Access::default() }
    }

    pub(crate) fn with_access(mut self, access: Access) -> RaftService {
        self.access = access;
        self
    }
}

/// The host of a `http(s)://HOST:PORT` URL.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest.rsplit_once(':').map_or(rest, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl RaftService {
    /// Checks that messages from member `from` to member `to` come from that member (its
    /// certificate in `chain`) and are for this one.
    fn check(&self, chain: &[tonic::transport::CertificateDer<'static>], from: u64, to: u64) -> Result<(), ApiError> {
        let host = self.replication.address(from).map(host_of).ok_or_else(|| {
            ApiError::Replication(format!("a raft message from member {from}, which is not in peers"))
        })?;
        // Any node of the cluster has a certificate from the CA; only the member's own may
        // speak for it (raft-rs decodes with rust-protobuf 2, not for untrusted input).
        self.access
            .member(chain, host)
            .map_err(|_| ApiError::NotThatMember { member: from, host: host.to_string() })?;
        let id = self.replication.node().id();
        if to != id {
            return Err(ApiError::Replication(format!("a raft message for member {to} reached member {id}")));
        }
        Ok(())
    }

    /// Hands checked messages to the member. Decoding a large batch (log entries, a snapshot)
    /// is CPU work for a blocking thread; heartbeats and acknowledgements are decoded here.
    async fn deliver(&self, from: u64, messages: Vec<Vec<u8>>) -> Result<(), ApiError> {
        let node = self.replication.node();
        let size: usize = messages.iter().map(Vec::len).sum();
        let received = if size > DECODE_IN_PLACE {
            let node = Arc::clone(node);
            tokio::task::spawn_blocking(move || node.receive(from, &messages)).await.map_err(ApiError::from)?
        } else {
            node.receive(from, &messages)
        };
        received.map_err(|error| ApiError::Replication(error.to_string()))
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        self.access.node(&request, "the raft service")?;
        let chain = request.peer_certs().map(|chain| chain.to_vec()).unwrap_or_default();
        let batch = request.into_inner();
        self.check(&chain, batch.from, batch.to)?;
        self.deliver(batch.from, batch.messages).await?;
        Ok(Response::new(RaftAck {}))
    }

    async fn send_large(&self, request: Request<Streaming<RaftPiece>>) -> Result<Response<RaftAck>, Status> {
        self.access.node(&request, "the raft service")?;
        let chain = request.peer_certs().map(|chain| chain.to_vec()).unwrap_or_default();
        let mut pieces = request.into_inner();
        let Some(first) = pieces.message().await? else {
            return Err(ApiError::Replication("a large raft message without pieces".into()).into());
        };
        // Checked before anything more is taken in.
        self.check(&chain, first.from, first.to)?;
        let mut message = first.data;
        while let Some(piece) = pieces.message().await? {
            if message.len() + piece.data.len() > MAX_LARGE_MESSAGE {
                let limit = MAX_LARGE_MESSAGE >> 20;
                let error = format!("a raft message from member {} over {limit} MiB", first.from);
                return Err(ApiError::Replication(error).into());
            }
            message.extend_from_slice(&piece.data);
        }
        self.deliver(first.from, vec![message]).await?;
        Ok(Response::new(RaftAck {}))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_of_urls() {
        assert_eq!(super::host_of("https://127.0.0.2:7070"), "127.0.0.2");
        assert_eq!(super::host_of("http://coordinator-1.kiln:7070"), "coordinator-1.kiln");
        assert_eq!(super::host_of("https://[::1]:7070"), "::1");
    }
}
