//! New images: config, manifest and index documents written into the blob store, and image
//! archives (`type=oci` and `type=docker` tarballs).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use kiln_cas::{BlobStore, CasError};
use kiln_types::{Digest, Platform};
use serde::Serialize;

use crate::image::{
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, ManifestKind, OCI_CONFIG,
    OCI_INDEX, OCI_MANIFEST, PlatformField,
};

pub use kiln_types::MediaTypes;

/// A layer of a new image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLayer {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Uncompressed digest.
    pub diff_id: Digest,
    /// Compressed size.
    pub size: u64,
    /// OCI media type of the blob (gzip or zstd).
    pub media_type: String,
}

/// One `history` entry of an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct History {
    /// RFC 3339 time.
    pub created: String,
    /// The instruction that made it.
    pub created_by: String,
    /// Whether it added no layer.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// A single-platform image to write.
#[derive(Debug, Clone)]
pub struct NewImage {
    /// Its platform.
    pub platform: Platform,
    /// The runtime config (`Env`, `Cmd`, ...) as JSON.
    pub config: serde_json::Value,
    /// Layers, bottom first.
    pub layers: Vec<NewLayer>,
    /// History entries.
    pub history: Vec<History>,
    /// RFC 3339 creation time.
    pub created: String,
}

#[derive(Serialize)]
struct ConfigDocument<'a> {
    created: &'a str,
    architecture: &'a str,
    os: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'a str>,
    config: &'a serde_json::Value,
    rootfs: RootFsDocument,
    history: &'a [History],
}

#[derive(Serialize)]
struct RootFsDocument {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<Digest>,
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("documents serialise")
}

/// Writes the config and manifest of `image`; returns the manifest's descriptor (with the
/// platform, for an index).
pub fn store_image(cas: &BlobStore, image: &NewImage, media: MediaTypes) -> Result<Descriptor, CasError> {
    let config = ConfigDocument {
        created: &image.created,
        architecture: &image.platform.architecture,
        os: &image.platform.os,
        variant: image.platform.variant.as_deref(),
        config: &image.config,
        rootfs: RootFsDocument { kind: "layers", diff_ids: image.layers.iter().map(|l| l.diff_id).collect() },
        history: &image.history,
    };
    let config = cas.put(&json(&config), None)?;
    let (manifest_type, config_type) = match media {
        MediaTypes::Oci => (OCI_MANIFEST, OCI_CONFIG),
        MediaTypes::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG),
    };
    let layers = image
        .layers
        .iter()
        .map(|layer| Descriptor {
            media_type: match media {
                MediaTypes::Docker if layer.media_type.ends_with("+gzip") => DOCKER_LAYER_GZIP.to_string(),
                _ => layer.media_type.clone(),
            },
            digest: layer.digest,
            size: layer.size,
            platform: None,
            annotations: BTreeMap::new(),
        })
        .collect();
    let manifest = crate::image::Manifest {
        schema_version: 2,
        media_type: Some(manifest_type.to_string()),
        config: Descriptor {
            media_type: config_type.to_string(),
            digest: config.digest,
            size: config.size,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers,
        annotations: BTreeMap::new(),
    };
    let stored = cas.put(&json(&manifest), None)?;
    Ok(Descriptor {
        media_type: manifest_type.to_string(),
        digest: stored.digest,
        size: stored.size,
        platform: Some(PlatformField::from_platform(&image.platform)),
        annotations: BTreeMap::new(),
    })
}

/// Writes an index over single-platform manifests; returns its descriptor.
pub fn store_index(cas: &BlobStore, manifests: Vec<Descriptor>, media: MediaTypes) -> Result<Descriptor, CasError> {
    let media_type = match media {
        MediaTypes::Oci => OCI_INDEX,
        MediaTypes::Docker => DOCKER_MANIFEST_LIST,
    };
    let index = crate::image::Index {
        schema_version: 2,
        media_type: Some(media_type.to_string()),
        manifests,
        annotations: BTreeMap::new(),
    };
    let stored = cas.put(&json(&index), None)?;
    Ok(Descriptor {
        media_type: media_type.to_string(),
        digest: stored.digest,
        size: stored.size,
        platform: None,
        annotations: BTreeMap::new(),
    })
}

/// Tarball formats for image archives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// An OCI image layout (`type=oci`).
    Oci,
    /// An OCI layout plus Docker's `manifest.json` (`type=docker`), which `docker load`
    /// reads; single-platform images only.
    Docker,
}

/// Writes `image` (a manifest or index in the blob store) as a tarball at `dest`, tagged
/// with `names` (full references, e.g. `registry/repo:tag`).
pub fn write_archive(
    dest: &Path,
    image: &Descriptor,
    names: &[String],
    cas: &BlobStore,
    format: ArchiveFormat,
) -> Result<(), ArchiveError> {
    let at = |source| ArchiveError::Io { path: dest.to_path_buf(), source };
    let file = std::fs::File::create(dest).map_err(at)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut blobs = Vec::new();
    collect_blobs(cas, &image.digest, &mut blobs)?;
    blobs.sort();
    blobs.dedup();
    add_file(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(at)?;
    let mut entries = Vec::new();
    for name in names.iter().map(Some).chain(names.is_empty().then_some(None)) {
        let mut entry = image.clone();
        if let Some(name) = name {
            entry.annotations.insert("io.containerd.image.name".into(), name.clone());
            let tag = name.rsplit_once(':').filter(|(_, t)| !t.contains('/')).map_or("latest", |(_, t)| t);
            entry.annotations.insert(crate::layout::REF_NAME.into(), tag.to_string());
        }
        entries.push(entry);
    }
    let index = crate::image::Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.to_string()),
        manifests: entries,
        annotations: BTreeMap::new(),
    };
    add_file(&mut tar, "index.json", &json(&index)).map_err(at)?;
    if format == ArchiveFormat::Docker {
        let manifest = match ManifestKind::parse(&cas.read(&image.digest)?) {
            Ok(ManifestKind::Image(manifest)) => manifest,
            _ => return Err(ArchiveError::DockerMultiPlatform),
        };
        let path = |d: &Digest| format!("blobs/sha256/{}", d.hex());
        let docker = serde_json::json!([{
            "Config": path(&manifest.config.digest),
            "RepoTags": names,
            "Layers": manifest.layers.iter().map(|l| path(&l.digest)).collect::<Vec<_>>(),
        }]);
        add_file(&mut tar, "manifest.json", &json(&docker)).map_err(at)?;
    }
    for digest in blobs {
        let mut header = tar::Header::new_ustar();
        let size = cas.info(&digest)?.size;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        let blob = cas.open_blob(&digest)?;
        tar.append_data(&mut header, format!("blobs/sha256/{}", digest.hex()), blob).map_err(at)?;
    }
    let mut out = tar.into_inner().map_err(at)?;
    out.flush().map_err(at)
}

/// An image archive that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Writing the archive failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The archive.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blob of the image could not be read.
    #[error(transparent)]
    Cas(#[from] CasError),
    /// A manifest or index of the image does not parse.
    #[error("{digest}: {reason}")]
    Manifest {
        /// The document.
        digest: Digest,
        /// Why it does not parse.
        reason: String,
    },
    /// `type=docker` was asked for an index.
    #[error("type=docker holds one platform; use type=oci for a multi-platform image")]
    DockerMultiPlatform,
}

fn add_file(tar: &mut tar::Builder<impl Write>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    tar.append_data(&mut header, name, bytes)
}

fn collect_blobs(cas: &BlobStore, digest: &Digest, out: &mut Vec<Digest>) -> Result<(), ArchiveError> {
    out.push(*digest);
    let bytes = cas.read(digest)?;
    let parsed =
        ManifestKind::parse(&bytes).map_err(|e| ArchiveError::Manifest { digest: *digest, reason: e.to_string() })?;
    match parsed {
        ManifestKind::Image(manifest) => {
            out.push(manifest.config.digest);
            out.extend(manifest.layers.iter().map(|l| l.digest));
        }
        ManifestKind::Index(index) => {
            for child in &index.manifests {
                collect_blobs(cas, &child.digest, out)?;
            }
        }
    }
    Ok(())
}
