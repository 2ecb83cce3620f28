//! The replicated key-value store: each log entry is a [`Write`], a batch of changes to one of
//! a fixed set of trees of the node's store, applied in log order on every member. Puts and
//! deletes are absolute, so applying a suffix of the log again (after a crash between a
//! write and the record of its index) ends in the same state.

use kiln_kv::{Batch, Change, SharedKv};

use crate::StateMachine;

/// Where the index of the last applied entry is kept.
const APPLIED_TREE: &str = "raft-applied";
const APPLIED_KEY: &[u8] = b"applied";
/// The encoding's version, the first byte of every entry and snapshot.
const VERSION: u8 = 1;

/// Changes to one replicated tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The tree.
    pub tree: String,
    /// Its changes, applied together.
    pub batch: Batch,
}

impl Write {
    /// The entry's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = vec![VERSION];
        put_bytes(&mut bytes, self.tree.as_bytes());
        put_batch(&mut bytes, &self.batch);
        bytes
    }

    /// An entry back from its bytes.
    pub fn decode(bytes: &[u8]) -> Result<Write, String> {
        let mut reader = Reader(bytes);
        reader.version()?;
        let tree = String::from_utf8(reader.bytes()?.to_vec()).map_err(|_| "a tree name is not UTF-8".to_string())?;
        let batch = reader.batch()?;
        reader.end()?;
        Ok(Write { tree, batch })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_batch(out: &mut Vec<u8>, batch: &Batch) {
    out.extend_from_slice(&(batch.changes.len() as u32).to_be_bytes());
    for change in &batch.changes {
        match change {
            Change::Put(key, value) => {
                out.push(0);
                put_bytes(out, key);
                put_bytes(out, value);
            }
            Change::Delete(key) => {
                out.push(1);
                put_bytes(out, key);
            }
        }
    }
}

/// Reads the encoding, refusing truncated or trailing bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("truncated: {n} bytes wanted, {} left", self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    fn version(&mut self) -> Result<(), String> {
        match self.take(1)?[0] {
            VERSION => Ok(()),
            other => Err(format!("version {other}, this kilnd reads {VERSION}")),
        }
    }

    fn batch(&mut self) -> Result<Batch, String> {
        let count = self.u32()?;
        let mut batch = Batch::default();
        for _ in 0..count {
            match self.take(1)?[0] {
                0 => {
                    let key = self.bytes()?.to_vec();
                    batch.put(key, self.bytes()?.to_vec());
                }
                1 => {
                    batch.delete(self.bytes()?.to_vec());
                }
                other => return Err(format!("change kind {other}")),
            }
        }
        Ok(batch)
    }

    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() { Ok(()) } else { Err(format!("{} bytes after the end", self.0.len())) }
    }
}

/// What hears of applied writes (`None`: a snapshot replaced everything).
type Observer = Box<dyn FnMut(Option<&Write>) + Send>;

/// A state machine that applies [`Write`]s to the trees it replicates.
pub struct KvMachine {
    kv: SharedKv,
    trees: Vec<String>,
    applied: u64,
    observer: Option<Observer>,
    /// Writes applied but not in the store yet (until `applied_through`).
    pending: Vec<Write>,
}

impl KvMachine {
    /// Replicates `trees` of `kv` (a write to any other tree is refused, so that snapshots
    /// hold everything), from the applied index recorded there.
    pub fn new(kv: SharedKv, trees: &[&str]) -> Result<KvMachine, kiln_kv::KvError> {
        let applied = match kv.get(APPLIED_TREE, APPLIED_KEY)? {
            None => 0,
            Some(bytes) => u64::from_be_bytes(bytes.try_into().map_err(|_| {
                kiln_kv::KvError::Transaction(format!("{APPLIED_TREE}/applied is not an 8-byte index"))
            })?),
        };
        Ok(KvMachine {
            kv,
            trees: trees.iter().map(|t| t.to_string()).collect(),
            applied,
            observer: None,
            pending: Vec::new(),
        })
    }

    /// Calls `observer` with every write applied (after it is in the store), and with `None`
    /// after a snapshot replaced every tree: for a node that keeps part of the replicated
    /// state in memory.
    pub fn observed_by(mut self, observer: impl FnMut(Option<&Write>) + Send + 'static) -> KvMachine {
        self.observer = Some(Box::new(observer));
        self
    }

    fn record_applied(&mut self, index: u64) -> Result<(), String> {
        self.applied = index;
        self.kv.put(APPLIED_TREE, APPLIED_KEY, &index.to_be_bytes()).map_err(|e| e.to_string())
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, _index: u64, data: &[u8]) -> Result<(), String> {
        let write = Write::decode(data)?;
        if !self.trees.contains(&write.tree) {
            return Err(format!("a write to {:?}, which is not replicated", write.tree));
        }
        self.pending.push(write);
        Ok(())
    }

    /// Writes what the entries did, one batch per tree (each tree's changes in log order;
    /// trees are independent), then the applied index, then tells the observer.
    fn applied_through(&mut self, index: u64) -> Result<(), String> {
        let pending = std::mem::take(&mut self.pending);
        for tree in &self.trees {
            let mut batch = Batch::default();
            for write in pending.iter().filter(|write| &write.tree == tree) {
                batch.changes.extend(write.batch.changes.iter().cloned());
            }
            if !batch.changes.is_empty() {
                self.kv.apply(tree, &batch).map_err(|e| e.to_string())?;
            }
        }
        self.record_applied(index)?;
        if let Some(observer) = &mut self.observer {
            for write in &pending {
                observer(Some(write));
            }
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, String> {
        let mut bytes = vec![VERSION];
        bytes.extend_from_slice(&(self.trees.len() as u32).to_be_bytes());
        for tree in &self.trees {
            put_bytes(&mut bytes, tree.as_bytes());
            let mut batch = Batch::default();
            for (key, value) in self.kv.scan_prefix(tree, b"").map_err(|e| format!("reading {tree}: {e}"))? {
                batch.put(key, value);
            }
            put_batch(&mut bytes, &batch);
        }
        Ok(bytes)
    }

    fn restore(&mut self, index: u64, data: &[u8]) -> Result<(), String> {
        self.pending.clear();
        let mut reader = Reader(data);
        let mut trees = Vec::new();
        if !data.is_empty() {
            reader.version()?;
            for _ in 0..reader.u32()? {
                let tree = String::from_utf8(reader.bytes()?.to_vec()).map_err(|_| "a tree name is not UTF-8")?;
                trees.push(Write { tree, batch: reader.batch()? });
            }
            reader.end()?;
        }
        for tree in &self.trees {
            let mut replace = Batch::default();
            for (key, _) in self.kv.scan_prefix(tree, b"").map_err(|e| e.to_string())? {
                replace.delete(key);
            }
            if let Some(write) = trees.iter().find(|write| &write.tree == tree) {
                replace.changes.extend(write.batch.changes.iter().cloned());
            }
            self.kv.apply(tree, &replace).map_err(|e| e.to_string())?;
        }
        self.record_applied(index)?;
        if let Some(observer) = &mut self.observer {
            observer(None);
        }
        Ok(())
    }

    fn applied(&self) -> u64 {
        self.applied
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kiln_kv::{Kv, KvError, MemoryKv, Pairs};

    use super::*;

    /// A store that logs every change, so a crash after any number of them can be replayed.
    #[derive(Default)]
    struct Recording {
        inner: MemoryKv,
        log: Mutex<Vec<(String, Batch)>>,
    }

    impl Kv for Recording {
        fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            self.inner.get(tree, key)
        }
        fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), KvError> {
            let mut batch = Batch::default();
            batch.put(key, value);
            self.apply(tree, &batch)
        }
        fn delete(&self, tree: &str, key: &[u8]) -> Result<(), KvError> {
            let mut batch = Batch::default();
            batch.delete(key);
            self.apply(tree, &batch)
        }
        fn scan_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Pairs, KvError> {
            self.inner.scan_prefix(tree, prefix)
        }
        fn apply(&self, tree: &str, batch: &Batch) -> Result<(), KvError> {
            self.log.lock().unwrap().push((tree.to_string(), batch.clone()));
            self.inner.apply(tree, batch)
        }
        fn flush(&self) -> Result<(), KvError> {
            Ok(())
        }
    }

    const TREES: [&str; 2] = ["cache", "workers"];

    /// A deterministic pseudo-random log of writes.
    fn log(seed: u64, entries: usize) -> Vec<Vec<u8>> {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..entries)
            .map(|_| {
                let tree = TREES[(next() % 2) as usize].to_string();
                let mut batch = Batch::default();
                for _ in 0..1 + next() % 3 {
                    let key = format!("k{}", next() % 8);
                    if next() % 4 == 0 {
                        batch.delete(key);
                    } else {
                        batch.put(key, format!("v{}", next() % 100));
                    }
                }
                Write { tree, batch }.encode()
            })
            .collect()
    }

    fn contents(kv: &dyn Kv) -> Vec<(String, Pairs)> {
        TREES.iter().map(|tree| (tree.to_string(), kv.scan_prefix(tree, b"").unwrap())).collect()
    }

    /// Applies the log from the machine's applied index on, in runs of `run` entries.
    fn apply_all(machine: &mut KvMachine, log: &[Vec<u8>]) {
        apply_in_runs(machine, log, 7);
    }

    fn apply_in_runs(machine: &mut KvMachine, log: &[Vec<u8>], run: usize) {
        let from = machine.applied() as usize;
        let mut last = from;
        for (i, entry) in log.iter().enumerate().skip(from) {
            machine.apply(i as u64 + 1, entry).unwrap();
            last = i + 1;
            if last.is_multiple_of(run) {
                machine.applied_through(last as u64).unwrap();
            }
        }
        machine.applied_through(last as u64).unwrap();
    }

    #[test]
    fn the_same_log_makes_the_same_state_on_every_member() {
        let entries = log(7, 200);
        // Members apply the same log in runs of different lengths.
        let states: Vec<_> = [1, 5, 64]
            .into_iter()
            .map(|run| {
                let kv: SharedKv = Arc::new(MemoryKv::new());
                let mut machine = KvMachine::new(Arc::clone(&kv), &TREES).unwrap();
                apply_in_runs(&mut machine, &entries, run);
                assert_eq!(machine.applied(), 200);
                contents(kv.as_ref())
            })
            .collect();
        assert!(states.iter().all(|state| *state == states[0]));
        assert!(states[0].iter().all(|(_, pairs)| !pairs.is_empty()), "the log wrote both trees");
    }

    #[test]
    fn a_crash_after_any_change_recovers_to_the_same_state() {
        let entries = log(11, 60);
        let reference = Arc::new(Recording::default());
        let mut machine = KvMachine::new(Arc::clone(&reference) as SharedKv, &TREES).unwrap();
        apply_all(&mut machine, &entries);
        let expected = contents(reference.as_ref());
        let changes = reference.log.lock().unwrap().clone();
        // Every prefix of the store's changes is a state a crash can leave behind.
        for survived in 0..=changes.len() {
            let kv: SharedKv = Arc::new(MemoryKv::new());
            for (tree, batch) in &changes[..survived] {
                kv.apply(tree, batch).unwrap();
            }
            let mut restarted = KvMachine::new(Arc::clone(&kv), &TREES).unwrap();
            apply_all(&mut restarted, &entries);
            assert_eq!(contents(kv.as_ref()), expected, "after a crash following change {survived}");
        }
    }

    #[test]
    fn a_snapshot_restores_the_state_and_the_log_goes_on_from_it() {
        let entries = log(3, 100);
        let kv: SharedKv = Arc::new(MemoryKv::new());
        let mut machine = KvMachine::new(Arc::clone(&kv), &TREES).unwrap();
        apply_all(&mut machine, &entries[..40]);
        let snapshot = machine.snapshot().unwrap();

        let seen = Arc::new(Mutex::new(0));
        let counter = Arc::clone(&seen);
        let other: SharedKv = Arc::new(MemoryKv::new());
        other.put("cache", b"stale", b"left from before").unwrap();
        let mut restored =
            KvMachine::new(Arc::clone(&other), &TREES).unwrap().observed_by(move |_| *counter.lock().unwrap() += 1);
        restored.restore(40, &snapshot).unwrap();
        assert_eq!(restored.applied(), 40);
        assert_eq!(contents(other.as_ref()), contents(kv.as_ref()));
        apply_all(&mut machine, &entries);
        apply_all(&mut restored, &entries);
        assert_eq!(contents(other.as_ref()), contents(kv.as_ref()));
        assert_eq!(*seen.lock().unwrap(), 1 + 60);
        // Entries applied but not yet through are not in the store.
        let more = log(5, 1);
        restored.apply(101, &more[0]).unwrap();
        assert_eq!(restored.applied(), 100);
        assert_eq!(KvMachine::new(other, &TREES).unwrap().applied(), 100);
    }

    #[test]
    fn bad_entries_are_refused_with_a_reason() {
        let kv: SharedKv = Arc::new(MemoryKv::new());
        let mut machine = KvMachine::new(kv, &TREES).unwrap();
        let good = Write { tree: "cache".into(), batch: Batch::default() }.encode();
        for cut in 0..good.len() {
            assert!(machine.apply(1, &good[..cut]).is_err(), "truncated at {cut}");
        }
        assert!(machine.apply(1, &good).is_ok());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(machine.apply(1, &trailing).unwrap_err().contains("after the end"));
        let elsewhere = Write { tree: "secrets".into(), batch: Batch::default() }.encode();
        assert!(machine.apply(1, &elsewhere).unwrap_err().contains("not replicated"));
        assert!(machine.restore(1, &[9]).unwrap_err().contains("version 9"));
    }
}
