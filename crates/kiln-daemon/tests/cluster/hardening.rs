//! What a fault-and-attack probe of a cluster broke, each reproduced through real processes:
//! hostile requests crafted with the client library where the CLI cannot produce them,
//! workers and coordinators killed, paused and replaced.

use std::collections::BTreeMap;

use kiln_client::{BuildEvent, BuildRequest, Client};
use kiln_context::{ContextManifest, FsContext, ManifestEntry, ManifestKind};
use kiln_types::Digest;

use super::*;

/// Runs a crafted build to its end: the start error, or every event.
fn crafted_build(cluster: &Cluster, request: BuildRequest) -> Result<Vec<BuildEvent>, String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(&cluster.addr()).await?;
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
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Client::connect(&cluster.addr()).await.unwrap();
        let walked = FsContext::walk(dir, &Default::default()).unwrap();
        client.upload_context(Arc::new(walked)).await.unwrap().0
    })
}

fn request(dockerfile: &str, manifest: Option<ContextManifest>, outputs: &[String]) -> BuildRequest {
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
        outputs: outputs.to_vec(),
        context_manifest: manifest,
    }
}

fn result_error(events: &[BuildEvent]) -> Option<String> {
    match events.last() {
        Some(BuildEvent::Result { error, .. }) => error.clone(),
        other => panic!("no result last: {other:?}"),
    }
}

#[test]
fn hostile_manifests_and_client_paths_never_reach_the_coordinators_files() {
    let cluster = Cluster::start(16, &["linux/amd64"], 2, "");
    let host = cluster.dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("victim"), "keep").unwrap();

    // A symlink entry followed by an entry below it: refused at upload, nothing written.
    let entry = |path: &str, kind| ManifestEntry { path: path.into(), kind, mode: 0o644, mtime: (0, 0) };
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
    assert!(error.contains("\"a/evil\": its parent \"a\" is a symlink"), "{error}");
    let manifest = ContextManifest {
        entries: vec![entry("v", ManifestKind::Symlink(host.join("victim").display().to_string())), entry("v", file)],
    };
    let error = crafted_build(&cluster, request("FROM scratch\nCOPY v /\n", Some(manifest), &[])).unwrap_err();
    assert!(error.contains("\"v\": listed twice"), "{error}");
    assert!(!host.join("evil").exists());
    assert_eq!(std::fs::read_to_string(host.join("victim")).unwrap(), "keep");

    // Over TCP a daemon never reads a context path of its own host.
    let error = crafted_build(&cluster, request("FROM scratch\nCOPY . /\n", None, &[])).unwrap_err();
    assert!(error.contains("only for clients on its unix socket"), "{error}");

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

    // The coordinator restarts (recipes are gone, the cache index stays) and the worker is
    // replaced by a fresh one: the cached entries' layers exist nowhere, so they are misses.
    cluster.restart_coordinator();
    cluster.wait_for_workers(1);
    cluster.replace_worker(0, "w2", 3);
    let metadata = build(&cluster, "after-restart");
    assert_eq!(record(&metadata, "RUN echo x")["status"], "executed", "{metadata:#}");

    // The worker is replaced again, the coordinator stays: the cached RUN that changed
    // nothing is recovered through its producer's recipe.
    cluster.replace_worker(0, "w3", 4);
    let metadata = build(&cluster, "after-loss");
    assert_eq!(record(&metadata, "RUN cat /x")["status"], "cached", "{metadata:#}");
    assert!(cluster.coordinator.try_wait().unwrap().is_none(), "the coordinator is alive: {}", cluster.logs());
}
