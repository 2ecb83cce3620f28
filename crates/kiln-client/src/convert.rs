//! Conversions of the types both ends of a connection send (context manifests, layers), used
//! by this client and by the daemon's services alike.

use kiln_context::{ContextManifest, ManifestEntry, ManifestKind};
use kiln_proto::v1;
use kiln_solver::cluster::{LayerDesc, Layers};
use kiln_types::Digest;

/// A manifest as sent.
pub fn manifest_to_proto(manifest: &ContextManifest) -> v1::ContextManifest {
    let entries = manifest
        .entries
        .iter()
        .map(|e| {
            let (kind, digest, size, link) = match &e.kind {
                ManifestKind::File { digest, size } => (0, digest.to_string(), *size, String::new()),
                ManifestKind::Dir => (1, String::new(), 0, String::new()),
                ManifestKind::Symlink(target) => (2, String::new(), 0, target.clone()),
            };
            v1::ContextEntry {
                path: e.path.clone(),
                kind,
                mode: e.mode,
                digest,
                size,
                link,
                mtime: e.mtime.0,
                mtime_nsec: e.mtime.1,
                raw_path: e.raw_path.clone().unwrap_or_default(),
                hardlink_of: e.hardlink_of.clone().unwrap_or_default(),
            }
        })
        .collect();
    v1::ContextManifest { entries }
}

/// A manifest as received, validated ([`ContextManifest::validate`]); bad entries are errors
/// naming the path.
pub fn manifest_from_proto(manifest: v1::ContextManifest) -> Result<ContextManifest, String> {
    let mut entries = Vec::with_capacity(manifest.entries.len());
    for e in manifest.entries {
        let kind = match e.kind {
            0 => ManifestKind::File { digest: parse_digest(&e.digest, &e.path)?, size: e.size },
            1 => ManifestKind::Dir,
            2 => ManifestKind::Symlink(e.link),
            other => return Err(format!("context entry {}: unknown kind {other}", e.path)),
        };
        let raw_path = (!e.raw_path.is_empty()).then_some(e.raw_path);
        let hardlink_of = (!e.hardlink_of.is_empty()).then_some(e.hardlink_of);
        let mtime = (e.mtime, e.mtime_nsec);
        entries.push(ManifestEntry { path: e.path, kind, mode: e.mode & 0o7777, mtime, raw_path, hardlink_of });
    }
    let manifest = ContextManifest { entries };
    manifest.validate()?;
    Ok(manifest)
}

/// Layers as sent.
pub fn layers_to_proto(layers: &Layers) -> v1::LayerChain {
    v1::LayerChain {
        layers: layers.layers.iter().map(|l| v1::Layer { diff_id: l.diff_id.to_string(), size: l.size }).collect(),
    }
}

/// Layers as received.
pub fn layers_from_proto(chain: v1::LayerChain) -> Result<Layers, String> {
    let layers = chain
        .layers
        .into_iter()
        .map(|l| Ok(LayerDesc { diff_id: parse_digest(&l.diff_id, "layer")?, size: l.size }))
        .collect::<Result<_, String>>()?;
    Ok(Layers { layers })
}

/// A digest, or an error naming what it belonged to.
pub fn parse_digest(text: &str, what: &str) -> Result<Digest, String> {
    text.parse().map_err(|e| format!("{what}: bad digest {text:?}: {e}"))
}
