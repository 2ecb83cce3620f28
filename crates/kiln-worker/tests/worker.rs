//! Dockerfiles converted by the front end and executed on a real worker, vertex by vertex
//! here and through the solver in `solve`: real containers over real overlay mounts, a base
//! image from a real registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_context::FsContext;
use kiln_dockerfile::ignore::PatternList;
use kiln_dockerfile::image::NoImageMetadata;
use kiln_dockerfile::{ConvertOptions, convert};
use kiln_graph::Graph;
use kiln_kv::MemoryKv;
use kiln_registry::{RegistryClient, RegistryOptions};
use kiln_testkit::{TestRegistry, busybox_rootfs, mounts_under, runner_binary, store_image};
use kiln_types::{Digest, ImageReference, Platform};
use kiln_worker::{BuildInputs, Snapshot, Worker, WorkerConfig, WorkerError};

#[path = "worker/solve.rs"]
mod solve;

struct Fixture {
    _registry: TestRegistry,
    base: ImageReference,
    dir: tempfile::TempDir,
    worker: Arc<Worker>,
}

impl Fixture {
    async fn new() -> Fixture {
        let registry = TestRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("image");
        let cas = Arc::new(BlobStore::open(&scratch.join("cas"), Arc::new(MemoryKv::new())).unwrap());
        busybox_rootfs(&scratch.join("rootfs"));
        let manifest = store_image(&cas, &scratch.join("rootfs"), "linux/amd64");
        let base = registry.reference("kiln/busybox:test");
        RegistryClient::new(RegistryOptions::default()).unwrap().push(&base, &manifest, &cas).await.unwrap();
        let mut config = WorkerConfig::new(&dir.path().join("worker")).unwrap();
        config.runner = runner_binary();
        config.cgroup_parent = "/kiln-worker-test".into();
        let worker = Arc::new(Worker::open(config, Arc::new(MemoryKv::new())).unwrap());
        Fixture { _registry: registry, base, dir, worker }
    }

    fn context(&self, files: &[(&str, &str)]) -> PathBuf {
        let context = self.dir.path().join("context");
        std::fs::create_dir_all(&context).unwrap();
        for (name, content) in files {
            std::fs::write(context.join(name), content).unwrap();
        }
        context
    }

    fn plan(&self, dockerfile: &str, context: &Path) -> (Graph, Arc<FsContext>) {
        let text = dockerfile.replace("BASE", &self.base.to_string());
        let context = Arc::new(FsContext::walk(context, &PatternList::default()).unwrap());
        let options = ConvertOptions {
            file_name: "Dockerfile".into(),
            target: None,
            build_args: Default::default(),
            platforms: vec!["linux/amd64".parse::<Platform>().unwrap()],
            build_platform: Platform::host(),
            context: context.as_ref(),
            images: &NoImageMetadata,
            named: &Default::default(),
        };
        (convert(&text, &options).unwrap().graph, context)
    }

    /// Executes every vertex in order, as a solver without parallelism or cache would.
    async fn build(&self, graph: &Graph, build: &BuildInputs) -> Result<HashMap<Digest, Snapshot>, WorkerError> {
        let mut done: HashMap<Digest, Snapshot> = HashMap::new();
        for vertex in &graph.vertices {
            let inputs: Vec<Snapshot> = vertex.inputs.iter().map(|d| done[d].clone()).collect();
            let output = self.worker.execute(vertex, &inputs, build, None).await?;
            done.insert(vertex.digest, output.snapshot);
        }
        Ok(done)
    }

    fn final_snapshot(graph: &Graph, done: &HashMap<Digest, Snapshot>) -> Snapshot {
        done[graph.outputs[0].digest.as_ref().unwrap()].clone()
    }

    fn assert_nothing_left(&self) {
        let root = self.dir.path().join("worker");
        let runtime = self.worker.runtime_dir();
        assert_eq!(mounts_under(&root), Vec::<String>::new());
        assert_eq!(mounts_under(runtime), Vec::<String>::new());
        for dir in [runtime.join("runner/c"), runtime.join("runner/b"), runtime.join("steps"), root.join("snapshots/a")]
        {
            // A directory no step needed yet is not there.
            let left: Vec<_> =
                std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
            assert!(left.is_empty(), "{}: {left:?}", dir.display());
        }
    }
}

fn inputs(context: &Arc<FsContext>, secrets: &[(&str, &str)]) -> BuildInputs {
    BuildInputs {
        contexts: HashMap::from([("context".to_string(), Arc::clone(context) as Arc<dyn kiln_context::BuildContext>)]),
        secrets: secrets.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
        ..BuildInputs::default()
    }
}

fn read(worker: &Worker, snapshot: &Snapshot, path: &str) -> Option<(String, u32, u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    let view = worker.snapshots().view(&snapshot.layers).unwrap();
    let file = view.root().join(path.trim_start_matches('/'));
    let meta = std::fs::symlink_metadata(&file).ok()?;
    let content = std::fs::read_to_string(&file).unwrap_or_default();
    Some((content, meta.mode() & 0o7777, meta.uid(), meta.gid()))
}

fn content(worker: &Worker, snapshot: &Snapshot, path: &str) -> Option<String> {
    read(worker, snapshot, path).map(|(c, ..)| c)
}

#[tokio::test]
async fn a_multi_stage_dockerfile_builds_into_real_layers() {
    let fixture = Fixture::new().await;
    let context = fixture.context(&[("app.txt", "from the context\n"), ("other.log", "log\n")]);
    let dockerfile = "\
FROM BASE AS base
RUN echo built > /built && mkdir -p /app && echo $HOME > /app/home
FROM base AS final
WORKDIR /app
COPY app.txt ./
COPY --chown=nobody:nogroup --chmod=640 app.txt /app/owned.txt
COPY --from=base /built /app/copied
COPY *.log /logs/
RUN --mount=type=secret,id=token test \"$(cat /run/secrets/token)\" = s3cr3t && echo ok > /app/secret-ok
RUN --mount=type=tmpfs,target=/scratch echo temp > /scratch/t && cat /scratch/t > /app/from-tmpfs
RUN rm /built
USER nobody
RUN id -u > /tmp/uid && pwd > /tmp/pwd
";
    let (graph, context) = fixture.plan(dockerfile, &context);
    let done = fixture.build(&graph, &inputs(&context, &[("token", "s3cr3t")])).await.unwrap();
    let result = Fixture::final_snapshot(&graph, &done);
    let worker = &fixture.worker;

    assert_eq!(content(worker, &result, "/app/home").as_deref(), Some("/root\n"));
    assert_eq!(read(worker, &result, "/app/app.txt").unwrap().0, "from the context\n");
    assert_eq!(read(worker, &result, "/app/owned.txt").unwrap(), ("from the context\n".into(), 0o640, 65534, 65534));
    assert_eq!(content(worker, &result, "/app/copied").as_deref(), Some("built\n"));
    assert_eq!(content(worker, &result, "/logs/other.log").as_deref(), Some("log\n"));
    assert_eq!(content(worker, &result, "/app/secret-ok").as_deref(), Some("ok\n"));
    assert_eq!(content(worker, &result, "/app/from-tmpfs").as_deref(), Some("temp\n"));
    assert_eq!(content(worker, &result, "/built"), None, "RUN rm is a whiteout over the base");
    assert_eq!(content(worker, &result, "/tmp/uid").as_deref(), Some("65534\n"));
    assert_eq!(content(worker, &result, "/tmp/pwd").as_deref(), Some("/app\n"));

    // Mountpoints the runtime created and the secret never reach a layer.
    for layer in &result.layers {
        let dir = worker.snapshots().layer_path(layer);
        for stub in ["proc", "dev", "sys", "etc/hosts", "etc/resolv.conf", "run", "scratch"] {
            assert!(std::fs::symlink_metadata(dir.join(stub)).is_err(), "{stub} in layer {layer}");
        }
        let grep = std::process::Command::new("grep").args(["-r", "-l", "s3cr3t"]).arg(&dir).output().unwrap();
        assert!(grep.stdout.is_empty(), "secret found in {}", String::from_utf8_lossy(&grep.stdout));
    }
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn a_step_that_changes_nothing_adds_no_layer_and_cache_mounts_persist() {
    let fixture = Fixture::new().await;
    let context = fixture.context(&[]);
    let (graph, context) = fixture.plan(
        "FROM BASE\nRUN true\nRUN --mount=type=cache,target=/cache,sharing=locked echo x >> /cache/log && wc -l < /cache/log > /count\n",
        &context,
    );
    let build = inputs(&context, &[]);
    let first = fixture.build(&graph, &build).await.unwrap();
    let layers = |done: &HashMap<Digest, Snapshot>, index: usize| done[&graph.vertices[index].digest].layers.clone();
    assert_eq!(layers(&first, 0), layers(&first, 1), "RUN true adds no layer");
    assert_eq!(content(&fixture.worker, &Fixture::final_snapshot(&graph, &first), "/count").unwrap().trim(), "1");
    let second = fixture.build(&graph, &build).await.unwrap();
    assert_eq!(content(&fixture.worker, &Fixture::final_snapshot(&graph, &second), "/count").unwrap().trim(), "2");
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn failures_name_the_step_its_line_exit_code_and_output() {
    let fixture = Fixture::new().await;
    let context = fixture.context(&[]);
    let (graph, context) = fixture.plan("FROM BASE\n\nRUN echo first line; echo second line >&2; exit 3\n", &context);
    let err = fixture.build(&graph, &inputs(&context, &[])).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WorkerError::StepFailed { .. }), "{text}");
    for expected in ["(line 3)", "exit code: 3", "first line", "second line", "RUN echo first line"] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }

    let (graph, context) = fixture.plan("FROM BASE AS a\nFROM BASE\nCOPY --from=a /nope /x\n", &fixture.context(&[]));
    let err = fixture.build(&graph, &inputs(&context, &[])).await.unwrap_err().to_string();
    assert!(err.contains("/nope: not found") && err.contains("(line 3)"), "{err}");
    // A wildcard that matches nothing is a no-op, as in BuildKit.
    let file = "FROM BASE AS a\nFROM BASE\nCOPY --from=a /nope* /etc/pass[w]d /x/\n";
    let (graph, context) = fixture.plan(file, &fixture.context(&[]));
    let done = fixture.build(&graph, &inputs(&context, &[])).await.unwrap();
    let last = &done[&graph.vertices.last().unwrap().digest];
    assert!(content(&fixture.worker, last, "x/passwd").is_some());

    let (graph, context) = fixture.plan("FROM BASE\nUSER ghost\nRUN true\n", &fixture.context(&[]));
    let err = fixture.build(&graph, &inputs(&context, &[])).await.unwrap_err().to_string();
    assert!(err.contains("unable to find user ghost"), "{err}");

    // A variable too long to start a process with says so, instead of a bare exit code 255.
    let big = "x".repeat(200_000);
    let (graph, context) = fixture.plan(&format!("FROM BASE\nENV BIG={big}\nRUN true\n"), &fixture.context(&[]));
    let err = fixture.build(&graph, &inputs(&context, &[])).await.unwrap_err().to_string();
    assert!(err.contains("(E2BIG)") && err.contains("the variable BIG is 200004 bytes"), "{err}");

    let (graph, context) =
        fixture.plan("FROM BASE\nRUN --mount=type=secret,id=missing,required=true true\n", &fixture.context(&[]));
    let err = fixture.build(&graph, &inputs(&context, &[])).await.unwrap_err().to_string();
    assert!(err.contains("secret missing is required"), "{err}");
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn cancelling_a_running_step_leaves_nothing_behind() {
    let fixture = Fixture::new().await;
    let context = fixture.context(&[]);
    let (graph, context) = fixture.plan("FROM BASE\nRUN sleep 60\n", &context);
    let build = inputs(&context, &[]);
    let base = fixture.worker.execute(&graph.vertices[0], &[], &build, None).await.unwrap().snapshot;
    let containers = fixture.worker.runtime_dir().join("runner/c");
    let base = [base];
    let run = fixture.worker.execute(&graph.vertices[1], &base, &build, None);
    let watch = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_dir(&containers).map(|d| d.count()).unwrap_or(0) == 0 {
            assert!(std::time::Instant::now() < deadline, "the container never started");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = run => panic!("sleep 60 finished early"),
        () = watch => {}
    }
    // The step future is dropped here: cancellation.
    fixture.assert_nothing_left();
}

/// `context/bundle.tar.gz`: `pkg/one.txt` ("one\n") packed by GNU tar with `tar_args`.
fn bundle(fixture: &Fixture, context: &Path, tar_args: &[&str]) {
    let staging = fixture.dir.path().join("staging");
    std::fs::create_dir_all(staging.join("pkg")).unwrap();
    std::fs::write(staging.join("pkg/one.txt"), "one\n").unwrap();
    let tar = std::process::Command::new("tar")
        .args(tar_args)
        .arg("-czf")
        .arg(context.join("bundle.tar.gz"))
        .arg("-C")
        .arg(&staging)
        .arg("pkg")
        .status()
        .unwrap();
    assert!(tar.success());
}

#[tokio::test]
async fn add_unpacks_local_archives_and_downloads_urls_with_checksums() {
    let fixture = Fixture::new().await;
    let context = fixture.context(&[]);
    bundle(&fixture, &context, &[]);
    let served = fixture.dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("payload.txt"), "downloaded\n").unwrap();
    let server = kiln_testkit::HttpServer::start(&served);
    let url = format!("http://127.0.0.1:{}/payload.txt", server.port);
    let checksum = Digest::of(b"downloaded\n");

    let dockerfile = format!("FROM BASE\nADD bundle.tar.gz /opt/\nADD --checksum={checksum} {url} /downloads/\n");
    let (graph, ctx) = fixture.plan(&dockerfile, &context);
    let done = fixture.build(&graph, &inputs(&ctx, &[])).await.unwrap();
    let result = Fixture::final_snapshot(&graph, &done);
    assert_eq!(content(&fixture.worker, &result, "/opt/pkg/one.txt").as_deref(), Some("one\n"));
    let (body, mode, uid, _) = read(&fixture.worker, &result, "/downloads/payload.txt").unwrap();
    assert_eq!((body.as_str(), mode, uid), ("downloaded\n", 0o600, 0));

    let wrong = Digest::of(b"something else");
    let (graph, ctx) = fixture.plan(&format!("FROM BASE\nADD --checksum={wrong} {url} /x\n"), &context);
    let err = fixture.build(&graph, &inputs(&ctx, &[])).await.unwrap_err().to_string();
    assert!(err.contains("checksum mismatch") && err.contains(&wrong.to_string()), "{err}");

    let missing = format!("http://127.0.0.1:{}/missing.txt", server.port);
    let (graph, ctx) = fixture.plan(&format!("FROM BASE\nADD {missing} /x\n"), &context);
    let err = fixture.build(&graph, &inputs(&ctx, &[])).await.unwrap_err().to_string();
    assert!(err.contains("404") && err.contains("missing.txt"), "{err}");
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn cache_seeds_chmod_link_exclude_and_parents() {
    use std::os::unix::fs::PermissionsExt as _;
    let fixture = Fixture::new().await;
    let context = fixture.context(&[("app.txt", "app\n"), ("noise.log", "noise\n")]);
    std::fs::set_permissions(context.join("app.txt"), std::fs::Permissions::from_mode(0o664)).unwrap();
    std::fs::create_dir_all(context.join("sub/deep")).unwrap();
    std::fs::write(context.join("sub/deep/f.txt"), "deep\n").unwrap();
    let dockerfile = "\
FROM BASE AS seed
RUN mkdir /seed && echo seeded > /seed/file
FROM BASE
COPY --chmod=u+x,go-w app.txt /app.txt
COPY --link app.txt /linked/app.txt
COPY --exclude=*.log . /ctx/
COPY --parents sub/deep/f.txt /p/
RUN --mount=type=cache,target=/c,from=seed,source=/seed cat /c/file > /out
";
    let (graph, ctx) = fixture.plan(dockerfile, &context);
    let done = fixture.build(&graph, &inputs(&ctx, &[])).await.unwrap();
    let result = Fixture::final_snapshot(&graph, &done);
    assert_eq!(content(&fixture.worker, &result, "/out").as_deref(), Some("seeded\n"));
    assert_eq!(read(&fixture.worker, &result, "/app.txt").unwrap().1, 0o744);
    assert_eq!(content(&fixture.worker, &result, "/linked/app.txt").as_deref(), Some("app\n"), "COPY --link merges");
    assert_eq!(content(&fixture.worker, &result, "/ctx/app.txt").as_deref(), Some("app\n"));
    assert_eq!(content(&fixture.worker, &result, "/ctx/noise.log"), None, "--exclude");
    assert_eq!(content(&fixture.worker, &result, "/ctx/sub/deep/f.txt").as_deref(), Some("deep\n"));
    assert_eq!(content(&fixture.worker, &result, "/p/sub/deep/f.txt").as_deref(), Some("deep\n"), "--parents");
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn copies_follow_destination_symlinks_inside_the_image_never_to_the_host() {
    let fixture = Fixture::new().await;
    let marker = format!("kiln-escape-test-{}.txt", std::process::id());
    let context = fixture.context(&[]);
    std::fs::create_dir_all(context.join("d/sub")).unwrap();
    std::fs::write(context.join("d").join(&marker), "inside\n").unwrap();
    std::fs::write(context.join("d/sub").join(&marker), "deeper\n").unwrap();
    let dockerfile = "\
FROM BASE
RUN mkdir -p /t /u && ln -s /etc /t/d && ln -s /etc /u/sub
COPY d/ /t/d/
COPY d/ /u/
";
    let (graph, ctx) = fixture.plan(dockerfile, &context);
    let done = fixture.build(&graph, &inputs(&ctx, &[])).await.unwrap();
    let result = Fixture::final_snapshot(&graph, &done);
    assert!(!Path::new("/etc").join(&marker).exists(), "a COPY wrote to the host's /etc");
    assert_eq!(content(&fixture.worker, &result, &format!("/etc/{marker}")).as_deref(), Some("deeper\n"));
    assert_eq!(content(&fixture.worker, &result, &format!("/u/{marker}")).as_deref(), Some("inside\n"));
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn copies_keep_links_owners_and_buildkits_modes_and_follow_context_symlinks() {
    use std::os::unix::fs::MetadataExt as _;
    let fixture = Fixture::new().await;
    let context = fixture.context(&[("real.txt", "real\n"), ("one", "linked\n")]);
    std::fs::hard_link(context.join("one"), context.join("two")).unwrap();
    std::os::unix::fs::symlink("real.txt", context.join("link.txt")).unwrap();
    std::fs::create_dir(context.join("dir")).unwrap();
    std::fs::write(context.join("dir/f"), "in dir\n").unwrap();
    std::os::unix::fs::symlink("dir", context.join("dirlink")).unwrap();
    std::fs::create_dir(context.join("nested")).unwrap();
    std::os::unix::fs::symlink("../real.txt", context.join("nested/inner")).unwrap();
    let dockerfile = "FROM BASE AS s\n\
        RUN mkdir /h && echo x > /h/a && ln /h/a /h/b && mkdir -p /d/sub && chown 56:78 /d/sub && mkdir -m 0700 /src7\n\
        FROM BASE\n\
        COPY --from=s /h /h\n\
        COPY --from=s /d /d\n\
        COPY --from=s /src7 /dst7\n\
        COPY --chmod=0700 --from=s /h/a /deep/er/file\n\
        COPY one two /ctx/\n\
        COPY link.txt /l\n\
        COPY dirlink /dl\n\
        COPY nested/inner /n\n";
    let (graph, context) = fixture.plan(dockerfile, &context);
    let done = fixture.build(&graph, &inputs(&context, &[])).await.unwrap();
    let last = &done[&graph.vertices.last().unwrap().digest];
    let view = fixture.worker.snapshots().view(&last.layers).unwrap();
    let meta = |path: &str| std::fs::symlink_metadata(view.root().join(path)).unwrap();
    // Hard links stay one file, from a stage and from the context.
    assert_eq!(meta("h/a").ino(), meta("h/b").ino());
    assert_eq!(meta("h/a").nlink(), 2);
    assert_eq!(meta("ctx/one").ino(), meta("ctx/two").ino());
    // Directories below a copied one keep their owner; the destination is created 0755.
    assert_eq!((meta("d/sub").uid(), meta("d/sub").gid()), (56, 78));
    assert_eq!(meta("dst7").mode() & 0o7777, 0o755);
    // Parents a COPY creates take --chmod's mode.
    assert_eq!((meta("deep").mode() & 0o7777, meta("deep/er").mode() & 0o7777), (0o700, 0o700));
    // Context symlinks are followed and copied under the source's name.
    assert_eq!(std::fs::read_to_string(view.root().join("l")).unwrap(), "real\n");
    assert!(meta("l").is_file());
    assert_eq!(std::fs::read_to_string(view.root().join("dl/f")).unwrap(), "in dir\n");
    assert_eq!(std::fs::read_to_string(view.root().join("n")).unwrap(), "real\n");
    drop(view);
    fixture.assert_nothing_left();
}

#[tokio::test]
async fn add_chown_owns_extracted_archives_and_a_given_group_drops_supplementary_ones() {
    use std::os::unix::fs::MetadataExt as _;
    let fixture = Fixture::new().await;
    let context = fixture.context(&[]);
    bundle(&fixture, &context, &["--owner=12", "--group=34"]);
    let dockerfile = "FROM BASE\n\
        ADD --chown=1500:1600 bundle.tar.gz /opt/new/\n\
        RUN echo 'u:x:1500:1500::/:/bin/sh' >> /etc/passwd && echo 'g:x:1500:' >> /etc/group \
            && echo 'extra:x:1700:u' >> /etc/group && mkdir -m 777 /out\n\
        USER u:g\nRUN id -G > /out/named\n\
        USER 1500:1500\nRUN id -G > /out/numeric\n\
        USER u\nRUN id -G > /out/plain\n";
    let (graph, context) = fixture.plan(dockerfile, &context);
    let done = fixture.build(&graph, &inputs(&context, &[])).await.unwrap();
    let last = &done[&graph.vertices.last().unwrap().digest];
    let view = fixture.worker.snapshots().view(&last.layers).unwrap();
    let owner = |path: &str| {
        let meta = std::fs::symlink_metadata(view.root().join(path)).unwrap();
        (meta.uid(), meta.gid())
    };
    // The destination ADD creates, and every extracted entry, belong to --chown.
    for path in ["opt/new", "opt/new/pkg", "opt/new/pkg/one.txt"] {
        assert_eq!(owner(path), (1500, 1600), "{path}");
    }
    let read = |path: &str| std::fs::read_to_string(view.root().join(path)).unwrap();
    assert_eq!((read("out/named"), read("out/numeric")), ("1500\n".to_string(), "1500\n".to_string()));
    assert_eq!(read("out/plain"), "1500 1700\n", "without a group, /etc/group's groups join");
    drop(view);
    fixture.assert_nothing_left();
}
