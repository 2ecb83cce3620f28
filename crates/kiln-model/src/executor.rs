//! The one placement interface: the thing that executes a vertex.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kiln_graph::Vertex;
use kiln_types::Digest;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::LogSink;

/// A boxed future the executor returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

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
    /// Set when the result was imported from a cache rather than executed: which one
    /// (`registry:REF`, `s3:BUCKET/NAME`, `local:DIR`, `shared`).
    pub cache_source: Option<String>,
    /// Where the execution's time went, as far as the executor measured it.
    pub phases: crate::Phases,
}

impl<O> Executed<O> {
    /// An executed result (no pin, worker, cache source or phases).
    pub fn new(output: O) -> Executed<O> {
        Executed { output, pin: None, worker: None, cache_source: None, phases: crate::Phases::default() }
    }
}

/// Why an execution failed, and on which worker when the executor knows better than
/// [`Executor::worker_name`] (a cluster), so a failed step's record names where it ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if *lost_input { Failed::LOST_INPUT } else { "" })]
pub struct Failed {
    /// What went wrong.
    pub message: String,
    /// The worker it failed on.
    pub worker: Option<String>,
    /// An input's layers could not be fetched (they went with their worker): the step itself
    /// did not fail, and a cluster recomputes the input and places the step again.
    pub lost_input: bool,
}

impl Failed {
    /// How a lost input's message starts when shown (and how workers before the
    /// `lost_input` flag marked one).
    pub const LOST_INPUT: &str = "lost input: ";

    /// A step whose input was lost (see [`Failed::lost_input`]).
    pub fn lost_input(message: impl Into<String>) -> Failed {
        Failed { message: message.into(), worker: None, lost_input: true }
    }

    /// The same failure, on `worker`.
    pub fn on(self, worker: impl Into<String>) -> Failed {
        Failed { worker: Some(worker.into()), ..self }
    }
}

impl From<String> for Failed {
    fn from(message: String) -> Failed {
        Failed { message, worker: None, lost_input: false }
    }
}

/// The thing that executes a vertex: the one placement interface.
pub trait Executor: Send + Sync + 'static {
    /// A vertex result, stored in the cache index.
    type Output: Clone + Send + Sync + Serialize + DeserializeOwned + 'static;
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
    ///
    /// The answer is where the output is used from, as records' `cache_source` says it
    /// (`local` by default; a cluster names a worker or the shared tier), `None` when it is
    /// gone. From then on the output is kept for `build` (a worker's garbage collection
    /// leaves it alone until the build ends).
    fn available(&self, output: &Self::Output, build: &Arc<Self::Build>) -> Option<String> {
        let _ = (output, build);
        Some("local".into())
    }

    /// The result of `vertex` (cache key `key`, over `inputs`) from a cache the build
    /// imports, made usable, with [`Executed::cache_source`] set; `None` when no imported
    /// cache has the key. An error is a miss: the vertex is executed instead, after a warning
    /// in its log.
    fn import(
        &self,
        key: &Digest,
        vertex: &Vertex,
        inputs: &[Self::Output],
        build: &Arc<Self::Build>,
    ) -> Option<BoxFuture<Result<Executed<Self::Output>, String>>> {
        let _ = (key, vertex, inputs, build);
        None
    }

    /// Whether `build` imports any cache (so that [`Executor::import`] answering `None` is
    /// a miss, counted in the metrics).
    fn imports_caches(&self, build: &Arc<Self::Build>) -> bool {
        let _ = build;
        false
    }
}
