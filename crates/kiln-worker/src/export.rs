//! Results out of the snapshot store: layer blobs for images, and the plain files for
//! `type=local` and `type=tar`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_layer::{Compression, LayerBlob, TarOptions, write_layer_tar};

use crate::fileop::copy_contents;
use crate::{Snapshot, StoreError, Stores};

impl Stores {
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
