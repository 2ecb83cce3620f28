//! The one build event: what the engine reports, the daemon streams and the client reads.

use kiln_types::Digest;

use crate::{LogLine, VertexRecord};

/// Progress of a build, in order; [`BuildEvent::Result`] is always last. The engine emits
/// the progress variants; the daemon adds the file outputs ([`BuildEvent::ExportData`]) and
/// the result. Its wire twin is `kiln.v1.BuildEvent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// The graph is known: every vertex, in execution order, status `skipped` until it ends.
    Planned(Vec<VertexRecord>),
    /// A vertex started executing (for this build or another one it waits on).
    Started {
        /// The vertex.
        vertex: Digest,
        /// Milliseconds since the Unix epoch.
        at: u64,
    },
    /// A line of a vertex's output (replayed for late waiters).
    Log {
        /// The vertex.
        vertex: Digest,
        /// The line.
        line: LogLine,
    },
    /// A vertex finished: executed, cached, deduplicated, or failed.
    Completed {
        /// Its record.
        record: Box<VertexRecord>,
        /// The error, when it failed.
        error: Option<String>,
    },
    /// An export step (`exporting layers`, `pushing REF`, ...).
    Export {
        /// What is exported.
        name: String,
        /// Start, ms since the epoch.
        started: u64,
        /// End, once done.
        completed: Option<u64>,
    },
    /// A piece of a file output, which the client writes (the daemon never writes a
    /// client's paths); every file ends with a piece marked `last`.
    ExportData {
        /// The output (index into the request's outputs).
        output: usize,
        /// `type=local`: the file is a tar to unpack into this directory under `dest` (`""`:
        /// `dest` itself). Otherwise `None`: the file is `dest`.
        unpack_into: Option<String>,
        /// The bytes.
        data: Vec<u8>,
        /// The file's last piece.
        last: bool,
    },
    /// The end: always last.
    Result {
        /// The error, when the build failed.
        error: Option<String>,
        /// The exported image's digest.
        image: Option<Digest>,
        /// Every vertex.
        records: Vec<VertexRecord>,
    },
}
