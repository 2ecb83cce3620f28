//! Digests of a context's files remembered between builds, so an unchanged context is not
//! read again: an entry is trusted while the file's size, inode, modification and change
//! times are what they were (as git's index and BuildKit's content hash cache do).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_types::Digest;
use serde::{Deserialize, Serialize};

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            size: meta.len(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stamp: Stamp,
    digest: Digest,
}

/// The remembered digests of one context directory, kept in one file.
#[derive(Debug)]
pub struct HashCache {
    file: PathBuf,
    earlier: HashMap<String, Entry>,
    /// What this walk saw (saved: files gone since are forgotten).
    seen: HashMap<String, Entry>,
    /// Seconds since the epoch when the walk began: files changed in the last second
    /// before it are not remembered, since a change in the same second after hashing would
    /// leave the same times ("racily clean" in git's terms).
    started: i64,
}

impl HashCache {
    /// Loads the cache kept in `file`; a missing or unreadable file is an empty cache.
    pub fn load(file: &Path) -> HashCache {
        let earlier = fs::read(file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        HashCache { file: file.to_path_buf(), earlier, seen: HashMap::new(), started }
    }

    /// The remembered digest of `path` when its metadata is unchanged.
    pub(crate) fn lookup(&mut self, path: &str, meta: &fs::Metadata) -> Option<Digest> {
        let stamp = Stamp::of(meta);
        let entry = self.earlier.get(path).filter(|e| e.stamp == stamp)?.clone();
        let digest = entry.digest;
        self.seen.insert(path.to_string(), entry);
        Some(digest)
    }

    /// Remembers the digest of `path`, hashed with `meta` taken before reading it.
    pub(crate) fn record(&mut self, path: &str, meta: &fs::Metadata, digest: Digest) {
        let stamp = Stamp::of(meta);
        if stamp.mtime.0 >= self.started - 1 || stamp.ctime.0 >= self.started - 1 {
            return;
        }
        self.seen.insert(path.to_string(), Entry { stamp, digest });
    }

    /// Writes what this walk saw (atomically: a temporary file renamed over the old one).
    pub fn save(&self) -> io::Result<()> {
        if let Some(dir) = self.file.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self.file.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, serde_json::to_vec(&self.seen).map_err(io::Error::other)?)?;
        fs::rename(&tmp, &self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsContext;
    use kiln_dockerfile::ignore::PatternList;

    fn digest_of(manifest: &crate::ContextManifest, path: &str) -> Digest {
        manifest
            .entries
            .iter()
            .find_map(|e| match &e.kind {
                crate::ManifestKind::File { digest, .. } if e.path == path => Some(*digest),
                _ => None,
            })
            .expect("the file is in the manifest")
    }

    /// A walk with the cache at `file`, counting files changed up to now as settled.
    fn walk(dir: &Path, file: &Path, settled: bool) -> FsContext {
        let mut cache = HashCache::load(file);
        if settled {
            cache.started += 10;
        }
        FsContext::walk(dir, &PatternList::default()).unwrap().with_hash_cache(cache)
    }

    #[test]
    fn unchanged_files_take_the_remembered_digest_and_changed_ones_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = (tmp.path().join("ctx"), tmp.path().join("cache/ctx.json"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.txt"), "hello").unwrap();
        fs::write(dir.join("b.txt"), "world").unwrap();
        let first = walk(&dir, &file, true);
        let manifest = first.manifest().unwrap();
        assert_eq!(digest_of(&manifest, "a.txt"), Digest::of(b"hello"));
        first.save_hash_cache().unwrap();

        // A remembered digest is used without reading the file: plant a wrong one to see it.
        let mut saved: HashMap<String, Entry> = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert_eq!(saved.len(), 2);
        saved.get_mut("a.txt").unwrap().digest = Digest::of(b"planted");
        fs::write(&file, serde_json::to_vec(&saved).unwrap()).unwrap();
        let manifest = walk(&dir, &file, true).manifest().unwrap();
        assert_eq!(digest_of(&manifest, "a.txt"), Digest::of(b"planted"));
        assert_eq!(digest_of(&manifest, "b.txt"), Digest::of(b"world"));

        // Same size, modification time put back: the change time still tells.
        let meta = fs::metadata(dir.join("a.txt")).unwrap();
        fs::write(dir.join("a.txt"), "HELLO").unwrap();
        let mtime = nix::sys::time::TimeSpec::new(meta.mtime(), meta.mtime_nsec());
        nix::sys::stat::utimensat(
            None,
            &dir.join("a.txt"),
            &mtime,
            &mtime,
            nix::sys::stat::UtimensatFlags::FollowSymlink,
        )
        .unwrap();
        let manifest = walk(&dir, &file, true).manifest().unwrap();
        assert_eq!(digest_of(&manifest, "a.txt"), Digest::of(b"HELLO"));
    }

    #[test]
    fn files_changed_just_before_the_walk_are_not_remembered() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, file) = (tmp.path().join("ctx"), tmp.path().join("ctx.json"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("fresh.txt"), "just written").unwrap();
        let context = walk(&dir, &file, false);
        assert_eq!(digest_of(&context.manifest().unwrap(), "fresh.txt"), Digest::of(b"just written"));
        context.save_hash_cache().unwrap();
        let saved: HashMap<String, Entry> = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert!(saved.is_empty(), "{saved:?}");
    }

    #[test]
    fn a_corrupt_cache_file_is_an_empty_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("ctx.json");
        fs::write(&file, "{not json").unwrap();
        assert!(HashCache::load(&file).earlier.is_empty());
    }
}
