//! A narrow, ordered key-value interface: the only crate that knows about sled.
//!
//! Everything Kiln persists (blob index, layer metadata, cache index, later the coordinator's
//! state) goes through [`Kv`]. Keys live in named trees and are ordered bytewise, so prefix scans
//! give range queries. [`Kv::apply`] is atomic within one tree: a crash leaves either every
//! change of a batch or none of them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// An error from the underlying store.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// sled reported an error (IO or corruption).
    #[error("key-value store: {0}")]
    Sled(#[from] sled::Error),
    /// A transaction could not be applied.
    #[error("key-value store transaction: {0}")]
    Transaction(String),
    /// A replicated store refused a write: too much waits to be replicated.
    #[error("{0}")]
    Backlog(String),
}

/// One change in a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set the key to the value.
    Put(Vec<u8>, Vec<u8>),
    /// Remove the key (no error when it is absent).
    Delete(Vec<u8>),
}

/// Changes applied atomically by [`Kv::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The changes, applied in order.
    pub changes: Vec<Change>,
}

impl Batch {
    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.changes.push(Change::Put(key.into(), value.into()));
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.changes.push(Change::Delete(key.into()));
        self
    }
}

/// Key/value pairs returned by a scan, in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key-value store with named trees.
pub trait Kv: Send + Sync {
    /// Reads one key.
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;
    /// Writes one key.
    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    /// Removes one key; absent keys are not an error.
    fn delete(&self, tree: &str, key: &[u8]) -> Result<(), KvError>;
    /// Every pair whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Pairs, KvError>;
    /// Applies every change of the batch atomically.
    fn apply(&self, tree: &str, batch: &Batch) -> Result<(), KvError>;
    /// Makes every write so far durable.
    fn flush(&self) -> Result<(), KvError>;
}

/// A shared handle to some [`Kv`].
pub type SharedKv = Arc<dyn Kv>;

/// The sled-backed store used by daemons.
pub struct SledKv {
    db: sled::Db,
}

impl SledKv {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<SledKv, KvError> {
        Ok(SledKv { db: sled::open(dir)? })
    }

    fn tree(&self, tree: &str) -> Result<sled::Tree, KvError> {
        Ok(self.db.open_tree(tree)?)
    }
}

impl Kv for SledKv {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.tree(tree)?.insert(key, value)?;
        Ok(())
    }

    fn delete(&self, tree: &str, key: &[u8]) -> Result<(), KvError> {
        self.tree(tree)?.remove(key)?;
        Ok(())
    }

    fn scan_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Pairs, KvError> {
        self.tree(tree)?.scan_prefix(prefix).map(|item| Ok(item.map(|(k, v)| (k.to_vec(), v.to_vec()))?)).collect()
    }

    fn apply(&self, tree: &str, batch: &Batch) -> Result<(), KvError> {
        let mut sled_batch = sled::Batch::default();
        for change in &batch.changes {
            match change {
                Change::Put(k, v) => sled_batch.insert(k.as_slice(), v.as_slice()),
                Change::Delete(k) => sled_batch.remove(k.as_slice()),
            }
        }
        self.tree(tree)?.apply_batch(sled_batch)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), KvError> {
        self.db.flush()?;
        Ok(())
    }
}

type MemoryTree = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory store for tests and ephemeral daemons.
#[derive(Default)]
pub struct MemoryKv {
    trees: Mutex<BTreeMap<String, MemoryTree>>,
}

impl MemoryKv {
    /// An empty store.
    pub fn new() -> MemoryKv {
        MemoryKv::default()
    }

    fn with_tree<T>(&self, tree: &str, f: impl FnOnce(&mut MemoryTree) -> T) -> T {
        let mut trees = self.trees.lock().unwrap_or_else(|poison| poison.into_inner());
        f(trees.entry(tree.to_string()).or_default())
    }
}

impl Kv for MemoryKv {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.with_tree(tree, |t| t.get(key).cloned()))
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.with_tree(tree, |t| t.insert(key.to_vec(), value.to_vec()));
        Ok(())
    }

    fn delete(&self, tree: &str, key: &[u8]) -> Result<(), KvError> {
        self.with_tree(tree, |t| t.remove(key));
        Ok(())
    }

    fn scan_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Pairs, KvError> {
        Ok(self.with_tree(tree, |t| {
            t.range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }))
    }

    fn apply(&self, tree: &str, batch: &Batch) -> Result<(), KvError> {
        self.with_tree(tree, |t| {
            for change in &batch.changes {
                match change {
                    Change::Put(k, v) => t.insert(k.clone(), v.clone()),
                    Change::Delete(k) => t.remove(k),
                };
            }
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), KvError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same behaviour checks run against both implementations.
    fn check_store(kv: &dyn Kv) {
        kv.put("t", b"a/1", b"one").unwrap();
        kv.put("t", b"a/2", b"two").unwrap();
        kv.put("t", b"b/1", b"three").unwrap();
        kv.put("other", b"a/9", b"elsewhere").unwrap();
        assert_eq!(kv.get("t", b"a/1").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get("t", b"a/9").unwrap(), None);
        let scanned = kv.scan_prefix("t", b"a/").unwrap();
        assert_eq!(scanned, vec![(b"a/1".to_vec(), b"one".to_vec()), (b"a/2".to_vec(), b"two".to_vec())]);

        let mut batch = Batch::default();
        batch.delete(b"a/1".to_vec()).put(b"a/3".to_vec(), b"three".to_vec()).delete(b"missing".to_vec());
        kv.apply("t", &batch).unwrap();
        let keys: Vec<_> = kv.scan_prefix("t", b"").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"a/2".to_vec(), b"a/3".to_vec(), b"b/1".to_vec()]);
        kv.delete("t", b"a/2").unwrap();
        kv.delete("t", b"a/2").unwrap();
        assert_eq!(kv.get("t", b"a/2").unwrap(), None);
        kv.flush().unwrap();
    }

    #[test]
    fn memory_store_behaves() {
        check_store(&MemoryKv::new());
    }

    #[test]
    fn sled_store_behaves_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let kv = SledKv::open(dir.path()).unwrap();
            check_store(&kv);
        }
        // sled's flusher thread lets go of the database's file lock a moment after the last
        // handle drops (on its next wake-up); there is no event to wait on, so retry opening
        // while the lock is still held, within a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let reopened = loop {
            match SledKv::open(dir.path()) {
                Ok(kv) => break kv,
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(reopened.get("t", b"a/3").unwrap().as_deref(), Some(&b"three"[..]));
        assert_eq!(reopened.get("other", b"a/9").unwrap().as_deref(), Some(&b"elsewhere"[..]));
    }
}
