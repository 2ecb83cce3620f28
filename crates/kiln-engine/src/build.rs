//! One build: context, two-pass conversion, solve, export.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cluster::ClusterBuild;
use kiln_context::{BuildContext, ContextManifest, FsContext, StoredContext};
use kiln_dockerfile::ignore::PatternList;
use kiln_dockerfile::image::{ImageConfig, ImageMetadata};
use kiln_dockerfile::{BuildPlan, ConvertOptions, NamedInput, convert};
use kiln_graph::{Op, SourceOp};
use kiln_model::{BuildEvent, BuildRequest, LogSink, NamedContext, VertexRecord};
use kiln_solver::{BuildHandle, BuildOptions, Event};
use kiln_types::{Digest, ImageReference, Platform};
use kiln_worker::BuildInputs;
use tokio::sync::mpsc;

use crate::cache::VertexOutputs;
use crate::error::BuildError;
use crate::history::{self, Bases};
use crate::{Engine, Mode};

/// What a coordinator's workers need of a build: its contexts (sent with context sources)
/// and secrets (sent with RUN steps).
#[derive(Debug, Default)]
pub struct ClusterData {
    /// Context manifests by name; their files are blobs in the coordinator's store.
    pub contexts: HashMap<String, Arc<ContextManifest>>,
    /// Secrets by id, while the build runs: recipes kept for recomputing its results hold
    /// this data after it ended, its secrets not.
    secrets: std::sync::Mutex<HashMap<String, Vec<u8>>>,
    /// The build's cache group: its jobs' cache mounts are the group's.
    pub cache_group: Option<String>,
}

impl ClusterData {
    /// A build's data.
    pub fn new(
        contexts: HashMap<String, Arc<ContextManifest>>,
        secrets: HashMap<String, Vec<u8>>,
        cache_group: Option<String>,
    ) -> ClusterData {
        ClusterData { contexts, secrets: std::sync::Mutex::new(secrets), cache_group }
    }

    /// The secrets a step mounts (those the build has).
    pub fn secrets_for(&self, ids: &[&str]) -> HashMap<String, Vec<u8>> {
        let secrets = self.secrets.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().filter_map(|id| secrets.get(*id).map(|value| (id.to_string(), value.clone()))).collect()
    }

    /// Drops the secrets: the build ended.
    fn forget_secrets(&self) {
        self.secrets.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The context a `target:` named context's build reads: the files a worker materialises
/// for its context source vertices (the build's own context is the one named `context`).
#[derive(Clone)]
struct NestedContext {
    files: Arc<dyn BuildContext>,
    /// On a coordinator, its uploaded manifest.
    manifest: Option<Arc<ContextManifest>>,
}

/// Nested builds' and directory contexts by the digest of the context source vertices that
/// read them: workers look a context source up by its vertex digest first, then by its name
/// (the build's own context, `context`).
type NestedContexts = HashMap<Digest, NestedContext>;

/// [`Engine::plan_named`]'s future.
type PlanningNamed<'a> = std::pin::Pin<
    Box<
        dyn Future<
                Output = Result<
                    (BTreeMap<String, NamedInput>, NestedContexts, HashMap<String, NestedContext>),
                    BuildError,
                >,
            > + Send
            + 'a,
    >,
>;

/// A finished build.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    /// Every vertex.
    pub records: Vec<VertexRecord>,
    /// The image (manifest or index) digest, when an image was exported.
    pub image: Option<Digest>,
    /// The files written into the build's spool, in output order.
    pub files: Vec<SpooledFile>,
}

/// A file output written into the spool for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledFile {
    /// The output (index into [`BuildRequest::outputs`]).
    pub output: usize,
    /// `type=local`: a tar to unpack into this directory under the output's `dest` (`""`:
    /// `dest` itself). Other types: `None`, the file is `dest`.
    pub unpack_into: Option<String>,
    /// Where it is in the spool.
    pub path: PathBuf,
}

/// Each vertex's cache key and result as the solver made it, and (on a cluster) the build's
/// results as layers, for the cache export.
enum Solved {
    Local(VertexOutputs<kiln_worker::Snapshot>),
    Cluster(VertexOutputs<kiln_model::Layers>, Vec<Option<kiln_model::Layers>>),
}

/// A failed build: the message names the step, its Dockerfile line and output.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BuildFailure {
    /// What went wrong.
    pub message: String,
    /// Every vertex, as far as the build got.
    pub records: Vec<VertexRecord>,
}

impl BuildFailure {
    fn early(message: impl Into<String>) -> BuildFailure {
        BuildFailure { message: message.into(), records: Vec::new() }
    }
}

/// Base image configs resolved before the second conversion pass (none in the first: an
/// unknown image has an empty config there).
struct ResolvedImages(HashMap<(String, Platform), ImageConfig>);

impl ImageMetadata for ResolvedImages {
    fn config(&self, reference: &ImageReference, platform: &Platform) -> Option<ImageConfig> {
        self.0.get(&(reference.to_string(), platform.clone())).cloned()
    }
}

impl Engine {
    /// Runs a build to the end, sending progress as it goes. On a standalone daemon the
    /// build holds every layer it uses until it ends; then garbage collection runs if the
    /// store may be over its limits (`kiln du` after the build sees the result).
    pub async fn build(
        &self,
        request: BuildRequest,
        spool: Option<&Path>,
        progress: mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<BuildSummary, BuildFailure> {
        let hold = self.gc.as_ref().map(|_| Arc::new(self.stores.snapshots().hold()));
        let result = self.build_holding(request, spool, progress, hold.clone()).await;
        if let Some(hold) = hold {
            hold.release();
        }
        if let Some(gc) = &self.gc {
            // Runs on; what it removed matters to nobody here.
            drop(gc.collect_soon().await);
        }
        result
    }

    async fn build_holding(
        &self,
        request: BuildRequest,
        spool: Option<&Path>,
        progress: mpsc::UnboundedSender<BuildEvent>,
        hold: Option<Arc<kiln_layer::Hold>>,
    ) -> Result<BuildSummary, BuildFailure> {
        self.check_caches(&request).map_err(|e| BuildFailure::early(e.to_string()))?;
        let context = self.context(&request).await.map_err(|e| BuildFailure::early(e.to_string()))?;
        let (plan, bases, nested) =
            self.plan(&request, &context).await.map_err(|e| BuildFailure::early(e.to_string()))?;
        if let Mode::Local(_) = self.mode {
            self.check_platforms(&plan).map_err(|e| BuildFailure::early(e.to_string()))?;
        }
        self.check_entitlements(&request, &plan).map_err(|e| BuildFailure::early(e.to_string()))?;
        let _ = progress.send(BuildEvent::Planned(plan.graph.vertices.iter().map(VertexRecord::planned).collect()));

        let options = BuildOptions {
            no_cache: request.no_cache,
            max_parallelism: request.max_parallelism,
            cache_group: request.cache_group.clone(),
            name: request.id.clone(),
        };
        let graph = plan.graph.clone();
        let imports = self.import_caches(&request, &progress).await;
        let solved = async {
            Ok(match &self.mode {
                Mode::Local(solver) => {
                    let mut contexts = HashMap::from([("context".to_string(), context)]);
                    contexts.extend(nested.iter().map(|(source, c)| (source.to_string(), Arc::clone(&c.files))));
                    let inputs = BuildInputs {
                        contexts,
                        secrets: request.secrets.clone(),
                        cache: imports.records(),
                        hold,
                        cache_group: request.cache_group.clone(),
                    };
                    let (result, records, outputs) =
                        follow(solver.submit(graph, options, Arc::new(inputs)), &progress).await?;
                    let counts = outputs.iter().map(|(d, (_, s))| (*d, s.layers.len())).collect();
                    match result {
                        Ok(results) => (results, counts, records, Solved::Local(outputs)),
                        Err(message) => return Err(BuildFailure { message, records }),
                    }
                }
                Mode::Cluster { solver, cluster, fetcher } => {
                    let manifest = request.context_manifest.clone().unwrap_or_default();
                    let mut contexts = HashMap::from([("context".to_string(), Arc::new(manifest))]);
                    contexts.extend(
                        nested.iter().filter_map(|(source, c)| Some((source.to_string(), c.manifest.clone()?))),
                    );
                    let data = ClusterData::new(contexts, request.secrets.clone(), request.cache_group.clone());
                    let id = self.next_build.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let cache_group = request.cache_group.clone();
                    let build = Arc::new(ClusterBuild { id, data, imports: imports.lookup(), cache_group });
                    let handle = solver.submit(graph, options, Arc::clone(&build));
                    let followed = follow(handle, &progress).await;
                    // Its recipes outlive it; its secrets do not.
                    build.data.forget_secrets();
                    let (result, records, outputs) = followed?;
                    let counts: HashMap<Digest, usize> =
                        outputs.iter().map(|(d, (_, l))| (*d, l.layers.len())).collect();
                    let layers = match result {
                        Ok(layers) => layers,
                        Err(message) => return Err(BuildFailure { message, records }),
                    };
                    // Files and tarballs are exported here: bring the result layers from the
                    // workers holding them. Pushes go from the workers (`push_from_workers`).
                    let results = if pushes_only(&request) {
                        vec![None; layers.len()]
                    } else {
                        match self.fetch_results(cluster, fetcher.as_ref(), &layers, &progress).await {
                            Ok(results) => results,
                            Err(error) => return Err(BuildFailure { message: error.to_string(), records }),
                        }
                    };
                    (results, counts, records, Solved::Cluster(outputs, layers))
                }
            })
        }
        .await;
        // The cache entries this build made are durable before anyone hears it is done,
        // succeeded or failed (a daemon killed right after would otherwise lose them to
        // sled's periodic flush).
        let kv = Arc::clone(&self.kv);
        let flushed = tokio::task::spawn_blocking(move || kv.flush()).await;
        let (results, vertex_layers, records, outputs) = solved?;
        let flushed = flushed.map_err(BuildError::from).and_then(|flushed| flushed.map_err(BuildError::from));
        if let Err(error) = flushed {
            return Err(BuildFailure { message: error.to_string(), records });
        }
        let exported = async {
            let pushed = match (&self.mode, &outputs) {
                (Mode::Cluster { cluster, .. }, Solved::Cluster(_, layers))
                    if pushes_only(&request) && !request.outputs.is_empty() =>
                {
                    self.push_from_workers(cluster, &plan, layers, &vertex_layers, &bases, &request, &progress).await?
                }
                _ => None,
            };
            let (image, files) = match (pushed, &self.mode, &outputs) {
                (Some(image), _, _) => (image, Vec::new()),
                // The workers could not push: bring the layers here and push from here.
                (None, Mode::Cluster { cluster, fetcher, .. }, Solved::Cluster(_, layers))
                    if pushes_only(&request) && !request.outputs.is_empty() =>
                {
                    let results = self.fetch_results(cluster, fetcher.as_ref(), layers, &progress).await?;
                    self.export(&plan, &results, &vertex_layers, &bases, &request, spool, &progress).await?
                }
                _ => self.export(&plan, &results, &vertex_layers, &bases, &request, spool, &progress).await?,
            };
            match &outputs {
                Solved::Local(outputs) => {
                    self.export_caches(&request, &plan, &records, outputs, &results, &progress).await?;
                }
                Solved::Cluster(outputs, layers) => {
                    self.export_caches(&request, &plan, &records, outputs, layers, &progress).await?;
                }
            }
            Ok::<_, BuildError>((image, files))
        };
        match exported.await {
            Ok((image, files)) => Ok(BuildSummary { records, image, files }),
            Err(error) => Err(BuildFailure { message: error.to_string(), records }),
        }
    }

    /// Brings every result's layers here from the workers holding them.
    async fn fetch_results(
        &self,
        cluster: &Arc<kiln_cluster::Cluster<ClusterData>>,
        fetcher: &dyn kiln_worker::BlobFetcher,
        layers: &[Option<kiln_model::Layers>],
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<Vec<Option<kiln_worker::Snapshot>>, BuildError> {
        let step = self.step(progress, "fetching result layers from workers");
        let mut results = Vec::with_capacity(layers.len());
        for output in layers {
            results.push(match output {
                Some(output) => Some(self.fetch_result(cluster, fetcher, output.clone()).await?),
                None => None,
            });
        }
        step.done();
        Ok(results)
    }

    /// Brings a result's layers here from the workers holding them (recomputing them first
    /// when they were lost with their worker; once more if a holder vanishes meanwhile).
    pub(crate) async fn fetch_result(
        &self,
        cluster: &Arc<kiln_cluster::Cluster<ClusterData>>,
        fetcher: &dyn kiln_worker::BlobFetcher,
        output: kiln_model::Layers,
    ) -> Result<kiln_worker::Snapshot, BuildError> {
        let logs = LogSink::discard();
        let mut attempt = 0;
        loop {
            let recovered = Arc::clone(cluster).recover(output.clone(), logs.clone()).await;
            let layers = recovered?;
            let sources = layers.layers.iter().map(|l| (l.diff_id, cluster.holders(&l.diff_id))).collect();
            let tier = layers.layers.iter().filter_map(|l| Some((l.diff_id, cluster.tier_blob(&l.diff_id)?))).collect();
            match self.stores.ensure_layers(&layers.layers, &sources, &tier, fetcher).await {
                Ok(snapshot) => return Ok(snapshot),
                Err(_) if attempt < 2 => attempt += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// The build context: an uploaded manifest over this engine's blob store (every file
    /// must have been uploaded), or a directory on this machine.
    async fn context(&self, request: &BuildRequest) -> Result<Arc<dyn BuildContext>, BuildError> {
        if let Some(manifest) = &request.context_manifest {
            // Every file must have been sent by the build's own cache group.
            let group = request.cache_group.as_deref();
            let blobs = manifest.blobs().into_iter().map(|(digest, _)| digest).collect();
            if let Some(digest) = self.not_uploaded(group, blobs).await?.first().copied() {
                let path = manifest
                    .entries
                    .iter()
                    .find(|e| matches!(&e.kind, kiln_context::ManifestKind::File { digest: d, .. } if *d == digest))
                    .map_or("?", |e| e.path.as_str());
                return Err(BuildError::NotUploaded { path: path.to_string(), digest });
            }
            return Ok(Arc::new(StoredContext::new(manifest, Arc::clone(self.stores.cas()))));
        }
        if matches!(self.mode, Mode::Cluster { .. }) {
            return Err(BuildError::LocalContextOnCoordinator);
        }
        let ignore = PatternList::parse_ignore_file(&request.dockerignore)?;
        let context_dir = request.context.clone();
        let context = tokio::task::spawn_blocking(move || FsContext::walk(&context_dir, &ignore))
            .await?
            .map_err(|source| BuildError::Context { path: request.context.clone(), source })?;
        Ok(Arc::new(context))
    }

    /// Every RUN must be for a platform this engine runs; never a silent fallback to another.
    /// Refuses, before anything runs, a build with a step that needs an entitlement the
    /// client did not allow (`--allow`), or that no worker for its platform grants.
    fn check_entitlements(&self, request: &BuildRequest, plan: &BuildPlan) -> Result<(), BuildError> {
        // A coordinator's workers, listed once, when a step needs an entitlement.
        let mut workers = None;
        for vertex in &plan.graph.vertices {
            let Op::Exec(exec) = &vertex.op else { continue };
            for entitlement in kiln_model::Entitlement::needed_by(&vertex.op) {
                let (name, flag) = (vertex.meta.name.clone(), entitlement.flag());
                if !request.allow.contains(&entitlement) {
                    return Err(BuildError::NotAllowed { vertex: name, flag, entitlement });
                }
                let (granted, by) = match &self.mode {
                    Mode::Local(_) => (self.entitlements.contains(&entitlement), "this daemon".to_string()),
                    Mode::Cluster { cluster, .. } => (
                        workers.get_or_insert_with(|| cluster.workers()).iter().any(|w| {
                            w.info.platforms.contains(&exec.platform) && w.info.entitlements.contains(&entitlement)
                        }),
                        format!("any worker for {}", exec.platform),
                    ),
                };
                if !granted {
                    return Err(BuildError::NotGranted { vertex: name, flag, entitlement, by });
                }
            }
        }
        Ok(())
    }

    fn check_platforms(&self, plan: &BuildPlan) -> Result<(), BuildError> {
        for vertex in &plan.graph.vertices {
            if let Op::Exec(exec) = &vertex.op
                && !self.platforms.contains(&exec.platform)
            {
                let available: Vec<String> = self.platforms.iter().map(|p| p.to_string()).collect();
                return Err(BuildError::Platform {
                    vertex: vertex.meta.name.clone(),
                    platform: exec.platform.to_string(),
                    available: available.join(", "),
                });
            }
        }
        Ok(())
    }

    /// Converts the Dockerfile, resolving the base images' configs in between; `target:`
    /// named contexts are planned first, each a build of its own whose graph joins this one.
    async fn plan(
        &self,
        request: &BuildRequest,
        context: &Arc<dyn BuildContext>,
    ) -> Result<(BuildPlan, Bases, NestedContexts), BuildError> {
        let (named, mut nested, locals) = self.plan_named(request).await?;
        let first = convert_blocking(request, context, ResolvedImages(HashMap::new()), &named).await?;
        // Each (reference, platform) is one source vertex: the graph already merged repeats.
        let wanted: Vec<(ImageReference, Platform)> = first
            .graph
            .vertices
            .iter()
            .filter_map(|v| match &v.op {
                Op::Source(SourceOp::Image { reference, platform }) => Some((reference.clone(), platform.clone())),
                _ => None,
            })
            .collect();
        if wanted.is_empty() {
            check_layer_depth(&first, &HashMap::new())?;
            let mut plan = first;
            label(&mut plan, request);
            nested.extend(local_sources(&plan, &locals));
            return Ok((plan, Bases::default(), nested));
        }
        let registry = self.stores.registry();
        let cas = self.stores.cas();
        let mut configs = HashMap::new();
        let mut bases = Bases::default();
        let mut base_layers = HashMap::new();
        for (reference, platform) in wanted {
            let image = registry.resolve(&reference, &platform, cas).await?;
            let config = serde_json::from_value(image.config.config.clone()).unwrap_or_default();
            bases
                .histories
                .insert((reference.to_string(), platform.clone()), history::from_config(&image.config.history));
            bases.digests.insert((reference.clone(), platform.clone()), image.manifest_digest);
            base_layers.insert((reference.clone(), platform.clone()), image.manifest.layers.len());
            configs.insert((reference.to_string(), platform), config);
        }
        let mut plan = convert_blocking(request, context, ResolvedImages(configs), &named).await?;
        check_layer_depth(&plan, &base_layers)?;
        label(&mut plan, request);
        nested.extend(local_sources(&plan, &locals));
        Ok((plan, bases, nested))
    }

    /// What the request's named contexts stand for in its conversion. A `target:` context
    /// is planned as a build of its own (with its own context, for the request's platforms
    /// unless it names its own, in the request's cache group); its context sources are read
    /// from its context. A directory is read as a context of its own, whose source vertex
    /// carries the name `context:NAME` (the third map). Boxed: a nested plan may have
    /// targets of its own.
    fn plan_named<'a>(&'a self, request: &'a BuildRequest) -> PlanningNamed<'a> {
        Box::pin(self.plan_named_inner(request))
    }

    async fn plan_named_inner(
        &self,
        request: &BuildRequest,
    ) -> Result<(BTreeMap<String, NamedInput>, NestedContexts, HashMap<String, NestedContext>), BuildError> {
        let mut named = BTreeMap::new();
        let mut contexts = NestedContexts::new();
        let mut locals = HashMap::new();
        for (name, context) in &request.named_contexts {
            let input = match context {
                NamedContext::Image(reference) => NamedInput::Image(reference.clone()),
                NamedContext::Url(url) => NamedInput::Url(url.clone()),
                NamedContext::Local { dir, dockerignore, manifest } => {
                    let directory = BuildRequest {
                        context: dir.clone(),
                        dockerignore: dockerignore.clone(),
                        context_manifest: manifest.clone(),
                        cache_group: request.cache_group.clone(),
                        ..BuildRequest::default()
                    };
                    let files = self
                        .context(&directory)
                        .await
                        .map_err(|source| BuildError::NamedContext { name: name.clone(), source: Box::new(source) })?;
                    let source = format!("context:{name}");
                    let local = NestedContext { files: Arc::clone(&files), manifest: manifest.clone().map(Arc::new) };
                    locals.insert(source.clone(), local);
                    NamedInput::Local { source, files }
                }
                NamedContext::Target(target) => {
                    let mut target = (**target).clone();
                    if target.platforms.is_empty() {
                        target.platforms = request.platforms.clone();
                    }
                    target.cache_group = request.cache_group.clone();
                    let planned = async {
                        let files = self.context(&target).await?;
                        let (plan, _, inner) = self.plan(&target, &files).await?;
                        Ok::<_, BuildError>((plan, files, inner))
                    };
                    let (plan, files, inner) = planned
                        .await
                        .map_err(|source| BuildError::NamedContext { name: name.clone(), source: Box::new(source) })?;
                    let mut plan = plan;
                    // Its steps show whose they are in the using build's progress.
                    for vertex in &mut plan.graph.vertices {
                        vertex.meta.name = format!("[{name}] {}", vertex.meta.name);
                    }
                    let own = NestedContext { files, manifest: target.context_manifest.clone().map(Arc::new) };
                    for vertex in &plan.graph.vertices {
                        if let Op::Source(SourceOp::Local { .. }) = &vertex.op {
                            let source = inner.get(&vertex.digest).unwrap_or(&own);
                            contexts.insert(vertex.digest, source.clone());
                        }
                    }
                    NamedInput::Plan(Arc::new(plan))
                }
            };
            named.insert(name.clone(), input);
        }
        Ok((named, contexts, locals))
    }
}

/// The directories of named contexts by the digest of the source vertices reading them
/// (`locals`: by the name those vertices carry).
fn local_sources<'a>(
    plan: &'a BuildPlan,
    locals: &'a HashMap<String, NestedContext>,
) -> impl Iterator<Item = (Digest, NestedContext)> + 'a {
    plan.graph.vertices.iter().filter_map(|vertex| match &vertex.op {
        Op::Source(SourceOp::Local { name, .. }) => Some((vertex.digest, locals.get(name)?.clone())),
        _ => None,
    })
}

/// Sets the request's `--label`s on every output's image config, over the Dockerfile's (as
/// BuildKit's `label:` options do; a target using this build as a named context inherits
/// them).
fn label(plan: &mut BuildPlan, request: &BuildRequest) {
    for image in &mut plan.images {
        image.labels.extend(request.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// Refuses, before anything runs, a build whose steps would stack more layers than one
/// overlay mount can ([`kiln_layer::MAX_LAYERS`]). Each RUN or file step is counted as a
/// layer (one that changes nothing adds none, so this is an upper bound), a base image as
/// its manifest's layers, a context as one.
fn check_layer_depth(
    plan: &BuildPlan,
    base_layers: &HashMap<(ImageReference, Platform), usize>,
) -> Result<(), BuildError> {
    let mut depth: HashMap<Digest, usize> = HashMap::with_capacity(plan.graph.vertices.len());
    for vertex in &plan.graph.vertices {
        let inputs: Vec<usize> = vertex.inputs.iter().map(|d| depth.get(d).copied().unwrap_or(0)).collect();
        let on = |input: &kiln_graph::Input| match input {
            kiln_graph::Input::Index(i) => inputs.get(*i).copied().unwrap_or(0),
            kiln_graph::Input::Scratch => 0,
        };
        // A step mounts every input (its root read-write, the others as views).
        let mounted = inputs.iter().copied().max().unwrap_or(0);
        if matches!(vertex.op, Op::Exec(_) | Op::File(_)) && mounted > kiln_layer::MAX_LAYERS {
            let lines = vertex.meta.lines.map(|(start, _)| format!(" (line {start})")).unwrap_or_default();
            return Err(BuildError::TooDeep { vertex: format!("{}{lines}", vertex.meta.name), depth: mounted });
        }
        let own = match &vertex.op {
            Op::Source(SourceOp::Image { reference, platform }) => {
                base_layers.get(&(reference.clone(), platform.clone())).copied().unwrap_or(0)
            }
            Op::Source(_) => 1,
            Op::Merge(_) => inputs.iter().sum(),
            Op::Exec(exec) => on(&exec.rootfs) + 1,
            Op::File(file) => on(&file.base) + 1,
        };
        depth.insert(vertex.digest, own);
    }
    Ok(())
}

/// Converts off the async threads: the front end reads and hashes the context files a COPY
/// selects (cached in the context, so the second pass reads nothing again).
async fn convert_blocking(
    request: &BuildRequest,
    context: &Arc<dyn BuildContext>,
    images: ResolvedImages,
    named: &BTreeMap<String, NamedInput>,
) -> Result<BuildPlan, BuildError> {
    let named = named.clone();
    let (dockerfile, context) = (request.dockerfile.clone(), Arc::clone(context));
    let (file_name, target) = (request.file_name.clone(), request.target.clone());
    let (build_args, platforms) = (request.build_args.clone(), request.platforms.clone());
    tokio::task::spawn_blocking(move || {
        let options = ConvertOptions {
            file_name,
            target,
            build_args,
            platforms,
            build_platform: Platform::host(),
            context: context.as_ref(),
            images: &images,
            named: &named,
        };
        convert(&dockerfile, &options)
    })
    .await?
    .map_err(BuildError::from)
}

/// Follows a build's events to the end, forwarding progress: its result (the error as the
/// solver's `Event::Finished` words it, naming the failed vertex), records and every
/// vertex's cache key and output.
async fn follow<O>(
    mut handle: BuildHandle<O>,
    progress: &mpsc::UnboundedSender<BuildEvent>,
) -> Result<(Result<Vec<Option<O>>, String>, Vec<VertexRecord>, VertexOutputs<O>), BuildFailure> {
    let mut outputs = HashMap::new();
    loop {
        match handle.events.recv().await {
            Some(Event::Progress(event)) => drop(progress.send(event)),
            Some(Event::Output { vertex, key, output }) => drop(outputs.insert(vertex, (key, output))),
            Some(Event::Finished(result, records)) => return Ok((result, records, outputs)),
            None => return Err(BuildFailure::early("the solver stopped")),
        }
    }
}

/// Whether every output is an image push (or there is none): then a cluster's workers push
/// the layers and nothing needs to be brought to the coordinator.
fn pushes_only(request: &BuildRequest) -> bool {
    request.outputs.iter().all(|o| matches!(o, kiln_model::OutputSpec::Image { push: true, .. }))
}
