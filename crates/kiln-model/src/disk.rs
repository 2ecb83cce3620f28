//! Disk usage and pruning (`kiln du`, `kiln prune`): what a worker keeps, as records.

use std::time::Duration;

/// What a record of a worker's store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A layer: a step's result or an image layer, with the blobs kept for it.
    Layer,
    /// A blob of an uploaded build context.
    Context,
    /// Any other blob: image manifests and configs, cache configs.
    Source,
    /// A `RUN --mount=type=cache` directory.
    CacheMount,
}

impl RecordKind {
    /// The name in `kiln du` (`layer`, `context`, `source`, `cache-mount`).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Layer => "layer",
            RecordKind::Context => "context",
            RecordKind::Source => "source",
            RecordKind::CacheMount => "cache-mount",
        }
    }
}

impl std::str::FromStr for RecordKind {
    type Err = String;

    fn from_str(text: &str) -> Result<RecordKind, String> {
        [RecordKind::Layer, RecordKind::Context, RecordKind::Source, RecordKind::CacheMount]
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| format!("unknown record kind {text:?}"))
    }
}

/// One record of a worker's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Its id: a layer id, a blob digest, or a cache mount's `ID-DIGEST/INSTANCE`.
    pub id: String,
    /// What it is.
    pub kind: RecordKind,
    /// Bytes on disk.
    pub size: u64,
    /// The last use, in milliseconds since the Unix epoch, when recorded.
    pub last_used: Option<u64>,
    /// How many builds or jobs used it.
    pub usage_count: u64,
    /// Whether a running build or job holds it (it cannot be removed now).
    pub in_use: bool,
    /// The worker holding it.
    pub worker: String,
}

/// What `kiln prune` removes: records nobody holds, least recently used first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneOptions {
    /// Also cache mounts (without it they are kept).
    pub all: bool,
    /// Stop once the store takes no more than this many bytes.
    pub keep_storage: Option<u64>,
    /// Only records unused for at least this long.
    pub until: Option<Duration>,
}

/// What a prune (or a garbage collection) freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Bytes freed.
    pub reclaimed: u64,
    /// Records removed.
    pub records: u64,
}
