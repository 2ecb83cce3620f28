//! The one conversion between Kiln's domain types (`kiln-model`, context manifests) and
//! their wire twins, used by both ends: the daemon's services and the client. Whatever
//! arrives is checked: a malformed digest, platform or status is a [`WireError`] naming what
//! it belonged to, never re-hashed, defaulted or dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use kiln_model::{
    BuildCounts, BuildEntry, BuildEvent, BuildRequest, CacheCompression, CacheDirection, CacheSpec, CacheSpecError,
    ContextManifest, Entitlement, Executed, Failed, HeldWork, LayerDesc, Layers, LogLine, LogStream, ManifestEntry,
    ManifestError, ManifestKind, NamedContext, OutputSpec, OutputSpecError, Phases, PruneOptions, PushRequest,
    PushTarget, PushedLayer, Status, TierBlob, TraceContext, UnknownStatus, UsageRecord, VertexRecord, WorkerInfo,
    WorkerStatus,
};
use kiln_types::{Digest, DigestError, PlatformError};

use crate::v1::{self, build_event::Event};

/// A message from the other end that does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A digest that does not parse.
    #[error("{what}: bad digest {text:?}: {source}")]
    Digest {
        /// What it belonged to.
        what: String,
        /// What arrived.
        text: String,
        /// Why it is wrong.
        #[source]
        source: DigestError,
    },
    /// A platform that does not parse.
    #[error("{what} {text}: {source}")]
    Platform {
        /// What it belonged to.
        what: String,
        /// What arrived.
        text: String,
        /// Why it is wrong.
        #[source]
        source: PlatformError,
    },
    /// A vertex status that is not one of Kiln's.
    #[error("vertex {digest}: {source}")]
    Status {
        /// The vertex.
        digest: Digest,
        /// The name that arrived.
        #[source]
        source: UnknownStatus,
    },
    /// A context manifest that is not well formed (its validation names the entry).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// An output spec that does not parse.
    #[error(transparent)]
    Output(#[from] OutputSpecError),
    /// A cache spec that does not parse.
    #[error(transparent)]
    Cache(#[from] CacheSpecError),
    /// A request over a bound.
    #[error(transparent)]
    Oversized(#[from] kiln_model::OversizedRequest),
    /// A required part of a message is missing.
    #[error("{0}")]
    Missing(&'static str),
    /// A named context that does not make sense (the message names it).
    #[error("named context {0}")]
    NamedContext(String),
    /// A push request or answer that does not make sense.
    #[error("push {request}: {reason}")]
    Push {
        /// The request.
        request: u64,
        /// Why.
        reason: String,
    },
    /// An entitlement Kiln does not know.
    #[error("{what}: {reason}")]
    Entitlement {
        /// What it belonged to.
        what: String,
        /// Why.
        reason: String,
    },
    /// A build id that is not a plain name (the message names it).
    #[error("{0}")]
    BuildId(String),
    /// A disk usage record of a kind Kiln does not have.
    #[error("usage record {id}: {reason}")]
    RecordKind {
        /// The record.
        id: String,
        /// Why.
        reason: String,
    },
}

/// A digest, or an error naming what it belonged to.
pub fn parse_digest(text: &str, what: &str) -> Result<Digest, WireError> {
    text.parse().map_err(|source| WireError::Digest { what: what.to_string(), text: text.to_string(), source })
}

fn nonzero(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

fn nonempty(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// A vertex record as sent.
pub fn record_to_proto(record: &VertexRecord) -> v1::VertexRecord {
    v1::VertexRecord {
        digest: record.digest.to_string(),
        name: record.name.clone(),
        kind: record.kind.clone(),
        stage: record.stage.clone().unwrap_or_default(),
        status: record.status.as_str().to_string(),
        worker: record.worker.clone().unwrap_or_default(),
        platform: record.platform.clone().unwrap_or_default(),
        started: record.started.unwrap_or(0),
        completed: record.completed.unwrap_or(0),
        cache_source: record.cache_source.clone().unwrap_or_default(),
        phases: phases_to_proto(&record.phases),
        deduplicated_from: record.deduplicated_from.clone().unwrap_or_default(),
    }
}

/// Phases as sent (`None` when none was measured).
fn phases_to_proto(phases: &Phases) -> Option<v1::Phases> {
    (!phases.is_empty()).then_some(v1::Phases {
        queue_ms: phases.queue_ms,
        fetch_ms: phases.fetch_ms,
        execute_ms: phases.execute_ms,
        export_ms: phases.export_ms,
    })
}

/// Phases as received.
fn phases_from_proto(phases: Option<v1::Phases>) -> Phases {
    let phases = phases.unwrap_or_default();
    Phases {
        queue_ms: phases.queue_ms,
        fetch_ms: phases.fetch_ms,
        execute_ms: phases.execute_ms,
        export_ms: phases.export_ms,
    }
}

/// A disk usage record as sent.
pub fn usage_to_proto(record: &UsageRecord) -> v1::UsageRecord {
    v1::UsageRecord {
        id: record.id.clone(),
        kind: record.kind.as_str().to_string(),
        size: record.size,
        last_used: record.last_used.unwrap_or(0),
        usage_count: record.usage_count,
        in_use: record.in_use,
        worker: record.worker.clone(),
    }
}

/// A disk usage record as received.
pub fn usage_from_proto(record: v1::UsageRecord) -> Result<UsageRecord, WireError> {
    let kind = record.kind.parse().map_err(|reason| WireError::RecordKind { id: record.id.clone(), reason })?;
    Ok(UsageRecord {
        id: record.id,
        kind,
        size: record.size,
        last_used: nonzero(record.last_used),
        usage_count: record.usage_count,
        in_use: record.in_use,
        worker: record.worker,
    })
}

/// Prune options as sent.
pub fn prune_to_proto(options: &PruneOptions) -> v1::PruneRequest {
    v1::PruneRequest {
        all: options.all,
        keep_storage: options.keep_storage,
        until_ms: options.until.map_or(0, |until| until.as_millis() as u64),
    }
}

/// Prune options as received.
pub fn prune_from_proto(request: &v1::PruneRequest) -> PruneOptions {
    PruneOptions {
        all: request.all,
        keep_storage: request.keep_storage,
        until: nonzero(request.until_ms).map(std::time::Duration::from_millis),
    }
}

/// A vertex record as received.
pub fn record_from_proto(record: v1::VertexRecord) -> Result<VertexRecord, WireError> {
    let digest = parse_digest(&record.digest, "vertex record")?;
    let status: Status = record.status.parse().map_err(|source| WireError::Status { digest, source })?;
    Ok(VertexRecord {
        digest,
        name: record.name,
        kind: record.kind,
        stage: nonempty(record.stage),
        status,
        worker: nonempty(record.worker),
        platform: nonempty(record.platform),
        started: nonzero(record.started),
        completed: nonzero(record.completed),
        cache_source: nonempty(record.cache_source),
        phases: phases_from_proto(record.phases),
        deduplicated_from: nonempty(record.deduplicated_from),
    })
}

fn records_from_proto(records: Vec<v1::VertexRecord>) -> Result<Vec<VertexRecord>, WireError> {
    records.into_iter().map(record_from_proto).collect()
}

/// A build event as sent.
pub fn event_to_proto(event: BuildEvent) -> v1::BuildEvent {
    let event = match event {
        BuildEvent::Planned(vertices) => {
            Event::Planned(v1::Planned { vertices: vertices.iter().map(record_to_proto).collect() })
        }
        BuildEvent::Started { vertex, at } => Event::Started(v1::VertexStarted { digest: vertex.to_string(), at }),
        BuildEvent::Log { vertex, line } => Event::Log(vertex_log_to_proto(vertex.to_string(), line)),
        BuildEvent::Completed { record, error } => Event::Completed(v1::VertexCompleted {
            record: Some(record_to_proto(&record)),
            error: error.unwrap_or_default(),
        }),
        BuildEvent::Export { name, started, completed } => {
            Event::Export(v1::ExportStep { name, started, completed: completed.unwrap_or(0) })
        }
        BuildEvent::ExportData { output, unpack_into, data, last } => Event::ExportData(v1::ExportData {
            output: output as u32,
            unpack: unpack_into.is_some(),
            subdir: unpack_into.unwrap_or_default(),
            data,
            last,
        }),
        BuildEvent::Result { error, image, records } => Event::Result(v1::BuildResult {
            ok: error.is_none(),
            error: error.unwrap_or_default(),
            image_digest: image.map(|d| d.to_string()).unwrap_or_default(),
            records: records.iter().map(record_to_proto).collect(),
        }),
    };
    v1::BuildEvent { event: Some(event) }
}

/// A build event as received.
pub fn event_from_proto(event: Event) -> Result<BuildEvent, WireError> {
    Ok(match event {
        Event::Planned(planned) => BuildEvent::Planned(records_from_proto(planned.vertices)?),
        Event::Started(started) => {
            BuildEvent::Started { vertex: parse_digest(&started.digest, "started vertex")?, at: started.at }
        }
        Event::Log(log) => BuildEvent::Log {
            vertex: parse_digest(&log.digest, "log line's vertex")?,
            line: vertex_log_from_proto(log),
        },
        Event::Completed(completed) => BuildEvent::Completed {
            record: Box::new(record_from_proto(
                completed.record.ok_or(WireError::Missing("a completed vertex without its record"))?,
            )?),
            error: nonempty(completed.error),
        },
        Event::Export(step) => {
            BuildEvent::Export { name: step.name, started: step.started, completed: nonzero(step.completed) }
        }
        Event::ExportData(piece) => BuildEvent::ExportData {
            output: piece.output as usize,
            unpack_into: piece.unpack.then_some(piece.subdir),
            data: piece.data,
            last: piece.last,
        },
        Event::Result(result) => BuildEvent::Result {
            error: (!result.ok).then_some(result.error),
            image: nonempty(result.image_digest).map(|d| parse_digest(&d, "image")).transpose()?,
            records: records_from_proto(result.records)?,
        },
    })
}

/// A shared-cache blob as sent.
pub fn tier_blob_to_proto(blob: &TierBlob) -> v1::TierBlob {
    v1::TierBlob {
        cache: blob.cache.clone(),
        digest: blob.digest.to_string(),
        size: blob.size,
        media_type: blob.media_type.clone(),
    }
}

/// A shared-cache blob as received.
pub fn tier_blob_from_proto(blob: v1::TierBlob) -> Result<TierBlob, WireError> {
    Ok(TierBlob {
        digest: parse_digest(&blob.digest, "shared cache blob")?,
        cache: blob.cache,
        size: blob.size,
        media_type: blob.media_type,
    })
}

/// A build request as sent.
pub fn request_to_proto(request: &BuildRequest) -> v1::BuildRequest {
    v1::BuildRequest {
        dockerfile: request.dockerfile.clone(),
        file_name: request.file_name.clone(),
        context_path: request.context.display().to_string(),
        dockerignore: request.dockerignore.clone(),
        target: request.target.clone().unwrap_or_default(),
        build_args: request.build_args.clone().into_iter().collect(),
        platforms: request.platforms.iter().map(|p| p.to_string()).collect(),
        no_cache: request.no_cache,
        max_parallelism: request.max_parallelism.unwrap_or(0) as u32,
        secrets: request.secrets.clone(),
        outputs: request.outputs.iter().map(|o| o.to_string()).collect(),
        context: request.context_manifest.as_ref().map(manifest_to_proto),
        cache_from: request.cache_from.iter().map(|c| c.to_string()).collect(),
        cache_to: request.cache_to.iter().map(|c| c.to_string()).collect(),
        allow: request.allow.iter().map(|e| e.to_string()).collect(),
        build_id: request.id.clone().unwrap_or_default(),
        attempt: request.attempt,
        traceparent: request.trace.traceparent.clone(),
        tracestate: request.trace.tracestate.clone(),
        labels: request.labels.clone().into_iter().collect(),
        debug: request.debug,
        named_contexts: request
            .named_contexts
            .iter()
            .map(|(name, context)| {
                let source = match context {
                    NamedContext::Image(reference) => v1::named_context::Source::Image(reference.to_string()),
                    NamedContext::Url(url) => v1::named_context::Source::Url(url.clone()),
                    NamedContext::Target(nested) => v1::named_context::Source::Target(request_to_proto(nested)),
                    NamedContext::Local { dir, dockerignore, manifest } => {
                        v1::named_context::Source::Local(v1::LocalContext {
                            path: dir.display().to_string(),
                            dockerignore: dockerignore.clone(),
                            manifest: manifest.as_ref().map(manifest_to_proto),
                        })
                    }
                };
                (name.clone(), v1::NamedContext { source: Some(source) })
            })
            .collect(),
    }
}

/// A build request as received: platforms, outputs and the manifest checked.
pub fn request_from_proto(request: v1::BuildRequest) -> Result<BuildRequest, WireError> {
    let outputs = request.outputs.iter().map(|o| OutputSpec::parse(o)).collect::<Result<_, _>>()?;
    let caches = |specs: &[String], direction| {
        specs.iter().map(|c| CacheSpec::parse(c, direction)).collect::<Result<Vec<_>, _>>()
    };
    let (cache_from, cache_to) =
        (caches(&request.cache_from, CacheDirection::From)?, caches(&request.cache_to, CacheDirection::To)?);
    let id = nonempty(request.build_id);
    if let Some(id) = &id {
        kiln_model::check_build_id(id).map_err(WireError::BuildId)?;
    }
    let request = BuildRequest {
        platforms: platforms_from_proto(&request.platforms, "--platform")?,
        dockerfile: request.dockerfile,
        file_name: if request.file_name.is_empty() { "Dockerfile".into() } else { request.file_name },
        context: PathBuf::from(request.context_path),
        dockerignore: request.dockerignore,
        target: nonempty(request.target),
        build_args: request.build_args.into_iter().collect(),
        no_cache: request.no_cache,
        max_parallelism: (request.max_parallelism > 0).then_some(request.max_parallelism as usize),
        secrets: request.secrets,
        outputs,
        context_manifest: request.context.map(manifest_from_proto).transpose()?,
        cache_from,
        cache_to,
        allow: entitlements_from_proto(&request.allow, "--allow")?,
        cache_group: None,
        id,
        attempt: request.attempt,
        trace: TraceContext { traceparent: request.traceparent, tracestate: request.tracestate }.bounded(),
        named_contexts: named_contexts_from_proto(request.named_contexts, 0)?,
        labels: request.labels.into_iter().collect(),
        debug: request.debug,
    };
    request.check_bounds()?;
    Ok(request)
}

/// Named contexts as sent, nested `target:` builds at most
/// [`kiln_model::bounds::NAMED_CONTEXT_DEPTH`] deep (checked before they are read further).
fn named_contexts_from_proto(
    contexts: std::collections::HashMap<String, v1::NamedContext>,
    depth: usize,
) -> Result<BTreeMap<String, NamedContext>, WireError> {
    let mut named = BTreeMap::new();
    for (name, context) in contexts {
        let context = match context.source {
            Some(v1::named_context::Source::Image(reference)) => NamedContext::Image(
                reference.parse().map_err(|e| WireError::NamedContext(format!("{name}: {reference:?}: {e}")))?,
            ),
            Some(v1::named_context::Source::Target(nested)) => {
                if depth + 1 > kiln_model::bounds::NAMED_CONTEXT_DEPTH {
                    return Err(WireError::NamedContext(format!(
                        "{name}: target contexts nest deeper than {} levels",
                        kiln_model::bounds::NAMED_CONTEXT_DEPTH
                    )));
                }
                let mut nested = nested;
                let contexts = std::mem::take(&mut nested.named_contexts);
                let mut request = request_from_proto(nested)?;
                request.named_contexts = named_contexts_from_proto(contexts, depth + 1)?;
                NamedContext::Target(Box::new(request))
            }
            Some(v1::named_context::Source::Url(url)) => NamedContext::Url(url),
            Some(v1::named_context::Source::Local(local)) => NamedContext::Local {
                dir: PathBuf::from(local.path),
                dockerignore: local.dockerignore,
                manifest: local.manifest.map(manifest_from_proto).transpose()?,
            },
            None => return Err(WireError::NamedContext(format!("{name}: no source"))),
        };
        named.insert(name.to_lowercase(), context);
    }
    Ok(named)
}

/// A context manifest as sent.
pub fn manifest_to_proto(manifest: &ContextManifest) -> v1::ContextManifest {
    let entries = manifest
        .entries
        .iter()
        .map(|e| {
            let (kind, digest, size, link) = match &e.kind {
                ManifestKind::File { digest, size } => (0, digest.to_string(), *size, String::new()),
                ManifestKind::Dir => (1, String::new(), 0, String::new()),
                ManifestKind::Symlink(target) => (2, String::new(), 0, target.clone()),
            };
            v1::ContextEntry {
                path: e.path.clone(),
                kind,
                mode: e.mode,
                digest,
                size,
                link,
                mtime: e.mtime.0,
                mtime_nsec: e.mtime.1,
                raw_path: e.raw_path.clone().unwrap_or_default(),
                hardlink_of: e.hardlink_of.clone().unwrap_or_default(),
            }
        })
        .collect();
    v1::ContextManifest { entries }
}

/// A context manifest as received, validated ([`ContextManifest::validate`]); bad entries
/// are errors naming the path.
pub fn manifest_from_proto(manifest: v1::ContextManifest) -> Result<ContextManifest, WireError> {
    let mut entries = Vec::with_capacity(manifest.entries.len());
    for e in manifest.entries {
        let kind = match e.kind {
            0 => ManifestKind::File {
                digest: parse_digest(&e.digest, &format!("context entry {}", e.path))?,
                size: e.size,
            },
            1 => ManifestKind::Dir,
            2 => ManifestKind::Symlink(e.link),
            other => {
                return Err(WireError::Manifest(ManifestError(format!(
                    "context entry {}: unknown kind {other}",
                    e.path
                ))));
            }
        };
        let raw_path = (!e.raw_path.is_empty()).then_some(e.raw_path);
        let hardlink_of = (!e.hardlink_of.is_empty()).then_some(e.hardlink_of);
        let mtime = (e.mtime, e.mtime_nsec);
        entries.push(ManifestEntry { path: e.path, kind, mode: e.mode & 0o7777, mtime, raw_path, hardlink_of });
    }
    let manifest = ContextManifest { entries };
    manifest.validate()?;
    Ok(manifest)
}

/// Layers as sent.
pub fn layers_to_proto(layers: &Layers) -> v1::LayerChain {
    v1::LayerChain {
        layers: layers.layers.iter().map(|l| v1::Layer { diff_id: l.diff_id.to_string(), size: l.size }).collect(),
    }
}

/// Layers as received.
pub fn layers_from_proto(chain: v1::LayerChain) -> Result<Layers, WireError> {
    let layers = chain
        .layers
        .into_iter()
        .map(|l| Ok(LayerDesc { diff_id: parse_digest(&l.diff_id, "layer")?, size: l.size }))
        .collect::<Result<_, WireError>>()?;
    Ok(Layers { layers })
}

/// A step's line as sent, under `digest` (empty where the message names the step).
pub fn vertex_log_to_proto(digest: String, line: LogLine) -> v1::VertexLog {
    v1::VertexLog {
        digest,
        stderr: line.stream == LogStream::Stderr,
        debug: line.stream == LogStream::Debug,
        line: line.line,
    }
}

/// A step's line as received.
pub fn vertex_log_from_proto(log: v1::VertexLog) -> LogLine {
    let stream = match (log.debug, log.stderr) {
        (true, _) => LogStream::Debug,
        (false, true) => LogStream::Stderr,
        (false, false) => LogStream::Stdout,
    };
    LogLine { stream, line: log.line }
}

/// A worker's registration as sent: what it is and the layers it already holds.
pub fn register_to_proto(info: &WorkerInfo, layers: &[Digest], held: &[HeldWork]) -> v1::Register {
    v1::Register {
        name: info.name.clone(),
        platforms: info.platforms.iter().map(|p| p.to_string()).collect(),
        labels: info.labels.clone().into_iter().collect(),
        max_parallelism: info.max_parallelism as u32,
        capacity: u32::try_from(info.capacity).unwrap_or(u32::MAX),
        free_disk: info.free_disk,
        cache_bytes: info.cache_bytes,
        address: info.address.clone(),
        layers: layers.iter().map(|d| d.to_string()).collect(),
        entitlements: info.entitlements.iter().map(|e| e.to_string()).collect(),
        held: held.iter().map(|h| v1::HeldWork { work: h.work.to_string(), finished: h.finished }).collect(),
    }
}

/// A worker's registration as received: what it is, the layers it holds, the jobs it kept.
pub fn register_from_proto(register: v1::Register) -> Result<(WorkerInfo, Vec<Digest>, Vec<HeldWork>), WireError> {
    if register.name.is_empty() {
        return Err(WireError::Missing("a worker needs a name"));
    }
    let what = format!("worker {}", register.name);
    let layers = register
        .layers
        .iter()
        .map(|d| parse_digest(d, &format!("{what}: a registered layer")))
        .collect::<Result<_, _>>()?;
    let held = register
        .held
        .iter()
        .map(|h| {
            let work = parse_digest(&h.work, &format!("{what}: a held job"))?;
            Ok(HeldWork { work, finished: h.finished })
        })
        .collect::<Result<_, WireError>>()?;
    let info = WorkerInfo {
        platforms: platforms_from_proto(&register.platforms, &format!("{what}: platform"))?,
        name: register.name,
        labels: register.labels.into_iter().collect(),
        max_parallelism: register.max_parallelism.max(1) as usize,
        capacity: register.capacity as usize,
        free_disk: register.free_disk,
        cache_bytes: register.cache_bytes,
        address: register.address,
        entitlements: entitlements_from_proto(&register.entitlements, &format!("{what}: entitlements"))?
            .into_iter()
            .collect(),
    };
    Ok((info, layers, held))
}

fn entitlements_from_proto(names: &[String], what: &str) -> Result<BTreeSet<Entitlement>, WireError> {
    names
        .iter()
        .map(|name| name.parse().map_err(|reason| WireError::Entitlement { what: what.to_string(), reason }))
        .collect()
}

fn platforms_from_proto(platforms: &[String], what: &str) -> Result<Vec<kiln_types::Platform>, WireError> {
    platforms
        .iter()
        .map(|p| p.parse().map_err(|source| WireError::Platform { what: what.to_string(), text: p.clone(), source }))
        .collect()
}

/// A history entry as sent.
pub fn build_entry_to_proto(entry: &BuildEntry) -> v1::BuildSummary {
    let counts = &entry.counts;
    v1::BuildSummary {
        id: entry.id.clone(),
        status: entry.status.clone(),
        started: entry.started,
        completed: entry.completed.unwrap_or(0),
        target: entry.target.clone().unwrap_or_default(),
        platforms: entry.platforms.clone(),
        tenant: entry.tenant.clone(),
        submissions: entry.submissions,
        counts: Some(v1::BuildCounts {
            executed: counts.executed,
            cached: counts.cached,
            deduplicated: counts.deduplicated,
            failed: counts.failed,
        }),
        error: entry.error.clone().unwrap_or_default(),
    }
}

/// A history entry as received.
pub fn build_entry_from_proto(summary: v1::BuildSummary) -> BuildEntry {
    let counts = summary.counts.unwrap_or_default();
    BuildEntry {
        id: summary.id,
        status: summary.status,
        started: summary.started,
        completed: nonzero(summary.completed),
        target: nonempty(summary.target),
        platforms: summary.platforms,
        tenant: summary.tenant,
        submissions: summary.submissions,
        counts: BuildCounts {
            executed: counts.executed,
            cached: counts.cached,
            deduplicated: counts.deduplicated,
            failed: counts.failed,
        },
        error: nonempty(summary.error),
        // A listing carries no request.
        request: Default::default(),
    }
}

/// A worker's state as listed.
pub fn worker_to_proto(worker: &WorkerStatus) -> v1::WorkerDescription {
    v1::WorkerDescription {
        name: worker.info.name.clone(),
        platforms: worker.info.platforms.iter().map(|p| p.to_string()).collect(),
        labels: worker.info.labels.clone().into_iter().collect(),
        max_parallelism: worker.info.max_parallelism as u32,
        capacity: u32::try_from(worker.info.capacity).unwrap_or(u32::MAX),
        running: worker.running as u32,
        free_disk: worker.info.free_disk,
        cache_bytes: worker.info.cache_bytes,
        address: worker.info.address.clone(),
        draining: worker.draining,
        last_heartbeat: worker.last_heartbeat,
        layers: worker.layers as u64,
        entitlements: worker.info.entitlements.iter().map(|e| e.to_string()).collect(),
    }
}

/// A worker's state as received.
pub fn worker_from_proto(worker: v1::WorkerDescription) -> Result<WorkerStatus, WireError> {
    let what = format!("worker {}: platform", worker.name);
    Ok(WorkerStatus {
        info: WorkerInfo {
            platforms: platforms_from_proto(&worker.platforms, &what)?,
            name: worker.name,
            labels: worker.labels.into_iter().collect(),
            max_parallelism: worker.max_parallelism as usize,
            capacity: worker.capacity as usize,
            free_disk: worker.free_disk,
            cache_bytes: worker.cache_bytes,
            address: worker.address,
            entitlements: entitlements_from_proto(&worker.entitlements, &what)?.into_iter().collect(),
        },
        running: worker.running as usize,
        draining: worker.draining,
        last_heartbeat: worker.last_heartbeat,
        layers: worker.layers as usize,
    })
}

/// A line of a job's output as a worker sends it.
pub fn job_log_to_proto(job: u64, epoch: u32, line: LogLine) -> v1::JobLog {
    let v1::VertexLog { stderr, debug, line, .. } = vertex_log_to_proto(String::new(), line);
    v1::JobLog { job, epoch, stderr, debug, line }
}

/// A line of a job's output as the coordinator receives it.
pub fn log_line_from_proto(log: v1::JobLog) -> LogLine {
    let v1::JobLog { stderr, debug, line, .. } = log;
    vertex_log_from_proto(v1::VertexLog { digest: String::new(), stderr, debug, line })
}

/// A job's result as sent: its layers and pin, or the error.
pub fn job_result_to_proto(job: u64, epoch: u32, result: Result<Executed<Layers>, Failed>) -> v1::JobResult {
    match result {
        Ok(executed) => v1::JobResult {
            job,
            epoch,
            error: String::new(),
            output: Some(layers_to_proto(&executed.output)),
            pin: executed.pin.map(|p| p.to_string()).unwrap_or_default(),
            lost_input: false,
            phases: phases_to_proto(&executed.phases),
        },
        Err(failed) => v1::JobResult {
            job,
            epoch,
            error: failed.message,
            output: None,
            pin: String::new(),
            lost_input: failed.lost_input,
            phases: None,
        },
    }
}

/// A push request as sent.
pub fn push_to_proto(push: &PushRequest) -> v1::PushLayers {
    let (cache, repository) = match &push.target {
        PushTarget::Cache(spec) => (spec.clone(), String::new()),
        PushTarget::Registry(reference) => (String::new(), reference.clone()),
    };
    v1::PushLayers {
        request: push.request,
        layers: push.layers.iter().map(ToString::to_string).collect(),
        cache,
        repository,
        compression: match push.compression {
            CacheCompression::Gzip => "gzip",
            CacheCompression::Zstd => "zstd",
        }
        .into(),
        source_date_epoch: push.source_date_epoch,
    }
}

/// A push request as received.
pub fn push_from_proto(push: v1::PushLayers) -> Result<PushRequest, WireError> {
    let request = push.request;
    let invalid = |reason: String| WireError::Push { request, reason };
    let layers = push.layers.iter().map(|d| parse_digest(d, "pushed layer")).collect::<Result<_, _>>()?;
    let target = match (push.cache.is_empty(), push.repository.is_empty()) {
        (false, true) => PushTarget::Cache(push.cache),
        (true, false) => PushTarget::Registry(push.repository),
        _ => return Err(invalid("exactly one of a cache and a repository".into())),
    };
    let compression = match push.compression.as_str() {
        "gzip" => CacheCompression::Gzip,
        "zstd" => CacheCompression::Zstd,
        other => return Err(invalid(format!("unknown compression {other:?}"))),
    };
    Ok(PushRequest { request, layers, target, compression, source_date_epoch: push.source_date_epoch })
}

/// A push's answer as sent.
pub fn pushed_to_proto(request: u64, result: Result<Vec<PushedLayer>, String>) -> v1::Pushed {
    match result {
        Ok(layers) => v1::Pushed {
            request,
            error: String::new(),
            layers: layers
                .into_iter()
                .map(|l| v1::PushedLayer {
                    diff_id: l.diff_id.to_string(),
                    digest: l.digest.to_string(),
                    size: l.size,
                    media_type: l.media_type,
                    tar_size: l.tar_size.unwrap_or(0),
                })
                .collect(),
        },
        Err(error) => v1::Pushed { request, error, layers: Vec::new() },
    }
}

/// A push's answer as received: the request and what was pushed (or why not).
pub fn pushed_from_proto(pushed: v1::Pushed) -> Result<(u64, Result<Vec<PushedLayer>, String>), WireError> {
    if !pushed.error.is_empty() {
        return Ok((pushed.request, Err(pushed.error)));
    }
    let layers = pushed
        .layers
        .into_iter()
        .map(|l| {
            Ok(PushedLayer {
                diff_id: parse_digest(&l.diff_id, "pushed layer")?,
                digest: parse_digest(&l.digest, "pushed blob")?,
                size: l.size,
                media_type: l.media_type,
                tar_size: nonzero(l.tar_size),
            })
        })
        .collect::<Result<_, WireError>>()?;
    Ok((pushed.request, Ok(layers)))
}

/// A job's result as received: `Ok(Err(failed))` is a job that failed, `Err` a malformed
/// message.
pub fn job_result_from_proto(result: v1::JobResult) -> Result<Result<Executed<Layers>, Failed>, WireError> {
    if !result.error.is_empty() {
        // A worker from before the flag said so with a prefix of its message.
        let (message, lost_input) = match result.error.strip_prefix(Failed::LOST_INPUT) {
            Some(rest) => (rest.to_string(), true),
            None => (result.error, result.lost_input),
        };
        return Ok(Err(Failed { message, worker: None, lost_input }));
    }
    let output = layers_from_proto(result.output.unwrap_or_default())?;
    let pin = nonempty(result.pin).map(|pin| parse_digest(&pin, "a job's pin")).transpose()?;
    Ok(Ok(Executed { pin, phases: phases_from_proto(result.phases), ..Executed::new(output) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: &str) -> v1::VertexRecord {
        v1::VertexRecord { digest: Digest::of(b"v").to_string(), status: status.into(), ..Default::default() }
    }

    #[test]
    fn malformed_digests_and_statuses_from_the_wire_are_errors_not_rehashed() {
        let started = |digest: &str| Event::Started(v1::VertexStarted { digest: digest.into(), at: 1 });
        let good = Digest::of(b"vertex");
        assert!(
            matches!(event_from_proto(started(&good.to_string())), Ok(BuildEvent::Started { vertex, .. }) if vertex == good)
        );
        let error = event_from_proto(started("sha256:nothex")).unwrap_err().to_string();
        assert!(error.contains("started vertex") && error.contains("sha256:nothex"), "{error}");
        let completed = Event::Completed(v1::VertexCompleted { record: None, error: String::new() });
        assert!(event_from_proto(completed).unwrap_err().to_string().contains("without its record"));
        let error = record_from_proto(record("running")).unwrap_err().to_string();
        assert!(error.contains("running") && error.contains(&Digest::of(b"v").to_string()), "{error}");
    }

    #[test]
    fn every_event_survives_the_round_trip() {
        let record = VertexRecord {
            digest: Digest::of(b"v"),
            name: "[1/2] RUN make".into(),
            kind: "exec".into(),
            stage: Some("build".into()),
            status: Status::Deduplicated,
            worker: Some("w1".into()),
            platform: Some("linux/arm64".into()),
            started: Some(5),
            completed: Some(9),
            cache_source: Some("registry:r/c".into()),
            phases: Phases { queue_ms: Some(0), fetch_ms: None, execute_ms: Some(12), export_ms: Some(3) },
            deduplicated_from: Some("b1".into()),
        };
        let events = [
            BuildEvent::Planned(vec![record.clone()]),
            BuildEvent::Started { vertex: record.digest, at: 5 },
            BuildEvent::Log { vertex: record.digest, line: LogLine { stream: LogStream::Stderr, line: "x".into() } },
            BuildEvent::Completed { record: Box::new(record.clone()), error: Some("exit 1".into()) },
            BuildEvent::Export { name: "pushing r".into(), started: 3, completed: None },
            BuildEvent::ExportData { output: 1, unpack_into: Some("linux_arm64".into()), data: vec![1, 2], last: true },
            BuildEvent::Result { error: None, image: Some(Digest::of(b"i")), records: vec![record] },
        ];
        for event in events {
            let wire = event_to_proto(event.clone()).event.unwrap();
            assert_eq!(event_from_proto(wire).unwrap(), event);
        }
    }

    #[test]
    fn build_requests_survive_the_round_trip_and_bad_fields_are_named() {
        let request = BuildRequest {
            dockerfile: "FROM scratch\n".into(),
            file_name: "Dockerfile.app".into(),
            context: "/ctx".into(),
            target: Some("app".into()),
            platforms: vec!["linux/arm64/v8".parse().unwrap()],
            max_parallelism: Some(3),
            outputs: vec![OutputSpec::parse("type=oci,dest=/o.tar,name=a:1").unwrap()],
            context_manifest: Some(ContextManifest { entries: vec![] }),
            debug: true,
            ..Default::default()
        };
        assert_eq!(request_from_proto(request_to_proto(&request)).unwrap(), request);
        let bad = v1::BuildRequest { outputs: vec!["type=cloud".into()], ..Default::default() };
        assert!(request_from_proto(bad).unwrap_err().to_string().contains("type=cloud"));
        let bad = v1::BuildRequest { platforms: vec!["plan9".into()], ..Default::default() };
        assert!(request_from_proto(bad).unwrap_err().to_string().contains("--platform"));
    }

    #[test]
    fn a_lost_input_stays_a_lost_input_across_the_wire() {
        let lost = Failed::lost_input("layer sha256:ab: no peer has it");
        let received = job_result_from_proto(job_result_to_proto(4, 2, Err(lost.clone()))).unwrap();
        assert_eq!(received, Err(lost));
        let failed = Failed::from("exit code: 1".to_string());
        assert_eq!(job_result_from_proto(job_result_to_proto(4, 2, Err(failed.clone()))).unwrap(), Err(failed));
        let legacy = v1::JobResult { error: "lost input: layer sha256:ab".into(), ..Default::default() };
        assert_eq!(job_result_from_proto(legacy).unwrap(), Err(Failed::lost_input("layer sha256:ab")));
    }

    #[test]
    fn a_jobs_lines_keep_their_stream_across_the_wire() {
        for stream in [LogStream::Stdout, LogStream::Stderr, LogStream::Debug] {
            let line = LogLine { stream, line: "[admission] admitted".into() };
            assert_eq!(log_line_from_proto(job_log_to_proto(1, 2, line.clone())), line);
        }
    }

    #[test]
    fn registrations_name_the_worker_in_their_errors() {
        let info = WorkerInfo {
            name: "w1".into(),
            platforms: vec!["linux/amd64".parse().unwrap()],
            labels: Default::default(),
            max_parallelism: 8,
            capacity: 5,
            free_disk: 7,
            cache_bytes: 3,
            address: "http://127.0.0.1:1".into(),
            entitlements: vec![Entitlement::SecurityInsecure],
        };
        let layers = vec![Digest::of(b"l")];
        let held = vec![HeldWork { work: Digest::of(b"w"), finished: true }];
        let sent = register_to_proto(&info, &layers, &held);
        assert_eq!(register_from_proto(sent.clone()).unwrap(), (info, layers, held));
        let bad = v1::Register { held: vec![v1::HeldWork { work: "nope".into(), finished: false }], ..sent.clone() };
        let error = register_from_proto(bad).unwrap_err().to_string();
        assert!(error.contains("worker w1: a held job"), "{error}");
        let bad = v1::Register { platforms: vec!["plan9".into()], ..sent.clone() };
        let error = register_from_proto(bad).unwrap_err().to_string();
        assert!(error.contains("worker w1") && error.contains("plan9"), "{error}");
        let bad = v1::Register { entitlements: vec!["root".into()], ..sent };
        let error = register_from_proto(bad).unwrap_err().to_string();
        assert!(error.contains("worker w1: entitlements") && error.contains("unknown entitlement \"root\""), "{error}");
    }
}
