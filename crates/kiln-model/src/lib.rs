//! The vocabulary every part of Kiln speaks, below the scheduler and the worker: a vertex's
//! output lines, its record and how it ended, the one build event type that the engine emits,
//! the daemon streams and the client reads, what workers and layers look like to the cluster,
//! and the executor interface that places a vertex.
//!
//! Plain data and one trait; no IO and no async runtime. The wire twins of these types live in
//! `kiln-proto`, with the one conversion both ends use.

mod assignment;
mod auth;
mod cache;
mod disk;
mod entitlement;
mod error;
mod event;
mod executor;
mod history;
mod log;
mod manifest;
mod output;
mod record;
mod request;
mod spec;
mod worker;

pub use assignment::{
    ADOPTION_GRACE_MS, Assignment, FromCoordinator, HeldWork, PushRequest, PushTarget, PushedLayer, Work, work_of,
};
pub use auth::{Caller, ClientToken, DEFAULT_TENANT, Role, TenantPolicy};
pub use cache::{
    CacheCompression, CacheDirection, CacheLocation, CacheMode, CacheSpec, CacheSpecError, DEFAULT_CACHE_NAME,
};
pub use disk::{PruneOptions, PruneReport, RecordKind, UsageRecord};
pub use entitlement::{DefaultNetwork, Entitlement};
pub use error::ErrorKind;
pub use event::BuildEvent;
pub use executor::{BoxFuture, Executed, Executor, Failed};
pub use history::{BuildChange, BuildCounts, BuildEntry, MAX_BUILD_ID, RequestSummary, check_build_id, new_build_id};
pub use log::{LogLine, LogSink, LogStream, MAX_STEP_LINES, StepLog};
pub use manifest::{ContextManifest, ManifestEntry, ManifestError, ManifestKind};
pub use output::{OutputSpec, OutputSpecError};
pub use record::{Phases, Status, UnknownStatus, VertexRecord};
pub use request::{BuildRequest, NamedContext, OversizedRequest, TraceContext, bounds};
pub use spec::spec_fields;
pub use worker::{Beat, JobId, LayerDesc, Layers, RunningStep, TierBlob, WorkerInfo, WorkerStatus};
