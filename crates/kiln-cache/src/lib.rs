//! The shared cache tier: results exported to a registry, an S3 bucket or a directory, and
//! imported by any daemon or worker, so the cache outlives the node that built it.
//!
//! - [`format`]: Kiln's cache format, one OCI image manifest per cache whose config blob maps
//!   cache keys to result layers.
//! - [`CacheStore`]: where a cache lives, with [`RegistryStore`] and [`ObjectCache`] over
//!   [`S3Objects`], [`DirObjects`] or [`MemoryObjects`] (the in-memory twin for tests).
//! - [`Imports`]: the records of the caches a build imports, by key; [`export`] writes one.
//!
//! Invariants: a blob enters a node's blob store only through the store's verified writes
//! (digest and size checked), so a corrupt cache is a miss, never a wrong result; an export
//! writes every blob before the manifest that names them.

pub mod format;
mod s3;
mod store;

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::{StreamExt as _, TryStreamExt as _};
use kiln_cas::BlobStore;
use kiln_model::{CacheLocation, CacheSpec, TierBlob};
use kiln_registry::{Descriptor, RegistryClient};
use kiln_types::Digest;

pub use format::{CacheConfig, CacheLayer, CacheRecord, FormatError, MAX_SHARED_RECORDS, Merge};
pub use s3::{PART_SIZE, S3Objects};
pub use store::{CacheStore, DirObjects, Fut, MAX_MANIFEST, MemoryObjects, ObjectCache, ObjectStore, RegistryStore};

/// The largest cache config read (a few hundred bytes per record).
const MAX_CONFIG: u64 = 256 << 20;

/// Blobs moved at once by one export.
const PARALLEL_UPLOADS: usize = 16;

/// A cache operation that failed, naming the cache and what was being done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cache {cache}: {action}: {reason}")]
pub struct CacheError {
    /// The cache (`registry:REF`, `s3:BUCKET/NAME`, `local:DIR`).
    pub cache: String,
    /// What was being done.
    pub action: String,
    /// Why it failed.
    pub reason: String,
}

impl CacheError {
    /// An error of the cache `cache`.
    pub fn new(cache: &str, action: &str, reason: impl std::fmt::Display) -> CacheError {
        CacheError { cache: cache.to_string(), action: action.to_string(), reason: reason.to_string() }
    }
}

/// Opens the cache a spec names (an S3 client resolves its credentials here), called
/// `label` in records and messages (by default [`CacheSpec::source`]).
pub async fn open(
    spec: &CacheSpec,
    label: Option<&str>,
    registry: &RegistryClient,
) -> Result<Arc<dyn CacheStore>, CacheError> {
    let label = label.map_or_else(|| spec.source(), str::to_string);
    Ok(match &spec.location {
        CacheLocation::Registry { reference } => Arc::new(RegistryStore::new(label, reference, registry.clone())?),
        CacheLocation::S3 { bucket, region, endpoint_url, prefix, name, use_path_style } => {
            let objects = S3Objects::connect(bucket, region, endpoint_url.as_deref(), *use_path_style).await;
            Arc::new(ObjectCache::new(label, objects, prefix, name))
        }
        CacheLocation::Local { dir, name } => Arc::new(ObjectCache::new(label, DirObjects::new(dir), "", name)),
    })
}

/// A layer of a cached result: its blob and its diff id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    /// The blob as the cache stores it.
    pub blob: Descriptor,
    /// The digest of its uncompressed tar.
    pub diff_id: Digest,
    /// The size of its uncompressed tar, when known.
    pub tar_size: Option<u64>,
}

impl CachedLayer {
    /// The layer from a shared cache's blob.
    pub fn from_tier(diff_id: Digest, tar_size: Option<u64>, blob: &TierBlob) -> CachedLayer {
        CachedLayer { blob: Descriptor::new(blob.media_type.clone(), blob.digest, blob.size), diff_id, tar_size }
    }

    /// Where the cache `cache` (a spec) holds this layer, as assignments carry it.
    pub fn in_tier(&self, cache: &str) -> TierBlob {
        TierBlob {
            cache: cache.to_string(),
            digest: self.blob.digest,
            size: self.blob.size,
            media_type: self.blob.media_type.clone(),
        }
    }
}

/// A result an imported cache holds.
#[derive(Clone)]
pub struct CacheHit {
    /// Its layers, bottom first.
    pub layers: Vec<CachedLayer>,
    /// The cache that holds them.
    pub store: Arc<dyn CacheStore>,
}

/// The records of the caches a build imports, by cache key; the first cache that has a key
/// serves it.
#[derive(Clone, Default)]
pub struct Imports {
    hits: HashMap<Digest, CacheHit>,
}

impl Imports {
    /// Reads each cache's manifest and config (through `cas`). A cache that cannot be read is
    /// left out with a warning naming it and why; the build goes on without it.
    pub async fn load(stores: &[Arc<dyn CacheStore>], cas: &Arc<BlobStore>) -> (Imports, Vec<String>) {
        let mut imports = Imports::default();
        let mut warnings = Vec::new();
        for store in stores {
            match read_config(store.as_ref(), cas).await {
                Ok(Previous::Found(config)) => imports.add(store, config),
                Ok(Previous::Missing) => {
                    warnings.push(format!("cache {}: nothing was exported there yet", store.label()));
                }
                Ok(Previous::Unusable(error)) | Err(error) => warnings.push(format!("{error}; importing without it")),
            }
        }
        (imports, warnings)
    }

    fn add(&mut self, store: &Arc<dyn CacheStore>, config: CacheConfig) {
        for record in config.records {
            let layers = record
                .layers
                .iter()
                .map(|digest| {
                    let layer = &config.layers[digest]; // CacheConfig::parse checked it is there
                    CachedLayer { blob: layer.descriptor(*digest), diff_id: layer.diff_id, tar_size: layer.tar_size }
                })
                .collect();
            self.hits.entry(record.key).or_insert_with(|| CacheHit { layers, store: Arc::clone(store) });
        }
    }

    /// The imported result for a cache key.
    pub fn get(&self, key: &Digest) -> Option<&CacheHit> {
        self.hits.get(key)
    }

    /// How many keys the imported caches hold.
    pub fn len(&self) -> usize {
        self.hits.len()
    }

    /// Whether no imported cache holds anything.
    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }
}

/// What a cache holds before an export or for an import.
enum Previous {
    /// Nothing was exported there yet.
    Missing,
    /// A Kiln cache.
    Found(CacheConfig),
    /// A manifest that is not a readable Kiln cache (another format, a lost or corrupt
    /// config): an export replaces it.
    Unusable(CacheError),
}

/// The cache's config; an error when the store cannot be read (unreachable, refusing, or a
/// config blob it says it has but does not serve), never for content that is not a
/// readable Kiln cache.
async fn read_config(store: &dyn CacheStore, cas: &Arc<BlobStore>) -> Result<Previous, CacheError> {
    let Some(manifest) = store.read_manifest().await? else { return Ok(Previous::Missing) };
    let unusable =
        |reason: String| Ok(Previous::Unusable(CacheError::new(store.label(), "reading the manifest", reason)));
    let config = match format::config_of(&manifest) {
        Ok(config) if config.size > MAX_CONFIG => {
            return unusable(format!("its config is {} bytes, more than the {MAX_CONFIG} read", config.size));
        }
        Ok(config) => config,
        Err(error) => return unusable(error.to_string()),
    };
    if let Err(error) = store.fetch_blob(&config, cas).await {
        // A config the cache no longer has makes the cache unusable; one it cannot serve
        // now is the store failing.
        return match store.has_blob(&config).await {
            Ok(false) => unusable(format!("its config {} is gone", config.digest)),
            _ => Err(error),
        };
    }
    // Read and parsed off the async threads. (Configs stay in the blob store, where a
    // concurrent build may be reading the same one, until the blob store's GC.)
    let parsed = blocking(store, "reading the config", {
        let cas = Arc::clone(cas);
        move || cas.read(&config.digest).map(|bytes| CacheConfig::parse(&bytes))
    })
    .await?;
    match parsed {
        Ok(config) => Ok(Previous::Found(config)),
        Err(error) => unusable(error.to_string()),
    }
}

/// Blob-store work off the async threads; its error is the cache's.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    store: &dyn CacheStore,
    action: &str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, CacheError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|e| CacheError::new(store.label(), action, e)),
        Err(e) => Err(CacheError::new(store.label(), action, e)),
    }
}

/// One result an export writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRecord {
    /// Its cache key.
    pub key: Digest,
    /// The vertex's platform (empty when it has none).
    pub platform: String,
    /// Its layers, bottom first, as blobs of the node's blob store.
    pub layers: Vec<CachedLayer>,
}

/// What an export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportStats {
    /// Records written.
    pub records: usize,
    /// Layer blobs they name.
    pub blobs: usize,
    /// Blobs that had to be uploaded (the others were there).
    pub uploaded: usize,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
}

/// Writes `records` to the cache: their blobs (those it lacks), then the config and the
/// manifest, keeping what the cache held as `merge` says.
pub async fn export(
    store: &dyn CacheStore,
    records: Vec<ExportRecord>,
    merge: Merge,
    cas: &Arc<BlobStore>,
) -> Result<ExportStats, CacheError> {
    let mut new = CacheConfig { version: format::VERSION, ..CacheConfig::default() };
    let mut blobs = Vec::new();
    for record in &records {
        for layer in &record.layers {
            let described = CacheLayer {
                diff_id: layer.diff_id,
                size: layer.blob.size,
                media_type: layer.blob.media_type.clone(),
                tar_size: layer.tar_size,
            };
            if new.layers.insert(layer.blob.digest, described).is_none() {
                blobs.push(layer.blob.clone());
            }
        }
        new.records.push(CacheRecord {
            key: record.key,
            platform: record.platform.clone(),
            layers: record.layers.iter().map(|l| l.blob.digest).collect(),
        });
    }
    // A cache that cannot be read as Kiln's is overwritten; one that cannot be reached fails.
    let previous = match read_config(store, cas).await? {
        Previous::Found(config) => Some(config),
        Previous::Missing | Previous::Unusable(_) => None,
    };
    // Blobs the cache's manifest names are not checked again where the store keeps them.
    let (listed, blobs): (Vec<_>, Vec<_>) = blobs.into_iter().partition(|blob| {
        store.keeps_manifest_blobs() && previous.as_ref().is_some_and(|p| p.layers.contains_key(&blob.digest))
    });
    let merged = CacheConfig::merged(previous, new, merge);
    // The config goes up alongside the layers: only the manifest must wait for both.
    let config = async {
        let (manifest, info) = blocking(store, "storing the config", {
            let cas = Arc::clone(cas);
            move || {
                let config = merged.to_bytes();
                cas.put(&config, None).map(|info| (merged.manifest(&config), info))
            }
        })
        .await?;
        let config_blob = Descriptor::new(format::CACHE_CONFIG_MEDIA_TYPE, info.digest, info.size);
        store.push_blob(&config_blob, cas).await?;
        Ok(manifest)
    };
    let (mut uploads, manifest) = futures_util::future::try_join(push_blobs(store, &blobs, cas), config).await?;
    if let Err(error) = store.write_manifest(manifest.clone()).await {
        // The registry may have lost a listed blob (a manifest naming it is then refused):
        // check and send them, then write the manifest again.
        if listed.is_empty() {
            return Err(error);
        }
        uploads.extend(push_blobs(store, &listed, cas).await?);
        store.write_manifest(manifest).await?;
    }
    Ok(ExportStats {
        records: records.len(),
        blobs: blobs.len() + listed.len(),
        uploaded: uploads.iter().filter(|(sent, _)| *sent).count(),
        uploaded_bytes: uploads.iter().filter(|(sent, _)| *sent).map(|(_, size)| size).sum(),
    })
}

/// Sends the blobs the cache lacks, [`PARALLEL_UPLOADS`] at a time; returns for each
/// whether it was sent, and its size.
async fn push_blobs(
    store: &dyn CacheStore,
    blobs: &[Descriptor],
    cas: &Arc<BlobStore>,
) -> Result<Vec<(bool, u64)>, CacheError> {
    // Collected first: a closure inside the stream type trips the compiler's Send check for
    // callers that spawn this future. `buffered` keeps the order, to pair sizes back.
    let pushes: Vec<_> = blobs.iter().map(|blob| store.push_blob(blob, cas)).collect();
    let sent: Vec<bool> = futures_util::stream::iter(pushes).buffered(PARALLEL_UPLOADS).try_collect().await?;
    let metrics = kiln_telemetry::metrics();
    for (_, blob) in sent.iter().zip(blobs).filter(|(sent, _)| **sent) {
        metrics.transferred(kiln_telemetry::Transfer::Shared, kiln_telemetry::Direction::Out, blob.size);
    }
    Ok(sent.into_iter().zip(blobs.iter().map(|b| b.size)).collect())
}

#[cfg(test)]
mod tests;
