//! The coordinator's side of worker sessions: registration, then assignments out and
//! heartbeats, logs and results in, all handed to the engine's [`Cluster`].

use std::pin::Pin;
use std::sync::Arc;

use kiln_cluster::{Cluster, Job, ToWorker};
use kiln_engine::ClusterData;
use kiln_graph::{Op, SourceOp};
use kiln_model::Failed;
use kiln_proto::MAX_MESSAGE;
use kiln_proto::convert::{
    job_result_from_proto, layers_to_proto, log_line_from_proto, manifest_to_proto, push_to_proto, pushed_from_proto,
    register_from_proto, tier_blob_to_proto,
};
use kiln_proto::v1::workers_server::Workers;
use kiln_proto::v1::{self, coordinator_message, worker_message};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::error::ApiError;

/// The worker service of a coordinator.
pub struct WorkersService {
    cluster: Arc<Cluster<ClusterData>>,
    /// Where workers fetch uploaded context files (this coordinator's blob service).
    address: String,
    lease_ms: u64,
    /// Where each session's tasks are tracked.
    tasks: TaskTracker,
    /// Who may register (a worker's certificate must name it).
    access: crate::Access,
}

impl WorkersService {
    /// Tracks its sessions' tasks in `tasks` (the daemon's, which it waits for when stopping).
    pub fn tracked_by(mut self, tasks: TaskTracker) -> WorkersService {
        self.tasks = tasks;
        self
    }

    /// A service registering workers into `cluster`; `address` is this coordinator's blob
    /// service for context files.
    pub fn new(cluster: Arc<Cluster<ClusterData>>, address: &str, lease_ms: u64) -> WorkersService {
        WorkersService {
            cluster,
            address: address.to_string(),
            lease_ms,
            tasks: TaskTracker::new(),
            access: crate::Access::default(),
        }
    }

    /// Checks registrations with `access` (its listener's).
    pub(crate) fn with_access(mut self, access: crate::Access) -> WorkersService {
        self.access = access;
        self
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Workers for WorkersService {
    type SessionStream = MessageStream;

    async fn session(&self, request: Request<Streaming<v1::WorkerMessage>>) -> Result<Response<MessageStream>, Status> {
        self.access.node(&request, "the worker service")?;
        self.access.leading()?;
        let chain = request.peer_certs().unwrap_or_default();
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.and_then(|m| m.message);
        let Some(worker_message::Message::Register(register)) = first else {
            return Err(ApiError::NotRegistered.into());
        };
        let (info, layers, held) = register_from_proto(register).map_err(ApiError::from)?;
        let name = info.name.clone();
        // The name it registers under must be one its certificate was issued for.
        if let Err(refused) = self.access.worker(&chain, &name) {
            tracing::warn!("refused a worker registration: {refused}");
            return Err(refused.into());
        }
        let (session, mut assignments) = self.cluster.register(info, layers, held).map_err(|reason| {
            tracing::warn!("refused a worker registration: {reason}");
            Status::from(ApiError::RegistrationRefused(reason.0))
        })?;
        // Every line about this session carries the worker and the session.
        let span = tracing::info_span!("worker_session", worker = %name, session);
        span.in_scope(|| tracing::info!("registered"));
        let (outgoing, stream) = mpsc::unbounded_channel::<Result<v1::CoordinatorMessage, Status>>();
        let registered = v1::Registered { session, lease_ms: self.lease_ms };
        let _ = outgoing.send(Ok(message(coordinator_message::Message::Registered(registered))));

        let address = self.address.clone();
        let sender = outgoing.clone();
        let (cluster, worker) = (Arc::clone(&self.cluster), name.clone());
        // Set when the worker's side ended first: then there is nothing to close.
        let worker_left = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let left = Arc::clone(&worker_left);
        self.tasks.spawn(async move {
            while let Some(to_worker) = assignments.recv().await {
                let converted = match to_worker {
                    ToWorker::Assign(job) => match assign(*job, &address) {
                        Ok(assign) => coordinator_message::Message::Assign(assign),
                        // Too large to send: the job fails alone, the session goes on.
                        Err((job, epoch, error)) => {
                            tracing::warn!(job, "{error}");
                            cluster.report(&worker, job, epoch, Err(Failed::from(error)));
                            continue;
                        }
                    },
                    ToWorker::Cancel { job } => coordinator_message::Message::Cancel(v1::CancelJob { job }),
                    ToWorker::Push(push) => coordinator_message::Message::Push(push_to_proto(&push)),
                };
                if sender.send(Ok(message(converted))).is_err() {
                    return;
                }
            }
            // The cluster ended this session (its lease expired, the same worker registered
            // again, or the coordinator is stopping): close the stream, so a worker that is
            // still alive registers anew instead of heartbeating into a dead session.
            if left.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let reason = format!(
                "worker {worker}: the coordinator ended session {session} (lease expired, replaced, or shutting down)"
            );
            tracing::info!("{reason}");
            let _ = sender.send(Err(ApiError::SessionEnded(reason).into()));
        }.instrument(span.clone()));

        let cluster = Arc::clone(&self.cluster);
        self.tasks.spawn(
            async move {
                let why = loop {
                    match incoming.message().await {
                        Ok(Some(v1::WorkerMessage { message: Some(received) })) => match received {
                            worker_message::Message::Heartbeat(beat) => {
                                let v1::Heartbeat { free_disk, cache_bytes, capacity } = beat;
                                let beat = kiln_model::Beat { free_disk, cache_bytes, capacity: capacity as usize };
                                cluster.heartbeat(&name, session, beat)
                            }
                            worker_message::Message::Log(log) => {
                                let (job, epoch) = (log.job, log.epoch);
                                cluster.log(job, epoch, log_line_from_proto(log));
                            }
                            worker_message::Message::Result(result) => {
                                let (job, epoch) = (result.job, result.epoch);
                                let result = job_result_from_proto(result).unwrap_or_else(|e| {
                                    Err(Failed::from(format!("worker {name} sent a malformed result: {e}")))
                                });
                                cluster.report(&name, job, epoch, result);
                            }
                            worker_message::Message::Drain(_) => cluster.drain(&name, session),
                            worker_message::Message::Pushed(pushed) => match pushed_from_proto(pushed) {
                                Ok((request, result)) => cluster.pushed(&name, request, result),
                                // The waiter hears nothing and times out with the session.
                                Err(error) => tracing::warn!("a malformed push answer: {error}"),
                            },
                            worker_message::Message::Evicted(evicted) => {
                                // Unreadable digests name nothing the cluster knows.
                                let layers = evicted.layers.iter().filter_map(|d| d.parse().ok()).collect();
                                cluster.evicted(&name, session, layers);
                            }
                            worker_message::Message::Register(_) => {}
                        },
                        Ok(Some(_)) => {}
                        Ok(None) => break "the worker closed it".to_string(),
                        Err(status) => break format!("{} ({:?})", status.message(), status.code()),
                    }
                };
                tracing::info!("session ended: {why}");
                worker_left.store(true, std::sync::atomic::Ordering::SeqCst);
                cluster.disconnect(&name, session);
                drop(outgoing);
            }
            .instrument(span.clone()),
        );
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(stream);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn message(message: coordinator_message::Message) -> v1::CoordinatorMessage {
    v1::CoordinatorMessage { message: Some(message) }
}

/// An assignment as sent: only the secrets the step mounts, contexts only with context
/// sources. One larger than [`MAX_MESSAGE`] cannot be sent: the job, its epoch and why.
fn assign(job: Job<ClusterData>, address: &str) -> Result<v1::Assign, (u64, u32, String)> {
    let data = &job.build.data;
    let secrets = data.secrets_for(&job.vertex.op.secret_ids());
    let contexts = match &job.vertex.op {
        // A nested build's or a directory context is known by the source vertex's digest.
        Op::Source(SourceOp::Local { name, .. }) => data
            .contexts
            .get(&job.vertex.digest.to_string())
            .or_else(|| data.contexts.get(name))
            .map(|manifest| (name.clone(), manifest_to_proto(manifest)))
            .into_iter()
            .collect(),
        _ => Default::default(),
    };
    let assign = v1::Assign {
        job: job.id,
        epoch: job.epoch,
        vertex: serde_json::to_vec(&job.vertex).expect("vertices serialise"),
        inputs: job.inputs.iter().map(layers_to_proto).collect(),
        sources: job
            .sources
            .into_iter()
            .map(|(diff_id, peers)| {
                let tier = job.tier.iter().find(|(d, _)| *d == diff_id).map(|(_, blob)| tier_blob_to_proto(blob));
                v1::LayerSource { diff_id: diff_id.to_string(), peers, tier }
            })
            .collect(),
        secrets,
        contexts,
        context_address: address.to_string(),
        cache_group: data.cache_group.clone().unwrap_or_default(),
        traceparent: job.trace.as_ref().map(|t| t.traceparent.clone()).unwrap_or_default(),
        tracestate: job.trace.as_ref().map(|t| t.tracestate.clone()).unwrap_or_default(),
    };
    // Room for the message's own framing under the limit.
    let size = kiln_proto::encoded_len(&assign);
    if size + 1024 > MAX_MESSAGE {
        let error = format!(
            "{}: its assignment is {} MiB, over the {} MiB limit of a worker message (its environment, \
             secrets or build context are too large)",
            job.vertex.meta.name,
            size >> 20,
            MAX_MESSAGE >> 20
        );
        return Err((job.id, job.epoch, error));
    }
    Ok(assign)
}
