//! `kiln build`: send a build to the daemon (the embedded one unless `--addr`), show its
//! progress, write the metadata file, exit non-zero on failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use kiln_client::{BuildEvent, BuildRequest};
use kiln_model::{CacheDirection, CacheLocation, CacheSpec, OutputSpec};
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
    /// Execute every step even when the cache has it.
    #[arg(long)]
    no_cache: bool,
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
    /// Progress output.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    progress: Mode,
    /// Write a JSON summary of the build (one record per vertex) to this file.
    #[arg(long = "metadata-file", value_name = "FILE")]
    metadata_file: Option<PathBuf>,
    /// At most this many of this build's steps at once.
    #[arg(long = "max-parallelism", value_name = "N")]
    max_parallelism: Option<u32>,
    /// Secret for `RUN --mount=type=secret`: `id=ID,src=PATH` or `id=ID,env=VAR`.
    #[arg(long = "secret", value_name = "SPEC")]
    secrets: Vec<String>,
    /// Grant an entitlement to the build's steps: `network.host` (`RUN --network=host`) or
    /// `security.insecure` (`RUN --security=insecure`); the daemon's workers must grant it too.
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    allow: Vec<kiln_model::Entitlement>,
}

/// Runs `kiln build`; returns whether the build succeeded (errors before it started are `Err`).
pub async fn run(args: BuildArgs, daemon: &embedded::Daemon) -> anyhow::Result<bool> {
    let context = std::path::absolute(&args.context).context("resolving the context path")?;
    if !context.is_dir() {
        bail!("build context {} is not a directory", context.display());
    }
    let (file_name, dockerfile) = read_dockerfile(&context, args.file.as_deref())?;
    let (dockerignore, _) = read_dockerignore(&context, args.file.as_deref())?;
    let mut request = BuildRequest {
        dockerfile,
        file_name,
        context,
        dockerignore,
        target: args.target.clone(),
        build_args: parse_build_args(&args.build_args)?,
        platforms: platforms(&args.platform)?,
        no_cache: args.no_cache,
        max_parallelism: args.max_parallelism.map(|n| n as usize),
        secrets: read_secrets(&args.secrets)?,
        outputs: outputs(&args)?,
        context_manifest: None,
        cache_from: caches(&args.cache_from, CacheDirection::From)?,
        cache_to: caches(&args.cache_to, CacheDirection::To)?,
        allow: args.allow.iter().copied().collect(),
        cache_group: None,
        // Chosen here, so a client that loses its coordinator can reattach to the build.
        id: Some(kiln_model::new_build_id()),
        attempt: 0,
        // A CI job's trace contains its image build (as buildx honours TRACEPARENT).
        trace: kiln_model::TraceContext::from_env(),
    };
    // Refused here, before the context is read or sent, as the daemon would refuse it.
    request.check_bounds()?;
    let client = daemon.connect().await?;
    // A daemon reached over TCP may be on another machine: send the context, content-addressed
    // (only the files it lacks travel).
    let mut upload = None;
    let mut walked_context = None;
    if daemon.address.as_deref().is_some_and(|a| !a.starts_with("unix://")) {
        let ignore = kiln_dockerfile::ignore::PatternList::parse_ignore_file(&request.dockerignore)
            .map_err(|e| anyhow::anyhow!(".dockerignore: {e}"))?;
        let dir = request.context.clone();
        let walked = tokio::task::spawn_blocking(move || {
            let walked = kiln_context::FsContext::walk(&dir, &ignore)?;
            Ok::<_, std::io::Error>(match hash_cache_file(&dir) {
                Some(file) => walked.with_hash_cache(kiln_context::HashCache::load(&file)),
                None => walked,
            })
        })
        .await?
        .with_context(|| format!("reading build context {}", request.context.display()))?;
        let walked = std::sync::Arc::new(walked);
        let (manifest, stats) =
            client.upload_context(std::sync::Arc::clone(&walked)).await.map_err(anyhow::Error::msg)?;
        // Only a cache: a failure to save it costs the next build a re-read.
        let saving = std::sync::Arc::clone(&walked);
        let _ = tokio::task::spawn_blocking(move || saving.save_hash_cache()).await;
        request.context_manifest = Some(manifest);
        upload = Some(stats);
        walked_context = Some(walked);
    }
    let writer = ExportWriter::start(&request.outputs)?;
    let mut events = client.build(request.clone()).await.map_err(anyhow::Error::msg)?;
    let mut renderer = Renderer::new(args.progress);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut exporting = false;
    // The metadata file is written however the build ends, a lost connection included.
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
                    renderer.event(&BuildEvent::Result { error: error.clone(), image, records: records.clone() });
                    break (error, image, records);
                }
                Ok(Some(event)) => renderer.event(&event),
                Ok(None) => break (Some("the daemon closed the build without a result".to_string()), None, Vec::new()),
                // The replicated coordinator that led the build is gone (or leads no more):
                // the client reattaches to the build on the new leader, whose log has the
                // build and every step that finished.
                Err(lost) if request.attempt < MAX_REATTACHMENTS && !exporting && client.survives(&lost) => {
                    request.attempt += 1;
                    let id = request.id.as_deref().unwrap_or_default();
                    eprintln!("the coordinator running the build was lost ({lost}); reattaching to build {id} on the new leader");
                    let resumed = async {
                        if let Some(walked) = &walked_context {
                            // The new leader may lack what only the old one received.
                            client.upload_context(std::sync::Arc::clone(walked)).await?;
                        }
                        client.build(request.clone()).await
                    };
                    match resumed.await {
                        Ok(resumed) => events = resumed,
                        Err(failed) => break (Some(failed.to_string()), None, Vec::new()),
                    }
                }
                Err(lost) => break (Some(lost.to_string()), None, Vec::new()),
            },
            _ = tick.tick() => renderer.draw(false),
        }
    };
    renderer.draw(true);
    if let Err(failed) = writer.finish().await
        && error.is_none()
    {
        error = Some(format!("{failed:#}"));
    }
    if let Some(path) = &args.metadata_file {
        let metadata = serde_json::json!({
            "build_id": request.id,
            "vertices": records_json(&records),
            "status": if error.is_none() { "succeeded" } else { "failed" },
            "error": error,
            "containerimage.digest": image.map(|d| d.to_string()),
            "context": upload,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&metadata)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // A build the daemon ran has an entry in its history under this id; a refused or lost
    // one ends with its error alone.
    if ran {
        eprintln!("build id: {}", request.id.as_deref().unwrap_or_default());
    }
    match error {
        None => Ok(true),
        Some(error) => {
            eprintln!("ERROR: failed to solve: {error}");
            Ok(false)
        }
    }
}

/// How many times one build follows its replicated coordinator to a new leader.
const MAX_REATTACHMENTS: u32 = 3;

/// `--output` specs with `dest=` made absolute (this client writes them, from the files the
/// daemon streams back), plus the `-t`/`--push` shorthands.
/// `--platform` values, checked here so a typo is reported before anything is sent.
fn platforms(values: &[String]) -> anyhow::Result<Vec<kiln_types::Platform>> {
    values.iter().filter(|p| !p.is_empty()).map(|p| p.parse().with_context(|| format!("--platform {p}"))).collect()
}

fn outputs(args: &BuildArgs) -> anyhow::Result<Vec<OutputSpec>> {
    let mut outputs = Vec::new();
    for spec in &args.outputs {
        let mut output = OutputSpec::parse(spec)?;
        if let Some(dest) = output.dest_mut() {
            *dest = std::path::absolute(&*dest).with_context(|| format!("--output {spec:?}"))?;
        }
        outputs.push(output);
    }
    if outputs.is_empty() {
        for tag in &args.tags {
            outputs.push(OutputSpec::Image { names: vec![tag.clone()], push: args.push, media: MediaTypes::Docker });
        }
    } else if args.push {
        bail!("--push goes with -t NAME, not with --output (use type=image,push=true)");
    }
    Ok(outputs)
}

/// Cache specs, with local directories made absolute (the daemon reads and writes them).
fn caches(specs: &[String], direction: CacheDirection) -> anyhow::Result<Vec<CacheSpec>> {
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

fn read_secrets(specs: &[String]) -> anyhow::Result<HashMap<String, Vec<u8>>> {
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
