//! What a coordinator remembers of each build: its entry in the build history (`kiln history
//! ls`), written when the build starts and again when it ends. A replicated coordinator keeps
//! the entries in its replicated log, so a new leader knows every build and a client that lost
//! its coordinator reattaches to its build by id.

use serde::{Deserialize, Serialize};

use crate::{Status, VertexRecord};

/// The longest build id: a client's id longer than this is refused.
pub const MAX_BUILD_ID: usize = 64;

/// A build as the history records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildEntry {
    /// The build's id (a client's choice, as buildx chooses its ref, or the daemon's).
    pub id: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// When it was first submitted (ms since the Unix epoch).
    pub started: u64,
    /// When it ended (ms), if it did.
    pub completed: Option<u64>,
    /// The target stage, if one was named.
    pub target: Option<String>,
    /// The platforms it builds for.
    pub platforms: Vec<String>,
    /// The tenant that submitted it.
    pub tenant: String,
    /// How many times it was submitted: 1, plus one per reattachment after its coordinator
    /// was lost.
    pub submissions: u32,
    /// Its steps by outcome, once it ended.
    pub counts: BuildCounts,
    /// Why it failed.
    pub error: Option<String>,
}

impl BuildEntry {
    /// The entry of the build once it ended with `status` (`error` when it failed), its steps
    /// counted from `records`.
    pub fn ended(&self, status: &str, error: Option<String>, records: &[VertexRecord]) -> BuildEntry {
        BuildEntry {
            status: status.to_string(),
            completed: Some(kiln_types::now_ms()),
            counts: BuildCounts::of(records),
            error,
            ..self.clone()
        }
    }
}

/// A build's steps by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildCounts {
    /// Run by this build.
    pub executed: u64,
    /// Taken from the cache.
    pub cached: u64,
    /// Waited for another build's run.
    pub deduplicated: u64,
    /// Failed.
    pub failed: u64,
}

impl BuildCounts {
    /// The counts of a build's vertex records.
    pub fn of(records: &[VertexRecord]) -> BuildCounts {
        let mut counts = BuildCounts::default();
        for record in records {
            match record.status {
                Status::Executed => counts.executed += 1,
                Status::Cached => counts.cached += 1,
                Status::Deduplicated => counts.deduplicated += 1,
                Status::Failed => counts.failed += 1,
                Status::Skipped => {}
            }
        }
        counts
    }
}

/// Why a build id is refused: empty, too long, or with a character other than ASCII letters,
/// digits, `-` and `_`.
pub fn check_build_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_BUILD_ID {
        return Err(format!("build id {id:?}: must have 1 to {MAX_BUILD_ID} characters"));
    }
    if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
        return Err(format!("build id {id:?}: {bad:?} is not a letter, digit, '-' or '_'"));
    }
    Ok(())
}

/// A new build id: 25 lowercase base-32 characters (as BuildKit's `identity.NewID`), from the
/// process's random hasher keys, the time and a counter.
pub fn new_build_id() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut bits = 0u128;
    for round in 0..2u64 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(round);
        hasher.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        hasher.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hasher.write_u32(std::process::id());
        bits = (bits << 64) | u128::from(hasher.finish());
    }
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    (0..25).map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_valid_and_differ() {
        let (a, b) = (new_build_id(), new_build_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 25);
        check_build_id(&a).unwrap();
    }

    #[test]
    fn ids_that_are_not_plain_names_are_refused_with_the_id() {
        assert!(check_build_id("").unwrap_err().contains("1 to 64"));
        assert!(check_build_id(&"a".repeat(65)).is_err());
        let error = check_build_id("../x").unwrap_err();
        assert!(error.contains("\"../x\"") && error.contains("'.'"), "{error}");
        check_build_id("ci-1234_a").unwrap();
    }
}
