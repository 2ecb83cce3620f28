//! A [`Kv`] whose writes to the replicated trees go through the log: reads are the node's
//! own store; a write is proposed (in the order it was made) and reaches the store when its
//! entry applies, on every member alike.

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// The most bytes of writes waiting to be proposed: beyond, writes are refused
/// ([`KvError::Backlog`]) until the log catches up, instead of piling up in memory.
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// The node's store, with the writes to `trees` replicated. Such a write returns `Ok` once
/// queued: it is readable only after it commits, and one made where the member does not lead
/// is dropped (with a warning), since only the leader writes replicated state.
pub struct ReplicatedKv {
    local: SharedKv,
    trees: Vec<String>,
    writes: mpsc::UnboundedSender<Queued>,
    /// Bytes of the writes queued and not yet taken by the proposer.
    queued: Arc<AtomicUsize>,
}

/// A write waiting to be proposed, and who waits for its commit.
struct Queued {
    write: Write,
    reply: Option<Waiter>,
}

impl Queued {
    fn bytes(&self) -> usize {
        self.write.batch.changes.iter().map(change_bytes).sum()
    }
}

/// Who waits for a write's commit: its index, or why not.
type Waiter = oneshot::Sender<Result<u64, String>>;

impl ReplicatedKv {
    /// Wraps `local`, replicating writes to `trees`; the returned [`Proposer`] proposes them
    /// once the node runs ([`Proposer::run`]).
    pub fn new(local: SharedKv, trees: &[&str]) -> (ReplicatedKv, Proposer) {
        let (writes, queue) = mpsc::unbounded_channel();
        let trees = trees.iter().map(|tree| tree.to_string()).collect();
        let queued = Arc::new(AtomicUsize::new(0));
        (ReplicatedKv { local, trees, writes, queued: Arc::clone(&queued) }, Proposer { queue, queued })
    }

    /// Queues `batch` for `tree`: `None` when the tree is not replicated, else whether the
    /// backlog took it.
    fn replicate(&self, tree: &str, batch: Batch) -> Option<Result<(), KvError>> {
        if !self.trees.iter().any(|t| t == tree) {
            return None;
        }
        // The proposer stops only with the daemon; a write after that is lost like any write
        // a crash interrupts.
        Some(
            self.enqueue(Queued { write: Write { tree: tree.to_string(), batch }, reply: None })
                .map_err(KvError::Backlog),
        )
    }

    /// Queues a write, unless the backlog is full.
    fn enqueue(&self, queued: Queued) -> Result<(), String> {
        let bytes = queued.bytes();
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > MAX_QUEUED_BYTES && before > 0 {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            return Err(format!(
                "a write to {} refused: {} MiB of writes wait for the replicated log",
                queued.write.tree,
                before >> 20
            ));
        }
        if self.writes.send(queued).is_err() {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes `batch` to the replicated `tree`; resolves with the entry's index once it is
    /// committed and applied here, or with why not (this member does not lead, the log
    /// stopped).
    pub fn write_durably(
        &self,
        tree: &str,
        batch: Batch,
    ) -> impl Future<Output = Result<u64, String>> + Send + 'static + use<> {
        let (reply, answer) = oneshot::channel();
        let queued = Queued { write: Write { tree: tree.to_string(), batch }, reply: Some(reply) };
        let sent = self.enqueue(queued);
        async move {
            sent?;
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
        self.replicate(tree, batch).unwrap_or_else(|| self.local.put(tree, key, value))
    }

    fn delete(&self, tree: &str, key: &[u8]) -> Result<(), KvError> {
        let mut batch = Batch::default();
        batch.delete(key);
        self.replicate(tree, batch).unwrap_or_else(|| self.local.delete(tree, key))
    }

    fn scan_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Pairs, KvError> {
        self.local.scan_prefix(tree, prefix)
    }

    fn apply(&self, tree: &str, batch: &Batch) -> Result<(), KvError> {
        self.replicate(tree, batch.clone()).unwrap_or_else(|| self.local.apply(tree, batch))
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
    /// The store's count of bytes queued: taking a write lowers it.
    queued: Arc<AtomicUsize>,
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
            while let Some(queued) = next.take() {
                let size = queued.bytes();
                self.queued.fetch_sub(size, Ordering::Relaxed);
                bytes += size;
                let Queued { write, reply } = queued;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_beyond_the_backlog_are_refused_until_the_proposer_takes_them() {
        let (store, mut proposer) = ReplicatedKv::new(Arc::new(kiln_kv::MemoryKv::new()), &["replicated"]);
        // 64 writes of just under 1 MiB each (key included) fill the backlog.
        let value = vec![0u8; (1 << 20) - 8];
        for n in 0..64 {
            store.put("replicated", format!("{n}").as_bytes(), &value).unwrap();
        }
        let refused = store.put("replicated", b"one more", &value).unwrap_err();
        assert!(refused.to_string().contains("MiB of writes wait for the replicated log"), "{refused}");
        // Another tree is the local store's, whatever the backlog.
        store.put("local", b"key", b"value").unwrap();
        // Taken by the proposer, the backlog shrinks and writes are taken again.
        let taken = proposer.queue.try_recv().unwrap();
        proposer.queued.fetch_sub(taken.bytes(), Ordering::Relaxed);
        store.put("replicated", b"one more", &value).unwrap();
    }
}
