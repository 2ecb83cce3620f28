//! Kiln's operations surface: the process's metrics ([`metrics()`], Prometheus text) and the
//! HTTP endpoints a daemon serves on `metrics-listen` ([`serve`]): `/metrics`, `/healthz`,
//! `/readyz` and `/v1/queue` (the queue per platform and pool, for KEDA's `metrics-api`
//! trigger); and traces over OTLP ([`otlp_layer`]): a build, its vertices and their phases.

mod http;
mod metrics;
mod traces;

pub use http::{Probe, serve};
pub use metrics::{
    BuildStatus, Direction, Metrics, Outcome, Phase, PlatformLoad, PoolLoad, RaftState, State, Tier, Transfer, metrics,
};
pub use traces::{TRACE_TARGET, Traces, context_of, otlp_layer, phase_span, set_parent};

/// The platform key of vertices any worker may run (context sources).
pub const ANY_PLATFORM: &str = "any";

/// The worker label that names a worker's pool (`/v1/queue` reports per pool).
pub const POOL_LABEL: &str = "pool";
