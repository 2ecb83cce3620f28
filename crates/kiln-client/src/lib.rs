//! A typed client of a Kiln daemon: connects over a unix socket (`unix:///path`, the
//! embedded default) or TCP (`http://host:port`) and turns the event stream into Rust
//! values through `kiln_proto::convert` (with `kiln-api`, the only places that see proto
//! types).

mod blobs;
mod error;
mod raft;
mod targets;
mod worker;

pub use blobs::{UploadStats, fetch_blob, fetch_from_any};
pub use error::ClientError;
pub use kiln_proto::tls::{NodeTls, TlsError};
pub use raft::{NodeSlot, RaftLinks};
pub use targets::{Target, resolve};
pub use worker::{WorkerLink, WorkerSession};

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
pub use kiln_model::{BuildEvent, BuildRequest};
use kiln_model::{PruneOptions, PruneReport, UsageRecord, WorkerStatus};
use kiln_proto::convert::{event_from_proto, prune_to_proto, request_to_proto, usage_from_proto, worker_from_proto};
use kiln_proto::v1::{self, control_client::ControlClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A connection to a daemon.
///
/// Over TCP it may name several coordinators (a comma-separated list, or a name that resolves
/// to several addresses): it connects to the first that answers and, when one that does not
/// lead refuses a call, goes to the leader it names (or, while an election runs, tries the
/// others) and calls again.
#[derive(Clone)]
pub struct Client {
    control: Arc<Mutex<Control>>,
    /// The coordinators it was given (one for a unix socket).
    addresses: Arc<Vec<String>>,
    /// What they stand for, as last resolved.
    targets: Arc<Mutex<Vec<Target>>>,
    options: ClientOptions,
    bearer: Bearer,
}

type Control = ControlClient<InterceptedService<Channel, Bearer>>;

/// How many times one call follows a redirection or tries another coordinator.
const MAX_HOPS: u32 = 12;

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
    /// A replicated coordinator's replica set.
    pub raft: Option<RaftInfo>,
    /// The web UI's base URL (`http://HOST:PORT`), when it serves one.
    pub web: Option<String>,
}

/// The replica set, as the leader that answered sees it.
#[derive(Debug, Clone)]
pub struct RaftInfo {
    /// The member that answered.
    pub node_id: u64,
    /// The leader (0: none known).
    pub leader: u64,
    /// The term.
    pub term: u64,
    /// Every member.
    pub members: Vec<RaftMemberInfo>,
}

/// One member of the replica set.
#[derive(Debug, Clone)]
pub struct RaftMemberInfo {
    /// Its id.
    pub id: u64,
    /// Its URL.
    pub address: String,
    /// `leader`, `follower` or `candidate` (empty: unknown).
    pub role: String,
    /// The last log index it applied (the answering member) or holds (the others).
    pub applied: u64,
}

use kiln_proto::{CONNECTION_WINDOW, MAX_MESSAGE, STREAM_WINDOW};

/// An endpoint for `http://HOST:PORT`, or `https://HOST:PORT` with `tls` (the server's
/// certificate checked against the CA, this end's own presented when it has one), with
/// Kiln's transport settings.
pub fn endpoint(address: &str, tls: Option<&NodeTls>) -> Result<Endpoint, ClientError> {
    endpoint_to(&Target::url(address), tls)
}

/// [`endpoint`] for a target: one that came from a name has its certificate checked against
/// the name.
pub fn endpoint_to(target: &Target, tls: Option<&NodeTls>) -> Result<Endpoint, ClientError> {
    let address = target.url.as_str();
    let invalid = |reason: String| ClientError::Address { address: target.to_string(), reason };
    let endpoint = Endpoint::from_shared(address.to_string()).map_err(|e| invalid(e.to_string()))?;
    let endpoint = match (address.starts_with("https://"), tls) {
        (false, _) => endpoint,
        (true, Some(tls)) => {
            let config = match &target.name {
                Some(name) => tls.client().domain_name(name.clone()),
                None => tls.client(),
            };
            endpoint.tls_config(config).map_err(|e| invalid(e.to_string()))?
        }
        (true, None) => {
            return Err(invalid(
                "https:// needs the CA that signed the server's certificate (--tls-ca FILE or KILN_TLS_CA)".into(),
            ));
        }
    };
    // A peer that stops answering (a frozen or partitioned coordinator) is noticed within
    // seconds, not when the kernel gives up on the connection.
    Ok(tuned(endpoint)
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// How long a TCP connection (and its TLS handshake) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often an open connection is probed.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a probe may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

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

    /// Connects to `unix:///path/to/socket`, `http://host:port` or `https://host:port` (or a
    /// comma-separated list of TCP addresses, or a name with several addresses: the first that
    /// answers), presenting the options' token on every request.
    pub async fn connect_with(address: &str, options: &ClientOptions) -> Result<Client, ClientError> {
        let bearer = match &options.token {
            None => Bearer(None),
            Some(token) => Bearer(Some(format!("Bearer {token}").parse().map_err(|_| ClientError::Token)?)),
        };
        let addresses: Vec<String> = if address.starts_with("unix://") {
            vec![address.to_string()]
        } else {
            address.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_string).collect()
        };
        if addresses.is_empty() {
            return Err(ClientError::Address { address: address.to_string(), reason: "names no daemon".into() });
        }
        let targets = resolve(&addresses).await;
        let control = Client::connect_first(&targets, options, &bearer).await?;
        Ok(Client {
            control: Arc::new(Mutex::new(control)),
            addresses: Arc::new(addresses),
            targets: Arc::new(Mutex::new(targets)),
            options: options.clone(),
            bearer,
        })
    }

    /// A control client of the first of `targets` that answers.
    async fn connect_first(
        targets: &[Target],
        options: &ClientOptions,
        bearer: &Bearer,
    ) -> Result<Control, ClientError> {
        let mut failure = None;
        for target in targets {
            match Client::connect_one(target, options, bearer).await {
                Ok(control) => return Ok(control),
                Err(error @ (ClientError::Address { .. } | ClientError::Token)) => return Err(error),
                Err(error) => failure = Some(error),
            }
        }
        Err(failure.expect("at least one address"))
    }

    async fn connect_one(target: &Target, options: &ClientOptions, bearer: &Bearer) -> Result<Control, ClientError> {
        let channel = if let Some(path) = target.url.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            tuned(Endpoint::from_static("http://kilnd.local"))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await
        } else {
            endpoint_to(target, options.tls.as_ref())?.connect().await
        }
        .map_err(|source| ClientError::Connect { address: target.to_string(), source })?;
        Ok(ControlClient::with_interceptor(channel, bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE))
    }

    /// The connection calls go to now.
    pub(crate) fn control(&self) -> Control {
        self.control.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// After a call failed with `status`: moves to the coordinator that should answer it (the
    /// leader a follower named; while an election runs or the coordinator is gone, the next in
    /// the list after a short pause) and says whether to call again.
    pub(crate) async fn redirect(&self, status: &tonic::Status, hops: &mut u32) -> bool {
        // A connection that broke under the call surfaces as UNAVAILABLE, CANCELLED or UNKNOWN.
        if kiln_proto::kind_of(status.code()) != kiln_model::ErrorKind::Unavailable || *hops >= MAX_HOPS {
            return false;
        }
        let redirect = kiln_proto::redirect_of(status);
        if redirect.is_none() && !self.replicated() {
            return false;
        }
        *hops += 1;
        if let Some(kiln_proto::Redirect::Leader(leader)) = &redirect
            && let Ok(control) = Client::connect_one(&Target::url(leader), &self.options, &self.bearer).await
        {
            *self.control.lock().unwrap_or_else(|poison| poison.into_inner()) = control;
            return true;
        }
        // No leader yet, or the one named is gone (the others have not noticed yet): an
        // election takes about a second, so pause a little longer each time, then try the
        // list from the next address on.
        tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(*hops))).await;
        // Names are resolved again: a member that came back may have a new address.
        let targets = resolve(&self.addresses).await;
        *self.targets.lock().unwrap_or_else(|poison| poison.into_inner()) = targets.clone();
        let start = *hops as usize % targets.len().max(1);
        let candidates: Vec<Target> = targets.iter().cycle().skip(start).take(targets.len()).cloned().collect();
        if let Ok(control) = Client::connect_first(&candidates, &self.options, &self.bearer).await {
            *self.control.lock().unwrap_or_else(|poison| poison.into_inner()) = control;
        }
        *hops < MAX_HOPS
    }

    /// Whether a call that failed with `error` may be made again elsewhere: the coordinator
    /// that took it leads no more, or is gone while others of a replica set are listed.
    pub fn survives(&self, error: &ClientError) -> bool {
        matches!(error, ClientError::NotLeader { .. })
            || (self.replicated() && error.kind() == kiln_model::ErrorKind::Unavailable)
    }

    /// Whether it was given several coordinators (a list, or a name with several addresses).
    fn replicated(&self) -> bool {
        self.targets.lock().unwrap_or_else(|poison| poison.into_inner()).len() > 1
    }

    /// Makes a unary call, following redirections.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T, ClientError>
    where
        F: Fn(Control) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut hops = 0;
        loop {
            match call(self.control()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if self.redirect(&status, &mut hops).await => continue,
                Err(status) => return Err(ClientError::rpc(what, status)),
            }
        }
    }

    /// Asks the daemon to describe itself.
    pub async fn info(&self) -> Result<Info, ClientError> {
        let info = self.call("", |mut control| async move { control.info(v1::InfoRequest {}).await }).await?;
        Ok(Info {
            version: info.version,
            worker: info.worker,
            root: info.root,
            platforms: info.platforms,
            role: info.role,
            workers: info.workers,
            queued: info.queued,
            web: Some(info.web).filter(|w| !w.is_empty()),
            raft: info.raft.map(|raft| RaftInfo {
                node_id: raft.node_id,
                leader: raft.leader,
                term: raft.term,
                members: raft
                    .members
                    .into_iter()
                    .map(|m| RaftMemberInfo { id: m.id, address: m.address, role: m.role, applied: m.applied })
                    .collect(),
            }),
        })
    }

    /// The workers of the cluster.
    pub async fn workers(&self) -> Result<Vec<WorkerStatus>, ClientError> {
        let response =
            self.call("", |mut control| async move { control.list_workers(v1::ListWorkersRequest {}).await }).await?;
        let malformed = |source| ClientError::Malformed { what: "the daemon".into(), source };
        response.workers.into_iter().map(|w| worker_from_proto(w).map_err(malformed)).collect()
    }

    /// The build history, oldest first (the caller's tenant's builds; an admin's: everyone's).
    pub async fn builds(&self) -> Result<Vec<kiln_model::BuildEntry>, ClientError> {
        let response =
            self.call("", |mut control| async move { control.list_builds(v1::ListBuildsRequest {}).await }).await?;
        Ok(response.builds.into_iter().map(kiln_proto::convert::build_entry_from_proto).collect())
    }

    /// One build of the history, its request's summary filled in, with its vertex records.
    pub async fn inspect_build(
        &self,
        id: &str,
    ) -> Result<(kiln_model::BuildEntry, Vec<kiln_model::VertexRecord>), ClientError> {
        let id = id.to_string();
        let response = self
            .call("", |mut control| {
                let id = id.clone();
                async move { control.inspect_build(v1::InspectBuildRequest { id }).await }
            })
            .await?;
        let malformed = |source| ClientError::Malformed { what: "the daemon".into(), source };
        let Some(build) = response.build else {
            return Err(malformed(kiln_proto::convert::WireError::Missing("the build")));
        };
        let mut entry = kiln_proto::convert::build_entry_from_proto(build);
        entry.request.file_name = response.file_name;
        entry.request.dockerfile = response.dockerfile;
        entry.request.build_args = response.build_args.into_iter().collect();
        entry.request.submitted_by = response.submitted_by;
        let records = response
            .records
            .into_iter()
            .map(|r| kiln_proto::convert::record_from_proto(r).map_err(malformed))
            .collect::<Result<_, _>>()?;
        Ok((entry, records))
    }

    /// A build's kept step output, by vertex (`vertex`'s alone when given).
    pub async fn build_logs(
        &self,
        id: &str,
        vertex: Option<&kiln_types::Digest>,
    ) -> Result<Vec<(kiln_types::Digest, kiln_model::StepLog)>, ClientError> {
        let request =
            v1::BuildLogsRequest { id: id.to_string(), vertex: vertex.map(|v| v.to_string()).unwrap_or_default() };
        let response = self
            .call("", |mut control| {
                let request = request.clone();
                async move { control.build_logs(request).await }
            })
            .await?;
        let malformed = |source| ClientError::Malformed { what: "the daemon".into(), source };
        let mut steps = Vec::new();
        for step in response.steps {
            let digest = kiln_proto::convert::parse_digest(&step.vertex, "vertex").map_err(malformed)?;
            let mut log = kiln_model::StepLog::default();
            log.dropped = step.dropped;
            for line in step.lines {
                log.push(kiln_proto::convert::vertex_log_from_proto(line), usize::MAX);
            }
            steps.push((digest, log));
        }
        Ok(steps)
    }

    /// Removes a build that ended from the history.
    pub async fn remove_build(&self, id: &str) -> Result<(), ClientError> {
        let id = id.to_string();
        self.call("", |mut control| {
            let id = id.clone();
            async move { control.remove_build(v1::RemoveBuildRequest { id }).await }
        })
        .await?;
        Ok(())
    }

    /// What the daemon's worker store holds (a coordinator: every connected worker's), and
    /// the workers that did not answer, with why.
    pub async fn disk_usage(&self) -> Result<(Vec<UsageRecord>, Vec<String>), ClientError> {
        let response =
            self.call("", |mut control| async move { control.disk_usage(v1::DiskUsageRequest {}).await }).await?;
        let malformed = |source| ClientError::Malformed { what: "the daemon".into(), source };
        let records = response.records.into_iter().map(|r| usage_from_proto(r).map_err(malformed));
        Ok((records.collect::<Result<_, _>>()?, response.errors))
    }

    /// Removes what `options` selects from the worker stores; what was freed, and the
    /// workers that did not answer, with why.
    pub async fn prune(&self, options: &PruneOptions) -> Result<(PruneReport, Vec<String>), ClientError> {
        let request = prune_to_proto(options);
        let response = self.call("", |mut control| async move { control.prune(request).await }).await?;
        Ok((PruneReport { reclaimed: response.reclaimed, records: response.records }, response.errors))
    }

    /// Starts a build; events arrive on the stream until [`BuildEvent::Result`]. Dropping the
    /// stream cancels the build.
    pub async fn build(&self, request: BuildRequest) -> Result<BuildEvents, ClientError> {
        let request = request_to_proto(&request);
        let stream = self
            .call("", |mut control| {
                let request = request.clone();
                async move { control.build(request).await }
            })
            .await?;
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
