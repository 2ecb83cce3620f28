//! Moving layers and context files between machines: a layer travels as its uncompressed
//! tar, named by that tar's digest (its diff id), and is stored in the blob store on both
//! ends, so any worker that holds it can serve it to the next one.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_cache::{CacheHit, CacheStore, CachedLayer};
use kiln_cas::BlobStore;
use kiln_layer::{Compression, LayerBlob, LayerId, TarOptions};
use kiln_model::{BoxFuture, CacheDirection, CacheSpec, LayerDesc, TierBlob};
use kiln_telemetry::{Direction, Transfer, metrics};
use kiln_types::Digest;

use crate::source::compression_of;
use crate::{Snapshot, StoreError, Stores};

/// Fetches a blob by digest from one of `peers` (blob service addresses) into a store,
/// verifying the digest.
pub trait BlobFetcher: Send + Sync {
    /// Fetches `digest` into `store`. The error is the reason as the transport tells it
    /// (each peer's), which [`StoreError::Fetch`] carries with the digest.
    fn fetch(&self, digest: Digest, peers: Vec<String>, store: Arc<BlobStore>) -> BoxFuture<Result<(), String>>;
}

impl Stores {
    /// The snapshot's layers as content: each is exported as an uncompressed tar into the
    /// blob store once (cached), where peers can fetch it by its diff id.
    pub async fn describe(&self, snapshot: &Snapshot) -> Result<Vec<LayerDesc>, StoreError> {
        let (snapshots, cas, layers) = (Arc::clone(&self.snapshots), Arc::clone(&self.cas), snapshot.layers.clone());
        tokio::task::spawn_blocking(move || {
            layers
                .iter()
                .map(|id| {
                    let blob = snapshots
                        .export(id, &cas, Compression::None, &TarOptions::default())
                        .map_err(|source| StoreError::Layer { layer: id.to_string(), source })?;
                    Ok(LayerDesc { diff_id: blob.digest, size: blob.size })
                })
                .collect()
        })
        .await?
    }

    /// The local chain for `layers`, fetching the ones this worker lacks from the peers in
    /// `sources`, or from the shared cache's blob in `tier` when no peer serves it
    /// (concurrent requests for one layer fetch it once).
    pub async fn ensure_layers(
        &self,
        layers: &[LayerDesc],
        sources: &HashMap<Digest, Vec<String>>,
        tier: &HashMap<Digest, TierBlob>,
        fetcher: &dyn BlobFetcher,
    ) -> Result<Snapshot, StoreError> {
        let mut chain = Vec::with_capacity(layers.len());
        for layer in layers {
            let peers = sources.get(&layer.diff_id).cloned().unwrap_or_default();
            let id = match (self.ensure_layer(layer, peers, fetcher).await, tier.get(&layer.diff_id)) {
                (Ok(id), _) => id,
                // No peer has it any more: the shared cache does.
                (Err(StoreError::Unavailable(_) | StoreError::Fetch { .. }), Some(blob)) => {
                    self.ensure_from_tier(layer.diff_id, blob).await?
                }
                (Err(error), _) => return Err(error),
            };
            chain.push(id);
        }
        Ok(Snapshot { layers: chain })
    }

    async fn ensure_layer(
        &self,
        layer: &LayerDesc,
        peers: Vec<String>,
        fetcher: &dyn BlobFetcher,
    ) -> Result<LayerId, StoreError> {
        let diff_id = layer.diff_id;
        // Peers serve a layer as its uncompressed tar, named by its diff id.
        let fetch = async {
            if peers.is_empty() {
                return Err(StoreError::Unavailable(diff_id));
            }
            fetcher.fetch(diff_id, peers, Arc::clone(&self.cas)).await.map_err(|reason| StoreError::Fetch {
                what: "layer",
                digest: diff_id,
                reason,
            })?;
            metrics().transferred(Transfer::Peer, Direction::In, layer.size);
            Ok(())
        };
        self.ensure_layer_from(diff_id, diff_id, None, fetch).await
    }

    /// A layer from a shared cache's blob (the cache opened once per node).
    async fn ensure_from_tier(&self, diff_id: Digest, blob: &TierBlob) -> Result<LayerId, StoreError> {
        let failed = |reason: String| StoreError::Fetch { what: "layer", digest: diff_id, reason };
        let store = self.tier_store(&blob.cache).await.map_err(failed)?;
        self.ensure_cached_layer(&CachedLayer::from_tier(diff_id, None, blob), store.as_ref()).await
    }

    /// The cache a spec names, opened once.
    pub(crate) async fn tier_store(&self, spec: &str) -> Result<Arc<dyn CacheStore>, String> {
        let mut stores = self.tiers.lock().await;
        if let Some(store) = stores.get(spec) {
            return Ok(Arc::clone(store));
        }
        // An export spec (a directory as dest=) names the same cache.
        let parsed = CacheSpec::parse(spec, CacheDirection::From)
            .or_else(|_| CacheSpec::parse(spec, CacheDirection::To))
            .map_err(|e| e.to_string())?;
        let store = kiln_cache::open(&parsed, None, &self.registry).await.map_err(|e| e.to_string())?;
        stores.insert(spec.to_string(), Arc::clone(&store));
        Ok(store)
    }

    /// The layer with `diff_id`, unpacked from the blob `blob` (fetched by `fetch` when the
    /// blob store lacks it) unless the snapshot store has it already; concurrent requests for
    /// one layer unpack it once. `origin`, when given, is remembered as the blob the layer
    /// exports as.
    async fn ensure_layer_from(
        &self,
        diff_id: Digest,
        blob: Digest,
        origin: Option<LayerBlob>,
        fetch: impl Future<Output = Result<(), StoreError>>,
    ) -> Result<LayerId, StoreError> {
        let failed = move |source| StoreError::Layer { layer: diff_id.to_string(), source };
        let lookup = |snapshots: &kiln_layer::SnapshotStore| snapshots.layer_for_diff_id(&diff_id).map_err(failed);
        if let Some(id) = lookup(&self.snapshots)? {
            return Ok(id);
        }
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(fetching.entry(diff_id).or_default())
        };
        let _guard = lock.lock().await;
        let result = async {
            if let Some(id) = lookup(&self.snapshots)? {
                return Ok(id);
            }
            if !self.cas.contains(&blob) {
                fetch.await?;
            }
            let (snapshots, cas) = (Arc::clone(&self.snapshots), Arc::clone(&self.cas));
            tokio::task::spawn_blocking(move || {
                let id = snapshots.import_layer(cas.open_blob(&blob)?, Some(&diff_id)).map_err(failed)?;
                if let Some(origin) = &origin {
                    snapshots.record_origin(origin).map_err(failed)?;
                }
                Ok(id)
            })
            .await?
        }
        .await;
        self.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&diff_id);
        result
    }

    /// The local chain of a result imported from a cache: each layer this node lacks is
    /// fetched from the cache (verified) and unpacked, and keeps the blob it came as for
    /// image exports. A layer the cache does not have is an error naming it and the cache.
    pub async fn import_cached(&self, hit: &CacheHit) -> Result<Snapshot, StoreError> {
        let mut chain = Vec::with_capacity(hit.layers.len());
        for layer in &hit.layers {
            chain.push(self.ensure_cached_layer(layer, hit.store.as_ref()).await?);
        }
        Ok(Snapshot { layers: chain })
    }

    /// One layer of a cache: fetched (verified) unless a layer with its diff id is here,
    /// unpacked, and keeping the blob it came as for image exports.
    async fn ensure_cached_layer(&self, layer: &CachedLayer, store: &dyn CacheStore) -> Result<LayerId, StoreError> {
        let origin = compression_of(&layer.blob.media_type).map(|compression| LayerBlob {
            digest: layer.blob.digest,
            diff_id: layer.diff_id,
            size: layer.blob.size,
            compression,
            tar_size: layer.tar_size,
        });
        let fetch = async {
            store.fetch_blob(&layer.blob, &self.cas).await.map_err(|e| StoreError::Fetch {
                what: "layer",
                digest: layer.diff_id,
                reason: e.to_string(),
            })?;
            metrics().transferred(Transfer::Shared, Direction::In, layer.blob.size);
            Ok(())
        };
        self.ensure_layer_from(layer.diff_id, layer.blob.digest, origin, fetch).await
    }

    /// Fetches the blobs among `blobs` (digest, size) that the store lacks from `address`.
    pub async fn ensure_blobs(
        &self,
        blobs: &[(Digest, u64)],
        address: &str,
        fetcher: &dyn BlobFetcher,
    ) -> Result<(), StoreError> {
        for (digest, size) in blobs {
            if !self.cas.contains(digest) {
                fetcher
                    .fetch(*digest, vec![address.to_string()], Arc::clone(&self.cas))
                    .await
                    .map_err(|reason| StoreError::Fetch { what: "context file", digest: *digest, reason })?;
                metrics().transferred(Transfer::Peer, Direction::In, *size);
            }
        }
        Ok(())
    }
}
