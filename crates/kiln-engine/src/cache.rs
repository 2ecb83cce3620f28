//! A build's remote caches: `--cache-from` (and a coordinator's shared tier) read before the
//! solve, so the solver imports a vertex's result from them instead of executing it;
//! `--cache-to` (and the shared tier) written after it.
//!
//! Standalone, an imported result is fetched and unpacked here. On a coordinator it stays
//! where the cache holds it: the cluster records the cache's blob of each layer, and the
//! worker whose step needs it fetches it from there.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use kiln_cache::{CacheStore, CachedLayer, ExportRecord, Imports, Merge};
use kiln_cluster::{ImportFn, TierHit};
use kiln_dockerfile::BuildPlan;
use kiln_graph::Op;
use kiln_layer::{Compression, TarOptions};
use kiln_model::{
    BuildEvent, BuildRequest, CacheCompression, CacheLocation, CacheMode, CacheSpec, LayerDesc, Layers, PushTarget,
    VertexRecord,
};
use kiln_registry::Descriptor;
use kiln_types::Digest;
use kiln_worker::Snapshot;
use tokio::sync::mpsc;

use crate::error::BuildError;
use crate::export::tar_options;
use crate::{Engine, Mode};

/// Each finished vertex's cache key and result, by vertex digest.
pub(crate) type VertexOutputs<O> = HashMap<Digest, (Digest, O)>;

/// How records and workers name the coordinator's shared tier.
const SHARED: &str = "shared";

/// The caches a build imports, read.
pub(crate) struct BuildImports {
    imports: Arc<Imports>,
    /// Each cache's spec by label, for workers to open it.
    specs: HashMap<String, String>,
}

impl Engine {
    /// Refuses a `type=local` cache the daemon would read or write for someone else: a
    /// client over TCP (its directory is on its own machine), or any client of a coordinator
    /// (whose workers could not reach the directory).
    pub(crate) fn check_caches(&self, request: &BuildRequest) -> Result<(), BuildError> {
        let remote = request.context_manifest.is_some() || matches!(self.mode, Mode::Cluster { .. });
        let local = request
            .cache_from
            .iter()
            .chain(&request.cache_to)
            .find(|s| matches!(s.location, CacheLocation::Local { .. }));
        match local {
            Some(spec) if remote => Err(BuildError::LocalCache(spec.source())),
            _ => Ok(()),
        }
    }

    /// The request's caches `specs` and the shared tier (first on import, last on export,
    /// so the tier's records win and the build's own cache is written first), each with the
    /// label the shared tier goes by.
    fn with_shared<'a>(
        &'a self,
        specs: &'a [CacheSpec],
        shared_first: bool,
    ) -> Vec<(&'a CacheSpec, Option<&'static str>)> {
        let shared = self.shared_cache.iter().map(|spec| (spec, Some(SHARED)));
        let own = specs.iter().map(|spec| (spec, None));
        if shared_first { shared.chain(own).collect() } else { own.chain(shared).collect() }
    }

    /// Reads the caches the build imports (the shared tier first). One that cannot be
    /// opened or read is a warning naming it and why, and the build goes on without it.
    pub(crate) async fn import_caches(
        &self,
        request: &BuildRequest,
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> BuildImports {
        let wanted = self.with_shared(&request.cache_from, true);
        let mut specs = HashMap::new();
        // --no-cache imports nothing, so nothing is read.
        if wanted.is_empty() || request.no_cache {
            return BuildImports { imports: Arc::default(), specs };
        }
        let names: Vec<String> = wanted.iter().map(|(spec, label)| name(spec, *label)).collect();
        let step = self.step(progress, &format!("importing cache manifests from {}", names.join(", ")));
        let mut stores = Vec::new();
        let mut warnings = Vec::new();
        for (spec, label) in wanted {
            match kiln_cache::open(spec, label, self.stores.registry()).await {
                Ok(store) => {
                    specs.insert(store.label().to_string(), spec.to_string());
                    stores.push(store);
                }
                Err(error) => warnings.push(format!("{error}; importing without it")),
            }
        }
        let (imports, more) = Imports::load(&stores, self.stores.cas()).await;
        step.done();
        for warning in warnings.into_iter().chain(more) {
            self.step(progress, &format!("WARNING: {warning}")).done();
        }
        BuildImports { imports: Arc::new(imports), specs }
    }

    /// Writes the build's results to each cache it exports to. A failed export fails the
    /// build unless its spec says `ignore-error=true` (then it is a warning).
    pub(crate) async fn export_caches<O: Exported>(
        &self,
        request: &BuildRequest,
        plan: &BuildPlan,
        records: &[VertexRecord],
        outputs: &VertexOutputs<O>,
        results: &[Option<O>],
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<(), BuildError> {
        for (spec, label) in self.with_shared(&request.cache_to, false) {
            let step = self.step(progress, &format!("exporting cache to {}", name(spec, label)));
            match self.export_cache(spec, label, request, plan, records, outputs, results).await {
                Ok(()) => step.done(),
                Err(error) if spec.ignore_error => {
                    step.done();
                    self.step(progress, &format!("WARNING: {error} (ignore-error=true)")).done();
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn export_cache<O: Exported>(
        &self,
        spec: &CacheSpec,
        label: Option<&str>,
        request: &BuildRequest,
        plan: &BuildPlan,
        records: &[VertexRecord],
        outputs: &VertexOutputs<O>,
        results: &[Option<O>],
    ) -> Result<(), BuildError> {
        let options = tar_options(request)?;
        let compression = match spec.compression {
            CacheCompression::Gzip => Compression::Gzip,
            CacheCompression::Zstd => Compression::Zstd,
        };
        let sources: HashSet<Digest> =
            plan.graph.vertices.iter().filter(|v| matches!(v.op, Op::Source(_))).map(|v| v.digest).collect();
        let finals: Vec<Vec<String>> = results.iter().flatten().map(Exported::chain).collect();
        let target = spec.to_string();
        let mut keys = HashSet::new();
        let mut exported = Vec::new();
        for record in records {
            // Sources are not cached remotely: a context is sent again and an image resolved.
            let Some((key, output)) = outputs.get(&record.digest) else { continue };
            if sources.contains(&record.digest) || !keys.insert(*key) {
                continue;
            }
            // mode=min: the vertices whose results are layers of an exported result.
            let chain = output.chain();
            if spec.mode == CacheMode::Min && !finals.iter().any(|f| f.starts_with(&chain)) {
                continue;
            }
            let layers = output.cached_layers(self, &target, compression, options).await?;
            exported.push(ExportRecord { key: *key, platform: record.platform.clone().unwrap_or_default(), layers });
        }
        let store = kiln_cache::open(spec, label, self.stores.registry()).await?;
        // The shared tier gathers every build's records; a build's own cache holds its last
        // build per platform, as buildx's does.
        let merge = match label {
            Some(SHARED) => Merge::Accumulate(kiln_cache::MAX_SHARED_RECORDS),
            _ => Merge::ReplacePlatforms,
        };
        kiln_cache::export(store.as_ref(), exported.clone(), merge, self.stores.cas()).await?;
        // What the shared tier holds now can stand in for layers whose workers leave.
        if let (Some(SHARED), Mode::Cluster { cluster, .. }) = (label, &self.mode) {
            cluster.add_tier(exported.iter().flat_map(|r| &r.layers).map(|l| (l.diff_id, l.in_tier(&target))));
        }
        Ok(())
    }
}

/// How progress names a cache: its label when it has one, else its source.
fn name(spec: &CacheSpec, label: Option<&str>) -> String {
    label.map_or_else(|| spec.source(), String::from)
}

/// A result as an export sees it: its layer chain (to tell which results are layers of an
/// exported one) and its layers as blobs the export can write.
pub(crate) trait Exported: Sync {
    /// The chain, bottom first, as comparable names.
    fn chain(&self) -> Vec<String>;

    /// Its layers as blobs in this engine's blob store, or already in `target` (a spec).
    fn cached_layers(
        &self,
        engine: &Engine,
        target: &str,
        compression: Compression,
        options: TarOptions,
    ) -> impl Future<Output = Result<Vec<CachedLayer>, BuildError>> + Send;
}

/// A standalone result: layers of this engine's snapshot store.
impl Exported for Snapshot {
    fn chain(&self) -> Vec<String> {
        self.layers.iter().map(ToString::to_string).collect()
    }

    async fn cached_layers(
        &self,
        engine: &Engine,
        _target: &str,
        compression: Compression,
        options: TarOptions,
    ) -> Result<Vec<CachedLayer>, BuildError> {
        let blobs = engine.stores.export_layers(self, compression, options).await?;
        Ok(blobs
            .into_iter()
            .map(|blob| CachedLayer {
                blob: Descriptor::new(blob.compression.oci_media_type(), blob.digest, blob.size),
                diff_id: blob.diff_id,
                tar_size: blob.tar_size,
            })
            .collect())
    }
}

/// A cluster result: layers on workers or in the shared tier. Layers the target cache holds
/// already are named as they are there; otherwise the worker holding them pushes them to the
/// cache itself, and only when no worker can is the result brought here first.
impl Exported for Layers {
    fn chain(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.to_string()).collect()
    }

    async fn cached_layers(
        &self,
        engine: &Engine,
        target: &str,
        compression: Compression,
        options: TarOptions,
    ) -> Result<Vec<CachedLayer>, BuildError> {
        let Mode::Cluster { cluster, fetcher, .. } = &engine.mode else {
            unreachable!("cluster results exist only on a coordinator")
        };
        let there: Option<Vec<CachedLayer>> = self
            .layers
            .iter()
            .map(|l| {
                let blob = cluster.tier_blob(&l.diff_id).filter(|b| b.cache == target)?;
                Some(CachedLayer::from_tier(l.diff_id, Some(l.size), &blob))
            })
            .collect();
        if let Some(there) = there {
            return Ok(there);
        }
        let diff_ids: Vec<Digest> = self.layers.iter().map(|l| l.diff_id).collect();
        if let Some(worker) = cluster.holder_of_all(&diff_ids) {
            let compression = match compression {
                Compression::Zstd => CacheCompression::Zstd,
                _ => CacheCompression::Gzip,
            };
            let target = PushTarget::Cache(target.to_string());
            match cluster.push(&worker, diff_ids, target, compression, options.source_date_epoch).await {
                Ok(pushed) => {
                    return Ok(pushed
                        .into_iter()
                        .map(|l| CachedLayer {
                            blob: Descriptor::new(l.media_type, l.digest, l.size),
                            diff_id: l.diff_id,
                            tar_size: l.tar_size,
                        })
                        .collect());
                }
                Err(reason) => tracing::warn!("worker {worker} could not push to the cache: {reason}; exporting here"),
            }
        }
        let snapshot = engine.fetch_result(cluster, fetcher.as_ref(), self.clone()).await?;
        snapshot.cached_layers(engine, target, compression, options).await
    }
}

impl BuildImports {
    /// The solver's import lookup for a cluster build: a hit is used where its cache holds
    /// it, once every blob is seen to be there (each checked once per build).
    pub(crate) fn lookup(&self) -> Option<ImportFn> {
        if self.imports.is_empty() {
            return None;
        }
        let (imports, specs) = (Arc::clone(&self.imports), self.specs.clone());
        let seen: Arc<Mutex<HashSet<Digest>>> = Arc::default();
        Some(Arc::new(move |key: &Digest| {
            let hit = imports.get(key)?.clone();
            let spec = specs.get(hit.store.label())?.clone();
            let seen = Arc::clone(&seen);
            Some(Box::pin(async move {
                let store: &dyn CacheStore = hit.store.as_ref();
                for layer in &hit.layers {
                    if seen.lock().unwrap_or_else(|p| p.into_inner()).contains(&layer.blob.digest) {
                        continue;
                    }
                    if !store.has_blob(&layer.blob).await.map_err(|e| e.to_string())? {
                        return Err(format!("cache {}: blob {} is gone", store.label(), layer.blob.digest));
                    }
                    seen.lock().unwrap_or_else(|p| p.into_inner()).insert(layer.blob.digest);
                }
                let layers = hit
                    .layers
                    .iter()
                    .map(|l| {
                        // A cluster's layers are sized as their tars (the blob's size stands in
                        // when the exporter did not know it).
                        let size = l.tar_size.unwrap_or(l.blob.size);
                        (LayerDesc { diff_id: l.diff_id, size }, l.in_tier(&spec))
                    })
                    .collect();
                Ok(TierHit { layers, source: store.label().to_string() })
            }) as kiln_model::BoxFuture<_>)
        }))
    }

    /// The imported records, for a standalone build's worker.
    pub(crate) fn records(&self) -> Arc<Imports> {
        Arc::clone(&self.imports)
    }
}
