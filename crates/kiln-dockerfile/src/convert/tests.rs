//! Conversion tests: Dockerfiles in, graph properties out.

use std::collections::BTreeMap;

use kiln_graph::{FileAction, Graph, MountKind, Op, OpKind, SourceOp};
use kiln_types::Platform;

use super::*;
use crate::context::MemoryContext;
use crate::ignore::PatternList;
use crate::image::NoImageMetadata;

struct Build<'a> {
    files: Vec<(&'a str, &'a str)>,
    ignore: &'a str,
    target: Option<&'a str>,
    args: Vec<(&'a str, &'a str)>,
    platforms: Vec<&'a str>,
    named: BTreeMap<String, NamedInput>,
}

fn build<'a>() -> Build<'a> {
    Build {
        files: vec![("a.txt", "a"), ("src/main.rs", "fn main() {}")],
        ignore: "",
        target: None,
        args: vec![],
        platforms: vec![],
        named: BTreeMap::new(),
    }
}

impl Build<'_> {
    fn convert(&self, dockerfile: &str) -> Result<BuildPlan, FrontendError> {
        let context = MemoryContext::new(&self.files, &PatternList::parse_ignore_file(self.ignore).unwrap());
        let options = ConvertOptions {
            file_name: "Dockerfile".into(),
            target: self.target.map(str::to_owned),
            build_args: self.args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            platforms: self.platforms.iter().map(|p| p.parse().unwrap()).collect(),
            build_platform: "linux/amd64".parse().unwrap(),
            context: &context,
            images: &NoImageMetadata,
            named: &self.named,
        };
        convert(dockerfile, &options)
    }

    #[track_caller]
    fn plan(&self, dockerfile: &str) -> BuildPlan {
        self.convert(dockerfile).unwrap_or_else(|e| panic!("{e}"))
    }

    #[track_caller]
    fn error(&self, dockerfile: &str) -> String {
        self.convert(dockerfile).expect_err("expected a conversion error").to_string()
    }
}

fn execs(graph: &Graph) -> Vec<&kiln_graph::ExecOp> {
    graph.vertices.iter().filter_map(|v| if let Op::Exec(e) = &v.op { Some(e) } else { None }).collect()
}

fn exec_commands(graph: &Graph) -> Vec<String> {
    execs(graph).iter().map(|e| e.args.last().cloned().unwrap_or_default()).collect()
}

fn env_of<'a>(exec: &'a kiln_graph::ExecOp, key: &str) -> Option<&'a str> {
    exec.env.iter().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

const TWO_SAME: &str = "FROM busybox AS one\nRUN make\nFROM busybox AS two\nRUN make\nFROM busybox\nCOPY --from=one /o /1\nCOPY --from=two /o /2\n";

#[test]
fn identical_steps_in_two_stages_are_one_vertex() {
    let plan = build().plan(TWO_SAME);
    assert_eq!(exec_commands(&plan.graph), ["make"]);
    let images = plan.graph.vertices.iter().filter(|v| v.op.kind() == OpKind::Source).count();
    assert_eq!(images, 1, "one busybox source for all stages");
}

#[test]
fn a_different_env_makes_two_vertices() {
    let plan = build().plan("FROM busybox AS one\nENV X=1\nRUN make\nFROM busybox AS two\nENV X=2\nRUN make\nFROM busybox\nCOPY --from=one /o /1\nCOPY --from=two /o /2\n");
    let execs = execs(&plan.graph);
    assert_eq!(execs.len(), 2);
    let mut values: Vec<_> = execs.iter().map(|e| env_of(e, "X").unwrap()).collect();
    values.sort();
    assert_eq!(values, ["1", "2"]);
}

#[test]
fn unused_stages_are_not_converted() {
    let file = "FROM busybox AS unused\nRUN never\nFROM busybox AS used\nRUN needed\nFROM busybox AS final\nCOPY --from=used /n /n\n";
    let plan = build().plan(file);
    assert_eq!(exec_commands(&plan.graph), ["needed"]);
    // A broken unused stage does not fail the build either, as in BuildKit.
    let broken = "FROM busybox AS unused\nCOPY --from=nowhere:1 missing.txt /\nFROM busybox\nRUN ok\n";
    assert_eq!(exec_commands(&build().plan(broken).graph), ["ok"]);
}

#[test]
fn target_selects_a_stage_by_name() {
    let file = "FROM busybox AS a\nRUN in-a\nFROM busybox AS b\nRUN in-b\n";
    let plan = Build { target: Some("a"), ..build() }.plan(file);
    assert_eq!(exec_commands(&plan.graph), ["in-a"]);
    assert_eq!(plan.target, "a");
    let err = Build { target: Some("c"), ..build() }.error(file);
    assert!(err.contains("target stage \"c\" could not be found"), "{err}");
}

#[test]
fn stages_are_reached_through_from_copy_and_mounts() {
    let file = "FROM busybox AS base\nRUN base\nFROM base AS via-from\nRUN child\nFROM busybox AS via-mount\nRUN mounted\nFROM busybox AS via-index\nRUN indexed\nFROM via-from\nRUN --mount=from=via-mount,target=/m ls /m\nCOPY --from=3 /x /x\n";
    let mut commands = exec_commands(&build().plan(file).graph);
    commands.sort();
    assert_eq!(commands, ["base", "child", "indexed", "ls /m", "mounted"]);
}

fn copy_vertex_of<'a>(plan: &'a BuildPlan, dest: &str) -> &'a kiln_graph::Vertex {
    plan.graph
        .vertices
        .iter()
        .find(|v| matches!(&v.op, Op::File(f) if f.actions.iter().any(|a| matches!(a, FileAction::Copy(c) if c.dest == dest))))
        .unwrap_or_else(|| panic!("no COPY to {dest}"))
}

#[test]
fn context_copies_are_keyed_by_selected_content_only() {
    let file = "FROM busybox\nCOPY src/ /src/\nCOPY a.txt /a.txt\n";
    let before = build().plan(file);
    let edited = Build { files: vec![("a.txt", "changed"), ("src/main.rs", "fn main() {}")], ..build() }.plan(file);
    assert_eq!(copy_vertex_of(&before, "/src/").digest, copy_vertex_of(&edited, "/src/").digest);
    assert_ne!(copy_vertex_of(&before, "/a.txt").digest, copy_vertex_of(&edited, "/a.txt").digest);
    let unrelated =
        Build { files: vec![("a.txt", "a"), ("src/main.rs", "fn main() {}"), ("README", "new")], ..build() }.plan(file);
    assert_eq!(before.graph.outputs, unrelated.graph.outputs, "a new unrelated file changes nothing");
}

#[test]
fn the_same_copy_in_two_targets_is_one_vertex() {
    let file = "FROM busybox AS a\nCOPY src/ /src/\nRUN build-a\nFROM busybox AS b\nCOPY src/ /src/\nRUN build-b\nFROM busybox\nCOPY --from=a /x /a\nCOPY --from=b /x /b\n";
    let plan = build().plan(file);
    let copies = plan.graph.vertices.iter().filter(|v| v.meta.name.contains("COPY src/")).count();
    assert_eq!(copies, 1);
    let locals = plan.graph.vertices.iter().filter(|v| matches!(v.op, Op::Source(SourceOp::Local { .. }))).count();
    assert_eq!(locals, 1);
}

/// The one local-context source of a plan.
fn local_source(plan: &BuildPlan) -> &SourceOp {
    let mut locals = plan.graph.vertices.iter().filter_map(|v| match &v.op {
        Op::Source(s @ SourceOp::Local { .. }) => Some(s),
        _ => None,
    });
    let local = locals.next().expect("a local source");
    assert!(locals.next().is_none(), "exactly one local source");
    local
}

#[test]
fn dockerignore_and_exclude_shape_the_selection() {
    let file = "FROM busybox\nCOPY . /app/\n";
    let plain = build().plan(file);
    let ignoring = Build { ignore: "a.txt", ..build() }.plan(file);
    assert_ne!(copy_vertex_of(&plain, "/app/").digest, copy_vertex_of(&ignoring, "/app/").digest);
    let excluded = build().plan("FROM busybox\nCOPY --exclude=a.txt . /app/\n");
    let SourceOp::Local { exclude, content, .. } = local_source(&excluded) else { unreachable!() };
    assert_eq!(exclude, &["a.txt"]);
    let SourceOp::Local { content: ignored_content, .. } = local_source(&ignoring) else { unreachable!() };
    assert_eq!(content, ignored_content, "both select the same files");
}

#[test]
fn missing_context_files_are_named_with_their_line() {
    let err = build().error("FROM busybox\n\nCOPY nope.txt /\n");
    assert_eq!(err, "Dockerfile:3: stage stage-0: nope.txt: not found in the build context");
}

#[test]
fn copy_sources_cannot_escape_the_context() {
    let plan = build().plan("FROM busybox\nCOPY ../../a.txt /a\n");
    let vertex = copy_vertex_of(&plan, "/a");
    let Op::File(file) = &vertex.op else { panic!() };
    let FileAction::Copy(copy) = &file.actions[0] else { panic!() };
    assert_eq!(copy.sources, ["/a.txt"]);
}

#[test]
fn args_follow_buildkit_scoping() {
    let file = "ARG BASE=busybox\nARG VERSION=1\nFROM ${BASE}:${VERSION}\nRUN echo $VERSION\nARG VERSION\nARG LOCAL=l-$VERSION\nRUN echo $VERSION $LOCAL\n";
    let plan = build().plan(file);
    let Op::Source(SourceOp::Image { reference, .. }) = &plan.graph.vertices[0].op else { panic!() };
    assert_eq!(reference.to_string(), "docker.io/library/busybox:1");
    let execs = execs(&plan.graph);
    assert_eq!(env_of(execs[0], "VERSION"), None, "a global ARG is invisible until redeclared");
    assert_eq!(env_of(execs[1], "VERSION"), Some("1"));
    assert_eq!(env_of(execs[1], "LOCAL"), Some("l-1"));
    let overridden = Build { args: vec![("VERSION", "2"), ("LOCAL", "x")], ..build() }.plan(file);
    let execs = super::tests::execs(&overridden.graph);
    assert_eq!(env_of(execs[1], "VERSION"), Some("2"));
    assert_eq!(env_of(execs[1], "LOCAL"), Some("x"));
}

#[test]
fn env_uses_old_values_within_one_instruction_and_the_later_of_env_and_arg_wins() {
    let plan = build().plan("FROM busybox\nENV a=old\nENV a=new b=$a\nARG c=from-arg\nENV c=env\nRUN env\n");
    let exec = execs(&plan.graph)[0];
    assert_eq!(env_of(exec, "a"), Some("new"));
    assert_eq!(env_of(exec, "b"), Some("old"));
    assert_eq!(env_of(exec, "c"), Some("env"), "an ENV after an ARG of its name wins");
    assert_eq!(plan.images[0].env_get("b"), Some("old"));

    // An ARG after an ENV of its name overrides it for RUN and expansions, as BuildKit does;
    // the image config keeps the ENV value.
    let file = "FROM busybox\nENV A=1\nARG A=2\nENV B=$A\nRUN echo $A $B\n";
    let plan = build().plan(file);
    let exec = execs(&plan.graph)[0];
    assert_eq!((env_of(exec, "A"), env_of(exec, "B")), (Some("2"), Some("2")));
    assert_eq!((plan.images[0].env_get("A"), plan.images[0].env_get("B")), (Some("1"), Some("2")));
    let plan = Build { args: vec![("A", "3")], ..build() }.plan(file);
    let exec = execs(&plan.graph)[0];
    assert_eq!((env_of(exec, "A"), env_of(exec, "B")), (Some("3"), Some("3")));
    // Setting a variable again moves it after the others, as BuildKit's state environment.
    let plan = build().plan("FROM scratch\nENV A=1 B=2\nARG A=3\nRUN env\n");
    assert_eq!(execs(&plan.graph)[0].env[1..], ["B=2", "A=3"]);
}

#[test]
fn arg_values_reach_child_stages_and_the_parents_env_is_set_again_on_top() {
    let file = "FROM busybox AS base\nARG FOO=bar\nENV E=1\nARG E=2\n\
                FROM base\nRUN env\nARG COPY_OF=$FOO\nRUN echo $COPY_OF\n";
    let plan = build().plan(file);
    let execs = execs(&plan.graph);
    assert_eq!(env_of(execs[0], "FOO"), Some("bar"), "an ARG value is part of the stage's state");
    assert_eq!(env_of(execs[1], "COPY_OF"), Some("bar"), "expansions in the child see it");
    // BuildKit sets the inherited config's variables again on top of the parent's state.
    assert_eq!(env_of(execs[0], "E"), Some("1"));
    assert_eq!(plan.images[0].env_get("FOO"), None, "ARG values never enter the image config");
}

#[test]
fn platform_args_and_multi_platform_outputs() {
    let file = "FROM --platform=$BUILDPLATFORM busybox AS tools\nRUN gen\nFROM busybox\nARG TARGETARCH\nCOPY --from=tools /g /g\nRUN echo $TARGETARCH\n";
    let plan = Build { platforms: vec!["linux/amd64", "linux/arm64"], ..build() }.plan(file);
    assert_eq!(plan.graph.outputs.len(), 2);
    let commands = exec_commands(&plan.graph);
    assert_eq!(commands.iter().filter(|c| *c == "gen").count(), 1, "build-platform stage shared: {commands:?}");
    let arches: Vec<_> = execs(&plan.graph).iter().filter_map(|e| env_of(e, "TARGETARCH")).collect();
    assert_eq!(arches, ["amd64", "arm64"]);
    let platforms: Vec<Platform> = execs(&plan.graph).iter().map(|e| e.platform.clone()).collect();
    assert!(platforms.contains(&"linux/arm64".parse().unwrap()));
    assert!(plan.graph.vertices.iter().any(|v| v.meta.name.starts_with("[linux/arm64 stage-1")));
}

#[test]
fn stage_cycles_are_reported_with_the_chain() {
    let err = build().error("FROM busybox AS a\nCOPY --from=b /x /x\nFROM busybox AS b\nCOPY --from=a /y /y\n");
    assert_eq!(err, "Dockerfile:2: stage a: stage cycle: b -> a -> b (a stage cannot depend on itself)");
    let err = build().error("FROM busybox AS a\nRUN --mount=from=a,target=/x true\n");
    assert!(err.contains("stage cycle: a -> a"), "{err}");
}

#[test]
fn unknown_from_names_are_errors_with_a_hint() {
    let err = build().error("FROM busybox AS build\nRUN x\nFROM busybox\nCOPY --from=biuld /a /a\n");
    assert!(
        err.starts_with("Dockerfile:4: stage stage-1: --from=biuld: no stage with that name (did you mean build?)"),
        "{err}"
    );
    let err = build().error("FROM busybox\nCOPY --from=7 /a /a\n");
    assert!(err.contains("no stage with that index"), "{err}");
    let plan = build().plan("FROM busybox\nCOPY --from=nginx:1.25 /etc/nginx /n\n");
    assert!(plan.graph.vertices.iter().any(|v| v.meta.name.ends_with("FROM docker.io/library/nginx:1.25")));
}

#[test]
fn workdir_and_relative_paths() {
    let plan = build().plan("FROM busybox\nWORKDIR /app\nWORKDIR sub\nCOPY a.txt rel/\nRUN pwd\n");
    let exec = execs(&plan.graph)[0];
    assert_eq!(exec.cwd, "/app/sub");
    assert!(copy_vertex_of(&plan, "/app/sub/rel/").meta.name.contains("COPY a.txt rel/"));
    assert_eq!(plan.images[0].working_dir, "/app/sub");
}

#[test]
fn mounts_without_a_target_go_to_the_working_directory() {
    let file = "FROM busybox AS bins\nFROM busybox\nWORKDIR /work\nRUN --mount=from=bins --mount=type=cache,id=c ls\n\
                RUN --mount=type=cache,target=rel --mount=type=cache true\n";
    let plan = build().plan(file);
    let execs = execs(&plan.graph);
    let kinds: Vec<_> = execs[0].mounts.iter().map(|m| (m.target.as_str(), &m.kind)).collect();
    assert!(matches!(kinds[0], ("/work", MountKind::Bind { readwrite: false, .. })), "{kinds:?}");
    assert!(matches!(kinds[1], ("/work", MountKind::Cache { .. })), "{kinds:?}");
    // BuildKit names a cache after its target as written, cleaned: "rel", and "." for none.
    let ids: Vec<(&str, &str)> = execs[1]
        .mounts
        .iter()
        .filter_map(|m| match &m.kind {
            MountKind::Cache { id, .. } => Some((m.target.as_str(), id.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(ids, [("/work/rel", "rel"), ("/work", ".")]);
    // Only a mount that would cover the root is refused.
    let err = build().error("FROM busybox\nRUN --mount=type=cache ls\n");
    assert!(err.contains("Dockerfile:2") && err.contains("invalid mount target \"/\""), "{err}");
}

#[test]
fn run_forms_mounts_and_heredocs() {
    let file = "FROM busybox\nSHELL [\"/bin/bash\", \"-c\"]\nRUN [\"echo\", \"exec\"]\nRUN --network=none --mount=type=cache,target=/root/.cache --mount=type=secret,id=tok --mount=target=/src,source=src echo shell\nRUN <<EOF\necho heredoc\nEOF\nRUN <<EOF\n#!/bin/sh\necho script\nEOF\n";
    let plan = build().plan(file);
    let execs = execs(&plan.graph);
    assert_eq!(execs[0].args, ["echo", "exec"]);
    assert_eq!(execs[1].args, ["/bin/bash", "-c", "echo shell"]);
    assert_eq!(execs[1].network, kiln_graph::NetworkMode::None);
    let kinds: Vec<_> = execs[1].mounts.iter().map(|m| (m.target.as_str(), &m.kind)).collect();
    assert!(matches!(kinds[0], ("/root/.cache", MountKind::Cache { .. })));
    assert!(matches!(kinds[1], ("/run/secrets/tok", MountKind::Secret(_))));
    assert!(matches!(kinds[2], ("/src", MountKind::Bind { readwrite: false, .. })));
    assert_eq!(execs[2].args, ["/bin/bash", "-c", "echo heredoc\n"]);
    assert_eq!(execs[3].args, ["/bin/bash", "-c", "/dev/pipes/EOF"]);
    assert_eq!(execs[3].mounts[0].target, "/dev/pipes/");
}

#[test]
fn copy_heredocs_expand_unless_quoted() {
    let plan = build().plan("FROM busybox\nENV NAME=kiln\nCOPY <<A <<'B' /etc/\nhello $NAME\nA\nraw $NAME\nB\n");
    let data: Vec<String> = plan
        .graph
        .vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::File(f) => f
                .actions
                .iter()
                .find_map(|a| if let FileAction::Mkfile { data, .. } = a { Some(data.clone()) } else { None }),
            _ => None,
        })
        .collect();
    assert_eq!(data, ["hello kiln\n", "raw $NAME\n"]);
}

#[test]
fn link_copies_become_merges() {
    let plan = build().plan("FROM busybox\nCOPY --link a.txt /a\n");
    let last = plan.graph.vertices.last().unwrap();
    assert_eq!(last.op.kind(), OpKind::Merge);
    assert_eq!(last.inputs.len(), 2);
    let copy = copy_vertex_of(&plan, "/a");
    let Op::File(file) = &copy.op else { panic!() };
    assert_eq!(file.base, kiln_graph::Input::Scratch, "a linked copy does not depend on its base");
}

#[test]
fn add_sources() {
    let plan = build().plan("FROM busybox\nADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 https://example.com/x.tar.gz /d/\nADD https://github.com/moby/buildkit.git#v0.12:docs /docs\nADD a.txt /a\n");
    let sources: Vec<&SourceOp> =
        plan.graph.vertices.iter().filter_map(|v| if let Op::Source(s) = &v.op { Some(s) } else { None }).collect();
    assert!(
        sources
            .iter()
            .any(|s| matches!(s, SourceOp::Http { filename, checksum: Some(_), .. } if filename == "x.tar.gz"))
    );
    assert!(sources.iter().any(
        |s| matches!(s, SourceOp::Git { reference: Some(r), subdir: Some(d), .. } if r == "v0.12" && d == "docs")
    ));
    let add_local = copy_vertex_of(&plan, "/a");
    let Op::File(file) = &add_local.op else { panic!() };
    assert!(matches!(&file.actions[0], FileAction::Copy(c) if c.unpack));
    let err = build().error("FROM busybox\nADD --checksum=sha256:00 a.txt /a\n");
    assert!(err.contains("--checksum"), "{err}");
}

#[test]
fn image_config_accumulates_and_inherits() {
    let file = "FROM busybox AS base\nLABEL a=1 \"b c\"=\"2 3\"\nEXPOSE 80 53/udp 8000-8001\nUSER app\nVOLUME /data\nSTOPSIGNAL SIGINT\nHEALTHCHECK --interval=5s CMD check\nCMD [\"serve\"]\nONBUILD RUN echo triggered\nFROM base\nENTRYPOINT [\"run\"]\n";
    let plan = build().plan(file);
    let config = &plan.images[0];
    assert_eq!(config.labels.get("b c").map(String::as_str), Some("2 3"));
    let ports: Vec<_> = config.exposed_ports.iter().cloned().collect();
    assert_eq!(ports, ["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]);
    assert_eq!(config.user, "app");
    assert_eq!(config.stop_signal.as_deref(), Some("SIGINT"));
    assert_eq!(config.entrypoint, Some(vec!["run".to_owned()]));
    assert_eq!(config.cmd, None, "ENTRYPOINT resets an inherited CMD");
    assert!(config.on_build.is_empty(), "triggers run in the child and are not inherited further");
    assert_eq!(exec_commands(&plan.graph), ["echo triggered"]);
    let json = serde_json::to_value(config).unwrap();
    assert_eq!(json["ExposedPorts"]["80/tcp"], serde_json::json!({}));
}

#[test]
fn errors_name_file_line_and_stage() {
    let cases = [
        ("FROM busybox\nFORM x\n", "Dockerfile:2: unknown instruction: FORM (did you mean FROM?)"),
        ("RUN x\nFROM busybox\n", "Dockerfile:1: RUN comes before the first FROM: only ARG may precede FROM"),
        ("FROM busybox\nCOPY only\n", "Dockerfile:2: COPY requires at least two arguments"),
        ("FROM busybox\nCOPY --chmod=999 a.txt /\n", "Dockerfile:2: stage stage-0: invalid chmod parameter"),
        (
            "FROM busybox\nRUN --mount=type=nfs,target=/x true\n",
            "Dockerfile:2: --mount: unsupported mount type \"nfs\"",
        ),
        ("FROM busybox\nCOPY --bogus a.txt /\n", "Dockerfile:2: unknown flag: bogus"),
        ("FROM busybox AS 1st\n", "Dockerfile:1: invalid name for build stage"),
        ("FROM --platform=linux busybox\n", "Dockerfile:1: stage stage-0: FROM --platform: invalid platform"),
        ("FROM busybox\nARG\n", "Dockerfile:2: ARG requires at least one argument"),
        ("FROM busybox\nARG =x\n", "Dockerfile:2: ARG names can not be blank"),
        ("FROM busybox\nONBUILD ONBUILD RUN x\n", "Dockerfile:2: chaining ONBUILD"),
        ("FROM busybox\nSHELL /bin/sh\n", "Dockerfile:2: SHELL requires the arguments to be in JSON form"),
        ("FROM busybox\nEXPOSE eighty\n", "Dockerfile:2: stage stage-0: invalid containerPort: eighty"),
        ("FROM busybox\nRUN echo ${x\n", ""),
        ("FROM busybox\nENV a=${b:?required}\n", "Dockerfile:2: stage stage-0: b: required"),
        ("FROM busybox\nRUN <<EOF\nunterminated\n", "Dockerfile:2: unterminated heredoc"),
    ];
    for (file, expected) in cases {
        match build().convert(file) {
            Err(e) => assert!(e.to_string().starts_with(expected) || e.to_string().contains(expected), "{file:?}: {e}"),
            // `RUN echo ${x` is passed to the shell unexpanded, as BuildKit does.
            Ok(_) => assert!(expected.is_empty(), "{file:?} converted"),
        }
    }
}

#[test]
fn copies_with_several_sources_empty_wildcards_and_empty_chown_plan_as_buildkit() {
    // Several sources into a destination without a trailing slash: into that directory.
    let plan = build().plan("FROM busybox AS src\nFROM busybox\nCOPY --from=src /bin/sh /bin/ls /bin\n");
    let copy = plan.graph.vertices.iter().find(|v| v.meta.name.contains("COPY --from")).unwrap();
    let Op::File(file) = &copy.op else { panic!("{copy:?}") };
    let FileAction::Copy(action) = &file.actions[0] else { panic!() };
    assert_eq!(
        (action.sources.as_slice(), action.dest.as_str()),
        (&["/bin/sh".to_string(), "/bin/ls".into()][..], "/bin")
    );
    // Wildcards that match nothing are no-ops; a plain missing path is still an error.
    build().plan("FROM busybox\nCOPY a.txt yarn.lock* cwallet.ss[o] /app/\nCOPY *.pem /certs/\n");
    assert!(build().error("FROM busybox\nCOPY a.txt missing.txt /app/\n").contains("missing.txt: not found"));
    // `--chown=${UID}:${GID}` with both unset is 0:0; an empty half is 0.
    let plan = build().plan("FROM busybox\nCOPY --chown=${UID}:${GID} a.txt /a\nCOPY --chown=7: a.txt /b\n");
    let chowns: Vec<_> = plan
        .graph
        .vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::File(file) => match &file.actions[0] {
                FileAction::Copy(copy) => copy.chown.clone().map(|c| (c.user, c.group)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(chowns, [("0".to_string(), Some("0".to_string())), ("7".to_string(), Some("0".to_string()))]);
}

#[test]
fn digests_are_deterministic() {
    let a = build().plan(TWO_SAME);
    let b = build().plan(TWO_SAME);
    assert_eq!(a.graph, b.graph);
}

/// `FROM scratch AS s0`, then `n` stages each needing the one before, through `link`.
fn stage_chain(n: usize, link: impl Fn(usize) -> String) -> String {
    let mut file = String::from("FROM busybox AS s0\nRUN base\n");
    for i in 0..n {
        file.push_str(&link(i));
    }
    file
}

#[test]
fn deep_stage_chains_convert_up_to_the_limit_and_then_fail_cleanly() {
    // Runs in a default 2 MiB test thread of a debug build, the tightest stack Kiln runs on.
    let copy_chain = |i: usize| format!("FROM busybox AS s{}\nCOPY --from=s{i} /x /x{i}\n", i + 1);
    let from_chain = |i: usize| format!("FROM s{i} AS s{}\nRUN step{i}\n", i + 1);
    let mount_chain = |i: usize| format!("FROM busybox AS s{}\nRUN --mount=from=s{i},target=/m true{i}\n", i + 1);
    for link in [&copy_chain as &dyn Fn(usize) -> String, &from_chain, &mount_chain] {
        let deepest = MAX_STAGE_DEPTH - 1;
        let plan = build().plan(&stage_chain(deepest, link));
        assert!(exec_commands(&plan.graph).contains(&"base".to_owned()));
        for n in [MAX_STAGE_DEPTH, 1000] {
            let err = build().error(&stage_chain(n, link));
            assert!(err.contains(&format!("stage dependency chain is deeper than {MAX_STAGE_DEPTH} stages")), "{err}");
        }
    }
}

#[test]
fn doubled_variables_and_copied_environments_fail_at_a_bound_naming_the_line() {
    let mut dockerfile = String::from("FROM scratch\nARG A0=0123456789abcdef\n");
    for n in 1..=26 {
        dockerfile += &format!("ARG A{n}=${{A{}}}${{A{}}}\n", n - 1, n - 1);
    }
    dockerfile += "RUN true\n";
    let error = build().error(&dockerfile);
    // 16 << 17 is the first value over 1 MiB: line 2 + 17.
    assert!(error.starts_with("Dockerfile:19"), "{error}");
    assert!(error.contains("is longer than 1048576 bytes"), "{error}");

    // Many variables under the word limit, copied into many steps: the whole-build bound.
    let mut dockerfile = String::from("FROM scratch\nARG A0=0123456789abcdef\n");
    for n in 1..=15 {
        dockerfile += &format!("ARG A{n}=${{A{}}}${{A{}}}\n", n - 1, n - 1);
    }
    for n in 0..40 {
        dockerfile += &format!("ENV V{n}=$A15\nRUN true\n");
    }
    let error = build().error(&dockerfile);
    assert!(error.contains("grows past 16 MiB"), "{error}");
    assert!(error.starts_with("Dockerfile:"), "{error}");

    // A replacement that multiplies a value is bounded too.
    let error = build().error("FROM scratch\nARG A=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\nARG B=${A//a/$A$A$A$A}\nARG C=${B//a/$B}\n");
    assert!(error.starts_with("Dockerfile:4") && error.contains("longer than"), "{error}");
}

#[test]
fn many_env_and_arg_instructions_convert_with_every_value() {
    // Each instruction looks up and sets variables through an index: linear in the file.
    let mut dockerfile = String::from("FROM scratch\n");
    for n in 0..20_000 {
        dockerfile += &format!("ENV V{n}=${{V0:-start}}-{n}\nARG A{n}=$V{n}\n");
    }
    dockerfile += "ENV V5=again\nRUN true\n";
    let plan = build().plan(&dockerfile);
    let env = &execs(&plan.graph)[0].env;
    assert_eq!(env[0], "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    assert_eq!(env.last().unwrap(), "V5=again", "set again: moved after the others");
    assert!(env.contains(&"V19999=start-0-19999".to_string()));
    assert_eq!(plan.images[0].env[6], "V5=again", "the image config replaces in place");
    assert!(env.contains(&"A7=start-0-7".to_string()), "ARGs without an ENV of their name join the RUN's env");
    assert_eq!(env.iter().filter(|e| e.starts_with('V')).count(), 20_000);
}

#[test]
fn ssh_mounts_are_numbered_and_the_first_is_ssh_auth_sock() {
    let plan = build().plan(
        "FROM busybox\nRUN --mount=type=ssh --mount=type=ssh,id=other --mount=type=ssh,target=/s ls\n\
         ENV SSH_AUTH_SOCK=/mine\nRUN --mount=type=ssh ls\n",
    );
    let execs = execs(&plan.graph);
    let targets: Vec<&str> = execs[0].mounts.iter().map(|m| m.target.as_str()).collect();
    assert_eq!(targets, ["/run/buildkit/ssh_agent.0", "/run/buildkit/ssh_agent.1", "/s"]);
    assert_eq!(env_of(execs[0], "SSH_AUTH_SOCK"), Some("/run/buildkit/ssh_agent.0"));
    assert_eq!(env_of(execs[1], "SSH_AUTH_SOCK"), Some("/mine"), "an ENV of it wins");
}

fn image_sources(graph: &Graph) -> Vec<String> {
    graph
        .vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::Source(SourceOp::Image { reference, .. }) => Some(reference.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn named_image_contexts_stand_for_bases_stages_and_copy_sources() {
    let mut b = build();
    let image = |r: &str| NamedInput::Image(r.parse().unwrap());
    b.named.insert("base".into(), image("alpine:3.19"));
    b.named.insert("deps".into(), image("registry.example/deps:1"));
    // A base name no stage has (names are case-insensitive); a stage the context replaces
    // (its RUN is never converted), used as a COPY source.
    let plan = b.plan("FROM busybox AS deps\nRUN slow\nFROM Base\nCOPY --from=deps /d /d\nRUN make\n");
    assert_eq!(exec_commands(&plan.graph), ["make"], "the replaced stage's RUN is not converted");
    let mut sources = image_sources(&plan.graph);
    sources.sort();
    assert_eq!(sources, ["docker.io/library/alpine:3.19", "registry.example/deps:1"]);
}

#[test]
fn a_named_plan_joins_the_graph_with_its_config_and_platform() {
    let mut base = build();
    base.platforms = vec!["linux/amd64", "linux/arm64"];
    let base_plan = base.plan("FROM busybox\nRUN make base\nENV FROM_BASE=yes\nWORKDIR /srv\n");
    let mut b = build();
    b.platforms = vec!["linux/arm64"];
    b.named.insert("base".into(), NamedInput::Plan(std::sync::Arc::new(base_plan.clone())));
    let plan =
        b.plan("FROM base AS app\nRUN make app\nFROM busybox\nCOPY --from=app /srv /srv\nCOPY --from=base /srv /b\n");
    let app = execs(&plan.graph).into_iter().find(|e| e.args.last().unwrap() == "make app").unwrap();
    assert_eq!(env_of(app, "FROM_BASE"), Some("yes"), "the base's config comes with it");
    assert_eq!(app.cwd, "/srv");
    assert_eq!(app.platform, "linux/arm64".parse().unwrap());
    // The arm64 output of the base plan, with the same digest, is the app's root.
    let arm64 = base_plan.graph.outputs.iter().find(|o| o.platform.architecture == "arm64").unwrap();
    let app_vertex = plan
        .graph
        .vertices
        .iter()
        .find(|v| matches!(&v.op, Op::Exec(e) if e.args.last().unwrap() == "make app"))
        .unwrap();
    assert_eq!(app_vertex.inputs, [arm64.digest.unwrap()]);
    assert!(plan.graph.vertices.iter().any(|v| v.digest == arm64.digest.unwrap()));
    // Only the arm64 half of the base is in the graph.
    assert_eq!(exec_commands(&plan.graph).iter().filter(|c| *c == "make base").count(), 1);

    b.platforms = vec!["linux/s390x"];
    let error = b.error("FROM base\nRUN make app\n");
    assert!(
        error.contains("named context base: target stage-0 is built for linux/amd64, linux/arm64, not linux/s390x"),
        "{error}"
    );
}

#[test]
fn named_url_contexts_are_git_checkouts_or_downloads() {
    let mut b = build();
    b.named.insert("src".into(), NamedInput::Url("https://git.example/app.git#v1:web".into()));
    b.named.insert("notes".into(), NamedInput::Url("https://files.example/dl/notes.txt?x=1".into()));
    let plan = b.plan("FROM busybox\nCOPY --from=src / /src\nCOPY --from=notes /notes.txt /notes.txt\n");
    let sources: Vec<&SourceOp> = plan
        .graph
        .vertices
        .iter()
        .filter_map(|v| match &v.op {
            Op::Source(s @ (SourceOp::Git { .. } | SourceOp::Http { .. })) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(sources.len(), 2, "{sources:?}");
    assert!(sources.iter().any(|s| matches!(s, SourceOp::Git { remote, reference: Some(r), subdir: Some(d), .. }
        if remote == "https://git.example/app.git" && r == "v1" && d == "web")));
    assert!(sources.iter().any(|s| matches!(s, SourceOp::Http { filename, .. } if filename == "notes.txt")));
}
