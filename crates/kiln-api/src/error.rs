//! The services' errors, each of one [`ErrorKind`], answered as the status
//! [`kiln_proto::status`] maps it to: the one place a kind becomes a gRPC code.

use kiln_model::ErrorKind;
use kiln_proto::convert::WireError;
use kiln_types::Digest;
use tonic::Status;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request does not make sense (a bad digest, platform, output or manifest).
    #[error(transparent)]
    Malformed(#[from] WireError),
    /// A worker session must start by registering.
    #[error("a worker session starts with Register")]
    NotRegistered,
    /// The cluster refused a registration (a name already in use).
    #[error("{0}")]
    RegistrationRefused(String),
    /// A build over TCP named a context path on the daemon's own host.
    #[error(
        "a daemon reads a build context from its own filesystem only for clients on its unix socket; \
         over TCP the client uploads the context (kiln --addr does)"
    )]
    LocalContextOverTcp,
    /// An upload's first chunk did not name its blob.
    #[error("an upload starts with a chunk naming its digest")]
    UploadWithoutDigest,
    /// An uploaded blob was not what its digest said, or could not be stored.
    #[error("upload {digest}: {reason}")]
    Upload {
        /// The blob.
        digest: Digest,
        /// What went wrong.
        reason: String,
        /// Whether the sender's bytes were at fault (else the store).
        sender_at_fault: bool,
    },
    /// An upload stopped sending.
    #[error("upload stalled: nothing received for {seconds} s")]
    UploadStalled {
        /// The idle limit it exceeded.
        seconds: f32,
    },
    /// The blob store failed.
    #[error("{what}: {source}")]
    Store {
        /// What it was doing.
        what: String,
        /// Why.
        #[source]
        source: kiln_cas::CasError,
    },
    /// The coordinator ended a worker's session: the worker registers again.
    #[error("{0}")]
    SessionEnded(String),
    /// A stored blob could not be read.
    #[error("blob {digest}: {source}")]
    Read {
        /// The blob.
        digest: Digest,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No such blob here.
    #[error("no blob {0}")]
    NoBlob(Digest),
    /// A task of the service died.
    #[error("a service task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Listing or pruning the worker's store failed (the message names the path or blob).
    #[error("the worker's store: {0}")]
    Storage(String),
    /// The daemon has no store of records to list or prune (a coordinator without a cluster).
    #[error("this daemon has no worker store")]
    NoStore,
    /// A client request without a token, where the daemon has tokens.
    #[error("this daemon needs a token: pass --token TOKEN or set KILN_TOKEN")]
    NoToken,
    /// A token the daemon does not know (or an `authorization` header that is not one).
    #[error("the daemon knows no such token: check --token or KILN_TOKEN")]
    UnknownToken,
    /// A caller whose role does not allow the request.
    #[error("{action} needs an admin token; the token {token:?} has the role {role}")]
    NotAdmin {
        /// What was asked.
        action: &'static str,
        /// The caller's token.
        token: String,
        /// Its role.
        role: kiln_model::Role,
    },
    /// A read-only token asked for more than reading.
    #[error("{action} needs a build or admin token; the token {token:?} may only read")]
    ReadOnly {
        /// What was asked.
        action: &'static str,
        /// The caller's token.
        token: String,
    },
    /// A node service called without a certificate from the cluster's CA.
    #[error(
        "{0} takes only nodes of the cluster: connect with a certificate signed by its CA ([tls] in kilnd's config)"
    )]
    NotANode(&'static str),
    /// An upload that would take the tenant's stored contexts over `max-stored`.
    #[error(
        "tenant {tenant:?} may keep at most {limit} bytes of uploaded contexts (max-stored); with this upload it \
         would keep {size}: wait for garbage collection or ask an admin to prune"
    )]
    StoredTooMuch {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: u64,
        /// What it would keep.
        size: u64,
    },
    /// A token or a connection over its request rate.
    #[error("{who}: over {per_second} requests per second (bursts of {burst}): slow down and retry")]
    RateLimited {
        /// The token or the connection.
        who: String,
        /// The sustained rate.
        per_second: u32,
        /// The burst.
        burst: u32,
    },
    /// A tenant at its `max-builds`.
    #[error("tenant {tenant:?} has {limit} builds in progress, its limit (max-builds): wait for one to finish")]
    TooManyBuilds {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: usize,
    },
    /// A build whose graph would take its tenant over `max-queued-vertices`.
    #[error(
        "tenant {tenant:?} has {queued} vertices in progress and this build plans {asked}, over its limit of {limit} \
         (max-queued-vertices)"
    )]
    TooManyVertices {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: usize,
        /// Vertices of its other builds.
        queued: usize,
        /// This build's.
        asked: usize,
    },
    /// A context or an upload over the tenant's `max-upload`.
    #[error("tenant {tenant:?} may upload at most {limit} bytes per build (max-upload); this context has {size}")]
    UploadTooLarge {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: u64,
        /// What was sent or declared.
        size: u64,
    },
    /// A replicated coordinator that does not lead (the leader's URL when it knows one).
    #[error("this coordinator is not the leader: {}", leader.as_deref().map_or("no leader is elected yet, try again".to_string(), |url| format!("the leader is {url}")))]
    NotLeader {
        /// The leader's URL.
        leader: Option<String>,
    },
    /// The replicated log failed (stopped, or could not confirm a read).
    #[error("the replicated log: {0}")]
    Replication(String),
    /// A new build under an id the history has already.
    #[error("build {0}: a build with this id exists already (a client reattaching sends its attempt)")]
    BuildExists(String),
    /// A reattachment whose request is not the recorded build's.
    #[error("build {0}: a reattachment must send the request of the build it reattaches to, and this one differs")]
    NotTheSameBuild(String),
    /// No build of the caller's with this id in the history.
    #[error("build {0}: not in the history")]
    NoSuchBuild(String),
    /// A build that has not ended cannot be removed.
    #[error("build {0}: still running (remove it once it ended)")]
    BuildRunning(String),
    /// The build history could not be read or written.
    #[error("the build history: {0}")]
    History(String),
    /// A raft message from a node whose certificate is not valid for the member it claims to be.
    #[error("raft member {member}: the sender's certificate is not valid for {host}")]
    NotThatMember {
        /// The member claimed.
        member: u64,
        /// Its host in `peers`.
        host: String,
    },
    /// A worker registering under a name its certificate is not valid for.
    #[error("worker {name:?}: its certificate is not valid for that name (a worker's name is its certificate's)")]
    NotThatWorker {
        /// The name it claimed.
        name: String,
    },
}

impl ApiError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Malformed(_) | ApiError::NotRegistered | ApiError::UploadWithoutDigest => ErrorKind::BadRequest,
            ApiError::Upload { sender_at_fault: true, .. } => ErrorKind::BadRequest,
            ApiError::RegistrationRefused(_) | ApiError::BuildExists(_) | ApiError::NotTheSameBuild(_) => {
                ErrorKind::Conflict
            }
            ApiError::LocalContextOverTcp => ErrorKind::Refused,
            ApiError::UploadStalled { .. } => ErrorKind::TimedOut,
            ApiError::SessionEnded(_) | ApiError::NotLeader { .. } | ApiError::Replication(_) => ErrorKind::Unavailable,
            ApiError::NoBlob(_) | ApiError::NoSuchBuild(_) => ErrorKind::NotFound,
            ApiError::BuildRunning(_) => ErrorKind::Conflict,
            ApiError::Upload { sender_at_fault: false, .. }
            | ApiError::Store { .. }
            | ApiError::Read { .. }
            | ApiError::Task(_)
            | ApiError::History(_)
            | ApiError::Storage(_) => ErrorKind::Internal,
            ApiError::NoStore
            | ApiError::NotAdmin { .. }
            | ApiError::ReadOnly { .. }
            | ApiError::NotThatWorker { .. }
            | ApiError::NotThatMember { .. } => ErrorKind::Refused,
            ApiError::NoToken | ApiError::UnknownToken | ApiError::NotANode(_) => ErrorKind::Unauthenticated,
            ApiError::TooManyBuilds { .. }
            | ApiError::TooManyVertices { .. }
            | ApiError::UploadTooLarge { .. }
            | ApiError::StoredTooMuch { .. }
            | ApiError::RateLimited { .. } => ErrorKind::Exhausted,
        }
    }
}

/// Why a server stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Its unix socket could not be set up.
    #[error("{}: {source}", path.display())]
    Socket {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        match &error {
            ApiError::NotLeader { leader } => kiln_proto::not_leader(leader.as_deref(), error.to_string()),
            _ => kiln_proto::status(error.kind(), error.to_string()),
        }
    }
}
