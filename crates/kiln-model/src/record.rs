//! What happened to one vertex of a build.

use kiln_graph::Vertex;
use kiln_types::Digest;
use serde::{Deserialize, Serialize};

/// How a vertex ended, as the metadata file and the wire name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// This build executed it.
    Executed,
    /// The cache had it.
    Cached,
    /// Another build was executing it; this one waited for that result.
    Deduplicated,
    /// It never ran (the build failed or was cancelled first).
    Skipped,
    /// It failed.
    Failed,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 5] =
        [Status::Executed, Status::Cached, Status::Deduplicated, Status::Skipped, Status::Failed];

    /// The name the metadata file and the wire use.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Executed => "executed",
            Status::Cached => "cached",
            Status::Deduplicated => "deduplicated",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is none of [`Status::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown vertex status {0:?}")]
pub struct UnknownStatus(pub String);

impl std::str::FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(name: &str) -> Result<Status, UnknownStatus> {
        Status::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| UnknownStatus(name.to_string()))
    }
}

/// One vertex of a build, for progress and the metadata file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexRecord {
    /// Vertex digest.
    pub digest: Digest,
    /// Progress name, e.g. `[build 2/3] RUN make`.
    pub name: String,
    /// `source`, `exec`, `file` or `merge`, as `kiln plan` prints it.
    pub kind: String,
    /// The stage it was created for.
    pub stage: Option<String>,
    /// How it ended.
    pub status: Status,
    /// The worker that executed it (for deduplicated vertices: the one the result came from).
    pub worker: Option<String>,
    /// Its platform.
    pub platform: Option<String>,
    /// When execution started (ms since the epoch).
    pub started: Option<u64>,
    /// When it finished (ms since the epoch).
    pub completed: Option<u64>,
    /// For a cached vertex, where the result came from: `local`, `worker:NAME`,
    /// `registry:REF`, `s3:BUCKET/NAME`, `local:DIR` or `shared`.
    pub cache_source: Option<String>,
    /// For an executed vertex, where its time went.
    #[serde(default, skip_serializing_if = "Phases::is_empty")]
    pub phases: Phases,
    /// For a deduplicated vertex, the build that executed it (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplicated_from: Option<String>,
}

/// Where an execution's time went, in milliseconds; a phase that did not happen (a standalone
/// worker fetches nothing) is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    /// Ready, waiting for a worker slot (on a cluster: until the worker was assigned it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<u64>,
    /// Fetching its inputs on the worker: layers from peers or the shared tier, context files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ms: Option<u64>,
    /// Running the step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute_ms: Option<u64>,
    /// Turning its result into layer blobs (a cluster worker, for its peers and the shared tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_ms: Option<u64>,
}

impl Phases {
    /// No phase measured.
    pub fn is_empty(&self) -> bool {
        *self == Phases::default()
    }

    /// The worker's own time: fetch, execute and export.
    pub fn on_worker_ms(&self) -> u64 {
        [self.fetch_ms, self.execute_ms, self.export_ms].into_iter().flatten().sum()
    }
}

impl VertexRecord {
    /// The record of a vertex that has not run yet (status [`Status::Skipped`] until it ends).
    pub fn planned(vertex: &Vertex) -> VertexRecord {
        VertexRecord {
            digest: vertex.digest,
            name: vertex.meta.name.clone(),
            kind: vertex.op.kind().as_str().to_string(),
            stage: vertex.meta.stage.clone(),
            status: Status::Skipped,
            worker: None,
            platform: vertex.meta.platform.as_ref().map(|p| p.to_string()),
            started: None,
            completed: None,
            cache_source: None,
            phases: Phases::default(),
            deduplicated_from: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip_and_match_serde() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{status}\""));
        }
        assert_eq!("running".parse::<Status>(), Err(UnknownStatus("running".into())));
    }
}
