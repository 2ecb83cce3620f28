//! `kiln build`: send a build to the daemon (the embedded one unless `--addr`), show its
//! progress, write the metadata file, exit non-zero on failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use kiln_client::{BuildEvent, BuildRequest, Client, UploadStats};
use kiln_model::{CacheDirection, CacheLocation, CacheSpec, NamedContext, OutputSpec};
use kiln_types::MediaTypes;

use crate::embedded;
use crate::exports::{ExportWriter, Piece};
use crate::input::{parse_build_args, read_dockerfile, read_dockerignore};
use crate::progress::{Mode, Renderer, records_json};

/// Arguments of `kiln build`, as `docker buildx build` spells them.
#[derive(Args)]
pub struct BuildArgs {
    /// Build context directory.
    #[arg(default_value = ".")]
    context: PathBuf,
    /// Dockerfile path (default: CONTEXT/Dockerfile; `-` reads standard input).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Image name; without `--output` the image is kept in the daemon's store.
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Stage to build (default: the last one).
    #[arg(long)]
    target: Option<String>,
    /// Build-time variable `KEY=VALUE` (`KEY` alone takes the value from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// Target platforms, comma-separated (default: the daemon's).
    #[arg(long, value_delimiter = ',')]
    platform: Vec<String>,
    #[command(flatten)]
    run: RunArgs,
    /// Import cache: `type=registry,ref=REF`, `type=s3,bucket=B,region=R[,...]` or `type=local,src=DIR`.
    #[arg(long = "cache-from", value_name = "SPEC")]
    cache_from: Vec<String>,
    /// Export cache: `type=registry,ref=REF`, `type=s3,...` or `type=local,dest=DIR`, with `mode=min|max`.
    #[arg(long = "cache-to", value_name = "SPEC")]
    cache_to: Vec<String>,
    /// Output: `type=image,name=REF,push=true`, `type=oci|docker,dest=F.tar`, `type=local,dest=DIR`, `type=tar,dest=F.tar`.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    outputs: Vec<String>,
    /// Shorthand for `--output type=image,push=true` with the `-t` names.
    #[arg(long)]
    push: bool,
    /// Secret for `RUN --mount=type=secret`: `id=ID,src=PATH` or `id=ID,env=VAR`.
    #[arg(long = "secret", value_name = "SPEC")]
    secrets: Vec<String>,
    /// Set a label on the image: `KEY=VALUE`.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// A named context, `NAME=docker-image://REF`, `NAME=URL` (Git or HTTP) or `NAME=DIR`:
    /// what `FROM NAME` and `COPY --from=NAME` mean instead of a stage or image of that name.
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    build_contexts: Vec<String>,
}

/// How `kiln build` and `kiln bake` run their builds.
#[derive(Args)]
pub(crate) struct RunArgs {
    /// Execute every step even when the cache has it.
    #[arg(long)]
    pub no_cache: bool,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub progress: Mode,
    /// Show Kiln's own words on the steps in plain and JSON progress: why a step waiting
    /// for a slot was admitted (docs/parallelism.md).
    /// `KILN_DEBUG=1` (or `true`, `yes`, `on`) does the same.
    #[arg(long, env = "KILN_DEBUG", value_parser = clap::builder::FalseyValueParser::new())]
    pub debug: bool,
    /// Write a JSON summary of the build (one record per vertex; bake: one entry per target)
    /// to this file.
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// At most this many of a build's steps at once.
    #[arg(long = "max-parallelism", value_name = "N")]
    pub max_parallelism: Option<u32>,
    /// Grant an entitlement to the build's steps: `network.host` (`RUN --network=host`) or
    /// `security.insecure` (`RUN --security=insecure`); the daemon's workers must grant it too.
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    pub allow: Vec<kiln_model::Entitlement>,
}

/// Runs `kiln build`; returns whether the build succeeded (errors before it started are `Err`).
pub async fn run(args: BuildArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let context = std::path::absolute(&args.context).context("resolving the context path")?;
    if !context.is_dir() {
        bail!("build context {} is not a directory", context.display());
    }
    let (file_name, dockerfile) = read_dockerfile(&context, args.file.as_deref())?;
    let (dockerignore, _) = read_dockerignore(&context, args.file.as_deref())?;
    let request = BuildRequest {
        dockerfile,
        file_name,
        context,
        dockerignore,
        target: args.target.clone(),
        build_args: parse_build_args(&args.build_args)?,
        platforms: platforms(&args.platform)?,
        no_cache: args.run.no_cache,
        max_parallelism: args.run.max_parallelism.map(|n| n as usize),
        secrets: read_secrets(&args.secrets)?,
        outputs: outputs(&args.outputs, &args.tags, args.push)?,
        context_manifest: None,
        cache_from: caches(&args.cache_from, CacheDirection::From)?,
        cache_to: caches(&args.cache_to, CacheDirection::To)?,
        allow: args.run.allow.iter().copied().collect(),
        cache_group: None,
        // Chosen here, so a client that loses its coordinator can reattach to the build.
        id: Some(kiln_model::new_build_id()),
        attempt: 0,
        // A CI job's trace contains its image build (as buildx honours TRACEPARENT).
        trace: kiln_model::TraceContext::from_env(),
        named_contexts: named_contexts(&args.build_contexts)?,
        labels: labels(&args.labels)?,
        debug: args.run.debug,
    };
    // Refused here, before the context is read or sent, as the daemon would refuse it.
    request.check_bounds()?;
    let client = daemon.connect().await?;
    let renderer = std::sync::Mutex::new(Renderer::new(args.run.progress, args.run.debug));
    let progress = Progress { renderer: &renderer, target: None };
    let contexts = Contexts::new(daemon);
    let outcome = submit(&client, &contexts, request, &progress).await?;
    progress.finish();
    if let Some(path) = &args.run.metadata_file {
        std::fs::write(path, serde_json::to_vec_pretty(&outcome.metadata())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let succeeded = outcome.report(None);
    // Where the build can be looked at, when the daemon serves its web UI.
    if outcome.ran
        && let (Ok(info), Some(id)) = (client.info().await, &outcome.id)
        && let Some(web) = info.web
    {
        eprintln!("web: {web}/builds/{id}");
    }
    Ok(succeeded)
}

/// Where a build's progress goes: the command's one renderer, under the bake target's name.
pub(crate) struct Progress<'a> {
    /// The renderer every build of the command shares.
    pub renderer: &'a std::sync::Mutex<Renderer>,
    /// The bake target (`None` for `kiln build`).
    pub target: Option<&'a str>,
}

impl Progress<'_> {
    fn event(&self, event: &BuildEvent) {
        self.renderer.lock().unwrap_or_else(|p| p.into_inner()).event(self.target, event);
    }

    fn draw(&self) {
        self.renderer.lock().unwrap_or_else(|p| p.into_inner()).draw(false);
    }

    /// Draws the last frame.
    pub fn finish(&self) {
        self.renderer.lock().unwrap_or_else(|p| p.into_inner()).draw(true);
    }
}

/// The contexts a command's builds send, walked and uploaded once per directory and
/// `.dockerignore` (bake's targets often share one), when the daemon is on another machine.
pub(crate) struct Contexts {
    /// Whether contexts travel: the daemon is reached over TCP.
    remote: bool,
    /// One cell per directory and `.dockerignore`: the first build needing it sends it, the
    /// others wait for that (other directories go meanwhile).
    sent: std::sync::Mutex<HashMap<(PathBuf, String), Arc<SendingContext>>>,
}

/// A context being sent, or sent.
type SendingContext = tokio::sync::OnceCell<SentContext>;

#[derive(Clone)]
struct SentContext {
    manifest: kiln_model::ContextManifest,
    walked: Arc<kiln_context::FsContext>,
    stats: UploadStats,
}

impl Contexts {
    pub(crate) fn new(daemon: &embedded::Daemon) -> Contexts {
        let remote = daemon.address.as_deref().is_some_and(|a| !a.starts_with("unix://"));
        Contexts { remote, sent: Default::default() }
    }

    /// A daemon reached over TCP may be on another machine: the request's context, and
    /// those of its `target:` named contexts, are sent content-addressed (only the files it
    /// lacks travel) and the request carries their manifests. Returns the request's own
    /// context's upload.
    fn prepare<'a>(
        &'a self,
        client: &'a Client,
        request: &'a mut BuildRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Option<UploadStats>>> + 'a>> {
        Box::pin(async move {
            if !self.remote {
                return Ok(None);
            }
            let sent = self.send(client, &request.context, &request.dockerignore).await?;
            request.context_manifest = Some(sent.manifest);
            for context in request.named_contexts.values_mut() {
                match context {
                    NamedContext::Target(nested) => drop(self.prepare(client, nested).await?),
                    NamedContext::Local { dir, dockerignore, manifest } => {
                        *manifest = Some(self.send(client, dir, dockerignore).await?.manifest);
                    }
                    NamedContext::Image(_) | NamedContext::Url(_) => {}
                }
            }
            Ok(Some(sent.stats))
        })
    }

    async fn send(&self, client: &Client, dir: &Path, dockerignore: &str) -> anyhow::Result<SentContext> {
        let cell = {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(sent.entry((dir.to_path_buf(), dockerignore.to_string())).or_default())
        };
        cell.get_or_try_init(|| self.walk_and_upload(client, dir, dockerignore)).await.cloned()
    }

    async fn walk_and_upload(&self, client: &Client, dir: &Path, dockerignore: &str) -> anyhow::Result<SentContext> {
        let ignore = kiln_dockerfile::ignore::PatternList::parse_ignore_file(dockerignore)
            .map_err(|e| anyhow::anyhow!(".dockerignore: {e}"))?;
        let owned = dir.to_path_buf();
        let walked = tokio::task::spawn_blocking(move || {
            let walked = kiln_context::FsContext::walk(&owned, &ignore)?;
            Ok::<_, std::io::Error>(match hash_cache_file(&owned) {
                Some(file) => walked.with_hash_cache(kiln_context::HashCache::load(&file)),
                None => walked,
            })
        })
        .await?
        .with_context(|| format!("reading build context {}", dir.display()))?;
        let walked = Arc::new(walked);
        let (manifest, stats) = client.upload_context(Arc::clone(&walked)).await.map_err(anyhow::Error::msg)?;
        // Only a cache: a failure to save it costs the next build a re-read.
        let saving = Arc::clone(&walked);
        let _ = tokio::task::spawn_blocking(move || saving.save_hash_cache()).await;
        Ok(SentContext { manifest, walked, stats })
    }

    /// Sends every context again: a new leader may lack what only the old one received.
    async fn send_again(&self, client: &Client) -> Result<(), kiln_client::ClientError> {
        let walked: Vec<_> = {
            let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            sent.values().filter_map(|cell| Some(Arc::clone(&cell.get()?.walked))).collect()
        };
        for context in walked {
            client.upload_context(context).await?;
        }
        Ok(())
    }
}

/// How a build sent to the daemon ended.
pub(crate) struct Outcome {
    /// The build's id.
    pub id: Option<String>,
    /// Whether the daemon ran it (it then has a history entry).
    pub ran: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// The image (manifest or index) digest, when an image was exported.
    pub image: Option<kiln_types::Digest>,
    /// Every vertex.
    pub records: Vec<kiln_model::VertexRecord>,
    /// The context upload, when the context was sent.
    pub upload: Option<UploadStats>,
}

impl Outcome {
    /// A build refused before it was sent (its request or context could not be made).
    pub(crate) fn refused(error: String) -> Outcome {
        Outcome { id: None, ran: false, error: Some(error), image: None, records: Vec::new(), upload: None }
    }

    /// The metadata file's JSON for this build.
    pub(crate) fn metadata(&self) -> serde_json::Value {
        serde_json::json!({
            "build_id": self.id,
            "vertices": records_json(&self.records),
            "status": if self.error.is_none() { "succeeded" } else { "failed" },
            "error": self.error,
            "containerimage.digest": self.image.map(|d| d.to_string()),
            "context": self.upload,
        })
    }

    /// Prints the build's id and error (`target`: the bake target); whether it succeeded.
    pub(crate) fn report(&self, target: Option<&str>) -> bool {
        let prefix = target.map(|t| format!("target {t}: ")).unwrap_or_default();
        // A build the daemon ran has an entry in its history under this id; a refused or
        // lost one ends with its error alone.
        if self.ran {
            eprintln!("{prefix}build id: {}", self.id.as_deref().unwrap_or_default());
        }
        match &self.error {
            None => true,
            Some(error) => {
                eprintln!("{prefix}ERROR: failed to solve: {error}");
                false
            }
        }
    }
}

/// Sends one build (its contexts first, when they travel) and follows it to the end:
/// progress to `progress`, files written as the daemon streams them, the build followed to a
/// new leader when its replicated coordinator is lost. The outcome is returned however the
/// build ends, a lost connection included; `Err` is an error before the build was sent.
pub(crate) async fn submit(
    client: &Client,
    contexts: &Contexts,
    mut request: BuildRequest,
    progress: &Progress<'_>,
) -> anyhow::Result<Outcome> {
    let upload = contexts.prepare(client, &mut request).await?;
    let writer = ExportWriter::start(&request.outputs)?;
    let mut events = client.build(request.clone()).await.map_err(anyhow::Error::msg)?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut exporting = false;
    let mut ran = false;
    let (mut error, image, records) = loop {
        tokio::select! {
            event = events.next() => match event {
                Ok(Some(BuildEvent::ExportData { output, unpack_into, data, last })) => {
                    exporting = true;
                    writer.send(Piece { output, unpack_into, data, last }).await;
                }
                Ok(Some(BuildEvent::Result { error, image, records })) => {
                    ran = true;
                    progress.event(&BuildEvent::Result { error: error.clone(), image, records: records.clone() });
                    break (error, image, records);
                }
                Ok(Some(event)) => progress.event(&event),
                Ok(None) => break (Some("the daemon closed the build without a result".to_string()), None, Vec::new()),
                // The replicated coordinator that led the build is gone (or leads no more):
                // the client reattaches to the build on the new leader, whose log has the
                // build and every step that finished.
                Err(lost) if request.attempt < MAX_REATTACHMENTS && !exporting && client.survives(&lost) => {
                    request.attempt += 1;
                    let id = request.id.as_deref().unwrap_or_default();
                    eprintln!("the coordinator running the build was lost ({lost}); reattaching to build {id} on the new leader");
                    let resumed = async {
                        contexts.send_again(client).await?;
                        client.build(request.clone()).await
                    };
                    match resumed.await {
                        Ok(resumed) => events = resumed,
                        Err(failed) => break (Some(failed.to_string()), None, Vec::new()),
                    }
                }
                Err(lost) => break (Some(lost.to_string()), None, Vec::new()),
            },
            _ = tick.tick() => progress.draw(),
        }
    };
    if let Err(failed) = writer.finish().await
        && error.is_none()
    {
        error = Some(format!("{failed:#}"));
    }
    Ok(Outcome { id: request.id, ran, error, image, records, upload })
}

/// How many times one build follows its replicated coordinator to a new leader.
const MAX_REATTACHMENTS: u32 = 3;

/// `--platform` values, checked here so a typo is reported before anything is sent.
pub(crate) fn platforms(values: &[String]) -> anyhow::Result<Vec<kiln_types::Platform>> {
    values.iter().filter(|p| !p.is_empty()).map(|p| p.parse().with_context(|| format!("--platform {p}"))).collect()
}

/// `--output` specs with `dest=` made absolute (this client writes them, from the files the
/// daemon streams back), plus the `-t`/`--push` shorthands.
pub(crate) fn outputs(specs: &[String], tags: &[String], push: bool) -> anyhow::Result<Vec<OutputSpec>> {
    let mut outputs = Vec::new();
    for spec in specs {
        let mut output = OutputSpec::parse(spec)?;
        if let Some(dest) = output.dest_mut() {
            *dest = std::path::absolute(&*dest).with_context(|| format!("--output {spec:?}"))?;
        }
        outputs.push(output);
    }
    if outputs.is_empty() {
        for tag in tags {
            outputs.push(OutputSpec::Image { names: vec![tag.clone()], push, media: MediaTypes::Docker });
        }
    } else if push {
        bail!("--push goes with -t NAME, not with --output (use type=image,push=true)");
    }
    Ok(outputs)
}

/// `--label KEY=VALUE` values.
fn labels(values: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    values
        .iter()
        .map(|value| match value.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
            _ => bail!("--label {value:?}: expected KEY=VALUE"),
        })
        .collect()
}

/// `--build-context NAME=docker-image://REF|DIR` values.
fn named_contexts(values: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, NamedContext>> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut named = std::collections::BTreeMap::new();
    for value in values {
        let Some((name, source)) = value.split_once('=').filter(|(name, _)| !name.is_empty()) else {
            bail!("--build-context {value:?}: expected NAME=VALUE");
        };
        let context = named_context(source, &cwd).with_context(|| format!("--build-context {name}"))?;
        if named.insert(name.to_lowercase(), context).is_some() {
            bail!("--build-context {name}: given twice (names are case-insensitive)");
        }
    }
    Ok(named)
}

/// A named context's value (`docker-image://REF` or a directory, relative to `base`), a
/// directory's `.dockerignore` read.
pub(crate) fn named_context(value: &str, base: &Path) -> anyhow::Result<NamedContext> {
    let mut context = NamedContext::parse(value, base).map_err(anyhow::Error::msg)?;
    if let NamedContext::Local { dir, dockerignore, .. } = &mut context {
        *dir = std::path::absolute(&*dir).with_context(|| format!("{value:?}"))?;
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        *dockerignore = read_dockerignore(dir, None)?.0;
    }
    Ok(context)
}

/// Cache specs, with local directories made absolute (the daemon reads and writes them).
pub(crate) fn caches(specs: &[String], direction: CacheDirection) -> anyhow::Result<Vec<CacheSpec>> {
    let mut caches = Vec::new();
    for text in specs {
        let mut spec = CacheSpec::parse(text, direction)?;
        if let CacheLocation::Local { dir, .. } = &mut spec.location {
            *dir = std::path::absolute(&*dir).with_context(|| format!("cache {text:?}"))?;
        }
        caches.push(spec);
    }
    Ok(caches)
}

pub(crate) fn read_secrets(specs: &[String]) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let mut secrets = HashMap::new();
    for spec in specs {
        let fields = kiln_model::spec_fields(spec).map_err(|e| anyhow::anyhow!("--secret {spec}: {e}"))?;
        let fields: HashMap<&str, &str> = fields.iter().filter_map(|p| p.split_once('=')).collect();
        let id = fields.get("id").with_context(|| format!("--secret {spec}: needs id=ID"))?;
        let value = match (fields.get("src").or(fields.get("source")), fields.get("env")) {
            (Some(path), _) => {
                std::fs::read(Path::new(path)).with_context(|| format!("--secret {spec}: reading {path}"))?
            }
            (None, Some(var)) => {
                std::env::var(var).with_context(|| format!("--secret {spec}: ${var} is not set"))?.into_bytes()
            }
            (None, None) => std::env::var(id)
                .map(String::into_bytes)
                .with_context(|| format!("--secret {spec}: needs src=PATH or env=VAR"))?,
        };
        secrets.insert(id.to_string(), value);
    }
    Ok(secrets)
}

/// Where the digests of the files of the context `dir` are remembered between builds:
/// `KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`, under `contexts/`, one
/// file per context directory.
fn hash_cache_file(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let base = env("KILN_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("kiln")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/kiln")))?;
    let canonical = std::fs::canonicalize(dir).ok()?;
    let key = kiln_types::Digest::of(canonical.as_os_str().as_encoded_bytes());
    Some(base.join("contexts").join(format!("{}.json", key.hex())))
}
