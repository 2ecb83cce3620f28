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
pub use kiln_model::{ContextManifest, ManifestEntry, ManifestError, ManifestKind};
pub use stored::StoredContext;

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
    /// The real relative path of each entry whose name is not UTF-8 (its `path` holds it
    /// lossily, for matching and display).
    raw_paths: HashMap<String, PathBuf>,
    digests: Mutex<HashMap<String, Digest>>,
    remembered: Option<Mutex<HashCache>>,
}

impl FsContext {
    /// Lists `root`, leaving out what `ignore` excludes. Excluded directories are skipped
    /// whole unless an exception pattern may re-include something below them.
    pub fn walk(root: &Path, ignore: &PatternList) -> io::Result<FsContext> {
        let mut walked = Walked::default();
        walk_dir(root, "", Path::new(""), ignore, &WalkState::default(), &mut walked)?;
        let Walked { mut entries, raw_paths } = walked;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(FsContext { root: root.to_path_buf(), entries, raw_paths, digests: Mutex::default(), remembered: None })
    }

    /// An entry's path relative to the context, as the filesystem has it (its bytes, when
    /// they are not UTF-8).
    pub fn relative_path<'a>(&'a self, path: &'a str) -> &'a Path {
        self.raw_paths.get(path).map_or(Path::new(path), PathBuf::as_path)
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
        let mut dirs: Vec<(&Path, EntryMeta)> = Vec::new();
        // Files linked from several selected paths stay one file with several links.
        let mut linked: HashMap<(u64, u64), &Path> = HashMap::new();
        for entry in selected {
            let rel = self.relative_path(&entry.path);
            let source = self.root.join(rel);
            let (meta, inode) = source_meta(&source)?;
            if let (EntryKind::File, Some(inode)) = (&entry.kind, inode) {
                if let Some(first) = linked.get(&inode) {
                    root.create_hard_link(first, rel)?;
                    continue;
                }
                linked.insert(inode, rel);
            }
            match &entry.kind {
                EntryKind::Dir => {
                    root.create_dir(rel)?;
                    dirs.push((rel, meta));
                    continue;
                }
                EntryKind::Symlink(link) => root.create_symlink(rel, link)?,
                EntryKind::File => root.create_file(rel, &mut fs::File::open(&source)?)?,
            }
            root.finish(rel, meta)?;
        }
        // Directory times last: creating their children changed them.
        for (path, meta) in dirs.iter().rev() {
            root.finish(path, *meta)?;
        }
        Ok(())
    }
}

/// The mode and modification time of a context file, not following a symlink, and its
/// (device, inode) when it has more than one link: one stat for both.
fn source_meta(source: &Path) -> io::Result<(EntryMeta, Option<(u64, u64)>)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::symlink_metadata(source)?;
    let entry = EntryMeta { mode: meta.mode(), mtime: (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0)) };
    Ok((entry, (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()))))
}

/// What a walk found: the entries, and the real paths of those that are not UTF-8.
#[derive(Default)]
struct Walked {
    entries: Vec<ContextEntry>,
    raw_paths: HashMap<String, PathBuf>,
}

/// Walks one directory. Exclusion uses the parent's match state, as BuildKit's fsutil
/// walker does (moby's `MatchesUsingParentResults`). Names that are not UTF-8 are matched
/// and shown lossily (as Go reads them) and kept as bytes for reading and copying.
fn walk_dir(
    dir: &Path,
    prefix: &str,
    raw_prefix: &Path,
    ignore: &PatternList,
    parent: &WalkState,
    out: &mut Walked,
) -> io::Result<()> {
    let mut children: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        let raw = raw_prefix.join(child.file_name());
        if raw.to_str() != Some(path.as_str()) {
            out.raw_paths.insert(path.clone(), raw.clone());
        }
        let meta = fs::symlink_metadata(child.path())?;
        let (excluded, state) = ignore.walk_match(&path, parent);
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if excluded && !ignore.must_descend(&path) {
                continue;
            }
            if !excluded {
                out.entries.push(ContextEntry { path: path.clone(), kind: EntryKind::Dir, mode });
            }
            walk_dir(&child.path(), &path, &raw, ignore, &state, out)?;
        } else if !excluded {
            let kind = if meta.file_type().is_symlink() {
                EntryKind::Symlink(fs::read_link(child.path())?.to_string_lossy().into_owned())
            } else {
                EntryKind::File
            };
            out.entries.push(ContextEntry { path, kind, mode });
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
        let file_path = self.root.join(self.relative_path(path));
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
