//! Workers and their layers as the cluster sees them.

use std::collections::BTreeMap;

use kiln_types::{Digest, Platform};
use serde::{Deserialize, Serialize};

/// A job's id, unique in the coordinator.
pub type JobId = u64;

/// A layer by content: the digest of its uncompressed tar and that tar's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerDesc {
    /// The diff id.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub size: u64,
}

/// A vertex result in the cluster: its filesystem as layers, bottom first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layers {
    /// The layers.
    pub layers: Vec<LayerDesc>,
}

/// A layer's blob in a shared cache: where a node fetches a layer that no live worker
/// holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TierBlob {
    /// The cache, as a `--cache-from` spec (`type=s3,...`, `type=registry,...`).
    pub cache: String,
    /// The blob's digest (of its compressed bytes).
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type (the compression).
    pub media_type: String,
}

/// What the worker tells about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its unique name.
    pub name: String,
    /// Platforms it runs.
    pub platforms: Vec<Platform>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// Jobs at once, at most.
    pub max_parallelism: usize,
    /// Jobs to place on it at once now (0: `max_parallelism`): an adaptive worker's grows
    /// while its machine is calm and shrinks under pressure (docs/parallelism.md).
    #[serde(default)]
    pub capacity: usize,
    /// Free bytes on its state directory's disk.
    pub free_disk: u64,
    /// Its blob service (`http://HOST:PORT`) for peers.
    pub address: String,
    /// Entitlements its config grants (`worker.entitlements`).
    #[serde(default)]
    pub entitlements: Vec<crate::Entitlement>,
    /// Bytes its cache holds, as its last garbage collection measured (0: not yet).
    #[serde(default)]
    pub cache_bytes: u64,
}

impl WorkerInfo {
    /// The jobs a coordinator places on it at once now: its capacity, within its
    /// `max_parallelism`, at least one.
    pub fn slots(&self) -> usize {
        let capacity = if self.capacity == 0 { self.max_parallelism } else { self.capacity };
        capacity.min(self.max_parallelism).max(1)
    }
}

/// What a worker's heartbeat tells besides renewing its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Beat {
    /// Free bytes on its state directory's disk.
    pub free_disk: u64,
    /// Bytes its cache holds, as its last garbage collection measured.
    pub cache_bytes: u64,
    /// Its capacity now ([`WorkerInfo::capacity`]).
    pub capacity: usize,
}

/// A worker as listed by `kiln workers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// What it registered.
    pub info: WorkerInfo,
    /// Jobs running on it.
    pub running: usize,
    /// It finishes its work and takes no more.
    pub draining: bool,
    /// Its last heartbeat (ms since the epoch).
    pub last_heartbeat: u64,
    /// Layers the coordinator knows it holds.
    pub layers: usize,
}

impl WorkerStatus {
    /// The worker as `kiln workers --format json` and the web UI show it (a stable shape).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.info.name,
            "platforms": self.info.platforms.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            "labels": self.info.labels,
            "max_parallelism": self.info.max_parallelism,
            "slots": self.info.slots(),
            "running": self.running,
            "free_disk": self.info.free_disk,
            "cache_bytes": self.info.cache_bytes,
            "address": self.info.address,
            "state": if self.draining { "draining" } else { "ready" },
            "last_heartbeat": self.last_heartbeat,
            "layers": self.layers,
            "entitlements": self.info.entitlements.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
        })
    }
}

/// A step a worker runs now, as the web UI's workers page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningStep {
    /// The worker.
    pub worker: String,
    /// The step's name (`[stage 2/3] RUN ...`).
    pub name: String,
    /// Its vertex.
    pub vertex: Digest,
    /// When the worker was given it (ms since the epoch).
    pub since: u64,
}
