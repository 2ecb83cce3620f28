//! A blob written into the store from async code: chunks arrive on a channel and are written
//! on a blocking thread, then verified against the expected digest and published.

use std::sync::Arc;

use kiln_types::Digest;
use tokio::sync::mpsc;

use crate::{BlobInfo, BlobStore, CasError, Ingest, Unsynced};

/// The chunk sender of a blob being written, and the handle that finishes it.
pub type BlobWriter<T> = (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<Result<T, CasError>>);

/// A blob being written into `store` off the async threads: chunks go to the returned
/// sender; dropping it ends the blob, which the handle then verifies against `expected`,
/// syncs and publishes.
pub fn blob_writer(store: Arc<BlobStore>, expected: Digest) -> BlobWriter<BlobInfo> {
    writer(store, move |ingest| ingest.commit(Some(&expected)))
}

/// Like [`blob_writer`], but the blob is only verified and closed, for the receiver to
/// publish a whole batch with one sync ([`BlobStore::publish`]).
pub fn unsynced_blob_writer(store: Arc<BlobStore>, expected: Digest) -> BlobWriter<Unsynced> {
    writer(store, move |ingest| ingest.finish_unsynced(Some(&expected)))
}

fn writer<T: Send + 'static>(
    store: Arc<BlobStore>,
    finish: impl FnOnce(Ingest<'_>) -> Result<T, CasError> + Send + 'static,
) -> BlobWriter<T> {
    let (sender, mut chunks) = mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let mut ingest = store.ingest()?;
        while let Some(chunk) = chunks.blocking_recv() {
            std::io::Write::write_all(&mut ingest, &chunk)
                .map_err(|source| CasError::Io { path: ingest.tmp.clone(), source })?;
        }
        finish(ingest)
    });
    (sender, writer)
}
