//! What can go wrong talking to a daemon, a coordinator or a peer.

use std::path::PathBuf;

use kiln_model::ErrorKind;
use kiln_proto::convert::WireError;
use kiln_types::Digest;

/// An error of this client; [`ClientError::kind`] says whether to fix, retry or give up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address does not parse.
    #[error("{address}: {reason}")]
    Address {
        /// The address given.
        address: String,
        /// Why it is not one.
        reason: String,
    },
    /// The token cannot travel in a request header.
    #[error("the token is not printable ASCII text")]
    Token,
    /// Nothing answers there.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address.
        address: String,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The other end answered with an error status.
    #[error("{message}")]
    Rpc {
        /// What kind of failure the status stands for.
        kind: ErrorKind,
        /// Its message, with what the call was about.
        message: String,
    },
    /// A replicated coordinator that does not lead refused, pointing elsewhere.
    #[error("{message}")]
    NotLeader {
        /// Its message.
        message: String,
        /// Where it pointed: the leader, or nowhere yet (an election).
        redirect: kiln_proto::Redirect,
    },
    /// The other end sent something that does not make sense.
    #[error("{what} sent a malformed message: {source}")]
    Malformed {
        /// Who sent it.
        what: String,
        /// What is wrong with it.
        #[source]
        source: WireError,
    },
    /// The context directory could not be read.
    #[error("reading build context {}: {source}", path.display())]
    Context {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A local file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blob could not be stored (it did not match its digest, or the store failed).
    #[error("blob {digest}: {source}")]
    Store {
        /// The blob.
        digest: Digest,
        /// The store's reason.
        #[source]
        source: kiln_cas::CasError,
    },
    /// No peer could provide a blob: each one's reason (naming the peer), or none held it.
    #[error("{}", if reasons.is_empty() { format!("{digest}: no peer holds it") } else { reasons.join("; ") })]
    NoPeer {
        /// The blob.
        digest: Digest,
        /// Why each peer failed.
        reasons: Vec<String>,
    },
    /// A job this client ran in the background died.
    #[error("a background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ClientError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Address { .. } | ClientError::Token => ErrorKind::BadRequest,
            ClientError::Connect { .. } | ClientError::NoPeer { .. } | ClientError::NotLeader { .. } => {
                ErrorKind::Unavailable
            }
            ClientError::Rpc { kind, .. } => *kind,
            ClientError::Malformed { .. } | ClientError::Store { .. } | ClientError::Task(_) => ErrorKind::Internal,
            ClientError::Io { .. } | ClientError::Context { .. } => ErrorKind::BadRequest,
        }
    }

    /// An error status, its message prefixed with what the call was about (`""`: nothing).
    pub(crate) fn rpc(what: &str, status: tonic::Status) -> ClientError {
        let message =
            if what.is_empty() { status.message().to_string() } else { format!("{what}: {}", status.message()) };
        match kiln_proto::redirect_of(&status) {
            Some(redirect) => ClientError::NotLeader { message, redirect },
            None => ClientError::Rpc { kind: kiln_proto::kind_of(status.code()), message },
        }
    }

    /// The leader a refusing follower named, if this is such a refusal and it named one.
    pub fn leader(&self) -> Option<&str> {
        match self {
            ClientError::NotLeader { redirect: kiln_proto::Redirect::Leader(url), .. } => Some(url),
            _ => None,
        }
    }
}
