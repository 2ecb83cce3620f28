//! Results out of the snapshot store: layer blobs for images, and the plain files for
//! `type=local` and `type=tar`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_layer::{Compression, LayerBlob, TarOptions, write_layer_tar};
use kiln_model::{CacheCompression, PushRequest, PushTarget, PushedLayer};
use kiln_registry::Descriptor;
use kiln_telemetry::{Direction, Transfer, metrics};

use crate::fileop::copy_contents;
use crate::{Snapshot, StoreError, Stores};

impl Stores {
    /// Pushes layers this node holds (by diff id) straight to a cache or a registry
    /// repository, each blob once (what the target has already is not sent again), and says
    /// how each is stored there. The layers are held meanwhile (garbage collection leaves
    /// them); one that is not here is [`StoreError::Unavailable`].
    pub async fn push_layers(&self, push: &PushRequest) -> Result<Vec<PushedLayer>, StoreError> {
        let hold = self.snapshots.hold();
        let mut layers = Vec::with_capacity(push.layers.len());
        for diff_id in &push.layers {
            let failed = |source| StoreError::Layer { layer: diff_id.to_string(), source };
            let id = self.snapshots.layer_for_diff_id(diff_id).map_err(failed)?;
            let id = id.ok_or(StoreError::Unavailable(*diff_id))?;
            hold.add(std::slice::from_ref(&id)).map_err(|_| StoreError::Unavailable(*diff_id))?;
            layers.push(id);
        }
        let compression = match push.compression {
            CacheCompression::Gzip => Compression::Gzip,
            CacheCompression::Zstd => Compression::Zstd,
        };
        let options = TarOptions { source_date_epoch: push.source_date_epoch };
        let blobs = self.export_layers(&Snapshot { layers }, compression, options).await?;
        let descriptors: Vec<Descriptor> =
            blobs.iter().map(|b| Descriptor::new(b.compression.oci_media_type(), b.digest, b.size)).collect();
        match &push.target {
            PushTarget::Cache(spec) => {
                let failed = |reason: String| StoreError::Push { target: spec.clone(), reason };
                let store = self.tier_store(spec).await.map_err(failed)?;
                for blob in &descriptors {
                    if store.push_blob(blob, &self.cas).await.map_err(|e| failed(e.to_string()))? {
                        metrics().transferred(Transfer::Shared, Direction::Out, blob.size);
                    }
                }
            }
            PushTarget::Registry(reference) => {
                let failed = |reason: String| StoreError::Push { target: reference.clone(), reason };
                let image = reference.parse().map_err(|e: kiln_types::ReferenceError| failed(e.to_string()))?;
                for blob in &descriptors {
                    self.registry.push_blob(&image, blob, &self.cas).await.map_err(|e| failed(e.to_string()))?;
                }
            }
        }
        drop(hold);
        Ok(blobs
            .into_iter()
            .zip(descriptors)
            .map(|(blob, descriptor)| PushedLayer {
                diff_id: blob.diff_id,
                digest: blob.digest,
                size: blob.size,
                media_type: descriptor.media_type,
                tar_size: blob.tar_size,
            })
            .collect())
    }

    /// Each layer of the snapshot as a blob with this compression in the blob store (cached
    /// per layer); layers pulled from a registry or a cache are the blobs they came as.
    pub async fn export_layers(
        &self,
        snapshot: &Snapshot,
        compression: Compression,
        options: TarOptions,
    ) -> Result<Vec<LayerBlob>, StoreError> {
        let (snapshots, cas, layers) = (Arc::clone(&self.snapshots), Arc::clone(&self.cas), snapshot.layers.clone());
        tokio::task::spawn_blocking(move || {
            layers
                .iter()
                .map(|id| {
                    snapshots
                        .export_image_layer(id, &cas, compression, &options)
                        .map_err(|source| StoreError::Layer { layer: id.to_string(), source })
                })
                .collect()
        })
        .await?
    }

    /// Copies the snapshot's files into `dest` (created when missing), keeping owners,
    /// modes and times.
    pub async fn export_local(&self, snapshot: &Snapshot, dest: &Path) -> Result<(), StoreError> {
        let (snapshots, layers, dest) = (Arc::clone(&self.snapshots), snapshot.layers.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let view = snapshots.view(&layers)?;
            std::fs::create_dir_all(&dest).map_err(|source| StoreError::Io { path: dest.clone(), source })?;
            copy_contents(&view.root(), &dest).map_err(StoreError::Copy)
        })
        .await?
    }

    /// Writes the snapshot's files as one tarball.
    pub async fn export_tar(&self, snapshot: &Snapshot, dest: &Path, options: TarOptions) -> Result<(), StoreError> {
        let (snapshots, layers, dest): (_, _, PathBuf) =
            (Arc::clone(&self.snapshots), snapshot.layers.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let io = |source| StoreError::Io { path: dest.clone(), source };
            let view = snapshots.view(&layers)?;
            let file = std::fs::File::create(&dest).map_err(io)?;
            let writer = write_layer_tar(&view.root(), std::io::BufWriter::new(file), &options)?;
            writer.into_inner().map(drop).map_err(|e| io(e.into_error()))
        })
        .await?
    }
}
