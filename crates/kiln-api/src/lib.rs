//! The daemon's gRPC boundary: the control service over an [`Engine`], served on a unix
//! socket (the embedded default) or TCP, and the worker and blob services. Messages become
//! domain types and back through `kiln_proto::convert`; every refusal is an [`ApiError`].

mod auth;
mod blobs;
mod builds;
mod error;
mod exports;
mod journal;
mod limits;
mod replication;
mod storage;
mod tenants;
mod workers;

pub use auth::Access;
pub use blobs::BlobsService;
pub use builds::{BUILDS_TREE, BuildBook, MAX_ENTRIES, Retention, Runs};
pub use error::{ApiError, ServeError};
pub use exports::clear_spools;
pub use journal::Journal;
pub use limits::{CONNECTION_RATE, TOKEN_RATE};
pub use replication::{RaftService, Replication};
pub use storage::StorageService;
pub use tenants::Tenants;
pub use workers::WorkersService;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cas::{CasError, Unsynced};
use kiln_engine::Engine;
use kiln_model::BuildEvent as DomainEvent;
use kiln_proto::MAX_MESSAGE;
use kiln_proto::convert::{build_entry_to_proto, event_to_proto, parse_digest, request_from_proto, worker_to_proto};
use kiln_proto::tls::NodeTls;
use kiln_proto::v1::blobs_server::BlobsServer;
use kiln_proto::v1::control_server::{Control, ControlServer};
use kiln_proto::v1::raft_server::RaftServer;
use kiln_proto::v1::storage_server::StorageServer;
use kiln_proto::v1::workers_server::WorkersServer;
use kiln_proto::v1::{
    BlobChunkUpload, BuildEvent, BuildLogsRequest, BuildLogsResponse, BuildRequest, DiskUsageRequest,
    DiskUsageResponse, FindMissingRequest, FindMissingResponse, InfoRequest, InfoResponse, InspectBuildRequest,
    InspectBuildResponse, ListBuildsRequest, ListBuildsResponse, ListWorkersRequest, ListWorkersResponse, PruneRequest,
    PruneResponse, RemoveBuildRequest, RemoveBuildResponse, StepLogs, UploadResponse,
};
use kiln_types::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::auth::{Authenticate, NodesOnly};

/// A build's run of its journal, ended by [`LiveJournal::end`]; a build task that ends
/// without (it panicked) drops the journal from memory, so that it is neither kept for ever
/// nor shown running.
struct LiveJournal {
    journal: Arc<journal::Journal>,
    id: String,
    run: Option<u64>,
}

impl LiveJournal {
    fn begin(journal: &Arc<journal::Journal>, id: &str, tenant: &str) -> LiveJournal {
        let run = journal.begin(id, tenant);
        LiveJournal { journal: Arc::clone(journal), id: id.to_string(), run: Some(run) }
    }

    /// Writes the ended build's journal to the store, off the async threads.
    async fn end(mut self, records: Vec<kiln_model::VertexRecord>) {
        let Some(run) = self.run.take() else { return };
        let (journal, id) = (Arc::clone(&self.journal), self.id.clone());
        if let Err(error) = tokio::task::spawn_blocking(move || journal.end(&id, run, &records)).await {
            tracing::warn!("the build's records and logs are lost: {error}");
            self.journal.abandon(&self.id, run);
        }
    }
}

impl Drop for LiveJournal {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            self.journal.abandon(&self.id, run);
        }
    }
}

impl ControlService {
    /// The history entry of build `id`, if `caller` may see it (its tenant's, or an admin's
    /// any); otherwise the build is not there for it.
    async fn visible_build(&self, caller: &kiln_model::Caller, id: &str) -> Result<kiln_model::BuildEntry, ApiError> {
        if let Some(replication) = &self.replication {
            replication.read_barrier().await?;
        }
        let (book, owned) = (self.builds.clone(), id.to_string());
        let entry = tokio::task::spawn_blocking(move || book.get(&owned)).await??;
        entry
            .filter(|entry| caller.role == kiln_model::Role::Admin || entry.tenant == caller.tenant)
            .ok_or_else(|| ApiError::NoSuchBuild(id.to_string()))
    }
}

/// The control service.
pub struct ControlService {
    engine: Arc<Engine>,
    root: PathBuf,
    upload_idle_timeout: std::time::Duration,
    /// Where each build's task is tracked, so a stopping daemon can wait for them.
    tasks: TaskTracker,
    /// Cancelled by a daemon whose grace ran out: the builds still running end.
    abandoned: CancellationToken,
    /// This node's TLS, for asking workers (disk usage, prune).
    node_tls: Option<NodeTls>,
    /// A replicated coordinator's member.
    replication: Option<Arc<Replication>>,
    /// The tenants' cache groups and limits.
    tenants: Arc<Tenants>,
    /// Where builds are recorded.
    builds: BuildBook,
    /// The builds running here, by id.
    runs: builds::Runs,
    /// The web UI's base URL, when the daemon serves one.
    web: Option<String>,
}

/// How long a context upload may send nothing before it is ended, unless configured.
pub const UPLOAD_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl ControlService {
    /// A service over `engine`, whose state lives in `root`.
    pub fn new(engine: Arc<Engine>, root: &Path) -> ControlService {
        let (tasks, abandoned) = (TaskTracker::new(), CancellationToken::new());
        let builds = BuildBook::Local(Arc::clone(engine.store()));
        let runs = builds::Runs::new(Arc::clone(engine.store()));
        ControlService {
            engine,
            root: root.to_path_buf(),
            upload_idle_timeout: UPLOAD_IDLE_TIMEOUT,
            tasks,
            abandoned,
            node_tls: None,
            replication: None,
            tenants: Arc::default(),
            builds,
            runs,
            web: None,
        }
    }

    /// A replicated coordinator: current reads wait for a read index, and `kiln info` shows
    /// the replica set. (Which requests a follower refuses is the listener's [`Access`].)
    pub fn replicated(mut self, replication: Option<Arc<Replication>>) -> ControlService {
        if let Some(store) = replication.as_ref().and_then(|r| r.build_store()) {
            self.builds = BuildBook::Replicated(Arc::clone(store));
        }
        self.replication = replication;
        self
    }

    /// Scopes and limits each tenant's builds by its policy.
    pub fn with_tenants(mut self, tenants: Arc<Tenants>) -> ControlService {
        self.tenants = tenants;
        self
    }

    /// Asks workers over mutual TLS as this node.
    pub fn with_node_tls(mut self, tls: Option<NodeTls>) -> ControlService {
        self.node_tls = tls;
        self
    }

    /// Tracks its builds' tasks in `tasks` (the daemon's, which it waits for when stopping);
    /// once `abandoned` is cancelled, builds still running end with an error.
    pub fn tracked_by(mut self, tasks: TaskTracker, abandoned: CancellationToken) -> ControlService {
        self.tasks = tasks;
        self.abandoned = abandoned;
        self
    }

    /// Tells clients the web UI's base URL (`http://HOST:PORT`).
    pub fn with_web(mut self, web: Option<String>) -> ControlService {
        self.web = web;
        self
    }

    /// The build history it records into, and the builds (with their journals) it runs.
    pub fn history(&self) -> (BuildBook, Runs) {
        (self.builds.clone(), self.runs.clone())
    }

    /// Shares `runs` (the builds running on this daemon) with its other control service.
    pub fn with_runs(mut self, runs: Runs) -> ControlService {
        self.runs = runs;
        self
    }

    /// Ends, in the background, the history entries left `running` with nobody to finish them:
    /// at once for a single daemon (they are an earlier process's), and for a replicated
    /// coordinator each time it has taken over a term, once clients have had
    /// [`kiln_model::ADOPTION_GRACE_MS`] to reattach. Call it on one of a daemon's services.
    pub fn settle_abandoned_builds(&self) {
        let (book, runs, replication) = (self.builds.clone(), self.runs.clone(), self.replication.clone());
        let settling = async move {
            let Some(replication) = replication else {
                book.settle(&runs, "the daemon stopped before the build finished").await;
                // What the retention let go while the daemon was down goes now.
                book.prune(&runs, runs.retention()).await;
                return;
            };
            let mut recovered = replication.watch_recovered();
            if *recovered.borrow() != 0 {
                // A term taken over before this started.
                recovered.mark_changed();
            }
            while recovered.changed().await.is_ok() {
                let term = *recovered.borrow_and_update();
                tokio::time::sleep(std::time::Duration::from_millis(kiln_model::ADOPTION_GRACE_MS)).await;
                if replication.leading().is_ok() && replication.node().status().term == term {
                    let why = "its coordinator was lost and its client did not reattach";
                    book.settle(&runs, why).await;
                }
            }
        };
        tokio::spawn(settling.instrument(tracing::info_span!("settle_builds")));
    }

    /// With a `history-max-age`, prunes the history every quarter of it (no more often than
    /// every second, and at least every ten minutes; on replicated coordinators, the leader
    /// once it has taken over its term), so that an idle daemon lets old builds go too, until
    /// `stopped`. The task is one of the daemon's tracked ones: a prune under way finishes
    /// before the daemon flushes its store. Call it on one of a daemon's services.
    pub fn prune_by_age(&self, stopped: CancellationToken) {
        let Some(age) = self.runs.retention().max_age else { return };
        let every = (age / 4).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(600));
        let (book, runs, replication) = (self.builds.clone(), self.runs.clone(), self.replication.clone());
        let pruning = async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is at once, when the daemon prunes anyway (a single one as it
            // starts, a replicated one as builds end).
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = stopped.cancelled() => return,
                }
                let leads = replication.as_ref().is_none_or(|replication| {
                    replication.leading().is_ok() && replication.is_recovered(replication.node().status().term)
                });
                if leads {
                    book.prune(&runs, runs.retention()).await;
                }
            }
        };
        self.tasks.spawn(pruning.instrument(tracing::info_span!("prune_history")));
    }

    /// Ends uploads that send nothing for `timeout` (default [`UPLOAD_IDLE_TIMEOUT`]).
    pub fn with_upload_idle_timeout(mut self, timeout: std::time::Duration) -> ControlService {
        self.upload_idle_timeout = timeout;
        self
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    type BuildStream = ReceiverStream<Result<BuildEvent, Status>>;

    async fn build(&self, request: Request<BuildRequest>) -> Result<Response<Self::BuildStream>, Status> {
        let over_tcp = request.extensions().get::<tonic::transport::server::TcpConnectInfo>().is_some();
        let caller = auth::caller_of(&request);
        auth::builder(&caller, "building")?;
        let mut request = request_from_proto(request.into_inner()).map_err(ApiError::from)?;
        let debug = request.debug;
        // A client over TCP sends every context it names (named and nested ones included):
        // it may not make this daemon read its own disk.
        let contexts = request.contexts();
        if over_tcp && contexts.iter().any(|(_, manifest)| manifest.is_none()) {
            return Err(ApiError::LocalContextOverTcp.into());
        }
        let blobs: std::collections::HashMap<_, u64> =
            contexts.iter().filter_map(|(_, manifest)| *manifest).flat_map(|manifest| manifest.blobs()).collect();
        if !blobs.is_empty() {
            self.tenants.check_upload(&caller.tenant, blobs.values().sum())?;
        }
        let mut admission = self.tenants.admit(&caller.tenant)?;
        request.cache_group = self.tenants.cache_group(&caller.tenant);
        let spool = exports::new_spool(&self.root);
        let id = request.id.clone().unwrap_or_else(kiln_model::new_build_id);
        // Records of builds that wait on this one's steps name it by this id.
        request.id = Some(id.clone());
        let span = tracing::info_span!("build", %id, file = %request.file_name, tenant = %caller.tenant);
        // Its trace: a CI pipeline run, under the client's own trace when it has one.
        let platforms: Vec<String> = request.platforms.iter().map(ToString::to_string).collect();
        let trace = tracing::info_span!(
            target: kiln_telemetry::TRACE_TARGET,
            parent: &span,
            "kiln_build",
            otel.name = "kiln build",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            cicd.pipeline.name = request.target.as_deref().unwrap_or(&request.file_name),
            cicd.pipeline.run.id = %id,
            kiln.build.id = %id,
            kiln.build.status = tracing::field::Empty,
            kiln.platforms = platforms.join(","),
        );
        kiln_telemetry::set_parent(&trace, &request.trace.traceparent, &request.trace.tracestate);
        span.in_scope(|| tracing::info!(over_tcp, attempt = request.attempt, "build submitted"));
        let (events, stream) = mpsc::channel(256);
        let (engine, abandoned) = (Arc::clone(&self.engine), self.abandoned.clone());
        let (replication, book, runs) = (self.replication.clone(), self.builds.clone(), self.runs.clone());
        self.tasks.spawn(
            async move {
                // A new leader starts builds once it has taken over; the build is in the history
                // (the replicated log) before it starts.
                let begun = async {
                    if let Some(replication) = &replication {
                        replication.recovered().await;
                    }
                    // Checked before the run it reattaches to is replaced.
                    let entry = book.admit(&request, &caller, &id)?;
                    let run = runs.claim(&id, request.attempt)?;
                    book.record(&entry, true).await?;
                    Ok::<_, ApiError>((run, entry))
                };
                let waiting = runs.wait();
                let begun = tokio::select! {
                    begun = begun => begun,
                    refusal = deposed(replication.as_deref()) => Err(refusal),
                    () = events.closed() => Err(ApiError::SessionEnded("the client left".into())),
                };
                drop(waiting);
                let (run, entry) = match begun {
                    Ok(begun) => begun,
                    Err(refused) => {
                        trace.record("kiln.build.status", "refused").record("otel.status_code", "ERROR");
                        tracing::info!("build refused: {refused}");
                        let _ = events.send(Err(refused.into())).await;
                        exports::remove_spool(spool).await;
                        return;
                    }
                };
                let journal = Arc::clone(runs.journal());
                let live_journal = LiveJournal::begin(&journal, &id, &entry.tenant);
                let (progress, mut progress_events) = mpsc::unbounded_channel();
                let mut build = Box::pin(engine.build(request, Some(&spool), progress).instrument(trace.clone()));
                // Why the build ended without a result, if it does.
                let mut ending = Ending::Cancelled;
                // Forward progress while the build runs. A client that left (its stream closed,
                // even while nothing was to be sent) ends the build; so does a daemon that
                // stops after its grace. Dropping the build future cancels this build's part
                // of the work.
                let result = loop {
                    tokio::select! {
                        result = &mut build => break Some(result),
                        () = events.closed() => {
                            tracing::info!("the client left: build cancelled");
                            break None;
                        }
                        () = abandoned.cancelled() => {
                            let message = "the daemon stopped before the build finished".to_string();
                            break Some(Err(kiln_engine::BuildFailure { message, records: Vec::new() }));
                        }
                        refusal = deposed(replication.as_deref()) => {
                            // Another coordinator leads now: the client takes the build there.
                            tracing::info!("no longer the leader: build handed back to the client");
                            let _ = events.send(Err(refusal.into())).await;
                            ending = Ending::HandedOver;
                            break None;
                        }
                        () = run.replaced() => {
                            tracing::info!("its client reattached to the build: this run ends");
                            ending = Ending::HandedOver;
                            break None;
                        }
                        Some(event) = progress_events.recv() => {
                            // The tenant's queued vertices are counted once the graph is known.
                            if let DomainEvent::Planned(records) = &event
                                && let Err(refused) = admission.plan(records.len())
                            {
                                tracing::info!("build refused: {refused}");
                                ending = Ending::Refused(refused.to_string());
                                let _ = events.send(Err(refused.into())).await;
                                break None;
                            }
                            journal.event(&id, &event);
                            if sent_to(&event, debug) && events.send(Ok(event_to_proto(event))).await.is_err() {
                                tracing::info!("the client left: build cancelled");
                                break None;
                            }
                        }
                    }
                };
                drop(build);
                let Some(result) = result else {
                    exports::remove_spool(spool.clone()).await;
                    let status = match &ending {
                        Ending::HandedOver => "handed-over",
                        Ending::Refused(_) => "refused",
                        Ending::Cancelled => "cancelled",
                    };
                    trace.record("kiln.build.status", status);
                    if matches!(ending, Ending::Refused(_)) {
                        trace.record("otel.status_code", "ERROR");
                    }
                    live_journal.end(Vec::new()).await;
                    match ending {
                        // A build handed back to its client is the next run's to record.
                        Ending::HandedOver => {}
                        Ending::Refused(error) => book.record_end(&run, entry.ended("failed", Some(error), &[])).await,
                        Ending::Cancelled => book.record_end(&run, entry.ended("cancelled", None, &[])).await,
                    }
                    return;
                };
                while let Ok(event) = progress_events.try_recv() {
                    journal.event(&id, &event);
                    if sent_to(&event, debug) {
                        let _ = events.send(Ok(event_to_proto(event))).await;
                    }
                }
                // File outputs travel to the client before the result.
                let result = match result {
                    Ok(summary) => match exports::send(&summary.files, &events).await {
                        Ok(()) => Ok(summary),
                        Err(error) => {
                            Err(kiln_engine::BuildFailure { message: error.to_string(), records: summary.records })
                        }
                    },
                    Err(failure) => Err(failure),
                };
                exports::remove_spool(spool.clone()).await;
                match &result {
                    Ok(_) => tracing::info!("build succeeded"),
                    Err(failure) => tracing::info!("build failed: {}", failure.message),
                }
                let (error, image, records) = match result {
                    Ok(summary) => (None, summary.image, summary.records),
                    Err(failure) => (Some(failure.message), None, failure.records),
                };
                let status = if error.is_none() { "succeeded" } else { "failed" };
                trace
                    .record("kiln.build.status", status)
                    .record("otel.status_code", if error.is_none() { "OK" } else { "ERROR" });
                // Recorded before the client hears the result: a `kiln history` that follows
                // sees the build ended.
                live_journal.end(records.clone()).await;
                book.record_end(&run, entry.ended(status, error.clone(), &records)).await;
                journal.changed(&id, &entry.tenant, true);
                let result = DomainEvent::Result { error, image, records };
                if abandoned.is_cancelled() {
                    // A stopping daemon does not wait for a client that does not read.
                    let _ = events.try_send(Ok(event_to_proto(result)));
                } else {
                    let _ = events.send(Ok(event_to_proto(result))).await;
                }
                drop(admission);
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(stream)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        if let Some(replication) = &self.replication {
            replication.read_barrier().await?;
        }
        let cluster = self.engine.cluster();
        let (queued, _) = cluster.map(|c| c.counters()).unwrap_or_default();
        Ok(Response::new(InfoResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            worker: self.engine.name().to_string(),
            root: self.root.display().to_string(),
            platforms: self.engine.platforms().iter().map(|p| p.to_string()).collect(),
            role: if cluster.is_some() { "coordinator" } else { "standalone" }.to_string(),
            workers: cluster.map_or(0, |c| c.workers().len() as u32),
            queued: queued as u64,
            raft: self.replication.as_ref().map(|replication| replication.status()),
            web: self.web.clone().unwrap_or_default(),
        }))
    }

    async fn find_missing(
        &self,
        request: Request<FindMissingRequest>,
    ) -> Result<Response<FindMissingResponse>, Status> {
        let caller = auth::caller_of(&request);
        auth::builder(&caller, "uploading a context")?;
        // A blob another cache group sent is missing for this one: it must send the bytes.
        let group = self.tenants.cache_group(&caller.tenant);
        let digests = request.into_inner().digests;
        let digests = digests
            .iter()
            .map(|text| parse_digest(text, "a digest to look for"))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::from)?;
        let missing = self
            .engine
            .not_uploaded(group.as_deref(), digests)
            .await
            .map_err(|e| ApiError::Store { what: "looking up uploaded blobs".into(), source: e.into() })?;
        Ok(Response::new(FindMissingResponse { missing: missing.iter().map(Digest::to_string).collect() }))
    }

    async fn upload(&self, request: Request<Streaming<BlobChunkUpload>>) -> Result<Response<UploadResponse>, Status> {
        let caller = auth::caller_of(&request);
        auth::builder(&caller, "uploading a context")?;
        let tenant = caller.tenant;
        let group = self.tenants.cache_group(&tenant);
        // What the tenant's group keeps stored already counts against its `max-stored`.
        let stored = match self.tenants.max_stored(&tenant) {
            Some(_) => self
                .engine
                .uploaded_bytes(group.as_deref())
                .await
                .map_err(|e| ApiError::Store { what: "summing uploaded blobs".into(), source: e.into() })?,
            None => 0,
        };
        let cas = self.engine.stores().cas();
        let mut stream = request.into_inner();
        let (mut blobs, mut received_bytes) = (0u64, 0u64);
        // The blob being received: its chunks go to a writer on a blocking thread. Received
        // blobs wait unsynced, and are synced all at once and published at the end: one
        // filesystem sync instead of one fsync per file of the context.
        let mut current: Option<(Digest, kiln_cas::BlobWriter<Unsynced>)> = None;
        let mut received = Vec::new();
        async fn finish(current: Option<(Digest, kiln_cas::BlobWriter<Unsynced>)>) -> Result<Option<Unsynced>, Status> {
            let Some((digest, (chunks, writer))) = current else { return Ok(None) };
            drop(chunks);
            let written = writer.await.map_err(ApiError::from)?;
            written.map(Some).map_err(|e| {
                let sender_at_fault = matches!(e, CasError::DigestMismatch { .. } | CasError::SizeMismatch { .. });
                ApiError::Upload { digest, reason: e.to_string(), sender_at_fault }.into()
            })
        }
        // A client that stops sending holds a connection slot and a partial ingest file: it
        // gets an idle limit, and dropping the writer removes the partial file.
        let idle = self.upload_idle_timeout;
        loop {
            let next = tokio::time::timeout(idle, stream.message())
                .await
                .map_err(|_| Status::from(ApiError::UploadStalled { seconds: idle.as_secs_f32() }));
            let Some(chunk) = next?? else { break };
            // Over the tenant's limit the stream ends; dropping the writer removes the file.
            received_bytes += chunk.data.len() as u64;
            self.tenants.check_upload(&tenant, received_bytes)?;
            self.tenants.check_stored(&tenant, stored + received_bytes)?;
            if !chunk.digest.is_empty() {
                received.extend(finish(current.take()).await?);
                let digest = parse_digest(&chunk.digest, "an uploaded blob").map_err(ApiError::from)?;
                current = Some((digest, kiln_cas::unsynced_blob_writer(Arc::clone(cas), digest)));
                blobs += 1;
            }
            let Some((digest, (chunks, _))) = current.as_ref() else {
                return Err(ApiError::UploadWithoutDigest.into());
            };
            if chunks.send(chunk.data).await.is_err() {
                // The writer failed; finishing reports why.
                let digest = *digest;
                finish(current.take()).await?;
                let reason = "the writer stopped".to_string();
                return Err(ApiError::Upload { digest, reason, sender_at_fault: false }.into());
            }
        }
        received.extend(finish(current.take()).await?);
        let engine = Arc::clone(&self.engine);
        let published = tokio::task::spawn_blocking(move || {
            let published = engine
                .stores()
                .cas()
                .publish(received)
                .map_err(|source| ApiError::Store { what: "publishing uploaded blobs".into(), source })?;
            // The group sent these bytes: its builds may use them.
            engine
                .record_uploads(group.as_deref(), published.iter().map(|info| (info.digest, info.size)))
                .map_err(|e| ApiError::Store { what: "recording uploaded blobs".into(), source: e.into() })?;
            Ok::<_, ApiError>(published)
        });
        let published = published.await.map_err(ApiError::from)??;
        let bytes = published.iter().map(|info| info.size).sum::<u64>();
        Ok(Response::new(UploadResponse { blobs, bytes }))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        auth::admin(&auth::caller_of(&request), "listing the workers")?;
        if let Some(replication) = &self.replication {
            replication.read_barrier().await?;
        }
        let workers = self.engine.cluster().map(|c| c.workers()).unwrap_or_default();
        let workers = workers.into_iter().map(|w| worker_to_proto(&w)).collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn list_builds(&self, request: Request<ListBuildsRequest>) -> Result<Response<ListBuildsResponse>, Status> {
        let caller = auth::caller_of(&request);
        if let Some(replication) = &self.replication {
            replication.read_barrier().await?;
        }
        let tenant = (caller.role != kiln_model::Role::Admin).then_some(caller.tenant);
        let book = self.builds.clone();
        let entries =
            tokio::task::spawn_blocking(move || book.list(tenant.as_deref())).await.map_err(ApiError::from)??;
        Ok(Response::new(ListBuildsResponse { builds: entries.iter().map(build_entry_to_proto).collect() }))
    }

    async fn inspect_build(
        &self,
        request: Request<InspectBuildRequest>,
    ) -> Result<Response<InspectBuildResponse>, Status> {
        let caller = auth::caller_of(&request);
        let id = request.into_inner().id;
        let entry = self.visible_build(&caller, &id).await?;
        let journal = Arc::clone(self.runs.journal());
        let records = tokio::task::spawn_blocking(move || journal.records(&id)).await.map_err(ApiError::from)??;
        Ok(Response::new(InspectBuildResponse {
            build: Some(build_entry_to_proto(&entry)),
            records: records.iter().map(kiln_proto::convert::record_to_proto).collect(),
            file_name: entry.request.file_name,
            dockerfile: entry.request.dockerfile,
            build_args: entry.request.build_args.into_iter().collect(),
            submitted_by: entry.request.submitted_by,
        }))
    }

    async fn build_logs(&self, request: Request<BuildLogsRequest>) -> Result<Response<BuildLogsResponse>, Status> {
        let caller = auth::caller_of(&request);
        let request = request.into_inner();
        self.visible_build(&caller, &request.id).await?;
        let vertex = match request.vertex.as_str() {
            "" => None,
            digest => Some(parse_digest(digest, "vertex").map_err(ApiError::from)?),
        };
        let journal = Arc::clone(self.runs.journal());
        let logs = tokio::task::spawn_blocking(move || journal.logs(&request.id, vertex.as_ref()))
            .await
            .map_err(ApiError::from)??;
        let steps = logs
            .into_iter()
            .map(|(vertex, log)| StepLogs {
                vertex: vertex.to_string(),
                lines: log
                    .lines
                    .into_iter()
                    .map(|line| kiln_proto::convert::vertex_log_to_proto(String::new(), line))
                    .collect(),
                dropped: log.dropped,
            })
            .collect();
        Ok(Response::new(BuildLogsResponse { steps }))
    }

    async fn remove_build(
        &self,
        request: Request<RemoveBuildRequest>,
    ) -> Result<Response<RemoveBuildResponse>, Status> {
        let caller = auth::caller_of(&request);
        let id = request.into_inner().id;
        auth::builder(&caller, "removing a build")?;
        let entry = self.visible_build(&caller, &id).await?;
        if entry.status == "running" {
            return Err(ApiError::BuildRunning(id).into());
        }
        self.builds.remove(&id).await?;
        let journal = Arc::clone(self.runs.journal());
        tokio::task::spawn_blocking(move || journal.remove(&id, &entry.tenant)).await.map_err(ApiError::from)??;
        Ok(Response::new(RemoveBuildResponse {}))
    }

    async fn disk_usage(&self, request: Request<DiskUsageRequest>) -> Result<Response<DiskUsageResponse>, Status> {
        auth::admin(&auth::caller_of(&request), "listing disk usage")?;
        // A coordinator answers for its workers' stores, a standalone daemon for its own.
        let response = match (self.engine.cluster(), self.engine.gc()) {
            (Some(cluster), _) => storage::cluster_usage(cluster, self.node_tls.as_ref()).await,
            (None, Some(gc)) => storage::local_usage(gc, self.engine.name()).await?,
            (None, None) => return Err(ApiError::NoStore.into()),
        };
        Ok(Response::new(response))
    }

    async fn prune(&self, request: Request<PruneRequest>) -> Result<Response<PruneResponse>, Status> {
        auth::admin(&auth::caller_of(&request), "pruning")?;
        let request = request.into_inner();
        let response = match (self.engine.cluster(), self.engine.gc()) {
            (Some(cluster), _) => storage::cluster_prune(cluster, self.node_tls.as_ref(), request).await,
            (None, Some(gc)) => PruneResponse { evicted: Vec::new(), ..storage::local_prune(gc, &request).await? },
            (None, None) => return Err(ApiError::NoStore.into()),
        };
        Ok(Response::new(response))
    }
}

/// Serves the control service on a unix socket until `shutdown` completes. A stale socket
/// file from an earlier daemon is replaced. The socket is `0660`, owned by this user and
/// `group` (by default this user's group), as `docker.sock` is: whoever may connect is
/// trusted with the daemon.
pub async fn serve_unix(
    service: ControlService,
    socket: &Path,
    group: Option<u32>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let at = |source| ServeError::Socket { path: socket.to_path_buf(), source };
    if socket.exists() {
        std::fs::remove_file(socket).map_err(at)?;
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(at)?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o660)).map_err(at)?;
    if let Some(group) = group {
        std::os::unix::fs::chown(socket, None, Some(group)).map_err(at)?;
    }
    tonic::transport::Server::builder()
        .initial_stream_window_size(kiln_proto::STREAM_WINDOW)
        .initial_connection_window_size(kiln_proto::CONNECTION_WINDOW)
        .add_service({
            // A follower's socket refuses like its TCP port: builds run where the workers are.
            let access = Access::local().led_by(service.replication.clone());
            control_server(service, access)
        })
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::from)
}

/// How a build ended without a result.
enum Ending {
    /// Its client left (or the daemon gave up on it).
    Cancelled,
    /// A limit refused it once its graph was known.
    Refused(String),
    /// This coordinator stopped leading (the client reattaches to the build on the new
    /// leader), or the client already reattached to a new run here.
    HandedOver,
}

/// Resolves, with the refusal to send, once a replicated coordinator's member stops leading;
/// never without replication.
async fn deposed(replication: Option<&Replication>) -> ApiError {
    match replication {
        Some(replication) => {
            replication.deposed().await;
            replication.leading().err().unwrap_or(ApiError::NotLeader { leader: None })
        }
        None => std::future::pending().await,
    }
}

/// The control service, every request authenticated by `access`.
fn control_server(
    service: ControlService,
    access: Access,
) -> InterceptedService<ControlServer<ControlService>, Authenticate> {
    let server =
        ControlServer::new(service).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    InterceptedService::new(server, Authenticate(access))
}

/// The services one TCP listener serves.
#[derive(Default)]
pub struct Services {
    /// The client-facing control service.
    pub control: Option<ControlService>,
    /// The worker service (a coordinator).
    pub workers: Option<WorkersService>,
    /// The blob service.
    pub blobs: Option<BlobsService>,
    /// A worker's store (its coordinator lists and prunes it).
    pub storage: Option<StorageService>,
    /// A replicated coordinator's raft traffic.
    pub raft: Option<RaftService>,
    /// Who may call them.
    pub access: Access,
    /// This node's TLS for the listener (`None`: plain TCP). Clients of the control service
    /// may connect without a certificate (they present tokens); only nodes call the others.
    pub tls: Option<NodeTls>,
}

/// Serves `services` on a TCP listener until `shutdown` completes. Each connection gets a
/// bounded number of concurrent requests, and idle connections are probed with keepalives
/// (a peer that vanished is noticed).
pub async fn serve_tcp(
    services: Services,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = services.tls.and_then(|tls| tls.server(services.control.is_some())) {
        builder = builder.tls_config(tls)?;
    }
    let access = services.access;
    builder
        .concurrency_limit_per_connection(256)
        .initial_stream_window_size(kiln_proto::STREAM_WINDOW)
        .initial_connection_window_size(kiln_proto::CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_optional_service(services.control.map(|control| control_server(control, access.clone())))
        .add_optional_service(services.workers.map(|workers| {
            WorkersServer::new(workers.with_access(access.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
        }))
        .add_optional_service(services.blobs.map(|blobs| {
            let server = BlobsServer::new(blobs).max_encoding_message_size(MAX_MESSAGE);
            InterceptedService::new(server, NodesOnly(access.clone(), "the blob service"))
        }))
        .add_optional_service(services.raft.map(|raft| {
            let server = RaftServer::new(raft.with_access(access.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            InterceptedService::new(server, NodesOnly(access.clone(), "the raft service"))
        }))
        .add_optional_service(services.storage.map(|storage| {
            let server = StorageServer::new(storage).max_encoding_message_size(MAX_MESSAGE);
            InterceptedService::new(server, NodesOnly(access.clone(), "the storage service"))
        }))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
        .map_err(ServeError::from)
}

/// Whether a build's client is sent `event`: Kiln's own lines on a step only if it asked
/// (`--debug`).
fn sent_to(event: &DomainEvent, debug: bool) -> bool {
    debug || !matches!(event, DomainEvent::Log { line, .. } if line.stream == kiln_model::LogStream::Debug)
}
