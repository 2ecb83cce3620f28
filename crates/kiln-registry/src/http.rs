//! `ADD <url>`: downloads into the blob store, checked against `--checksum` when given.

use std::sync::Arc;

use kiln_cas::{BlobStore, CasError};
use kiln_types::Digest;

use crate::client::{RegistryClient, request_kind, status_kind};
use crate::error::{ErrorKind, RegistryError};
use crate::sink::{SinkError, stream_into_store};

/// A finished download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Download {
    /// Digest of the body, now in the blob store.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

impl RegistryClient {
    /// Downloads `url` into the blob store. With `checksum`, a body with another digest is an
    /// error and never stored. HTTP errors name the status; 5xx, 429 and connection failures
    /// are retried.
    pub async fn download(
        &self,
        url: &str,
        checksum: Option<&Digest>,
        cas: &Arc<BlobStore>,
    ) -> Result<Download, RegistryError> {
        let action = "downloading";
        self.retry(action, &url, || async {
            let failure = |kind, message: String| RegistryError::new(action, url, kind, message);
            let response = self.web.get(url).send().await.map_err(|e| failure(request_kind(&e), e.to_string()))?;
            let status = response.status();
            if !status.is_success() {
                return Err(failure(status_kind(status), format!("the server answered {status}")));
            }
            match stream_into_store(response.bytes_stream(), cas, checksum.copied(), None).await {
                Ok(info) => Ok(Download { digest: info.digest, size: info.size }),
                Err(SinkError::Body(e)) => Err(failure(ErrorKind::Network, format!("reading the body: {e}"))),
                Err(SinkError::Task(e)) => Err(failure(ErrorKind::Invalid, e)),
                Err(SinkError::Store(CasError::DigestMismatch { expected, actual, .. })) => {
                    Err(failure(ErrorKind::Integrity, format!("checksum mismatch: expected {expected}, got {actual}")))
                }
                Err(SinkError::Store(other)) => Err(failure(ErrorKind::Invalid, other.to_string())),
            }
        })
        .await
    }
}
