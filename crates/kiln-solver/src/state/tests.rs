//! The state machine alone: dedup, cache, parallelism, failure and cancellation.

use kiln_graph::{ExecOp, GraphBuilder, Input, NetworkMode, Output, SecurityMode, VertexMeta};
use kiln_types::Platform;

use super::*;

fn meta(name: &str) -> VertexMeta {
    VertexMeta { name: name.into(), stage: None, platform: None, lines: None }
}

fn run(command: &str) -> Op {
    Op::Exec(ExecOp {
        args: vec!["/bin/sh".into(), "-c".into(), command.into()],
        env: vec![],
        cwd: "/".into(),
        user: String::new(),
        network: NetworkMode::Default,
        security: SecurityMode::Sandbox,
        rootfs: Input::Index(0),
        mounts: vec![],
        platform: Platform::host(),
    })
}

fn image() -> Op {
    Op::Source(SourceOp::Image { reference: "busybox".parse().unwrap(), platform: Platform::host() })
}

/// An image with one RUN per command on top, all feeding one output through a merge.
fn graph(commands: &[&str]) -> Graph {
    let mut builder = GraphBuilder::new();
    let base = builder.add(image(), vec![], meta("FROM")).unwrap();
    let runs: Vec<Digest> =
        commands.iter().map(|c| builder.add(run(c), vec![base], meta(&format!("RUN {c}"))).unwrap()).collect();
    let top = builder.add(Op::Merge(Default::default()), runs, meta("merge")).unwrap();
    builder.finish(vec![Output { platform: Platform::host(), digest: Some(top) }])
}

type State = SolverState<String>;
type Ending = (Result<Vec<Option<String>>, String>, Vec<VertexRecord>);

fn runs(effects: &[Effect<String>]) -> Vec<(Digest, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Run { key, vertex, .. } => Some((*key, vertex.meta.name.clone())),
            _ => None,
        })
        .collect()
}

fn finished(effects: &[Effect<String>], build: BuildId) -> Option<Ending> {
    effects.iter().find_map(|e| match e {
        Effect::Emit { build: b, event: Event::Finished(result, records) } if *b == build => {
            Some((result.clone(), records.clone()))
        }
        _ => None,
    })
}

fn ok(output: &str, pin: Option<Digest>) -> Result<Executed<String>, Failed> {
    Ok(Executed { pin, ..Executed::new(output.into()) })
}

/// Runs every `Run` effect to success (outputs named after the vertex), repeatedly, and
/// returns all effects. Every cached output is still available.
fn drive(state: &mut State, effects: Vec<Effect<String>>, pin: Digest) -> Vec<Effect<String>> {
    drive_with(state, effects, pin, |_| true)
}

/// [`drive`], answering cache checks with `available`.
fn drive_with(
    state: &mut State,
    mut effects: Vec<Effect<String>>,
    pin: Digest,
    available: impl Fn(&str) -> bool,
) -> Vec<Effect<String>> {
    let mut all = Vec::new();
    while !effects.is_empty() {
        let mut next = Vec::new();
        for effect in &effects {
            match effect {
                Effect::Run { key, vertex, .. } => {
                    let pin = matches!(vertex.op, Op::Source(_)).then_some(pin);
                    let result = ok(&vertex.meta.name, pin);
                    next.extend(state.apply(Command::Finished { key: *key, result, at: 2 }));
                }
                Effect::CheckCached { build, index, key, output } => {
                    let source = available(output).then(|| "local".to_string());
                    next.extend(state.apply(Command::CacheChecked {
                        build: *build,
                        index: *index,
                        key: *key,
                        source,
                        at: 2,
                    }));
                }
                _ => {}
            }
        }
        all.extend(effects);
        effects = next;
    }
    all
}

fn submit(state: &mut State, build: BuildId, graph: Graph, options: BuildOptions) -> Vec<Effect<String>> {
    state.apply(Command::Submit { build, graph, options, at: 1 })
}

#[test]
fn identical_work_runs_once_across_concurrent_builds() {
    let mut state = State::default();
    let first = submit(&mut state, 1, graph(&["a", "b"]), BuildOptions::default());
    let second = submit(&mut state, 2, graph(&["a", "b"]), BuildOptions::default());
    assert_eq!(runs(&first).len(), 1, "only the image source is ready");
    assert!(runs(&second).is_empty(), "the second build waits on the first build's job");
    let pin = Digest::of(b"manifest");
    let effects = drive(&mut state, first, pin);
    assert_eq!(runs(&effects).len(), 4, "source, a, b, merge: each once");
    for build in [1, 2] {
        let (result, records) = finished(&effects, build).unwrap();
        assert_eq!(result.unwrap(), vec![Some("merge".to_string())]);
        let expected = if build == 1 { Status::Executed } else { Status::Deduplicated };
        assert!(records.iter().all(|r| r.status == expected), "{build}: {records:?}");
    }
    assert_eq!((state.build_count(), state.job_count()), (0, 0));
}

#[test]
fn cache_groups_share_neither_jobs_nor_cache_entries() {
    let mut state = State::default();
    let pin = Digest::of(b"manifest");
    let scoped = |group: &str| BuildOptions { cache_group: Some(group.to_string()), ..Default::default() };
    let first = submit(&mut state, 1, graph(&["a"]), scoped("team-a"));
    let second = submit(&mut state, 2, graph(&["a"]), scoped("team-b"));
    assert_eq!((runs(&first).len(), runs(&second).len()), (1, 1), "team-b does not wait on team-a's job");
    let mut effects = first;
    effects.extend(second);
    let effects = drive(&mut state, effects, pin);
    assert_eq!(runs(&effects).len(), 6, "source and a and the merge, once per group");
    for build in [1, 2] {
        let (_, records) = finished(&effects, build).unwrap();
        assert!(records.iter().all(|r| r.status == Status::Executed), "{build}: {records:?}");
    }

    // A later build of each group hits its own group's entries; an unscoped one none.
    let submitted = submit(&mut state, 3, graph(&["a"]), scoped("team-b"));
    let effects = drive(&mut state, submitted, pin);
    assert_eq!(runs(&effects).len(), 1, "only the source resolves");
    let submitted = submit(&mut state, 4, graph(&["a"]), BuildOptions::default());
    let effects = drive(&mut state, submitted, pin);
    assert_eq!(runs(&effects).len(), 3, "the default group shares nothing with team-a or team-b");
}

#[test]
fn a_finished_build_is_served_from_the_cache_unless_no_cache() {
    let mut state = State::default();
    let pin = Digest::of(b"manifest");
    let effects = submit(&mut state, 1, graph(&["a"]), BuildOptions::default());
    drive(&mut state, effects, pin);

    let submitted = submit(&mut state, 2, graph(&["a"]), BuildOptions::default());
    let effects = drive(&mut state, submitted, pin);
    assert_eq!(runs(&effects).iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["FROM"], "sources always resolve");
    let (_, records) = finished(&effects, 2).unwrap();
    assert!(records.iter().all(|r| r.status == Status::Cached), "fully cached: {records:?}");

    let submitted = submit(&mut state, 3, graph(&["a"]), BuildOptions { no_cache: true, ..Default::default() });
    let effects = drive(&mut state, submitted, pin);
    assert_eq!(runs(&effects).len(), 3);

    // The image tag moved: everything below it runs again.
    let submitted = submit(&mut state, 4, graph(&["a"]), BuildOptions::default());
    let effects = drive(&mut state, submitted, Digest::of(b"new manifest"));
    assert_eq!(runs(&effects).len(), 3);
}

#[test]
fn a_cached_output_that_is_gone_is_forgotten_and_executed_again() {
    let mut state = State::default();
    let pin = Digest::of(b"manifest");
    let effects = submit(&mut state, 1, graph(&["a", "b"]), BuildOptions::default());
    drive(&mut state, effects, pin);

    // `RUN a`'s output went with its worker; `RUN b`'s and the merge's are still there.
    let submitted = submit(&mut state, 2, graph(&["a", "b"]), BuildOptions::default());
    let effects = drive_with(&mut state, submitted, pin, |output| output != "RUN a");
    let ran: Vec<String> = runs(&effects).into_iter().map(|r| r.1).collect();
    assert_eq!(ran, ["FROM", "RUN a"]);
    let forgotten = effects.iter().filter(|e| matches!(e, Effect::Forget { .. })).count();
    assert_eq!(forgotten, 1);
    let (result, records) = finished(&effects, 2).unwrap();
    assert_eq!(result.unwrap(), vec![Some("merge".to_string())]);
    let status = |name: &str| records.iter().find(|r| r.name == name).unwrap().status;
    assert_eq!((status("RUN a"), status("RUN b"), status("merge")), (Status::Executed, Status::Cached, Status::Cached));
}

#[test]
fn per_build_parallelism_bounds_started_jobs() {
    let mut state = State::default();
    let commands = ["1", "2", "3", "4", "5"];
    let effects =
        submit(&mut state, 1, graph(&commands), BuildOptions { max_parallelism: Some(2), ..Default::default() });
    let (source, _) = runs(&effects)[0];
    let effects = state.apply(Command::Finished { key: source, result: ok("base", Some(Digest::of(b"m"))), at: 2 });
    let started = runs(&effects);
    assert_eq!(started.len(), 2, "{started:?}");
    let effects = state.apply(Command::Finished { key: started[0].0, result: ok("x", None), at: 3 });
    assert_eq!(runs(&effects).len(), 1, "one finished, one more starts");
}

#[test]
fn a_failing_shared_job_fails_every_waiting_build_with_its_error() {
    let mut state = State::default();
    let first = submit(&mut state, 1, graph(&["boom"]), BuildOptions::default());
    submit(&mut state, 2, graph(&["boom"]), BuildOptions::default());
    let (source, _) = runs(&first)[0];
    let effects = state.apply(Command::Finished { key: source, result: ok("base", Some(Digest::of(b"m"))), at: 2 });
    let (boom, _) = runs(&effects)[0];
    let effects = state.apply(Command::Finished { key: boom, result: Err(String::from("exit code: 1").into()), at: 3 });
    for build in [1, 2] {
        let (result, records) = finished(&effects, build).unwrap();
        assert_eq!(result.unwrap_err(), "exit code: 1");
        assert_eq!(records.iter().filter(|r| r.status == Status::Failed).count(), 1);
        assert_eq!(records.iter().filter(|r| r.status == Status::Skipped).count(), 1, "the merge never ran");
    }
    assert_eq!((state.build_count(), state.job_count()), (0, 0));
}

#[test]
fn shared_work_is_aborted_only_when_every_waiter_cancelled() {
    let mut state = State::default();
    let first = submit(&mut state, 1, graph(&["slow"]), BuildOptions::default());
    submit(&mut state, 2, graph(&["slow"]), BuildOptions::default());
    let (source, _) = runs(&first)[0];
    let effects = state.apply(Command::Finished { key: source, result: ok("base", Some(Digest::of(b"m"))), at: 2 });
    let (slow, _) = runs(&effects)[0];

    let effects = state.apply(Command::Cancel { build: 1 });
    assert!(!effects.iter().any(|e| matches!(e, Effect::Abort { .. })), "build 2 still waits");
    assert!(finished(&effects, 1).unwrap().0.is_err());
    let effects = state.apply(Command::Cancel { build: 2 });
    assert!(effects.iter().any(|e| matches!(e, Effect::Abort { key } if *key == slow)));
    // A late result of the aborted job is not remembered.
    state.apply(Command::Finished { key: slow, result: ok("late", None), at: 9 });
    let submitted = submit(&mut state, 3, graph(&["slow"]), BuildOptions::default());
    let effects = drive(&mut state, submitted, Digest::of(b"m"));
    assert!(runs(&effects).iter().any(|(_, name)| name == "RUN slow"), "not cached from the aborted run");
}

#[test]
fn replaying_the_same_commands_gives_the_same_effects() {
    let script = |state: &mut State| {
        let mut log = Vec::new();
        let effects =
            submit(state, 1, graph(&["a", "b"]), BuildOptions { max_parallelism: Some(1), ..Default::default() });
        log.push(format!("{:?}", runs(&effects)));
        let effects = drive(state, effects, Digest::of(b"m"));
        log.push(format!("{:?}", runs(&effects)));
        log
    };
    assert_eq!(script(&mut State::default()), script(&mut State::default()));
}

#[test]
fn imported_results_are_cached_with_their_source_and_no_cache_never_imports() {
    let mut state = State::default();
    let mut effects = submit(&mut state, 1, graph(&["a"]), BuildOptions::default());
    let mut records = None;
    while !effects.is_empty() {
        let mut next = Vec::new();
        for effect in &effects {
            if let Effect::Run { key, vertex, import, .. } = effect {
                let source = matches!(vertex.op, Op::Source(_));
                // Sources resolve every build: never imported.
                assert_eq!(*import, !source, "{}", vertex.meta.name);
                let result = match source {
                    true => ok("FROM", Some(Digest::of(b"pin"))),
                    false => {
                        Ok(Executed { cache_source: Some("registry:r/c".into()), ..Executed::new("imported".into()) })
                    }
                };
                next.extend(state.apply(Command::Finished { key: *key, result, at: 2 }));
            }
        }
        records = finished(&next, 1).or(records);
        effects = next;
    }
    let (result, records) = records.expect("the build finished");
    assert!(result.is_ok());
    let run = records.iter().find(|r| r.name == "RUN a").unwrap();
    assert_eq!((run.status, run.cache_source.as_deref()), (Status::Cached, Some("registry:r/c")));
    let from = records.iter().find(|r| r.name == "FROM").unwrap();
    assert_eq!((from.status, from.cache_source.as_deref()), (Status::Executed, None));

    // The local cache serves the next build, and says so; --no-cache runs without importing.
    let mut second = State::default();
    let effects = submit(&mut second, 1, graph(&["a"]), BuildOptions::default());
    drive(&mut second, effects, Digest::of(b"pin"));
    let effects = submit(&mut second, 2, graph(&["a"]), BuildOptions::default());
    let (_, records) = finished(&drive(&mut second, effects, Digest::of(b"pin")), 2).unwrap();
    let run = records.iter().find(|r| r.name == "RUN a").unwrap();
    assert_eq!((run.status, run.cache_source.as_deref()), (Status::Cached, Some("local")));
    let options = BuildOptions { no_cache: true, ..BuildOptions::default() };
    let effects = submit(&mut second, 3, graph(&["a"]), options);
    let all = drive(&mut second, effects, Digest::of(b"pin"));
    assert_eq!(runs(&all).len(), 3, "FROM, RUN a and the merge all run");
    assert!(all.iter().all(|e| !matches!(e, Effect::Run { import: true, .. })));
}
