//! A context that travelled: its manifest (every entry, with file digests, modes and times)
//! and the file contents as blobs in a store. The client builds the manifest from its
//! directory, uploads only the blobs the daemon lacks, and the daemon and workers use the
//! manifest exactly as they would use the directory.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_dockerfile::context::{ContextEntry, ContextError, ContextFiles, EntryKind};
use kiln_types::Digest;
use serde::{Deserialize, Serialize};

use crate::{BuildContext, FsContext, finish};

/// One entry of a [`ContextManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative `/`-separated path.
    pub path: String,
    /// `file`, `dir` or the symlink's target.
    pub kind: ManifestKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, u32),
}

/// What a manifest entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestKind {
    /// A regular file: its content's digest and size.
    File {
        /// sha256 of the content.
        digest: Digest,
        /// Bytes.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link and its target.
    Symlink(String),
}

/// A build context as entries with content digests, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextManifest {
    /// The entries.
    pub entries: Vec<ManifestEntry>,
}

impl ContextManifest {
    /// Every distinct file digest with its size.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter_map(|e| match &e.kind {
                ManifestKind::File { digest, size } if seen.insert(*digest) => Some((*digest, *size)),
                _ => None,
            })
            .collect()
    }

    /// The file digests the given entries need.
    pub fn digests_of(&self, selected: &[&ContextEntry]) -> Vec<Digest> {
        let by_path: HashMap<&str, &ManifestEntry> = self.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut digests: Vec<Digest> = selected
            .iter()
            .filter_map(|s| match by_path.get(s.path.as_str()).map(|e| &e.kind) {
                Some(ManifestKind::File { digest, .. }) => Some(*digest),
                _ => None,
            })
            .collect();
        digests.sort();
        digests.dedup();
        digests
    }
}

impl FsContext {
    /// The manifest of this context: reads and hashes every file.
    pub fn manifest(&self) -> io::Result<ContextManifest> {
        let mut entries = Vec::with_capacity(self.entries().len());
        for entry in self.entries() {
            let meta = fs::symlink_metadata(self.root().join(&entry.path))?;
            let kind = match &entry.kind {
                EntryKind::File => {
                    let digest = self.file_digest(&entry.path).map_err(|e| io::Error::other(e.to_string()))?;
                    ManifestKind::File { digest, size: meta.len() }
                }
                EntryKind::Dir => ManifestKind::Dir,
                EntryKind::Symlink(target) => ManifestKind::Symlink(target.clone()),
            };
            let mtime = (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0));
            entries.push(ManifestEntry { path: entry.path.clone(), kind, mode: entry.mode, mtime });
        }
        Ok(ContextManifest { entries })
    }

    /// The path of a file of this context (for uploads).
    pub fn file_path(&self, path: &str) -> PathBuf {
        self.root().join(path)
    }
}

/// A manifest whose file contents are in a blob store.
pub struct StoredContext {
    entries: Vec<ContextEntry>,
    by_path: HashMap<String, ManifestEntry>,
    blobs: Arc<BlobStore>,
}

impl StoredContext {
    /// The context described by `manifest` over `blobs` (which must hold the files that get
    /// materialised; a missing one fails then, naming the path).
    pub fn new(manifest: &ContextManifest, blobs: Arc<BlobStore>) -> StoredContext {
        let mut entries: Vec<ContextEntry> = manifest
            .entries
            .iter()
            .map(|e| ContextEntry {
                path: e.path.clone(),
                kind: match &e.kind {
                    ManifestKind::File { .. } => EntryKind::File,
                    ManifestKind::Dir => EntryKind::Dir,
                    ManifestKind::Symlink(target) => EntryKind::Symlink(target.clone()),
                },
                mode: e.mode,
            })
            .collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let by_path = manifest.entries.iter().map(|e| (e.path.clone(), e.clone())).collect();
        StoredContext { entries, by_path, blobs }
    }
}

impl ContextFiles for StoredContext {
    fn entries(&self) -> &[ContextEntry] {
        &self.entries
    }

    fn file_digest(&self, path: &str) -> Result<Digest, ContextError> {
        match self.by_path.get(path).map(|e| &e.kind) {
            Some(ManifestKind::File { digest, .. }) => Ok(*digest),
            _ => Err(ContextError::Read { path: path.to_string(), message: "not a file of the context".into() }),
        }
    }
}

impl BuildContext for StoredContext {
    fn materialize(&self, selected: &[&ContextEntry], dest: &Path) -> io::Result<()> {
        let mut dirs: Vec<(&ManifestEntry, PathBuf)> = Vec::new();
        for entry in selected {
            let Some(stored) = self.by_path.get(&entry.path) else {
                return Err(io::Error::other(format!("{}: not in the context manifest", entry.path)));
            };
            let target = dest.join(&entry.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            match &stored.kind {
                ManifestKind::Dir => {
                    fs::create_dir_all(&target)?;
                    dirs.push((stored, target));
                    continue;
                }
                ManifestKind::Symlink(link) => std::os::unix::fs::symlink(link, &target)?,
                ManifestKind::File { digest, .. } => {
                    fs::copy(self.blobs.path(digest), &target)
                        .map_err(|e| io::Error::new(e.kind(), format!("{} (blob {digest}): {e}", entry.path)))?;
                }
            }
            finish(&target, stored.mode, stored.mtime, matches!(stored.kind, ManifestKind::Symlink(_)))?;
        }
        for (stored, target) in dirs.iter().rev() {
            finish(target, stored.mode, stored.mtime, false)?;
        }
        Ok(())
    }
}
