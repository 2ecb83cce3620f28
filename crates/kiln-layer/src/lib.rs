//! Layers and snapshots: overlayfs-stacked layer directories, OCI layer tars out and in.
//!
//! Invariants:
//! - A committed layer directory is immutable; mounts only ever use it as a lower directory.
//! - Unpacking never writes outside its destination: names are cleaned lexically, `..` that
//!   climbs out is refused, parents that are symlinks are refused, never followed.
//! - Exported tars are a function of the layer's content (sorted, numeric ids, clamped times
//!   with `SOURCE_DATE_EPOCH`), so equal content gives equal digests.
//! - Every mount and temporary directory belongs to a guard that removes it on drop, and
//!   [`SnapshotStore::open`] clears what a killed process left.

mod export;
mod pgzip;
mod resolve;
mod snapshot;
mod unpack;
mod usage;

pub use export::{
    Compression, HashingWriter, LayerBlob, OPAQUE_MARKER, OPAQUE_XATTR, TarOptions, WHITEOUT_PREFIX, export_layer,
    write_layer_tar,
};
pub use resolve::{MAX_SYMLINK_HOPS, clean_lexically, resolve_in_root};
pub use snapshot::{ActiveSnapshot, LayerId, LayerRecord, LayerUsage, MAX_LAYERS, Removed, SnapshotStore};
pub use unpack::{UnpackStats, extract_archive, extract_archive_as, is_archive, unpack_layer};
pub use usage::{Hold, LayerUse, disk_usage};

use std::io;
use std::path::{Path, PathBuf};

use kiln_types::Digest;

/// An error from layer handling.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A filesystem error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A tar entry tried to write outside the destination.
    #[error("layer tar entry {entry:?} rejected: {reason}")]
    TarSlip {
        /// The entry name as written in the tar.
        entry: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The tar stream is malformed.
    #[error("malformed layer tar: {reason}")]
    BadTar {
        /// What was wrong.
        reason: String,
    },
    /// Unpacked content did not hash to the diff id the image config names.
    #[error("layer diff id mismatch: expected {expected}, got {actual}")]
    DiffIdMismatch {
        /// The diff id from the image config.
        expected: Digest,
        /// The diff id of the content.
        actual: Digest,
    },
    /// A chain names a layer the store does not hold.
    #[error("layer {0} is not in the snapshot store")]
    MissingLayer(LayerId),
    /// The chain is too long for one overlay mount.
    #[error(
        "{0} layers are too many for one overlay mount (overlayfs stacks at most {MAX_LAYERS}; kernels before 6.8 \
         take fewer, as many as fit in one page of mount options)"
    )]
    TooManyLayers(usize),
    /// mount(2) or umount(2) failed.
    #[error("overlay mount at {target}: {reason}")]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The kernel's reason.
        reason: String,
    },
    /// The blob store failed.
    #[error(transparent)]
    Cas(#[from] kiln_cas::CasError),
    /// The metadata store failed.
    #[error(transparent)]
    Kv(#[from] kiln_kv::KvError),
}

/// The threads a layer is compressed on: one per CPU this process may use.
pub(crate) fn compression_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io { path: path.to_path_buf(), source }
}

#[cfg(test)]
mod tests;
