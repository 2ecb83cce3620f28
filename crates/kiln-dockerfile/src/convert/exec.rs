//! RUN: the exec op, its heredocs and its `--mount`s.

use kiln_graph::{ExecOp, FileAction, FileOp, Input, Mount, MountKind, Op, SecretMount, SourceOp, SshMount};
use kiln_types::{Digest, ImageReference};

use super::dispatch::{display, shell_of};
use super::state::{StageState, input_index};
use super::{Converter, Failure};
use crate::context::{clean_relative, select, selection_digest};
use crate::ignore::PatternList;
use crate::instructions::{Command, MountType, Run, RunMount, parse_mount};
use crate::parser::parse_heredoc;

/// Where RUN heredoc scripts with a shebang are mounted, as in BuildKit.
const PIPES_DIR: &str = "/dev/pipes/";

impl Converter<'_> {
    pub(super) fn dispatch_run(&mut self, state: &mut StageState, command: &Command, run: &Run) -> Result<(), Failure> {
        let mut inputs = Vec::new();
        let rootfs = state.root_input(&mut inputs);
        let mut mounts = Vec::new();
        for spec in &run.mounts {
            let expanded = &*state;
            let mount = parse_mount(spec, &mut |v| self.expand(expanded, v).map_err(|e| e.to_string()))
                .map_err(|e| format!("--mount: {e}"))?;
            mounts.push(self.mount(state, command, mount, &mut inputs)?);
        }
        let args = self.run_args(state, run, &mut mounts, &mut inputs)?;
        let mut env = state.run_env();
        // As BuildKit's exec op: ssh mounts without a target are `ssh_agent.<i>`, i counting
        // the step's ssh mounts, and the first one is SSH_AUTH_SOCK unless the env sets it.
        let ssh_targets = mounts.iter_mut().filter(|m| matches!(m.kind, MountKind::Ssh(_)));
        for (i, mount) in ssh_targets.enumerate() {
            if mount.target.is_empty() {
                mount.target = format!("/run/buildkit/ssh_agent.{i}");
            }
        }
        let first_ssh = mounts.iter().find(|m| matches!(m.kind, MountKind::Ssh(_)));
        if let Some(first) = first_ssh.filter(|_| state.env.get("SSH_AUTH_SOCK").is_none()) {
            env.push(format!("SSH_AUTH_SOCK={}", first.target));
        }
        self.charge(args.iter().chain(&env).map(String::len).sum())?;
        let op = Op::Exec(ExecOp {
            args,
            env,
            cwd: if state.config.working_dir.is_empty() { "/".into() } else { state.config.working_dir.clone() },
            user: state.config.user.clone(),
            network: run.network,
            security: run.security,
            rootfs,
            mounts,
            platform: state.platform.clone(),
        });
        let meta = state.next_meta(&display(command), (command.start_line, command.end_line));
        state.root = Some(self.builder.add(op, inputs, meta)?);
        Ok(())
    }

    /// argv of the RUN, with BuildKit's heredoc rules: a lone heredoc runs its body in the
    /// shell (or, with a `#!` line, as a script mounted read-only); heredocs inside a longer
    /// command are handed to the shell verbatim.
    fn run_args(
        &mut self,
        state: &StageState,
        run: &Run,
        mounts: &mut Vec<Mount>,
        inputs: &mut Vec<Digest>,
    ) -> Result<Vec<String>, Failure> {
        let line = &run.command;
        let mut args = line.args.clone();
        if let Some(first) = line.heredocs.first() {
            let lone = args.len() == 1 && parse_heredoc(&args[0]).ok().flatten().is_some();
            if lone && first.content.starts_with("#!") {
                let script = self.inline_document(state, &first.name, &first.chomped_content(), 0o755, true)?;
                let input = input_index(inputs, script);
                let bind = MountKind::Bind { input, source: "/".into(), readwrite: false };
                mounts.push(Mount { target: PIPES_DIR.into(), kind: bind });
                args = vec![format!("{PIPES_DIR}{}", first.name)];
            } else if lone {
                args = vec![first.chomped_content()];
            } else {
                let mut full = args.first().cloned().unwrap_or_default();
                for doc in &line.heredocs {
                    full.push('\n');
                    full.push_str(&doc.content);
                    full.push_str(&doc.name);
                }
                args = vec![full];
            }
        }
        if line.prepend_shell {
            let mut shell = shell_of(state);
            shell.extend(args);
            args = shell;
        }
        Ok(args)
    }

    /// A heredoc body as a one-file filesystem: `/<name>` with `mode`. A RUN script is
    /// platform-specific (it runs on the stage's platform); a COPY source is not.
    pub(super) fn inline_document(
        &mut self,
        state: &StageState,
        name: &str,
        data: &str,
        mode: u32,
        platform_specific: bool,
    ) -> Result<Digest, Failure> {
        let action = FileAction::Mkfile { path: format!("/{name}"), mode, data: data.to_owned(), chown: None };
        let op = Op::File(FileOp { base: Input::Scratch, actions: vec![action] });
        let meta = state.unnumbered_meta("[internal] preparing inline document".to_owned(), platform_specific, None);
        Ok(self.builder.add(op, vec![], meta)?)
    }

    fn mount(
        &mut self,
        state: &StageState,
        command: &Command,
        m: RunMount,
        inputs: &mut Vec<Digest>,
    ) -> Result<Mount, Failure> {
        // A relative or missing target is under the working directory, as in BuildKit, where
        // only a target that is the root itself is refused.
        let target = state.resolve_path(m.target.as_deref().unwrap_or_default());
        if target == "/" && matches!(m.kind, MountType::Bind | MountType::Cache | MountType::Tmpfs) {
            return Err(format!("invalid mount target {target:?}").into());
        }
        let kind = match m.kind {
            MountType::Bind => {
                let (input, source) = self.mount_source(state, command, &m, inputs)?;
                MountKind::Bind { input, source, readwrite: !m.readonly }
            }
            MountType::Cache => {
                let seeded = m.from.is_some();
                let (from, source) =
                    if seeded { self.mount_source(state, command, &m, inputs)? } else { (Input::Scratch, "/".into()) };
                MountKind::Cache {
                    id: m.id.clone().unwrap_or_else(|| target.clone()),
                    sharing: m.sharing,
                    from: seeded.then_some(from),
                    source,
                    readonly: m.readonly,
                    mode: m.mode.unwrap_or(0o755),
                    uid: m.uid.unwrap_or(0),
                    gid: m.gid.unwrap_or(0),
                }
            }
            MountType::Tmpfs => MountKind::Tmpfs { size: m.size },
            MountType::Secret => MountKind::Secret(SecretMount {
                id: m.id.clone().unwrap_or_default(),
                env: m.env.clone(),
                required: m.required,
                mode: m.mode.unwrap_or(0o400),
                uid: m.uid.unwrap_or(0),
                gid: m.gid.unwrap_or(0),
            }),
            MountType::Ssh => MountKind::Ssh(SshMount {
                id: m.id.clone().unwrap_or_else(|| "default".into()),
                required: m.required,
                mode: m.mode.unwrap_or(0o600),
                uid: m.uid.unwrap_or(0),
                gid: m.gid.unwrap_or(0),
            }),
        };
        let target = match (&kind, &m.target) {
            (MountKind::Secret(_), None) => String::new(),
            // Numbered among the step's ssh mounts once they are all known (`dispatch_run`).
            (MountKind::Ssh(_), None) => String::new(),
            _ => target,
        };
        Ok(Mount { target, kind })
    }

    /// The filesystem and path a bind or cache mount reads: a stage, an image or the context.
    fn mount_source(
        &mut self,
        state: &StageState,
        command: &Command,
        m: &RunMount,
        inputs: &mut Vec<Digest>,
    ) -> Result<(Input, String), Failure> {
        let source = m.source.clone().unwrap_or_default();
        let Some(from) = &m.from else {
            let selection = clean_relative(&source);
            let local = self.context_vertex(state, command, std::slice::from_ref(&selection), &[])?;
            return Ok((input_index(inputs, local), format!("/{selection}")));
        };
        let root = self.named_source(state, command, from)?;
        let input = root.map_or(Input::Scratch, |d| input_index(inputs, d));
        Ok((input, format!("/{}", clean_relative(&source))))
    }

    /// The filesystem named by `--from` or `from=`: a stage (by name or index), else a named
    /// context, else an image.
    pub(super) fn named_source(
        &mut self,
        state: &StageState,
        command: &Command,
        from: &str,
    ) -> Result<Option<Digest>, Failure> {
        if let Some(index) = self.find_stage(from, None, true) {
            let result = self.stage(index, Some((&state.name, command.start_line))).map_err(Failure::Located)?;
            return Ok(result.root);
        }
        if let Some(input) = self.named(from) {
            let meta = state.unnumbered_meta(
                format!("[{}] FROM {from}", state.name),
                true,
                Some((command.start_line, command.end_line)),
            );
            return Ok(self.named_result(from, input, &state.platform, meta)?.root);
        }
        if from.parse::<usize>().is_ok() {
            return Err(format!("--from={from}: there is no stage with that index").into());
        }
        if from.eq_ignore_ascii_case("scratch") {
            return Ok(None);
        }
        if !from.contains(['/', ':', '@', '.']) {
            return Err(self.unknown_stage(from).into());
        }
        let reference: ImageReference = from.parse().map_err(|e| {
            format!("--from={from} is neither a stage of this Dockerfile nor a valid image reference: {e}")
        })?;
        let op = Op::Source(SourceOp::Image { reference: reference.clone(), platform: state.platform.clone() });
        let meta = state.unnumbered_meta(
            format!("[{}] FROM {reference}", state.name),
            true,
            Some((command.start_line, command.end_line)),
        );
        Ok(Some(self.builder.add(op, vec![], meta)?))
    }

    /// A bare word that names no stage is far more often a typo than an image: BuildKit
    /// would try to pull `docker.io/library/<word>`. Kiln asks for an explicit reference.
    fn unknown_stage(&self, from: &str) -> String {
        let names: Vec<String> = self.file.stages.iter().filter_map(|s| s.from.name.clone()).collect();
        let close = names.iter().find(|n| crate::instructions::edit_distance(n, &from.to_lowercase()) <= 2);
        let hint = match close {
            Some(name) => format!(" (did you mean {name}?)"),
            None => String::new(),
        };
        format!(
            "--from={from}: no stage with that name{hint}; stages are [{}]; to copy from an image write a full reference such as {from}:latest",
            names.join(", ")
        )
    }

    /// A local-context source vertex keyed by the content of exactly the files selected.
    pub(super) fn context_vertex(
        &mut self,
        state: &StageState,
        command: &Command,
        sources: &[String],
        exclude: &[String],
    ) -> Result<Digest, Failure> {
        let patterns = PatternList::new(exclude).map_err(|e| format!("--exclude: {e}"))?;
        let context = self.options.context;
        let selected = select(context, sources, &patterns)?;
        let content = selection_digest(context, &selected)?;
        let op = Op::Source(SourceOp::Local {
            name: "context".into(),
            include: sources.to_vec(),
            exclude: exclude.to_vec(),
            content,
        });
        let meta = state.unnumbered_meta(
            format!(
                "[context] load {} ({} entries)",
                sources.iter().map(|s| if s.is_empty() { "." } else { s }).collect::<Vec<_>>().join(" "),
                selected.len()
            ),
            false,
            Some((command.start_line, command.end_line)),
        );
        Ok(self.builder.add(op, vec![], meta)?)
    }
}
