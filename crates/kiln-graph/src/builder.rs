//! Building a graph: vertices are interned by digest, so identical work is added once.

use std::collections::{HashMap, HashSet};

use kiln_types::{Digest, Platform, Sha256Writer};
use serde::{Deserialize, Serialize};

use crate::op::{FileAction, Input, MountKind, Op};

/// Metadata shown to people; never part of a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VertexMeta {
    /// Progress name, e.g. `[build 2/4] RUN make`.
    pub name: String,
    /// Stage the vertex was first created for.
    pub stage: Option<String>,
    /// Platform the vertex was created for.
    pub platform: Option<Platform>,
    /// First and last Dockerfile line of the instruction, 1-based.
    pub lines: Option<(usize, usize)>,
}

/// One node of the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vertex {
    /// sha256 of the canonical encoding of `op` and `inputs`.
    pub digest: Digest,
    /// What the vertex does.
    pub op: Op,
    /// Digests of the vertices whose results the op reads, referenced by index from `op`.
    pub inputs: Vec<Digest>,
    /// People-facing metadata of the first occurrence.
    pub meta: VertexMeta,
}

/// A requested result: the root vertex of one platform's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Platform of this output.
    pub platform: Platform,
    /// Final vertex; `None` for an image with no filesystem content (`FROM scratch` only).
    pub digest: Option<Digest>,
}

/// A finished graph: vertices in topological order (inputs before users) and its outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Graph {
    /// Vertices, each after all of its inputs.
    pub vertices: Vec<Vertex>,
    /// Requested results, one per platform.
    pub outputs: Vec<Output>,
}

/// Structural errors found while adding a vertex; they are bugs in a front end, not user errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// An op names an input index the vertex does not have.
    #[error("op of {name:?} refers to input {index} but the vertex has {count} inputs")]
    InputOutOfRange {
        /// Vertex name.
        name: String,
        /// Referenced index.
        index: usize,
        /// Number of inputs.
        count: usize,
    },
    /// An input digest is not a vertex of this graph.
    #[error("input {0} of {1:?} is not a vertex of this graph")]
    UnknownInput(Digest, String),
}

/// Accumulates vertices; adding an op that already exists returns the existing digest.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    vertices: Vec<Vertex>,
    index: HashMap<Digest, usize>,
}

/// The digest of an op over its inputs. Version-tagged so a future encoding change cannot
/// collide with this one.
pub fn vertex_digest(op: &Op, inputs: &[Digest]) -> Digest {
    #[derive(Serialize)]
    struct Canonical<'a> {
        v: u32,
        op: &'a Op,
        inputs: &'a [Digest],
    }
    let encoded = serde_json::to_vec(&Canonical { v: 1, op, inputs })
        .expect("ops serialise infallibly: no maps with non-string keys");
    let mut hasher = Sha256Writer::new();
    hasher.field(b"kiln.vertex");
    hasher.field(&encoded);
    hasher.finish()
}

fn referenced_inputs(op: &Op) -> Vec<Input> {
    let mut found = Vec::new();
    match op {
        Op::Source(_) | Op::Merge(_) => {}
        Op::Exec(exec) => {
            found.push(exec.rootfs);
            for m in &exec.mounts {
                match &m.kind {
                    MountKind::Bind { input, .. } => found.push(*input),
                    MountKind::Cache { from: Some(input), .. } => found.push(*input),
                    _ => {}
                }
            }
        }
        Op::File(file) => {
            found.push(file.base);
            for a in &file.actions {
                if let FileAction::Copy(c) = a {
                    found.push(c.from);
                }
            }
        }
    }
    found
}

impl GraphBuilder {
    /// Starts an empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a vertex (or finds the identical one) and returns its digest.
    pub fn add(&mut self, op: Op, inputs: Vec<Digest>, meta: VertexMeta) -> Result<Digest, GraphError> {
        for input in referenced_inputs(&op) {
            if let Input::Index(index) = input
                && index >= inputs.len()
            {
                return Err(GraphError::InputOutOfRange { name: meta.name, index, count: inputs.len() });
            }
        }
        if let Some(missing) = inputs.iter().find(|d| !self.index.contains_key(d)) {
            return Err(GraphError::UnknownInput(*missing, meta.name));
        }
        let digest = vertex_digest(&op, &inputs);
        if !self.index.contains_key(&digest) {
            self.index.insert(digest, self.vertices.len());
            self.vertices.push(Vertex { digest, op, inputs, meta });
        }
        Ok(digest)
    }

    /// Looks a vertex up by digest.
    pub fn get(&self, digest: &Digest) -> Option<&Vertex> {
        self.index.get(digest).map(|&i| &self.vertices[i])
    }

    /// Adds every vertex of a finished graph (another build's, which a named context
    /// brings in): each keeps its digest, and work the two graphs share is one vertex.
    pub fn import(&mut self, graph: &Graph) -> Result<(), GraphError> {
        for vertex in &graph.vertices {
            self.add(vertex.op.clone(), vertex.inputs.clone(), vertex.meta.clone())?;
        }
        Ok(())
    }

    /// Finishes the graph, keeping only vertices reachable from `outputs`.
    pub fn finish(self, outputs: Vec<Output>) -> Graph {
        let mut keep: HashSet<Digest> = HashSet::new();
        let mut stack: Vec<Digest> = outputs.iter().filter_map(|o| o.digest).collect();
        while let Some(d) = stack.pop() {
            if keep.insert(d)
                && let Some(v) = self.get(&d)
            {
                stack.extend(v.inputs.iter().copied());
            }
        }
        let vertices = self.vertices.into_iter().filter(|v| keep.contains(&v.digest)).collect();
        Graph { vertices, outputs }
    }
}

impl Graph {
    /// Looks a vertex up by digest (linear; graphs are small).
    pub fn vertex(&self, digest: &Digest) -> Option<&Vertex> {
        self.vertices.iter().find(|v| &v.digest == digest)
    }
}

#[cfg(test)]
mod tests {
    use kiln_types::ImageReference;

    use super::*;
    use crate::op::{ExecOp, NetworkMode, SecurityMode, SourceOp};

    fn image(builder: &mut GraphBuilder, name: &str) -> Digest {
        let op = Op::Source(SourceOp::Image {
            reference: name.parse::<ImageReference>().unwrap(),
            platform: "linux/amd64".parse().unwrap(),
        });
        builder.add(op, vec![], VertexMeta { name: format!("FROM {name}"), ..Default::default() }).unwrap()
    }

    fn run(builder: &mut GraphBuilder, base: Digest, cmd: &str, env: &[&str], name: &str) -> Digest {
        let op = Op::Exec(ExecOp {
            args: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::Default,
            security: SecurityMode::Sandbox,
            rootfs: Input::Index(0),
            mounts: vec![],
            platform: "linux/amd64".parse().unwrap(),
        });
        builder.add(op, vec![base], VertexMeta { name: name.into(), ..Default::default() }).unwrap()
    }

    #[test]
    fn identical_ops_on_identical_inputs_are_one_vertex() {
        let mut b = GraphBuilder::new();
        let base = image(&mut b, "busybox");
        let first = run(&mut b, base, "make", &[], "[a 2/2] RUN make");
        let second = run(&mut b, base, "make", &[], "[b 2/2] RUN make");
        assert_eq!(first, second);
        assert_eq!(b.get(&first).unwrap().meta.name, "[a 2/2] RUN make", "first name wins");
        let different_env = run(&mut b, base, "make", &["X=1"], "[c 2/2] RUN make");
        assert_ne!(first, different_env);
        let other_base = image(&mut b, "alpine");
        assert_ne!(first, run(&mut b, other_base, "make", &[], "x"));
    }

    #[test]
    fn finish_drops_unreachable_vertices_and_keeps_topological_order() {
        let mut b = GraphBuilder::new();
        let base = image(&mut b, "busybox");
        let used = run(&mut b, base, "used", &[], "used");
        let _unused = run(&mut b, base, "unused", &[], "unused");
        let out = Output { platform: "linux/amd64".parse().unwrap(), digest: Some(used) };
        let g = b.finish(vec![out]);
        let names: Vec<_> = g.vertices.iter().map(|v| v.meta.name.as_str()).collect();
        assert_eq!(names, ["FROM busybox", "used"]);
    }

    #[test]
    fn rejects_dangling_input_indices() {
        let mut b = GraphBuilder::new();
        let op = Op::Merge(crate::MergeOp {});
        assert!(b.add(op, vec![Digest::of(b"nope")], VertexMeta::default()).is_err());
        let exec = Op::Exec(ExecOp {
            args: vec![],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::Default,
            security: SecurityMode::Sandbox,
            rootfs: Input::Index(3),
            mounts: vec![],
            platform: "linux/amd64".parse().unwrap(),
        });
        assert!(matches!(b.add(exec, vec![], VertexMeta::default()), Err(GraphError::InputOutOfRange { .. })));
    }

    #[test]
    fn digest_encoding_is_pinned() {
        // Pinned so that an accidental change of the canonical encoding is noticed: it would
        // invalidate every cache entry ever written.
        let mut b = GraphBuilder::new();
        let base = image(&mut b, "busybox");
        let exec = run(&mut b, base, "make", &["A=1"], "x");
        assert_eq!(base.to_string(), "sha256:393153d5756108b3efd595ec65dd1ae01d1418e1b9dfdd8627f4be3d38c4847a");
        assert_eq!(exec.to_string(), "sha256:2cf8eb0836d461df0056c405e72672b6f6bfae776f92e94850aa5dce40ed3e4a");
    }
}
