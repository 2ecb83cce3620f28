//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/`): a source of
//! base images without a registry, and an export format.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use kiln_cas::{BlobStore, CasError};
use kiln_types::{Digest, Platform};

use crate::image::{
    ConfigFile, Descriptor, Index, ManifestKind, OCI_INDEX, ResolvedImage, offered_platforms, select_platform,
};

/// The annotation that names an image in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A problem with an OCI layout directory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A document is not what the layout format says.
    #[error("OCI layout {layout}: {message}")]
    Invalid {
        /// The layout directory.
        layout: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A blob failed verification or storage.
    #[error("OCI layout {layout}: {source}")]
    Blob {
        /// The layout directory.
        layout: PathBuf,
        /// The error.
        #[source]
        source: CasError,
    },
}

fn blob_path(layout: &Path, digest: &Digest) -> PathBuf {
    layout.join("blobs/sha256").join(digest.hex())
}

/// Writes a layout holding `images` (tag → manifest or index digest, all in the blob store),
/// copying every blob they reference.
pub fn write_layout(layout: &Path, images: &[(&str, Digest)], cas: &BlobStore) -> Result<(), LayoutError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LayoutError::Io { path, source }
    };
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let oci_layout = layout.join("oci-layout");
    fs::write(&oci_layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&oci_layout))?;
    let mut manifests = Vec::new();
    for (tag, digest) in images {
        let bytes = copy_tree(layout, digest, cas)?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_default();
        let annotations = BTreeMap::from([(REF_NAME.to_string(), tag.to_string())]);
        manifests.push(Descriptor {
            media_type,
            digest: *digest,
            size: bytes.len() as u64,
            platform: None,
            annotations,
        });
    }
    let index =
        Index { schema_version: 2, media_type: Some(OCI_INDEX.to_string()), manifests, annotations: BTreeMap::new() };
    let index_path = layout.join("index.json");
    fs::write(&index_path, serde_json::to_vec(&index).expect("serialisable")).map_err(io(&index_path))
}

/// Copies a manifest or index and everything below it; returns its bytes.
fn copy_tree(layout: &Path, digest: &Digest, cas: &BlobStore) -> Result<Vec<u8>, LayoutError> {
    let blob_error = |source| LayoutError::Blob { layout: layout.to_path_buf(), source };
    let bytes = cas.read(digest).map_err(blob_error)?;
    copy_blob(layout, digest, cas)?;
    match ManifestKind::parse(&bytes) {
        Ok(ManifestKind::Image(manifest)) => {
            for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
                copy_blob(layout, &blob.digest, cas)?;
            }
        }
        Ok(ManifestKind::Index(index)) => {
            for child in &index.manifests {
                copy_tree(layout, &child.digest, cas)?;
            }
        }
        Err(e) => return Err(LayoutError::Invalid { layout: layout.to_path_buf(), message: format!("{digest}: {e}") }),
    }
    Ok(bytes)
}

fn copy_blob(layout: &Path, digest: &Digest, cas: &BlobStore) -> Result<(), LayoutError> {
    let dest = blob_path(layout, digest);
    if !dest.exists() {
        fs::copy(cas.path(digest), &dest).map_err(|source| LayoutError::Io { path: dest, source })?;
    }
    Ok(())
}

/// Reads the image `tag` (or the layout's only image) for `platform`, verifying every blob
/// as it is copied into the blob store.
pub fn read_layout(
    layout: &Path,
    tag: Option<&str>,
    platform: &Platform,
    cas: &BlobStore,
) -> Result<ResolvedImage, LayoutError> {
    let invalid = |message: String| LayoutError::Invalid { layout: layout.to_path_buf(), message };
    let index_path = layout.join("index.json");
    let bytes = fs::read(&index_path).map_err(|source| LayoutError::Io { path: index_path.clone(), source })?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| invalid(format!("index.json: {e}")))?;
    let entry = match tag {
        Some(tag) => index.manifests.iter().find(|m| m.annotations.get(REF_NAME).is_some_and(|name| name == tag)),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => return Err(invalid(format!("holds {} images; name one", index.manifests.len()))),
    }
    .ok_or_else(|| invalid(format!("no image named {:?}", tag.unwrap_or_default())))?;

    let mut index_digest = None;
    let mut manifest_digest = entry.digest;
    let manifest = loop {
        let bytes = import_blob(layout, &manifest_digest, cas)?;
        match ManifestKind::parse(&bytes).map_err(|e| invalid(format!("{manifest_digest}: {e}")))? {
            ManifestKind::Image(manifest) => break manifest,
            ManifestKind::Index(child_index) => {
                let child = select_platform(&child_index, platform).ok_or_else(|| {
                    invalid(format!("no image for platform {platform} (offers: {})", offered_platforms(&child_index)))
                })?;
                index_digest = Some(manifest_digest);
                manifest_digest = child.digest;
            }
        }
    };
    let config_bytes = import_blob(layout, &manifest.config.digest, cas)?;
    let config: ConfigFile = serde_json::from_slice(&config_bytes).map_err(|e| invalid(format!("config: {e}")))?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(invalid(format!("{} layers but {} diff ids", manifest.layers.len(), config.rootfs.diff_ids.len())));
    }
    for layer in &manifest.layers {
        import_blob(layout, &layer.digest, cas)?;
    }
    Ok(ResolvedImage { index_digest, manifest_digest, manifest, config })
}

fn import_blob(layout: &Path, digest: &Digest, cas: &BlobStore) -> Result<Vec<u8>, LayoutError> {
    let blob_error = |source| LayoutError::Blob { layout: layout.to_path_buf(), source };
    if !cas.contains(digest) {
        let path = blob_path(layout, digest);
        let mut file = fs::File::open(&path).map_err(|source| LayoutError::Io { path: path.clone(), source })?;
        cas.put_reader(&mut file, Some(digest)).map_err(blob_error)?;
    }
    // Small documents are read back; layers are only verified by the copy above.
    let size = cas.info(digest).map_err(blob_error)?.size;
    if size < 4 << 20 { cas.read(digest).map_err(blob_error) } else { Ok(Vec::new()) }
}
