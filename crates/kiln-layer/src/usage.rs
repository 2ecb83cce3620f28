//! What garbage collection needs from the snapshot store: when each layer was last used, how
//! much space it takes, and which layers are held.
//!
//! A [`Hold`] keeps layers (a build's, or a job's) from being removed until it is released;
//! releasing it records the use (an imported layer's use is recorded when it is imported).
//! A layer is removable only when no hold has it, it has a usage record (a layer committed a
//! moment ago has none until the hold that made it is released) and it was last used before
//! the oldest live hold began: a build running since
//! then may still reach it through another build's result (deduplication) without having
//! held it yet. Removal and holding take one lock, so a layer is never both.

use kiln_kv::SharedKv;
use kiln_types::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::snapshot::LayerId;
use crate::{LayerError, io_at};

/// Usage records of layers, by layer id.
pub(crate) const USAGE_TREE: &str = "layer-usage";

/// When a layer was last used and how often, as recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerUse {
    /// The last use, in milliseconds since the Unix epoch.
    pub last_used: u64,
    /// How many holds had it.
    pub usage_count: u64,
    /// The layer directory's size on disk, once measured (layers never change).
    pub dir_size: Option<u64>,
}

/// The holds of one store: counts per layer and the start times of live holds.
#[derive(Default)]
pub(crate) struct Holds {
    counts: HashMap<LayerId, usize>,
    starts: BTreeMap<u64, usize>,
}

impl Holds {
    /// Whether a layer last used at `last_used` may go: nobody holds it and every live hold
    /// began after that use.
    pub(crate) fn removable(&self, id: &LayerId, last_used: u64) -> bool {
        !self.counts.contains_key(id) && self.starts.keys().next().is_none_or(|oldest| last_used < *oldest)
    }

    pub(crate) fn is_held(&self, id: &LayerId) -> bool {
        self.counts.contains_key(id)
    }

    /// When the oldest live hold began, if any lives.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.starts.keys().next().copied()
    }
}

/// The state a [`Hold`] shares with its store.
pub(crate) struct Shared {
    pub(crate) holds: Mutex<Holds>,
    pub(crate) kv: SharedKv,
    pub(crate) layers: PathBuf,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn record(&self, id: &LayerId) -> Result<Option<LayerUse>, LayerError> {
        let bytes = self.kv.get(USAGE_TREE, id.as_str().as_bytes())?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    pub(crate) fn put_record(&self, id: &LayerId, record: &LayerUse) -> Result<(), LayerError> {
        self.kv.put(USAGE_TREE, id.as_str().as_bytes(), &serde_json::to_vec(record).expect("serialisable"))?;
        Ok(())
    }

    /// Records a use of `id` now (without counting a hold).
    pub(crate) fn touch(&self, id: &LayerId, count: bool) -> Result<(), LayerError> {
        let mut record = self.record(id)?.unwrap_or_default();
        record.last_used = now_ms().max(record.last_used);
        record.usage_count += u64::from(count);
        self.put_record(id, &record)
    }
}

/// Layers kept from garbage collection until released (or dropped); each use is recorded
/// on release. Cheap to share: a build holds one for its whole life.
pub struct Hold {
    shared: Arc<Shared>,
    started: u64,
    held: Mutex<Option<HashSet<LayerId>>>,
}

impl Hold {
    pub(crate) fn new(shared: Arc<Shared>) -> Hold {
        let started = now_ms();
        *shared.lock().starts.entry(started).or_default() += 1;
        Hold { shared, started, held: Mutex::new(Some(HashSet::new())) }
    }

    /// Holds `ids`, each of which must still be in the store: the first one that is gone is
    /// the error (the ones before it are held). Holding a layer twice is once.
    pub fn add(&self, ids: &[LayerId]) -> Result<(), LayerId> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = held.as_mut() else {
            // Released: nothing more is held.
            return ids.first().map_or(Ok(()), |id| Err(id.clone()));
        };
        let mut holds = self.shared.lock();
        for id in ids {
            if held.contains(id) {
                continue;
            }
            if !self.shared.layers.join(id.as_str()).is_dir() {
                return Err(id.clone());
            }
            held.insert(id.clone());
            *holds.counts.entry(id.clone()).or_default() += 1;
        }
        Ok(())
    }

    /// Lets the layers go, recording their use now. Later calls (and the drop) do nothing.
    pub fn release(&self) {
        let Some(held) = self.held.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let mut holds = self.shared.lock();
        for id in &held {
            // A lost record only makes the layer look older than it is.
            let _ = self.shared.touch(id, true);
            if let Some(count) = holds.counts.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    holds.counts.remove(id);
                }
            }
        }
        if let Some(count) = holds.starts.get_mut(&self.started) {
            *count -= 1;
            if *count == 0 {
                holds.starts.remove(&self.started);
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("started", &self.started).finish_non_exhaustive()
    }
}

/// The space a directory tree takes on disk (allocated blocks, not apparent sizes), not
/// following symlinks. Entries that vanish during the walk count nothing.
pub fn disk_usage(dir: &Path) -> Result<u64, LayerError> {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_at(&dir)(e)),
        };
        total += fs::symlink_metadata(&dir).map(|m| m.blocks() * 512).unwrap_or(0);
        for entry in entries {
            let entry = entry.map_err(io_at(&dir))?;
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
}
