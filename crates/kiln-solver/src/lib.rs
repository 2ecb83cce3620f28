//! The solver: turns a build graph into executions, once per distinct piece of work.
//!
//! - [`state::SolverState`] is the whole scheduling state (builds, vertex states, the
//!   in-flight table, the cache index) and changes only through [`state::SolverState::apply`],
//!   a deterministic function of [`state::Command`]s that returns [`state::Effect`]s. The
//!   cluster issue replicates exactly these commands.
//! - [`Solver`] is the async driver: it feeds commands to the state, runs the effects through
//!   an [`Executor`] (the one placement interface: a local worker now, remote workers later),
//!   bounds executions with the worker's slots, forwards logs to every waiting build and
//!   persists cache entries.
//!
//! Cache keys: a vertex's key is its digest computed over its inputs' keys instead of their
//! digests. Image sources (and HTTP sources without a checksum) are never served from the
//! cache: they run every build, and their key is pinned by what they resolved to (the image's
//! manifest digest), so a moved tag changes every key below it.

pub mod cluster;
mod driver;
pub mod state;

pub use driver::{BuildHandle, Solver, SolverConfig};
pub use state::{BuildOptions, Status, VertexRecord};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kiln_graph::Vertex;
use kiln_types::Digest;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A boxed future the executor returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a vertex's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The stream.
    pub stream: LogStream,
    /// The text, without newline.
    pub line: String,
}

/// Where an executor sends a vertex's output lines (to every build waiting on the vertex).
#[derive(Clone)]
pub struct LogSink(Arc<dyn Fn(LogLine) -> bool + Send + Sync>);

impl LogSink {
    /// A sink that calls `deliver` for each line; `deliver` says whether anyone still listens.
    pub fn new(deliver: impl Fn(LogLine) -> bool + Send + Sync + 'static) -> LogSink {
        LogSink(Arc::new(deliver))
    }

    /// A sink that forwards into a channel.
    pub fn channel(sender: mpsc::UnboundedSender<LogLine>) -> LogSink {
        LogSink::new(move |line| sender.send(line).is_ok())
    }

    /// Sends one line; `Err` when nobody listens any more.
    pub fn send(&self, line: LogLine) -> Result<(), LogLine> {
        if (self.0)(line.clone()) { Ok(()) } else { Err(line) }
    }
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// What executing a vertex produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed<O> {
    /// The result (a snapshot, on a local worker).
    pub output: O,
    /// For sources that resolve something (an image's manifest digest): what they resolved
    /// to. It pins the cache keys of everything below.
    pub pin: Option<Digest>,
    /// The worker that executed it, when the executor knows better than
    /// [`Executor::worker_name`] (a cluster).
    pub worker: Option<String>,
}

/// Why an execution failed, and on which worker when the executor knows better than
/// [`Executor::worker_name`] (a cluster), so a failed step's record names where it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// What went wrong.
    pub message: String,
    /// The worker it failed on.
    pub worker: Option<String>,
}

impl From<String> for Failed {
    fn from(message: String) -> Failed {
        Failed { message, worker: None }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The thing that executes a vertex: the one placement interface.
pub trait Executor: Send + Sync + 'static {
    /// A vertex result, stored in the cache index.
    type Output: Clone + Send + Sync + Serialize + serde::de::DeserializeOwned + 'static;
    /// Per-build inputs (contexts, secrets) the executor needs.
    type Build: Send + Sync + 'static;

    /// Executes `vertex` over its inputs' outputs. Dropping the future cancels the work.
    fn execute(
        &self,
        vertex: Vertex,
        inputs: Vec<Self::Output>,
        build: Arc<Self::Build>,
        logs: LogSink,
    ) -> BoxFuture<Result<Executed<Self::Output>, Failed>>;

    /// The name of the worker that executes, for records.
    fn worker_name(&self) -> String;

    /// Whether a cached output can still be used as an input (a cluster's layers may have
    /// gone with their worker). A cache hit whose output is gone is executed again.
    fn available(&self, output: &Self::Output) -> bool {
        let _ = output;
        true
    }
}

/// Progress of one build, in order; [`Event::Finished`] is always last.
#[derive(Debug, Clone)]
pub enum Event<O> {
    /// A vertex started executing (for this build or another one it waits on).
    Started {
        /// The vertex.
        vertex: Digest,
        /// Milliseconds since the Unix epoch.
        at: u64,
    },
    /// A line of a vertex's output (replayed for late waiters).
    Log {
        /// The vertex.
        vertex: Digest,
        /// The line.
        line: LogLine,
    },
    /// A vertex finished: executed, cached, deduplicated, or failed.
    Completed {
        /// The vertex's record.
        record: VertexRecord,
        /// The error, when it failed.
        error: Option<String>,
        /// Its result, when it succeeded.
        output: Option<O>,
    },
    /// The build is over: one result per graph output (`None` for an empty image), or the
    /// error; and the record of every vertex.
    Finished(Result<Vec<Option<O>>, String>, Vec<VertexRecord>),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
