//! Content-addressed blob store on local disk, indexed through [`kiln_kv::Kv`].
//!
//! Invariants:
//! - A blob is visible under its digest only after its bytes were hashed, matched the digest
//!   and were fsynced: writers stream into `ingest/`, and a rename publishes the finished file.
//!   A crash leaves at most a stray temp file, never a half blob under a valid name.
//! - Bytes from anywhere else (a peer, a registry, S3) pass through [`VerifyingReader`] or
//!   [`BlobStore::ingest`] with an expected digest, so a corrupt transfer is an error naming
//!   both digests, not a poisoned cache.

mod stream;
mod verify;

pub use stream::{BlobWriter, blob_writer, unsynced_blob_writer};
pub use verify::VerifyingReader;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_kv::{KvError, SharedKv};
use kiln_types::{Digest, Sha256Writer};

const INDEX_TREE: &str = "blobs";

/// An error from the blob store.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// Content did not hash to the digest it was stored or fetched under.
    #[error("blob digest mismatch: expected {expected}, got {actual} ({size} bytes)")]
    DigestMismatch {
        /// The digest the content should have.
        expected: Digest,
        /// The digest it had.
        actual: Digest,
        /// How many bytes were read.
        size: u64,
    },
    /// Content had a different size than announced.
    #[error("blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The announced size.
        expected: u64,
        /// The size seen.
        actual: u64,
    },
    /// The blob is not in the store.
    #[error("blob {0} not found")]
    NotFound(Digest),
    /// A filesystem error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The index failed.
    #[error(transparent)]
    Kv(#[from] KvError),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CasError + '_ {
    move |source| CasError::Io { path: path.to_path_buf(), source }
}

/// What the index records about a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// The blob's digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// Blobs in `ROOT/blobs/sha256/<hex>`, with an index of sizes in the KV store.
pub struct BlobStore {
    root: PathBuf,
    index: SharedKv,
}

static INGEST_COUNTER: AtomicU64 = AtomicU64::new(0);

impl BlobStore {
    /// Opens the store under `root`, creating its directories, and removes stray temp files
    /// that a crash may have left.
    pub fn open(root: &Path, index: SharedKv) -> Result<BlobStore, CasError> {
        let store = BlobStore { root: root.to_path_buf(), index };
        let ingest = store.ingest_dir();
        if ingest.exists() {
            fs::remove_dir_all(&ingest).map_err(io_at(&ingest))?;
        }
        for dir in [store.root.join("blobs/sha256"), ingest] {
            fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(store)
    }

    fn ingest_dir(&self) -> PathBuf {
        self.root.join("ingest")
    }

    /// Where the blob lives on disk (it may not exist).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size and digest of a present blob.
    pub fn info(&self, digest: &Digest) -> Result<BlobInfo, CasError> {
        if let Some(value) = self.index.get(INDEX_TREE, digest.hex().as_bytes())?
            && value.len() >= 8
            && self.contains(digest)
        {
            let size = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
            return Ok(BlobInfo { digest: *digest, size });
        }
        let path = self.path(digest);
        match fs::metadata(&path) {
            Ok(meta) => {
                self.record(*digest, meta.len())?;
                Ok(BlobInfo { digest: *digest, size: meta.len() })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.index.delete(INDEX_TREE, digest.hex().as_bytes())?;
                Err(CasError::NotFound(*digest))
            }
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, CasError> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CasError::NotFound(*digest),
            _ => io_at(&path)(e),
        })
    }

    /// Reads a whole blob into memory (manifests, configs).
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, CasError> {
        let mut bytes = Vec::new();
        let path = self.path(digest);
        self.open_blob(digest)?.read_to_end(&mut bytes).map_err(io_at(&path))?;
        Ok(bytes)
    }

    /// Stores bytes, checking them against `expected` when given.
    pub fn put(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<BlobInfo, CasError> {
        let mut ingest = self.ingest()?;
        ingest.write_all(bytes).map_err(io_at(&ingest.tmp))?;
        ingest.commit(expected)
    }

    /// Copies everything from `reader` into the store.
    pub fn put_reader(&self, reader: &mut dyn Read, expected: Option<&Digest>) -> Result<BlobInfo, CasError> {
        let mut ingest = self.ingest()?;
        io::copy(reader, &mut ingest).map_err(io_at(&ingest.tmp))?;
        ingest.commit(expected)
    }

    /// Starts a streaming write; [`Ingest::commit`] publishes it.
    pub fn ingest(&self) -> Result<Ingest<'_>, CasError> {
        let n = INGEST_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let tmp = self.ingest_dir().join(format!("{}-{n}-{nanos}", std::process::id()));
        let file = File::create(&tmp).map_err(io_at(&tmp))?;
        Ok(Ingest { store: self, file: Some(file), tmp, hasher: Sha256Writer::new(), size: 0 })
    }

    /// Re-hashes a stored blob; a mismatch deletes it and reports the corruption.
    pub fn verify(&self, digest: &Digest) -> Result<BlobInfo, CasError> {
        let path = self.path(digest);
        let mut hasher = Sha256Writer::new();
        let size = io::copy(&mut self.open_blob(digest)?, &mut hasher).map_err(io_at(&path))?;
        let actual = hasher.finish();
        if actual != *digest {
            self.delete(digest)?;
            return Err(CasError::DigestMismatch { expected: *digest, actual, size });
        }
        Ok(BlobInfo { digest: *digest, size })
    }

    /// Removes a blob; absent blobs are not an error.
    pub fn delete(&self, digest: &Digest) -> Result<(), CasError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
        self.index.delete(INDEX_TREE, digest.hex().as_bytes())?;
        Ok(())
    }

    /// Every indexed blob.
    pub fn list(&self) -> Result<Vec<BlobInfo>, CasError> {
        let mut blobs = Vec::new();
        for (key, value) in self.index.scan_prefix(INDEX_TREE, b"")? {
            let parsed = std::str::from_utf8(&key).ok().and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok());
            if let (Some(digest), Ok(size)) = (parsed, value.get(..8).unwrap_or_default().try_into()) {
                blobs.push(BlobInfo { digest, size: u64::from_be_bytes(size) });
            }
        }
        Ok(blobs)
    }

    fn record(&self, digest: Digest, size: u64) -> Result<(), CasError> {
        let added = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut value = size.to_be_bytes().to_vec();
        value.extend_from_slice(&added.to_be_bytes());
        self.index.put(INDEX_TREE, digest.hex().as_bytes(), &value)?;
        Ok(())
    }
}

/// A blob being written; dropped without [`Ingest::commit`], it leaves nothing behind.
pub struct Ingest<'a> {
    store: &'a BlobStore,
    file: Option<File>,
    tmp: PathBuf,
    hasher: Sha256Writer,
    size: u64,
}

impl Ingest<'_> {
    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Verifies the digest (when expected), syncs and publishes the blob under its digest.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<BlobInfo, CasError> {
        let (file, info) = self.close(expected)?;
        file.sync_all().map_err(io_at(&self.tmp))?;
        drop(file);
        let tmp = std::mem::take(&mut self.tmp);
        self.store.publish_one(&tmp, info)
    }

    /// Verifies the digest (when expected) and closes the blob without syncing it, for
    /// [`BlobStore::publish`] to sync a whole batch at once.
    pub fn finish_unsynced(mut self, expected: Option<&Digest>) -> Result<Unsynced, CasError> {
        let (file, info) = self.close(expected)?;
        drop(file);
        Ok(Unsynced { tmp: std::mem::take(&mut self.tmp), info })
    }

    fn close(&mut self, expected: Option<&Digest>) -> Result<(File, BlobInfo), CasError> {
        let file = self.file.take().expect("closed once");
        let actual = std::mem::take(&mut self.hasher).finish();
        if let Some(expected) = expected
            && *expected != actual
        {
            return Err(CasError::DigestMismatch { expected: *expected, actual, size: self.size });
        }
        Ok((file, BlobInfo { digest: actual, size: self.size }))
    }
}

/// A blob written and verified but not synced or published yet; dropped unpublished, it
/// leaves nothing behind.
pub struct Unsynced {
    tmp: PathBuf,
    info: BlobInfo,
}

impl Drop for Unsynced {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

impl BlobStore {
    /// Makes `blobs` durable with one sync of the store's filesystem (instead of one fsync
    /// per blob: thousands of small context files) and publishes them.
    pub fn publish(&self, blobs: Vec<Unsynced>) -> Result<Vec<BlobInfo>, CasError> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        let dir = self.ingest_dir();
        let handle = File::open(&dir).map_err(io_at(&dir))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&handle))
            .map_err(|e| CasError::Io { path: dir.clone(), source: e.into() })?;
        blobs
            .into_iter()
            .map(|mut blob| {
                let tmp = std::mem::take(&mut blob.tmp);
                self.publish_one(&tmp, blob.info)
            })
            .collect()
    }

    fn publish_one(&self, tmp: &Path, info: BlobInfo) -> Result<BlobInfo, CasError> {
        let dest = self.path(&info.digest);
        fs::rename(tmp, &dest).map_err(io_at(&dest))?;
        self.record(info.digest, info.size)?;
        Ok(info)
    }
}

impl Write for Ingest<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("not committed").write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for Ingest<'_> {
    fn drop(&mut self) {
        if self.file.is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests;
