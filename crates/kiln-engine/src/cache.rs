//! A build's remote caches: `--cache-from` read before the solve (the solver imports a
//! vertex's result from them instead of executing it), `--cache-to` written after it.

use std::collections::{HashMap, HashSet};

use kiln_cache::{CachedLayer, ExportRecord, Imports};
use kiln_dockerfile::BuildPlan;
use kiln_graph::Op;
use kiln_layer::Compression;
use kiln_model::{BuildEvent, BuildRequest, CacheCompression, CacheMode, CacheSpec, VertexRecord};
use kiln_registry::Descriptor;
use kiln_types::Digest;
use kiln_worker::Snapshot;
use tokio::sync::mpsc;

use crate::Engine;
use crate::error::BuildError;
use crate::export::tar_options;

/// Each finished vertex's cache key and result, by vertex digest.
pub(crate) type VertexOutputs<O> = HashMap<Digest, (Digest, O)>;

impl Engine {
    /// Reads the caches the build imports. One that cannot be opened or read is a warning
    /// naming it and why, and the build goes on without it.
    pub(crate) async fn import_caches(
        &self,
        request: &BuildRequest,
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> Imports {
        if request.cache_from.is_empty() {
            return Imports::default();
        }
        let names: Vec<String> = request.cache_from.iter().map(CacheSpec::source).collect();
        let step = self.step(progress, &format!("importing cache manifests from {}", names.join(", ")));
        let mut stores = Vec::new();
        let mut warnings = Vec::new();
        for spec in &request.cache_from {
            match kiln_cache::open(spec, self.stores.registry()).await {
                Ok(store) => stores.push(store),
                Err(error) => warnings.push(format!("{error}; importing without it")),
            }
        }
        let (imports, more) = Imports::load(&stores, self.stores.cas()).await;
        step.done();
        for warning in warnings.into_iter().chain(more) {
            self.step(progress, &format!("WARNING: {warning}")).done();
        }
        imports
    }

    /// Writes the build's results to each `--cache-to`. A failed export fails the build
    /// unless its spec says `ignore-error=true` (then it is a warning).
    pub(crate) async fn export_caches(
        &self,
        request: &BuildRequest,
        plan: &BuildPlan,
        records: &[VertexRecord],
        outputs: &VertexOutputs<Snapshot>,
        results: &[Option<Snapshot>],
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<(), BuildError> {
        for spec in &request.cache_to {
            let step = self.step(progress, &format!("exporting cache to {}", spec.source()));
            match self.export_cache(spec, request, plan, records, outputs, results).await {
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

    async fn export_cache(
        &self,
        spec: &CacheSpec,
        request: &BuildRequest,
        plan: &BuildPlan,
        records: &[VertexRecord],
        outputs: &VertexOutputs<Snapshot>,
        results: &[Option<Snapshot>],
    ) -> Result<(), BuildError> {
        let options = tar_options(request)?;
        let compression = match spec.compression {
            CacheCompression::Gzip => Compression::Gzip,
            CacheCompression::Zstd => Compression::Zstd,
        };
        let sources: HashSet<Digest> =
            plan.graph.vertices.iter().filter(|v| matches!(v.op, Op::Source(_))).map(|v| v.digest).collect();
        let finals: Vec<&Snapshot> = results.iter().flatten().collect();
        let mut keys = HashSet::new();
        let mut exported = Vec::new();
        for record in records {
            // Sources are not cached remotely: a context is sent again and an image resolved.
            let Some((key, snapshot)) = outputs.get(&record.digest) else { continue };
            if sources.contains(&record.digest) || !keys.insert(*key) {
                continue;
            }
            // mode=min: the vertices whose results are layers of an exported result.
            if spec.mode == CacheMode::Min && !finals.iter().any(|f| f.layers.starts_with(&snapshot.layers)) {
                continue;
            }
            let blobs = self.stores.export_layers(snapshot, compression, options).await?;
            let layers = blobs
                .into_iter()
                .map(|blob| CachedLayer {
                    blob: Descriptor {
                        media_type: blob.compression.oci_media_type().into(),
                        digest: blob.digest,
                        size: blob.size,
                        platform: None,
                        annotations: Default::default(),
                    },
                    diff_id: blob.diff_id,
                })
                .collect();
            exported.push(ExportRecord { key: *key, platform: record.platform.clone().unwrap_or_default(), layers });
        }
        let store = kiln_cache::open(spec, self.stores.registry()).await?;
        kiln_cache::export(store.as_ref(), exported, self.stores.cas()).await?;
        Ok(())
    }
}
