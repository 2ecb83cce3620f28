//! The raft log, hard state and snapshot, kept in the `raft` tree of the node's key-value
//! store and mirrored in memory (the log is bounded by compaction, so the mirror is too).
//!
//! Keys: `hard` (the hard state), `conf` (the voters), `snapshot` (the latest snapshot, its
//! metadata and the state machine's bytes), `truncated` (index and term of the last entry
//! compacted away) and `e` + the big-endian index of each entry. Every change of one Ready is
//! one batch, synced before the messages that depend on it are sent.

use std::cell::Cell;

use kiln_kv::{Batch, SharedKv};
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::RaftError;

const TREE: &str = "raft";
const HARD: &[u8] = b"hard";
const CONF: &[u8] = b"conf";
const SNAPSHOT: &[u8] = b"snapshot";
const TRUNCATED: &[u8] = b"truncated";
const ENTRY: &[u8] = b"e";

fn entry_key(index: u64) -> Vec<u8> {
    let mut key = ENTRY.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

fn encode(message: &dyn protobuf::Message) -> Vec<u8> {
    message.write_to_bytes().expect("raft's messages have no required fields")
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> Result<M, RaftError> {
    M::parse_from_bytes(bytes).map_err(|error| RaftError::Corrupt(format!("{what}: {error}")))
}

/// raft-rs's [`raft::Storage`] over a [`SharedKv`]: owned by the node's thread, which alone
/// changes it.
pub struct KvStorage {
    kv: SharedKv,
    hard: HardState,
    conf: ConfState,
    snapshot: Snapshot,
    /// Index and term of the last entry no longer in the log (0, 0 before any compaction).
    truncated: (u64, u64),
    /// The log from `truncated.0 + 1` on.
    entries: Vec<Entry>,
    /// Set when a peer needed a newer snapshot than the one kept.
    wants_snapshot: Cell<bool>,
}

impl KvStorage {
    /// Opens the log kept in `kv`, or starts one whose voters are `voters`. A log started with
    /// other voters is refused: membership changes are not supported, every member is listed
    /// in the configuration from the start.
    pub fn open(kv: SharedKv, voters: &[u64]) -> Result<KvStorage, RaftError> {
        let mut storage = KvStorage {
            kv,
            hard: HardState::default(),
            conf: ConfState::default(),
            snapshot: Snapshot::default(),
            truncated: (0, 0),
            entries: Vec::new(),
            wants_snapshot: Cell::new(false),
        };
        let mut sorted = voters.to_vec();
        sorted.sort_unstable();
        match storage.kv.get(TREE, CONF)? {
            Some(bytes) => {
                storage.conf = decode("the raft voters", &bytes)?;
                let mut kept = storage.conf.get_voters().to_vec();
                kept.sort_unstable();
                if kept != sorted {
                    return Err(RaftError::Members { kept, configured: sorted });
                }
            }
            None => {
                storage.conf.set_voters(sorted);
                storage.kv.put(TREE, CONF, &encode(&storage.conf))?;
            }
        }
        if let Some(bytes) = storage.kv.get(TREE, HARD)? {
            storage.hard = decode("the raft hard state", &bytes)?;
        }
        if let Some(bytes) = storage.kv.get(TREE, SNAPSHOT)? {
            storage.snapshot = decode("the raft snapshot", &bytes)?;
        }
        if let Some(bytes) = storage.kv.get(TREE, TRUNCATED)? {
            let array: [u8; 16] =
                bytes.try_into().map_err(|_| RaftError::Corrupt("the raft log's truncation record".into()))?;
            let (index, term) = array.split_at(8);
            storage.truncated = (
                u64::from_be_bytes(index.try_into().expect("8 bytes")),
                u64::from_be_bytes(term.try_into().expect("8 bytes")),
            );
        }
        for (key, value) in storage.kv.scan_prefix(TREE, ENTRY)? {
            let entry: Entry = decode("a raft log entry", &value)?;
            let expected = storage.truncated.0 + 1 + storage.entries.len() as u64;
            if key != entry_key(entry.index) || entry.index != expected {
                return Err(RaftError::Corrupt(format!(
                    "the raft log has entry {} where {expected} was expected",
                    entry.index
                )));
            }
            storage.entries.push(entry);
        }
        Ok(storage)
    }

    /// The latest snapshot kept (empty before the first).
    pub fn snapshot_kept(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Whether a peer asked for a snapshot newer than the one kept.
    pub fn wants_snapshot(&self) -> bool {
        self.wants_snapshot.get()
    }

    /// The hard state as persisted.
    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.truncated.0, |entry| entry.index)
    }

    /// Appends `entries` (replacing any conflicting suffix) and records `hard`, in one batch,
    /// synced when `sync`.
    pub fn append(&mut self, entries: &[Entry], hard: Option<&HardState>, sync: bool) -> Result<(), RaftError> {
        let mut batch = Batch::default();
        if let Some(first) = entries.first() {
            assert!(
                first.index > self.truncated.0 && first.index <= self.last() + 1,
                "raft appended entry {} to a log holding {}..={}",
                first.index,
                self.truncated.0 + 1,
                self.last()
            );
            for index in first.index..=self.last() {
                batch.delete(entry_key(index));
            }
            for entry in entries {
                batch.put(entry_key(entry.index), encode(entry));
            }
            let keep = (first.index - self.truncated.0 - 1) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(hard) = hard {
            batch.put(HARD, encode(hard));
            self.hard = hard.clone();
        }
        self.write(&batch, sync)
    }

    /// Records a new commit index (from a `LightReady`); synced with the next batch.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), RaftError> {
        self.hard.commit = commit;
        let mut batch = Batch::default();
        batch.put(HARD, encode(&self.hard));
        self.write(&batch, false)
    }

    /// Replaces the log by a snapshot received from the leader.
    pub fn install(&mut self, snapshot: &Snapshot) -> Result<(), RaftError> {
        let meta = snapshot.get_metadata();
        let mut batch = Batch::default();
        for index in self.truncated.0 + 1..=self.last() {
            batch.delete(entry_key(index));
        }
        self.entries.clear();
        self.truncated = (meta.index, meta.term);
        self.conf = meta.get_conf_state().clone();
        self.hard.term = self.hard.term.max(meta.term);
        self.hard.commit = self.hard.commit.max(meta.index);
        self.snapshot = snapshot.clone();
        batch.put(TRUNCATED, truncation(self.truncated));
        batch.put(CONF, encode(&self.conf));
        batch.put(HARD, encode(&self.hard));
        batch.put(SNAPSHOT, encode(snapshot));
        self.write(&batch, true)
    }

    /// The first index still in the log.
    pub fn first_index_now(&self) -> u64 {
        self.truncated.0 + 1
    }

    /// Drops the entries up to `upto` (applied: the state machine holds what they did).
    pub fn compact(&mut self, upto: u64) -> Result<(), RaftError> {
        if upto <= self.truncated.0 {
            return Ok(());
        }
        assert!(upto <= self.last(), "compacting to {upto}, past the log's end at {}", self.last());
        let term = raft::Storage::term(self, upto)?;
        let mut batch = Batch::default();
        for dropped in self.truncated.0 + 1..=upto {
            batch.delete(entry_key(dropped));
        }
        self.entries.drain(..(upto - self.truncated.0) as usize);
        self.truncated = (upto, term);
        batch.put(TRUNCATED, truncation(self.truncated));
        self.write(&batch, true)
    }

    /// Keeps `data`, the state machine as of the applied entry `index`, as the snapshot a
    /// member far behind receives.
    pub fn keep_snapshot(&mut self, index: u64, data: Vec<u8>) -> Result<(), RaftError> {
        let term = raft::Storage::term(self, index)?;
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf.clone());
        let mut batch = Batch::default();
        batch.put(SNAPSHOT, encode(&snapshot));
        self.snapshot = snapshot;
        self.wants_snapshot.set(false);
        self.write(&batch, true)
    }

    fn write(&self, batch: &Batch, sync: bool) -> Result<(), RaftError> {
        self.kv.apply(TREE, batch)?;
        if sync {
            self.kv.flush()?;
        }
        Ok(())
    }
}

fn truncation((index, term): (u64, u64)) -> Vec<u8> {
    let mut bytes = index.to_be_bytes().to_vec();
    bytes.extend_from_slice(&term.to_be_bytes());
    bytes
}

impl raft::Storage for KvStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard.clone(), self.conf.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= self.last() + 1, "raft asked for entries up to {high}, the log ends at {}", self.last());
        let offset = self.truncated.0 + 1;
        let mut entries = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.truncated.0 {
            return Ok(self.truncated.1);
        }
        if index < self.truncated.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entries.get((index - self.truncated.0 - 1) as usize) {
            Some(entry) => Ok(entry.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let kept = self.snapshot.get_metadata().index;
        // A snapshot older than the log's start leaves a gap: a newer one is made.
        if kept == 0 || kept < request_index || kept < self.truncated.0 {
            self.wants_snapshot.set(true);
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use raft::Storage as _;

    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: format!("{index}").into_bytes().into(), ..Entry::default() }
    }

    #[test]
    fn the_log_survives_reopening_and_conflicts_replace_the_suffix() {
        let kv: SharedKv = Arc::new(kiln_kv::MemoryKv::new());
        let mut storage = KvStorage::open(Arc::clone(&kv), &[3, 1, 2]).unwrap();
        let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 1)).collect();
        let hard = HardState { term: 1, commit: 3, ..HardState::default() };
        storage.append(&entries, Some(&hard), true).unwrap();
        // A new leader overwrites 4 and 5.
        storage.append(&[entry(4, 2)], None, true).unwrap();
        assert_eq!(storage.last_index().unwrap(), 4);
        assert_eq!(storage.term(4).unwrap(), 2);

        let reopened = KvStorage::open(Arc::clone(&kv), &[1, 2, 3]).unwrap();
        assert_eq!(reopened.last_index().unwrap(), 4);
        assert_eq!(reopened.term(3).unwrap(), 1);
        assert_eq!(reopened.term(4).unwrap(), 2);
        assert_eq!(reopened.initial_state().unwrap().hard_state.commit, 3);
        assert_eq!(reopened.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        let fetched = reopened.entries(2, 5, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(fetched.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3, 4]);

        let error = KvStorage::open(kv, &[1, 2]).err().expect("other voters are refused");
        assert!(error.to_string().contains("[1, 2, 3]"), "{error}");
    }

    #[test]
    fn compaction_drops_the_applied_log_and_a_snapshot_answers_for_it() {
        let kv: SharedKv = Arc::new(kiln_kv::MemoryKv::new());
        let mut storage = KvStorage::open(Arc::clone(&kv), &[1]).unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 6)).collect();
        storage.append(&entries, None, true).unwrap();
        assert!(storage.snapshot(1, 2).is_err(), "no snapshot yet");
        assert!(storage.wants_snapshot());
        storage.compact(6).unwrap();
        assert!(storage.wants_snapshot(), "compacting makes no snapshot");
        storage.keep_snapshot(8, b"state at 8".to_vec()).unwrap();
        assert!(!storage.wants_snapshot());
        assert_eq!(storage.first_index().unwrap(), 7);
        assert_eq!(storage.term(6).unwrap(), 2);
        assert!(matches!(storage.term(5), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            storage.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snapshot = storage.snapshot(8, 2).unwrap();
        assert_eq!(snapshot.get_metadata().index, 8);
        assert_eq!(snapshot.get_data(), b"state at 8");

        let reopened = KvStorage::open(Arc::clone(&kv), &[1]).unwrap();
        assert_eq!(reopened.first_index().unwrap(), 7);
        assert_eq!(reopened.last_index().unwrap(), 10);
        assert_eq!(reopened.snapshot_kept().get_data(), b"state at 8");

        // A follower that installs a snapshot drops its whole log.
        let mut follower = KvStorage::open(Arc::new(kiln_kv::MemoryKv::new()), &[1]).unwrap();
        follower.append(&[entry(1, 1)], None, true).unwrap();
        follower.install(&snapshot).unwrap();
        assert_eq!(follower.first_index().unwrap(), 9);
        assert_eq!(follower.last_index().unwrap(), 8);
        assert_eq!(follower.term(8).unwrap(), 2);
        assert_eq!(follower.hard_state().commit, 8);
    }
}
