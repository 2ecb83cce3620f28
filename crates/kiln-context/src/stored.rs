//! A context that travelled: its manifest (every entry, with file digests, modes and times)
//! and the file contents as blobs in a store. The client builds the manifest from its
//! directory, uploads only the blobs the daemon lacks, and the daemon and workers use the
//! manifest exactly as they would use the directory.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_dockerfile::context::{ContextEntry, ContextError, ContextFiles, EntryKind};
use kiln_model::{ContextManifest, ManifestEntry, ManifestKind};
use kiln_types::Digest;

use crate::{BuildContext, ConfinedDir, EntryMeta, FsContext};

impl FsContext {
    /// The manifest of this context: reads and hashes every file.
    pub fn manifest(&self) -> io::Result<ContextManifest> {
        let mut entries = Vec::with_capacity(self.entries().len());
        let mut inodes: HashMap<(u64, u64), &str> = HashMap::new();
        for entry in self.entries() {
            let rel = self.relative_path(&entry.path);
            let meta = fs::symlink_metadata(self.root().join(rel))?;
            let mut hardlink_of = None;
            if entry.kind == EntryKind::File && meta.nlink() > 1 {
                match inodes.entry((meta.dev(), meta.ino())) {
                    std::collections::hash_map::Entry::Occupied(first) => hardlink_of = Some(first.get().to_string()),
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(&entry.path);
                    }
                }
            }
            let kind = match &entry.kind {
                EntryKind::File => {
                    let digest = self.file_digest(&entry.path).map_err(|e| io::Error::other(e.to_string()))?;
                    ManifestKind::File { digest, size: meta.len() }
                }
                EntryKind::Dir => ManifestKind::Dir,
                EntryKind::Symlink(target) => ManifestKind::Symlink(target.clone()),
            };
            let mtime = (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0));
            let raw_path = (rel.to_str() != Some(entry.path.as_str())).then(|| rel.as_os_str().as_bytes().to_vec());
            entries.push(ManifestEntry {
                path: entry.path.clone(),
                kind,
                mode: entry.mode,
                mtime,
                raw_path,
                hardlink_of,
            });
        }
        Ok(ContextManifest { entries })
    }

    /// The path of a file of this context (for uploads).
    pub fn file_path(&self, path: &str) -> PathBuf {
        self.root().join(self.relative_path(path))
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
        let root = ConfinedDir::open(dest)?;
        let mut dirs: Vec<(PathBuf, EntryMeta)> = Vec::new();
        // Files written so far by path: a hard link of one of them links to it again.
        let mut written: HashMap<&str, PathBuf> = HashMap::new();
        for entry in selected {
            let Some(stored) = self.by_path.get(&entry.path) else {
                return Err(io::Error::other(format!("{}: not in the context manifest", entry.path)));
            };
            let meta = EntryMeta { mode: stored.mode, mtime: stored.mtime };
            let rel = stored.relative_path();
            if let Some(first) = stored.hardlink_of.as_deref().and_then(|p| written.get(p)) {
                root.create_hard_link(first, &rel)?;
                continue;
            }
            if matches!(stored.kind, ManifestKind::File { .. }) {
                written.insert(stored.hardlink_of.as_deref().unwrap_or(&stored.path), rel.clone());
            }
            match &stored.kind {
                ManifestKind::Dir => {
                    root.create_dir(&rel)?;
                    dirs.push((rel, meta));
                    continue;
                }
                ManifestKind::Symlink(link) => root.create_symlink(&rel, link)?,
                ManifestKind::File { digest, .. } => {
                    let blob = fs::File::open(self.blobs.path(digest))
                        .map_err(|e| io::Error::new(e.kind(), format!("{} (blob {digest}): {e}", entry.path)))?;
                    root.create_file_from(&rel, &blob)?;
                }
            }
            root.finish(&rel, meta)?;
        }
        for (path, meta) in dirs.iter().rev() {
            root.finish(path, *meta)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kiln_kv::MemoryKv;

    use super::*;

    fn entry(path: &str, kind: ManifestKind) -> ManifestEntry {
        ManifestEntry { path: path.into(), kind, mode: 0o644, mtime: (0, 0), raw_path: None, hardlink_of: None }
    }

    #[test]
    fn manifests_with_entries_below_symlinks_or_files_are_refused() {
        let file = || ManifestKind::File { digest: Digest::of(b"x"), size: 1 };
        let check = |entries: Vec<ManifestEntry>| ContextManifest { entries }.validate().map_err(|e| e.to_string());
        let through_link =
            check(vec![entry("a", ManifestKind::Symlink("/etc/cron.d".into())), entry("a/evil", file())]);
        assert_eq!(through_link.unwrap_err(), "context entry \"a/evil\": its parent \"a\" is a symlink");
        let twice = check(vec![entry("a", ManifestKind::Symlink("/etc/passwd".into())), entry("a", file())]);
        assert_eq!(twice.unwrap_err(), "context entry \"a\": listed twice");
        assert!(check(vec![entry("f", file()), entry("f/g", file())]).unwrap_err().contains("is a file"));
        assert!(check(vec![entry("x/../y", file())]).unwrap_err().contains("not a clean relative path"));
        assert!(check(vec![entry("x\0y", file())]).unwrap_err().contains("not a clean relative path"));
        assert!(check(vec![entry("d", ManifestKind::Dir), entry("d/f", file()), entry("e/f", file())]).is_ok());
    }

    #[test]
    fn materialising_an_unchecked_manifest_never_writes_outside_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), "keep").unwrap();
        let blobs = Arc::new(BlobStore::open(&dir.path().join("cas"), Arc::new(MemoryKv::new())).unwrap());
        let digest = blobs.put(b"evil", None).unwrap().digest;
        let file = ManifestKind::File { digest, size: 4 };
        let manifest = ContextManifest {
            entries: vec![
                entry("a", ManifestKind::Symlink(outside.display().to_string())),
                entry("a/evil", file.clone()),
                entry("v", ManifestKind::Symlink(outside.join("victim").display().to_string())),
                entry("v", file),
            ],
        };
        let context = StoredContext::new(&manifest, blobs);
        let dest = dir.path().join("dest");
        for (link, through) in [(0, 1), (2, 3)] {
            let selected = [&context.entries()[link], &context.entries()[through]];
            let err = context.materialize(&selected, &dest).unwrap_err();
            assert!(err.to_string().contains(&context.entries()[through].path), "{err}");
            std::fs::remove_dir_all(&dest).unwrap();
        }
        assert!(!outside.join("evil").exists());
        assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "keep");
    }
}
