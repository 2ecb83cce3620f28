//! Source vertices: base images (pulled once, layers unpacked once) and build contexts.
//!
//! Errors are messages naming the image, path or pattern; `Worker::execute` wraps them with
//! the vertex into `WorkerError::Failed`.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;

use kiln_context::BuildContext;
use kiln_dockerfile::context::{ContextEntry, select};
use kiln_dockerfile::ignore::PatternList;
use kiln_graph::SourceOp;
use kiln_layer::{Compression, LayerBlob, LayerId};

use crate::{BuildInputs, Snapshot, StoreError, Stores, VertexOutput, Worker, blocking};

/// The entries of `context` a context source selects (`include` paths, minus `exclude`).
pub(crate) fn select_context<'a>(
    context: &'a dyn BuildContext,
    include: &[String],
    exclude: &[String],
) -> Result<Vec<&'a ContextEntry>, String> {
    let patterns = PatternList::new(exclude).map_err(|e| format!("--exclude: {e}"))?;
    select(context, include, &patterns).map_err(|e| e.to_string())
}

/// Each layer of a pulled image as the blob it was pulled as.
pub fn layer_origins(image: &kiln_registry::ResolvedImage) -> Vec<LayerBlob> {
    image
        .layers()
        .filter_map(|(layer, diff_id)| {
            let compression = compression_of(&layer.media_type)?;
            Some(LayerBlob { digest: layer.digest, diff_id: *diff_id, size: layer.size, compression, tar_size: None })
        })
        .collect()
}

/// The compression a layer media type names (OCI and Docker types); `None` for one Kiln does
/// not write (such a layer is exported as Kiln writes it).
pub(crate) fn compression_of(media_type: &str) -> Option<Compression> {
    match media_type {
        t if t.ends_with("+zstd") || t.ends_with(".tar.zstd") => Some(Compression::Zstd),
        t if t.ends_with("+gzip") || t.ends_with(".tar.gzip") => Some(Compression::Gzip),
        t if t.ends_with(".tar") || t.ends_with(".diff.tar") => Some(Compression::None),
        _ => None,
    }
}

impl Stores {
    /// Remembers the blobs an image's layers were pulled as (already in the blob store), so
    /// exports keep them (a coordinator pulls the base images of a build before exporting).
    pub async fn record_origins(&self, image: &kiln_registry::ResolvedImage) -> Result<(), StoreError> {
        let (snapshots, origins) = (Arc::clone(&self.snapshots), layer_origins(image));
        let recorded = tokio::task::spawn_blocking(move || {
            origins.iter().try_for_each(|origin| snapshots.record_origin(origin).map_err(StoreError::from))
        });
        recorded.await?
    }
}

impl Worker {
    pub(crate) async fn source(&self, source: &SourceOp, build: &BuildInputs) -> Result<VertexOutput, String> {
        match source {
            SourceOp::Image { reference, platform } => {
                let image = self.registry.pull(reference, platform, &self.cas).await.map_err(|e| e.to_string())?;
                let snapshots = Arc::clone(&self.snapshots);
                let cas = Arc::clone(&self.cas);
                let layers: Vec<_> = image.layers().map(|(layer, diff_id)| (layer.digest, *diff_id)).collect();
                let chain = blocking(move || {
                    let mut chain: Vec<LayerId> = Vec::with_capacity(layers.len());
                    for (digest, diff_id) in layers {
                        let blob = cas.open_blob(&digest).map_err(|e| e.to_string())?;
                        chain.push(
                            snapshots.import_layer(blob, Some(&diff_id)).map_err(|e| format!("layer {digest}: {e}"))?,
                        );
                    }
                    Ok(chain)
                })
                .await?;
                self.record_origins(&image).await.map_err(|e| e.to_string())?;
                Ok(VertexOutput { snapshot: Snapshot { layers: chain }, image: Some(image) })
            }
            SourceOp::Local { name, include, exclude, .. } => {
                // A nested build's or a directory context is known by the source vertex's
                // digest (a source has no inputs), the build's own by its name.
                let vertex = kiln_graph::vertex_digest(&kiln_graph::Op::Source(source.clone()), &[]);
                let context = build
                    .contexts
                    .get(&vertex.to_string())
                    .or_else(|| build.contexts.get(name))
                    .cloned()
                    .ok_or_else(|| format!("build context {name:?} was not provided"))?;
                let (include, exclude) = (include.clone(), exclude.clone());
                let snapshots = Arc::clone(&self.snapshots);
                let layers = blocking(move || {
                    let selected = select_context(context.as_ref(), &include, &exclude)?;
                    let active = snapshots.prepare(&[]).map_err(|e| e.to_string())?;
                    context
                        .materialize(&selected, &active.root())
                        .map_err(|e| format!("copying the build context: {e}"))?;
                    let layer = snapshots.commit(active).map_err(|e| e.to_string())?;
                    Ok(layer.into_iter().collect())
                })
                .await?;
                Ok(VertexOutput { snapshot: Snapshot { layers }, image: None })
            }
            SourceOp::Http { url, checksum, filename } => {
                let download =
                    self.registry.download(url, checksum.as_ref(), &self.cas).await.map_err(|e| e.to_string())?;
                let (snapshots, cas, filename) = (Arc::clone(&self.snapshots), Arc::clone(&self.cas), filename.clone());
                let layers = blocking(move || {
                    let active = snapshots.prepare(&[]).map_err(|e| e.to_string())?;
                    let target = active.root().join(filename.trim_start_matches('/'));
                    std::fs::copy(cas.path(&download.digest), &target).map_err(|e| format!("{filename}: {e}"))?;
                    // As BuildKit: downloaded files are 0600, owned by root, with a fixed time.
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| e.to_string())?;
                    let epoch = nix::sys::time::TimeSpec::new(0, 0);
                    nix::sys::stat::utimensat(
                        None,
                        &target,
                        &epoch,
                        &epoch,
                        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                    )
                    .map_err(|e| e.to_string())?;
                    Ok(snapshots.commit(active).map_err(|e| e.to_string())?.into_iter().collect())
                })
                .await?;
                Ok(VertexOutput { snapshot: Snapshot { layers }, image: None })
            }
            SourceOp::Git { remote, .. } => Err(format!("ADD from {remote}: git sources are not supported yet")),
        }
    }
}
