//! What `metrics-listen` reads from this daemon (`kiln_telemetry::Probe`): the queues, workers
//! and builds of a coordinator or standalone daemon, a worker's session.

use std::collections::BTreeMap;
use std::sync::Arc;

use kiln_api::{Replication, Runs};
use kiln_engine::Engine;
use kiln_telemetry::{ANY_PLATFORM, POOL_LABEL, PlatformLoad, PoolLoad, Probe, RaftState, State};
use tokio_util::sync::CancellationToken;

/// A daemon that runs builds: a coordinator (its cluster's queues and workers) or a
/// standalone daemon (its own worker's slots).
pub struct Builds {
    pub engine: Arc<Engine>,
    pub runs: Runs,
    pub replication: Option<Arc<Replication>>,
    pub stopped: CancellationToken,
}

impl Probe for Builds {
    fn state(&self) -> State {
        let (builds_running, builds_queued) = self.runs.counts();
        let mut state = State { builds_running, builds_queued, ..State::default() };
        match self.engine.cluster() {
            Some(cluster) => {
                let jobs = cluster.jobs_by_platform();
                let workers = cluster.workers();
                state.platforms = platform_loads(&jobs, &workers);
                state.pools = pool_workers(&workers);
                // Each pool with what is queued for it.
                let pools = state.pools.keys().map(|name| (name.clone(), state.pool(name, &[]))).collect();
                state.pools = pools;
                state.shared_cache_bytes = Some(cluster.tier_bytes());
            }
            None => {
                // One worker: its queue under its own platform (the others it runs through
                // emulation share its slots).
                let (queued, running) = self.engine.local_load().unwrap_or_default();
                let slots = self.engine.local_slots().unwrap_or_default();
                let (queued, running, slots) = (queued as u64, running as u64, slots as u64);
                let stopping = self.stopped.is_cancelled();
                let load = PlatformLoad {
                    queued,
                    running,
                    workers: u64::from(!stopping),
                    draining: u64::from(stopping),
                    slots_busy: running.min(slots),
                    slots_free: slots.saturating_sub(running),
                };
                state.platforms.insert(kiln_types::Platform::host().to_string(), load);
            }
        }
        if let Some(replication) = &self.replication {
            let status = replication.node().status();
            state.raft = Some(RaftState { term: status.term, leader: status.is_leader(), commit: status.commit });
        }
        state
    }

    fn leader_host(&self) -> Option<String> {
        let replication = self.replication.as_ref()?;
        let status = replication.node().status();
        let leader = status.leader.filter(|_| !status.is_leader())?;
        let url = replication.address(leader)?;
        let authority = url.split_once("://").map_or(url, |(_, rest)| rest);
        Some(authority.rsplit_once(':').map_or(authority, |(host, _)| host).to_string())
    }

    fn ready(&self) -> Result<(), String> {
        if self.stopped.is_cancelled() {
            return Err("stopping".into());
        }
        let Some(replication) = &self.replication else { return Ok(()) };
        let status = replication.node().status();
        match status.leader {
            None => Err(format!("no leader in term {}", status.term)),
            // A follower sends clients and workers to the leader.
            Some(_) if !status.is_leader() => Ok(()),
            Some(_) if replication.is_recovered(status.term) => Ok(()),
            Some(_) => Err(format!("taking over term {}: waiting for the old leader's workers", status.term)),
        }
    }
}

/// The load of each platform: jobs by required platform, workers under every platform they
/// run (a worker of two platforms counts in both, its slots too).
fn platform_loads(
    jobs: &BTreeMap<Option<kiln_types::Platform>, (usize, usize)>,
    workers: &[kiln_model::WorkerStatus],
) -> BTreeMap<String, PlatformLoad> {
    let mut loads: BTreeMap<String, PlatformLoad> = BTreeMap::new();
    for worker in workers {
        for platform in &worker.info.platforms {
            let load = loads.entry(platform.to_string()).or_default();
            if worker.draining {
                load.draining += 1;
            } else {
                load.workers += 1;
            }
            let (slots, running) = (worker.info.slots() as u64, worker.running as u64);
            load.slots_busy += running.min(slots);
            load.slots_free += slots.saturating_sub(running);
        }
    }
    for (platform, (queued, running)) in jobs {
        let key = platform.as_ref().map_or_else(|| ANY_PLATFORM.to_string(), ToString::to_string);
        let load = loads.entry(key).or_default();
        load.queued += *queued as u64;
        load.running += *running as u64;
    }
    loads
}

/// The workers of each pool (labelled `pool=NAME`): their platforms, slots and running jobs.
fn pool_workers(workers: &[kiln_model::WorkerStatus]) -> BTreeMap<String, PoolLoad> {
    let mut pools: BTreeMap<String, PoolLoad> = BTreeMap::new();
    for worker in workers {
        let Some(name) = worker.info.labels.get(POOL_LABEL) else { continue };
        let pool = pools.entry(name.clone()).or_default();
        for platform in &worker.info.platforms {
            let platform = platform.to_string();
            if !pool.platforms.contains(&platform) {
                pool.platforms.push(platform);
            }
        }
        pool.running += worker.running as u64;
        if !worker.draining {
            pool.workers += 1;
            pool.slots += worker.info.slots() as u64;
        }
    }
    pools
}

/// A worker: ready while registered with a coordinator and not draining.
pub struct WorkerProbe {
    pub registered: tokio::sync::watch::Receiver<bool>,
    pub stopped: CancellationToken,
}

impl Probe for WorkerProbe {
    fn state(&self) -> State {
        State::default()
    }

    fn ready(&self) -> Result<(), String> {
        if self.stopped.is_cancelled() {
            Err("draining".into())
        } else if !*self.registered.borrow() {
            Err("not registered with a coordinator".into())
        } else {
            Ok(())
        }
    }
}
