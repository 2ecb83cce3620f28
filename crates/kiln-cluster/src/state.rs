//! The cluster's scheduling state: workers (leases, loads, the layers they hold), queued and
//! assigned jobs with their epochs. It changes only through [`ClusterState::apply`], a
//! deterministic function of [`ClusterCommand`]s (times arrive inside commands), so it can be
//! replicated like the solver's state.
//!
//! Placement: a job goes only to a worker of its platform with a free slot (its slots are its
//! capacity, which heartbeats update: [`WorkerInfo::slots`]). Among those, the
//! worker holding most of the job's input bytes wins unless its load is above
//! [`ClusterSettings::locality_load_bound`]; then the least-loaded one does. Builds take turns
//! (round-robin over builds with queued jobs), so one huge build cannot starve a small one.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use kiln_model::{Beat, JobId, LayerDesc, WorkerInfo, WorkerStatus};
use kiln_types::{Digest, Platform};

/// Timeouts and bounds.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// A worker without a heartbeat for this long is lost.
    pub lease_ms: u64,
    /// A job no connected worker can run fails after this long.
    pub placement_timeout_ms: u64,
    /// Times a job is requeued after losing its worker before it fails.
    pub retry_budget: u32,
    /// Above this load (running / slots), locality no longer wins over the least-loaded worker.
    pub locality_load_bound: f64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings { lease_ms: 10_000, placement_timeout_ms: 300_000, retry_budget: 3, locality_load_bound: 0.5 }
    }
}

/// What a job needs from placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// The build it runs for (builds take turns).
    pub build: u64,
    /// The platform it must run on; `None`: any worker.
    pub platform: Option<Platform>,
    /// Its input layers (for locality).
    pub inputs: Vec<LayerDesc>,
    /// What it needs beyond the sandbox: only workers granting all of it run it.
    pub entitlements: Vec<kiln_model::Entitlement>,
}

/// An input to [`ClusterState::apply`].
#[derive(Debug, Clone)]
pub enum ClusterCommand {
    /// A worker connected (replacing an earlier session of the same name).
    Register {
        /// What it told.
        info: WorkerInfo,
        /// Layers it already holds.
        layers: Vec<Digest>,
        /// Jobs whose work it kept from its lost session: adopted by it (past its slots,
        /// where it can run them) before anything else is placed, those of its own old
        /// session included.
        adopt: Vec<JobId>,
        /// The time.
        at: u64,
    },
    /// A worker's lease renewal.
    Heartbeat {
        /// The worker.
        worker: String,
        /// Its session.
        session: u64,
        /// Its free disk, cache size and capacity now.
        beat: Beat,
        /// The time.
        at: u64,
    },
    /// A worker's connection ended.
    Disconnect {
        /// The worker.
        worker: String,
        /// Its session.
        session: u64,
        /// The time.
        at: u64,
    },
    /// A worker removed layers (garbage collection): no job is sent to it for them.
    Evicted {
        /// The worker.
        worker: String,
        /// Its session.
        session: u64,
        /// The layers' diff ids.
        layers: Vec<Digest>,
    },
    /// A worker finishes what it runs and takes nothing new.
    Drain {
        /// The worker.
        worker: String,
        /// Its session.
        session: u64,
    },
    /// A job to place.
    Submit {
        /// Its id.
        job: JobId,
        /// What placement needs.
        spec: JobSpec,
        /// A worker that holds the job's work already (it kept it running, or its result,
        /// across a lost session): the job is adopted there, past its slots, when it can run
        /// it; otherwise it is queued as usual.
        held_by: Option<String>,
        /// The time.
        at: u64,
    },
    /// A worker's result for an assignment (success or a step failure alike).
    Report {
        /// The job.
        job: JobId,
        /// The assignment's epoch.
        epoch: u32,
        /// The reporting worker.
        worker: String,
        /// The layers it now holds.
        layers: Vec<LayerDesc>,
    },
    /// Nobody needs the job any more.
    Cancel {
        /// The job.
        job: JobId,
    },
    /// Time passed: expire leases and placement timeouts.
    Tick {
        /// The time.
        at: u64,
    },
}

/// What the driver must do after a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEffect {
    /// The worker's session number.
    Registered {
        /// The worker.
        worker: String,
        /// Its session.
        session: u64,
    },
    /// A registration was refused: another worker holds a live session under its name.
    Refused {
        /// The name.
        worker: String,
        /// Why, for both ends' logs.
        reason: String,
    },
    /// Send the job to the worker.
    Assign {
        /// The job.
        job: JobId,
        /// The assignment's epoch.
        epoch: u32,
        /// The worker.
        worker: String,
        /// The worker holds the job's work already: it attaches the job to it.
        adopted: bool,
    },
    /// Tell the worker to stop the job.
    Revoke {
        /// The job.
        job: JobId,
        /// The worker.
        worker: String,
    },
    /// The report is the job's result.
    Accept {
        /// The job.
        job: JobId,
        /// The worker that produced it.
        worker: String,
    },
    /// A report for an assignment that is no longer current: dropped.
    Late {
        /// The job.
        job: JobId,
        /// The reporting worker.
        worker: String,
    },
    /// The job failed without a result.
    Fail {
        /// The job.
        job: JobId,
        /// Why.
        error: String,
    },
    /// The job waits for a worker (said once per wait).
    Waiting {
        /// The job.
        job: JobId,
        /// Why.
        message: String,
    },
    /// A worker was lost; its jobs were requeued or failed.
    Lost {
        /// The worker.
        worker: String,
        /// The session that ended.
        session: u64,
    },
}

struct WorkerEntry {
    info: WorkerInfo,
    session: u64,
    expires: u64,
    last_heartbeat: u64,
    running: BTreeSet<JobId>,
    draining: bool,
    layers: HashSet<Digest>,
}

impl WorkerEntry {
    fn load(&self) -> f64 {
        self.running.len() as f64 / self.info.slots() as f64
    }

    fn has_slot(&self) -> bool {
        !self.draining && self.running.len() < self.info.slots()
    }

    /// Whether it may run the job: its platform, and every entitlement it needs granted.
    fn runs(&self, spec: &JobSpec) -> bool {
        spec.platform.as_ref().is_none_or(|p| self.info.platforms.contains(p))
            && spec.entitlements.iter().all(|e| self.info.entitlements.contains(e))
    }
}

struct Job {
    spec: JobSpec,
    epoch: u32,
    losses: u32,
    assigned: Option<String>,
    queued_at: u64,
    waiting_said: bool,
}

/// The cluster's scheduling state.
#[derive(Default)]
pub struct ClusterState {
    settings: ClusterSettings,
    workers: BTreeMap<String, WorkerEntry>,
    jobs: BTreeMap<JobId, Job>,
    queues: BTreeMap<u64, VecDeque<JobId>>,
    /// The build served last (round-robin).
    cursor: u64,
    sessions: u64,
}

impl ClusterState {
    /// An empty cluster.
    pub fn new(settings: ClusterSettings) -> ClusterState {
        ClusterState { settings, ..ClusterState::default() }
    }

    /// The settings.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Applies one command.
    pub fn apply(&mut self, command: ClusterCommand) -> Vec<ClusterEffect> {
        let mut effects = Vec::new();
        match command {
            ClusterCommand::Register { info, layers, adopt, at } => {
                if let Some(live) = self.workers.get(&info.name) {
                    // The same worker coming back (a restart, a new connection) replaces its old
                    // session; another one under the same name would silently take its place.
                    if live.info.address != info.address {
                        let reason = format!(
                            "a worker named {} is already connected from {} (this one is at {}); worker names must be unique",
                            info.name, live.info.address, info.address
                        );
                        effects.push(ClusterEffect::Refused { worker: info.name, reason });
                        return effects;
                    }
                    self.lose(&info.name.clone(), at, &mut effects);
                }
                self.sessions += 1;
                let name = info.name.clone();
                let entry = WorkerEntry {
                    info,
                    session: self.sessions,
                    expires: at + self.settings.lease_ms,
                    last_heartbeat: at,
                    running: BTreeSet::new(),
                    draining: false,
                    layers: layers.into_iter().collect(),
                };
                self.workers.insert(name.clone(), entry);
                effects.push(ClusterEffect::Registered { worker: name.clone(), session: self.sessions });
                for job in adopt {
                    self.adopt(job, &name, &mut effects);
                }
            }
            ClusterCommand::Heartbeat { worker, session, beat, at } => {
                if let Some(entry) = self.workers.get_mut(&worker).filter(|e| e.session == session) {
                    entry.expires = at + self.settings.lease_ms;
                    entry.last_heartbeat = at;
                    entry.info.free_disk = beat.free_disk;
                    entry.info.cache_bytes = beat.cache_bytes;
                    // A larger capacity places more jobs (below, as every command does).
                    entry.info.capacity = beat.capacity;
                }
            }
            ClusterCommand::Disconnect { worker, session, at } => {
                if self.workers.get(&worker).is_some_and(|e| e.session == session) {
                    self.lose(&worker, at, &mut effects);
                }
            }
            ClusterCommand::Evicted { worker, session, layers } => {
                if let Some(entry) = self.workers.get_mut(&worker).filter(|e| e.session == session) {
                    for layer in &layers {
                        entry.layers.remove(layer);
                    }
                }
            }
            ClusterCommand::Drain { worker, session } => {
                if let Some(entry) = self.workers.get_mut(&worker).filter(|e| e.session == session) {
                    entry.draining = true;
                }
            }
            ClusterCommand::Submit { job, spec, held_by, at } => {
                self.queues.entry(spec.build).or_default().push_back(job);
                self.jobs
                    .insert(job, Job { spec, epoch: 0, losses: 0, assigned: None, queued_at: at, waiting_said: false });
                if let Some(worker) = held_by {
                    self.adopt(job, &worker, &mut effects);
                }
            }
            ClusterCommand::Report { job, epoch, worker, layers } => {
                let current =
                    self.jobs.get(&job).is_some_and(|j| j.epoch == epoch && j.assigned.as_ref() == Some(&worker));
                if current {
                    self.jobs.remove(&job);
                    if let Some(entry) = self.workers.get_mut(&worker) {
                        entry.running.remove(&job);
                        entry.layers.extend(layers.iter().map(|l| l.diff_id));
                    }
                    effects.push(ClusterEffect::Accept { job, worker });
                } else {
                    effects.push(ClusterEffect::Late { job, worker });
                }
            }
            ClusterCommand::Cancel { job } => {
                if let Some(removed) = self.jobs.remove(&job) {
                    match removed.assigned {
                        Some(worker) => {
                            if let Some(entry) = self.workers.get_mut(&worker) {
                                entry.running.remove(&job);
                            }
                            effects.push(ClusterEffect::Revoke { job, worker });
                        }
                        None => self.unqueue(removed.spec.build, job),
                    }
                }
            }
            ClusterCommand::Tick { at } => self.tick(at, &mut effects),
        }
        self.dispatch(&mut effects);
        effects
    }

    /// The connected workers, by name.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.workers
            .values()
            .map(|e| WorkerStatus {
                info: e.info.clone(),
                running: e.running.len(),
                draining: e.draining,
                last_heartbeat: e.last_heartbeat,
                layers: e.layers.len(),
            })
            .collect()
    }

    /// The jobs each worker runs, by worker.
    pub fn running_jobs(&self) -> Vec<(String, JobId)> {
        self.workers.values().flat_map(|e| e.running.iter().map(|job| (e.info.name.clone(), *job))).collect()
    }

    /// The blob addresses of workers holding a layer, `except` the named one.
    pub fn holders(&self, diff_id: &Digest, except: &str) -> Vec<String> {
        self.workers
            .values()
            .filter(|e| e.info.name != except && e.layers.contains(diff_id))
            .map(|e| e.info.address.clone())
            .collect()
    }

    /// The least loaded connected worker holding every one of these layers, if any.
    pub fn holder_of_all(&self, diff_ids: &[Digest]) -> Option<String> {
        self.workers
            .values()
            .filter(|e| diff_ids.iter().all(|d| e.layers.contains(d)))
            .min_by(|a, b| a.load().total_cmp(&b.load()).then_with(|| a.info.name.cmp(&b.info.name)))
            .map(|e| e.info.name.clone())
    }

    /// The name of a connected worker holding a layer (the first by name), if any.
    pub fn holder_name(&self, diff_id: &Digest) -> Option<String> {
        self.workers.values().filter(|e| e.layers.contains(diff_id)).map(|e| e.info.name.clone()).min()
    }

    /// Jobs waiting for a worker.
    pub fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Jobs waiting for a worker and jobs running, per required platform (`None`: any
    /// worker runs it).
    pub fn jobs_by_platform(&self) -> BTreeMap<Option<Platform>, (usize, usize)> {
        let mut counts: BTreeMap<Option<Platform>, (usize, usize)> = BTreeMap::new();
        for job in self.jobs.values() {
            let (queued, running) = counts.entry(job.spec.platform.clone()).or_default();
            match job.assigned {
                Some(_) => *running += 1,
                None => *queued += 1,
            }
        }
        counts
    }

    fn unqueue(&mut self, build: u64, job: JobId) {
        if let Some(queue) = self.queues.get_mut(&build) {
            queue.retain(|j| *j != job);
            if queue.is_empty() {
                self.queues.remove(&build);
            }
        }
    }

    /// Removes a worker; its jobs go back to the front of their builds' queues (with a new
    /// epoch) until their retry budget is spent.
    fn lose(&mut self, worker: &str, at: u64, effects: &mut Vec<ClusterEffect>) {
        let Some(entry) = self.workers.remove(worker) else { return };
        effects.push(ClusterEffect::Lost { worker: worker.to_string(), session: entry.session });
        for job_id in entry.running {
            let Some(job) = self.jobs.get_mut(&job_id) else { continue };
            job.assigned = None;
            job.epoch += 1;
            job.losses += 1;
            job.queued_at = at;
            if job.losses > self.settings.retry_budget {
                let losses = job.losses;
                self.jobs.remove(&job_id);
                effects.push(ClusterEffect::Fail {
                    job: job_id,
                    error: format!("its worker was lost {losses} times (last: {worker}); retry budget spent"),
                });
            } else {
                let build = job.spec.build;
                self.queues.entry(build).or_default().push_front(job_id);
            }
        }
    }

    fn tick(&mut self, at: u64, effects: &mut Vec<ClusterEffect>) {
        let expired: Vec<String> =
            self.workers.values().filter(|e| e.expires <= at).map(|e| e.info.name.clone()).collect();
        for worker in expired {
            self.lose(&worker, at, effects);
        }
        let mut failed = Vec::new();
        for queue in self.queues.values() {
            for job_id in queue {
                let Some(job) = self.jobs.get_mut(job_id) else { continue };
                if self.workers.values().any(|w| !w.draining && w.runs(&job.spec)) {
                    continue;
                }
                let mut wanted =
                    job.spec.platform.as_ref().map_or_else(|| "any platform".to_string(), |p| p.to_string());
                if !job.spec.entitlements.is_empty() {
                    let granting: Vec<&str> = job.spec.entitlements.iter().map(|e| e.as_str()).collect();
                    wanted = format!("{wanted} granting {}", granting.join(", "));
                }
                if at.saturating_sub(job.queued_at) >= self.settings.placement_timeout_ms {
                    let error = format!(
                        "no worker for {wanted} within {} s (connected: {})",
                        self.settings.placement_timeout_ms / 1000,
                        describe_workers(&self.workers)
                    );
                    failed.push((*job_id, job.spec.build, error));
                } else if !job.waiting_said {
                    job.waiting_said = true;
                    let message =
                        format!("waiting for a worker for {wanted} (connected: {})", describe_workers(&self.workers));
                    effects.push(ClusterEffect::Waiting { job: *job_id, message });
                }
            }
        }
        for (job, build, error) in failed {
            self.jobs.remove(&job);
            self.unqueue(build, job);
            effects.push(ClusterEffect::Fail { job, error });
        }
    }

    /// Places queued jobs while workers have free slots, one job per build in turn.
    fn dispatch(&mut self, effects: &mut Vec<ClusterEffect>) {
        loop {
            if self.queues.is_empty() || !self.workers.values().any(WorkerEntry::has_slot) {
                return;
            }
            let order: Vec<u64> = self
                .queues
                .range(self.cursor + 1..)
                .chain(self.queues.range(..=self.cursor))
                .map(|(build, _)| *build)
                .collect();
            let mut placed_any = false;
            for build in order {
                let Some(queue) = self.queues.get(&build) else { continue };
                let found = queue.iter().enumerate().find_map(|(i, job)| {
                    let spec = &self.jobs.get(job)?.spec;
                    self.place(spec).map(|worker| (i, *job, worker))
                });
                let Some((index, job_id, worker)) = found else { continue };
                let queue = self.queues.get_mut(&build).expect("present");
                queue.remove(index);
                if queue.is_empty() {
                    self.queues.remove(&build);
                }
                self.assign(job_id, worker, false, effects);
                self.cursor = build;
                placed_any = true;
                if !self.workers.values().any(WorkerEntry::has_slot) {
                    return;
                }
            }
            if !placed_any {
                return;
            }
        }
    }

    /// Assigns a job taken off its queue to a worker.
    fn assign(&mut self, job_id: JobId, worker: String, adopted: bool, effects: &mut Vec<ClusterEffect>) {
        let job = self.jobs.get_mut(&job_id).expect("queued jobs exist");
        job.assigned = Some(worker.clone());
        job.waiting_said = false;
        self.workers.get_mut(&worker).expect("assigned to a connected worker").running.insert(job_id);
        effects.push(ClusterEffect::Assign { job: job_id, epoch: job.epoch, worker, adopted });
    }

    /// Assigns a queued job to the worker holding its work, when that worker is connected,
    /// not draining and may run it. Its slots do not count: the work runs there already.
    fn adopt(&mut self, job_id: JobId, worker: &str, effects: &mut Vec<ClusterEffect>) {
        let Some(job) = self.jobs.get(&job_id).filter(|j| j.assigned.is_none()) else { return };
        if !self.workers.get(worker).is_some_and(|w| !w.draining && w.runs(&job.spec)) {
            return;
        }
        let build = job.spec.build;
        self.unqueue(build, job_id);
        self.assign(job_id, worker.to_string(), true, effects);
    }

    /// The worker for a job, if one of its platform has a free slot: the one holding the
    /// most input bytes (ties: the less loaded, then the last name) when it holds any and its
    /// load is within the bound, else the least loaded (ties: more input bytes, then the first
    /// name). One pass over the workers, each worker's input bytes computed once.
    fn place(&self, spec: &JobSpec) -> Option<String> {
        // (input bytes held, load, worker) of the most local and of the least loaded candidate.
        let mut most: Option<(u64, f64, &WorkerEntry)> = None;
        let mut least: Option<(u64, f64, &WorkerEntry)> = None;
        for worker in self.workers.values().filter(|w| w.has_slot() && w.runs(spec)) {
            let held: u64 =
                spec.inputs.iter().filter(|l| worker.layers.contains(&l.diff_id)).map(|l| l.size.max(1)).sum();
            let load = worker.load();
            if most.is_none_or(|(h, l, _)| held > h || (held == h && load <= l)) {
                most = Some((held, load, worker));
            }
            if least.is_none_or(|(h, l, _)| load < l || (load == l && held > h)) {
                least = Some((held, load, worker));
            }
        }
        let local = most.filter(|(held, load, _)| *held > 0 && *load <= self.settings.locality_load_bound);
        local.or(least).map(|(_, _, worker)| worker.info.name.clone())
    }
}

fn describe_workers(workers: &BTreeMap<String, WorkerEntry>) -> String {
    if workers.is_empty() {
        return "none".to_string();
    }
    let described: Vec<String> = workers
        .values()
        .map(|w| {
            let platforms: Vec<String> = w.info.platforms.iter().map(|p| p.to_string()).collect();
            format!("{} ({})", w.info.name, platforms.join(", "))
        })
        .collect();
    described.join(", ")
}

#[cfg(test)]
mod tests;
