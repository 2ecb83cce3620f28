//! The solver over a real worker: parallel stages, dedup within and across builds, the cache,
//! max-parallelism, and shared failures. Evidence comes from inside the containers (files in
//! a shared cache mount), not from timing.

use std::sync::Arc;

use kiln_kv::{MemoryKv, SharedKv};
use kiln_model::{BuildEvent, Status, VertexRecord};
use kiln_solver::{BuildOptions, Event, Solver, SolverConfig};
use kiln_worker::{LocalExecutor, Snapshot};

use super::*;

type Ending = (Result<Vec<Option<Snapshot>>, String>, Vec<VertexRecord>);

impl Fixture {
    fn solver(&self, worker_parallelism: usize, kv: Option<SharedKv>) -> Solver<LocalExecutor> {
        let executor = Arc::new(LocalExecutor::new(Arc::clone(&self.worker), "local"));
        Solver::start(
            executor,
            SolverConfig {
                parallelism: kiln_solver::Parallelism::Fixed(worker_parallelism),
                ..SolverConfig::default()
            },
            kv,
        )
        .unwrap()
    }

    /// A cache mount's directory on the host, where the steps leave their evidence.
    fn cache_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("worker/cache").join(Digest::of(id.as_bytes()).hex()).join("0")
    }

    fn evidence(&self, id: &str, file: &str) -> String {
        std::fs::read_to_string(self.cache_dir(id).join(file)).unwrap_or_default()
    }
}

async fn solve(solver: &Solver<LocalExecutor>, graph: &Graph, options: BuildOptions, build: &BuildInputs) -> Ending {
    solver.submit(graph.clone(), options, Arc::new(build.clone())).wait().await
}

fn statuses(records: &[VertexRecord], kind: &str) -> Vec<Status> {
    records.iter().filter(|r| r.kind == kind).map(|r| r.status).collect()
}

#[tokio::test]
async fn independent_stages_run_in_parallel_and_unused_ones_never() {
    let fixture = Fixture::new().await;
    // Each stage marks itself and waits (up to 10 s) until all three marks exist: run one
    // after another, the first would give up seeing only itself.
    let stage = |name: &str| {
        format!(
            "FROM BASE AS {name}\nRUN --mount=type=cache,id=par,target=/c touch /c/{name} && for i in $(seq 100); do [ -e /c/a ] && [ -e /c/b ] && [ -e /c/c ] && break; sleep 0.1; done; ls /c > /seen\n"
        )
    };
    let dockerfile = format!(
        "{}{}{}FROM BASE AS unused\nRUN --mount=type=cache,id=par,target=/c touch /c/unused\nFROM BASE\nCOPY --from=a /seen /a\nCOPY --from=b /seen /b\nCOPY --from=c /seen /c\n",
        stage("a"),
        stage("b"),
        stage("c")
    );
    let (graph, ctx) = fixture.plan(&dockerfile, &fixture.context(&[]));
    let (result, records) = solve(&fixture.solver(8, None), &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    let image = result.unwrap()[0].clone().unwrap();
    for name in ["/a", "/b", "/c"] {
        // Each stage saw all three marks while it ran: they ran at the same time.
        assert_eq!(content(&fixture.worker, &image, name).as_deref(), Some("a\nb\nc\n"), "{name}");
    }
    assert!(!fixture.cache_dir("par").join("unused").exists(), "the unused stage ran");
    assert_eq!(statuses(&records, "exec"), [Status::Executed; 3]);
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn identical_steps_run_once_and_steps_that_differ_by_env_run_twice() {
    let fixture = Fixture::new().await;
    let solver = fixture.solver(8, None);
    let two_stages = |env_a: &str, env_b: &str| {
        format!(
            "FROM BASE AS one\n{env_a}RUN --mount=type=cache,id=count,target=/c echo run >> /c/log\nFROM BASE AS two\n{env_b}RUN --mount=type=cache,id=count,target=/c echo run >> /c/log\nFROM BASE\nCOPY --from=one /etc/passwd /one\nCOPY --from=two /etc/passwd /two\n"
        )
    };
    let (graph, ctx) = fixture.plan(&two_stages("", ""), &fixture.context(&[]));
    let (result, records) = solve(&solver, &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    result.unwrap();
    assert_eq!(fixture.evidence("count", "log"), "run\n", "identical RUNs on the same base execute once");
    assert_eq!(statuses(&records, "exec"), [Status::Executed]);

    let (graph, ctx) = fixture.plan(&two_stages("ENV A=1\n", "ENV A=2\n"), &fixture.context(&[]));
    let (result, records) = solve(&solver, &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    result.unwrap();
    assert_eq!(fixture.evidence("count", "log"), "run\nrun\nrun\n", "different ENV: two more executions");
    assert_eq!(statuses(&records, "exec"), [Status::Executed; 2]);
}

/// 20 stages that each record how many of them are running, in a shared cache mount.
fn wide(stages: usize) -> String {
    let mut text = String::new();
    for i in 0..stages {
        text.push_str(&format!(
            "FROM BASE AS s{i}\nRUN --mount=type=cache,id=wide,target=/c mkdir /c/run.{i} && ls -d /c/run.* | wc -l >> /c/counts && sleep 0.3 && rmdir /c/run.{i}\n"
        ));
    }
    text.push_str("FROM BASE\n");
    for i in 0..stages {
        text.push_str(&format!("COPY --from=s{i} /etc/group /g{i}\n"));
    }
    text
}

fn peak(counts: &str) -> usize {
    counts.lines().filter_map(|l| l.trim().parse().ok()).max().unwrap_or(0)
}

#[tokio::test]
async fn max_parallelism_bounds_concurrent_executions() {
    let fixture = Fixture::new().await;
    let (graph, ctx) = fixture.plan(&wide(20), &fixture.context(&[]));
    let (result, _) = solve(&fixture.solver(4, None), &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    result.unwrap();
    let counts = fixture.evidence("wide", "counts");
    assert_eq!(counts.lines().count(), 20);
    assert!((2..=4).contains(&peak(&counts)), "worker max-parallelism 4: peak {}", peak(&counts));

    std::fs::remove_file(fixture.cache_dir("wide").join("counts")).unwrap();
    let options = BuildOptions { max_parallelism: Some(3), no_cache: true, ..BuildOptions::default() };
    let (result, _) = solve(&fixture.solver(16, None), &graph, options, &inputs(&ctx, &[])).await;
    result.unwrap();
    let counts = fixture.evidence("wide", "counts");
    assert!((2..=3).contains(&peak(&counts)), "build max-parallelism 3: peak {}", peak(&counts));
}

#[tokio::test]
async fn a_second_build_is_fully_cached_and_an_edit_reruns_only_its_dependents() {
    let fixture = Fixture::new().await;
    let kv: SharedKv = Arc::new(MemoryKv::new());
    let solver = fixture.solver(8, Some(Arc::clone(&kv)));
    let dockerfile =
        "FROM BASE\nCOPY a.txt /a.txt\nRUN cat /a.txt > /a.out\nCOPY b.txt /b.txt\nRUN cat /b.txt > /b.out\n";
    let context = fixture.context(&[("a.txt", "a1\n"), ("b.txt", "b1\n")]);
    let (graph, ctx) = fixture.plan(dockerfile, &context);
    let (result, records) = solve(&solver, &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    result.unwrap();
    assert!(records.iter().all(|r| r.status == Status::Executed), "{records:?}");

    let (result, records) = solve(&solver, &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    assert_eq!(content(&fixture.worker, &result.unwrap()[0].clone().unwrap(), "/b.out").as_deref(), Some("b1\n"));
    assert!(records.iter().all(|r| r.status == Status::Cached), "fully cached: {records:?}");

    // The cache index survives a restart of the solver.
    let (result, records) =
        solve(&fixture.solver(8, Some(kv)), &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    result.unwrap();
    assert!(records.iter().all(|r| r.status == Status::Cached), "after restart: {records:?}");

    std::fs::write(context.join("b.txt"), "b2\n").unwrap();
    let (graph, ctx) = fixture.plan(dockerfile, &context);
    let (result, records) = solve(&solver, &graph, BuildOptions::default(), &inputs(&ctx, &[])).await;
    assert_eq!(content(&fixture.worker, &result.unwrap()[0].clone().unwrap(), "/b.out").as_deref(), Some("b2\n"));
    let executed: Vec<&str> =
        records.iter().filter(|r| r.status == Status::Executed).map(|r| r.name.as_str()).collect();
    assert_eq!(executed.len(), 3, "the b.txt context load, its COPY and the RUN after it: {executed:?}");
    assert!(executed.iter().all(|name| name.contains("b.txt") || name.contains("/b.out")), "{executed:?}");
}

#[tokio::test]
async fn concurrent_builds_share_one_execution_and_one_failure() {
    let fixture = Fixture::new().await;
    let solver = fixture.solver(8, None);
    let dockerfile =
        "FROM BASE\nRUN --mount=type=cache,id=shared,target=/c echo x >> /c/log && sleep 1 && echo built > /out\n";
    let (graph, ctx) = fixture.plan(dockerfile, &fixture.context(&[]));
    let build = inputs(&ctx, &[]);
    let handles: Vec<_> =
        (0..5).map(|_| solver.submit(graph.clone(), BuildOptions::default(), Arc::new(build.clone()))).collect();
    let mut statuses_seen = Vec::new();
    for mut handle in handles {
        let (result, records) = handle.wait().await;
        let image = result.unwrap()[0].clone().unwrap();
        assert_eq!(content(&fixture.worker, &image, "/out").as_deref(), Some("built\n"));
        statuses_seen.extend(statuses(&records, "exec"));
    }
    assert_eq!(fixture.evidence("shared", "log"), "x\n", "five builds, one execution");
    statuses_seen.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        statuses_seen,
        [Status::Deduplicated, Status::Deduplicated, Status::Deduplicated, Status::Deduplicated, Status::Executed]
    );

    let failing = "FROM BASE\nRUN echo the-shared-output && sleep 1 && exit 7\n";
    let (graph, ctx) = fixture.plan(failing, &fixture.context(&[]));
    let build = inputs(&ctx, &[]);
    let handles: Vec<_> =
        (0..3).map(|_| solver.submit(graph.clone(), BuildOptions::default(), Arc::new(build.clone()))).collect();
    for mut handle in handles {
        let mut logged = false;
        let mut ending = None;
        while let Some(event) = handle.events.recv().await {
            match event {
                Event::Progress(BuildEvent::Log { line, .. }) if line.line == "the-shared-output" => logged = true,
                Event::Finished(result, _) => ending = Some(result),
                _ => {}
            }
        }
        let error = ending.unwrap().unwrap_err();
        assert!(error.contains("exit code: 7") && error.contains("the-shared-output"), "{error}");
        assert!(logged, "every waiting build sees the step's output");
    }
    fixture.assert_nothing_left();
}
