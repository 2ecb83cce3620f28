//! A job as a worker receives it from its control plane.

use std::collections::HashMap;

use kiln_graph::Vertex;
use kiln_types::Digest;

use crate::{CacheCompression, ContextManifest, JobId, Layers, TierBlob};

/// The identity of a job's work: what it computes ([`work_of`]), the same on every
/// coordinator and worker. A worker that lost its coordinator keeps running its jobs and
/// reports them by work at its next registration; whichever coordinator then needs the
/// same work adopts the running job (or takes the finished result) instead of running it
/// again.
pub type Work = Digest;

/// How long after a worker registers again the jobs it kept from its lost session wait to be
/// adopted (ms). Then the worker stops them and drops their kept results, and coordinators
/// forget them: longer than a new leader takes to recover (it waits up to a lease for its
/// workers) plus a client's reattachment.
pub const ADOPTION_GRACE_MS: u64 = 30_000;

/// A job a worker kept across a lost session, as its registration reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldWork {
    /// What it computes.
    pub work: Work,
    /// `true`: it finished and its result waits to be asked for; `false`: still running.
    pub finished: bool,
}

/// What a job computes: its vertex (which names the op and its inputs' vertices), the
/// layers of its inputs, and the cache group whose cache mounts it sees. `None` for a
/// context source, whose files come from its build rather than from the vertex: two builds'
/// context sources may share a vertex and differ in content, so they are never adopted.
pub fn work_of(vertex: &Vertex, inputs: &[Layers], cache_group: Option<&str>) -> Option<Work> {
    if matches!(vertex.op, kiln_graph::Op::Source(kiln_graph::SourceOp::Local { .. })) {
        return None;
    }
    let mut hash = kiln_types::Sha256Writer::new();
    hash.field(b"kiln-work-v1");
    hash.field(vertex.digest.as_bytes());
    hash.field(cache_group.unwrap_or("").as_bytes());
    for input in inputs {
        hash.field(&(input.layers.len() as u64).to_le_bytes());
        for layer in &input.layers {
            hash.field(layer.diff_id.as_bytes());
        }
    }
    Some(hash.finish())
}

/// A job as the worker receives it.
#[derive(Debug)]
pub struct Assignment {
    /// The job.
    pub job: JobId,
    /// Its epoch (echoed back).
    pub epoch: u32,
    /// The vertex.
    pub vertex: Vertex,
    /// Its inputs' layers.
    pub inputs: Vec<Layers>,
    /// Peers holding each input layer.
    pub sources: HashMap<Digest, Vec<String>>,
    /// The shared cache's blob of each input layer it holds (by diff id), fetched from there
    /// when no peer serves the layer.
    pub tier: HashMap<Digest, TierBlob>,
    /// Secrets (RUN steps only).
    pub secrets: HashMap<String, Vec<u8>>,
    /// Context manifests (context sources only).
    pub contexts: HashMap<String, ContextManifest>,
    /// The blob service holding the contexts' files.
    pub context_address: String,
    /// The cache group of the job's build (`None`: the default group): its cache mounts are
    /// that group's.
    pub cache_group: Option<String>,
    /// The trace context of the vertex's span, when traced: the worker's phase spans go
    /// under it.
    pub trace: Option<crate::TraceContext>,
}

impl Assignment {
    /// What the job computes ([`work_of`]).
    pub fn work(&self) -> Option<Work> {
        work_of(&self.vertex, &self.inputs, self.cache_group.as_deref())
    }
}

/// What the coordinator sends.
#[derive(Debug)]
pub enum FromCoordinator {
    /// Run a job.
    Assign(Box<Assignment>),
    /// Stop a job.
    Cancel(JobId),
    /// An assignment this worker could not read: report it failed (the session goes on).
    Unreadable {
        /// The job.
        job: JobId,
        /// Its epoch.
        epoch: u32,
        /// Why.
        error: String,
    },
    /// Push layers this worker holds.
    Push(PushRequest),
    /// A push request this worker could not read: answer it failed.
    UnreadablePush {
        /// The request.
        request: u64,
        /// Why.
        error: String,
    },
}

/// Layers a worker holds, pushed by it straight to a cache or a registry (an export runs on
/// the workers holding the layers; only descriptors go back to the coordinator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRequest {
    /// The request, echoed in the answer.
    pub request: u64,
    /// The layers, by diff id, bottom first.
    pub layers: Vec<Digest>,
    /// Where they go.
    pub target: PushTarget,
    /// How layers not yet compressed are compressed.
    pub compression: CacheCompression,
    /// `SOURCE_DATE_EPOCH` for layer tars written for the push.
    pub source_date_epoch: Option<u64>,
}

/// Where a worker pushes layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushTarget {
    /// A cache, as a `--cache-to` spec.
    Cache(String),
    /// The repository of an image reference.
    Registry(String),
}

/// A layer as pushed: the blob it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedLayer {
    /// Its diff id.
    pub diff_id: Digest,
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The blob's media type.
    pub media_type: String,
    /// The uncompressed tar's size, when the worker wrote the tar.
    pub tar_size: Option<u64>,
}
