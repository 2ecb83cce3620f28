//! A job as a worker receives it from its control plane.

use std::collections::HashMap;

use kiln_graph::Vertex;
use kiln_types::Digest;

use crate::{CacheCompression, ContextManifest, JobId, Layers, TierBlob};

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
