//! What a coordinator remembers of each build: its entry in the build history (`kiln history
//! ls`), written when the build starts and again when it ends. A replicated coordinator keeps
//! the entries in its replicated log, so a new leader knows every build and a client that lost
//! its coordinator reattaches to its build by id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BuildRequest, Status, VertexRecord};

/// The longest build id: a client's id longer than this is refused.
pub const MAX_BUILD_ID: usize = 64;

/// The most of a Dockerfile's text an entry keeps (its first 16 KiB).
const MAX_KEPT_DOCKERFILE: usize = 16 << 10;
/// The most build arguments, outputs and caches an entry keeps, and the most of each name,
/// value or spec.
const MAX_KEPT_ARGS: usize = 64;
const MAX_KEPT_ARG: usize = 256;
const MAX_KEPT_SPECS: usize = 16;
const MAX_KEPT_SPEC: usize = 1024;

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
    /// What it was asked.
    #[serde(default)]
    pub request: RequestSummary,
}

/// What a build was asked, as its history keeps it: the request without its secrets and
/// without the context's file list (its size stands in for it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSummary {
    /// The Dockerfile's name.
    pub file_name: String,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--output` specs.
    pub outputs: Vec<String>,
    /// `--cache-from` specs.
    pub cache_from: Vec<String>,
    /// `--cache-to` specs.
    pub cache_to: Vec<String>,
    /// Files in the uploaded context (0: a local context path, or none).
    pub context_files: u64,
    /// Their bytes.
    pub context_bytes: u64,
    /// The token name that submitted it (`local` on the unix socket).
    pub submitted_by: String,
}

impl RequestSummary {
    /// The summary of `request`, submitted by `caller`, bounded so that an entry stays under
    /// about 80 KiB: at most the first 16 KiB of the Dockerfile, 64 build arguments of 256
    /// bytes (name and value each), 16 outputs and 16 caches of each kind of 1 KiB each.
    pub fn of(request: &BuildRequest, caller: &str) -> RequestSummary {
        let blobs = request.context_manifest.as_ref().map(|m| m.blobs()).unwrap_or_default();
        let args = request.build_args.iter().take(MAX_KEPT_ARGS);
        let specs = |specs: Vec<String>| -> Vec<String> {
            specs.iter().take(MAX_KEPT_SPECS).map(|s| prefix(s, MAX_KEPT_SPEC).to_string()).collect()
        };
        RequestSummary {
            file_name: prefix(&request.file_name, MAX_KEPT_ARG).to_string(),
            dockerfile: prefix(&request.dockerfile, MAX_KEPT_DOCKERFILE).to_string(),
            build_args: args
                .map(|(k, v)| (prefix(k, MAX_KEPT_ARG).to_string(), prefix(v, MAX_KEPT_ARG).to_string()))
                .collect(),
            no_cache: request.no_cache,
            outputs: specs(request.outputs.iter().map(|o| o.to_string()).collect()),
            cache_from: specs(request.cache_from.iter().map(|c| c.to_string()).collect()),
            cache_to: specs(request.cache_to.iter().map(|c| c.to_string()).collect()),
            context_files: request.context_manifest.as_ref().map_or(0, |m| m.entries.len() as u64),
            context_bytes: blobs.iter().map(|(_, size)| size).sum(),
            submitted_by: caller.to_string(),
        }
    }

    /// Whether `other` asks for the same build (who sent it aside): what a reattachment must
    /// send. An entry recorded before entries kept requests (an empty summary) matches any.
    pub fn same_build(&self, other: &RequestSummary) -> bool {
        let empty = self.file_name.is_empty() && self.dockerfile.is_empty();
        empty
            || RequestSummary { submitted_by: String::new(), ..self.clone() }
                == RequestSummary { submitted_by: String::new(), ..other.clone() }
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn prefix(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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

/// A change of a build, as the history announces it to watchers (the web UI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildChange {
    /// The build.
    pub id: String,
    /// Its tenant: who may hear of it.
    pub tenant: String,
    /// It began, ended or was removed (the list of builds changed), not only progressed.
    pub listed: bool,
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
    fn a_summary_keeps_a_bounded_part_of_a_large_request() {
        let mut request = BuildRequest { dockerfile: "é".repeat(20_000), ..Default::default() };
        for n in 0..100 {
            request.build_args.insert(format!("A{n:03}"), "v".repeat(1000));
        }
        let summary = RequestSummary::of(&request, "ci");
        assert!(summary.dockerfile.len() <= 16 << 10 && summary.dockerfile.chars().all(|c| c == 'é'));
        assert_eq!(summary.build_args.len(), 64);
        assert!(summary.build_args.values().all(|v| v.len() == 256));
        assert!(summary.same_build(&RequestSummary::of(&request, "another token")));
    }

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
