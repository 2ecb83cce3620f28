//! `kiln plan`: parse, convert and print the build graph (text, JSON or DOT).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use kiln_context::FsContext;
use kiln_dockerfile::ignore::PatternList;
use kiln_dockerfile::image::NoImageMetadata;
use kiln_dockerfile::{ConvertOptions, convert};
use kiln_graph::{render_dot, render_json, render_text};
use kiln_types::Platform;

/// Arguments of `kiln plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// Build context directory.
    #[arg(default_value = ".")]
    context: PathBuf,
    /// Dockerfile path (default: CONTEXT/Dockerfile; `-` reads standard input).
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Stage to build (default: the last one).
    #[arg(long)]
    target: Option<String>,
    /// Build-time variable `KEY=VALUE` (`KEY` alone takes the value from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    build_args: Vec<String>,
    /// Target platforms, comma-separated (default: this machine's).
    #[arg(long, value_delimiter = ',')]
    platform: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
    Dot,
}

/// Runs `kiln plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let (file_name, text) = read_dockerfile(&args.context, args.file.as_deref())?;
    let ignore = read_dockerignore(&args.context, args.file.as_deref())?;
    let context = FsContext::walk(&args.context, &ignore)
        .with_context(|| format!("reading build context {}", args.context.display()))?;
    let platforms =
        args.platform.iter().filter(|p| !p.is_empty()).map(|p| p.parse::<Platform>()).collect::<Result<Vec<_>, _>>()?;
    let options = ConvertOptions {
        file_name,
        target: args.target,
        build_args: parse_build_args(&args.build_args)?,
        platforms,
        build_platform: Platform::host(),
        context: &context,
        images: &NoImageMetadata,
    };
    let plan = convert(&text, &options)?;
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    match args.format {
        Format::Text => print!("{}", render_text(&plan.graph)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&render_json(&plan.graph))?),
        Format::Dot => print!("{}", render_dot(&plan.graph)),
    }
    Ok(())
}

fn read_dockerfile(context: &Path, file: Option<&Path>) -> anyhow::Result<(String, String)> {
    if file == Some(Path::new("-")) {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the Dockerfile from standard input")?;
        return Ok(("<stdin>".to_owned(), text));
    }
    let path = file.map_or_else(|| context.join("Dockerfile"), Path::to_path_buf);
    let bytes = std::fs::read(&path).with_context(|| format!("reading Dockerfile {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not valid UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to()))?;
    Ok((path.display().to_string(), text))
}

/// `<Dockerfile>.dockerignore` next to the Dockerfile wins over `CONTEXT/.dockerignore`.
fn read_dockerignore(context: &Path, file: Option<&Path>) -> anyhow::Result<PatternList> {
    let mut candidates = Vec::new();
    if let Some(f) = file.filter(|f| *f != Path::new("-")) {
        let mut name = f.as_os_str().to_owned();
        name.push(".dockerignore");
        candidates.push(PathBuf::from(name));
    }
    candidates.push(context.join(".dockerignore"));
    for path in candidates {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return PatternList::parse_ignore_file(&text).with_context(|| format!("in {}", path.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(PatternList::default())
}

fn parse_build_args(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut args = BTreeMap::new();
    for item in raw {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match std::env::var(item) {
                Ok(v) => (item.clone(), v),
                Err(_) => continue,
            },
        };
        if key.is_empty() {
            bail!("--build-arg {item:?}: the name is empty");
        }
        args.insert(key, value);
    }
    Ok(args)
}
