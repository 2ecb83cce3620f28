//! `kiln du` and `kiln prune` against the embedded daemon, and a step that fills the disk
//! under the daemon's state directory (a small tmpfs).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::build::{Setup, stop_daemon, text};

fn json(setup: &Setup, state: &str, args: &[&str]) -> Value {
    let out = setup.run_in(state, args, &[]);
    assert!(out.status.success(), "kiln {args:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kiln {args:?}: {e}: {}", text(&out.stdout)))
}

fn build_ok(setup: &Setup, state: &str, context: &Path) {
    let out = setup.run_in(state, &["build", "--progress", "plain", context.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn du_lists_what_builds_left_and_prune_removes_it_cache_mounts_only_with_all() {
    let setup = Setup::new();
    let context = setup.context(
        "app",
        "FROM BASE\nRUN --mount=type=cache,target=/cache echo kept > /cache/file && head -c 300000 /dev/zero > /made\n",
    );
    build_ok(&setup, "state", &context);

    let usage = json(&setup, "state", &["du", "--format", "json"]);
    let records = usage["records"].as_array().unwrap();
    let kinds: Vec<&str> = records.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"layer") && kinds.contains(&"cache-mount"), "{usage:#}");
    for record in records {
        for field in ["id", "kind", "size", "last_used", "usage_count", "in_use", "worker"] {
            assert!(record.get(field).is_some(), "{field} missing in {record}");
        }
        assert_eq!(record["worker"], "local");
        // Blobs written in the last minutes are kept (an upload or pull in flight).
        if record["kind"] != "source" {
            assert_eq!(record["in_use"], false, "the build is over: {record}");
        }
    }
    let made = records.iter().find(|r| r["kind"] == "layer" && r["size"].as_u64().unwrap() >= 300_000);
    let made = made.unwrap_or_else(|| panic!("the step's layer: {usage:#}"));
    assert!(made["last_used"].as_str().unwrap().ends_with('Z'));
    assert_eq!(made["usage_count"], 1);
    let total = usage["total"].as_u64().unwrap();
    assert_eq!(total, records.iter().map(|r| r["size"].as_u64().unwrap()).sum::<u64>());
    let held: u64 = records.iter().filter(|r| r["in_use"] == true).map(|r| r["size"].as_u64().unwrap()).sum();
    assert_eq!(usage["reclaimable"].as_u64().unwrap(), total - held);
    let table = setup.run_in("state", &["du"], &[]);
    assert!(text(&table.stdout).lines().last().unwrap().starts_with("Total:"), "{}", text(&table.stdout));

    // A filter that nothing passes removes nothing.
    let pruned = json(&setup, "state", &["prune", "--filter", "until=1h", "--format", "json"]);
    assert_eq!(pruned, serde_json::json!({"reclaimed": 0, "records": 0}));
    // Without --all, cache mounts stay; the layers go.
    let pruned = json(&setup, "state", &["prune", "--format", "json"]);
    assert!(pruned["reclaimed"].as_u64().unwrap() >= 300_000, "{pruned}");
    let usage = json(&setup, "state", &["du", "--format", "json"]);
    let kinds: Vec<&str> = usage["records"].as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert!(!kinds.contains(&"layer") && kinds.contains(&"cache-mount"), "{usage:#}");
    let pruned = json(&setup, "state", &["prune", "--all", "--format", "json"]);
    assert_eq!(pruned["records"], 1, "the cache mount: {pruned}");
    let text_out = setup.run_in("state", &["prune"], &[]);
    assert!(text(&text_out.stdout).starts_with("Total:"), "{}", text(&text_out.stdout));

    // What was pruned is built again, not found cached.
    let meta = setup.dir.path().join("meta.json");
    let out = setup.run_in(
        "state",
        &["build", "--progress", "plain", "--metadata-file", meta.to_str().unwrap(), context.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let metadata: Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    let run = metadata["vertices"].as_array().unwrap().iter().find(|v| v["kind"] == "exec").unwrap();
    assert_eq!(run["status"], "executed", "{metadata:#}");

    let bad = setup.run_in("state", &["prune", "--filter", "label=x"], &[]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("until=DURATION"), "{}", text(&bad.stderr));
}

/// A tmpfs mounted for the test, detached when dropped (the daemon on it may still run).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let status =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).status();
        assert!(status.unwrap().success(), "mounting a tmpfs at {}", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    /// A daemon rooted on the tmpfs stops first: once unmounted, its pid file is out of
    /// sight of `Setup`'s drop, and the daemon would outlive the test.
    fn drop(&mut self) {
        stop_daemon(&self.0);
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_step_that_fills_the_disk_names_the_worker_and_path_and_the_next_build_works() {
    let setup = Setup::new();
    let _disk = Tmpfs::mount(setup.dir.path().join("small"), "48m");
    let filler = setup.context("filler", "FROM BASE\nRUN head -c 100000000 /dev/zero > /big\n");
    let out = setup.run_in("small", &["build", "--progress", "plain", filler.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    let root = setup.dir.path().join("small");
    for expected in ["worker local", "no space left on the disk holding", &root.display().to_string(), "(line 2)"] {
        assert!(stderr.contains(expected), "{expected:?} missing from:\n{stderr}");
    }

    // The store is as before the step: nothing of it is left, and the next build works.
    let usage = json(&setup, "small", &["du", "--format", "json"]);
    assert!(usage["total"].as_u64().unwrap() < 16_000_000, "{usage:#}");
    let fine = setup.context("fine", "FROM BASE\nRUN head -c 1000000 /dev/zero > /small\n");
    build_ok(&setup, "small", &fine);
}
