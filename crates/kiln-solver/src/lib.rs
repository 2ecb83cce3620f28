//! The solver: turns a build graph into executions, once per distinct piece of work.
//!
//! - [`state::SolverState`] is the whole scheduling state (builds, vertex states, the
//!   in-flight table, the cache index) and changes only through [`state::SolverState::apply`],
//!   a deterministic function of [`state::Command`]s that returns [`state::Effect`]s. The
//!   replicated coordinator will log exactly these commands.
//! - [`Solver`] is the async driver: it feeds commands to the state, runs the effects through
//!   an [`Executor`](kiln_model::Executor) (the one placement interface: the local worker's,
//!   or `kiln-cluster`'s for remote workers),
//!   bounds executions with the worker's slots, forwards logs to every waiting build and
//!   persists cache entries.
//!
//! Cache keys: a vertex's key is its digest computed over its inputs' keys instead of their
//! digests. Image sources (and HTTP sources without a checksum) are never served from the
//! cache: they run every build, and their key is pinned by what they resolved to (the image's
//! manifest digest), so a moved tag changes every key below it.

pub mod admission;
mod driver;
pub mod state;

pub use admission::Parallelism;
pub use driver::{BuildHandle, CACHE_TREE, Durable, Solver, SolverConfig};
pub use state::BuildOptions;

use kiln_model::{BuildEvent, VertexRecord};
use kiln_types::Digest;

/// What the solver tells a build's follower, in order; [`Event::Finished`] is always last.
#[derive(Debug, Clone)]
pub enum Event<O> {
    /// Progress for the build's watchers: [`BuildEvent::Started`], [`BuildEvent::Log`] and
    /// [`BuildEvent::Completed`] (for this build's vertices, also those it waits on in others).
    Progress(BuildEvent),
    /// A vertex's result, sent right before its [`BuildEvent::Completed`].
    Output {
        /// The vertex.
        vertex: Digest,
        /// Its cache key (what a cache export records it under).
        key: Digest,
        /// Its result.
        output: O,
    },
    /// The build is over: one result per graph output (`None` for an empty image), or the
    /// error; and the record of every vertex. The error is the message the build reports,
    /// already naming the vertex (and worker) it came from: what failed is in the records.
    Finished(Result<Vec<Option<O>>, String>, Vec<VertexRecord>),
}
