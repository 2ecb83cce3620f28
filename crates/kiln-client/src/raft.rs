//! A replicated coordinator's links to the other members: raft messages, as bytes, over
//! Kiln's gRPC (mutual TLS as this node). One queue and one sending task per member, so a slow
//! member holds up nobody else and messages to one member stay in order.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use kiln_proto::MAX_MESSAGE;
use kiln_proto::tls::NodeTls;
use kiln_proto::v1::{self, raft_client::RaftClient};
use kiln_raft::{Node, Transport};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::Instrument as _;

use crate::{ClientError, endpoint};

/// How long one batch may take to reach a member before it counts as unreachable: several
/// heartbeats, well under the election timeout.
const SEND_TIMEOUT: Duration = Duration::from_millis(500);

/// Batches waiting for a member; beyond this, messages for it are dropped (raft sends again).
const QUEUE: usize = 256;

/// The member a link reports to once it runs (set after [`Node::start`], which takes the
/// links).
pub type NodeSlot = Arc<OnceLock<Weak<Node>>>;

/// A link to one member, connected on first use and again after a failure.
#[derive(Clone)]
struct RaftLink {
    client: RaftClient<Channel>,
    address: String,
}

impl RaftLink {
    fn new(address: &str, tls: Option<&NodeTls>) -> Result<RaftLink, ClientError> {
        let channel = endpoint(address, tls)?.connect_timeout(Duration::from_secs(1)).connect_lazy();
        let client =
            RaftClient::new(channel).max_encoding_message_size(MAX_MESSAGE).max_decoding_message_size(MAX_MESSAGE);
        Ok(RaftLink { client, address: address.to_string() })
    }

    async fn send(&self, from: u64, to: u64, messages: Vec<Vec<u8>>) -> Result<(), ClientError> {
        let batch = v1::RaftBatch { from, to, messages };
        self.client
            .clone()
            .send(batch)
            .await
            .map_err(|status| ClientError::rpc(&format!("raft member {to} at {}", self.address), status))?;
        Ok(())
    }
}

/// A batch for one member.
struct Outgoing {
    messages: Vec<Vec<u8>>,
    snapshot: bool,
}

/// The [`Transport`] of a member: links to every other member.
pub struct RaftLinks {
    queues: BTreeMap<u64, mpsc::Sender<Outgoing>>,
    node: NodeSlot,
}

impl RaftLinks {
    /// Links from member `from` to every other of `peers` (URL by id), reached as this node
    /// (`tls`), reporting to the member in `node` once it is set. A peer whose URL does not
    /// make an endpoint is the error, with its id.
    pub fn start(
        from: u64,
        peers: &BTreeMap<u64, String>,
        tls: Option<&NodeTls>,
        node: &NodeSlot,
    ) -> Result<Arc<RaftLinks>, (u64, ClientError)> {
        let mut queues = BTreeMap::new();
        for (&to, address) in peers.iter().filter(|(id, _)| **id != from) {
            let link = RaftLink::new(address, tls).map_err(|error| (to, error))?;
            let (sender, receiver) = mpsc::channel(QUEUE);
            queues.insert(to, sender);
            let deliver = deliver(link, from, to, receiver, Arc::clone(node));
            tokio::spawn(deliver.instrument(tracing::info_span!("raft_link", to)));
        }
        Ok(Arc::new(RaftLinks { queues, node: Arc::clone(node) }))
    }
}

impl Transport for RaftLinks {
    fn send(&self, to: u64, messages: Vec<Vec<u8>>, snapshot: bool) {
        let Some(queue) = self.queues.get(&to) else { return };
        if queue.try_send(Outgoing { messages, snapshot }).is_err()
            && let Some(node) = self.node.get().and_then(Weak::upgrade)
        {
            node.report_unreachable(to);
            if snapshot {
                node.report_snapshot(to, false);
            }
        }
    }
}

/// Sends what is queued for member `to`, everything waiting in one batch.
async fn deliver(link: RaftLink, from: u64, to: u64, mut queue: mpsc::Receiver<Outgoing>, node: NodeSlot) {
    let mut reachable = true;
    while let Some(first) = queue.recv().await {
        let (mut messages, mut snapshot) = (first.messages, first.snapshot);
        while let Ok(next) = queue.try_recv() {
            messages.extend(next.messages);
            snapshot |= next.snapshot;
        }
        let sent = tokio::time::timeout(SEND_TIMEOUT, link.send(from, to, messages)).await;
        let failure = match sent {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {} ms", SEND_TIMEOUT.as_millis())),
        };
        let Some(node) = node.get().and_then(Weak::upgrade) else { return };
        if let Some(failure) = &failure {
            node.report_unreachable(to);
            if reachable {
                tracing::warn!("raft member {to} unreachable: {failure}");
            }
        } else if !reachable {
            tracing::info!("raft member {to} reachable again");
        }
        reachable = failure.is_none();
        if snapshot {
            node.report_snapshot(to, reachable);
        }
    }
}
