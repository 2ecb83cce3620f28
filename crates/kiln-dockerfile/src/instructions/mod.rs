//! Typed instructions and stages, from raw parser nodes (BuildKit's `instructions` package).
//!
//! Arguments stay unexpanded here: expansion needs the stage environment, which only
//! [`crate::convert`] knows. This layer checks what can be checked without it: argument
//! counts, flags, stage names, JSON forms, mount specs and ONBUILD triggers.
//!
//! The per-instruction helpers return a message; [`parse_instruction`]'s caller wraps it
//! into [`InstructionError`] with the file, line and instruction, the typed error callers see.

mod flags;
mod mount;

use kiln_graph::{NetworkMode, SecurityMode};

use crate::parser::{self, Ast, Directives, Heredoc, Node, Warning};
use flags::{FlagKind, Flags};
pub use mount::{MountType, RunMount, parse_mount};

/// A `key=value` pair from ENV or LABEL, unexpanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key as written.
    pub key: String,
    /// The value as written (quotes included).
    pub value: String,
}

/// One name declared by ARG, with its default as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The name.
    pub key: String,
    /// The default value as written, if any.
    pub default: Option<String>,
}

/// A command line in shell or exec form, with its heredocs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    /// Exec-form argv, or the single shell-form string.
    pub args: Vec<String>,
    /// Shell form: the shell is prepended at conversion.
    pub prepend_shell: bool,
    /// Heredocs opened on the line.
    pub heredocs: Vec<Heredoc>,
}

/// `FROM [--platform=P] image [AS name]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromClause {
    /// Base image or stage, unexpanded.
    pub image: String,
    /// Lowercased stage name.
    pub name: Option<String>,
    /// `--platform` value, unexpanded.
    pub platform: Option<String>,
}

/// `RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The command.
    pub command: CommandLine,
    /// `--mount` specs, unexpanded (parsed again after expansion).
    pub mounts: Vec<String>,
    /// `--network`.
    pub network: NetworkMode,
    /// `--security`.
    pub security: SecurityMode,
}

/// `COPY` and `ADD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCopy {
    /// Source paths, URLs or heredoc names, unexpanded.
    pub sources: Vec<String>,
    /// Destination, unexpanded.
    pub dest: String,
    /// Heredocs used as sources.
    pub heredocs: Vec<Heredoc>,
    /// `--from` (COPY only).
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents` (COPY only).
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `--keep-git-dir` (ADD only).
    pub keep_git_dir: bool,
    /// `--checksum` (ADD only).
    pub checksum: Option<String>,
    /// `--unpack` (ADD only); `None` means "unpack local archives".
    pub unpack: Option<bool>,
    /// This is an ADD.
    pub is_add: bool,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", argv...]` or `["CMD-SHELL", line]`, as in the image config.
    pub test: Vec<String>,
    /// `--interval` in nanoseconds.
    pub interval: Option<u64>,
    /// `--timeout` in nanoseconds.
    pub timeout: Option<u64>,
    /// `--start-period` in nanoseconds.
    pub start_period: Option<u64>,
    /// `--start-interval` in nanoseconds.
    pub start_interval: Option<u64>,
    /// `--retries`.
    pub retries: Option<u32>,
}

/// A typed instruction inside a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `RUN`.
    Run(Run),
    /// `CMD`.
    Cmd(CommandLine),
    /// `ENTRYPOINT`.
    Entrypoint(CommandLine),
    /// `LABEL`.
    Label(Vec<KeyValue>),
    /// `MAINTAINER`.
    Maintainer(String),
    /// `EXPOSE`, unexpanded words.
    Expose(Vec<String>),
    /// `ENV`.
    Env(Vec<KeyValue>),
    /// `ADD` or `COPY`.
    AddCopy(AddCopy),
    /// `VOLUME`, unexpanded.
    Volume(Vec<String>),
    /// `USER`, unexpanded.
    User(String),
    /// `WORKDIR`, unexpanded.
    Workdir(String),
    /// `ARG`.
    Arg(Vec<ArgDecl>),
    /// `ONBUILD`: the trigger as written.
    Onbuild(String),
    /// `STOPSIGNAL`, unexpanded.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `SHELL`.
    Shell(Vec<String>),
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The instruction.
    pub instruction: Instruction,
    /// Uppercase keyword, e.g. `RUN`.
    pub keyword: String,
    /// The logical line as written.
    pub original: String,
    /// First line, 1-based.
    pub start_line: usize,
    /// Last line, 1-based.
    pub end_line: usize,
}

/// A build stage: a FROM and the instructions up to the next FROM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Position among stages, from 0.
    pub index: usize,
    /// The FROM instruction.
    pub from: FromClause,
    /// Line of the FROM, 1-based.
    pub line: usize,
    /// Instructions after the FROM.
    pub commands: Vec<Command>,
}

impl Stage {
    /// The name used in progress output: the `AS` name or `stage-N`.
    pub fn display_name(&self) -> String {
        self.from.name.clone().unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// A whole Dockerfile split into global ARGs and stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// Directives from the top of the file.
    pub directives: Directives,
    /// ARGs before the first FROM, with their lines.
    pub meta_args: Vec<(ArgDecl, usize)>,
    /// Stages in file order.
    pub stages: Vec<Stage>,
    /// Non-fatal findings.
    pub warnings: Vec<Warning>,
}

/// An instruction-level error with its line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct InstructionError {
    /// First line of the offending instruction, 1-based.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl From<parser::ParseError> for InstructionError {
    fn from(e: parser::ParseError) -> Self {
        InstructionError { line: e.line, message: e.message }
    }
}

/// Parses text all the way to typed stages.
pub fn parse_dockerfile(text: &str) -> Result<Dockerfile, InstructionError> {
    let ast = parser::parse(text)?;
    split_stages(ast)
}

fn split_stages(ast: Ast) -> Result<Dockerfile, InstructionError> {
    let mut file = Dockerfile { directives: ast.directives, meta_args: vec![], stages: vec![], warnings: ast.warnings };
    for node in &ast.nodes {
        let err = |message: String| InstructionError { line: node.start_line, message };
        if node.instruction == "from" {
            let from = parse_from(node).map_err(err)?;
            let index = file.stages.len();
            file.stages.push(Stage { index, from, line: node.start_line, commands: vec![] });
            continue;
        }
        let instruction = parse_instruction(node).map_err(err)?;
        match (file.stages.last_mut(), instruction) {
            (Some(stage), instruction) => stage.commands.push(command(node, instruction)),
            (None, Instruction::Arg(decls)) => {
                file.meta_args.extend(decls.into_iter().map(|d| (d, node.start_line)));
            }
            (None, _) => {
                let keyword = node.instruction.to_uppercase();
                return Err(err(format!("{keyword} comes before the first FROM: only ARG may precede FROM")));
            }
        }
    }
    if file.stages.is_empty() {
        let line = ast.nodes.last().map_or(1, |n| n.end_line);
        return Err(InstructionError {
            line,
            message: "no FROM instruction: a Dockerfile needs at least one stage".into(),
        });
    }
    Ok(file)
}

fn command(node: &Node, instruction: Instruction) -> Command {
    Command {
        instruction,
        keyword: node.instruction.to_uppercase(),
        original: node.original.clone(),
        start_line: node.start_line,
        end_line: node.end_line,
    }
}

/// Types one node (anything but FROM).
pub fn parse_instruction(node: &Node) -> Result<Instruction, String> {
    let keyword = node.instruction.to_uppercase();
    let no_flags = || Flags::parse(&node.flags, &[]);
    let instruction = match node.instruction.as_str() {
        "run" => Instruction::Run(parse_run(node)?),
        "cmd" => {
            no_flags()?;
            Instruction::Cmd(command_line(node))
        }
        "entrypoint" => {
            no_flags()?;
            Instruction::Entrypoint(command_line(node))
        }
        "label" | "env" => {
            no_flags()?;
            let pairs = key_values(node, &keyword)?;
            if keyword == "ENV" { Instruction::Env(pairs) } else { Instruction::Label(pairs) }
        }
        "maintainer" => Instruction::Maintainer(exactly_one(node, &keyword)?),
        "expose" => {
            no_flags()?;
            at_least_one(node, &keyword)?;
            Instruction::Expose(node.args.clone())
        }
        "add" | "copy" => Instruction::AddCopy(parse_add_copy(node)?),
        "volume" => {
            no_flags()?;
            at_least_one(node, &keyword)?;
            Instruction::Volume(node.args.clone())
        }
        "user" => Instruction::User(exactly_one(node, &keyword)?),
        "workdir" => Instruction::Workdir(exactly_one(node, &keyword)?),
        "arg" => Instruction::Arg(parse_arg(node)?),
        "onbuild" => Instruction::Onbuild(parse_onbuild(node)?),
        "stopsignal" => Instruction::StopSignal(exactly_one(node, &keyword)?),
        "healthcheck" => Instruction::Healthcheck(parse_healthcheck(node)?),
        "shell" => Instruction::Shell(parse_shell(node)?),
        "from" => return Err("FROM is not allowed here".into()),
        other => return Err(unknown_instruction(other)),
    };
    Ok(instruction)
}

const KEYWORDS: [&str; 18] = [
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

fn unknown_instruction(word: &str) -> String {
    let upper = word.to_uppercase();
    let close = KEYWORDS.iter().find(|k| edit_distance(k, word) <= 2);
    match close {
        Some(k) => format!("unknown instruction: {upper} (did you mean {}?)", k.to_uppercase()),
        None => format!("unknown instruction: {upper}"),
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut row = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            row.push((prev[j] + cost).min(prev[j + 1] + 1).min(row[j] + 1));
        }
        prev = row;
    }
    prev[b.len()]
}

fn at_least_one(node: &Node, keyword: &str) -> Result<(), String> {
    if node.args.is_empty() {
        return Err(format!("{keyword} requires at least one argument"));
    }
    Ok(())
}

fn exactly_one(node: &Node, keyword: &str) -> Result<String, String> {
    Flags::parse(&node.flags, &[])?;
    match node.args.as_slice() {
        [one] if !one.is_empty() => Ok(one.clone()),
        _ => Err(format!("{keyword} requires exactly one argument")),
    }
}

fn command_line(node: &Node) -> CommandLine {
    let args = if node.json { node.args.clone() } else { node.args.iter().take(1).cloned().collect() };
    CommandLine { args, prepend_shell: !node.json, heredocs: node.heredocs.clone() }
}

fn key_values(node: &Node, keyword: &str) -> Result<Vec<KeyValue>, String> {
    if node.args.is_empty() {
        return Err(format!("{keyword} requires at least one argument"));
    }
    let mut pairs = Vec::new();
    for triple in node.args.chunks(3) {
        let [key, value, _sep] = triple else {
            return Err(format!("{keyword}: malformed key/value list"));
        };
        if key.is_empty() {
            return Err(format!("{keyword} names can not be blank"));
        }
        pairs.push(KeyValue { key: key.clone(), value: value.clone() });
    }
    Ok(pairs)
}

fn parse_from(node: &Node) -> Result<FromClause, String> {
    let flags = Flags::parse(&node.flags, &[("platform", FlagKind::String)])?;
    let (image, name) = match node.args.as_slice() {
        [image] => (image.clone(), None),
        [image, as_word, name] if as_word.eq_ignore_ascii_case("as") => (image.clone(), Some(name.to_lowercase())),
        _ => return Err("FROM requires either one argument, or three: FROM <source> [AS <name>]".into()),
    };
    if let Some(name) = &name
        && !valid_stage_name(name)
    {
        return Err(format!(
            "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
        ));
    }
    Ok(FromClause { image, name, platform: flags.string("platform") })
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn parse_run(node: &Node) -> Result<Run, String> {
    let spec = [
        ("mount", FlagKind::List),
        ("network", FlagKind::String),
        ("security", FlagKind::String),
        ("device", FlagKind::List),
    ];
    let flags = Flags::parse(&node.flags, &spec)?;
    let network = match flags.string("network").as_deref() {
        None | Some("default") => NetworkMode::Default,
        Some("none") => NetworkMode::None,
        Some("host") => NetworkMode::Host,
        Some(other) => return Err(format!("unsupported network mode {other:?} (expected default, none or host)")),
    };
    let security = match flags.string("security").as_deref() {
        None | Some("sandbox") => SecurityMode::Sandbox,
        Some("insecure") => SecurityMode::Insecure,
        Some(other) => return Err(format!("unsupported security mode {other:?} (expected sandbox or insecure)")),
    };
    if !flags.list("device").is_empty() {
        return Err("RUN --device is not supported by Kiln".into());
    }
    let mounts = flags.list("mount");
    for spec in &mounts {
        // Checked once without expansion so that structural errors carry the line early.
        parse_mount(spec, &mut |v| Ok(v.to_owned())).map_err(|e| format!("--mount: {e}"))?;
    }
    let command = command_line(node);
    if command.args.is_empty() && !node.json {
        return Err("RUN requires at least one argument".into());
    }
    Ok(Run { command, mounts, network, security })
}

fn parse_add_copy(node: &Node) -> Result<AddCopy, String> {
    let is_add = node.instruction == "add";
    let keyword = if is_add { "ADD" } else { "COPY" };
    let spec: &[(&str, FlagKind)] = if is_add {
        &[
            ("chown", FlagKind::String),
            ("chmod", FlagKind::String),
            ("link", FlagKind::Bool),
            ("keep-git-dir", FlagKind::Bool),
            ("checksum", FlagKind::String),
            ("unpack", FlagKind::Bool),
            ("exclude", FlagKind::List),
        ]
    } else {
        &[
            ("from", FlagKind::String),
            ("chown", FlagKind::String),
            ("chmod", FlagKind::String),
            ("link", FlagKind::Bool),
            ("parents", FlagKind::Bool),
            ("exclude", FlagKind::List),
        ]
    };
    let flags = Flags::parse(&node.flags, spec)?;
    let heredoc_count = node.heredocs.len();
    if node.args.len() < 2 && !(node.args.len() == 1 && heredoc_count > 0) {
        return Err(format!(
            "{keyword} requires at least two arguments, but only {} provided: the destination could not be determined",
            if node.args.is_empty() { "none was".to_owned() } else { "one was".to_owned() }
        ));
    }
    let (dest, sources) = node.args.split_last().map(|(d, s)| (d.clone(), s.to_vec())).unwrap_or_default();
    let unpack = flags.string("unpack").map(|v| v == "true").or(if flags.bool("unpack") { Some(true) } else { None });
    Ok(AddCopy {
        sources,
        dest,
        heredocs: node.heredocs.clone(),
        from: flags.string("from"),
        chown: flags.string("chown"),
        chmod: flags.string("chmod"),
        link: flags.bool("link"),
        parents: flags.bool("parents"),
        exclude: flags.list("exclude"),
        keep_git_dir: flags.bool("keep-git-dir"),
        checksum: flags.string("checksum"),
        unpack,
        is_add,
    })
}

fn parse_arg(node: &Node) -> Result<Vec<ArgDecl>, String> {
    Flags::parse(&node.flags, &[])?;
    if node.args.is_empty() {
        return Err("ARG requires at least one argument".into());
    }
    node.args
        .iter()
        .map(|word| {
            let (key, default) = match word.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (word.clone(), None),
            };
            if key.is_empty() {
                return Err(format!("ARG names can not be blank (in {word:?})"));
            }
            Ok(ArgDecl { key, default })
        })
        .collect()
}

fn parse_onbuild(node: &Node) -> Result<String, String> {
    Flags::parse(&node.flags, &[])?;
    let Some(sub) = &node.sub else {
        return Err("ONBUILD requires at least one argument".into());
    };
    match sub.instruction.as_str() {
        "onbuild" => return Err("chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into()),
        "from" | "maintainer" => {
            return Err(format!("{} isn't allowed as an ONBUILD trigger", sub.instruction.to_uppercase()));
        }
        _ => {}
    }
    parse_instruction(sub).map_err(|e| format!("ONBUILD trigger: {e}"))?;
    Ok(sub.original.trim().to_owned())
}

fn parse_shell(node: &Node) -> Result<Vec<String>, String> {
    Flags::parse(&node.flags, &[])?;
    if node.args.is_empty() {
        return Err("SHELL requires at least one argument".into());
    }
    if !node.json {
        return Err("SHELL requires the arguments to be in JSON form".into());
    }
    Ok(node.args.clone())
}

fn parse_healthcheck(node: &Node) -> Result<Healthcheck, String> {
    let spec = [
        ("interval", FlagKind::String),
        ("timeout", FlagKind::String),
        ("start-period", FlagKind::String),
        ("start-interval", FlagKind::String),
        ("retries", FlagKind::String),
    ];
    let flags = Flags::parse(&node.flags, &spec)?;
    let Some(kind) = node.args.first() else {
        return Err("HEALTHCHECK requires an argument: CMD <command> or NONE".into());
    };
    let rest = &node.args[1..];
    let test = match kind.to_uppercase().as_str() {
        "NONE" if rest.is_empty() && node.flags.is_empty() => vec!["NONE".to_owned()],
        "NONE" => return Err("HEALTHCHECK NONE takes no arguments".into()),
        "CMD" if rest.is_empty() => return Err("missing command after HEALTHCHECK CMD".into()),
        "CMD" if node.json => std::iter::once("CMD".to_owned()).chain(rest.iter().cloned()).collect(),
        "CMD" => vec!["CMD-SHELL".to_owned(), rest.join(" ")],
        other => return Err(format!("unknown type {other:?} in HEALTHCHECK (try CMD)")),
    };
    let retries = match flags.string("retries") {
        None => None,
        Some(r) => Some(r.parse::<u32>().map_err(|_| format!("--retries must be a non-negative integer, got {r:?}"))?),
    };
    Ok(Healthcheck {
        test,
        interval: health_duration(&flags, "interval")?,
        timeout: health_duration(&flags, "timeout")?,
        start_period: health_duration(&flags, "start-period")?,
        start_interval: health_duration(&flags, "start-interval")?,
        retries,
    })
}

fn health_duration(flags: &Flags, name: &str) -> Result<Option<u64>, String> {
    let Some(text) = flags.string(name) else { return Ok(None) };
    let nanos = parse_go_duration(&text).ok_or_else(|| format!("--{name}: invalid duration {text:?}"))?;
    if nanos != 0 && nanos < 1_000_000 {
        return Err(format!("--{name} cannot be less than 1ms"));
    }
    Ok(Some(nanos))
}

/// Parses Go durations such as `30s`, `1m30s`, `1.5h`, `100ms`, `0` (a negative one is not a
/// flag's).
pub fn parse_go_duration(text: &str) -> Option<u64> {
    kiln_types::parse_go_duration(text).and_then(|nanos| u64::try_from(nanos).ok())
}

#[cfg(test)]
mod tests;
