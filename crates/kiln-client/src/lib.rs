//! A typed client of a Kiln daemon: connects over a unix socket (`unix:///path`, the
//! embedded default) or TCP (`http://host:port`) and turns the event stream into Rust
//! values through `kiln_proto::convert` (with `kiln-api`, the only places that see proto
//! types).

mod blobs;
mod error;
mod worker;

pub use blobs::{UploadStats, fetch_blob, fetch_from_any};
pub use error::ClientError;
pub use kiln_proto::tls::{NodeTls, TlsError};
pub use worker::{WorkerLink, WorkerSession};

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
pub use kiln_model::{BuildEvent, BuildRequest};
use kiln_model::{PruneOptions, PruneReport, UsageRecord, WorkerStatus};
use kiln_proto::convert::{event_from_proto, prune_to_proto, request_to_proto, usage_from_proto, worker_from_proto};
use kiln_proto::v1::{self, control_client::ControlClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A connection to a daemon.
#[derive(Clone)]
pub struct Client {
    control: ControlClient<InterceptedService<Channel, Bearer>>,
}

/// How a client reaches a daemon over TCP.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// For `https://` addresses: the CA that signed the daemon's certificate.
    pub tls: Option<NodeTls>,
    /// The bearer token the daemon knows this client by.
    pub token: Option<String>,
}

/// Adds the client's token to every request.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// What the daemon says about itself.
#[derive(Debug, Clone)]
pub struct Info {
    /// Its version.
    pub version: String,
    /// Its worker's name.
    pub worker: String,
    /// Its state directory.
    pub root: String,
    /// Platforms it builds.
    pub platforms: Vec<String>,
    /// `standalone` or `coordinator`.
    pub role: String,
    /// Connected workers (a coordinator).
    pub workers: u32,
    /// Jobs waiting for a worker.
    pub queued: u64,
}

use kiln_proto::{CONNECTION_WINDOW, MAX_MESSAGE, STREAM_WINDOW};

/// An endpoint for `http://HOST:PORT`, or `https://HOST:PORT` with `tls` (the server's
/// certificate checked against the CA, this end's own presented when it has one), with
/// Kiln's transport settings.
pub fn endpoint(address: &str, tls: Option<&NodeTls>) -> Result<Endpoint, ClientError> {
    let invalid = |reason: String| ClientError::Address { address: address.to_string(), reason };
    let endpoint = Endpoint::from_shared(address.to_string()).map_err(|e| invalid(e.to_string()))?;
    let endpoint = match (address.starts_with("https://"), tls) {
        (false, _) => endpoint,
        (true, Some(tls)) => endpoint.tls_config(tls.client()).map_err(|e| invalid(e.to_string()))?,
        (true, None) => {
            return Err(invalid(
                "https:// needs the CA that signed the server's certificate (--tls-ca FILE or KILN_TLS_CA)".into(),
            ));
        }
    };
    Ok(tuned(endpoint))
}

fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

impl Client {
    /// Connects to `unix:///path/to/socket` or `http://host:port`.
    pub async fn connect(address: &str) -> Result<Client, ClientError> {
        Client::connect_with(address, &ClientOptions::default()).await
    }

    /// Connects to `unix:///path/to/socket`, `http://host:port` or `https://host:port`,
    /// presenting the options' token on every request.
    pub async fn connect_with(address: &str, options: &ClientOptions) -> Result<Client, ClientError> {
        let bearer = match &options.token {
            None => Bearer(None),
            Some(token) => Bearer(Some(format!("Bearer {token}").parse().map_err(|_| ClientError::Token)?)),
        };
        let channel = if let Some(path) = address.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            tuned(Endpoint::from_static("http://kilnd.local"))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        } else {
            endpoint(address, options.tls.as_ref())?.connect().await
        }
        .map_err(|source| ClientError::Connect { address: address.to_string(), source })?;
        let control = ControlClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        Ok(Client { control })
    }

    /// Asks the daemon to describe itself.
    pub async fn info(&self) -> Result<Info, ClientError> {
        let info =
            self.control.clone().info(v1::InfoRequest {}).await.map_err(|e| ClientError::rpc("", e))?.into_inner();
        Ok(Info {
            version: info.version,
            worker: info.worker,
            root: info.root,
            platforms: info.platforms,
            role: info.role,
            workers: info.workers,
            queued: info.queued,
        })
    }

    /// The workers of the cluster.
    pub async fn workers(&self) -> Result<Vec<WorkerStatus>, ClientError> {
        let response = self
            .control
            .clone()
            .list_workers(v1::ListWorkersRequest {})
            .await
            .map_err(|e| ClientError::rpc("", e))?
            .into_inner();
        let malformed = |source| ClientError::Malformed { what: "the daemon".into(), source };
        response.workers.into_iter().map(|w| worker_from_proto(w).map_err(malformed)).collect()
    }

    /// What the daemon's worker store holds (a coordinator: every connected worker's), and
    /// the workers that did not answer, with why.
    pub async fn disk_usage(&self) -> Result<(Vec<UsageRecord>, Vec<String>), ClientError> {
        let response = self
            .control
            .clone()
            .disk_usage(v1::DiskUsageRequest {})
            .await
            .map_err(|e| ClientError::rpc("", e))?
            .into_inner();
        let malformed = |source| ClientError::Malformed { what: "the daemon".into(), source };
        let records = response.records.into_iter().map(|r| usage_from_proto(r).map_err(malformed));
        Ok((records.collect::<Result<_, _>>()?, response.errors))
    }

    /// Removes what `options` selects from the worker stores; what was freed, and the
    /// workers that did not answer, with why.
    pub async fn prune(&self, options: &PruneOptions) -> Result<(PruneReport, Vec<String>), ClientError> {
        let response = self
            .control
            .clone()
            .prune(prune_to_proto(options))
            .await
            .map_err(|e| ClientError::rpc("", e))?
            .into_inner();
        Ok((PruneReport { reclaimed: response.reclaimed, records: response.records }, response.errors))
    }

    /// Starts a build; events arrive on the stream until [`BuildEvent::Result`]. Dropping the
    /// stream cancels the build.
    pub async fn build(&self, request: BuildRequest) -> Result<BuildEvents, ClientError> {
        let request = request_to_proto(&request);
        let stream = self.control.clone().build(request).await.map_err(|e| ClientError::rpc("", e))?.into_inner();
        Ok(BuildEvents { stream })
    }
}

/// The events of one build.
pub struct BuildEvents {
    stream: tonic::Streaming<v1::BuildEvent>,
}

impl BuildEvents {
    /// The next event; `None` after the result.
    pub async fn next(&mut self) -> Result<Option<BuildEvent>, ClientError> {
        loop {
            let Some(event) = self.stream.message().await.map_err(|e| ClientError::rpc("the daemon", e))? else {
                return Ok(None);
            };
            if let Some(event) = event.event {
                return event_from_proto(event)
                    .map(Some)
                    .map_err(|source| ClientError::Malformed { what: "the daemon".into(), source });
            }
        }
    }
}
