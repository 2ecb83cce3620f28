//! Conversion of a Dockerfile into a build graph, one output per requested platform.
//!
//! Stages are dispatched on demand, starting from the target: a stage is converted only
//! when something the target needs refers to it (`FROM <stage>`, `COPY --from`,
//! `RUN --mount from=`), so unused stages never reach the graph. Each stage is converted at
//! most once per platform and a reference back into a stage still being converted is a
//! cycle. Identical work across stages and platforms collapses in the [`GraphBuilder`].

mod copy;
mod dispatch;
mod env;
mod exec;
mod state;

use std::collections::BTreeMap;

use kiln_graph::{Graph, GraphBuilder, Output};
use kiln_types::{ImageReference, Platform};

use crate::context::ContextFiles;
use crate::image::{ImageConfig, ImageMetadata};
use crate::instructions::{Dockerfile, parse_dockerfile};
use crate::shell::Lexer;
use state::StageResult;

/// What to build and with which inputs.
pub struct ConvertOptions<'a> {
    /// File name used in error messages, e.g. `Dockerfile` or `app/Dockerfile.prod`.
    pub file_name: String,
    /// Stage to build (name or index); the last stage when `None`.
    pub target: Option<String>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// Target platforms; the build platform when empty.
    pub platforms: Vec<Platform>,
    /// The platform builds run on (`BUILDPLATFORM`).
    pub build_platform: Platform,
    /// The build context.
    pub context: &'a dyn ContextFiles,
    /// Base image configs known before the build.
    pub images: &'a dyn ImageMetadata,
    /// Named contexts by lowercase name (`--build-context`, bake's `contexts`): a stage of that
    /// name is replaced by it, and `FROM`, `COPY --from` and `--mount from=` naming no stage
    /// find it before trying an image.
    pub named: &'a BTreeMap<String, NamedInput>,
}

/// What a named context stands for in the conversion.
#[derive(Clone)]
pub enum NamedInput {
    /// A local directory: its files are the filesystem, read by a context source vertex
    /// named `source`.
    Local {
        /// The context name the source vertex carries.
        source: String,
        /// The directory's files.
        files: std::sync::Arc<dyn ContextFiles + Send + Sync>,
    },
    /// `docker-image://REF`: the image.
    Image(ImageReference),
    /// A Git URL (checked out) or an HTTP(S) URL (downloaded under its last path segment).
    Url(String),
    /// Bake's `target:NAME`: that build's output for the stage's platform (or its only
    /// output), with its image config; its vertices become part of this graph.
    Plan(std::sync::Arc<BuildPlan>),
}

/// The converted build: a graph plus the image config of each output.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    /// The graph, one output per platform.
    pub graph: Graph,
    /// Image config of each output, in the same order as `graph.outputs`.
    pub images: Vec<ImageConfig>,
    /// Name of the target stage.
    pub target: String,
    /// Non-fatal findings, for people.
    pub warnings: Vec<String>,
}

/// A front-end error, located in the Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct FrontendError {
    /// The Dockerfile's name.
    pub file: String,
    /// The line the error is about, 1-based.
    pub line: Option<usize>,
    /// The stage being converted.
    pub stage: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl FrontendError {
    fn render(&self) -> String {
        let place = match self.line {
            Some(line) => format!("{}:{line}", self.file),
            None => self.file.clone(),
        };
        match &self.stage {
            Some(stage) => format!("{place}: stage {stage}: {}", self.message),
            None => format!("{place}: {}", self.message),
        }
    }
}

/// Why a step of conversion failed: a bare message the caller locates, or an error
/// already located elsewhere (in another stage) that passes through unchanged.
#[derive(Debug)]
pub(crate) enum Failure {
    Message(String),
    Located(FrontendError),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Message(message) => f.write_str(message),
            Failure::Located(error) => error.fmt(f),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Message(message)
    }
}

/// The errors conversion steps meet, each turned into a message the caller locates.
macro_rules! failure_from_display {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Failure {
            fn from(error: $ty) -> Self {
                Failure::Message(error.to_string())
            }
        }
    )*};
}

failure_from_display!(kiln_graph::GraphError, crate::shell::ShellError, crate::context::ContextError);

impl From<FrontendError> for Failure {
    fn from(error: FrontendError) -> Self {
        Failure::Located(error)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::Message(message.to_owned())
    }
}

/// Parses and converts a Dockerfile.
pub fn convert(text: &str, options: &ConvertOptions<'_>) -> Result<BuildPlan, FrontendError> {
    let file_error = |line: Option<usize>, message: String| FrontendError {
        file: options.file_name.clone(),
        line,
        stage: None,
        message,
    };
    let dockerfile = parse_dockerfile(text).map_err(|e| file_error(Some(e.line), e.message))?;
    let target = resolve_target(&dockerfile, options.target.as_deref()).map_err(|m| file_error(None, m))?;
    let platforms =
        if options.platforms.is_empty() { vec![options.build_platform.clone()] } else { options.platforms.clone() };
    let mut builder = GraphBuilder::new();
    let mut outputs = Vec::new();
    let mut images = Vec::new();
    let mut warnings: Vec<String> =
        dockerfile.warnings.iter().map(|w| format!("{}:{}: {}", options.file_name, w.line, w.message)).collect();
    for platform in &platforms {
        let mut converter = Converter::new(&dockerfile, options, platform.clone(), platforms.len() > 1, &mut builder)?;
        let result = converter.stage(target, None)?;
        warnings.append(&mut converter.warnings);
        outputs.push(Output { platform: platform.clone(), digest: result.root });
        images.push(result.config);
    }
    warnings.dedup();
    let graph = builder.finish(outputs);
    Ok(BuildPlan { graph, images, target: dockerfile.stages[target].display_name(), warnings })
}

/// The index of the target stage; the error names the target and is wrapped with the file
/// into a [`FrontendError`] by [`convert`].
fn resolve_target(file: &Dockerfile, target: Option<&str>) -> Result<usize, String> {
    let Some(name) = target else { return Ok(file.stages.len() - 1) };
    let lower = name.to_lowercase();
    if let Some(stage) = file.stages.iter().find(|s| s.from.name.as_deref() == Some(lower.as_str())) {
        return Ok(stage.index);
    }
    let names: Vec<String> = file.stages.iter().filter_map(|s| s.from.name.clone()).collect();
    Err(format!("target stage {name:?} could not be found (stages: {})", names.join(", ")))
}

/// How many stages may be in conversion at once, i.e. the longest chain of stages each
/// needing the next. Stages convert recursively, so the limit keeps a hostile Dockerfile from
/// overflowing the stack (each level costs tens of KiB in a debug build); real Dockerfiles
/// chain a handful of stages.
pub const MAX_STAGE_DEPTH: usize = 32;

/// The most bytes one conversion may produce from expansions, inherited variables and the
/// commands and environments of RUN steps: BuildKit refuses build definitions over 16 MiB
/// (its gRPC message limit), and a bound keeps a small hostile Dockerfile (variables doubled
/// again and again, a large environment copied into every step) from exhausting memory.
pub const MAX_CONVERTED_BYTES: usize = 16 << 20;

/// Per-stage conversion progress, so each stage converts once and cycles are caught.
#[derive(Clone)]
enum Slot {
    Pending,
    InProgress,
    Done(Box<StageResult>),
}

/// Converts the stages of one platform.
pub(crate) struct Converter<'a> {
    file: &'a Dockerfile,
    options: &'a ConvertOptions<'a>,
    target_platform: Platform,
    prefix_platform: bool,
    builder: &'a mut GraphBuilder,
    slots: Vec<Slot>,
    /// Stages being converted, outermost first, to describe cycles.
    stack: Vec<usize>,
    /// Global ARGs with values and the automatic platform ARGs: the FROM environment.
    meta_env: Vec<(String, String)>,
    lexer: Lexer,
    warnings: Vec<String>,
    /// Bytes left of [`MAX_CONVERTED_BYTES`].
    budget: std::cell::Cell<usize>,
}

/// The automatic platform ARGs BuildKit defines.
fn platform_args(build: &Platform, target: &Platform) -> Vec<(String, String)> {
    let mut args = Vec::new();
    for (prefix, p) in [("BUILD", build), ("TARGET", target)] {
        args.push((format!("{prefix}PLATFORM"), p.to_string()));
        args.push((format!("{prefix}OS"), p.os.clone()));
        args.push((format!("{prefix}ARCH"), p.architecture.clone()));
        args.push((format!("{prefix}VARIANT"), p.variant.clone().unwrap_or_default()));
    }
    args
}

impl<'a> Converter<'a> {
    fn new(
        file: &'a Dockerfile,
        options: &'a ConvertOptions<'a>,
        target_platform: Platform,
        prefix_platform: bool,
        builder: &'a mut GraphBuilder,
    ) -> Result<Self, FrontendError> {
        let lexer = Lexer::new(file.directives.escape);
        let mut meta_env = platform_args(&options.build_platform, &target_platform);
        for (decl, line) in &file.meta_args {
            let value = match (options.build_args.get(&decl.key), &decl.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(default)) => Some(lexer.process_word(default, &meta_env).map_err(|e| FrontendError {
                    file: options.file_name.clone(),
                    line: Some(*line),
                    stage: None,
                    message: e.to_string(),
                })?),
                (None, None) => None,
            };
            if let Some(v) = value {
                meta_env.push((decl.key.clone(), v));
            }
        }
        Ok(Converter {
            file,
            options,
            target_platform,
            prefix_platform,
            builder,
            slots: vec![Slot::Pending; file.stages.len()],
            stack: Vec::new(),
            meta_env,
            lexer,
            warnings: Vec::new(),
            budget: std::cell::Cell::new(MAX_CONVERTED_BYTES),
        })
    }

    /// Counts `bytes` against [`MAX_CONVERTED_BYTES`]; the error is located by the caller.
    pub(crate) fn charge(&self, bytes: usize) -> Result<(), Failure> {
        match self.budget.get().checked_sub(bytes) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(format!(
                "the build definition grows past {} MiB here (expanded variables and the commands and \
                 environments of its steps), BuildKit's limit",
                MAX_CONVERTED_BYTES >> 20
            )
            .into()),
        }
    }

    /// Converts stage `index` (once) and returns its result. `referrer` is the stage and
    /// line that needs it, for the cycle error.
    pub(crate) fn stage(
        &mut self,
        index: usize,
        referrer: Option<(&str, usize)>,
    ) -> Result<StageResult, FrontendError> {
        match &self.slots[index] {
            Slot::Done(result) => return Ok((**result).clone()),
            Slot::InProgress => {
                let start = self.stack.iter().position(|&i| i == index).unwrap_or(0);
                let chain: Vec<String> =
                    self.stack[start..].iter().chain([&index]).map(|&i| self.file.stages[i].display_name()).collect();
                let message = format!("stage cycle: {} (a stage cannot depend on itself)", chain.join(" -> "));
                return Err(self.referrer_error(referrer, message));
            }
            Slot::Pending => {}
        }
        if self.stack.len() >= MAX_STAGE_DEPTH {
            let message = format!(
                "stage dependency chain is deeper than {MAX_STAGE_DEPTH} stages (FROM <stage>, COPY --from and --mount from= chains)"
            );
            return Err(self.referrer_error(referrer, message));
        }
        self.slots[index] = Slot::InProgress;
        self.stack.push(index);
        let result = self.dispatch_stage(index);
        self.stack.pop();
        let result = result?;
        self.slots[index] = Slot::Done(Box::new(result.clone()));
        Ok(result)
    }

    /// An error located at the instruction that referred to a stage (none for the target).
    fn referrer_error(&self, referrer: Option<(&str, usize)>, message: String) -> FrontendError {
        let (stage, line) = referrer.map_or((None, None), |(s, l)| (Some(s.to_owned()), Some(l)));
        FrontendError { file: self.options.file_name.clone(), line, stage, message }
    }

    /// The named context called `name`, if any.
    pub(crate) fn named(&self, name: &str) -> Option<&'a NamedInput> {
        self.options.named.get(&name.to_lowercase())
    }

    /// What the named context `name` stands for on `platform`: an image's source vertex
    /// (`meta` names it), or the output of another build, whose vertices join this graph.
    pub(crate) fn named_result(
        &mut self,
        name: &str,
        input: &NamedInput,
        platform: &Platform,
        meta: kiln_graph::VertexMeta,
    ) -> Result<StageResult, Failure> {
        let (op, config) = match input {
            NamedInput::Image(reference) => {
                let op = kiln_graph::Op::Source(kiln_graph::SourceOp::Image {
                    reference: reference.clone(),
                    platform: platform.clone(),
                });
                (op, self.options.images.config(reference, platform).unwrap_or_default())
            }
            NamedInput::Url(url) => {
                let op = if copy::is_git(url) { copy::git_op(url, false) } else { copy::http_op(url, None).0 };
                (op, ImageConfig::default())
            }
            NamedInput::Local { source, files } => {
                let everything = vec![String::new()];
                let selected =
                    crate::context::select(files.as_ref(), &everything, &crate::ignore::PatternList::default())?;
                let content = crate::context::selection_digest(files.as_ref(), &selected)?;
                let op = kiln_graph::Op::Source(kiln_graph::SourceOp::Local {
                    name: source.clone(),
                    include: everything,
                    exclude: Vec::new(),
                    content,
                });
                (op, ImageConfig::default())
            }
            NamedInput::Plan(plan) => {
                let outputs = &plan.graph.outputs;
                let index = outputs
                    .iter()
                    .position(|o| o.platform == *platform)
                    .or((outputs.len() == 1).then_some(0))
                    .ok_or_else(|| {
                        let built: Vec<String> = outputs.iter().map(|o| o.platform.to_string()).collect();
                        format!(
                            "named context {name}: target {} is built for {}, not {platform}",
                            plan.target,
                            built.join(", ")
                        )
                    })?;
                self.builder.import(&plan.graph)?;
                let output = &outputs[index];
                let config = plan.images.get(index).cloned().unwrap_or_default();
                return Ok(StageResult {
                    root: output.digest,
                    config,
                    env: Default::default(),
                    platform: output.platform.clone(),
                });
            }
        };
        let root = self.builder.add(op, vec![], meta)?;
        Ok(StageResult { root: Some(root), config, env: Default::default(), platform: platform.clone() })
    }

    /// Finds a stage by name or, when `allow_index`, by number.
    pub(crate) fn find_stage(&self, name: &str, before: Option<usize>, allow_index: bool) -> Option<usize> {
        let limit = before.unwrap_or(self.file.stages.len());
        if allow_index && let Ok(i) = name.parse::<usize>() {
            return (i < self.file.stages.len()).then_some(i);
        }
        let lower = name.to_lowercase();
        self.file.stages[..limit].iter().find(|s| s.from.name.as_deref() == Some(lower.as_str())).map(|s| s.index)
    }
}

#[cfg(test)]
mod tests;
