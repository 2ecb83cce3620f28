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
