//! `kiln plan`: parse, convert and print the build graph (text, JSON or DOT).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use kiln_context::FsContext;
use kiln_dockerfile::image::NoImageMetadata;
use kiln_dockerfile::{ConvertOptions, convert};
use kiln_graph::{render_dot, render_json, render_text};
use kiln_types::Platform;

use crate::input::{parse_build_args, read_dockerfile, read_dockerignore};

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
    let ignore = read_dockerignore(&args.context, args.file.as_deref())?.1;
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
        named: &Default::default(),
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
