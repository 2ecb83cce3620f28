//! A typed client of a Kiln daemon: connects over a unix socket (`unix:///path`, the
//! embedded default) or TCP (`http://host:port`) and turns the event stream into Rust
//! values (the only place besides `kiln-api` that sees proto types).

mod blobs;
pub mod convert;
mod worker;

pub use blobs::{BlobWriter, UploadStats, blob_writer, fetch_blob, fetch_from_any, unsynced_blob_writer};
pub use worker::{Assignment, FromCoordinator, WorkerLink, WorkerSession};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use kiln_proto::v1::{self, build_event::Event, control_client::ControlClient};
use kiln_solver::cluster::{WorkerInfo, WorkerStatus};
use kiln_solver::{LogLine, LogStream, Status, VertexRecord};
use kiln_types::Digest;
use tonic::transport::{Channel, Endpoint};

/// What to build (paths absolute, on the daemon's machine).
#[derive(Debug, Clone, Default)]
pub struct BuildRequest {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// Its name, for error messages.
    pub file_name: String,
    /// The context directory.
    pub context: PathBuf,
    /// The `.dockerignore` text that applies.
    pub dockerignore: String,
    /// Target stage.
    pub target: Option<String>,
    /// Build arguments.
    pub build_args: BTreeMap<String, String>,
    /// Platforms, as `os/arch[/variant]`.
    pub platforms: Vec<String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--max-parallelism`.
    pub max_parallelism: Option<u32>,
    /// Secrets by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// `--output` specs.
    pub outputs: Vec<String>,
    /// An uploaded context (instead of `context`, for a daemon on another machine).
    pub context_manifest: Option<kiln_context::ContextManifest>,
}

/// A build event as the client sees it.
#[derive(Debug, Clone)]
pub enum BuildEvent {
    /// Every vertex, in execution order.
    Planned(Vec<VertexRecord>),
    /// A vertex started.
    Started {
        /// The vertex.
        vertex: Digest,
        /// ms since the epoch.
        at: u64,
    },
    /// A line of output.
    Log {
        /// The vertex.
        vertex: Digest,
        /// The line.
        line: LogLine,
    },
    /// A vertex finished.
    Completed {
        /// Its record.
        record: VertexRecord,
        /// Its error.
        error: Option<String>,
    },
    /// An export step.
    Export {
        /// What.
        name: String,
        /// Start.
        started: u64,
        /// End.
        completed: Option<u64>,
    },
    /// A piece of a file output, which the client writes (the daemon never writes a
    /// client's paths); every file ends with a piece marked `last`.
    ExportData {
        /// The output (index into [`BuildRequest::outputs`]).
        output: usize,
        /// `type=local`: the file is a tar to unpack into this directory under `dest` (`""`:
        /// `dest` itself). Otherwise `None`: the file is `dest`.
        unpack_into: Option<String>,
        /// The bytes.
        data: Vec<u8>,
        /// The file's last piece.
        last: bool,
    },
    /// The end: always last.
    Result {
        /// The error, when the build failed.
        error: Option<String>,
        /// The exported image's digest.
        image: Option<Digest>,
        /// Every vertex.
        records: Vec<VertexRecord>,
    },
}

/// A connection to a daemon.
#[derive(Clone)]
pub struct Client {
    control: ControlClient<Channel>,
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

/// HTTP/2 flow-control windows of Kiln's connections: large enough that streaming a
/// context or a blob is not held back by a round trip every 64 KiB.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// The whole connection's window.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// The largest message any Kiln stream encodes or decodes, set on every client and server.
/// Build requests carry context manifests (about 150 bytes a file) and worker assignments
/// carry a step's environment (at most 16 MiB after conversion), secrets and manifests; an
/// assignment over this size fails its own job instead of breaking the worker's session.
pub const MAX_MESSAGE: usize = 64 << 20;

/// An endpoint for `http://HOST:PORT` with Kiln's transport settings.
pub fn endpoint(address: &str) -> Result<Endpoint, String> {
    Ok(tuned(Endpoint::from_shared(address.to_string()).map_err(|e| format!("{address}: {e}"))?))
}

fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

impl Client {
    /// Connects to `unix:///path/to/socket` or `http://host:port`.
    pub async fn connect(address: &str) -> Result<Client, String> {
        let channel = if let Some(path) = address.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            tuned(Endpoint::from_static("http://kilnd.local"))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        } else {
            endpoint(address)?.connect().await
        }
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let control =
            ControlClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
        Ok(Client { control })
    }

    /// Asks the daemon to describe itself.
    pub async fn info(&self) -> Result<Info, String> {
        let info =
            self.control.clone().info(v1::InfoRequest {}).await.map_err(|e| e.message().to_string())?.into_inner();
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
    pub async fn workers(&self) -> Result<Vec<WorkerStatus>, String> {
        let response = self
            .control
            .clone()
            .list_workers(v1::ListWorkersRequest {})
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        Ok(response
            .workers
            .into_iter()
            .map(|w| WorkerStatus {
                info: WorkerInfo {
                    name: w.name,
                    platforms: w.platforms.iter().filter_map(|p| p.parse().ok()).collect(),
                    labels: w.labels.into_iter().collect(),
                    max_parallelism: w.max_parallelism as usize,
                    free_disk: w.free_disk,
                    address: w.address,
                },
                running: w.running as usize,
                draining: w.draining,
                last_heartbeat: w.last_heartbeat,
                layers: w.layers as usize,
            })
            .collect())
    }

    /// Starts a build; events arrive on the stream until [`BuildEvent::Result`]. Dropping the
    /// stream cancels the build.
    pub async fn build(&self, request: BuildRequest) -> Result<BuildEvents, String> {
        let request = v1::BuildRequest {
            dockerfile: request.dockerfile,
            file_name: request.file_name,
            context_path: request.context.display().to_string(),
            dockerignore: request.dockerignore,
            target: request.target.unwrap_or_default(),
            build_args: request.build_args.into_iter().collect(),
            platforms: request.platforms,
            no_cache: request.no_cache,
            max_parallelism: request.max_parallelism.unwrap_or(0),
            secrets: request.secrets,
            outputs: request.outputs,
            context: request.context_manifest.as_ref().map(convert::manifest_to_proto),
        };
        let stream = self.control.clone().build(request).await.map_err(|e| e.message().to_string())?.into_inner();
        Ok(BuildEvents { stream })
    }
}

/// The events of one build.
pub struct BuildEvents {
    stream: tonic::Streaming<v1::BuildEvent>,
}

impl BuildEvents {
    /// The next event; `None` after the result.
    pub async fn next(&mut self) -> Result<Option<BuildEvent>, String> {
        loop {
            let Some(event) = self.stream.message().await.map_err(|e| format!("the daemon: {}", e.message()))? else {
                return Ok(None);
            };
            if let Some(event) = event.event {
                return from_proto(event).map(Some).map_err(|e| format!("the daemon sent a malformed event: {e}"));
            }
        }
    }
}

/// A digest from the wire: malformed is an error, never re-hashed into something else.
fn digest(text: &str, what: &str) -> Result<Digest, String> {
    convert::parse_digest(text, what)
}

fn nonzero(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

fn nonempty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

fn record(record: v1::VertexRecord) -> Result<VertexRecord, String> {
    Ok(VertexRecord {
        digest: digest(&record.digest, "vertex record")?,
        name: record.name,
        kind: record.kind,
        stage: nonempty(record.stage),
        status: match record.status.as_str() {
            "executed" => Status::Executed,
            "cached" => Status::Cached,
            "deduplicated" => Status::Deduplicated,
            "failed" => Status::Failed,
            _ => Status::Skipped,
        },
        worker: nonempty(record.worker),
        platform: nonempty(record.platform),
        started: nonzero(record.started),
        completed: nonzero(record.completed),
    })
}

fn from_proto(event: Event) -> Result<BuildEvent, String> {
    let records = |records: Vec<v1::VertexRecord>| records.into_iter().map(record).collect::<Result<Vec<_>, _>>();
    Ok(match event {
        Event::Planned(planned) => BuildEvent::Planned(records(planned.vertices)?),
        Event::Started(started) => {
            BuildEvent::Started { vertex: digest(&started.digest, "started vertex")?, at: started.at }
        }
        Event::Log(log) => BuildEvent::Log {
            vertex: digest(&log.digest, "log line's vertex")?,
            line: LogLine { stream: if log.stderr { LogStream::Stderr } else { LogStream::Stdout }, line: log.line },
        },
        Event::Completed(completed) => BuildEvent::Completed {
            record: record(completed.record.ok_or("a completed vertex without its record")?)?,
            error: nonempty(completed.error),
        },
        Event::Export(step) => {
            BuildEvent::Export { name: step.name, started: step.started, completed: nonzero(step.completed) }
        }
        Event::ExportData(piece) => BuildEvent::ExportData {
            output: piece.output as usize,
            unpack_into: piece.unpack.then_some(piece.subdir),
            data: piece.data,
            last: piece.last,
        },
        Event::Result(result) => BuildEvent::Result {
            error: (!result.ok).then_some(result.error),
            image: nonempty(result.image_digest).map(|d| digest(&d, "image")).transpose()?,
            records: records(result.records)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_digests_from_the_wire_are_errors_not_rehashed() {
        let started = |digest: &str| Event::Started(v1::VertexStarted { digest: digest.into(), at: 1 });
        let good = Digest::of(b"vertex");
        assert!(
            matches!(from_proto(started(&good.to_string())), Ok(BuildEvent::Started { vertex, .. }) if vertex == good)
        );
        let error = from_proto(started("sha256:nothex")).unwrap_err();
        assert!(error.contains("started vertex") && error.contains("sha256:nothex"), "{error}");
        let completed = Event::Completed(v1::VertexCompleted { record: None, error: String::new() });
        assert!(from_proto(completed).unwrap_err().contains("without its record"));
    }
}
