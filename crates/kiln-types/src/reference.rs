//! Image references (`[registry/]repository[:tag][@digest]`) normalised as Docker does.

use std::fmt;
use std::str::FromStr;

use crate::Digest;

/// A parsed, normalised image reference: `docker.io/library/busybox:latest`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageReference {
    /// Registry host with optional port, e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path inside the registry, e.g. `library/busybox`.
    pub repository: String,
    /// Tag; `latest` is filled in when neither tag nor digest is given.
    pub tag: Option<String>,
    /// Pinned manifest digest, if the reference has one.
    pub digest: Option<Digest>,
}

/// Why an image reference is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The reference is empty.
    #[error("empty image reference")]
    Empty,
    /// The repository name breaks the distribution grammar.
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        /// The reference as written.
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

const DEFAULT_REGISTRY: &str = "docker.io";

impl ImageReference {
    /// The reference as a string that pins content when a digest is known.
    pub fn canonical(&self) -> String {
        self.to_string()
    }

    /// The `registry/repository` part, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

fn invalid(reference: &str, reason: &'static str) -> ReferenceError {
    ReferenceError::Invalid { reference: reference.to_owned(), reason }
}

/// True when the first path component names a registry host rather than a namespace,
/// by Docker's rule: it contains a `.` or `:`, or is `localhost`.
fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn valid_path_component(c: &str) -> bool {
    // Lowercase alphanumerics separated by `.`, `_`, `__` or runs of `-`.
    let bytes = c.as_bytes();
    if bytes.is_empty() || !bytes[0].is_ascii_alphanumeric() {
        return false;
    }
    if !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|_| invalid(s, "bad digest"))?)),
            None => (s, None),
        };
        // A tag is the part after the last ':' if that ':' comes after the last '/'.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(rest[i + 1..].to_owned())),
            _ => (rest, None),
        };
        if let Some(t) = &tag
            && !valid_tag(t)
        {
            return Err(invalid(s, "bad tag"));
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if looks_like_registry(first) => (first.to_owned(), path.to_owned()),
            _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        };
        if repository.is_empty() || !repository.split('/').all(valid_path_component) {
            return Err(invalid(s, "repository names are lowercase letters, digits and separators"));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_owned()) } else { tag };
        Ok(ImageReference { registry, repository, tag, digest })
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

serde_as_string!(ImageReference);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        let r: ImageReference = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(r.to_string(), expected, "{input}");
    }

    #[test]
    fn normalises_like_docker() {
        check("busybox", "docker.io/library/busybox:latest");
        check("busybox:1.36", "docker.io/library/busybox:1.36");
        check("user/app", "docker.io/user/app:latest");
        check("127.0.0.1:5000/kiln/base:1", "127.0.0.1:5000/kiln/base:1");
        check("localhost/app", "localhost/app:latest");
        check("ghcr.io/a/b/c:v1.2", "ghcr.io/a/b/c:v1.2");
        let d = Digest::of(b"m");
        check(&format!("alpine@{d}"), &format!("docker.io/library/alpine@{d}"));
        check(&format!("alpine:3@{d}"), &format!("docker.io/library/alpine:3@{d}"));
    }

    #[test]
    fn rejects_bad_references() {
        for bad in ["", "UPPER", "a:b:c", "a@sha256:zz", "a/:t", "-a", "a:", "a:-x"] {
            assert!(bad.parse::<ImageReference>().is_err(), "{bad}");
        }
    }
}
