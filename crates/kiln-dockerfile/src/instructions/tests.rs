//! Instruction-layer tests: stage splitting, typed arguments and their errors.

use super::*;

fn file(text: &str) -> Dockerfile {
    parse_dockerfile(text).unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn check_error(text: &str, line: usize, fragment: &str) {
    let err = parse_dockerfile(text).expect_err("expected an error");
    assert_eq!(err.line, line, "{err}");
    assert!(err.message.contains(fragment), "{err:?} lacks {fragment:?}");
}

#[test]
fn splits_meta_args_and_stages() {
    let f = file("ARG A=1 B\nFROM busybox AS Build\nRUN x\nFROM build\nCMD y\n");
    assert_eq!(f.meta_args.iter().map(|(a, _)| a.key.as_str()).collect::<Vec<_>>(), ["A", "B"]);
    assert_eq!(f.meta_args[0].0.default.as_deref(), Some("1"));
    assert_eq!(f.stages.len(), 2);
    assert_eq!(f.stages[0].from.name.as_deref(), Some("build"), "stage names are lowercased");
    assert_eq!(f.stages[1].display_name(), "stage-1");
    assert_eq!(f.stages[1].commands[0].keyword, "CMD");
}

#[test]
fn typed_copy_and_add() {
    let f = file(
        "FROM a\nCOPY --from=b --chown=1:2 --chmod=755 --link --parents --exclude=*.md --exclude=x x y /d/\nADD --keep-git-dir --unpack=false --checksum=sha256:ab u /\n",
    );
    let Instruction::AddCopy(copy) = &f.stages[0].commands[0].instruction else { panic!() };
    assert_eq!(copy.sources, ["x", "y"]);
    assert_eq!(copy.dest, "/d/");
    assert_eq!(copy.from.as_deref(), Some("b"));
    assert_eq!(copy.exclude, ["*.md", "x"]);
    assert!(copy.link && copy.parents && !copy.is_add);
    let Instruction::AddCopy(add) = &f.stages[0].commands[1].instruction else { panic!() };
    assert!(add.is_add && add.keep_git_dir);
    assert_eq!(add.unpack, Some(false));
}

#[test]
fn typed_run_and_healthcheck() {
    let f = file(
        "FROM a\nRUN --network=host --security=insecure --mount=type=tmpfs,target=/t make\nHEALTHCHECK --interval=1m30s --retries=3 CMD [\"c\"]\nHEALTHCHECK NONE\n",
    );
    let Instruction::Run(run) = &f.stages[0].commands[0].instruction else { panic!() };
    assert_eq!(run.network, NetworkMode::Host);
    assert_eq!(run.security, SecurityMode::Insecure);
    assert_eq!(run.mounts, ["type=tmpfs,target=/t"]);
    let Instruction::Healthcheck(h) = &f.stages[0].commands[1].instruction else { panic!() };
    assert_eq!(h.test, ["CMD", "c"]);
    assert_eq!(h.interval, Some(90_000_000_000));
    assert_eq!(h.retries, Some(3));
    let Instruction::Healthcheck(none) = &f.stages[0].commands[2].instruction else { panic!() };
    assert_eq!(none.test, ["NONE"]);
}

#[test]
fn go_durations() {
    assert_eq!(parse_go_duration("0"), Some(0));
    assert_eq!(parse_go_duration("1.5s"), Some(1_500_000_000));
    assert_eq!(parse_go_duration("2h45m"), Some(9_900_000_000_000));
    assert_eq!(parse_go_duration("5"), None);
    assert_eq!(parse_go_duration("x"), None);
    assert_eq!(parse_go_duration("-1s"), None, "a flag's duration is not negative");
    assert_eq!(kiln_types::parse_go_duration("-1m30s"), Some(-90_000_000_000));
    assert_eq!(kiln_types::parse_go_duration("+250\u{b5}s"), Some(250_000));
    assert_eq!(kiln_types::parse_go_duration("-"), None);
    assert_eq!(kiln_types::parse_go_duration("1e3s"), None);
    assert_eq!(kiln_types::parse_go_duration("99999999999h"), None, "overflow");
}

#[test]
fn instruction_errors() {
    check_error("FROM a\nFORM b\n", 2, "unknown instruction: FORM (did you mean FROM?)");
    check_error("FROM a\nBOGUS\n", 2, "unknown instruction: BOGUS");
    check_error("FROM a b\n", 1, "FROM requires either one argument, or three");
    check_error("FROM a AS b!\n", 1, "invalid name for build stage");
    check_error("FROM a\nCOPY x\n", 2, "COPY requires at least two arguments");
    check_error("FROM a\nADD --from=x a b\n", 2, "unknown flag: from");
    check_error("FROM a\nCOPY --from a b\n", 2, "missing a value on flag: from");
    check_error("FROM a\nRUN --network=bridge x\n", 2, "unsupported network mode");
    check_error("FROM a\nRUN\n", 2, "RUN requires at least one argument");
    check_error("FROM a\nUSER\n", 2, "USER requires exactly one argument");
    check_error("FROM a\nWORKDIR\n", 2, "WORKDIR requires exactly one argument");
    check_error("FROM a\nEXPOSE\n", 2, "EXPOSE requires at least one argument");
    check_error("FROM a\nONBUILD FROM b\n", 2, "FROM isn't allowed as an ONBUILD trigger");
    check_error("FROM a\nONBUILD BOGUS x\n", 2, "ONBUILD trigger: unknown instruction");
    check_error("FROM a\nHEALTHCHECK CONNECT TCP 7000\n", 2, "unknown type \"CONNECT\"");
    check_error("FROM a\nHEALTHCHECK --interval=1ns CMD x\n", 2, "cannot be less than 1ms");
    check_error("FROM a\nHEALTHCHECK --retries=-1 CMD x\n", 2, "--retries");
    check_error("FROM a\nHEALTHCHECK NONE extra\n", 2, "HEALTHCHECK NONE takes no arguments");
    check_error("ENV a=b\nFROM a\n", 1, "only ARG may precede FROM");
    check_error("ARG a\n", 1, "no FROM instruction");
}
