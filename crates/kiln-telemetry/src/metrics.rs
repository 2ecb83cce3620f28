//! The process's metrics, under the names docs/operations.md lists.
//!
//! Events are counted where they happen, through [`metrics()`] (one registry per process, as
//! Prometheus clients keep it): builds and vertices as they end, phases and dispatches as they
//! are measured, bytes as they move, garbage collections as they run. What describes the
//! current state (queues, workers, slots, raft) is read on each scrape from a [`State`] the
//! daemon's [`crate::Probe`] gives. Every label value comes from a closed set (the enums here,
//! platform and pool names): no build id or digest is ever a label.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;

/// How a build ended (`kiln_builds_total{status}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStatus {
    /// It produced its outputs.
    Succeeded,
    /// A step or an export failed.
    Failed,
    /// Its client cancelled it, or the daemon ended it.
    Cancelled,
}

impl BuildStatus {
    const ALL: [BuildStatus; 3] = [BuildStatus::Succeeded, BuildStatus::Failed, BuildStatus::Cancelled];

    fn label(self) -> &'static str {
        match self {
            BuildStatus::Succeeded => "succeeded",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        }
    }
}

/// How a vertex of a build ended (`kiln_vertices_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Executed for this build.
    Executed,
    /// Its result came from a cache.
    Cached,
    /// Another build's execution of it was used.
    Deduplicated,
    /// It failed.
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Executed, Outcome::Cached, Outcome::Deduplicated, Outcome::Failed];

    fn label(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::Cached => "cached",
            Outcome::Deduplicated => "deduplicated",
            Outcome::Failed => "failed",
        }
    }
}

/// A phase of a vertex's execution (`kiln_vertex_phase_seconds{phase}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Ready, waiting for a worker slot.
    Queue,
    /// Fetching its inputs on the worker (layers from peers or the shared tier, context files).
    Fetch,
    /// Running the step.
    Execute,
    /// Turning its result into layer blobs.
    Export,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 4] = [Phase::Queue, Phase::Fetch, Phase::Execute, Phase::Export];

    /// The label (and span) name.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Queue => "queue",
            Phase::Fetch => "fetch",
            Phase::Execute => "execute",
            Phase::Export => "export",
        }
    }
}

/// A cache tier (`kiln_cache_bytes{tier}`, `kiln_cache_lookups_total{tier}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// This daemon's own store (a worker's; a coordinator's uploads and exports).
    Local,
    /// The shared tier (registry or S3) and the caches builds import.
    Shared,
}

impl Tier {
    const ALL: [Tier; 2] = [Tier::Local, Tier::Shared];

    fn label(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Shared => "shared",
        }
    }
}

/// Where bytes moved (`kiln_transfer_bytes_total{kind}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transfer {
    /// Between nodes of the cluster (layers and context files).
    Peer,
    /// To or from a shared cache.
    Shared,
    /// To or from an image registry (base image pulls, image pushes).
    Registry,
}

impl Transfer {
    const ALL: [Transfer; 3] = [Transfer::Peer, Transfer::Shared, Transfer::Registry];

    fn label(self) -> &'static str {
        match self {
            Transfer::Peer => "peer",
            Transfer::Shared => "shared",
            Transfer::Registry => "registry",
        }
    }
}

/// Which way bytes moved, seen from this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Received.
    In,
    /// Sent.
    Out,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// The load of one platform, as a coordinator sees it (or a standalone daemon's own worker).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlatformLoad {
    /// Vertices ready but waiting for a worker slot: the autoscaling signal.
    pub queued: u64,
    /// Vertices running.
    pub running: u64,
    /// Workers of the platform taking work.
    pub workers: u64,
    /// Workers of the platform finishing their work before they stop.
    pub draining: u64,
    /// Slots of those workers in use.
    pub slots_busy: u64,
    /// Slots of those workers free.
    pub slots_free: u64,
}

/// The load of a pool of workers (workers labelled `pool=NAME`), for one autoscaler each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolLoad {
    /// The platforms its workers run.
    pub platforms: Vec<String>,
    /// Vertices queued for any of those platforms (every pool of a platform sees them).
    pub queued: u64,
    /// Vertices running on its workers.
    pub running: u64,
    /// Its workers taking work.
    pub workers: u64,
    /// Their slots.
    pub slots: u64,
    /// `queued + running`: with a target of one worker's slots, the workers it needs.
    pub demand: u64,
}

/// The replicated log, as this member sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RaftState {
    /// The current term.
    pub term: u64,
    /// Whether this member leads.
    pub leader: bool,
    /// The highest committed index.
    pub commit: u64,
}

/// The daemon's state at one moment: what the gauges show and `/v1/queue` serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct State {
    /// Per platform (`any` for vertices any worker runs).
    pub platforms: BTreeMap<String, PlatformLoad>,
    /// Per worker pool.
    pub pools: BTreeMap<String, PoolLoad>,
    /// Builds running.
    #[serde(skip)]
    pub builds_running: u64,
    /// Builds admitted and waiting to start (a new leader taking over).
    #[serde(skip)]
    pub builds_queued: u64,
    /// Bytes of layers in the shared tier this coordinator knows of.
    #[serde(skip)]
    pub shared_cache_bytes: Option<u64>,
    /// The replicated log, on a replicated coordinator.
    #[serde(skip)]
    pub raft: Option<RaftState>,
}

/// The process's metric families.
pub struct Metrics {
    registry: Registry,
    queue_depth: IntGaugeVec,
    pool_demand: IntGaugeVec,
    builds: IntGaugeVec,
    builds_total: IntCounterVec,
    vertices_total: IntCounterVec,
    vertex_phase: HistogramVec,
    dispatch_latency: Histogram,
    workers: IntGaugeVec,
    worker_slots: IntGaugeVec,
    cache_bytes: IntGaugeVec,
    cache_lookups: IntCounterVec,
    transfer_bytes: IntCounterVec,
    raft_term: IntGauge,
    raft_is_leader: IntGauge,
    raft_commit_index: IntGauge,
    gc_runs: IntCounter,
    gc_reclaimed: IntCounter,
    /// The platform series shown so far: a platform that goes away reads 0 rather than
    /// vanishing.
    platforms_seen: std::sync::Mutex<Seen>,
}

/// The platform series shown so far.
#[derive(Default)]
struct Seen {
    /// Platforms shown under their name.
    platforms: std::collections::BTreeSet<String>,
    /// Whether `other` was shown.
    other: bool,
}

/// Platform series at most, of platforms no worker runs: those come from builds' requests (a
/// job for a platform no worker runs waits in the queue), so past this many the rest are
/// summed as `other`. A platform a worker runs is always shown.
const MAX_PLATFORM_SERIES: usize = 32;

/// The label of the platforms past [`MAX_PLATFORM_SERIES`].
const OTHER_PLATFORMS: &str = "other";

/// Step times: from a few milliseconds (a cached file copy) to an hour (a compiler).
const PHASE_BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0, 3600.0];

/// Dispatch overheads: sub-millisecond on loopback, tens of milliseconds across a busy network.
const DISPATCH_BUCKETS: [f64; 12] = [0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

impl State {
    /// The load of the pool `name` whose workers run `platforms` (none given: those of its
    /// connected workers): the vertices queued for those platforms, and what its connected
    /// workers run and offer (nothing when it has none: a pool scaled to zero still sees its
    /// queue). Vertices any worker may run count for a pool with workers, and for every pool
    /// when no worker at all is connected (something has to wake up for them), never to wake
    /// one pool while another runs.
    pub fn pool(&self, name: &str, platforms: &[String]) -> PoolLoad {
        let connected = self.pools.get(name).cloned().unwrap_or_default();
        let platforms = if platforms.is_empty() { connected.platforms.clone() } else { platforms.to_vec() };
        let anyone = self.platforms.values().any(|load| load.workers > 0);
        let any = connected.workers > 0 || !anyone;
        let queued = self
            .platforms
            .iter()
            .filter(|(platform, _)| if *platform == crate::ANY_PLATFORM { any } else { platforms.contains(platform) })
            .map(|(_, load)| load.queued)
            .sum();
        let running = connected.running;
        PoolLoad { platforms, queued, demand: queued + running, ..connected }
    }
}

/// The metrics of this process.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
            registry.register(Box::new(metric.clone())).expect("metric names are unique");
            metric
        }
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"))
        };
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help).expect("valid gauge"));
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help).expect("valid counter"));
        let metrics = Metrics {
            queue_depth: gauges(
                "kiln_queue_depth",
                "Vertices ready but waiting for a worker slot, per platform",
                &["platform"],
            ),
            pool_demand: gauges(
                "kiln_pool_demand",
                "Vertices queued for a worker pool's platforms plus those running on it, per pool",
                &["pool"],
            ),
            builds: gauges("kiln_builds", "Builds running or queued on this daemon", &["state"]),
            builds_total: counters("kiln_builds_total", "Builds ended, by status", &["status"]),
            vertices_total: counters("kiln_vertices_total", "Vertices of builds ended, by outcome", &["outcome"]),
            vertex_phase: register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new("kiln_vertex_phase_seconds", "Time executed vertices spent in each phase")
                        .buckets(PHASE_BUCKETS.to_vec()),
                    &["phase"],
                )
                .expect("valid histogram"),
            ),
            dispatch_latency: register(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kiln_dispatch_latency_seconds",
                        "A job's round trip to its worker beyond the worker's own time (assignment, result, transit)",
                    )
                    .buckets(DISPATCH_BUCKETS.to_vec()),
                )
                .expect("valid histogram"),
            ),
            workers: gauges("kiln_workers", "Connected workers, per platform and state", &["platform", "state"]),
            worker_slots: gauges(
                "kiln_worker_slots",
                "Execution slots of connected workers, per platform and state",
                &["platform", "state"],
            ),
            cache_bytes: gauges("kiln_cache_bytes", "Bytes held by each cache tier", &["tier"]),
            cache_lookups: counters(
                "kiln_cache_lookups_total",
                "Cache lookups, by tier and result",
                &["tier", "result"],
            ),
            transfer_bytes: counters(
                "kiln_transfer_bytes_total",
                "Bytes moved between nodes, to and from shared caches and registries",
                &["kind", "direction"],
            ),
            raft_term: gauge("kiln_raft_term", "The replicated log's current term"),
            raft_is_leader: gauge("kiln_raft_is_leader", "1 while this coordinator leads"),
            raft_commit_index: gauge("kiln_raft_commit_index", "The replicated log's highest committed index"),
            gc_runs: counter("kiln_gc_runs_total", "Garbage collections and prunes that removed something"),
            gc_reclaimed: counter("kiln_gc_reclaimed_bytes_total", "Bytes garbage collections and prunes removed"),
            registry,
            platforms_seen: std::sync::Mutex::default(),
        };
        // Every series of a closed label set exists from the start (at zero), so rates and
        // alerts work before the first event.
        for status in BuildStatus::ALL {
            metrics.builds_total.with_label_values(&[status.label()]);
        }
        for outcome in Outcome::ALL {
            metrics.vertices_total.with_label_values(&[outcome.label()]);
        }
        for tier in Tier::ALL {
            for result in ["hit", "miss"] {
                metrics.cache_lookups.with_label_values(&[tier.label(), result]);
            }
        }
        for kind in Transfer::ALL {
            for direction in [Direction::In, Direction::Out] {
                metrics.transfer_bytes.with_label_values(&[kind.label(), direction.label()]);
            }
        }
        for phase in Phase::ALL {
            metrics.vertex_phase.with_label_values(&[phase.label()]);
        }
        for state in ["running", "queued"] {
            metrics.builds.with_label_values(&[state]);
        }
        metrics
    }

    /// A build ended.
    pub fn build_ended(&self, status: BuildStatus) {
        self.builds_total.with_label_values(&[status.label()]).inc();
    }

    /// `count` vertices of a build ended with `outcome`.
    pub fn vertices_ended(&self, outcome: Outcome, count: u64) {
        self.vertices_total.with_label_values(&[outcome.label()]).inc_by(count);
    }

    /// An executed vertex spent `time` in `phase`.
    pub fn phase(&self, phase: Phase, time: Duration) {
        self.vertex_phase.with_label_values(&[phase.label()]).observe(time.as_secs_f64());
    }

    /// A job's round trip to its worker took `overhead` beyond the worker's own time.
    pub fn dispatched(&self, overhead: Duration) {
        self.dispatch_latency.observe(overhead.as_secs_f64());
    }

    /// A cache of `tier` was asked for a result.
    pub fn cache_lookup(&self, tier: Tier, hit: bool) {
        self.cache_lookups.with_label_values(&[tier.label(), if hit { "hit" } else { "miss" }]).inc();
    }

    /// `bytes` moved.
    pub fn transferred(&self, kind: Transfer, direction: Direction, bytes: u64) {
        self.transfer_bytes.with_label_values(&[kind.label(), direction.label()]).inc_by(bytes);
    }

    /// A garbage collection or prune ran and removed `records` records of `reclaimed` bytes,
    /// leaving `used` bytes in the local store. (A worker looks after every job; only a look
    /// that removed something counts as a run.)
    pub fn collected(&self, records: u64, reclaimed: u64, used: u64) {
        if records > 0 {
            self.gc_runs.inc();
        }
        self.gc_reclaimed.inc_by(reclaimed);
        self.cache_bytes.with_label_values(&[Tier::Local.label()]).set(saturate(used));
    }

    /// Shows `state` in the gauges.
    ///
    /// A platform shown once stays, at 0 when gone (an alert on no ready workers fires). A
    /// platform some worker runs is always shown; of the others (platforms only requested),
    /// while fewer than [`MAX_PLATFORM_SERIES`] are shown, the rest summed as `other`. A
    /// pool's demand is shown while it has workers (for a pool without, the queue of its
    /// platforms is the signal).
    pub fn show(&self, state: &State) {
        let mut seen = self.platforms_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut series: BTreeMap<String, PlatformLoad> =
            seen.platforms.iter().map(|p| (p.clone(), PlatformLoad::default())).collect();
        if seen.other {
            series.insert(OTHER_PLATFORMS.to_string(), PlatformLoad::default());
        }
        for (platform, load) in &state.platforms {
            let served = load.workers + load.draining > 0;
            let room = seen.platforms.len() < MAX_PLATFORM_SERIES - 1;
            let label = if served || room || seen.platforms.contains(platform) {
                seen.platforms.insert(platform.clone());
                platform.clone()
            } else {
                seen.other = true;
                OTHER_PLATFORMS.to_string()
            };
            let shown = series.entry(label).or_default();
            shown.queued += load.queued;
            shown.workers += load.workers;
            shown.draining += load.draining;
            shown.slots_busy += load.slots_busy;
            shown.slots_free += load.slots_free;
        }
        drop(seen);
        for (platform, load) in &series {
            self.queue_depth.with_label_values(&[platform.as_str()]).set(saturate(load.queued));
            if platform == crate::ANY_PLATFORM {
                continue;
            }
            self.workers.with_label_values(&[platform.as_str(), "ready"]).set(saturate(load.workers));
            self.workers.with_label_values(&[platform.as_str(), "draining"]).set(saturate(load.draining));
            self.worker_slots.with_label_values(&[platform.as_str(), "busy"]).set(saturate(load.slots_busy));
            self.worker_slots.with_label_values(&[platform.as_str(), "free"]).set(saturate(load.slots_free));
        }
        self.pool_demand.reset();
        for (pool, load) in &state.pools {
            self.pool_demand.with_label_values(&[pool.as_str()]).set(saturate(load.demand));
        }
        self.builds.with_label_values(&["running"]).set(saturate(state.builds_running));
        self.builds.with_label_values(&["queued"]).set(saturate(state.builds_queued));
        if let Some(bytes) = state.shared_cache_bytes {
            self.cache_bytes.with_label_values(&[Tier::Shared.label()]).set(saturate(bytes));
        }
        if let Some(raft) = state.raft {
            self.raft_term.set(saturate(raft.term));
            self.raft_is_leader.set(i64::from(raft.leader));
            self.raft_commit_index.set(saturate(raft.commit));
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every family.
    pub fn encode(&self) -> String {
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text).expect("encoding into memory cannot fail");
        String::from_utf8(text).expect("the text format is UTF-8")
    }
}

fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queued: u64, workers: u64) -> PlatformLoad {
        PlatformLoad { queued, workers, ..PlatformLoad::default() }
    }

    #[test]
    fn work_for_any_worker_wakes_no_idle_pool_while_another_runs() {
        let amd =
            PoolLoad { platforms: vec!["linux/amd64".into()], workers: 1, slots: 4, running: 1, ..PoolLoad::default() };
        let mut state = State {
            platforms: [("linux/amd64".to_string(), load(3, 1)), (crate::ANY_PLATFORM.to_string(), load(2, 0))].into(),
            pools: [("amd".to_string(), amd)].into(),
            ..State::default()
        };
        let amd = state.pool("amd", &[]);
        assert_eq!((amd.platforms.as_slice(), amd.queued, amd.demand), (["linux/amd64".to_string()].as_slice(), 5, 6));
        assert_eq!(state.pool("arm", &["linux/arm64".into()]).demand, 0, "an idle pool stays idle");
        // Nobody connected: every pool sees the work any worker may take.
        state.platforms.get_mut("linux/amd64").unwrap().workers = 0;
        state.pools.clear();
        assert_eq!(state.pool("arm", &["linux/arm64".into()]).queued, 2);
    }

    #[test]
    fn platform_series_are_bounded_and_stay_at_zero_once_gone() {
        let metrics = Metrics::new();
        let mut platforms: BTreeMap<String, PlatformLoad> =
            (0..40).map(|i| (format!("linux/arch{i:02}"), load(1, u64::from(i == 39)))).collect();
        metrics.show(&State { platforms: platforms.clone(), ..State::default() });
        let text = metrics.encode();
        let series = text.lines().filter(|l| l.starts_with("kiln_queue_depth{")).count();
        // 31 requested platforms by name, the one a worker runs, and `other` for the 8 left.
        assert_eq!(series, MAX_PLATFORM_SERIES + 1, "{text}");
        assert!(text.contains("kiln_queue_depth{platform=\"other\"} 8"), "{text}");
        // The platform with a worker is never folded away.
        assert!(text.contains("kiln_workers{platform=\"linux/arch39\",state=\"ready\"} 1"), "{text}");
        platforms.remove("linux/arch39");
        // Past the cap, a platform a worker runs is still shown under its name.
        platforms.insert("linux/late".into(), load(0, 1));
        let requested_only: Vec<String> = platforms.keys().filter(|p| p.starts_with("linux/arch3")).cloned().collect();
        for platform in requested_only {
            platforms.remove(&platform);
        }
        metrics.show(&State { platforms, ..State::default() });
        let text = metrics.encode();
        assert!(text.contains("kiln_workers{platform=\"linux/arch39\",state=\"ready\"} 0"), "{text}");
        assert!(text.contains("kiln_queue_depth{platform=\"linux/arch39\"} 0"), "{text}");
        assert!(text.contains("kiln_workers{platform=\"linux/late\",state=\"ready\"} 1"), "{text}");
        // What was summed as `other` has gone: it reads 0.
        assert!(text.contains("kiln_queue_depth{platform=\"other\"} 0"), "{text}");
    }
}
