//! A job as a worker receives it from its control plane.

use std::collections::HashMap;

use kiln_graph::Vertex;
use kiln_types::Digest;

use crate::{ContextManifest, JobId, Layers, TierBlob};

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
}
