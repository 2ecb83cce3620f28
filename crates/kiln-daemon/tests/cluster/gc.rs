//! Garbage collection on a worker with a 64 MB cap (`[worker.gc]`), across builds that each
//! add tens of MB; `kiln du` and `kiln prune` through the coordinator.

use serde_json::Value;

use super::{Cluster, text};

const CAPPED: &str = "[worker.gc]\nreserved-space = \"0\"\nmax-used-space = \"64MB\"\n";
const CAP: u64 = 64_000_000;

/// `kiln du --format json` through the coordinator.
fn du(cluster: &Cluster) -> Value {
    let out = cluster.run(&["du", "--format", "json"]);
    assert!(out.status.success(), "du: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until the coordinator believes the worker holds at most `layers` layers: the
/// worker tells it what it removed right after removing it, on its session (no event for a
/// client to wait on, so this polls, with a deadline).
fn wait_known_layers_at_most(cluster: &Cluster, layers: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let known = cluster.workers_json()[0]["layers"].as_u64().unwrap();
        if known <= layers {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "coordinator knows {known} layers, the worker has {layers}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_worker_capped_at_64_mb_stays_under_it_across_builds_of_20_mb_each() {
    let mut cluster = Cluster::start(21, &[], 2, "");
    cluster.start_worker_with("capped", 2, "linux/amd64", 2, CAPPED);
    cluster.wait_for_workers(1);
    // Each build adds a 20 MB layer of its own (and the tar peers would fetch it as).
    let context = cluster.context("big", "FROM BASE\nARG N\nRUN head -c 20000000 /dev/urandom > /blob-$N\n");
    let context = context.to_str().unwrap().to_string();
    let mut peak = 0;
    for n in 0..6 {
        let arg = format!("N={n}");
        cluster.build(std::path::Path::new(&context), &["--build-arg", &arg]);
        let usage = du(&cluster);
        let total = usage["total"].as_u64().unwrap();
        peak = peak.max(total);
        assert!(total <= CAP, "after build {n}: {total} bytes used\n{usage:#}\n{}", cluster.logs());
        let records = usage["records"].as_array().unwrap();
        assert!(records.iter().all(|r| r["worker"] == "capped"), "{usage:#}");
        // The coordinator forgot what the worker removed: it knows no more layers than there are.
        wait_known_layers_at_most(&cluster, records.iter().filter(|r| r["kind"] == "layer").count() as u64);
    }
    assert!(peak > 20_000_000, "the builds did fill the store: {peak}");

    // An early result, collected long ago, is made again when it is needed.
    let out = cluster.dir.path().join("out-0");
    let local = format!("type=local,dest={}", out.display());
    cluster.build(std::path::Path::new(&context), &["--build-arg", "N=0", "-o", &local]);
    assert_eq!(std::fs::metadata(out.join("blob-0")).unwrap().len(), 20_000_000);

    // Prune everything nobody uses: the coordinator is told, and the store is (nearly) empty.
    let pruned = cluster.run(&["prune", "--all", "--format", "json"]);
    assert!(pruned.status.success(), "prune: {}", text(&pruned.stderr));
    let pruned: Value = serde_json::from_slice(&pruned.stdout).unwrap();
    assert!(pruned["reclaimed"].as_u64().unwrap() >= 20_000_000, "{pruned}");
    assert!(pruned["records"].as_u64().unwrap() >= 2, "{pruned}");
    let usage = du(&cluster);
    let layers: Vec<&Value> = usage["records"].as_array().unwrap().iter().filter(|r| r["kind"] == "layer").collect();
    assert!(layers.is_empty(), "{usage:#}");
    wait_known_layers_at_most(&cluster, 0);
    // And the next build works from nothing.
    cluster.build(std::path::Path::new(&context), &["--build-arg", "N=7"]);
}
