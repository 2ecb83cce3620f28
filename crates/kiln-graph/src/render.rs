//! Renderings of a graph for `kiln plan`: JSON (a stable contract), a text tree and DOT.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use kiln_types::Digest;
use serde_json::{Value, json};

use crate::builder::{Graph, Vertex};

/// The JSON document `kiln plan --format json` prints; field names are a public contract.
pub fn render_json(graph: &Graph) -> Value {
    let vertices: Vec<Value> = graph.vertices.iter().map(vertex_json).collect();
    let outputs: Vec<Value> = graph
        .outputs
        .iter()
        .map(|o| json!({"platform": o.platform.to_string(), "digest": o.digest.map(|d| d.to_string())}))
        .collect();
    json!({"vertices": vertices, "outputs": outputs})
}

fn vertex_json(v: &Vertex) -> Value {
    let mut value = json!({
        "digest": v.digest.to_string(),
        "kind": v.op.kind().as_str(),
        "name": v.meta.name,
        "stage": v.meta.stage,
        "platform": v.meta.platform.as_ref().map(|p| p.to_string()),
        "inputs": v.inputs.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        "op": serde_json::to_value(&v.op).unwrap_or(Value::Null),
    });
    if let Some((start, end)) = v.meta.lines {
        value["lines"] = json!([start, end]);
    }
    value
}

/// A readable tree per output: each vertex under the vertex that uses it. A vertex that was
/// already printed is shown once more by name only, marked `(shared)`.
pub fn render_text(graph: &Graph) -> String {
    let index: HashMap<Digest, &Vertex> = graph.vertices.iter().map(|v| (v.digest, v)).collect();
    let mut out = String::new();
    for output in &graph.outputs {
        let _ = writeln!(out, "{}", output.platform);
        match output.digest {
            Some(root) => {
                let mut seen = HashSet::new();
                write_tree(&index, root, 1, &mut seen, &mut out);
            }
            None => out.push_str("  (empty image)\n"),
        }
    }
    let _ = writeln!(out, "{} vertices, {} outputs", graph.vertices.len(), graph.outputs.len());
    out
}

fn write_tree(
    index: &HashMap<Digest, &Vertex>,
    digest: Digest,
    depth: usize,
    seen: &mut HashSet<Digest>,
    out: &mut String,
) {
    let indent = "  ".repeat(depth);
    let Some(vertex) = index.get(&digest) else {
        let _ = writeln!(out, "{indent}{digest} (missing)");
        return;
    };
    let kind = vertex.op.kind().as_str();
    let short = digest.short();
    if !seen.insert(digest) {
        let _ = writeln!(out, "{indent}{} [{kind} {short}] (shared)", vertex.meta.name);
        return;
    }
    let _ = writeln!(out, "{indent}{} [{kind} {short}]", vertex.meta.name);
    for input in &vertex.inputs {
        write_tree(index, *input, depth + 1, seen, out);
    }
}

/// Graphviz DOT: one node per vertex, edges from input to user, outputs double-circled.
pub fn render_dot(graph: &Graph) -> String {
    let mut out = String::from("digraph kiln {\n  rankdir=BT;\n  node [shape=box, fontname=\"monospace\"];\n");
    for v in &graph.vertices {
        let label = format!("{}\\n{} {}", escape_dot(&v.meta.name), v.op.kind().as_str(), v.digest.short());
        let _ = writeln!(out, "  \"{}\" [label=\"{label}\"];", v.digest);
        for input in &v.inputs {
            let _ = writeln!(out, "  \"{input}\" -> \"{}\";", v.digest);
        }
    }
    for (i, o) in graph.outputs.iter().enumerate() {
        let _ = writeln!(out, "  \"output{i}\" [label=\"{}\", shape=doublecircle];", o.platform);
        if let Some(d) = o.digest {
            let _ = writeln!(out, "  \"{d}\" -> \"output{i}\";");
        }
    }
    out.push_str("}\n");
    out
}

fn escape_dot(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
