//! Image history: one entry per instruction on the final image's chain, as `docker history`
//! shows it, with the base image's own entries underneath.

use std::collections::HashMap;

use kiln_graph::{Graph, Input, Op, SourceOp};
use kiln_registry::History;
use kiln_types::{Digest, Platform};

/// Base image history entries, by reference and platform.
pub(crate) type BaseHistories = HashMap<(String, Platform), Vec<History>>;

/// What planning learnt of a build's base images: their histories, and the manifest each
/// (reference, platform) resolved to (exports pull exactly that, never the tag again).
#[derive(Default)]
pub(crate) struct Bases {
    /// Histories by (reference as written, platform).
    pub histories: BaseHistories,
    /// Resolved manifest digests by (reference, platform).
    pub digests: HashMap<(kiln_types::ImageReference, Platform), kiln_types::Digest>,
}

/// History entries of registry JSON.
pub(crate) fn from_config(entries: &[serde_json::Value]) -> Vec<History> {
    entries
        .iter()
        .map(|entry| History {
            created: entry["created"].as_str().unwrap_or_default().to_string(),
            created_by: entry["created_by"].as_str().unwrap_or_default().to_string(),
            empty_layer: entry["empty_layer"].as_bool().unwrap_or(false),
        })
        .collect()
}

/// The history of the image `output` (a vertex digest), or `None` when the layers cannot be
/// attributed (then the caller writes one generic entry per layer).
pub(crate) fn history(
    graph: &Graph,
    output: Option<Digest>,
    outputs: &HashMap<Digest, usize>,
    bases: &BaseHistories,
    created: &str,
) -> Option<Vec<History>> {
    let by_digest: HashMap<Digest, &kiln_graph::Vertex> = graph.vertices.iter().map(|v| (v.digest, v)).collect();
    let mut entries = Vec::new();
    if let Some(output) = output {
        walk(output, &by_digest, outputs, bases, created, &mut entries)?;
    }
    Some(entries)
}

fn layers(outputs: &HashMap<Digest, usize>, digest: &Digest) -> Option<usize> {
    outputs.get(digest).copied()
}

fn walk(
    digest: Digest,
    graph: &HashMap<Digest, &kiln_graph::Vertex>,
    outputs: &HashMap<Digest, usize>,
    bases: &BaseHistories,
    created: &str,
    entries: &mut Vec<History>,
) -> Option<()> {
    let vertex = graph.get(&digest)?;
    let parent = |input: &Input| match input {
        Input::Scratch => None,
        Input::Index(i) => vertex.inputs.get(*i).copied(),
    };
    let below = match &vertex.op {
        Op::Source(SourceOp::Image { reference, platform }) => {
            let base = bases.get(&(reference.to_string(), platform.clone()))?;
            let base_layers = base.iter().filter(|h| !h.empty_layer).count();
            if Some(base_layers) != layers(outputs, &digest) {
                return None;
            }
            entries.extend(base.iter().cloned());
            return Some(());
        }
        Op::Source(_) => return None,
        Op::Merge(_) => {
            for input in &vertex.inputs {
                walk(*input, graph, outputs, bases, created, entries)?;
            }
            return Some(());
        }
        Op::Exec(exec) => parent(&exec.rootfs),
        Op::File(file) => parent(&file.base),
    };
    let below_layers = match below {
        Some(parent) => {
            walk(parent, graph, outputs, bases, created, entries)?;
            layers(outputs, &parent)?
        }
        None => 0,
    };
    let added = layers(outputs, &digest)?.checked_sub(below_layers)?;
    if added > 1 {
        return None;
    }
    entries.push(History {
        created: created.to_string(),
        created_by: instruction(&vertex.meta.name),
        empty_layer: added == 0,
    });
    Some(())
}

/// `[stage 2/3] RUN make` → `RUN make # buildkit`-style text without the progress prefix.
fn instruction(name: &str) -> String {
    let text = match name.strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
        Some((_, instruction)) => instruction,
        None => name,
    };
    format!("{text} # kiln")
}
