//! Operating a fleet: each `kilnd`'s `metrics-listen` (Prometheus metrics, health, readiness,
//! the queue an autoscaler reads) followed through a pool scaled from zero.

use kiln_testkit::{http_get, sample};

use super::*;

/// Polls `address` + `path` until `done` holds for the body (HTTP endpoints offer no event
/// to wait on); `what` names the wait if it times out.
fn wait_for_page(cluster: &Cluster, address: &str, path: &str, what: &str, done: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(address, path);
        if done(status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: {status} {body}\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn metrics_health_and_the_queue_follow_a_pool_scaled_from_zero() {
    let coordinator = "127.0.31.1:9090";
    let mut cluster = Cluster::start(31, &[], 2, &format!("metrics-listen = \"{coordinator}\"\n"));
    let pool =
        |name: &str, host: u8| format!("labels = {{ pool = \"{name}\" }}\nmetrics-listen = \"127.0.31.{host}:9091\"\n");
    cluster.start_worker_with("amd-1", 2, "linux/amd64", 2, &pool("amd", 2));
    assert_eq!(http_get(coordinator, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(coordinator, "/readyz").0, 200);
    // A worker is ready once registered.
    wait_for_page(&cluster, "127.0.31.2:9091", "/readyz", "the amd64 worker registers", |status, _| status == 200);

    // An arm64 build while the arm pool has no worker: its steps wait in the queue, which
    // the pool's autoscaler sees.
    let context = cluster.context("arm", "FROM BASE\nRUN echo built > /built\n");
    let metadata = cluster.dir.path().join("arm.json");
    let out = cluster.dir.path().join("arm-out");
    let build = cluster.spawn_build(&context, &metadata, &out, &["--platform", "linux/arm64"]);
    let arm_queue = "/v1/queue?pool=arm&platform=linux/arm64";
    let waiting = wait_for_page(&cluster, coordinator, arm_queue, "the arm64 step queues", |_, body| {
        json(body)["demand"].as_u64().unwrap_or(0) > 0
    });
    let waiting = json(&waiting);
    assert_eq!((&waiting["workers"], &waiting["slots"], &waiting["running"]), (&0.into(), &0.into(), &0.into()));
    let page = http_get(coordinator, "/metrics").1;
    assert!(sample(&page, "kiln_queue_depth{platform=\"linux/arm64\"}") >= 1.0, "{page}");
    assert_eq!(sample(&page, "kiln_builds{state=\"running\"}"), 1.0, "{page}");
    assert_eq!(sample(&page, "kiln_workers{platform=\"linux/amd64\",state=\"ready\"}"), 1.0, "{page}");
    assert_eq!(sample(&page, "kiln_worker_slots{platform=\"linux/amd64\",state=\"free\"}"), 2.0, "{page}");
    let all = json(&http_get(coordinator, "/v1/queue").1);
    assert!(all["platforms"]["linux/arm64"]["queued"].as_u64().unwrap() >= 1, "{all}");
    assert_eq!(all["pools"]["amd"]["platforms"], serde_json::json!(["linux/amd64"]));

    // The pool scales up: its worker takes the queue, and the build ends.
    cluster.start_worker_with("arm-1", 3, "linux/arm64", 2, &pool("arm", 3));
    let ended = build.wait_with_output().unwrap();
    assert!(ended.status.success(), "{}\n{}", text(&ended.stderr), cluster.logs());
    assert_eq!(std::fs::read_to_string(out.join("built")).unwrap(), "built\n");
    let idle = json(&http_get(coordinator, arm_queue).1);
    assert_eq!((&idle["demand"], &idle["workers"], &idle["slots"]), (&0.into(), &1.into(), &2.into()), "{idle}");

    // The run's phases: in the metadata record, and in the metrics.
    let metadata = read_json(&metadata);
    let run = record(&metadata, "RUN echo built");
    assert_eq!(run["worker"], "arm-1");
    for phase in ["queue_ms", "fetch_ms", "execute_ms", "export_ms"] {
        assert!(run["phases"][phase].is_u64(), "no {phase} in {run}");
    }
    // The run ends here just after its client has the result.
    let page = wait_for_page(&cluster, coordinator, "/metrics", "the build ends", |_, page| {
        sample(page, "kiln_builds{state=\"running\"}") == 0.0
    });
    assert_eq!(sample(&page, "kiln_builds_total{status=\"succeeded\"}"), 1.0, "{page}");
    assert!(sample(&page, "kiln_vertices_total{outcome=\"executed\"}") >= 2.0, "{page}");
    for phase in ["queue", "fetch", "execute", "export"] {
        let count = sample(&page, &format!("kiln_vertex_phase_seconds_count{{phase=\"{phase}\"}}"));
        assert!(count >= 1.0, "no {phase} phase in {page}");
    }
    assert!(sample(&page, "kiln_dispatch_latency_seconds_count") >= 1.0, "{page}");
    assert_eq!(sample(&page, "kiln_queue_depth{platform=\"linux/arm64\"}"), 0.0, "{page}");
    assert!(sample(&page, "kiln_cache_lookups_total{result=\"miss\",tier=\"local\"}") >= 1.0, "{page}");
    // The coordinator brought the result's layers from the arm64 worker for the local output.
    assert!(sample(&page, "kiln_transfer_bytes_total{direction=\"in\",kind=\"peer\"}") > 0.0, "{page}");
    let worker_page = http_get("127.0.31.3:9091", "/metrics").1;
    assert!(sample(&worker_page, "kiln_transfer_bytes_total{direction=\"out\",kind=\"peer\"}") > 0.0, "{worker_page}");
    // Its store's size, measured by the collection after each job (which follows the result).
    wait_for_page(&cluster, "127.0.31.3:9091", "/metrics", "the worker's store measured", |_, page| {
        page.lines().any(|l| l.starts_with("kiln_cache_bytes{tier=\"local\"} ") && !l.ends_with(" 0"))
    });
    for forbidden in ["sha256:", "build_id", "arm-1"] {
        assert!(!page.contains(forbidden), "a label carries {forbidden}: {page}");
    }

    // The same build again is cached, and counted so.
    cluster.build(&context, &["--platform", "linux/arm64"]);
    let page = http_get(coordinator, "/metrics").1;
    assert!(sample(&page, "kiln_cache_lookups_total{result=\"hit\",tier=\"local\"}") >= 1.0, "{page}");
    assert!(sample(&page, "kiln_vertices_total{outcome=\"cached\"}") >= 1.0, "{page}");

    // A worker whose coordinator is gone is not ready; it is again once it registers anew.
    cluster.coordinator.kill().unwrap();
    cluster.coordinator.wait().unwrap();
    wait_for_page(&cluster, "127.0.31.2:9091", "/readyz", "the worker notices", |status, body| {
        status == 503 && body.contains("not registered")
    });
    let config = cluster.dir.path().join("coordinator.toml");
    cluster.coordinator = coordinator_kilnd(&config, &cluster.dir.path().join("coordinator-again.log"));
    wait_for_page(&cluster, "127.0.31.2:9091", "/readyz", "the worker registers again", |status, _| status == 200);
}
