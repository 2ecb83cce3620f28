//! `kiln bake`: build the targets of bake files (buildx's HCL and JSON), every requested
//! target sent at once. A `target:NAME` context is that target's build inside the using
//! target's graph (never pushed and pulled), so the vertices targets share have one digest and
//! the daemon's in-flight table runs each once, wherever the targets run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use kiln_bake::{BakeFile, Override, Target};
use kiln_client::BuildRequest;
use kiln_model::{CacheDirection, NamedContext};

use crate::build::{self, Contexts, Outcome, Progress, RunArgs};
use crate::embedded;
use crate::input::read_dockerignore;
use crate::progress::Renderer;

/// The files read without `-f`, in buildx's order (later ones override earlier ones).
const DEFAULT_FILES: [&str; 8] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
    "docker-bake.json",
    "docker-bake.hcl",
    "docker-bake.override.json",
    "docker-bake.override.hcl",
];

/// Arguments of `kiln bake`, as `docker buildx bake` spells them.
#[derive(Args)]
pub struct BakeArgs {
    /// Targets or groups to build (default: the `default` group).
    targets: Vec<String>,
    /// Bake file: HCL, JSON or compose (repeatable; default: compose.yaml, docker-bake.json,
    /// docker-bake.hcl and the others buildx reads, those present).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Override a target attribute: `PATTERN.KEY[.NAME][+]=VALUE` (`*.platform=linux/arm64`).
    #[arg(long = "set", value_name = "PATTERN.KEY=VALUE")]
    set: Vec<String>,
    /// Print the resolved targets as JSON (buildx's shape) and build nothing.
    #[arg(long)]
    print: bool,
    /// Push every target's `tags` (shorthand for `--set *.output=type=registry`).
    #[arg(long)]
    push: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// Runs `kiln bake`; returns whether every target succeeded.
pub async fn run(args: BakeArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let files = read_files(&args.files)?;
    let env = |name: &str| std::env::var(name).ok();
    let definition = kiln_bake::load(&files, &env)?;
    let overrides =
        args.set.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    let resolved = kiln_bake::resolve(&definition, &args.targets, &overrides).map_err(anyhow::Error::msg)?;
    if args.print {
        let printed = kiln_bake::print(&definition, &args.targets, &resolved);
        println!("{}", serde_json::to_string_pretty(&printed)?);
        return Ok(true);
    }
    let requested = kiln_bake::targets_of(&definition, &args.targets).map_err(anyhow::Error::msg)?;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let mut requests = Vec::new();
    let mut made = Requests { resolved: &resolved, cwd: &cwd, args: &args, made: BTreeMap::new() };
    for name in &requested {
        let (mut request, _) = made.request(name)?;
        request.id = Some(kiln_model::new_build_id());
        request.trace = kiln_model::TraceContext::from_env();
        request.check_bounds().with_context(|| format!("target {name}"))?;
        requests.push((name.clone(), request));
    }
    let client = daemon.connect().await?;
    let renderer = std::sync::Mutex::new(Renderer::new(args.run.progress, args.run.debug));
    let contexts = Contexts::new(daemon);
    let builds = requests.into_iter().map(|(name, request)| {
        let (client, contexts, renderer) = (&client, &contexts, &renderer);
        async move {
            let progress = Progress { renderer, target: Some(&name) };
            let outcome = build::submit(client, contexts, request, &progress).await;
            (name, outcome)
        }
    });
    let finished = futures_util::future::join_all(builds).await;
    Progress { renderer: &renderer, target: None }.finish();
    let mut metadata = serde_json::Map::new();
    let mut succeeded = true;
    for (name, outcome) in finished {
        let outcome = outcome.unwrap_or_else(|error| Outcome::refused(format!("{error:#}")));
        succeeded &= outcome.report(Some(&name));
        let mut entry = outcome.metadata();
        let names: Vec<&str> = resolved[&name].tags.iter().map(String::as_str).collect();
        if !names.is_empty() {
            entry["image.name"] = names.join(",").into();
        }
        metadata.insert(name, entry);
    }
    if let Some(path) = &args.run.metadata_file {
        std::fs::write(path, serde_json::to_vec_pretty(&metadata)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(succeeded)
}

/// The bake files: those given, else the default ones present (none: an error, as buildx).
fn read_files(given: &[PathBuf]) -> anyhow::Result<Vec<BakeFile>> {
    let paths: Vec<PathBuf> = if given.is_empty() {
        let present: Vec<PathBuf> = DEFAULT_FILES.iter().map(PathBuf::from).filter(|p| p.is_file()).collect();
        if present.is_empty() {
            bail!("no bake file found (looked for {})", DEFAULT_FILES.join(", "));
        }
        present
    } else {
        given.to_vec()
    };
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(BakeFile { name: path.display().to_string(), text })
        })
        .collect()
}

/// The build requests of targets, each made once: a target used as a context by several
/// others is one request, copied into each.
struct Requests<'a> {
    resolved: &'a BTreeMap<String, Target>,
    cwd: &'a Path,
    args: &'a BakeArgs,
    /// Requests made, with the number of builds each holds (itself and its nested ones).
    made: BTreeMap<String, (BuildRequest, usize)>,
}

impl Requests<'_> {
    /// The build request of target `name`, its `target:` contexts as nested requests (cycles
    /// were refused by [`kiln_bake::resolve`]), and the number of builds it holds. A nested
    /// target's secrets go to the request that holds it (the daemon mounts a build's
    /// secrets into all of its steps, nested ones included).
    fn request(&mut self, name: &str) -> anyhow::Result<(BuildRequest, usize)> {
        if let Some(made) = self.made.get(name) {
            return Ok(made.clone());
        }
        let target = self.resolved.get(name).with_context(|| format!("no target named {name:?}"))?;
        let fail = |what: String| format!("target {name}: {what}");
        let mut request = request_for(target, name, self.cwd, self.args)?;
        let mut builds = 1;
        for (context_name, source) in &target.contexts {
            let context = match source.strip_prefix("target:") {
                Some(linked) => {
                    let (mut nested, count) = self.request(linked)?;
                    builds += count;
                    if builds > kiln_model::bounds::NAMED_CONTEXTS {
                        bail!(fail(format!(
                            "its target: contexts hold more than {} builds",
                            kiln_model::bounds::NAMED_CONTEXTS
                        )));
                    }
                    for (id, value) in std::mem::take(&mut nested.secrets) {
                        match request.secrets.get(&id) {
                            Some(ours) if *ours != value => bail!(fail(format!(
                                "secret {id:?} differs from the one of target {linked} (contexts.{context_name})"
                            ))),
                            _ => drop(request.secrets.insert(id, value)),
                        }
                    }
                    NamedContext::Target(Box::new(nested))
                }
                None => {
                    build::named_context(source, self.cwd).with_context(|| fail(format!("contexts.{context_name}")))?
                }
            };
            if request.named_contexts.insert(context_name.to_lowercase(), context).is_some() {
                bail!(fail(format!(
                    "two contexts are named {:?} (names are case-insensitive)",
                    context_name.to_lowercase()
                )));
            }
        }
        self.made.insert(name.to_string(), (request.clone(), builds));
        Ok((request, builds))
    }
}

/// The build request of one target, without its named contexts.
fn request_for(target: &Target, name: &str, cwd: &Path, args: &BakeArgs) -> anyhow::Result<BuildRequest> {
    let fail = |what: String| format!("target {name}: {what}");
    let context = cwd.join(target.context.as_deref().unwrap_or("."));
    if !context.is_dir() {
        bail!(fail(format!("context {} is not a directory", context.display())));
    }
    let (file_name, dockerfile, file) = match (&target.dockerfile_inline, &target.dockerfile) {
        (Some(inline), _) => (format!("{name} (dockerfile-inline)"), inline.clone(), None),
        (None, dockerfile) => {
            let path = context.join(dockerfile.as_deref().unwrap_or("Dockerfile"));
            let text = std::fs::read_to_string(&path).with_context(|| fail(format!("reading {}", path.display())))?;
            (path.display().to_string(), text, Some(path))
        }
    };
    let (dockerignore, _) =
        read_dockerignore(&context, file.as_deref()).with_context(|| fail("reading .dockerignore".into()))?;
    let bare_registry =
        |spec: &String| if spec.contains('=') { spec.clone() } else { format!("type=registry,ref={spec}") };
    let cache_from: Vec<String> = target.cache_from.iter().map(bare_registry).collect();
    let cache_to: Vec<String> = target.cache_to.iter().map(bare_registry).collect();
    // `--push` is buildx's `--set *.output=type=registry`: the tags, pushed, whatever the
    // file's outputs. `type=cacheonly` exports nothing.
    let outputs = if args.push {
        if target.tags.is_empty() {
            bail!(fail("--push needs tags to push to".into()));
        }
        build::outputs(&[], &target.tags, true)
    } else if !target.output.is_empty() && target.output.iter().all(|o| o.contains("type=cacheonly")) {
        Ok(Vec::new())
    } else {
        let outputs: Vec<String> = target.output.iter().filter(|o| !o.contains("type=cacheonly")).cloned().collect();
        build::outputs(&outputs, &target.tags, false)
    };
    Ok(BuildRequest {
        dockerfile,
        file_name,
        context,
        dockerignore,
        target: target.target.clone(),
        build_args: target.args.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect(),
        platforms: build::platforms(&target.platforms).with_context(|| fail("platforms".into()))?,
        no_cache: args.run.no_cache || target.no_cache == Some(true),
        max_parallelism: args.run.max_parallelism.map(|n| n as usize),
        secrets: build::read_secrets(&target.secret).with_context(|| fail("secret".into()))?,
        outputs: outputs.with_context(|| fail("output".into()))?,
        cache_from: build::caches(&cache_from, CacheDirection::From).with_context(|| fail("cache-from".into()))?,
        cache_to: build::caches(&cache_to, CacheDirection::To).with_context(|| fail("cache-to".into()))?,
        allow: args.run.allow.iter().copied().collect(),
        labels: target.labels.iter().filter_map(|(k, v)| Some((k.clone(), v.clone()?))).collect(),
        debug: args.run.debug,
        ..BuildRequest::default()
    })
}
