//! Kiln's content-addressed build graph.
//!
//! A [`Graph`] is a DAG of [`Vertex`]es. Each vertex holds one [`Op`] (a source, an exec,
//! file actions or a merge) and the digests of its inputs; its own digest is the sha256 of a
//! canonical encoding of both, so identical work is one vertex wherever it appears. Names,
//! stages and source locations are metadata and never part of a digest.
//!
//! The crate is pure: no IO, no async, no clock.

mod builder;
mod op;
mod render;

pub use builder::{Graph, GraphBuilder, GraphError, Output, Vertex, VertexMeta, vertex_digest};
pub use op::{
    CacheSharing, Chown, CopyAction, ExecOp, FileAction, FileOp, Input, MergeOp, Mount, MountKind, NetworkMode, Op,
    OpKind, SecretMount, SecurityMode, SourceOp, SshMount,
};
pub use render::{render_dot, render_json, render_text};
