//! The snapshot store: layer directories on disk, stacked with overlayfs.
//!
//! A snapshot is a chain of layers, bottom first. Running a step mounts the chain as overlay
//! lower directories with a fresh upper directory; committing moves the upper directory into
//! the store as a new layer, whiteouts and opaque directories already in overlay format.
//! Layers never change after they are committed, so any number of mounts may share them.
//!
//! Layout under the root: `l/<id>` layers, `a/<n>` active mounts (upper, work, merged),
//! `e0` and `e1` empty directories for chains too short for overlayfs.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_cas::BlobStore;
use kiln_kv::SharedKv;
use kiln_types::Digest;
use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

use crate::export::{Compression, LayerBlob, OPAQUE_XATTR, TarOptions, export_layer};
use crate::unpack::unpack_layer;
use crate::usage::{Hold, LayerUse, Shared, USAGE_TREE, disk_usage};
use crate::{LayerError, io_at};

const LAYERS_TREE: &str = "layers";
const DIFF_IDS_TREE: &str = "layer-diff-ids";
const BLOBS_TREE: &str = "layer-blobs";
/// The blob a layer was pulled as, by diff id: exported as is, never re-encoded.
const ORIGINS_TREE: &str = "layer-origins";
/// Mount options must fit in one page; leave room for the upper and work paths.
const MAX_MOUNT_OPTIONS: usize = 3800;

/// The most lower directories one overlay mount stacks (overlayfs's `OVL_MAX_STACK`).
pub const MAX_LAYERS: usize = 500;

/// The id of a layer in the store: 16 hex characters, short to keep overlay options small.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LayerId(String);

impl LayerId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an id as written by [`LayerId::as_str`].
    pub fn parse(text: &str) -> Option<LayerId> {
        (text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit())).then(|| LayerId(text.to_string()))
    }

    fn from_digest(digest: &Digest) -> LayerId {
        LayerId(digest.hex()[..16].to_string())
    }
}

impl std::fmt::Display for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the store records about a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Its diff id, when known (imported layers, or once exported).
    pub diff_id: Option<Digest>,
}

/// A layer as garbage collection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerUsage {
    /// The layer.
    pub id: LayerId,
    /// Its diff id, when known (imported, or exported once).
    pub diff_id: Option<Digest>,
    /// Its directory plus the blobs kept for it (exports, the blob it was pulled as).
    pub size: u64,
    /// The blobs kept for it.
    pub blobs: Vec<Digest>,
    /// Its use as recorded; `None` for a layer being made right now.
    pub usage: Option<LayerUse>,
    /// Whether a hold has it.
    pub in_use: bool,
}

/// What removing a layer freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// Its diff id, when known: peers and the coordinator knew it by that.
    pub diff_id: Option<Digest>,
    /// The bytes freed (directory and blobs).
    pub size: u64,
}

/// Layer directories plus the overlay mounts over them.
pub struct SnapshotStore {
    root: PathBuf,
    kv: SharedKv,
    shared: Arc<Shared>,
}

static MOUNT_COUNTER: AtomicU64 = AtomicU64::new(0);

impl SnapshotStore {
    /// Opens the store, unmounting and removing whatever a crashed process left active.
    pub fn open(root: &Path, kv: SharedKv) -> Result<SnapshotStore, LayerError> {
        let shared = Arc::new(Shared { holds: Default::default(), kv: kv.clone(), layers: root.join("l") });
        let store = SnapshotStore { root: root.to_path_buf(), kv, shared };
        let active = root.join("a");
        if active.exists() {
            for entry in fs::read_dir(&active).map_err(io_at(&active))? {
                let dir = entry.map_err(io_at(&active))?.path();
                unmount_quietly(&dir.join("m"));
                fs::remove_dir_all(&dir).map_err(io_at(&dir))?;
            }
        }
        let trash = root.join("trash");
        if trash.exists() {
            fs::remove_dir_all(&trash).map_err(io_at(&trash))?;
        }
        for dir in ["l", "a", "e0", "e1", "trash"] {
            let dir = root.join(dir);
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        store.record_orphans()?;
        Ok(store)
    }

    /// Gives every layer without a usage record one (a process stopped before the hold that
    /// made it was released, or a store from before records), dated by its directory, and
    /// drops records whose layer is gone. Nothing runs yet, so no layer is being made.
    fn record_orphans(&self) -> Result<(), LayerError> {
        for id in self.layer_ids()? {
            if self.shared.record(&id)?.is_none() {
                let modified = fs::metadata(self.layer_path(&id)).and_then(|m| m.modified()).ok();
                let last_used =
                    modified.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis() as u64);
                self.shared.put_record(&id, &LayerUse { last_used, ..LayerUse::default() })?;
            }
        }
        for (key, _) in self.kv.scan_prefix(USAGE_TREE, b"")? {
            let id = LayerId::parse(&String::from_utf8_lossy(&key));
            if id.is_none_or(|id| !self.has_layer(&id)) {
                self.kv.delete(USAGE_TREE, &key)?;
            }
        }
        Ok(())
    }

    /// The ids of the layers in the store.
    fn layer_ids(&self) -> Result<Vec<LayerId>, LayerError> {
        let dir = self.root.join("l");
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let entry = entry.map_err(io_at(&dir))?;
            if let Some(id) = LayerId::parse(&entry.file_name().to_string_lossy()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// When the oldest live hold began (ms since the epoch), if any lives: blobs written
    /// shortly before it may be that build's (an uploaded context).
    pub fn oldest_hold(&self) -> Option<u64> {
        self.shared.lock().oldest()
    }

    /// A new, empty hold: layers added to it stay until it is released (or dropped).
    pub fn hold(&self) -> Hold {
        Hold::new(Arc::clone(&self.shared))
    }

    /// Every layer with its size, use and whether it is held. Sizes of directories are
    /// measured once (layers never change); blobs are looked up each time.
    pub fn usage(&self, cas: &BlobStore) -> Result<Vec<LayerUsage>, LayerError> {
        let mut layers = Vec::new();
        for id in self.layer_ids()? {
            let mut usage = self.shared.record(&id)?;
            let dir_size = match usage.and_then(|u| u.dir_size) {
                Some(size) => size,
                None => {
                    let size = disk_usage(&self.layer_path(&id))?;
                    // Recorded only for a layer that has a record: one being made has none.
                    let holds = self.shared.lock();
                    if let Some(record) = self.shared.record(&id)? {
                        let record = LayerUse { dir_size: Some(size), ..record };
                        self.shared.put_record(&id, &record)?;
                        usage = Some(record);
                    }
                    drop(holds);
                    size
                }
            };
            let (diff_id, blobs) = self.layer_blobs(&id)?;
            let blob_size: u64 = blobs.iter().filter_map(|b| cas.info(b).ok()).map(|info| info.size).sum();
            let in_use = self.shared.lock().is_held(&id);
            layers.push(LayerUsage { id, diff_id, size: dir_size + blob_size, blobs, usage, in_use });
        }
        Ok(layers)
    }

    /// A layer's diff id, when known, and the blobs kept for it: its exports, the blob it was
    /// pulled or fetched as, and its uncompressed tar (what peers fetch).
    fn layer_blobs(&self, id: &LayerId) -> Result<(Option<Digest>, Vec<Digest>), LayerError> {
        let mut diff_id = self.record(id)?.and_then(|r| r.diff_id);
        let mut blobs = Vec::new();
        for (_, value) in self.kv.scan_prefix(BLOBS_TREE, format!("{id}/").as_bytes())? {
            if let Ok(blob) = serde_json::from_slice::<LayerBlob>(&value) {
                diff_id.get_or_insert(blob.diff_id);
                blobs.push(blob.digest);
            }
        }
        if let Some(diff_id) = diff_id {
            let origin = self.kv.get(ORIGINS_TREE, diff_id.hex().as_bytes())?;
            if let Some(origin) = origin.and_then(|bytes| serde_json::from_slice::<LayerBlob>(&bytes).ok()) {
                blobs.push(origin.digest);
            }
            blobs.push(diff_id);
        }
        blobs.sort();
        blobs.dedup();
        Ok((diff_id, blobs))
    }

    /// Removes a layer, its records and the blobs kept for it, unless it is held or was used
    /// since the oldest live hold began (then `None`). The directory leaves the store at once
    /// (renamed away under the hold lock) and is deleted after.
    pub fn remove_layer(&self, id: &LayerId, cas: &BlobStore) -> Result<Option<Removed>, LayerError> {
        let holds = self.shared.lock();
        let Some(usage) = self.shared.record(id)? else { return Ok(None) };
        if !holds.removable(id, usage.last_used) {
            return Ok(None);
        }
        let (diff_id, blobs) = self.layer_blobs(id)?;
        let dir = self.layer_path(id);
        let trash = self.root.join("trash").join(format!("{id}-{}", MOUNT_COUNTER.fetch_add(1, Ordering::Relaxed)));
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&dir)(e)),
        }
        let mut size = usage.dir_size.unwrap_or(0);
        for blob in &blobs {
            size += cas.info(blob).map(|info| info.size).unwrap_or(0);
            cas.delete(blob)?;
        }
        for (key, _) in self.kv.scan_prefix(BLOBS_TREE, format!("{id}/").as_bytes())? {
            self.kv.delete(BLOBS_TREE, &key)?;
        }
        if let Some(diff_id) = diff_id {
            let key = diff_id.hex();
            if self.kv.get(DIFF_IDS_TREE, key.as_bytes())?.is_some_and(|owner| owner == id.as_str().as_bytes()) {
                self.kv.delete(DIFF_IDS_TREE, key.as_bytes())?;
            }
            self.kv.delete(ORIGINS_TREE, key.as_bytes())?;
        }
        self.kv.delete(LAYERS_TREE, id.as_str().as_bytes())?;
        self.kv.delete(USAGE_TREE, id.as_str().as_bytes())?;
        drop(holds);
        if usage.dir_size.is_none() {
            size += disk_usage(&trash)?;
        }
        fs::remove_dir_all(&trash).map_err(io_at(&trash))?;
        Ok(Some(Removed { diff_id, size }))
    }

    /// The directory holding a layer's files.
    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.root.join("l").join(id.as_str())
    }

    /// Whether the layer is present.
    pub fn has_layer(&self, id: &LayerId) -> bool {
        self.layer_path(id).is_dir()
    }

    /// The layer already unpacked from a tar with this diff id, if any. Finding it is a use:
    /// it stays while the holds live now do (the caller holds it next).
    pub fn layer_for_diff_id(&self, diff_id: &Digest) -> Result<Option<LayerId>, LayerError> {
        let found = self.kv.get(DIFF_IDS_TREE, diff_id.hex().as_bytes())?;
        let Some(id) = found.and_then(|id| LayerId::parse(&String::from_utf8_lossy(&id))) else { return Ok(None) };
        let _holds = self.shared.lock();
        if !self.has_layer(&id) {
            return Ok(None);
        }
        if self.shared.record(&id)?.is_some() {
            self.shared.touch(&id, false)?;
        }
        Ok(Some(id))
    }

    /// Unpacks a layer tar (any compression) into the store, once: a layer with the same diff
    /// id is reused. With `expected_diff_id`, content that hashes differently is rejected.
    pub fn import_layer(
        &self,
        reader: impl std::io::Read,
        expected_diff_id: Option<&Digest>,
    ) -> Result<LayerId, LayerError> {
        if let Some(diff_id) = expected_diff_id
            && let Some(id) = self.layer_for_diff_id(diff_id)?
        {
            return Ok(id);
        }
        let staging = self.new_active_dir()?;
        let target = staging.join("u");
        fs::create_dir(&target).map_err(io_at(&target))?;
        let result = unpack_layer(reader, &target).and_then(|stats| {
            if let Some(expected) = expected_diff_id
                && *expected != stats.diff_id
            {
                return Err(LayerError::DiffIdMismatch { expected: *expected, actual: stats.diff_id });
            }
            self.publish(&target, LayerId::from_digest(&stats.diff_id), Some(stats.diff_id))
        });
        let _ = fs::remove_dir_all(&staging);
        result
    }

    /// Mounts the chain read-write over a fresh upper directory.
    pub fn prepare(&self, chain: &[LayerId]) -> Result<ActiveSnapshot, LayerError> {
        let mut lowers = self.lowerdirs(chain)?;
        let dir = self.new_active_dir()?;
        let (upper, work, merged) = (dir.join("u"), dir.join("w"), dir.join("m"));
        for path in [&upper, &work, &merged] {
            fs::create_dir(path).map_err(io_at(path))?;
        }
        if chain.is_empty() {
            lowers = vec![self.root.join("e0")];
        }
        let mut active = ActiveSnapshot { dir, chain: chain.to_vec(), mounted: false };
        mount_overlay(&merged, &lowers, Some((&upper, &work)))?;
        active.mounted = true;
        Ok(active)
    }

    /// Mounts the chain read-only, for copying from it or bind-mounting parts of it.
    pub fn view(&self, chain: &[LayerId]) -> Result<ActiveSnapshot, LayerError> {
        let mut lowers = self.lowerdirs(chain)?;
        let dir = self.new_active_dir()?;
        let merged = dir.join("m");
        fs::create_dir(&merged).map_err(io_at(&merged))?;
        // Overlayfs without an upper directory wants at least two lower directories.
        for empty in ["e0", "e1"].iter().take(2usize.saturating_sub(chain.len())) {
            lowers.push(self.root.join(empty));
        }
        let mut view = ActiveSnapshot { dir, chain: chain.to_vec(), mounted: false };
        mount_overlay(&merged, &lowers, None)?;
        view.mounted = true;
        Ok(view)
    }

    /// Unmounts an active snapshot and turns its upper directory into a layer. Returns `None`
    /// when the step changed nothing.
    pub fn commit(&self, active: ActiveSnapshot) -> Result<Option<LayerId>, LayerError> {
        self.commit_pruned(active, &[])
    }

    /// Like [`SnapshotStore::commit`], first removing mountpoint stubs the runtime created
    /// (`stubs`, relative paths that did not exist before the step) when they are still empty,
    /// with the empty directories above them that were created for them or are unchanged
    /// copies of a lower directory. A step that changed nothing else then adds no layer.
    pub fn commit_pruned(&self, mut active: ActiveSnapshot, stubs: &[String]) -> Result<Option<LayerId>, LayerError> {
        active.unmount()?;
        let upper = active.dir.join("u");
        for stub in stubs {
            self.prune_stub(&upper, &active.chain, Path::new(stub))?;
        }
        let empty = fs::read_dir(&upper).map_err(io_at(&upper))?.next().is_none();
        if empty {
            return Ok(None);
        }
        let id = LayerId::from_digest(&Digest::of(format!("{}:{}", active.dir.display(), unique()).as_bytes()));
        self.publish(&upper, id, None).map(Some)
    }

    fn prune_stub(&self, upper: &Path, chain: &[LayerId], stub: &Path) -> Result<(), LayerError> {
        let path = upper.join(stub);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() == 0 => fs::remove_file(&path).map_err(io_at(&path))?,
            Ok(meta) if meta.is_dir() && is_empty_dir(&path)? => fs::remove_dir(&path).map_err(io_at(&path))?,
            _ => return Ok(()),
        }
        let mut rel = stub.parent();
        while let Some(dir_rel) = rel.filter(|r| !r.as_os_str().is_empty()) {
            let dir = upper.join(dir_rel);
            let Ok(meta) = fs::symlink_metadata(&dir) else { break };
            if !meta.is_dir() || !is_empty_dir(&dir)? || xattr::get(&dir, OPAQUE_XATTR).ok().flatten().is_some() {
                break;
            }
            let unchanged_copy = match self.lower_entry(chain, dir_rel) {
                None => true,
                Some(lower) => {
                    use std::os::unix::fs::MetadataExt as _;
                    lower.is_dir() && (lower.mode(), lower.uid(), lower.gid()) == (meta.mode(), meta.uid(), meta.gid())
                }
            };
            if !unchanged_copy {
                break;
            }
            fs::remove_dir(&dir).map_err(io_at(&dir))?;
            rel = dir_rel.parent();
        }
        Ok(())
    }

    /// The topmost lower-layer entry at `rel`, if any layer has one.
    fn lower_entry(&self, chain: &[LayerId], rel: &Path) -> Option<fs::Metadata> {
        chain.iter().rev().find_map(|id| fs::symlink_metadata(self.layer_path(id).join(rel)).ok())
    }

    /// Remembers the blob a layer came from a registry as (its digest, size and compression,
    /// and its diff id), so exporting the layer gives that exact blob back.
    pub fn record_origin(&self, blob: &LayerBlob) -> Result<(), LayerError> {
        let value = serde_json::to_vec(blob).expect("serialisable");
        self.kv.put(ORIGINS_TREE, blob.diff_id.hex().as_bytes(), &value)?;
        Ok(())
    }

    /// A layer as an image layer: the blob it was pulled as when it came from a registry
    /// (while the store holds it), so base layers keep their digests and diff ids whatever
    /// the export settings, as BuildKit keeps them; otherwise [`SnapshotStore::export`].
    pub fn export_image_layer(
        &self,
        id: &LayerId,
        cas: &BlobStore,
        compression: Compression,
        options: &TarOptions,
    ) -> Result<LayerBlob, LayerError> {
        if let Some(diff_id) = self.record(id)?.and_then(|r| r.diff_id)
            && let Some(origin) = self.stored_blob(ORIGINS_TREE, diff_id.hex().as_bytes(), cas)?
        {
            return Ok(origin);
        }
        self.export(id, cas, compression, options)
    }

    /// Exports a layer to the blob store with exactly these settings, reusing an earlier
    /// export with the same settings.
    pub fn export(
        &self,
        id: &LayerId,
        cas: &BlobStore,
        compression: Compression,
        options: &TarOptions,
    ) -> Result<LayerBlob, LayerError> {
        let key = format!("{id}/{compression:?}/{:?}", options.source_date_epoch);
        if let Some(blob) = self.stored_blob(BLOBS_TREE, key.as_bytes(), cas)? {
            return Ok(blob);
        }
        let blob = export_layer(&self.layer_path(id), cas, compression, options)?;
        self.kv.put(BLOBS_TREE, key.as_bytes(), &serde_json::to_vec(&blob).expect("serialisable"))?;
        self.learn_diff_id(id, &blob.diff_id)?;
        Ok(blob)
    }

    /// Records the diff id an export found for a layer committed without one, so the layer
    /// is found by it ([`SnapshotStore::layer_for_diff_id`]: a peer's or a push's request).
    fn learn_diff_id(&self, id: &LayerId, diff_id: &Digest) -> Result<(), LayerError> {
        if self.record(id)?.is_some_and(|r| r.diff_id.is_some()) {
            return Ok(());
        }
        let record = serde_json::to_vec(&LayerRecord { diff_id: Some(*diff_id) }).expect("serialisable");
        self.kv.put(LAYERS_TREE, id.as_str().as_bytes(), &record)?;
        // Another layer with the same content keeps the name, while it exists.
        let owner = self.kv.get(DIFF_IDS_TREE, diff_id.hex().as_bytes())?;
        let owner = owner.and_then(|owner| LayerId::parse(&String::from_utf8_lossy(&owner)));
        if owner.is_none_or(|owner| !self.has_layer(&owner)) {
            self.kv.put(DIFF_IDS_TREE, diff_id.hex().as_bytes(), id.as_str().as_bytes())?;
        }
        Ok(())
    }

    /// The blob a layer with this diff id was pulled as, while the blob store holds it.
    pub fn origin(&self, diff_id: &Digest, cas: &BlobStore) -> Result<Option<LayerBlob>, LayerError> {
        self.stored_blob(ORIGINS_TREE, diff_id.hex().as_bytes(), cas)
    }

    /// A blob recorded under `key` in `tree`, if the blob store still holds it.
    fn stored_blob(&self, tree: &str, key: &[u8], cas: &BlobStore) -> Result<Option<LayerBlob>, LayerError> {
        let blob = self.kv.get(tree, key)?.and_then(|bytes| serde_json::from_slice::<LayerBlob>(&bytes).ok());
        Ok(blob.filter(|blob| cas.contains(&blob.digest)))
    }

    /// The stored record of a layer.
    pub fn record(&self, id: &LayerId) -> Result<Option<LayerRecord>, LayerError> {
        let bytes = self.kv.get(LAYERS_TREE, id.as_str().as_bytes())?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    fn publish(&self, dir: &Path, id: LayerId, diff_id: Option<Digest>) -> Result<LayerId, LayerError> {
        let dest = self.layer_path(&id);
        if dest.exists() {
            fs::remove_dir_all(dir).map_err(io_at(dir))?;
        } else {
            fs::rename(dir, &dest).map_err(io_at(&dest))?;
        }
        let record = serde_json::to_vec(&LayerRecord { diff_id }).expect("serialisable");
        self.kv.put(LAYERS_TREE, id.as_str().as_bytes(), &record)?;
        if let Some(diff_id) = diff_id {
            self.kv.put(DIFF_IDS_TREE, diff_id.hex().as_bytes(), id.as_str().as_bytes())?;
            // An imported layer is used now: kept while the holds live now do, collected after
            // even if no hold takes it (a committed one is always taken by the hold that made it).
            let _holds = self.shared.lock();
            self.shared.touch(&id, false)?;
        }
        Ok(id)
    }

    /// The chain's layer directories, topmost first (overlayfs order).
    fn lowerdirs(&self, chain: &[LayerId]) -> Result<Vec<PathBuf>, LayerError> {
        let mut parts = Vec::with_capacity(chain.len());
        for id in chain.iter().rev() {
            if !self.has_layer(id) {
                return Err(LayerError::MissingLayer(id.clone()));
            }
            parts.push(self.layer_path(id));
        }
        Ok(parts)
    }

    fn new_active_dir(&self) -> Result<PathBuf, LayerError> {
        let n = MOUNT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join("a").join(format!("{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(dir)
    }
}

fn is_empty_dir(dir: &Path) -> Result<bool, LayerError> {
    Ok(fs::read_dir(dir).map_err(io_at(dir))?.next().is_none())
}

fn unique() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Mounts an overlay of `lowers` (topmost first) at `merged`, read-write over `upper` and
/// `work` when given, else read-only. A chain whose options fit one page is mounted with
/// mount(2); a longer one through the new mount API, adding one lower directory at a time
/// (`lowerdir+`, Linux 6.8), up to overlayfs's own limit of [`MAX_LAYERS`].
fn mount_overlay(merged: &Path, lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> Result<(), LayerError> {
    if lowers.len() > MAX_LAYERS {
        return Err(LayerError::TooManyLayers(lowers.len()));
    }
    let joined: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    let mut options = format!("lowerdir={}", joined.join(":"));
    if let Some((upper, work)) = upper {
        options += &format!(",upperdir={},workdir={}", upper.display(), work.display());
    }
    let flags = if upper.is_some() { MsFlags::empty() } else { MsFlags::MS_RDONLY };
    if options.len() <= MAX_MOUNT_OPTIONS {
        return nix::mount::mount(Some("overlay"), merged, Some("overlay"), flags, Some(options.as_str()))
            .map_err(|errno| LayerError::Mount { target: merged.to_path_buf(), reason: errno.desc().to_string() });
    }
    mount_overlay_incrementally(merged, lowers, upper).map_err(|errno| match errno {
        // A kernel without `lowerdir+` (before 6.8).
        rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS => LayerError::TooManyLayers(lowers.len()),
        other => LayerError::Mount { target: merged.to_path_buf(), reason: other.to_string() },
    })
}

fn mount_overlay_incrementally(
    merged: &Path,
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
) -> rustix::io::Result<()> {
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for lower in lowers {
        rustix::mount::fsconfig_set_string(&fs, "lowerdir+", lower.as_path())?;
    }
    let mut attributes = MountAttrFlags::MOUNT_ATTR_RDONLY;
    if let Some((upper, work)) = upper {
        rustix::mount::fsconfig_set_string(&fs, "upperdir", upper)?;
        rustix::mount::fsconfig_set_string(&fs, "workdir", work)?;
        attributes = MountAttrFlags::empty();
    }
    rustix::mount::fsconfig_create(&fs)?;
    let mount = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attributes)?;
    rustix::mount::move_mount(&mount, "", rustix::fs::CWD, merged, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
}

fn unmount_quietly(merged: &Path) {
    let _ = unmount(merged);
}

/// How often an unmount that finds the mount busy is tried again before it is detached.
const UNMOUNT_ATTEMPTS: u32 = 6;

/// Unmounts `merged`. A mount is busy for a moment when another thread of this process
/// spawns a child: between clone and exec the child holds a copy of every open descriptor,
/// including one a copy into the snapshot had open at that instant. Such a mount is tried
/// again after 1, 2, 4, 8 and 16 ms, then detached: it leaves the mount table at once, and
/// the kernel drops it when the child execs and its copied descriptors close. The upper
/// directory is complete either way; nothing writes through a descriptor that is about to
/// be closed by exec.
fn unmount(merged: &Path) -> Result<(), LayerError> {
    for attempt in 0..UNMOUNT_ATTEMPTS {
        match nix::mount::umount2(merged, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if attempt + 1 < UNMOUNT_ATTEMPTS => {
                std::thread::sleep(std::time::Duration::from_millis(1 << attempt));
            }
            Err(nix::errno::Errno::EBUSY) => break,
            Err(errno) => {
                return Err(LayerError::Mount { target: merged.to_path_buf(), reason: errno.desc().to_string() });
            }
        }
    }
    nix::mount::umount2(merged, MntFlags::MNT_DETACH)
        .map_err(|errno| LayerError::Mount { target: merged.to_path_buf(), reason: errno.desc().to_string() })
}

/// A mounted snapshot; dropping it unmounts and removes its directories.
#[derive(Debug)]
pub struct ActiveSnapshot {
    dir: PathBuf,
    chain: Vec<LayerId>,
    mounted: bool,
}

impl ActiveSnapshot {
    /// The merged root filesystem.
    pub fn root(&self) -> PathBuf {
        self.dir.join("m")
    }

    /// The upper directory, where the step's changes collect.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("u")
    }

    fn unmount(&mut self) -> Result<(), LayerError> {
        if self.mounted {
            unmount(&self.root())?;
            self.mounted = false;
        }
        Ok(())
    }
}

impl Drop for ActiveSnapshot {
    fn drop(&mut self) {
        if self.mounted {
            unmount_quietly(&self.root());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
