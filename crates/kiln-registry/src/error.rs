//! Registry errors, classified so callers can tell what to retry and what to report.

use oci_client::errors::{OciDistributionError, OciErrorCode};

/// What kind of failure a registry operation hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Credentials missing or refused (401/403).
    Unauthorized,
    /// The repository, tag, manifest or blob does not exist (404).
    NotFound,
    /// The registry failed (5xx, 429): transient.
    Server,
    /// The connection failed: transient.
    Network,
    /// The operation took too long: transient.
    Timeout,
    /// Content did not match its digest or size.
    Integrity,
    /// The registry answered with something Kiln cannot use.
    Invalid,
}

impl ErrorKind {
    /// Whether retrying may help.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Server | ErrorKind::Network | ErrorKind::Timeout)
    }
}

/// A failed registry operation, naming what was being done to which reference.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{action} {reference}: {message}")]
pub struct RegistryError {
    /// What was being done (`pulling manifest`, `pushing blob sha256:...`).
    pub action: String,
    /// The image reference.
    pub reference: String,
    /// The classification.
    pub kind: ErrorKind,
    /// The details.
    pub message: String,
}

impl RegistryError {
    /// An error of `kind` with a message.
    pub fn new(action: &str, reference: &str, kind: ErrorKind, message: impl Into<String>) -> RegistryError {
        RegistryError { action: action.to_string(), reference: reference.to_string(), kind, message: message.into() }
    }
}

/// Sorts an oci-client error into a kind and a readable message.
pub(crate) fn classify(error: &OciDistributionError) -> (ErrorKind, String) {
    use OciDistributionError as E;
    match error {
        E::AuthenticationFailure(body) => (ErrorKind::Unauthorized, format!("authentication failed (401): {body}")),
        E::UnauthorizedError { url } => (ErrorKind::Unauthorized, format!("not authorized (401) at {url}")),
        E::ImageManifestNotFoundError(what) => (ErrorKind::NotFound, format!("not found (404): {what}")),
        E::ServerError { code, url, message } => {
            let kind = match code {
                401 | 403 => ErrorKind::Unauthorized,
                404 => ErrorKind::NotFound,
                429 | 500..=599 => ErrorKind::Server,
                _ => ErrorKind::Invalid,
            };
            (kind, format!("registry answered {code} at {url}: {message}"))
        }
        E::RegistryError { envelope, url } => {
            let kind = envelope
                .errors
                .iter()
                .map(|e| match &e.code {
                    OciErrorCode::Unauthorized | OciErrorCode::Denied => ErrorKind::Unauthorized,
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::BlobUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound => ErrorKind::NotFound,
                    OciErrorCode::Toomanyrequests => ErrorKind::Server,
                    // oci-client keeps the envelope but not the HTTP status of a 4xx: the
                    // distribution spec's codes for 429 and 503 say "try again".
                    OciErrorCode::Other(code)
                        if code.eq_ignore_ascii_case("UNAVAILABLE") || code.eq_ignore_ascii_case("TOOMANYREQUESTS") =>
                    {
                        ErrorKind::Server
                    }
                    _ => ErrorKind::Invalid,
                })
                .next()
                .unwrap_or(ErrorKind::Invalid);
            let messages: Vec<String> =
                envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
            (kind, format!("{} at {url}", messages.join("; ")))
        }
        E::RequestError(e) if e.is_timeout() => (ErrorKind::Timeout, format!("timed out: {e}")),
        E::RequestError(e) => (ErrorKind::Network, format!("cannot reach the registry: {}", error_chain(e))),
        E::IoError(e) => (ErrorKind::Network, format!("connection failed: {e}")),
        E::DigestError(e) => (ErrorKind::Integrity, format!("digest check failed: {e}")),
        other => (ErrorKind::Invalid, other.to_string()),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
