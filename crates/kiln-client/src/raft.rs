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

/// The most bytes of messages one batch carries; a larger message (a snapshot) travels alone,
/// in pieces of this size (`SendLarge`).
const MAX_CALL_BYTES: usize = 8 << 20;

/// How long a call may take for each byte it carries, beyond [`SEND_TIMEOUT`]: 10 MB/s.
const NANOS_PER_BYTE: u64 = 100;

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

    async fn send(&self, from: u64, to: u64, call: Call) -> Result<(), ClientError> {
        let sent = match call {
            Call::Batch(messages) => self.client.clone().send(v1::RaftBatch { from, to, messages }).await,
            Call::Large(message) => {
                // Each piece is copied out as the stream is polled: one at a time in memory.
                let count = message.len().div_ceil(MAX_CALL_BYTES);
                let pieces = (0..count).map(move |i| {
                    let data = message[i * MAX_CALL_BYTES..((i + 1) * MAX_CALL_BYTES).min(message.len())].to_vec();
                    let (from, to) = if i == 0 { (from, to) } else { (0, 0) };
                    v1::RaftPiece { from, to, data }
                });
                self.client.clone().send_large(tokio_stream::iter(pieces)).await
            }
        };
        sent.map_err(|status| ClientError::rpc(&format!("raft member {to} at {}", self.address), status))?;
        Ok(())
    }
}

/// One call to a member: a batch of messages, or one message too large for a batch.
enum Call {
    Batch(Vec<Vec<u8>>),
    Large(Vec<u8>),
}

impl Call {
    fn bytes(&self) -> usize {
        match self {
            Call::Batch(messages) => messages.iter().map(Vec::len).sum(),
            Call::Large(message) => message.len(),
        }
    }
}

/// `messages` as calls, in order: runs of small messages as batches of at most
/// [`MAX_CALL_BYTES`], each large one alone.
fn calls(messages: Vec<Vec<u8>>) -> Vec<Call> {
    let mut calls = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for message in messages {
        let full = bytes + message.len() > MAX_CALL_BYTES;
        if (full || message.len() > MAX_CALL_BYTES) && !batch.is_empty() {
            calls.push(Call::Batch(std::mem::take(&mut batch)));
            bytes = 0;
        }
        if message.len() > MAX_CALL_BYTES {
            calls.push(Call::Large(message));
        } else {
            bytes += message.len();
            batch.push(message);
        }
    }
    if !batch.is_empty() {
        calls.push(Call::Batch(batch));
    }
    calls
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
    let mut carried: Option<Outgoing> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let (mut messages, mut snapshot) = (first.messages, first.snapshot);
        let mut bytes: usize = messages.iter().map(Vec::len).sum();
        while bytes < MAX_CALL_BYTES {
            let Ok(next) = queue.try_recv() else { break };
            let more: usize = next.messages.iter().map(Vec::len).sum();
            if bytes + more > MAX_CALL_BYTES {
                carried = Some(next);
                break;
            }
            bytes += more;
            messages.extend(next.messages);
            snapshot |= next.snapshot;
        }
        let mut failure = None;
        for call in calls(messages) {
            let patience = SEND_TIMEOUT + Duration::from_nanos(call.bytes() as u64 * NANOS_PER_BYTE);
            failure = match tokio::time::timeout(patience, link.send(from, to, call)).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some(format!("no answer within {} ms", patience.as_millis())),
            };
            // What follows a lost message would arrive out of order: raft sends it again.
            if failure.is_some() {
                break;
            }
        }
        // Not started yet (the links exist before the member): nothing to tell.
        let Some(node) = node.get().and_then(Weak::upgrade) else { continue };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_messages_travel_alone_and_the_order_is_kept() {
        let (small, large) = (vec![1u8; 10], vec![2u8; MAX_CALL_BYTES + 1]);
        let split = calls(vec![small.clone(), small.clone(), large.clone(), small.clone()]);
        let shapes: Vec<(bool, usize)> = split.iter().map(|c| (matches!(c, Call::Large(_)), c.bytes())).collect();
        assert_eq!(shapes, [(false, 20), (true, MAX_CALL_BYTES + 1), (false, 10)]);
        // Many small messages make several batches, none over the bound.
        let half = vec![3u8; MAX_CALL_BYTES / 2];
        let split = calls(vec![half.clone(), half.clone(), half.clone()]);
        let sizes: Vec<usize> = split.iter().map(Call::bytes).collect();
        assert_eq!(sizes, [MAX_CALL_BYTES, MAX_CALL_BYTES / 2]);
        assert!(calls(Vec::new()).is_empty());
    }
}
