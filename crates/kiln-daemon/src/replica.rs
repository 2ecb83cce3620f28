//! A replicated coordinator's member (`[coordinator] node-id` and `peers`): the raft node on
//! the coordinator's store, its links to the other members (raft messages as bytes inside
//! Kiln's gRPC, mutual TLS), the replicated state it keeps (the cache index), and what a
//! change of leader does here.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context as _;
use kiln_api::Replication;
use kiln_client::{NodeTls, RaftLink};
use kiln_config::Replicas;
use kiln_engine::Engine;
use kiln_kv::SharedKv;
use kiln_raft::{KvMachine, Node, Proposer, RaftConfig, ReplicatedKv, Transport};
use tokio::sync::mpsc;
use tracing::Instrument as _;

/// The trees of the coordinator's store that every member keeps alike.
const REPLICATED_TREES: [&str; 1] = [kiln_solver::CACHE_TREE];

/// How long one batch may take to reach a member before it counts as unreachable: several
/// heartbeats, well under the election timeout.
const SEND_TIMEOUT: Duration = Duration::from_millis(500);

/// Batches waiting for a member; beyond this, messages for it are dropped (raft sends again).
const QUEUE: usize = 256;

/// The cache index's store for the engine: writes go through the log.
pub struct ReplicatedStore {
    /// What the engine's solver keeps its cache index in.
    pub cache_index: SharedKv,
    proposer: Proposer,
}

/// Wraps the coordinator's store so that its replicated trees are written through the log.
pub fn replicated_store(kv: &SharedKv) -> ReplicatedStore {
    let (replicated, proposer) = ReplicatedKv::new(Arc::clone(kv), &REPLICATED_TREES);
    ReplicatedStore { cache_index: Arc::new(replicated), proposer }
}

/// Starts this coordinator's member over `kv` (the engine's store): the log in its `raft`
/// tree, the replicated trees applied to it and taught to `engine`'s solver.
pub fn start(
    replicas: &Replicas,
    kv: SharedKv,
    store: ReplicatedStore,
    engine: &Arc<Engine>,
    tls: Option<NodeTls>,
) -> anyhow::Result<Arc<Replication>> {
    let id = replicas.node_id;
    let node_slot: Arc<OnceLock<Weak<Node>>> = Arc::default();
    let links = Links::start(id, &replicas.peers, tls.as_ref(), &node_slot)?;
    let learner = Arc::downgrade(engine);
    let store_kv = Arc::clone(&kv);
    let machine = KvMachine::new(Arc::clone(&kv), &REPLICATED_TREES)
        .context("reading the replicated state's applied index")?
        .observed_by(move |write| {
            let Some(engine) = learner.upgrade() else { return };
            match write {
                Some(write) if write.tree == kiln_solver::CACHE_TREE => {
                    for change in &write.batch.changes {
                        match change {
                            kiln_kv::Change::Put(key, value) => engine.learn_cache_entry(key, Some(value)),
                            kiln_kv::Change::Delete(key) => engine.learn_cache_entry(key, None),
                        }
                    }
                }
                Some(_) => {}
                // A snapshot replaced the trees: learn the cache index again.
                None => {
                    for (key, value) in store_kv.scan_prefix(kiln_solver::CACHE_TREE, b"").unwrap_or_default() {
                        engine.learn_cache_entry(&key, Some(&value));
                    }
                }
            }
        });
    let config = RaftConfig::new(id, replicas.peers.keys().copied().collect());
    let node = Arc::new(Node::start(config, kv, machine, links).context("starting the replicated log")?);
    let _ = node_slot.set(Arc::downgrade(&node));
    tokio::spawn(store.proposer.run(Arc::downgrade(&node)).instrument(tracing::info_span!("raft_proposer")));
    tracing::info!("member {id} of {} replicated coordinators", replicas.peers.len());
    let replication = Arc::new(Replication::new(node, replicas.peers.clone()));
    tokio::spawn(
        follow_leadership(Arc::clone(&replication), Arc::downgrade(engine))
            .instrument(tracing::info_span!("leadership")),
    );
    Ok(replication)
}

/// Logs each change of leader; when this member stops leading, closes its worker sessions
/// (the workers go to the new leader; builds here end, see `kiln_api`).
async fn follow_leadership(replication: Arc<Replication>, engine: Weak<Engine>) {
    let mut status = replication.node().subscribe();
    let (mut leading, mut leader) = (false, None);
    loop {
        let now = status.borrow_and_update().clone();
        if now.stopped {
            return;
        }
        if now.leader != leader {
            leader = now.leader;
            match leader {
                Some(id) => tracing::info!(
                    term = now.term,
                    "the leader is member {id} ({})",
                    replication.address(id).unwrap_or("?")
                ),
                None => tracing::info!(term = now.term, "no leader"),
            }
        }
        if leading
            && !now.is_leader()
            && let Some(engine) = engine.upgrade()
            && let Some(cluster) = engine.cluster()
        {
            let closed = cluster.close_sessions();
            tracing::info!("no longer the leader: closed {closed} worker sessions");
        }
        leading = now.is_leader();
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// A batch for one member.
struct Outgoing {
    messages: Vec<Vec<u8>>,
    snapshot: bool,
}

/// The links to the other members: one queue and one sending task each, so a slow member
/// holds up nobody else and messages to one member stay in order.
struct Links {
    queues: BTreeMap<u64, mpsc::Sender<Outgoing>>,
    node: Arc<OnceLock<Weak<Node>>>,
}

impl Links {
    fn start(
        from: u64,
        peers: &BTreeMap<u64, String>,
        tls: Option<&NodeTls>,
        node: &Arc<OnceLock<Weak<Node>>>,
    ) -> anyhow::Result<Arc<Links>> {
        let mut queues = BTreeMap::new();
        for (&to, address) in peers.iter().filter(|(id, _)| **id != from) {
            let link = RaftLink::new(address, tls).with_context(|| format!("coordinator.peers: member {to}"))?;
            let (sender, receiver) = mpsc::channel(QUEUE);
            queues.insert(to, sender);
            let deliver = deliver(link, from, to, receiver, Arc::clone(node));
            tokio::spawn(deliver.instrument(tracing::info_span!("raft_link", to)));
        }
        Ok(Arc::new(Links { queues, node: Arc::clone(node) }))
    }
}

impl Transport for Links {
    fn send(&self, to: u64, messages: Vec<Vec<u8>>, snapshot: bool) {
        let Some(queue) = self.queues.get(&to) else { return };
        if queue.try_send(Outgoing { messages, snapshot }).is_err()
            && let Some(node) = self.node.get().and_then(Weak::upgrade)
        {
            node.report_unreachable(to);
            if snapshot {
                node.report_snapshot(to, false);
            }
        }
    }
}

/// Sends what is queued for member `to`, everything waiting in one batch.
async fn deliver(
    link: RaftLink,
    from: u64,
    to: u64,
    mut queue: mpsc::Receiver<Outgoing>,
    node: Arc<OnceLock<Weak<Node>>>,
) {
    let mut reachable = true;
    while let Some(first) = queue.recv().await {
        let (mut messages, mut snapshot) = (first.messages, first.snapshot);
        while let Ok(next) = queue.try_recv() {
            messages.extend(next.messages);
            snapshot |= next.snapshot;
        }
        let sent = tokio::time::timeout(SEND_TIMEOUT, link.send(from, to, messages)).await;
        let failure = match sent {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {} ms", SEND_TIMEOUT.as_millis())),
        };
        let Some(node) = node.get().and_then(Weak::upgrade) else { return };
        if let Some(failure) = &failure {
            node.report_unreachable(to);
            if reachable {
                tracing::warn!("raft member {to} unreachable: {failure}");
            }
        } else if !reachable {
            tracing::info!("raft member {to} reachable again");
        }
        reachable = failure.is_none();
        if snapshot {
            node.report_snapshot(to, reachable);
        }
    }
}
