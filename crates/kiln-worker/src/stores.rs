//! What a node keeps and moves: the blob store, the snapshot store and the registry client.
//! A worker executes steps over them; a coordinator, which executes nothing, opens only
//! these to receive contexts, bring result layers in and export images and files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_kv::SharedKv;
use kiln_layer::SnapshotStore;
use kiln_registry::{RegistryClient, RegistryOptions};

use kiln_layer::LayerError;
use kiln_types::Digest;

use crate::WorkerError;

/// Why moving or exporting content failed; each names the layer, blob or path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A layer could not be exported, imported or found.
    #[error("layer {layer}: {source}")]
    Layer {
        /// The layer (its id or diff id).
        layer: String,
        /// Why.
        #[source]
        source: LayerError,
    },
    /// A snapshot could not be mounted or read.
    #[error(transparent)]
    Snapshot(#[from] LayerError),
    /// A layer is held by no connected worker: it went with its worker.
    #[error("layer {0} is on no connected worker")]
    Unavailable(Digest),
    /// Fetching a blob from peers failed.
    #[error("{what} {digest}: {reason}")]
    Fetch {
        /// `layer` or `context file`.
        what: &'static str,
        /// The blob.
        digest: Digest,
        /// The fetcher's reason (each peer's).
        reason: String,
    },
    /// The blob store failed.
    #[error(transparent)]
    Cas(#[from] kiln_cas::CasError),
    /// Writing an export failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Pushing layers to a cache or a registry failed.
    #[error("pushing to {target}: {reason}")]
    Push {
        /// The cache or image reference.
        target: String,
        /// Why.
        reason: String,
    },
    /// Copying a snapshot's files out failed (the message names the path).
    #[error("{0}")]
    Copy(String),
    /// The blocking task doing the work died.
    #[error("worker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A node's stores and registry client. Transfers (`describe`, `ensure_layers`,
/// `ensure_blobs`) and exports (`export_layers`, `export_local`, `export_tar`) are theirs.
pub struct Stores {
    pub(crate) cas: Arc<BlobStore>,
    pub(crate) snapshots: Arc<SnapshotStore>,
    pub(crate) registry: RegistryClient,
    /// Layers being fetched from peers, so concurrent jobs fetch each once.
    pub(crate) fetching: std::sync::Mutex<HashMap<kiln_types::Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// Shared caches opened to fetch layers, by spec.
    pub(crate) tiers: tokio::sync::Mutex<HashMap<String, Arc<dyn kiln_cache::CacheStore>>>,
}

impl Stores {
    /// Opens the blob and snapshot stores under `root` (clearing mounts a crash left) with
    /// metadata in `kv`, and a registry client. No runner is needed.
    pub fn open(root: &Path, registry: RegistryOptions, kv: SharedKv) -> Result<Stores, WorkerError> {
        let failed = |message: String| WorkerError::Failed { vertex: "worker".into(), message };
        let cas = BlobStore::open(&root.join("blobs"), kv.clone()).map_err(|e| failed(e.to_string()))?;
        let snapshots = SnapshotStore::open(&root.join("snapshots"), kv).map_err(|e| failed(e.to_string()))?;
        let registry = RegistryClient::new(registry).map_err(|e| failed(e.to_string()))?;
        Ok(Stores {
            cas: Arc::new(cas),
            snapshots: Arc::new(snapshots),
            registry,
            fetching: std::sync::Mutex::default(),
            tiers: tokio::sync::Mutex::default(),
        })
    }

    /// The blob store.
    pub fn cas(&self) -> &Arc<BlobStore> {
        &self.cas
    }

    /// The snapshot store.
    pub fn snapshots(&self) -> &Arc<SnapshotStore> {
        &self.snapshots
    }

    /// The registry client (shared by pulls, resolution and pushes).
    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }
}
