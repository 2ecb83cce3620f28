//! The fleet's shared cache tier (`[coordinator.cache] shared`, a real S3 server): results
//! outlive the workers that built them and the coordinator's memory of them.

use kiln_testkit::TestS3;

use super::{Cluster, record};

#[test]
fn results_whose_workers_are_gone_come_from_the_shared_tier_not_recomputed() {
    let s3 = TestS3::start("kiln-fleet");
    let shared = format!("[coordinator.cache]\nshared = \"{}\"\n", s3.cache_spec("fleet"));
    let mut cluster = Cluster::start(20, &["linux/amd64"], 2, &shared);
    let first = cluster.context("first", "FROM BASE\nRUN echo one > /one\n");
    let metadata = cluster.build(&first, &[]);
    assert_eq!(record(&metadata, "echo one")["status"], "executed", "{metadata:#}");
    assert!(s3.keys().iter().any(|k| k == "manifests/fleet"), "{:?}", s3.keys());

    // The only worker holding the result dies; a new, empty one takes its place.
    let (_, mut killed) = cluster.workers.remove(0);
    killed.kill().unwrap();
    killed.wait().unwrap();
    cluster.start_worker("w2", 3, "linux/amd64", 2);
    cluster.wait_for_names("w2 replacing the killed worker", |names| names == ["w2"]);
    let second = cluster.context("second", "FROM BASE\nRUN echo one > /one\nRUN cat /one > /two\n");
    let out = cluster.dir.path().join("second-out");
    let local = format!("type=local,dest={}", out.display());
    let metadata = cluster.build(&second, &["-o", &local]);
    let one = record(&metadata, "echo one");
    assert_eq!(
        (one["status"].as_str(), one["cache_source"].as_str()),
        (Some("cached"), Some("shared")),
        "{metadata:#}"
    );
    let two = record(&metadata, "cat /one");
    assert_eq!((two["status"].as_str(), two["worker"].as_str()), (Some("executed"), Some("w2")), "{metadata:#}");
    assert_eq!(std::fs::read_to_string(out.join("two")).unwrap(), "one\n");

    // A restarted coordinator with a fresh worker knows nothing where the layers are: the
    // shared tier's manifest says, and nothing runs again.
    cluster.restart_coordinator();
    cluster.wait_for_workers(1);
    cluster.replace_worker(0, "w3", 4);
    let out = cluster.dir.path().join("third-out");
    let local = format!("type=local,dest={}", out.display());
    let metadata = cluster.build(&second, &["-o", &local]);
    for step in ["echo one", "cat /one"] {
        let run = record(&metadata, step);
        assert_eq!(
            (run["status"].as_str(), run["cache_source"].as_str()),
            (Some("cached"), Some("shared")),
            "{metadata:#}"
        );
    }
    assert_eq!(std::fs::read_to_string(out.join("two")).unwrap(), "one\n");

    // A cache flag on a coordinator: the client's own cache, beside the shared one; a
    // directory cache the workers could not reach is refused.
    let metadata = cluster.build(&second, &["--cache-to", &s3.cache_spec("own")]);
    assert_eq!(metadata["status"], "succeeded", "{metadata:#}");
    assert!(s3.keys().iter().any(|k| k == "manifests/own"), "{:?}", s3.keys());
    let local = format!("type=local,dest={}", cluster.dir.path().join("own").display());
    let out = cluster.run(&["build", second.to_str().unwrap(), "--cache-to", &local]);
    let stderr = super::text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("type=local caches are for clients on the daemon's own machine"),
        "{stderr}"
    );
}

/// The sha256 hex digests of the blobs in a node's blob store (`ROOT/blobs`).
fn stored_blobs(root: &std::path::Path) -> Vec<String> {
    let dir = root.join("blobs/blobs/sha256");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn exports_and_pushes_go_from_the_workers_holding_the_layers_not_through_the_coordinator() {
    let s3 = TestS3::start("kiln-worker-export");
    let cluster = Cluster::start(22, &["linux/amd64"], 2, "");
    let context = cluster.context("app", "FROM BASE\nRUN head -c 3000000 /dev/urandom > /made\n");
    let image = cluster.registry.reference("kiln/pushed:v1").to_string();
    let cache = format!("{},mode=max", s3.cache_spec("worker-made"));
    let metadata = cluster.build(&context, &["-t", &image, "--push", "--cache-to", &cache]);
    assert_eq!(metadata["status"], "succeeded", "{metadata:#}");

    // The image is in the registry, its layers next to it; the cache is in S3.
    let inspect = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{image}")])
        .output()
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&inspect.stdout).unwrap_or_else(|_| panic!("{}", super::text(&inspect.stderr)));
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string())
        .collect();
    assert_eq!(layers.len(), 2, "{manifest:#}");
    let made = &layers[1];
    assert!(s3.keys().iter().any(|k| k.ends_with(made.as_str())), "the cache holds the step's layer: {:?}", s3.keys());
    assert!(s3.keys().iter().any(|k| k == "manifests/worker-made"), "{:?}", s3.keys());

    // The worker made and sent the step's layer; the coordinator never held it.
    let coordinator = stored_blobs(&cluster.dir.path().join("coordinator"));
    assert!(!coordinator.contains(made), "the coordinator stored the step's layer blob\n{}", cluster.logs());
    let worker = cluster.workers[0].0.clone();
    let worker_root = cluster.dir.path().join(format!("{worker}-2"));
    assert!(stored_blobs(&worker_root).contains(made), "the worker made the blob it pushed");

    // Pulled back, the image has the step's file.
    let out = cluster.dir.path().join("pulled");
    let pulled = cluster.context("pull", &format!("FROM {image}\n"));
    let local = format!("type=local,dest={}", out.display());
    cluster.build(&pulled, &["-o", &local]);
    assert_eq!(std::fs::metadata(out.join("made")).unwrap().len(), 3_000_000);
}
