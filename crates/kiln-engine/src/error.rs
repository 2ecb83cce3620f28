//! Why a build could not be planned, brought together or exported. A failed build reports
//! the error's message ([`crate::BuildFailure`]); the variants keep the cause.

use std::path::PathBuf;

use kiln_types::Digest;

/// A build's failure outside its steps (a failed step is the solver's record and message).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The `.dockerignore` does not parse.
    #[error(".dockerignore: {0}")]
    Ignore(#[from] kiln_dockerfile::ignore::PatternError),
    /// The context directory could not be walked.
    #[error("reading build context {}: {source}", path.display())]
    Context {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of an uploaded context is not in this daemon's store.
    #[error("build context: {path} ({digest}) was not uploaded")]
    NotUploaded {
        /// The entry.
        path: String,
        /// Its content's digest.
        digest: Digest,
    },
    /// A `target:` named context could not be planned.
    #[error("named context {name}: {source}")]
    NamedContext {
        /// The context's name.
        name: String,
        /// Why its build could not be planned.
        #[source]
        source: Box<BuildError>,
    },
    /// A coordinator was sent a context path.
    #[error("a coordinator builds uploaded contexts only (connect with `kiln --addr`)")]
    LocalContextOnCoordinator,
    /// The Dockerfile does not convert (the message names the file, line and stage).
    #[error(transparent)]
    Frontend(#[from] kiln_dockerfile::FrontendError),
    /// A step needs an entitlement the client did not allow.
    #[error("{vertex}: {flag} needs `--allow {entitlement}`")]
    NotAllowed {
        /// The step.
        vertex: String,
        /// The instruction's flag.
        flag: &'static str,
        /// What it needs.
        entitlement: kiln_model::Entitlement,
    },
    /// A step needs an entitlement no worker grants.
    #[error("{vertex}: {flag}: {entitlement} is not granted by {by} (worker.entitlements in its config)")]
    NotGranted {
        /// The step.
        vertex: String,
        /// The instruction's flag.
        flag: &'static str,
        /// What it needs.
        entitlement: kiln_model::Entitlement,
        /// "this daemon", or "any worker for linux/amd64".
        by: String,
    },
    /// A RUN step is for a platform this daemon does not run.
    #[error("{vertex}: no worker runs {platform} (this one runs {available})")]
    Platform {
        /// The step.
        vertex: String,
        /// Its platform.
        platform: String,
        /// The platforms this daemon runs, comma-separated.
        available: String,
    },
    /// A step would stack more layers than one overlay mount takes.
    #[error(
        "{vertex}: its filesystem would stack {depth} layers, more than the {max} one overlay mount takes \
         (combine steps or start from a flattened image)",
        max = kiln_layer::MAX_LAYERS
    )]
    TooDeep {
        /// The step, with its line.
        vertex: String,
        /// The layers it would mount.
        depth: usize,
    },
    /// A cache export failed (the message names the cache).
    #[error(transparent)]
    Cache(#[from] kiln_cache::CacheError),
    /// A `type=local` cache from a client whose directory the daemon cannot serve.
    #[error(
        "cache {0}: type=local caches are for clients on the daemon's own machine (the embedded default); \
         use type=registry or type=s3"
    )]
    LocalCache(String),
    /// A registry failed (resolving a base, pulling its blobs, pushing).
    #[error(transparent)]
    Registry(#[from] kiln_registry::RegistryError),
    /// An image archive could not be written.
    #[error(transparent)]
    Archive(#[from] kiln_registry::ArchiveError),
    /// An image config could not be encoded.
    #[error("encoding the image config: {0}")]
    Config(#[from] serde_json::Error),
    /// An image document could not be stored.
    #[error(transparent)]
    Cas(#[from] kiln_cas::CasError),
    /// An `--output name=` that is not an image reference.
    #[error("--output name={name}: {source}")]
    OutputName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: kiln_types::ReferenceError,
    },
    /// `SOURCE_DATE_EPOCH` that is not a number of seconds.
    #[error("SOURCE_DATE_EPOCH={0} is not a number of seconds")]
    SourceDateEpoch(String),
    /// `type=tar` was asked for several platforms.
    #[error("type=tar holds one platform; use type=local for several")]
    TarMultiPlatform,
    /// The spool or an export file could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The build's results could not be brought here or exported (naming the layer or path).
    #[error(transparent)]
    Store(#[from] kiln_worker::StoreError),
    /// A result went with its worker and could not be made again.
    #[error(transparent)]
    Lost(#[from] kiln_model::Failed),
    /// The metadata store failed (flushing the cache index, looking up uploads).
    #[error("the metadata store: {0}")]
    Metadata(#[from] kiln_kv::KvError),
    /// A task of the build died.
    #[error("a build task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
