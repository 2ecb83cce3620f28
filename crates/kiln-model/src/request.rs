//! What a client asks to build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use kiln_types::Platform;

use crate::{CacheSpec, ContextManifest, Entitlement, OutputSpec};

/// What a client asks to build: the one request type of the CLI, the client, the daemon
/// and the engine. Its wire twin is `kiln.v1.BuildRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildRequest {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// Its name, for error messages.
    pub file_name: String,
    /// The context directory (on the daemon's machine; used when no manifest is sent).
    pub context: PathBuf,
    /// The `.dockerignore` text that applies.
    pub dockerignore: String,
    /// Target stage (default: the last).
    pub target: Option<String>,
    /// Build arguments.
    pub build_args: BTreeMap<String, String>,
    /// Target platforms (default: the daemon's).
    pub platforms: Vec<Platform>,
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--max-parallelism`.
    pub max_parallelism: Option<usize>,
    /// Secrets by id.
    pub secrets: HashMap<String, Vec<u8>>,
    /// Where the result goes.
    pub outputs: Vec<OutputSpec>,
    /// An uploaded context (its files are blobs in the daemon's store), instead of
    /// `context`: what a client on another machine sends.
    pub context_manifest: Option<ContextManifest>,
    /// `--cache-from`: caches to import.
    pub cache_from: Vec<CacheSpec>,
    /// `--cache-to`: caches to export to.
    pub cache_to: Vec<CacheSpec>,
    /// `--allow`: entitlements the client grants its build's steps.
    pub allow: BTreeSet<Entitlement>,
    /// The cache group the build's cache keys, in-flight work and uploaded context belong to
    /// (`None`: the default group's). Set by the daemon from the caller's tenant; never sent
    /// by a client.
    pub cache_group: Option<String>,
}
