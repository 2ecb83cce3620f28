//! The coordinator's side of worker sessions: registration, then assignments out and
//! heartbeats, logs and results in, all handed to the engine's [`Cluster`].

use std::pin::Pin;
use std::sync::Arc;

use kiln_client::convert::{layers_from_proto, layers_to_proto, manifest_to_proto};
use kiln_engine::ClusterData;
use kiln_graph::{Op, SourceOp};
use kiln_proto::v1::workers_server::Workers;
use kiln_proto::v1::{self, coordinator_message, worker_message};
use kiln_solver::cluster::{Cluster, Job, Layers, ToWorker, WorkerInfo};
use kiln_solver::{Executed, LogLine, LogStream};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// The worker service of a coordinator.
pub struct WorkersService {
    cluster: Arc<Cluster<ClusterData>>,
    /// Where workers fetch uploaded context files (this coordinator's blob service).
    address: String,
    lease_ms: u64,
}

impl WorkersService {
    /// A service registering workers into `cluster`; `address` is this coordinator's blob
    /// service for context files.
    pub fn new(cluster: Arc<Cluster<ClusterData>>, address: &str, lease_ms: u64) -> WorkersService {
        WorkersService { cluster, address: address.to_string(), lease_ms }
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Workers for WorkersService {
    type SessionStream = MessageStream;

    async fn session(&self, request: Request<Streaming<v1::WorkerMessage>>) -> Result<Response<MessageStream>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.and_then(|m| m.message);
        let Some(worker_message::Message::Register(register)) = first else {
            return Err(Status::invalid_argument("a worker session starts with Register"));
        };
        let info = worker_info(register.clone()).map_err(Status::invalid_argument)?;
        let layers = register.layers.iter().filter_map(|d| d.parse().ok()).collect();
        let name = info.name.clone();
        let (session, mut assignments) = self.cluster.register(info, layers);
        let (outgoing, stream) = mpsc::unbounded_channel::<Result<v1::CoordinatorMessage, Status>>();
        let registered = v1::Registered { session, lease_ms: self.lease_ms };
        let _ = outgoing.send(Ok(message(coordinator_message::Message::Registered(registered))));

        let address = self.address.clone();
        let sender = outgoing.clone();
        tokio::spawn(async move {
            while let Some(to_worker) = assignments.recv().await {
                let converted = match to_worker {
                    ToWorker::Assign(job) => coordinator_message::Message::Assign(assign(*job, &address)),
                    ToWorker::Cancel { job } => coordinator_message::Message::Cancel(v1::CancelJob { job }),
                };
                if sender.send(Ok(message(converted))).is_err() {
                    return;
                }
            }
        });

        let cluster = Arc::clone(&self.cluster);
        tokio::spawn(async move {
            loop {
                let next = incoming.message().await;
                let Ok(Some(v1::WorkerMessage { message: Some(received) })) = next else {
                    if let Ok(Some(_)) = next {
                        continue;
                    }
                    break;
                };
                match received {
                    worker_message::Message::Heartbeat(beat) => cluster.heartbeat(&name, session, beat.free_disk),
                    worker_message::Message::Log(log) => {
                        let stream = if log.stderr { LogStream::Stderr } else { LogStream::Stdout };
                        cluster.log(log.job, log.epoch, LogLine { stream, line: log.line });
                    }
                    worker_message::Message::Result(result) => {
                        let (job, epoch) = (result.job, result.epoch);
                        cluster.report(&name, job, epoch, job_result(result));
                    }
                    worker_message::Message::Drain(_) => cluster.drain(&name, session),
                    worker_message::Message::Register(_) => {}
                }
            }
            cluster.disconnect(&name, session);
            drop(outgoing);
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(stream);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn message(message: coordinator_message::Message) -> v1::CoordinatorMessage {
    v1::CoordinatorMessage { message: Some(message) }
}

fn worker_info(register: v1::Register) -> Result<WorkerInfo, String> {
    if register.name.is_empty() {
        return Err("a worker needs a name".into());
    }
    let platforms = register
        .platforms
        .iter()
        .map(|p| p.parse().map_err(|e| format!("worker {}: platform {p}: {e}", register.name)))
        .collect::<Result<_, String>>()?;
    Ok(WorkerInfo {
        name: register.name,
        platforms,
        labels: register.labels.into_iter().collect(),
        max_parallelism: register.max_parallelism.max(1) as usize,
        free_disk: register.free_disk,
        address: register.address,
    })
}

/// An assignment as sent: secrets only with RUN steps, contexts only with context sources.
fn assign(job: Job<ClusterData>, address: &str) -> v1::Assign {
    let data = &job.build.data;
    let secrets = match &job.vertex.op {
        Op::Exec(_) => data.secrets.clone(),
        _ => Default::default(),
    };
    let contexts = match &job.vertex.op {
        Op::Source(SourceOp::Local { name, .. }) => {
            data.contexts.get(name).map(|manifest| (name.clone(), manifest_to_proto(manifest))).into_iter().collect()
        }
        _ => Default::default(),
    };
    v1::Assign {
        job: job.id,
        epoch: job.epoch,
        vertex: serde_json::to_vec(&job.vertex).expect("vertices serialise"),
        inputs: job.inputs.iter().map(layers_to_proto).collect(),
        sources: job
            .sources
            .into_iter()
            .map(|(diff_id, peers)| v1::LayerSource { diff_id: diff_id.to_string(), peers })
            .collect(),
        secrets,
        contexts,
        context_address: address.to_string(),
    }
}

fn job_result(result: v1::JobResult) -> Result<Executed<Layers>, String> {
    if !result.error.is_empty() {
        return Err(result.error);
    }
    let output = layers_from_proto(result.output.unwrap_or_default())?;
    let pin = if result.pin.is_empty() { None } else { Some(result.pin.parse().map_err(|e| format!("pin: {e}"))?) };
    Ok(Executed { output, pin, worker: None })
}
