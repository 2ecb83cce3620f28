//! The blob service: stored blobs by digest (layer tars for peers, context files for
//! workers), streamed in chunks.

use std::io::Read as _;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_proto::convert::parse_digest;
use kiln_proto::v1::blobs_server::Blobs;
use kiln_proto::v1::{BlobChunk, FetchRequest};
use kiln_telemetry::{Direction, Transfer};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use tonic::{Request, Response, Status};

const CHUNK: usize = 1 << 20;

/// Serves a blob store.
pub struct BlobsService {
    store: Arc<BlobStore>,
}

impl BlobsService {
    /// A service over `store`.
    pub fn new(store: Arc<BlobStore>) -> BlobsService {
        BlobsService { store }
    }
}

#[tonic::async_trait]
impl Blobs for BlobsService {
    type FetchStream = ReceiverStream<Result<BlobChunk, Status>>;

    async fn fetch(&self, request: Request<FetchRequest>) -> Result<Response<Self::FetchStream>, Status> {
        let text = request.into_inner().digest;
        let digest = parse_digest(&text, "a blob to fetch").map_err(ApiError::from)?;
        let mut file = self.store.open_blob(&digest).map_err(|_| ApiError::NoBlob(digest))?;
        let (sender, receiver) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            loop {
                let mut data = vec![0; CHUNK];
                let n = match file.read(&mut data) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = sender.blocking_send(Err(ApiError::Read { digest, source: e }.into()));
                        return;
                    }
                };
                if n == 0 {
                    return;
                }
                data.truncate(n);
                if sender.blocking_send(Ok(BlobChunk { digest: String::new(), data })).is_err() {
                    return;
                }
                kiln_telemetry::metrics().transferred(Transfer::Peer, Direction::Out, n as u64);
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
