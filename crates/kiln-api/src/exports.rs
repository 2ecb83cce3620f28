//! File outputs go back to the client. The engine writes them into a spool under the
//! daemon's root; they are streamed to the client as `ExportData` pieces and the spool is
//! removed. A daemon never writes at a path a client names (as buildx, whose exporters
//! write on the client side).

use std::path::{Path, PathBuf};

use kiln_engine::SpooledFile;
use kiln_model::BuildEvent as DomainEvent;
use kiln_proto::convert::event_to_proto;
use kiln_proto::v1::BuildEvent;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tonic::Status;

/// The directory under the daemon's root that holds every build's spool.
pub(crate) const SPOOL_DIR: &str = "exports";

/// The size of one piece: small enough that the 256 events a build's stream buffers stay
/// well under the message limit and in a bounded amount of memory.
const PIECE: usize = 256 * 1024;

/// A fresh spool for one build (numbered across every service of this process).
pub(crate) fn new_spool(root: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    root.join(SPOOL_DIR).join(n.to_string())
}

/// Removes the spools a stopped or crashed daemon left in `root`; call it once at start,
/// before serving.
pub fn clear_spools(root: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(root.join(SPOOL_DIR)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a spool (off the async threads: it may hold a whole root filesystem as a tar).
pub(crate) async fn remove_spool(spool: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(spool)).await;
}

/// A spooled output that could not be read back to send it.
#[derive(Debug, thiserror::Error)]
#[error("sending output {output} to the client: {source}")]
pub(crate) struct SendError {
    output: usize,
    #[source]
    source: std::io::Error,
}

/// Sends every file, in pieces, each file ending with a piece marked last. An error names
/// the output; a client that left ends the sending quietly (its build is over anyway).
pub(crate) async fn send(
    files: &[SpooledFile],
    events: &mpsc::Sender<Result<BuildEvent, Status>>,
) -> Result<(), SendError> {
    for file in files {
        let fail = |source| SendError { output: file.output, source };
        let mut reader = tokio::fs::File::open(&file.path).await.map_err(fail)?;
        loop {
            let mut data = Vec::with_capacity(PIECE);
            (&mut reader).take(PIECE as u64).read_to_end(&mut data).await.map_err(fail)?;
            let last = data.len() < PIECE;
            let piece =
                DomainEvent::ExportData { output: file.output, unpack_into: file.unpack_into.clone(), data, last };
            let event = event_to_proto(piece);
            if events.send(Ok(event)).await.is_err() || last {
                break;
            }
        }
    }
    Ok(())
}
