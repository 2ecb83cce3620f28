//! A [`Kv`] whose writes to the replicated trees go through the log: reads are the node's
//! own store; a write is proposed (in the order it was made) and reaches the store when its
//! entry applies, on every member alike.

use std::sync::{Arc, Weak};

use kiln_kv::{Batch, Kv, KvError, Pairs, SharedKv};
use tokio::sync::{mpsc, oneshot};

use crate::{Node, Write};

/// The most bytes of keys and values merged into one entry: well under the size at which
/// sled stores a value apart (a quarter of its 512 KiB segments), so appending an entry stays
/// one write to its log.
const MAX_ENTRY_BYTES: usize = 32 << 10;

/// Entries proposed and not committed yet, at most: writes made meanwhile wait and are
/// merged, so a busy leader proposes fewer, larger entries (group commit).
const IN_FLIGHT: usize = 16;

/// The node's store, with the writes to `trees` replicated. Such a write returns `Ok` once
/// queued: it is readable only after it commits, and one made where the member does not lead
/// is dropped (with a warning), since only the leader writes replicated state.
pub struct ReplicatedKv {
    local: SharedKv,
    trees: Vec<String>,
    writes: mpsc::UnboundedSender<Queued>,
}

/// A write waiting to be proposed, and who waits for its commit.
struct Queued {
    write: Write,
    reply: Option<Waiter>,
}

/// Who waits for a write's commit: its index, or why not.
type Waiter = oneshot::Sender<Result<u64, String>>;

impl ReplicatedKv {
    /// Wraps `local`, replicating writes to `trees`; the returned [`Proposer`] proposes them
    /// once the node runs ([`Proposer::run`]).
    pub fn new(local: SharedKv, trees: &[&str]) -> (ReplicatedKv, Proposer) {
        let (writes, queue) = mpsc::unbounded_channel();
        let trees = trees.iter().map(|tree| tree.to_string()).collect();
        (ReplicatedKv { local, trees, writes }, Proposer { queue })
    }

    fn replicate(&self, tree: &str, batch: Batch) -> bool {
        if !self.trees.iter().any(|t| t == tree) {
            return false;
        }
        // The proposer stops only with the daemon; a write after that is lost like any write
        // a crash interrupts.
        let _ = self.writes.send(Queued { write: Write { tree: tree.to_string(), batch }, reply: None });
        true
    }

    /// Writes `batch` to the replicated `tree`; resolves with the entry's index once it is
    /// committed and applied here, or with why not (this member does not lead, the log
    /// stopped).
    pub fn write_durably(
        &self,
        tree: &str,
        batch: Batch,
    ) -> impl Future<Output = Result<u64, String>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { write: Write { tree: tree.to_string(), batch }, reply: Some(reply) };
        let sent = self.writes.send(queued).is_ok();
        async move {
            if !sent {
                return Err("the replicated log has stopped".to_string());
            }
            answer.await.unwrap_or_else(|_| Err("the replicated log has stopped".to_string()))
        }
    }
}

impl Kv for ReplicatedKv {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.local.get(tree, key)
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        let mut batch = Batch::default();
        batch.put(key, value);
        if self.replicate(tree, batch) { Ok(()) } else { self.local.put(tree, key, value) }
    }

    fn delete(&self, tree: &str, key: &[u8]) -> Result<(), KvError> {
        let mut batch = Batch::default();
        batch.delete(key);
        if self.replicate(tree, batch) { Ok(()) } else { self.local.delete(tree, key) }
    }

    fn scan_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Pairs, KvError> {
        self.local.scan_prefix(tree, prefix)
    }

    fn apply(&self, tree: &str, batch: &Batch) -> Result<(), KvError> {
        if self.replicate(tree, batch.clone()) { Ok(()) } else { self.local.apply(tree, batch) }
    }

    fn flush(&self) -> Result<(), KvError> {
        self.local.flush()
    }
}

fn change_bytes(change: &kiln_kv::Change) -> usize {
    match change {
        kiln_kv::Change::Put(key, value) => key.len() + value.len(),
        kiln_kv::Change::Delete(key) => key.len(),
    }
}

/// Proposes the writes of a [`ReplicatedKv`], merging consecutive writes to one tree.
pub struct Proposer {
    queue: mpsc::UnboundedReceiver<Queued>,
}

impl Proposer {
    /// Proposes writes until the store is dropped. A write made where the node does not lead
    /// is dropped (only the leader writes replicated state).
    pub async fn run(mut self, node: Weak<Node>) {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        while let Some(first) = self.queue.recv().await {
            let mut entries: Vec<(Write, Vec<Waiter>)> = Vec::new();
            let mut next = Some(first);
            let mut bytes = 0;
            while let Some(Queued { write, reply }) = next.take() {
                bytes += write.batch.changes.iter().map(change_bytes).sum::<usize>();
                match entries.last_mut() {
                    Some((last, replies)) if last.tree == write.tree => {
                        last.batch.changes.extend(write.batch.changes);
                        replies.extend(reply);
                    }
                    _ => entries.push((write, reply.into_iter().collect())),
                }
                if bytes < MAX_ENTRY_BYTES {
                    next = self.queue.try_recv().ok();
                }
            }
            let Some(node) = node.upgrade() else { return };
            for (entry, replies) in entries {
                let tree = entry.tree.clone();
                let permit = Arc::clone(&in_flight).acquire_owned().await.expect("the semaphore is never closed");
                let proposed = node.propose(entry.encode());
                tokio::spawn(async move {
                    let result = proposed.await.map_err(|error| error.to_string());
                    drop(permit);
                    if let Err(error) = &result
                        && replies.is_empty()
                    {
                        tracing::warn!("a write to {tree} was not replicated (it is lost): {error}");
                    }
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                });
            }
        }
    }
}
