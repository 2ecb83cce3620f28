//! Streams bytes from the network into the blob store: async on the network side, blocking
//! file writes on a blocking thread, so no async thread ever waits on the disk.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use kiln_cas::{BlobInfo, BlobStore, CasError};
use kiln_types::Digest;

/// Why a stream did not become a blob.
pub(crate) enum SinkError {
    /// The body broke off.
    Body(String),
    /// The store refused it (digest or size mismatch, IO).
    Store(CasError),
    /// The writer task failed.
    Task(String),
}

/// Writes the stream into the store, checked against `expected` digest and `size` when given.
/// A body that breaks off leaves nothing behind.
pub(crate) async fn stream_into_store<S, E>(
    mut stream: S,
    cas: &Arc<BlobStore>,
    expected: Option<Digest>,
    size: Option<u64>,
) -> Result<BlobInfo, SinkError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Bytes>(16);
    let aborted = Arc::new(AtomicBool::new(false));
    let (store, writer_aborted) = (Arc::clone(cas), Arc::clone(&aborted));
    let writer = tokio::task::spawn_blocking(move || -> Result<Option<BlobInfo>, CasError> {
        let mut ingest = store.ingest()?;
        while let Some(chunk) = receiver.blocking_recv() {
            ingest.write_all(&chunk).map_err(|source| CasError::Io { path: "ingest".into(), source })?;
        }
        if writer_aborted.load(Ordering::SeqCst) {
            return Ok(None); // Dropping the ingest removes the partial file.
        }
        if let (Some(size), Some(digest)) = (size, expected)
            && ingest.size() != size
        {
            return Err(CasError::SizeMismatch { digest, expected: size, actual: ingest.size() });
        }
        ingest.commit(expected.as_ref()).map(Some)
    });
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                if sender.send(chunk).await.is_err() {
                    break; // The writer failed; its error is reported below.
                }
            }
            Err(e) => {
                failure = Some(e.to_string());
                aborted.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    drop(sender);
    let written = writer.await.map_err(|e| SinkError::Task(e.to_string()))?;
    if let Some(failure) = failure {
        return Err(SinkError::Body(failure));
    }
    match written {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Err(SinkError::Body("the transfer was aborted".into())),
        Err(e) => Err(SinkError::Store(e)),
    }
}
