//! The one mapping between Kiln's error kinds and gRPC status codes, both ways.

use kiln_model::ErrorKind;
use tonic::{Code, Status};

/// The status a service answers for an error of `kind`.
pub fn status(kind: ErrorKind, message: impl Into<String>) -> Status {
    let code = match kind {
        ErrorKind::BadRequest => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Conflict => Code::AlreadyExists,
        ErrorKind::Refused => Code::PermissionDenied,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Exhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::TimedOut => Code::DeadlineExceeded,
        ErrorKind::Internal => Code::Internal,
    };
    Status::new(code, message)
}

/// The metadata key under which a coordinator that does not lead names the one that does.
pub const LEADER_HEADER: &str = "kiln-leader";

/// The answer of a replicated coordinator that does not lead: `UNAVAILABLE` (try again),
/// naming the leader's URL when it knows one (`none` while an election runs), for the caller
/// to go there.
pub fn not_leader(leader: Option<&str>, message: impl Into<String>) -> Status {
    let mut status = Status::new(Code::Unavailable, message);
    let value = leader.and_then(|url| url.parse().ok()).unwrap_or_else(|| "none".parse().expect("ASCII"));
    status.metadata_mut().insert(LEADER_HEADER, value);
    status
}

/// Where a coordinator that does not lead sent its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// To the leader's URL.
    Leader(String),
    /// Nowhere yet: no leader is elected; try again shortly.
    Election,
}

/// The redirection in a follower's refusal ([`not_leader`]), if the status is one.
pub fn redirect_of(status: &Status) -> Option<Redirect> {
    let value = status.metadata().get(LEADER_HEADER)?.to_str().ok()?.trim();
    if value.starts_with("http://") || value.starts_with("https://") {
        Some(Redirect::Leader(value.to_string()))
    } else {
        Some(Redirect::Election)
    }
}

/// The kind of error a status a client received stands for (codes Kiln never sends map to
/// their nearest kind).
pub fn kind_of(code: Code) -> ErrorKind {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition | Code::Unimplemented => {
            ErrorKind::BadRequest
        }
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::Conflict,
        Code::PermissionDenied => ErrorKind::Refused,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        Code::ResourceExhausted => ErrorKind::Exhausted,
        // A stream cut mid-way (a reset connection) arrives as UNKNOWN: a transport fault.
        Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown => ErrorKind::Unavailable,
        Code::DeadlineExceeded => ErrorKind::TimedOut,
        Code::Ok | Code::Internal | Code::DataLoss => ErrorKind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_survives_the_wire() {
        for kind in [
            ErrorKind::BadRequest,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Refused,
            ErrorKind::Unauthenticated,
            ErrorKind::Exhausted,
            ErrorKind::Unavailable,
            ErrorKind::TimedOut,
            ErrorKind::Internal,
        ] {
            assert_eq!(kind_of(status(kind, "m").code()), kind);
        }
    }

    #[test]
    fn a_refusal_names_the_leader() {
        let refusal = not_leader(Some("https://127.0.0.2:7070"), "not the leader");
        assert_eq!(kind_of(refusal.code()), ErrorKind::Unavailable);
        assert_eq!(redirect_of(&refusal), Some(Redirect::Leader("https://127.0.0.2:7070".into())));
        assert_eq!(redirect_of(&not_leader(None, "no leader")), Some(Redirect::Election));
        assert_eq!(redirect_of(&not_leader(Some("file:///etc/passwd"), "odd")), Some(Redirect::Election));
        assert_eq!(redirect_of(&status(ErrorKind::Unavailable, "down")), None);
    }
}
