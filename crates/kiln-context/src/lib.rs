//! A build context on disk: walked once (pruned by `.dockerignore`), hashed on demand, and
//! materialised into a snapshot when a step copies from it.
//!
//! Materialised files keep their mode and modification time and belong to root, as
//! BuildKit's local source does, so an unchanged context gives byte-identical layers.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_dockerfile::context::{ContextEntry, ContextError, ContextFiles, EntryKind};

mod confined;
mod hash_cache;
mod stored;

pub use confined::{ConfinedDir, EntryMeta};
pub use hash_cache::HashCache;
pub use stored::{ContextManifest, ManifestEntry, ManifestKind, StoredContext};

/// A build context the worker can copy from: a directory, or an uploaded manifest.
pub trait BuildContext: ContextFiles + Send + Sync {
    /// Copies the selected entries (with the directories above them) into `dest`, owned by
    /// root, keeping modes and modification times.
    fn materialize(&self, selected: &[&ContextEntry], dest: &Path) -> io::Result<()>;
}
use kiln_dockerfile::ignore::{PatternList, WalkState};
use kiln_types::{Digest, Sha256Writer};

/// A directory used as build context.
pub struct FsContext {
    root: PathBuf,
    entries: Vec<ContextEntry>,
    digests: Mutex<HashMap<String, Digest>>,
    remembered: Option<Mutex<HashCache>>,
}

impl FsContext {
    /// Lists `root`, leaving out what `ignore` excludes. Excluded directories are skipped
    /// whole unless an exception pattern may re-include something below them.
    pub fn walk(root: &Path, ignore: &PatternList) -> io::Result<FsContext> {
        let mut entries = Vec::new();
        walk_dir(root, "", ignore, &WalkState::default(), &mut entries)?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(FsContext { root: root.to_path_buf(), entries, digests: Mutex::default(), remembered: None })
    }

    /// Takes file digests from `cache` where the files are unchanged, and remembers new ones
    /// there (see [`FsContext::save_hash_cache`]).
    pub fn with_hash_cache(mut self, cache: HashCache) -> FsContext {
        self.remembered = Some(Mutex::new(cache));
        self
    }

    /// Saves the digests computed or confirmed so far into the hash cache, when there is one.
    pub fn save_hash_cache(&self) -> io::Result<()> {
        match &self.remembered {
            Some(cache) => cache.lock().unwrap_or_else(|p| p.into_inner()).save(),
            None => Ok(()),
        }
    }

    /// The context directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl BuildContext for FsContext {
    fn materialize(&self, selected: &[&ContextEntry], dest: &Path) -> io::Result<()> {
        let root = ConfinedDir::open(dest)?;
        let mut dirs: Vec<(&str, EntryMeta)> = Vec::new();
        // Files linked from several selected paths stay one file with several links.
        let mut linked: HashMap<(u64, u64), &str> = HashMap::new();
        for entry in selected {
            let source = self.root.join(&entry.path);
            let meta = source_meta(&source)?;
            if let (EntryKind::File, Some(inode)) = (&entry.kind, hard_linked(&source)?) {
                if let Some(first) = linked.get(&inode) {
                    root.create_hard_link(first, &entry.path)?;
                    continue;
                }
                linked.insert(inode, &entry.path);
            }
            match &entry.kind {
                EntryKind::Dir => {
                    root.create_dir(&entry.path)?;
                    dirs.push((&entry.path, meta));
                    continue;
                }
                EntryKind::Symlink(link) => root.create_symlink(&entry.path, link)?,
                EntryKind::File => root.create_file(&entry.path, &mut fs::File::open(&source)?)?,
            }
            root.finish(&entry.path, meta)?;
        }
        // Directory times last: creating their children changed them.
        for (path, meta) in dirs.iter().rev() {
            root.finish(path, *meta)?;
        }
        Ok(())
    }
}

/// The (device, inode) of a file with more than one link.
fn hard_linked(path: &Path) -> io::Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::symlink_metadata(path)?;
    Ok((meta.nlink() > 1).then(|| (meta.dev(), meta.ino())))
}

/// The mode and modification time of a context file, not following a symlink.
fn source_meta(source: &Path) -> io::Result<EntryMeta> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::symlink_metadata(source)?;
    Ok(EntryMeta { mode: meta.mode(), mtime: (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0)) })
}

/// Walks one directory. Exclusion uses the parent's match state, as BuildKit's fsutil
/// walker does (moby's `MatchesUsingParentResults`).
fn walk_dir(
    dir: &Path,
    prefix: &str,
    ignore: &PatternList,
    parent: &WalkState,
    out: &mut Vec<ContextEntry>,
) -> io::Result<()> {
    let mut children: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let meta = fs::symlink_metadata(child.path())?;
        let (excluded, state) = ignore.walk_match(&path, parent);
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if excluded && !ignore.must_descend(&path) {
                continue;
            }
            if !excluded {
                out.push(ContextEntry { path: path.clone(), kind: EntryKind::Dir, mode });
            }
            walk_dir(&child.path(), &path, ignore, &state, out)?;
        } else if !excluded {
            let kind = if meta.file_type().is_symlink() {
                EntryKind::Symlink(fs::read_link(child.path())?.to_string_lossy().into_owned())
            } else {
                EntryKind::File
            };
            out.push(ContextEntry { path, kind, mode });
        }
    }
    Ok(())
}

impl ContextFiles for FsContext {
    fn entries(&self) -> &[ContextEntry] {
        &self.entries
    }

    fn file_digest(&self, path: &str) -> Result<Digest, ContextError> {
        if let Some(d) = self.digests.lock().unwrap_or_else(|p| p.into_inner()).get(path) {
            return Ok(*d);
        }
        let read_error = |e: io::Error| ContextError::Read { path: path.to_owned(), message: e.to_string() };
        let file_path = self.root.join(path);
        // Metadata before the content: a change while reading leaves a newer stamp.
        let meta = match &self.remembered {
            Some(cache) => {
                let meta = fs::metadata(&file_path).map_err(read_error)?;
                if let Some(digest) = cache.lock().unwrap_or_else(|p| p.into_inner()).lookup(path, &meta) {
                    self.digests.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_owned(), digest);
                    return Ok(digest);
                }
                Some(meta)
            }
            None => None,
        };
        let mut file = fs::File::open(&file_path).map_err(read_error)?;
        let mut hasher = Sha256Writer::new();
        io::copy(&mut file, &mut hasher).map_err(read_error)?;
        let digest = hasher.finish();
        if let (Some(cache), Some(meta)) = (&self.remembered, meta) {
            cache.lock().unwrap_or_else(|p| p.into_inner()).record(path, &meta, digest);
        }
        self.digests.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_owned(), digest);
        Ok(digest)
    }
}
