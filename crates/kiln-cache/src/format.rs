//! Kiln's cache format: one OCI image manifest per cache name. Its layers are every layer
//! blob the cache holds (so registries keep them and garbage-collect nothing it needs); its
//! config blob ([`CACHE_CONFIG_MEDIA_TYPE`]) maps cache keys to result layers, each record
//! with the platform it was built for. `docs/cache.md` describes it for other readers.

use std::collections::{BTreeMap, BTreeSet};

use kiln_registry::{Descriptor, Manifest};
use kiln_types::Digest;
use serde::{Deserialize, Serialize};

/// The media type of the config blob.
pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.cache.config.v1+json";
/// The media type of the manifest (a plain OCI image manifest).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// What an export keeps of the records a cache held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Records of the platforms this export built are replaced, the others kept (a
    /// build's own cache, as buildx's).
    ReplacePlatforms,
    /// Every record is kept unless this export rewrites its key, newest first, at most this
    /// many (a fleet's shared cache, which every build of every project writes).
    Accumulate(usize),
}

/// The records a fleet's shared cache keeps (the newest; a few hundred bytes each).
pub const MAX_SHARED_RECORDS: usize = 200_000;

/// The format's version; a cache written by a later, incompatible Kiln is not read.
pub const VERSION: u32 = 1;

/// A layer blob of the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The digest of its uncompressed tar.
    pub diff_id: Digest,
    /// The blob's size.
    pub size: u64,
    /// The blob's media type (its compression).
    pub media_type: String,
    /// The size of the uncompressed tar, when the exporter knew it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_size: Option<u64>,
}

/// One cached result: the layers of the result of the vertex with this cache key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The solver's cache key (the platform is part of it).
    pub key: Digest,
    /// The platform the vertex was built for (empty when it has none): an export replaces the
    /// records of the platforms it built and keeps the others.
    pub platform: String,
    /// The result's layer blobs, bottom first.
    pub layers: Vec<Digest>,
}

/// The config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CacheConfig {
    /// [`VERSION`].
    pub version: u32,
    /// Every layer blob the records name, by blob digest.
    pub layers: BTreeMap<Digest, CacheLayer>,
    /// The records.
    pub records: Vec<CacheRecord>,
}

/// Why a cache manifest or config cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not JSON of the expected shape.
    #[error("the {what} is not valid: {reason}")]
    Invalid {
        /// `manifest` or `config`.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The manifest is not a Kiln cache (an image, or another tool's cache).
    #[error("the manifest's config is {0:?}, not a Kiln cache")]
    NotACache(String),
    /// Written by a later Kiln.
    #[error("cache format version {0} is not supported (this Kiln reads version {VERSION})")]
    Version(u32),
    /// A record names a layer the config does not describe.
    #[error("record {key} names layer {layer}, which the cache does not describe")]
    MissingLayer {
        /// The record's key.
        key: Digest,
        /// The layer.
        layer: Digest,
    },
}

impl CacheLayer {
    /// The blob `digest` as this layer describes it.
    pub fn descriptor(&self, digest: Digest) -> Descriptor {
        Descriptor::new(self.media_type.clone(), digest, self.size)
    }
}

impl CacheConfig {
    /// Parses and checks a config blob: every record's layers are described.
    pub fn parse(bytes: &[u8]) -> Result<CacheConfig, FormatError> {
        let config: CacheConfig = serde_json::from_slice(bytes)
            .map_err(|e| FormatError::Invalid { what: "config", reason: e.to_string() })?;
        if config.version != VERSION {
            return Err(FormatError::Version(config.version));
        }
        for record in &config.records {
            if let Some(layer) = record.layers.iter().find(|l| !config.layers.contains_key(l)) {
                return Err(FormatError::MissingLayer { key: record.key, layer: *layer });
            }
        }
        Ok(config)
    }

    /// This export's records over what the cache held, as `merge` says: they come first,
    /// then the records kept (in the order the cache had them), at most `limit` of them with
    /// [`Merge::Accumulate`]; the layer table keeps exactly the layers some record names.
    pub fn merged(previous: Option<CacheConfig>, new: CacheConfig, merge: Merge) -> CacheConfig {
        let platforms: BTreeSet<String> = new.records.iter().map(|r| r.platform.clone()).collect();
        let limit = match merge {
            Merge::ReplacePlatforms => usize::MAX,
            Merge::Accumulate(limit) => limit,
        };
        let mut merged = new;
        if let Some(previous) = previous {
            let mut keys: BTreeSet<Digest> = merged.records.iter().map(|r| r.key).collect();
            for record in previous.records {
                let kept = match merge {
                    Merge::ReplacePlatforms => !platforms.contains(&record.platform),
                    Merge::Accumulate(_) => true,
                };
                if merged.records.len() >= limit {
                    break;
                }
                if kept && keys.insert(record.key) {
                    for layer in &record.layers {
                        if let Some(described) = previous.layers.get(layer) {
                            merged.layers.entry(*layer).or_insert_with(|| described.clone());
                        }
                    }
                    merged.records.push(record);
                }
            }
        }
        merged.records.truncate(limit);
        let named: BTreeSet<Digest> = merged.records.iter().flat_map(|r| r.layers.iter().copied()).collect();
        merged.layers.retain(|digest, _| named.contains(digest));
        merged.version = VERSION;
        merged
    }

    /// The config blob's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a cache config serialises")
    }

    /// The manifest for this config (stored as `config`): its layers are every layer blob.
    pub fn manifest(&self, config: &[u8]) -> Vec<u8> {
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            config: Descriptor::new(CACHE_CONFIG_MEDIA_TYPE, Digest::of(config), config.len() as u64),
            layers: self.layers.iter().map(|(digest, layer)| layer.descriptor(*digest)).collect(),
            annotations: BTreeMap::new(),
        };
        serde_json::to_vec(&manifest).expect("a manifest serialises")
    }
}

/// The config descriptor of a cache manifest, checked to be a Kiln cache's.
pub fn config_of(manifest: &[u8]) -> Result<Descriptor, FormatError> {
    let manifest: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| FormatError::Invalid { what: "manifest", reason: e.to_string() })?;
    if manifest.config.media_type != CACHE_CONFIG_MEDIA_TYPE {
        return Err(FormatError::NotACache(manifest.config.media_type));
    }
    Ok(manifest.config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    fn layer(n: u8) -> CacheLayer {
        CacheLayer {
            diff_id: digest(100 + n),
            size: n.into(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            tar_size: Some(u64::from(n) * 10),
        }
    }

    fn config(records: &[(u8, &str, &[u8])]) -> CacheConfig {
        let mut config = CacheConfig { version: VERSION, ..CacheConfig::default() };
        for (key, platform, layers) in records {
            for n in *layers {
                config.layers.insert(digest(*n), layer(*n));
            }
            let layers = layers.iter().map(|n| digest(*n)).collect();
            config.records.push(CacheRecord { key: digest(*key), platform: platform.to_string(), layers });
        }
        config
    }

    #[test]
    fn an_export_replaces_its_platforms_and_keeps_the_others() {
        let previous = config(&[(1, "linux/amd64", &[1, 2]), (2, "linux/arm64", &[1, 3])]);
        let new = config(&[(3, "linux/amd64", &[1, 4])]);
        let merged = CacheConfig::merged(Some(previous), new, Merge::ReplacePlatforms);
        let keys: Vec<Digest> = merged.records.iter().map(|r| r.key).collect();
        assert_eq!(keys, [digest(3), digest(2)]);
        // Layer 2 went with the replaced record; 3 stays for arm64.
        assert_eq!(merged.layers.keys().copied().collect::<Vec<_>>(), {
            let mut v = vec![digest(1), digest(3), digest(4)];
            v.sort();
            v
        });
        let bytes = merged.to_bytes();
        assert_eq!(CacheConfig::parse(&bytes).unwrap(), merged);
        let manifest = merged.manifest(&bytes);
        let descriptor = config_of(&manifest).unwrap();
        assert_eq!((descriptor.digest, descriptor.size), (Digest::of(&bytes), bytes.len() as u64));
    }

    #[test]
    fn bad_caches_are_errors_that_say_why() {
        let mut broken = config(&[(1, "", &[1])]);
        broken.layers.clear();
        let err = CacheConfig::parse(&broken.to_bytes()).unwrap_err();
        assert!(matches!(err, FormatError::MissingLayer { .. }), "{err}");
        let later = CacheConfig { version: 9, ..CacheConfig::default() };
        assert!(CacheConfig::parse(&later.to_bytes()).unwrap_err().to_string().contains("version 9"));
        assert!(matches!(CacheConfig::parse(b"{]"), Err(FormatError::Invalid { what: "config", .. })));
        let image = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
        assert!(config_of(image).unwrap_err().to_string().contains("not a Kiln cache"));
    }
}
