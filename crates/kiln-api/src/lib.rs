//! The daemon's gRPC boundary: the control service over an [`Engine`], served on a unix
//! socket (the embedded default) or TCP. Converts domain types to proto (`to_proto`) and
//! requests from proto (`from_proto`); no other daemon crate sees proto types.

mod from_proto;
mod to_proto;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_engine::Engine;
use kiln_proto::v1::control_server::{Control, ControlServer};
use kiln_proto::v1::{BuildEvent, BuildRequest, InfoRequest, InfoResponse, build_event};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnixListenerStream};
use tonic::{Request, Response, Status};

/// The control service.
pub struct ControlService {
    engine: Arc<Engine>,
    root: PathBuf,
}

impl ControlService {
    /// A service over `engine`, whose state lives in `root`.
    pub fn new(engine: Arc<Engine>, root: &Path) -> ControlService {
        ControlService { engine, root: root.to_path_buf() }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    type BuildStream = ReceiverStream<Result<BuildEvent, Status>>;

    async fn build(&self, request: Request<BuildRequest>) -> Result<Response<Self::BuildStream>, Status> {
        let request = from_proto::build_request(request.into_inner()).map_err(Status::invalid_argument)?;
        let (events, stream) = mpsc::channel(256);
        let engine = Arc::clone(&self.engine);
        tokio::spawn(async move {
            let (progress, mut progress_events) = mpsc::unbounded_channel();
            let build = engine.build(request, progress);
            tokio::pin!(build);
            // Forward progress while the build runs; a closed stream means the client left,
            // and dropping the build future cancels this build's part of the work.
            let result = loop {
                tokio::select! {
                    result = &mut build => break result,
                    Some(event) = progress_events.recv() => {
                        if events.send(Ok(to_proto::progress(event))).await.is_err() {
                            return;
                        }
                    }
                }
            };
            while let Ok(event) = progress_events.try_recv() {
                let _ = events.send(Ok(to_proto::progress(event))).await;
            }
            let result = to_proto::result(result);
            let _ = events.send(Ok(BuildEvent { event: Some(build_event::Event::Result(result)) })).await;
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            worker: self.engine.name().to_string(),
            root: self.root.display().to_string(),
            platforms: self.engine.platforms().iter().map(|p| p.to_string()).collect(),
        }))
    }
}

/// Serves the control service on a unix socket until `shutdown` completes. A stale socket
/// file from an earlier daemon is replaced.
pub async fn serve_unix(
    service: ControlService,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    if socket.exists() {
        std::fs::remove_file(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    tonic::transport::Server::builder()
        .add_service(ControlServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| e.to_string())
}

/// Serves the control service on a TCP address until `shutdown` completes.
pub async fn serve_tcp(
    service: ControlService,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    tonic::transport::Server::builder()
        .add_service(ControlServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| e.to_string())
}
