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
    /// The build's id, chosen by the client (as buildx chooses its ref); `None`: the daemon
    /// picks one.
    pub id: Option<String>,
    /// 0 for a new build; N for the client's Nth submission of the same build after losing
    /// the coordinator that ran it (it reattaches to the recorded build).
    pub attempt: u32,
    /// The W3C trace context the build's trace continues (the client's `TRACEPARENT` and
    /// `TRACESTATE`, as buildx takes them); empty: a trace of its own.
    pub trace: TraceContext,
    /// Named contexts (`--build-context NAME=VALUE`, bake's `contexts`), by lowercase name:
    /// what `FROM NAME`, `COPY --from=NAME` and `RUN --mount=from=NAME` mean, before any stage
    /// or image of that name.
    pub named_contexts: BTreeMap<String, NamedContext>,
    /// `--label`: labels set on the image, over those of its Dockerfile.
    pub labels: BTreeMap<String, String>,
    /// `--debug`: the build's client is sent Kiln's own lines on its steps
    /// ([`crate::LogStream::Debug`]); without it they are left out.
    pub debug: bool,
}

/// What a named context is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamedContext {
    /// `docker-image://REF`: an image.
    Image(kiln_types::ImageReference),
    /// A local directory: its files (under its own `.dockerignore`) are the filesystem.
    Local {
        /// The directory (on the daemon's machine; used when no manifest is sent).
        dir: PathBuf,
        /// The `.dockerignore` text that applies to it.
        dockerignore: String,
        /// Its uploaded manifest, instead of `dir`: what a client on another machine sends.
        manifest: Option<ContextManifest>,
    },
    /// A URL: a Git repository (`git@`, `git://`, `ssh://`, `https://....git`) checked out,
    /// or a file downloaded over HTTP(S) (under its URL's last path segment), as BuildKit
    /// takes URL named contexts.
    Url(String),
    /// Bake's `target:NAME`: another build whose result is part of this build's graph (its
    /// `dockerfile`, `file_name`, `context`, `dockerignore`, `target`, `build_args`,
    /// `platforms`, `context_manifest`, `labels` and `named_contexts` are used; the rest is
    /// this build's).
    Target(Box<BuildRequest>),
}

impl NamedContext {
    /// Parses `--build-context`'s value: `docker-image://REF`, a URL, or a directory
    /// (relative ones to `base`; its `.dockerignore` is read by the caller); `target:`
    /// contexts are made by bake, which knows the targets.
    pub fn parse(value: &str, base: &std::path::Path) -> Result<NamedContext, String> {
        if let Some(reference) = value.strip_prefix("docker-image://") {
            return reference.parse().map(NamedContext::Image).map_err(|e| format!("{value:?}: {e}"));
        }
        let lower = value.to_ascii_lowercase();
        if ["http://", "https://", "git://", "ssh://", "git@"].iter().any(|scheme| lower.starts_with(scheme)) {
            return Ok(NamedContext::Url(value.to_string()));
        }
        if value.contains("://") || value.starts_with("target:") {
            return Err(format!(
                "{value:?}: Kiln takes docker-image://REF, a Git or HTTP(S) URL, a directory or (in bake) \
                 target:NAME as named contexts"
            ));
        }
        Ok(NamedContext::Local { dir: base.join(value), dockerignore: String::new(), manifest: None })
    }
}

/// A W3C trace context (`traceparent`, `tracestate`), carried from process to process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-TRACEID-SPANID-FLAGS`; empty: none.
    pub traceparent: String,
    /// Vendors' state, passed along.
    pub tracestate: String,
}

impl TraceContext {
    /// The longest `traceparent` or `tracestate` kept (the W3C limits are far below it).
    pub const MAX: usize = 1024;

    /// The context of the `TRACEPARENT` and `TRACESTATE` environment variables.
    pub fn from_env() -> TraceContext {
        let var = |name: &str| std::env::var(name).unwrap_or_default().trim().to_string();
        TraceContext { traceparent: var("TRACEPARENT"), tracestate: var("TRACESTATE") }.bounded()
    }

    /// Itself, with a part past [`TraceContext::MAX`] dropped (a trace context is a hint).
    pub fn bounded(self) -> TraceContext {
        let keep = |text: String| if text.len() > TraceContext::MAX { String::new() } else { text };
        TraceContext { traceparent: keep(self.traceparent), tracestate: keep(self.tracestate) }
    }
}

/// Bounds on what one build request carries, checked by the client before it sends and by
/// the daemon when the request arrives.
pub mod bounds {
    /// The Dockerfile's text (BuildKit's gRPC limit is 16 MiB; a heredoc script may be large).
    pub const DOCKERFILE: usize = 16 << 20;
    /// The `.dockerignore` text.
    pub const DOCKERIGNORE: usize = 1 << 20;
    /// Build arguments.
    pub const BUILD_ARGS: usize = 1024;
    /// One build argument, name and value (Linux's limit on one exec string).
    pub const BUILD_ARG: usize = 128 << 10;
    /// Secrets.
    pub const SECRETS: usize = 256;
    /// One secret (BuildKit's limit).
    pub const SECRET: usize = 500 << 10;
    /// Everything above together: within the 64 MiB of a gRPC message, with room for the
    /// context manifest.
    pub const TOTAL: usize = 32 << 20;
    /// Labels (`--label`, bake's `labels`).
    pub const LABELS: usize = 1024;
    /// Named contexts of one build, nested ones included.
    pub const NAMED_CONTEXTS: usize = 256;
    /// How deep `target:` contexts nest (a target built from a target built from ...).
    pub const NAMED_CONTEXT_DEPTH: usize = 16;
}

/// A request over one of its [`bounds`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is {size} {unit}, over the limit of {limit}")]
pub struct OversizedRequest {
    /// What is too large (`the Dockerfile Dockerfile.dev`, `--build-arg NAME`).
    pub what: String,
    /// Its size.
    pub size: usize,
    /// `bytes` or a count's noun.
    pub unit: &'static str,
    /// The bound.
    pub limit: usize,
}

impl BuildRequest {
    /// Every context the request reads: its own, and those of its directory contexts and
    /// nested `target:` builds, each as a directory on the daemon's machine or an uploaded
    /// manifest.
    pub fn contexts(&self) -> Vec<(&std::path::Path, Option<&ContextManifest>)> {
        let mut all = vec![(self.context.as_path(), self.context_manifest.as_ref())];
        for context in self.named_contexts.values() {
            match context {
                NamedContext::Local { dir, manifest, .. } => all.push((dir.as_path(), manifest.as_ref())),
                NamedContext::Target(nested) => all.extend(nested.contexts()),
                NamedContext::Image(_) | NamedContext::Url(_) => {}
            }
        }
        all
    }

    /// Checks the request against [`bounds`].
    pub fn check_bounds(&self) -> Result<(), OversizedRequest> {
        let mut named = 0;
        self.check_nested(0, &mut named)
    }

    fn check_nested(&self, depth: usize, named: &mut usize) -> Result<(), OversizedRequest> {
        let over = |what: String, size: usize, unit: &'static str, limit: usize| {
            if size > limit { Err(OversizedRequest { what, size, unit, limit }) } else { Ok(()) }
        };
        over(format!("the Dockerfile {}", self.file_name), self.dockerfile.len(), "bytes", bounds::DOCKERFILE)?;
        over("the .dockerignore".into(), self.dockerignore.len(), "bytes", bounds::DOCKERIGNORE)?;
        over("--build-arg".into(), self.build_args.len(), "arguments", bounds::BUILD_ARGS)?;
        over("labels".into(), self.labels.len(), "labels", bounds::LABELS)?;
        for (name, value) in &self.labels {
            over(format!("label {name}"), name.len() + value.len() + 1, "bytes", bounds::BUILD_ARG)?;
        }
        for (name, value) in &self.build_args {
            over(format!("--build-arg {name}"), name.len() + value.len() + 1, "bytes", bounds::BUILD_ARG)?;
        }
        over("--secret".into(), self.secrets.len(), "secrets", bounds::SECRETS)?;
        for (id, value) in &self.secrets {
            over(format!("--secret id={id}"), value.len(), "bytes", bounds::SECRET)?;
        }
        let total = self.dockerfile.len()
            + self.dockerignore.len()
            + self.build_args.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
            + self.labels.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>()
            + self.secrets.iter().map(|(id, value)| id.len() + value.len()).sum::<usize>();
        over(
            "the Dockerfile, .dockerignore, build arguments, labels and secrets together".into(),
            total,
            "bytes",
            bounds::TOTAL,
        )?;
        for (name, context) in &self.named_contexts {
            *named += 1;
            over("named contexts".into(), *named, "contexts", bounds::NAMED_CONTEXTS)?;
            match context {
                NamedContext::Target(nested) => {
                    let what = format!("the chain of target contexts through {name}");
                    over(what, depth + 1, "levels", bounds::NAMED_CONTEXT_DEPTH)?;
                    nested.check_nested(depth + 1, named)?;
                }
                NamedContext::Local { dockerignore, .. } => {
                    let what = format!("the .dockerignore of named context {name}");
                    over(what, dockerignore.len(), "bytes", bounds::DOCKERIGNORE)?;
                }
                NamedContext::Image(_) | NamedContext::Url(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_parts_are_named() {
        let mut request = BuildRequest { file_name: "Dockerfile.dev".into(), ..BuildRequest::default() };
        request.check_bounds().unwrap();
        request.build_args.insert("BIG".into(), "x".repeat(bounds::BUILD_ARG));
        let error = request.check_bounds().unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("--build-arg BIG is {} bytes, over the limit of {}", bounds::BUILD_ARG + 4, bounds::BUILD_ARG)
        );
        request.build_args.clear();
        request.dockerfile = "#".repeat(bounds::DOCKERFILE + 1);
        assert!(request.check_bounds().unwrap_err().to_string().starts_with("the Dockerfile Dockerfile.dev is"));
        request.dockerfile.clear();
        request.secrets.insert("npm".into(), vec![0; bounds::SECRET + 1]);
        assert!(request.check_bounds().unwrap_err().to_string().starts_with("--secret id=npm"));
    }
}
