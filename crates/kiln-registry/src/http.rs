//! `ADD <url>`: downloads into the blob store, checked against `--checksum` when given.

use std::io::Write as _;
use std::sync::Arc;

use futures_util::StreamExt as _;
use kiln_cas::{BlobStore, CasError};
use kiln_types::Digest;

use crate::client::RegistryClient;
use crate::error::{ErrorKind, RegistryError};

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
            let response = self.web.get(url).send().await.map_err(|e| {
                let kind = if e.is_timeout() { ErrorKind::Timeout } else { ErrorKind::Network };
                failure(kind, e.to_string())
            })?;
            let status = response.status();
            if !status.is_success() {
                let kind = match status.as_u16() {
                    401 | 403 => ErrorKind::Unauthorized,
                    404 | 410 => ErrorKind::NotFound,
                    429 | 500..=599 => ErrorKind::Server,
                    _ => ErrorKind::Invalid,
                };
                return Err(failure(kind, format!("the server answered {status}")));
            }
            let (sender, receiver) = std::sync::mpsc::sync_channel::<bytes::Bytes>(16);
            let store = Arc::clone(cas);
            let expected = checksum.copied();
            let writer = tokio::task::spawn_blocking(move || -> Result<Download, CasError> {
                let mut ingest = store.ingest()?;
                for chunk in receiver {
                    ingest.write_all(&chunk).map_err(|source| CasError::Io { path: "download".into(), source })?;
                }
                let info = ingest.commit(expected.as_ref())?;
                Ok(Download { digest: info.digest, size: info.size })
            });
            let mut body = response.bytes_stream();
            let mut broken = None;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(chunk) => {
                        if sender.send(chunk).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        broken = Some(failure(ErrorKind::Network, format!("reading the body: {e}")));
                        break;
                    }
                }
            }
            drop(sender);
            let written = writer.await.map_err(|e| failure(ErrorKind::Invalid, e.to_string()))?;
            if let Some(broken) = broken {
                return Err(broken);
            }
            written.map_err(|e| match e {
                CasError::DigestMismatch { expected, actual, .. } => {
                    failure(ErrorKind::Integrity, format!("checksum mismatch: expected {expected}, got {actual}"))
                }
                other => failure(ErrorKind::Invalid, other.to_string()),
            })
        })
        .await
    }
}
