//! A replicated coordinator's member (`[coordinator] node-id` and `peers`): the raft node on
//! the coordinator's store, its links to the other members (raft messages as bytes inside
//! Kiln's gRPC, mutual TLS), the replicated state it keeps (the cache index, the worker
//! registry, the build history), and what a change of leader does here.

use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use kiln_api::Replication;
use kiln_client::{NodeTls, RaftLinks};
use kiln_config::Replicas;
use kiln_engine::Engine;
use kiln_kv::SharedKv;
use kiln_raft::{KvMachine, Node, Proposer, RaftConfig, ReplicatedKv};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The workers registered with the leader (name → nothing): whom a new leader waits for.
const WORKERS_TREE: &str = "cluster-workers";

/// The trees of the coordinator's store that every member keeps alike.
const REPLICATED_TREES: [&str; 3] = [kiln_solver::CACHE_TREE, WORKERS_TREE, kiln_api::BUILDS_TREE];

/// The coordinator's store with the replicated trees written through the log.
pub struct ReplicatedStore {
    /// The store as the engine's solver keeps its cache index in it.
    pub cache_index: SharedKv,
    /// Commits a finished step's cache entry before the step counts as done.
    pub durable: kiln_solver::Durable,
    /// The same store, for the build history's committed writes.
    replicated: Arc<ReplicatedKv>,
    proposer: Proposer,
}

/// Wraps the coordinator's store so that its replicated trees are written through the log.
pub fn replicated_store(kv: &SharedKv) -> ReplicatedStore {
    let (replicated, proposer) = ReplicatedKv::new(Arc::clone(kv), &REPLICATED_TREES);
    let replicated = Arc::new(replicated);
    let writer = Arc::clone(&replicated);
    let durable: kiln_solver::Durable = Arc::new(move |key, value| {
        let mut batch = kiln_kv::Batch::default();
        batch.put(key.to_string(), value);
        let written = writer.write_durably(kiln_solver::CACHE_TREE, batch);
        Box::pin(async move {
            // Not committed (this member was deposed, or lost its quorum): the build ends
            // here anyway, and the new leader runs the step again.
            match written.await {
                Ok(_) => true,
                Err(error) => {
                    tracing::warn!("cache entry {key} not committed: {error}");
                    false
                }
            }
        })
    });
    ReplicatedStore { cache_index: Arc::clone(&replicated) as SharedKv, durable, replicated, proposer }
}

/// Starts this coordinator's member over `kv` (the engine's store): the log in its `raft`
/// tree, the replicated trees applied to it and taught to `engine`'s solver.
pub fn start(
    replicas: &Replicas,
    kv: SharedKv,
    store: ReplicatedStore,
    engine: &Arc<Engine>,
    tls: Option<NodeTls>,
    lease: Duration,
    stopping: CancellationToken,
) -> anyhow::Result<Arc<Replication>> {
    let id = replicas.node_id;
    let node_slot: kiln_client::NodeSlot = Arc::default();
    let links = RaftLinks::start(id, &replicas.peers, tls.as_ref(), &node_slot)
        .map_err(|(member, error)| anyhow::anyhow!("coordinator.peers: member {member}: {error}"))?;
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
                // A snapshot replaced the trees: the cache index is the snapshot's.
                None => match store_kv.scan_prefix(kiln_solver::CACHE_TREE, b"") {
                    Ok(entries) => engine.relearn_cache(entries),
                    Err(error) => tracing::error!("reading the cache index a snapshot restored: {error}"),
                },
            }
        });
    let config = RaftConfig::new(id, replicas.peers.keys().copied().collect());
    let node = Arc::new(Node::start(config, kv, machine, links).context("starting the replicated log")?);
    let _ = node_slot.set(Arc::downgrade(&node));
    tokio::spawn(store.proposer.run(Arc::downgrade(&node)).instrument(tracing::info_span!("raft_proposer")));
    tracing::info!("member {id} of {} replicated coordinators", replicas.peers.len());
    let replication =
        Arc::new(Replication::new(node, replicas.peers.clone()).recording_builds_in(Arc::clone(&store.replicated)));
    let cluster = engine.cluster().expect("a coordinator has a cluster");
    let registry = Arc::clone(&store.cache_index);
    let shutting_down = stopping.clone();
    cluster.observe_membership(Arc::new(move |worker, joined| {
        // Only the leader's writes commit; a deposed leader's are dropped. Workers that leave
        // because this coordinator stops stay listed: the next leader waits for them.
        let written = if joined {
            registry.put(WORKERS_TREE, worker.as_bytes(), b"")
        } else if !shutting_down.is_cancelled() {
            registry.delete(WORKERS_TREE, worker.as_bytes())
        } else {
            Ok(())
        };
        if let Err(error) = written {
            tracing::warn!("recording worker {worker} in {WORKERS_TREE}: {error}");
        }
    }));
    let recovery = Recovery { replication: Arc::clone(&replication), kv: store.cache_index, lease };
    let following = follow_leadership(recovery, Arc::downgrade(engine), stopping);
    tokio::spawn(following.instrument(tracing::info_span!("leadership")));
    Ok(replication)
}

/// What a new leader needs to take over.
struct Recovery {
    replication: Arc<Replication>,
    /// The store, its replicated trees written through the log.
    kv: SharedKv,
    /// The workers' lease: how long the old leader's workers get to come back.
    lease: Duration,
}

impl Recovery {
    /// Holds builds of `term` back until every worker the old leader had is registered here,
    /// or a lease has passed (those that did not come back are forgotten): a cached step's
    /// layers are known only once their worker registered.
    async fn take_over(&self, term: u64, engine: &Engine) {
        // Everything committed before this term is applied here first (the registry and the
        // cache index are current).
        while let Err(error) = self.replication.read_barrier().await {
            if self.replication.leading().is_err() {
                return;
            }
            tracing::warn!("taking over term {term}: {error}; trying again");
        }
        self.wait_for_workers(engine).await;
        self.replication.set_recovered(term);
    }

    /// Waits for the workers the replicated registry lists (see [`Recovery::take_over`]).
    async fn wait_for_workers(&self, engine: &Engine) {
        let Some(cluster) = engine.cluster() else { return };
        let expected: Vec<String> = match self.kv.scan_prefix(WORKERS_TREE, b"") {
            Ok(pairs) => pairs.into_iter().map(|(name, _)| String::from_utf8_lossy(&name).into_owned()).collect(),
            Err(error) => {
                tracing::warn!("reading the workers of the old leader: {error}");
                Vec::new()
            }
        };
        if expected.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.lease;
        let mut registrations = cluster.watch_registrations();
        let missing = loop {
            // Registrations after this look change the watch: none is missed.
            registrations.borrow_and_update();
            let registered = cluster.registered();
            let missing: Vec<&String> = expected.iter().filter(|name| !registered.contains(name)).collect();
            if missing.is_empty() {
                break missing;
            }
            tokio::select! {
                changed = registrations.changed() => if changed.is_err() { break missing },
                () = tokio::time::sleep_until(deadline) => break missing,
                () = self.replication.deposed() => return,
            }
        };
        if missing.is_empty() {
            tracing::info!("the old leader's {} workers are back: builds start", expected.len());
        } else {
            tracing::warn!("workers {missing:?} did not come back within the lease: builds start without them");
            for name in missing {
                let _ = self.kv.delete(WORKERS_TREE, name.as_bytes());
            }
        }
    }
}

/// Logs each change of leader; when this member starts leading, waits for the old leader's
/// workers before builds start (`Recovery`); when it stops leading, closes its worker sessions
/// (the workers go to the new leader; builds here end, see `kiln_api`).
async fn follow_leadership(recovery: Recovery, engine: Weak<Engine>, stopping: CancellationToken) {
    let replication = Arc::clone(&recovery.replication);
    let mut status = replication.node().subscribe();
    let (mut leading, mut leader, mut taken_over) = (false, None, 0);
    loop {
        let now = status.borrow_and_update().clone();
        if now.stopped {
            // The log stopped on its own (a store or state machine failure, logged by the
            // member): a coordinator without it can only refuse, so it stops.
            if !stopping.is_cancelled() {
                tracing::error!("the replicated log stopped: stopping the coordinator");
                stopping.cancel();
            }
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
        // Each term this member leads is taken over once (a change of status seen late may
        // hide a loss and a new election in between).
        if now.is_leader()
            && now.term != taken_over
            && let Some(engine) = engine.upgrade()
        {
            taken_over = now.term;
            recovery.take_over(now.term, &engine).await;
        }
        leading = now.is_leader();
        if status.changed().await.is_err() {
            return;
        }
    }
}
