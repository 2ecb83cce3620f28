//! What kind of failure an error is, as a caller acts on it.

/// The kind of a failure: what the caller should do about it. Every error a service
/// returns has one, and each travels as one gRPC status code (`kiln_proto::status`), so a
/// client can tell "fix the request" from "retry later" from "the service is broken".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is wrong (a malformed digest, an unknown option): fix it, never retry.
    BadRequest,
    /// What it names does not exist (a blob).
    NotFound,
    /// It conflicts with what exists (a worker name already registered).
    Conflict,
    /// Not allowed for this caller or over this transport.
    Refused,
    /// The caller did not say who it is, or not believably (no token, an unknown token, no
    /// certificate): authenticate and try again.
    Unauthenticated,
    /// Over a limit (a tenant's concurrent builds, its stored bytes): wait for its own work
    /// to finish, or raise the limit.
    Exhausted,
    /// Not now (the service is stopping, a session ended, a peer is down): retry later.
    Unavailable,
    /// It took too long (a stalled upload): retry, perhaps with a faster sender.
    TimedOut,
    /// The service failed (a broken store, a bug): retrying will not help.
    Internal,
}

impl ErrorKind {
    /// Whether trying the same request again later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Unavailable | ErrorKind::TimedOut)
    }
}
