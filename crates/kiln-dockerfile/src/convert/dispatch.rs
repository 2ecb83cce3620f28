//! Stage set-up (FROM, ONBUILD triggers) and the instructions that only change the image
//! config or make directories: ENV, ARG, LABEL, WORKDIR, USER, EXPOSE, VOLUME, CMD, ...

use kiln_graph::{Chown, FileAction, FileOp, Op, SourceOp};
use kiln_types::{ImageReference, Platform};

use super::state::{StageResult, StageState};
use super::{Converter, Failure, FrontendError, NamedInput};
use crate::image::HealthConfig;
use crate::instructions::{ArgDecl, Command, CommandLine, Healthcheck, Instruction, KeyValue, parse_instruction};
use crate::parser;

impl Converter<'_> {
    pub(super) fn error(&self, stage: &str, line: Option<usize>, failure: Failure) -> FrontendError {
        match failure {
            Failure::Located(e) => e,
            Failure::Message(message) => {
                FrontendError { file: self.options.file_name.clone(), line, stage: Some(stage.to_owned()), message }
            }
        }
    }

    pub(super) fn dispatch_stage(&mut self, index: usize) -> Result<StageResult, FrontendError> {
        let stage = &self.file.stages[index];
        let name = stage.display_name();
        let line = Some(stage.line);
        // A named context called like the stage replaces it, instructions and all.
        if let Some(stage_name) = &stage.from.name
            && let Some(input) = self.named(stage_name)
        {
            let replaced = self.replaced_stage(index, stage_name, input);
            return replaced.map_err(|f| self.error(&name, line, f));
        }
        let mut state = self.start_stage(index).map_err(|f| self.error(&name, line, f))?;
        let triggers = std::mem::take(&mut state.config.on_build);
        for trigger in &triggers {
            let command = self.trigger_command(trigger).map_err(|f| self.error(&name, line, f))?;
            self.dispatch(&mut state, &command).map_err(|f| self.error(&name, line, f))?;
        }
        for command in &stage.commands {
            let line = Some(command.start_line);
            self.dispatch(&mut state, command).map_err(|f| self.error(&name, line, f))?;
        }
        Ok(StageResult { root: state.root, config: state.config, env: state.env, platform: state.platform })
    }

    fn start_stage(&mut self, index: usize) -> Result<StageState, Failure> {
        let stage = &self.file.stages[index];
        let base = self.lexer.process_word(&stage.from.image, &self.meta_env)?;
        if base.is_empty() {
            return Err(format!("base name ({}) should not be blank", stage.from.image).into());
        }
        let platform = self.stage_platform(index)?;
        let cmd_total = 1 + stage.commands.iter().filter(|c| produces_vertex(c)).count();
        let mut state = StageState {
            name: stage.display_name(),
            platform,
            root: None,
            config: Default::default(),
            env: Default::default(),
            cmd_set: false,
            cmd_index: 0,
            cmd_total,
            show_name: self.file.stages.len() > 1,
            show_platform: self.prefix_platform,
            config_env_index: Default::default(),
        };
        let mut inherited = Default::default();
        let explicit_platform = stage.from.platform.is_some();
        if let Some(parent) = self.find_stage(&base, Some(index), false) {
            let result = self.stage(parent, Some((&state.name, stage.line)))?;
            state.root = result.root;
            state.config = result.config;
            inherited = result.env;
            if !explicit_platform {
                state.platform = result.platform;
            }
            state.cmd_index += 1;
        } else if let Some(input) = self.named(&base) {
            let meta = state.next_meta(&format!("FROM {base}"), (stage.line, stage.line));
            let result = self.named_result(&base, input, &state.platform, meta)?;
            state.root = result.root;
            state.config = result.config;
            if !explicit_platform {
                state.platform = result.platform;
            }
        } else if base.eq_ignore_ascii_case("scratch") {
            state.cmd_index += 1;
        } else {
            self.start_from_image(&mut state, &base, stage.line)?;
        }
        state.start_env(inherited);
        // A stage starts with its base's variables: they count against the conversion's size.
        self.charge(state.env.byte_len())?;
        Ok(state)
    }

    /// A stage's platform: its `FROM --platform`, else the target platform.
    fn stage_platform(&self, index: usize) -> Result<Platform, Failure> {
        Ok(match &self.file.stages[index].from.platform {
            Some(p) => {
                let expanded = self.lexer.process_word(p, &self.meta_env)?;
                expanded.parse::<Platform>().map_err(|e| format!("FROM --platform: {e}"))?
            }
            None => self.target_platform.clone(),
        })
    }

    /// The result of a stage a named context replaces.
    fn replaced_stage(&mut self, index: usize, name: &str, input: &NamedInput) -> Result<StageResult, Failure> {
        let platform = self.stage_platform(index)?;
        let stage = &self.file.stages[index];
        let meta = kiln_graph::VertexMeta {
            name: format!("[{}] FROM {name} (named context)", stage.display_name()),
            stage: Some(stage.display_name()),
            platform: Some(platform.clone()),
            lines: Some((stage.line, stage.line)),
        };
        self.named_result(name, input, &platform, meta)
    }

    fn start_from_image(&mut self, state: &mut StageState, base: &str, line: usize) -> Result<(), Failure> {
        let reference: ImageReference = base.parse().map_err(|e| format!("FROM {base}: {e}"))?;
        let meta = state.next_meta(&format!("FROM {reference}"), (line, line));
        let op = Op::Source(SourceOp::Image { reference: reference.clone(), platform: state.platform.clone() });
        state.root = Some(self.builder.add(op, vec![], meta)?);
        state.config = self.options.images.config(&reference, &state.platform).unwrap_or_default();
        Ok(())
    }

    fn trigger_command(&self, trigger: &str) -> Result<Command, Failure> {
        let ast = parser::parse(trigger).map_err(|e| format!("ONBUILD trigger {trigger:?}: {}", e.message))?;
        let node = ast.nodes.first().ok_or("empty ONBUILD trigger")?;
        let instruction = parse_instruction(node).map_err(|e| format!("ONBUILD trigger {trigger:?}: {e}"))?;
        Ok(Command {
            instruction,
            keyword: node.instruction.to_uppercase(),
            original: node.original.clone(),
            start_line: 0,
            end_line: 0,
        })
    }

    pub(super) fn dispatch(&mut self, state: &mut StageState, command: &Command) -> Result<(), Failure> {
        match &command.instruction {
            Instruction::Run(run) => self.dispatch_run(state, command, run),
            Instruction::AddCopy(copy) => self.dispatch_copy(state, command, copy),
            Instruction::Workdir(dir) => self.dispatch_workdir(state, command, dir),
            Instruction::Env(pairs) => self.dispatch_env(state, pairs),
            Instruction::Arg(decls) => self.dispatch_arg(state, decls),
            Instruction::Label(pairs) => self.dispatch_label(state, pairs),
            Instruction::User(user) => {
                state.config.user = self.expand(state, user)?;
                Ok(())
            }
            Instruction::Expose(words) => self.dispatch_expose(state, words),
            Instruction::Volume(words) => self.dispatch_volume(state, words),
            Instruction::StopSignal(signal) => self.dispatch_stopsignal(state, signal),
            Instruction::Cmd(line) => {
                state.config.cmd = Some(command_args(state, line));
                state.cmd_set = true;
                Ok(())
            }
            Instruction::Entrypoint(line) => {
                state.config.entrypoint = Some(command_args(state, line));
                if !state.cmd_set {
                    state.config.cmd = None;
                }
                Ok(())
            }
            Instruction::Shell(shell) => {
                state.config.shell = Some(shell.clone());
                Ok(())
            }
            Instruction::Healthcheck(check) => {
                state.config.healthcheck = Some(health_config(check));
                Ok(())
            }
            Instruction::Onbuild(trigger) => {
                state.config.on_build.push(trigger.clone());
                Ok(())
            }
            Instruction::Maintainer(_) => Ok(()),
        }
    }

    pub(super) fn expand(&self, state: &StageState, word: &str) -> Result<String, Failure> {
        let expanded = self.lexer.process_word(word, state)?;
        self.charge(expanded.len())?;
        Ok(expanded)
    }

    fn dispatch_env(&mut self, state: &mut StageState, pairs: &[KeyValue]) -> Result<(), Failure> {
        // Every value sees the environment from before the instruction: `ENV a=x b=$a`
        // gives b the old a.
        let mut expanded = Vec::with_capacity(pairs.len());
        for kv in pairs {
            let key = self.expand(state, &kv.key)?;
            if key.is_empty() {
                return Err("ENV names can not be blank".into());
            }
            expanded.push((key, self.expand(state, &kv.value)?));
        }
        for (key, value) in expanded {
            state.set_env(&key, &value);
        }
        Ok(())
    }

    fn dispatch_arg(&mut self, state: &mut StageState, decls: &[ArgDecl]) -> Result<(), Failure> {
        for decl in decls {
            let value = match (self.options.build_args.get(&decl.key), &decl.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(default)) => Some(self.expand(state, default)?),
                (None, None) => self.meta_env.iter().rev().find(|(k, _)| *k == decl.key).map(|(_, v)| v.clone()),
            };
            // An ARG with a value joins the build state's environment (RUN steps, expansions,
            // child stages), after what is there: it overrides an earlier ENV of its name.
            if let Some(value) = value {
                state.env.set(&decl.key, &value);
            }
        }
        Ok(())
    }

    fn dispatch_label(&mut self, state: &mut StageState, pairs: &[KeyValue]) -> Result<(), Failure> {
        for kv in pairs {
            let key = self.expand(state, &kv.key)?;
            if key.is_empty() {
                return Err("LABEL names can not be blank".into());
            }
            let value = self.expand(state, &kv.value)?;
            state.config.labels.insert(key, value);
        }
        Ok(())
    }

    fn dispatch_workdir(&mut self, state: &mut StageState, command: &Command, dir: &str) -> Result<(), Failure> {
        let expanded = self.expand(state, dir)?;
        let path = state.resolve_path(&expanded);
        state.config.working_dir = path.clone();
        if path == "/" {
            return Ok(());
        }
        let chown = (!state.config.user.is_empty()).then(|| parse_chown(&state.config.user));
        let mut inputs = Vec::new();
        let base = state.root_input(&mut inputs);
        let op =
            Op::File(FileOp { base, actions: vec![FileAction::Mkdir { path, mode: 0o755, parents: true, chown }] });
        let meta = state.next_meta(&display(command), (command.start_line, command.end_line));
        state.root = Some(self.builder.add(op, inputs, meta)?);
        Ok(())
    }

    fn dispatch_expose(&mut self, state: &mut StageState, words: &[String]) -> Result<(), Failure> {
        for word in words {
            for spec in self.lexer.process_words(word, &*state)? {
                for port in parse_port_spec(&spec)? {
                    state.config.exposed_ports.insert(port);
                }
            }
        }
        Ok(())
    }

    fn dispatch_volume(&mut self, state: &mut StageState, words: &[String]) -> Result<(), Failure> {
        for word in words {
            let volume = self.expand(state, word)?;
            if volume.trim().is_empty() {
                return Err("VOLUME specified can not be an empty string".into());
            }
            state.config.volumes.insert(volume);
        }
        Ok(())
    }

    fn dispatch_stopsignal(&mut self, state: &mut StageState, signal: &str) -> Result<(), Failure> {
        let signal = self.expand(state, signal)?;
        let name = signal.strip_prefix("SIG").unwrap_or(&signal);
        let valid = signal.parse::<u32>().is_ok_and(|n| n > 0)
            || (!name.is_empty()
                && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '+' || c == '-'));
        if !valid {
            return Err(format!("invalid signal: {signal}").into());
        }
        state.config.stop_signal = Some(signal);
        Ok(())
    }
}

/// Instructions that add a vertex and so take a `[i/n]` number.
fn produces_vertex(command: &Command) -> bool {
    matches!(command.instruction, Instruction::Run(_) | Instruction::AddCopy(_) | Instruction::Workdir(_))
}

/// The instruction as people read it: keyword plus its text as written.
pub(super) fn display(command: &Command) -> String {
    let original = command.original.trim();
    let rest = original.split_once(char::is_whitespace).map_or("", |(_, r)| r.trim());
    if rest.is_empty() { command.keyword.clone() } else { format!("{} {rest}", command.keyword) }
}

/// The shell that shell-form commands run under.
pub(super) fn shell_of(state: &StageState) -> Vec<String> {
    state.config.shell.clone().unwrap_or_else(|| vec!["/bin/sh".to_owned(), "-c".to_owned()])
}

fn command_args(state: &StageState, line: &CommandLine) -> Vec<String> {
    if !line.prepend_shell {
        return line.args.clone();
    }
    let mut args = shell_of(state);
    args.extend(line.args.iter().cloned());
    args
}

fn health_config(check: &Healthcheck) -> HealthConfig {
    HealthConfig {
        test: check.test.clone(),
        interval: check.interval,
        timeout: check.timeout,
        start_period: check.start_period,
        start_interval: check.start_interval,
        retries: check.retries,
    }
}

/// `user[:group]` as written.
/// `USER[:GROUP]` as BuildKit's `llb.WithUser` reads it: an empty user or group is id 0
/// (`--chown=${UID}:${GID}` with both unset is `0:0`); without `:GROUP` the user's own
/// group applies when the step runs.
pub(super) fn parse_chown(spec: &str) -> Chown {
    let or_root = |name: &str| if name.is_empty() { "0".to_owned() } else { name.to_owned() };
    match spec.split_once(':') {
        Some((user, group)) => Chown { user: or_root(user), group: Some(or_root(group)) },
        None => Chown { user: or_root(spec), group: None },
    }
}

/// `80`, `80/udp`, `8000-8002/tcp` into `port/proto` entries; the error names the spec and
/// EXPOSE wraps it with its line and stage.
fn parse_port_spec(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto = proto.to_ascii_lowercase();
    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
        return Err(format!("invalid proto: {proto} (in EXPOSE {spec})"));
    }
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("invalid containerPort: {p}"));
    let (start, end) = match ports.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    if end < start {
        return Err(format!("invalid range specified for container port: {ports}"));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}
