//! Where a cache lives: the one blob-store interface ([`CacheStore`]) over a registry
//! repository or an object store (S3, a directory, memory), each named as records cite it.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use kiln_cas::BlobStore;
use kiln_registry::{Descriptor, RegistryClient};
use kiln_types::{Digest, ImageReference};

use crate::CacheError;

/// The largest cache manifest read (one names every layer blob of the cache: a million of
/// them fit).
pub const MAX_MANIFEST: u64 = 256 << 20;

/// A boxed future borrowing the store.
pub type Fut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A cache's blobs and its manifest. Blobs move between the store and a node's blob store,
/// verified against their digest on the way in.
pub trait CacheStore: Send + Sync {
    /// How records and messages name the cache (`registry:REF`, `s3:BUCKET/NAME`, `local:DIR`).
    fn label(&self) -> &str;

    /// The cache manifest, or `None` when nothing was exported there yet.
    fn read_manifest(&self) -> Fut<'_, Result<Option<Vec<u8>>, CacheError>>;

    /// Replaces the cache manifest (its blobs are stored already).
    fn write_manifest(&self, manifest: Vec<u8>) -> Fut<'_, Result<(), CacheError>>;

    /// Copies a blob into `cas` unless it is there, checking digest and size.
    fn fetch_blob<'a>(&'a self, blob: &'a Descriptor, cas: &'a Arc<BlobStore>) -> Fut<'a, Result<(), CacheError>>;

    /// Whether the cache holds the blob.
    fn has_blob<'a>(&'a self, blob: &'a Descriptor) -> Fut<'a, Result<bool, CacheError>>;

    /// Copies a blob of `cas` into the cache unless the cache has it; returns whether it
    /// was sent.
    fn push_blob<'a>(&'a self, blob: &'a Descriptor, cas: &'a Arc<BlobStore>) -> Fut<'a, Result<bool, CacheError>>;

    /// Whether the blobs the current manifest names are certainly there: the store keeps
    /// what a manifest references (a registry does, and refuses a manifest naming a blob it
    /// lacks), so an export need not check them again. An object store does not: a
    /// lifecycle rule may expire blobs under a manifest.
    fn keeps_manifest_blobs(&self) -> bool {
        false
    }
}

/// A cache in a registry repository: blobs are the repository's, the manifest is tagged.
pub struct RegistryStore {
    label: String,
    reference: ImageReference,
    client: RegistryClient,
}

impl RegistryStore {
    /// The cache tagged `reference`, called `label` in records and messages.
    pub fn new(label: String, reference: &str, client: RegistryClient) -> Result<RegistryStore, CacheError> {
        let reference: ImageReference = reference.parse().map_err(|e| CacheError::new(&label, "parsing ref", e))?;
        Ok(RegistryStore { label, reference, client })
    }
}

impl CacheStore for RegistryStore {
    fn label(&self) -> &str {
        &self.label
    }

    fn read_manifest(&self) -> Fut<'_, Result<Option<Vec<u8>>, CacheError>> {
        Box::pin(async move {
            self.client.manifest_bytes(&self.reference).await.map_err(|e| CacheError::new(&self.label, "reading", e))
        })
    }

    fn write_manifest(&self, manifest: Vec<u8>) -> Fut<'_, Result<(), CacheError>> {
        Box::pin(async move {
            self.client
                .push_manifest(&self.reference, &manifest)
                .await
                .map_err(|e| CacheError::new(&self.label, "writing the manifest", e))
        })
    }

    fn fetch_blob<'a>(&'a self, blob: &'a Descriptor, cas: &'a Arc<BlobStore>) -> Fut<'a, Result<(), CacheError>> {
        Box::pin(async move {
            self.client
                .fetch_blob(&self.reference, blob, cas)
                .await
                .map_err(|e| CacheError::new(&self.label, "fetching", e))
        })
    }

    fn has_blob<'a>(&'a self, blob: &'a Descriptor) -> Fut<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            self.client
                .blob_exists(&self.reference, &blob.digest)
                .await
                .map_err(|e| CacheError::new(&self.label, "checking", e))
        })
    }

    fn push_blob<'a>(&'a self, blob: &'a Descriptor, cas: &'a Arc<BlobStore>) -> Fut<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            self.client
                .push_blob(&self.reference, blob, cas)
                .await
                .map_err(|e| CacheError::new(&self.label, "pushing", e))
        })
    }

    fn keeps_manifest_blobs(&self) -> bool {
        true
    }
}

/// Named objects: what S3, a directory and the in-memory twin have in common. Errors are
/// the reasons, which the cache wraps with its label and the object's key.
pub trait ObjectStore: Send + Sync {
    /// A small object's bytes, `None` when it does not exist; one larger than `max` bytes is
    /// an error, never read.
    fn get(&self, key: String, max: u64) -> Fut<'_, Result<Option<Vec<u8>>, String>>;
    /// Writes a small object.
    fn put(&self, key: String, bytes: Vec<u8>) -> Fut<'_, Result<(), String>>;
    /// Whether the object exists.
    fn exists(&self, key: String) -> Fut<'_, Result<bool, String>>;
    /// Streams an object into `cas` as the blob `blob`: its digest is checked, and no more
    /// than one byte past its size is read. Returns the bytes stored.
    fn download<'a>(
        &'a self,
        key: String,
        blob: &'a Descriptor,
        cas: &'a Arc<BlobStore>,
    ) -> Fut<'a, Result<u64, String>>;
    /// Uploads a file as the object.
    fn upload(&self, key: String, file: PathBuf, size: u64) -> Fut<'_, Result<(), String>>;
}

/// A cache over an object store: `PREFIX/blobs/sha256/HEX` and `PREFIX/manifests/NAME`.
pub struct ObjectCache<S> {
    label: String,
    objects: S,
    prefix: String,
    name: String,
}

impl<S: ObjectStore> ObjectCache<S> {
    /// The cache `name` under `prefix` (empty or ending with `/`) of `objects`, called
    /// `label` in records and messages.
    pub fn new(label: String, objects: S, prefix: &str, name: &str) -> ObjectCache<S> {
        ObjectCache { label, objects, prefix: prefix.to_string(), name: name.to_string() }
    }

    fn blob_key(&self, digest: &Digest) -> String {
        format!("{}blobs/sha256/{}", self.prefix, digest.hex())
    }

    fn manifest_key(&self) -> String {
        format!("{}manifests/{}", self.prefix, self.name)
    }

    /// The object store itself.
    pub fn objects(&self) -> &S {
        &self.objects
    }
}

impl<S: ObjectStore> CacheStore for ObjectCache<S> {
    fn label(&self) -> &str {
        &self.label
    }

    fn read_manifest(&self) -> Fut<'_, Result<Option<Vec<u8>>, CacheError>> {
        Box::pin(async move {
            let key = self.manifest_key();
            let read = self.objects.get(key.clone(), MAX_MANIFEST).await;
            read.map_err(|e| CacheError::new(&self.label, &format!("reading {key}"), e))
        })
    }

    fn write_manifest(&self, manifest: Vec<u8>) -> Fut<'_, Result<(), CacheError>> {
        Box::pin(async move {
            let key = self.manifest_key();
            self.objects
                .put(key.clone(), manifest)
                .await
                .map_err(|e| CacheError::new(&self.label, &format!("writing {key}"), e))
        })
    }

    fn fetch_blob<'a>(&'a self, blob: &'a Descriptor, cas: &'a Arc<BlobStore>) -> Fut<'a, Result<(), CacheError>> {
        Box::pin(async move {
            if cas.contains(&blob.digest) {
                return Ok(());
            }
            let key = self.blob_key(&blob.digest);
            let error = |e| CacheError::new(&self.label, &format!("fetching {key}"), e);
            let stored = self.objects.download(key.clone(), blob, cas).await.map_err(error)?;
            // The content is the blob (its digest matched); a size that differs is a cache that
            // describes its blobs wrongly.
            if stored != blob.size {
                return Err(error(format!("{stored} bytes, the cache says {}", blob.size)));
            }
            Ok(())
        })
    }

    fn has_blob<'a>(&'a self, blob: &'a Descriptor) -> Fut<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            let key = self.blob_key(&blob.digest);
            self.objects
                .exists(key.clone())
                .await
                .map_err(|e| CacheError::new(&self.label, &format!("checking {key}"), e))
        })
    }

    fn push_blob<'a>(&'a self, blob: &'a Descriptor, cas: &'a Arc<BlobStore>) -> Fut<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            let key = self.blob_key(&blob.digest);
            let error = |e| CacheError::new(&self.label, &format!("pushing {key}"), e);
            if self.objects.exists(key.clone()).await.map_err(error)? {
                return Ok(false);
            }
            self.objects.upload(key.clone(), cas.path(&blob.digest), blob.size).await.map_err(error)?;
            Ok(true)
        })
    }
}

/// Objects as files under a directory (`type=local`). Writes go to a temporary file first
/// and are renamed into place, so a reader never sees half an object.
pub struct DirObjects {
    dir: PathBuf,
}

impl DirObjects {
    /// Objects under `dir` (created on the first write).
    pub fn new(dir: &Path) -> DirObjects {
        DirObjects { dir: dir.to_path_buf() }
    }
}

/// Runs blocking file work off the async threads; the error names the path.
async fn blocking<T: Send + 'static>(
    path: PathBuf,
    work: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(move || work(&path).map_err(|e| format!("{}: {e}", path.display())))
        .await
        .map_err(|e| e.to_string())?
}

/// Writes `path` atomically from what `fill` writes into a temporary file beside it.
fn write_atomically(path: &Path, fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    fill(temp.as_file_mut())?;
    // Readable by whoever reads the directory (a CI job uploading it, another daemon).
    std::fs::set_permissions(temp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl ObjectStore for DirObjects {
    fn get(&self, key: String, max: u64) -> Fut<'_, Result<Option<Vec<u8>>, String>> {
        Box::pin(blocking(self.dir.join(key), move |path| {
            let file = match std::fs::File::open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes)?;
            if bytes.len() as u64 > max {
                return Err(std::io::Error::other(format!("larger than {max} bytes")));
            }
            Ok(Some(bytes))
        }))
    }

    fn put(&self, key: String, bytes: Vec<u8>) -> Fut<'_, Result<(), String>> {
        Box::pin(blocking(self.dir.join(key), move |path| write_atomically(path, |file| file.write_all(&bytes))))
    }

    fn exists(&self, key: String) -> Fut<'_, Result<bool, String>> {
        Box::pin(blocking(self.dir.join(key), |path| path.try_exists()))
    }

    fn download<'a>(
        &'a self,
        key: String,
        blob: &'a Descriptor,
        cas: &'a Arc<BlobStore>,
    ) -> Fut<'a, Result<u64, String>> {
        let (cas, digest, size) = (Arc::clone(cas), blob.digest, blob.size);
        Box::pin(blocking(self.dir.join(key), move |path| {
            let file = std::io::Read::take(std::fs::File::open(path)?, size + 1);
            let stored = cas.put_reader(&mut std::io::BufReader::new(file), Some(&digest));
            stored.map(|info| info.size).map_err(std::io::Error::other)
        }))
    }

    fn upload(&self, key: String, file: PathBuf, _size: u64) -> Fut<'_, Result<(), String>> {
        Box::pin(blocking(self.dir.join(key), move |path| {
            write_atomically(path, |out| {
                let mut source = std::fs::File::open(&file)?;
                std::io::copy(&mut source, out).map(drop)
            })
        }))
    }
}

/// Objects in memory: the twin of S3 and directories in tests. Every operation fails while
/// [`MemoryObjects::fail`] is set, as an unreachable server would.
#[derive(Default)]
pub struct MemoryObjects {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Fail every operation.
    pub fail: std::sync::atomic::AtomicBool,
    /// Uploads so far.
    pub uploads: std::sync::atomic::AtomicUsize,
}

impl MemoryObjects {
    fn check(&self) -> Result<(), String> {
        match self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err("connection refused (injected)".into()),
            false => Ok(()),
        }
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes an object (a blob lost from the cache).
    pub fn remove(&self, key: &str) -> bool {
        self.objects().remove(key).is_some()
    }

    /// The keys stored.
    pub fn keys(&self) -> Vec<String> {
        self.objects().keys().cloned().collect()
    }
}

impl ObjectStore for MemoryObjects {
    fn get(&self, key: String, max: u64) -> Fut<'_, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            self.check()?;
            let object = self.objects().get(&key).cloned();
            match object {
                Some(bytes) if bytes.len() as u64 > max => Err(format!("{key}: larger than {max} bytes")),
                other => Ok(other),
            }
        })
    }

    fn put(&self, key: String, bytes: Vec<u8>) -> Fut<'_, Result<(), String>> {
        Box::pin(async move {
            self.check()?;
            self.objects().insert(key, bytes);
            Ok(())
        })
    }

    fn exists(&self, key: String) -> Fut<'_, Result<bool, String>> {
        Box::pin(async move {
            self.check()?;
            Ok(self.objects().contains_key(&key))
        })
    }

    fn download<'a>(
        &'a self,
        key: String,
        blob: &'a Descriptor,
        cas: &'a Arc<BlobStore>,
    ) -> Fut<'a, Result<u64, String>> {
        Box::pin(async move {
            self.check()?;
            let bytes = self.objects().get(&key).cloned().ok_or_else(|| format!("{key}: no such object"))?;
            cas.put(&bytes, Some(&blob.digest)).map(|info| info.size).map_err(|e| e.to_string())
        })
    }

    fn upload(&self, key: String, file: PathBuf, _size: u64) -> Fut<'_, Result<(), String>> {
        Box::pin(async move {
            self.check()?;
            let bytes = tokio::fs::read(&file).await.map_err(|e| format!("{}: {e}", file.display()))?;
            self.objects().insert(key, bytes);
            self.uploads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        })
    }
}
