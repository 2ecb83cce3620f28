//! A worker's session with its coordinator: register, then heartbeats, job progress and
//! results one way, assignments and cancellations the other.

use std::collections::HashMap;

use kiln_graph::Vertex;
use kiln_model::{Assignment, Executed, Failed, FromCoordinator, HeldWork, JobId, Layers, LogLine, WorkerInfo};
use kiln_proto::v1::{self, coordinator_message, worker_message, workers_client::WorkersClient};
use kiln_types::Digest;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::ClientError;

use kiln_proto::convert::{
    WireError, job_log_to_proto, job_result_to_proto, layers_from_proto, manifest_from_proto, parse_digest,
    push_from_proto, pushed_to_proto, register_to_proto, tier_blob_from_proto,
};

/// The sending half of a session (cheap to clone).
#[derive(Clone)]
pub struct WorkerLink {
    sender: mpsc::UnboundedSender<v1::WorkerMessage>,
}

/// A registered session.
pub struct WorkerSession {
    /// Sends to the coordinator.
    pub link: WorkerLink,
    /// The session's lease: heartbeat well within it.
    pub lease_ms: u64,
    /// What the coordinator sends, until the connection ends. An `Err` is why the
    /// coordinator ended the session, as its status said: a reason to log before
    /// registering again, never acted on by kind.
    pub incoming: mpsc::Receiver<Result<FromCoordinator, String>>,
}

impl WorkerSession {
    /// Connects to the coordinator `target` (`http://HOST:PORT`, or `https://` with
    /// this node's `tls`) and registers, with the layers and the lost session's jobs it holds.
    pub async fn connect(
        target: &crate::Target,
        tls: Option<&crate::NodeTls>,
        info: &WorkerInfo,
        layers: &[Digest],
        held: &[HeldWork],
    ) -> Result<WorkerSession, ClientError> {
        let address = target.to_string();
        let endpoint = crate::endpoint_to(target, tls)?;
        let channel =
            endpoint.connect().await.map_err(|source| ClientError::Connect { address: address.clone(), source })?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let register = register_to_proto(info, layers, held);
        let _ = sender.send(v1::WorkerMessage { message: Some(worker_message::Message::Register(register)) });
        let mut stream = WorkersClient::new(channel)
            .max_decoding_message_size(crate::MAX_MESSAGE)
            .max_encoding_message_size(crate::MAX_MESSAGE)
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(receiver))
            .await
            .map_err(|e| ClientError::rpc(&address, e))?
            .into_inner();
        let first = stream.message().await.map_err(|e| ClientError::rpc(&address, e))?;
        let lease_ms = match first.and_then(|m| m.message) {
            Some(coordinator_message::Message::Registered(registered)) => registered.lease_ms,
            _ => {
                let source = WireError::Missing("a session that starts with Registered");
                return Err(ClientError::Malformed { what: address.to_string(), source });
            }
        };
        let (incoming_sender, incoming) = mpsc::channel(64);
        let reader = async move {
            loop {
                let message = match stream.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = incoming_sender.send(Err(e.message().to_string())).await;
                        return;
                    }
                };
                let converted = match message.message {
                    Some(coordinator_message::Message::Assign(assign)) => {
                        let (job, epoch) = (assign.job, assign.epoch);
                        Ok(assignment(assign).map_or_else(
                            |error| FromCoordinator::Unreadable { job, epoch, error },
                            FromCoordinator::Assign,
                        ))
                    }
                    Some(coordinator_message::Message::Cancel(cancel)) => Ok(FromCoordinator::Cancel(cancel.job)),
                    Some(coordinator_message::Message::Push(push)) => {
                        let request = push.request;
                        Ok(push_from_proto(push).map_or_else(
                            |e| FromCoordinator::UnreadablePush { request, error: e.to_string() },
                            FromCoordinator::Push,
                        ))
                    }
                    _ => continue,
                };
                if incoming_sender.send(converted).await.is_err() {
                    return;
                }
            }
        };
        tokio::spawn(reader.instrument(tracing::info_span!("session_reader", coordinator = %address)));
        Ok(WorkerSession { link: WorkerLink { sender }, lease_ms, incoming })
    }
}

/// An assignment as received. The error is the message the worker reports back as the
/// job's failure ([`FromCoordinator::Unreadable`]), so it stays text, naming the job.
fn assignment(assign: v1::Assign) -> Result<Box<Assignment>, String> {
    let job = assign.job;
    let vertex: Vertex = serde_json::from_slice(&assign.vertex).map_err(|e| format!("job {job}: bad vertex: {e}"))?;
    let wire = |e: WireError| format!("job {job}: {e}");
    let inputs = assign.inputs.into_iter().map(layers_from_proto).collect::<Result<_, _>>().map_err(wire)?;
    let mut sources = HashMap::new();
    let mut tier = HashMap::new();
    for source in assign.sources {
        let diff_id = parse_digest(&source.diff_id, "layer source").map_err(wire)?;
        if let Some(blob) = source.tier {
            tier.insert(diff_id, tier_blob_from_proto(blob).map_err(wire)?);
        }
        sources.insert(diff_id, source.peers);
    }
    let mut contexts = HashMap::new();
    for (name, manifest) in assign.contexts {
        contexts.insert(name, manifest_from_proto(manifest).map_err(wire)?);
    }
    Ok(Box::new(Assignment {
        job,
        epoch: assign.epoch,
        vertex,
        inputs,
        sources,
        tier,
        secrets: assign.secrets,
        contexts,
        context_address: assign.context_address,
        cache_group: (!assign.cache_group.is_empty()).then_some(assign.cache_group),
        trace: (!assign.traceparent.is_empty()).then(|| {
            kiln_model::TraceContext { traceparent: assign.traceparent, tracestate: assign.tracestate }.bounded()
        }),
    }))
}

impl WorkerLink {
    fn send(&self, message: worker_message::Message) {
        let _ = self.sender.send(v1::WorkerMessage { message: Some(message) });
    }

    /// Renews the lease, telling the free disk, the cache's size and the capacity.
    pub fn heartbeat(&self, beat: kiln_model::Beat) {
        let kiln_model::Beat { free_disk, cache_bytes, capacity } = beat;
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        self.send(worker_message::Message::Heartbeat(v1::Heartbeat { free_disk, cache_bytes, capacity }));
    }

    /// The answer to a push.
    pub fn pushed(&self, request: u64, result: Result<Vec<kiln_model::PushedLayer>, String>) {
        self.send(worker_message::Message::Pushed(pushed_to_proto(request, result)));
    }

    /// Layers garbage collection removed, by diff id.
    pub fn evicted(&self, layers: &[kiln_types::Digest]) {
        let layers = layers.iter().map(ToString::to_string).collect();
        self.send(worker_message::Message::Evicted(v1::Evicted { layers }));
    }

    /// Takes no new work.
    pub fn drain(&self) {
        self.send(worker_message::Message::Drain(v1::Drain {}));
    }

    /// A line of a job's output.
    pub fn log(&self, job: JobId, epoch: u32, line: LogLine) {
        self.send(worker_message::Message::Log(job_log_to_proto(job, epoch, line)));
    }

    /// A job's result.
    pub fn result(&self, job: JobId, epoch: u32, result: Result<Executed<Layers>, Failed>) {
        let message = job_result_to_proto(job, epoch, result);
        self.send(worker_message::Message::Result(message));
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}
