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
}
