//! Blob transfer: uploading a build context (find-missing first, then only what is
//! missing) and fetching blobs from a peer's blob service into a store.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex, OnceLock};

use kiln_cas::BlobStore;
use kiln_context::{ContextManifest, FsContext, ManifestKind};
use kiln_proto::v1::{self, blobs_client::BlobsClient};
use kiln_types::Digest;
use tonic::transport::Channel;

use crate::{Client, ClientError, NodeTls};

const CHUNK: usize = 1 << 20;

/// What an upload sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadStats {
    /// Files in the context.
    pub files: u64,
    /// Files whose content the daemon lacked and received.
    pub uploaded_files: u64,
    /// Their bytes.
    pub uploaded_bytes: u64,
}

impl Client {
    /// Hashes the context, asks the daemon which contents it lacks and uploads only those.
    pub async fn upload_context(
        &self,
        context: std::sync::Arc<FsContext>,
    ) -> Result<(ContextManifest, UploadStats), ClientError> {
        let walked = std::sync::Arc::clone(&context);
        let manifest = tokio::task::spawn_blocking(move || walked.manifest())
            .await?
            .map_err(|source| ClientError::Context { path: context.root().to_path_buf(), source })?;
        let blobs = manifest.blobs();
        let mut paths: HashMap<Digest, String> = HashMap::new();
        for entry in &manifest.entries {
            if let ManifestKind::File { digest, .. } = &entry.kind {
                paths.entry(*digest).or_insert_with(|| entry.path.clone());
            }
        }
        let request = v1::FindMissingRequest { digests: blobs.iter().map(|(d, _)| d.to_string()).collect() };
        let missing = self
            .call("", |mut control| {
                let request = request.clone();
                async move { control.find_missing(request).await }
            })
            .await?;
        let missing: Vec<Digest> = missing.missing.iter().filter_map(|d| d.parse().ok()).collect();
        let mut stats = UploadStats {
            files: manifest.entries.iter().filter(|e| matches!(e.kind, ManifestKind::File { .. })).count() as u64,
            ..UploadStats::default()
        };
        if missing.is_empty() {
            return Ok((manifest, stats));
        }
        let files: Vec<(Digest, std::path::PathBuf)> =
            missing.iter().filter_map(|d| paths.get(d).map(|p| (*d, context.file_path(p)))).collect();
        stats.uploaded_files = files.len() as u64;
        let (sender, receiver) = tokio::sync::mpsc::channel::<v1::BlobChunkUpload>(8);
        // Files are read on a blocking thread and streamed in chunks.
        let reader = tokio::task::spawn_blocking(move || -> Result<(), ClientError> {
            for (digest, path) in files {
                let io = |source| ClientError::Io { path: path.clone(), source };
                let file = std::fs::File::open(&path).map_err(io)?;
                let mut remaining = file.metadata().map_err(io)?.len();
                let mut file = file.take(u64::MAX);
                let mut first = true;
                // Chunks of at most CHUNK bytes, sized to what is left (most context files
                // are small); an empty file is one empty chunk.
                loop {
                    let mut data = Vec::with_capacity(remaining.clamp(1, CHUNK as u64) as usize);
                    file.set_limit(CHUNK as u64);
                    let n = file.read_to_end(&mut data).map_err(io)?;
                    if n == 0 && !first {
                        break;
                    }
                    remaining = remaining.saturating_sub(n as u64);
                    let digest = if first { digest.to_string() } else { String::new() };
                    first = false;
                    if sender.blocking_send(v1::BlobChunkUpload { digest, data }).is_err() {
                        return Ok(());
                    }
                    if n < CHUNK {
                        break;
                    }
                }
            }
            Ok(())
        });
        let response = self
            .control()
            .upload(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(|e| ClientError::rpc("uploading the build context", e))?
            .into_inner();
        reader.await??;
        stats.uploaded_bytes = response.bytes;
        Ok((manifest, stats))
    }
}

/// A channel to a blob service, shared by every fetch from it in this process (connected
/// lazily; it reconnects by itself after the peer comes back). A process is one node, with
/// one TLS identity.
fn channel(address: &str, tls: Option<&NodeTls>) -> Result<Channel, ClientError> {
    static CHANNELS: OnceLock<Mutex<HashMap<String, Channel>>> = OnceLock::new();
    let mut channels = CHANNELS.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(channel) = channels.get(address) {
        return Ok(channel.clone());
    }
    let channel = crate::endpoint(address, tls)?.connect_timeout(std::time::Duration::from_secs(5)).connect_lazy();
    channels.insert(address.to_string(), channel.clone());
    Ok(channel)
}

/// Fetches `digest` from the blob service at `address` into `store`, verifying it; `tls`
/// is this node's (the blob service takes only nodes of the cluster).
pub async fn fetch_blob(
    address: &str,
    tls: Option<&NodeTls>,
    digest: &Digest,
    store: &Arc<BlobStore>,
) -> Result<(), ClientError> {
    let mut stream = BlobsClient::new(channel(address, tls)?)
        .max_decoding_message_size(crate::MAX_MESSAGE)
        .fetch(v1::FetchRequest { digest: digest.to_string() })
        .await
        .map_err(|e| ClientError::rpc(address, e))?
        .into_inner();
    let (chunks, writer) = kiln_cas::blob_writer(Arc::clone(store), *digest);
    let received = async {
        while let Some(chunk) = stream.message().await.map_err(|e| ClientError::rpc(address, e))? {
            if chunks.send(chunk.data).await.is_err() {
                break;
            }
        }
        Ok::<(), ClientError>(())
    }
    .await;
    drop(chunks);
    let written = writer.await?;
    received?;
    written.map(drop).map_err(|source| ClientError::Store { digest: *digest, source })
}

/// Fetches `digest` from the first of `peers` that has it.
pub async fn fetch_from_any(
    peers: &[String],
    tls: Option<&NodeTls>,
    digest: &Digest,
    store: &Arc<BlobStore>,
) -> Result<(), ClientError> {
    let mut reasons = Vec::new();
    for peer in peers {
        match fetch_blob(peer, tls, digest, store).await {
            Ok(()) => return Ok(()),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    Err(ClientError::NoPeer { digest: *digest, reasons })
}
