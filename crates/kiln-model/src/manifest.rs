//! A build context as it travels: every entry with its file's digest, mode and time. The
//! client builds it from its directory (`kiln-context`), the daemon and workers check it
//! ([`ContextManifest::validate`]) and materialise it from blobs.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt as _;
use std::path::PathBuf;

use kiln_types::Digest;
use serde::{Deserialize, Serialize};

/// A manifest from an untrusted sender that is not well formed; the message names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

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
    /// The path's bytes when they are not UTF-8 (`path` then holds them lossily).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_path: Option<Vec<u8>>,
    /// For a file: an earlier file entry it is a hard link of (the same inode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardlink_of: Option<String>,
}

impl ManifestEntry {
    /// The path relative to the context, as bytes when the name is not UTF-8.
    pub fn relative_path(&self) -> PathBuf {
        match &self.raw_path {
            Some(bytes) => PathBuf::from(std::ffi::OsStr::from_bytes(bytes)),
            None => PathBuf::from(&self.path),
        }
    }
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

    /// Checks a manifest from an untrusted sender: every path is clean and relative, appears
    /// once, and has only directories of the manifest (or nothing) among its parents, so no
    /// entry can be written through a symlink or over a file. The error names the entry.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let mut kinds: HashMap<&str, &ManifestKind> = HashMap::with_capacity(self.entries.len());
        for entry in &self.entries {
            let path = entry.path.as_str();
            if path.is_empty()
                || path.starts_with('/')
                || path.contains('\0')
                || path.split('/').any(|p| p == ".." || p == "." || p.is_empty())
            {
                return Err(ManifestError(format!("context entry {path:?}: not a clean relative path")));
            }
            if let Some(raw) = &entry.raw_path
                && (raw.is_empty()
                    || raw.starts_with(b"/")
                    || raw.contains(&0)
                    || raw.split(|b| *b == b'/').any(|p| p == b".." || p == b"." || p.is_empty()))
            {
                return Err(ManifestError(format!(
                    "context entry {path:?}: its raw path is not a clean relative path"
                )));
            }
            if kinds.insert(path, &entry.kind).is_some() {
                return Err(ManifestError(format!("context entry {path:?}: listed twice")));
            }
        }
        for entry in &self.entries {
            if let Some(first) = &entry.hardlink_of
                && !matches!(
                    (&entry.kind, kinds.get(first.as_str())),
                    (ManifestKind::File { .. }, Some(ManifestKind::File { .. }))
                )
            {
                return Err(ManifestError(format!(
                    "context entry {:?}: a hard link of {first:?}, which is not a file",
                    entry.path
                )));
            }
            let parents = entry.path.match_indices('/').map(|(at, _)| &entry.path[..at]);
            for parent in parents {
                match kinds.get(parent) {
                    None | Some(ManifestKind::Dir) => {}
                    Some(ManifestKind::Symlink(_)) => {
                        return Err(ManifestError(format!(
                            "context entry {:?}: its parent {parent:?} is a symlink",
                            entry.path
                        )));
                    }
                    Some(ManifestKind::File { .. }) => {
                        return Err(ManifestError(format!(
                            "context entry {:?}: its parent {parent:?} is a file",
                            entry.path
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The file digests the entries at `paths` need.
    pub fn digests_of<'a>(&self, paths: impl IntoIterator<Item = &'a str>) -> Vec<Digest> {
        let by_path: HashMap<&str, &ManifestEntry> = self.entries.iter().map(|e| (e.path.as_str(), e)).collect();
        let mut digests: Vec<Digest> = paths
            .into_iter()
            .filter_map(|path| match by_path.get(path).map(|e| &e.kind) {
                Some(ManifestKind::File { digest, .. }) => Some(*digest),
                _ => None,
            })
            .collect();
        digests.sort();
        digests.dedup();
        digests
    }
}
