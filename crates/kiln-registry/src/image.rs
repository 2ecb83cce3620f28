//! The parts of OCI/Docker manifests, indexes and image configs Kiln reads and writes.
//!
//! Pulled manifests and configs are kept as the registry's raw bytes (their digests are over
//! those bytes); these types are only views for reading fields and for writing new documents.

use std::collections::BTreeMap;

use kiln_types::{Digest, Platform};
use serde::{Deserialize, Serialize};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Every manifest type Kiln accepts when pulling.
pub const ACCEPTED_MANIFESTS: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Platform of a manifest inside an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformField>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor of plain content: no platform, no annotations.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor { media_type: media_type.into(), digest, size, platform: None, annotations: BTreeMap::new() }
    }
}

/// The `platform` object of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformField {
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// Architecture variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl PlatformField {
    /// As Kiln's normalised platform.
    pub fn platform(&self) -> Platform {
        Platform::new(&self.os, &self.architecture, self.variant.as_deref())
    }

    /// From Kiln's platform.
    pub fn from_platform(platform: &Platform) -> PlatformField {
        PlatformField {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
        }
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The index's media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests, one per platform (plus attestations).
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A manifest document of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestKind {
    /// A single-platform image.
    Image(Manifest),
    /// A multi-platform index.
    Index(Index),
}

impl ManifestKind {
    /// Parses manifest bytes, telling the kinds apart by `mediaType`, or by shape when absent.
    pub fn parse(bytes: &[u8]) -> Result<ManifestKind, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_slice(bytes)?;
        let media_type = value.get("mediaType").and_then(|m| m.as_str()).unwrap_or_default();
        let is_index =
            media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST || value.get("manifests").is_some();
        if is_index {
            serde_json::from_value(value).map(ManifestKind::Index)
        } else {
            serde_json::from_value(value).map(ManifestKind::Image)
        }
    }
}

/// The image config file: platform, runtime config (kept as JSON), and the layers' diff ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    /// CPU architecture.
    #[serde(default)]
    pub architecture: String,
    /// Operating system.
    #[serde(default)]
    pub os: String,
    /// Architecture variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The runtime config (`Env`, `Cmd`, ...), left as JSON for the front end to read.
    #[serde(default)]
    pub config: serde_json::Value,
    /// The layers' diff ids.
    pub rootfs: RootFs,
    /// The image's history entries, as the registry has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<serde_json::Value>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Digest of each uncompressed layer, bottom first.
    pub diff_ids: Vec<Digest>,
}

/// A resolved single-platform image: its documents (also stored in the blob store) and
/// where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedImage {
    /// Digest of the index the manifest was picked from, if any.
    pub index_digest: Option<Digest>,
    /// Digest of the platform's manifest: what pins the image.
    pub manifest_digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// The parsed config.
    pub config: ConfigFile,
}

impl ResolvedImage {
    /// Layer descriptors paired with their diff ids, bottom first.
    pub fn layers(&self) -> impl Iterator<Item = (&Descriptor, &Digest)> {
        self.manifest.layers.iter().zip(&self.config.rootfs.diff_ids)
    }
}

/// Picks the manifest for `platform` out of an index; attestation entries never match.
pub fn select_platform<'a>(index: &'a Index, platform: &Platform) -> Option<&'a Descriptor> {
    index.manifests.iter().find(|m| {
        let is_attestation = m.annotations.contains_key("vnd.docker.reference.type");
        !is_attestation && m.platform.as_ref().is_some_and(|p| p.platform() == *platform)
    })
}

/// The platforms an index offers, for error messages.
pub fn offered_platforms(index: &Index) -> String {
    let mut platforms: Vec<String> =
        index.manifests.iter().filter_map(|m| m.platform.as_ref()).map(|p| p.platform().to_string()).collect();
    platforms.dedup();
    platforms.join(", ")
}
