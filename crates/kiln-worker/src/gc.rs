//! Garbage collection of a worker's store (`[worker.gc]`), `kiln du` and `kiln prune`.
//!
//! The store's records are its layers (each with the blobs kept for it: exports, the blob it
//! was pulled or fetched as), the blobs no layer owns (image manifests and configs, cache
//! configs, context files) and the cache mount directories. A collection removes records
//! nobody holds, least recently used first (docs/gc.md has the policy):
//! - records unused for longer than `keep-duration` go while the store is above
//!   `reserved-space`;
//! - then, while the store is above `max-used-space` or the disk has less than
//!   `min-free-space` free, any record goes, down to `reserved-space`.
//!
//! Invariants: a layer a build or job holds ([`kiln_layer::Hold`]), a cache directory a step
//! mounts and a blob written less than [`BLOB_GRACE`] before the oldest running build began
//! (its uploaded context, a pull in flight) are never removed; one collection or prune runs at a time, and `du` waits for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_layer::LayerId;
use kiln_model::{PruneOptions, PruneReport, RecordKind, UsageRecord};
use kiln_types::{Digest, now_ms};

use crate::StoreError;
use crate::mounts::MountUses;
use crate::stores::Stores;

/// A blob written less than this before the oldest running build began (or since) is kept:
/// it may be that build's uploaded context or pulled image, which it holds no layer of yet.
pub const BLOB_GRACE: Duration = Duration::from_secs(10 * 60);

/// How often a worker applies the policy unasked (the age limit needs it; a build or job that
/// ends applies it when the store may be over a size limit).
pub const GC_INTERVAL: Duration = Duration::from_secs(300);

/// The garbage collection policy as configured; `None` takes the default for the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcPolicy {
    /// Never collect below this many bytes. Default: 10% of the disk, at most 10 GB.
    pub reserved_space: Option<u64>,
    /// Collect above this many bytes. Default: 60% of the disk, at most 100 GB.
    pub max_used_space: Option<u64>,
    /// Collect while the disk has less than this free. Default: no such limit.
    pub min_free_space: Option<u64>,
    /// Records unused for longer than this go even under the limits. Default: 48 hours.
    pub keep_duration: Duration,
}

impl Default for GcPolicy {
    fn default() -> GcPolicy {
        GcPolicy {
            reserved_space: None,
            max_used_space: None,
            min_free_space: None,
            keep_duration: Duration::from_secs(48 * 3600),
        }
    }
}

/// The policy in bytes, for one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcLimits {
    /// Never collect below this.
    pub reserved: u64,
    /// Collect above this.
    pub max_used: u64,
    /// Collect while less than this is free.
    pub min_free: Option<u64>,
    /// Age limit of unused records.
    pub keep_duration: Duration,
}

const GB: u64 = 1_000_000_000;

impl GcPolicy {
    /// The limits on a disk of `disk_size` bytes.
    pub fn limits(&self, disk_size: u64) -> GcLimits {
        GcLimits {
            reserved: self.reserved_space.unwrap_or((disk_size / 10).min(10 * GB)),
            max_used: self.max_used_space.unwrap_or((disk_size / 10 * 6).min(100 * GB)),
            min_free: self.min_free_space,
            keep_duration: self.keep_duration,
        }
    }
}

/// What a collection or prune removed: the totals and the layers peers knew by diff id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Bytes and records freed.
    pub report: PruneReport,
    /// Diff ids of the removed layers (a coordinator must stop sending peers here for them).
    pub evicted: Vec<Digest>,
}

/// Where a record is, to remove it.
#[derive(Debug, Clone)]
enum Target {
    Layer(LayerId),
    Blob(Digest),
    Mount(PathBuf),
}

#[derive(Debug, Clone)]
struct Entry {
    record: UsageRecord,
    target: Target,
}

/// A worker's garbage collector: its store, its cache directories and its limits.
pub struct Gc {
    stores: Arc<Stores>,
    mounts: Arc<MountUses>,
    cache_root: PathBuf,
    /// The state directory, whose disk the limits are about.
    disk: PathBuf,
    limits: GcLimits,
    /// One collection, prune or usage listing at a time.
    running: Arc<tokio::sync::Mutex<()>>,
    /// The store's size as the last collection or prune measured it (0: none has run).
    used: std::sync::atomic::AtomicU64,
}

impl Gc {
    pub(crate) fn new(
        stores: Arc<Stores>,
        mounts: Arc<MountUses>,
        cache_root: PathBuf,
        disk: PathBuf,
        policy: &GcPolicy,
    ) -> Gc {
        let limits = policy.limits(disk_size(&disk));
        Gc { stores, mounts, cache_root, disk, limits, running: Arc::default(), used: Default::default() }
    }

    /// A collector of stores without cache mounts (a coordinator's: uploaded contexts,
    /// result layers brought in for file exports, base images pulled for image exports).
    pub fn for_stores(stores: Arc<Stores>, kv: kiln_kv::SharedKv, root: &Path, policy: &GcPolicy) -> Gc {
        let cache_root = root.join("cache");
        Gc::new(stores, Arc::new(MountUses::new(kv)), cache_root, root.to_path_buf(), policy)
    }

    /// The limits in force.
    pub fn limits(&self) -> GcLimits {
        self.limits
    }

    /// The store's size as the last collection or prune measured it (0: none has run).
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records what a collection or prune left: `records` removed, `reclaimed` bytes, `used`
    /// bytes now.
    fn measured(&self, records: u64, reclaimed: u64, used: u64) {
        self.used.store(used, std::sync::atomic::Ordering::Relaxed);
        kiln_telemetry::metrics().collected(records, reclaimed, used);
    }

    /// Every record of the store (`worker` left empty), after any collection under way.
    pub async fn usage(self: &Arc<Self>) -> Result<Vec<UsageRecord>, StoreError> {
        let _running = self.running.lock().await;
        let gc = Arc::clone(self);
        let entries = tokio::task::spawn_blocking(move || gc.entries()).await??;
        Ok(entries.into_iter().map(|e| e.record).collect())
    }

    /// Removes what `options` selects.
    pub async fn prune(self: &Arc<Self>, options: PruneOptions) -> Result<Collected, StoreError> {
        let _running = self.running.lock().await;
        let gc = Arc::clone(self);
        tokio::task::spawn_blocking(move || gc.prune_now(&options)).await?
    }

    /// Applies the policy now.
    pub async fn collect(self: &Arc<Self>) -> Result<Collected, StoreError> {
        let running = Arc::clone(&self.running).lock_owned().await;
        let gc = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _running = running;
            gc.collect_now()
        })
        .await?
    }

    /// After a build or job: applies the policy in the background, starting now, so that a
    /// `usage` or `prune` called after this returns sees the result. The handle gives what
    /// was removed. (Listing is cheap after the first time: a layer's directory is measured
    /// once, a cache directory again only after a step used it.)
    pub async fn collect_soon(self: &Arc<Self>) -> tokio::task::JoinHandle<Result<Collected, StoreError>> {
        let running = Arc::clone(&self.running).lock_owned().await;
        let gc = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _running = running;
            gc.collect_now()
        })
    }

    /// Applies the policy now and every [`GC_INTERVAL`] until `stop` (a standalone daemon;
    /// a cluster worker does it in its session, to tell the coordinator what went).
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut ticks = tokio::time::interval(GC_INTERVAL);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Err(error) = self.collect().await {
                        tracing::warn!("garbage collection: {error}");
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    }

    /// Free bytes on the state directory's disk now (one statvfs).
    pub fn free_disk(&self) -> u64 {
        free_space(&self.disk)
    }

    /// Whether the disk is below `min-free-space` (one statvfs): a step should wait for a
    /// collection before it writes.
    pub fn disk_low(&self) -> bool {
        self.limits.min_free.is_some_and(|min| free_space(&self.disk) < min)
    }

    fn collect_now(&self) -> Result<Collected, StoreError> {
        let (mut entries, mut total) = self.removable()?;
        let mut free = free_space(&self.disk);
        let now = now_ms();
        let keep = self.limits.keep_duration.as_millis() as u64;
        let mut collected = Collected::default();
        entries.sort_by_key(|e| e.record.last_used.unwrap_or(0));
        for entry in entries {
            if total <= self.limits.reserved {
                break;
            }
            let old = now.saturating_sub(entry.record.last_used.unwrap_or(0)) > keep;
            let over = total > self.limits.max_used || self.limits.min_free.is_some_and(|min| free < min);
            if !old && !over {
                // Least recently used first: nothing after this one is older.
                break;
            }
            if let Some(freed) = self.remove(&entry, &mut collected)? {
                total = total.saturating_sub(freed);
                free += freed;
            }
        }
        self.measured(collected.report.records, collected.report.reclaimed, total);
        if collected.report.records > 0 {
            tracing::info!(
                records = collected.report.records,
                bytes = collected.report.reclaimed,
                "garbage collection: {} bytes used now",
                total
            );
        }
        Ok(collected)
    }

    fn prune_now(&self, options: &PruneOptions) -> Result<Collected, StoreError> {
        let (mut entries, mut total) = self.removable()?;
        let now = now_ms();
        entries.retain(|e| options.all || e.record.kind != RecordKind::CacheMount);
        if let Some(until) = options.until {
            let until = until.as_millis() as u64;
            entries.retain(|e| now.saturating_sub(e.record.last_used.unwrap_or(0)) >= until);
        }
        entries.sort_by_key(|e| e.record.last_used.unwrap_or(0));
        let mut collected = Collected::default();
        for entry in entries {
            if options.keep_storage.is_some_and(|keep| total <= keep) {
                break;
            }
            if let Some(freed) = self.remove(&entry, &mut collected)? {
                total = total.saturating_sub(freed);
            }
        }
        self.measured(collected.report.records, collected.report.reclaimed, total);
        Ok(collected)
    }

    /// The records nobody holds, and the size of the whole store.
    fn removable(&self) -> Result<(Vec<Entry>, u64), StoreError> {
        let entries = self.entries()?;
        let total = entries.iter().map(|e| e.record.size).sum();
        Ok((entries.into_iter().filter(|e| !e.record.in_use).collect(), total))
    }

    /// Removes one record, unless it was taken into use since it was listed; returns the
    /// bytes freed.
    fn remove(&self, entry: &Entry, collected: &mut Collected) -> Result<Option<u64>, StoreError> {
        let freed = match &entry.target {
            Target::Layer(id) => {
                let removed = self.stores.snapshots.remove_layer(id, &self.stores.cas)?;
                removed.map(|removed| {
                    collected.evicted.extend(removed.diff_id);
                    removed.size
                })
            }
            Target::Blob(digest) => {
                self.stores.cas.delete(digest)?;
                Some(entry.record.size)
            }
            Target::Mount(dir) => {
                let trash = self.cache_root.join(format!(".trash-{}", entry.record.id.replace('/', "-")));
                let moved = self.mounts.remove_unused(dir, &entry.record.id, || std::fs::rename(dir, &trash));
                match moved {
                    Ok(true) => {
                        std::fs::remove_dir_all(&trash).map_err(|source| StoreError::Io { path: trash, source })?;
                        Some(entry.record.size)
                    }
                    Ok(false) => None,
                    Err(source) => return Err(StoreError::Io { path: dir.clone(), source }),
                }
            }
        };
        if let Some(freed) = freed {
            collected.report.reclaimed += freed;
            collected.report.records += 1;
        }
        Ok(freed)
    }

    /// Every record: layers, blobs no layer owns, cache directories.
    fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let (snapshots, cas) = (&self.stores.snapshots, &self.stores.cas);
        let mut entries = Vec::new();
        let mut owned = std::collections::HashSet::new();
        for layer in snapshots.usage(cas)? {
            owned.extend(layer.blobs.iter().copied());
            let usage = layer.usage.unwrap_or_default();
            entries.push(Entry {
                record: UsageRecord {
                    id: layer.id.to_string(),
                    kind: RecordKind::Layer,
                    size: layer.size,
                    last_used: layer.usage.map(|u| u.last_used),
                    usage_count: usage.usage_count,
                    // A layer being made (no record yet) is as good as held.
                    in_use: layer.in_use || layer.usage.is_none(),
                    worker: String::new(),
                },
                target: Target::Layer(layer.id),
            });
        }
        let now = now_ms();
        let oldest = snapshots.oldest_hold().unwrap_or(now).min(now);
        let grace = oldest.saturating_sub(BLOB_GRACE.as_millis() as u64);
        for blob in cas.list()? {
            if owned.contains(&blob.digest) {
                continue;
            }
            let written = modified_ms(&cas.path(&blob.digest));
            entries.push(Entry {
                record: UsageRecord {
                    id: blob.digest.to_string(),
                    kind: RecordKind::Source,
                    size: blob.size,
                    last_used: written,
                    usage_count: 0,
                    in_use: written.is_none_or(|at| at > grace),
                    worker: String::new(),
                },
                target: Target::Blob(blob.digest),
            });
        }
        for dir in mount_dirs(&self.cache_root)? {
            let relative = dir.strip_prefix(&self.cache_root).unwrap_or(&dir).display().to_string();
            let recorded = self.mounts.recorded(&relative);
            let size = match self.mounts.measured(&dir) {
                Some(size) => size,
                None => {
                    let size = kiln_layer::disk_usage(&dir)?;
                    self.mounts.remember_size(&dir, size);
                    size
                }
            };
            entries.push(Entry {
                record: UsageRecord {
                    id: relative,
                    kind: RecordKind::CacheMount,
                    size,
                    last_used: (recorded.last_used > 0).then_some(recorded.last_used),
                    usage_count: recorded.usage_count,
                    in_use: self.mounts.in_use(&dir),
                    worker: String::new(),
                },
                target: Target::Mount(dir),
            });
        }
        Ok(entries)
    }
}

/// The cache mount directories, `ROOT/<digest>/<instance>`.
fn mount_dirs(root: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let mut dirs = Vec::new();
    let ids = match std::fs::read_dir(root) {
        Ok(ids) => ids,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(dirs),
        Err(e) => return Err(io(root)(e)),
    };
    for id in ids {
        let id = id.map_err(io(root))?;
        let name = id.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !id.path().is_dir() {
            continue;
        }
        for instance in std::fs::read_dir(id.path()).map_err(io(&id.path()))? {
            let instance = instance.map_err(io(&id.path()))?;
            if instance.file_name().to_string_lossy().parse::<u32>().is_ok() && instance.path().is_dir() {
                dirs.push(instance.path());
            }
        }
    }
    Ok(dirs)
}

fn modified_ms(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok()?;
    modified.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64)
}

/// Free bytes on the filesystem holding `path` (for unprivileged users: what they may use).
pub fn free_space(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path).map(|s| s.blocks_available() * s.fragment_size()).unwrap_or(0)
}

/// The size of the filesystem holding `path`.
fn disk_size(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path).map(|s| s.blocks() * s.fragment_size()).unwrap_or(0)
}
