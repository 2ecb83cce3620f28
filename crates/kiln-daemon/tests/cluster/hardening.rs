//! What a fault-and-attack probe of a cluster broke, each reproduced through real processes:
//! hostile requests crafted with the client library where the CLI cannot produce them,
//! workers and coordinators killed, paused and replaced.

use std::collections::BTreeMap;

use kiln_client::{BuildEvent, BuildRequest, Client};
use kiln_context::{ContextManifest, FsContext, ManifestEntry, ManifestKind};
use kiln_types::Digest;

use kiln_client::ClientError;
use kiln_model::ErrorKind;

use super::*;

/// Runs a crafted build to its end: the start error, or every event.
fn crafted_build(cluster: &Cluster, request: BuildRequest) -> Result<Vec<BuildEvent>, ClientError> {
    crafted_build_as(cluster, None, request)
}

/// [`crafted_build`] with `token`.
pub(crate) fn crafted_build_as(
    cluster: &Cluster,
    token: Option<&str>,
    request: BuildRequest,
) -> Result<Vec<BuildEvent>, ClientError> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect_with(&cluster.addr(), &cluster.client_options(token)).await?;
        let mut events = client.build(request).await?;
        let mut all = Vec::new();
        while let Some(event) = events.next().await? {
            all.push(event);
        }
        Ok(all)
    })
}

/// A context directory's manifest, its files uploaded to the coordinator.
fn upload(cluster: &Cluster, dir: &Path) -> ContextManifest {
    upload_as(cluster, None, dir).0
}

/// [`upload`] with `token`, and what it sent.
pub(crate) fn upload_as(
    cluster: &Cluster,
    token: Option<&str>,
    dir: &Path,
) -> (ContextManifest, kiln_client::UploadStats) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect_with(&cluster.addr(), &cluster.client_options(token)).await.unwrap();
        let walked = FsContext::walk(dir, &Default::default()).unwrap();
        client.upload_context(Arc::new(walked)).await.unwrap()
    })
}

pub(crate) fn request(dockerfile: &str, manifest: Option<ContextManifest>, outputs: &[String]) -> BuildRequest {
    BuildRequest {
        dockerfile: dockerfile.to_string(),
        file_name: "Dockerfile".into(),
        context: PathBuf::from("/"),
        dockerignore: String::new(),
        target: None,
        build_args: BTreeMap::new(),
        platforms: Vec::new(),
        no_cache: false,
        max_parallelism: None,
        secrets: Default::default(),
        outputs: outputs.iter().map(|o| kiln_model::OutputSpec::parse(o).unwrap()).collect(),
        context_manifest: manifest,
        ..BuildRequest::default()
    }
}

pub(crate) fn result_error(events: &[BuildEvent]) -> Option<String> {
    match events.last() {
        Some(BuildEvent::Result { error, .. }) => error.clone(),
        other => panic!("no result last: {other:?}"),
    }
}

/// A request message with the wire shape of `FindMissingRequest` whose strings may be any
/// bytes (invalid UTF-8 cannot be sent through the generated types).
#[derive(Clone, PartialEq, prost::Message)]
struct RawFindMissing {
    #[prost(bytes = "vec", repeated, tag = "1")]
    digests: Vec<Vec<u8>>,
}

/// A channel to the cluster's coordinator over TLS.
async fn channel(cluster: &Cluster) -> tonic::transport::Channel {
    let options = cluster.client_options(None);
    kiln_client::endpoint(&cluster.addr(), options.tls.as_ref()).unwrap().connect().await.unwrap()
}

/// Sends `request` to `Control/FindMissing` as raw bytes.
async fn raw_find_missing(cluster: &Cluster, request: RawFindMissing) -> Result<(), tonic::Status> {
    let channel = channel(cluster).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawFindMissing, kiln_proto::v1::FindMissingResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/kiln.v1.Control/FindMissing");
    grpc.unary(tonic::Request::new(request), path, codec).await.map(drop)
}

#[test]
fn malformed_and_stalled_requests_get_clear_ends() {
    let mut cluster = Cluster::start(19, &[], 1, "upload-idle-timeout = \"1s\"\n");
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // Invalid UTF-8 in a string field is the client's error, not the server's.
    let status = runtime.block_on(raw_find_missing(&cluster, RawFindMissing { digests: vec![vec![0xff, 0xfe]] }));
    let status = status.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // An upload that starts a blob and then sends nothing is ended, its partial file removed.
    let (chunks, stalled) = tokio::sync::mpsc::channel(1);
    let status = runtime.block_on(async {
        let mut control = kiln_proto::v1::control_client::ControlClient::new(channel(&cluster).await);
        let digest = Digest::of(b"never finished").to_string();
        chunks.send(kiln_proto::v1::BlobChunkUpload { digest, data: vec![1; 1000] }).await.unwrap();
        control.upload(tokio_stream::wrappers::ReceiverStream::new(stalled)).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("upload stalled"), "{status:?}");
    let ingest = cluster.dir.path().join("coordinator/blobs/ingest");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&ingest).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(Instant::now() < deadline, "a partial upload stayed in {}", ingest.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(chunks);

    // A 1 KB Dockerfile doubling a variable fails at its line; the coordinator stays up.
    let mut doubling = String::from("FROM scratch\nARG A0=0123456789abcdef\n");
    for n in 1..=26 {
        doubling += &format!("ARG A{n}=${{A{}}}${{A{}}}\n", n - 1, n - 1);
    }
    let context = cluster.context("doubling", &doubling);
    let out = cluster.run(&["build", context.to_str().unwrap(), "--progress", "plain"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("Dockerfile:19"), "{stderr}");
    assert!(stderr.contains("is longer than 1048576 bytes"), "{stderr}");

    // 16,000 ENV lines convert in linear time: the build (nothing to run) finishes.
    let env: String = (0..16_000).map(|n| format!("ENV V{n}=value-{n}-$V0\n")).collect();
    let context = cluster.context("env", &format!("FROM scratch\n{env}"));
    let metadata = cluster.build(&context, &[]);
    assert_eq!(metadata["status"], "succeeded", "{metadata:#}");

    assert!(cluster.coordinator_alive(), "{}", cluster.logs());
}

#[test]
fn hostile_manifests_and_client_paths_never_reach_the_coordinators_files() {
    let cluster = Cluster::start(16, &["linux/amd64"], 2, "");
    let host = cluster.dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("victim"), "keep").unwrap();

    // A symlink entry followed by an entry below it: refused at upload, nothing written.
    let entry = |path: &str, kind| ManifestEntry {
        path: path.into(),
        kind,
        mode: 0o644,
        mtime: (0, 0),
        raw_path: None,
        hardlink_of: None,
    };
    let file = ManifestKind::File { digest: Digest::of(b"evil"), size: 4 };
    let manifest = ContextManifest {
        entries: vec![
            entry("a", ManifestKind::Symlink(host.display().to_string())),
            entry("a/evil", file.clone()),
            entry("v", ManifestKind::Symlink(host.join("victim").display().to_string())),
        ],
    };
    let refused = crafted_build(&cluster, request("FROM scratch\nCOPY a/evil /\n", Some(manifest), &[]));
    let error = refused.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest, "{error}");
    assert!(error.to_string().contains("\"a/evil\": its parent \"a\" is a symlink"), "{error}");
    let manifest = ContextManifest {
        entries: vec![entry("v", ManifestKind::Symlink(host.join("victim").display().to_string())), entry("v", file)],
    };
    let error = crafted_build(&cluster, request("FROM scratch\nCOPY v /\n", Some(manifest), &[])).unwrap_err();
    assert!(error.to_string().contains("\"v\": listed twice"), "{error}");
    assert!(!host.join("evil").exists());
    assert_eq!(std::fs::read_to_string(host.join("victim")).unwrap(), "keep");

    // Over TCP a daemon never reads a context path of its own host.
    let error = crafted_build(&cluster, request("FROM scratch\nCOPY . /\n", None, &[])).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Refused, "{error}");
    assert!(error.to_string().contains("only for clients on its unix socket"), "{error}");

    // File outputs come back to the client; the coordinator writes none of the paths.
    let context = cluster.context("outputs", "");
    std::fs::write(context.join("hello"), "hi\n").unwrap();
    let manifest = upload(&cluster, &context);
    let outputs = [
        format!("type=local,dest={}", host.join("out").display()),
        format!("type=tar,dest={}", host.join("out.tar").display()),
    ];
    let events = crafted_build(&cluster, request("FROM scratch\nCOPY hello /\n", Some(manifest), &outputs)).unwrap();
    assert_eq!(result_error(&events), None);
    let mut pieces: Vec<(usize, Option<String>, bool)> = Vec::new();
    let mut bytes = 0;
    for event in &events {
        if let BuildEvent::ExportData { output, unpack_into, data, last } = event {
            pieces.push((*output, unpack_into.clone(), *last));
            bytes += data.len();
        }
    }
    assert_eq!(pieces, [(0, Some(String::new()), true), (1, None, true)]);
    assert!(bytes > 2048, "two tars with one file: {bytes} bytes");
    assert!(!host.join("out").exists() && !host.join("out.tar").exists());
    let spool = cluster.dir.path().join("coordinator/exports");
    assert_eq!(std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0), 0, "spools are removed");

    // The CLI writes what comes back where it was asked to.
    let out = cluster.dir.path().join("cli-out");
    let tar = cluster.dir.path().join("cli-out.tar");
    std::fs::write(context.join("Dockerfile"), "FROM scratch\nCOPY hello /\n").unwrap();
    cluster.build(
        &context,
        &["-o", &format!("type=local,dest={}", out.display()), "-o", &format!("type=tar,dest={}", tar.display())],
    );
    assert_eq!(std::fs::read_to_string(out.join("hello")).unwrap(), "hi\n");
    let listing = Command::new("tar").arg("tf").arg(&tar).output().unwrap();
    assert!(text(&listing.stdout).lines().any(|l| l.trim_start_matches("./") == "hello"), "{}", text(&listing.stdout));
    // Names that are not UTF-8 travel as bytes through the upload, and hard links as links.
    {
        use std::os::unix::ffi::OsStrExt as _;
        use std::os::unix::fs::MetadataExt as _;
        let raw = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
        std::fs::write(context.join(raw), "latin-1\n").unwrap();
        std::fs::hard_link(context.join("hello"), context.join("hello-link")).unwrap();
        std::fs::write(context.join("Dockerfile"), "FROM scratch\nCOPY . /all/\n").unwrap();
        let bytes_out = cluster.dir.path().join("bytes-out");
        cluster.build(&context, &["-o", &format!("type=local,dest={}", bytes_out.display())]);
        assert_eq!(std::fs::read_to_string(bytes_out.join("all").join(raw)).unwrap(), "latin-1\n");
        let ino = |name: &str| std::fs::metadata(bytes_out.join("all").join(name)).unwrap().ino();
        assert_eq!(ino("hello"), ino("hello-link"), "one file with two links");
        std::fs::remove_file(context.join(raw)).unwrap();
        std::fs::remove_file(context.join("hello-link")).unwrap();
        std::fs::write(context.join("Dockerfile"), "FROM scratch\nCOPY hello /\n").unwrap();
    }
    // A single file output, into a directory the client has to create.
    let oci = cluster.dir.path().join("new-dir/image.tar");
    cluster.build(&context, &["-o", &format!("type=oci,dest={}", oci.display())]);
    let listing = Command::new("tar").arg("tf").arg(&oci).output().unwrap();
    assert!(text(&listing.stdout).lines().any(|l| l == "index.json"), "{}", text(&listing.stdout));
}

#[test]
fn cached_results_whose_workers_left_are_recomputed_or_missed_never_fatal() {
    let mut cluster = Cluster::start(17, &["linux/amd64"], 2, "");
    // The second RUN adds no layer: its output is exactly its input chain.
    let context = cluster.context("noop", "FROM BASE\nRUN echo x > /x\nRUN cat /x\n");
    let build = |cluster: &Cluster, name: &str| {
        let out = cluster.dir.path().join(name);
        let metadata = cluster.build(&context, &["-o", &format!("type=local,dest={}", out.display())]);
        assert_eq!(std::fs::read_to_string(out.join("x")).unwrap(), "x\n");
        metadata
    };
    build(&cluster, "first");

    // A failed step names the worker it failed on.
    let failing = cluster.context("failing", "FROM BASE\nRUN exit 3\n");
    let metadata = cluster.dir.path().join("failing.json");
    let out = cluster.run(&["build", failing.to_str().unwrap(), "--metadata-file", metadata.to_str().unwrap()]);
    assert!(!out.status.success());
    let metadata = read_json(&metadata);
    assert_eq!(record(&metadata, "RUN exit 3")["status"], "failed", "{metadata:#}");
    assert_eq!(record(&metadata, "RUN exit 3")["worker"], "w1-linux-amd64", "{metadata:#}");

    // The coordinator restarts (recipes are gone, the cache index stays) and the worker is
    // replaced by a fresh one: the cached entries' layers exist nowhere, so they are misses.
    cluster.restart_coordinator();
    cluster.wait_for_workers(1);
    // The SIGKILL came right after the build: its cache entries were durable already, and
    // the worker that came back holds their layers.
    let metadata = build(&cluster, "after-kill");
    assert_eq!(record(&metadata, "RUN echo x")["status"], "cached", "{metadata:#}");
    cluster.replace_worker(0, "w2", 3);
    let metadata = build(&cluster, "after-restart");
    assert_eq!(record(&metadata, "RUN echo x")["status"], "executed", "{metadata:#}");

    // The worker is replaced again, the coordinator stays: the cached RUN that changed
    // nothing is recovered through its producer's recipe.
    cluster.replace_worker(0, "w3", 4);
    let metadata = build(&cluster, "after-loss");
    assert_eq!(record(&metadata, "RUN cat /x")["status"], "cached", "{metadata:#}");
    assert!(cluster.coordinator_alive(), "{}", cluster.logs());
}

/// Waits until `log` (a file of the cluster's directory) contains `needle`.
pub(crate) fn wait_for_log(cluster: &Cluster, log: &str, needle: &str) {
    let path = cluster.dir.path().join(log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&path).unwrap_or_default().contains(needle) {
        assert!(Instant::now() < deadline, "{log} never said {needle:?}: {}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the workers the coordinator lists, as (name, address), are `expected`.
fn wait_for_listed(cluster: &Cluster, expected: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed: Vec<(String, String)> = cluster
            .workers_json()
            .iter()
            .map(|w| (w["name"].as_str().unwrap().to_string(), w["address"].as_str().unwrap().to_string()))
            .collect();
        if listed.iter().map(|(n, a)| (n.as_str(), a.as_str())).eq(expected.iter().copied()) {
            return;
        }
        assert!(Instant::now() < deadline, "listed {listed:?}, expected {expected:?}: {}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, name: &str) {
    assert!(Command::new("kill").args(["-s", name, &child.id().to_string()]).status().unwrap().success());
}

#[test]
fn sessions_refuse_duplicate_names_and_paused_or_oversized_work_does_not_wedge_workers() {
    let mut cluster = Cluster::start(18, &["linux/amd64"], 2, "");
    let first = "https://127.0.18.2:7071";

    // A second worker under the same name is refused, and says so in both logs.
    cluster.start_worker("w1-linux-amd64", 3, "linux/amd64", 2);
    wait_for_log(&cluster, "w1-linux-amd64-3.log", "worker names must be unique");
    wait_for_log(&cluster, "coordinator.log", "refused a worker registration");
    wait_for_listed(&cluster, &[("w1-linux-amd64", first)]);
    // When the first leaves, the second takes the name.
    let (_, mut original) = cluster.workers.remove(0);
    original.kill().unwrap();
    original.wait().unwrap();
    wait_for_listed(&cluster, &[("w1-linux-amd64", "https://127.0.18.3:7071")]);

    // A worker paused past its lease is dropped; resumed, it registers again.
    let paused = &cluster.workers[0].1;
    signal(paused, "STOP");
    wait_for_listed(&cluster, &[]);
    signal(paused, "CONT");
    wait_for_listed(&cluster, &[("w1-linux-amd64", "https://127.0.18.3:7071")]);
    wait_for_log(&cluster, "w1-linux-amd64-3.log", "lost the session with https://127.0.18.1:7070");

    // An assignment over the message limit fails its own job with a clear error; one over
    // the old 4 MiB decode limit (a 5 MiB script) runs; the worker's session survives both.
    let script = |body: String| format!("FROM BASE\nRUN <<EOF\n#!/bin/sh\n: {body}\necho ran > /ran\nEOF\n");
    let huge = cluster.context("huge", &script("\u{1}".repeat(11 << 20)));
    let out = cluster.run(&["build", huge.to_str().unwrap(), "--progress", "plain"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("over the 64 MiB limit of a worker message"), "{stderr}");
    let large = cluster.context("large", &script("x".repeat(5 << 20)));
    let out = cluster.dir.path().join("large-out");
    cluster.build(&large, &["-o", &format!("type=local,dest={}", out.display())]);
    assert_eq!(std::fs::read_to_string(out.join("ran")).unwrap(), "ran\n");
    let log = std::fs::read_to_string(cluster.dir.path().join("w1-linux-amd64-3.log")).unwrap();
    assert_eq!(log.matches("lost the session").count(), 1, "only the pause broke a session: {log}");

    // SIGTERM stops the coordinator promptly although a worker is connected and a build
    // runs; the client loses its connection and still writes its metadata file.
    let slow = cluster.context("slow", "FROM BASE\nRUN sleep 60\n");
    let metadata = cluster.dir.path().join("slow.json");
    let client = cluster.spawn_build(&slow, &metadata, &cluster.dir.path().join("slow-out"), &[]);
    cluster.busy_worker();
    signal(&cluster.coordinator, "TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = cluster.coordinator.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the coordinator ignored SIGTERM: {}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", cluster.logs());
    wait_for_log(&cluster, "coordinator.log", "stopping: closed 1 worker sessions");
    let output = client.wait_with_output().unwrap();
    assert!(!output.status.success());
    let metadata = read_json(&metadata);
    assert_eq!(metadata["status"], "failed", "{metadata:#}");
    assert!(metadata["error"].as_str().unwrap().contains("the daemon"), "{metadata:#}");
}
