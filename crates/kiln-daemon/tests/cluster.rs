//! A real cluster: one coordinator and several workers, each a separate `kilnd` process on
//! its own 127.0.N.x address, running real containers and pushing to a real registry; the
//! `kiln` binary is the client. Each test has its own cluster (`N` distinct per test). Every
//! connection is mutual TLS, with certificates from `kilnd certs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_cas::BlobStore;
use kiln_kv::MemoryKv;
use kiln_registry::{Descriptor, MediaTypes, OCI_MANIFEST, PlatformField, RegistryClient, RegistryOptions};
use kiln_testkit::{TestRegistry, TestS3, arm64_busybox_rootfs, busybox_rootfs, store_image, workspace_binary};
use serde_json::Value;

#[path = "cluster/bake.rs"]
mod bake;
#[path = "cluster/cache.rs"]
mod cache;
#[path = "cluster/gc.rs"]
mod gc;
#[path = "cluster/hardening.rs"]
mod hardening;
#[path = "cluster/operations.rs"]
mod operations;
#[path = "cluster/replicated.rs"]
mod replicated;
#[path = "cluster/security.rs"]
mod security;
#[path = "cluster/traces.rs"]
mod traces;

struct Cluster {
    registry: TestRegistry,
    /// An amd64 + arm64 busybox index.
    base: String,
    dir: tempfile::TempDir,
    net: u8,
    coordinator: Child,
    workers: Vec<(String, Child)>,
    /// The token `kiln` passes (a cluster with `[[coordinator.tokens]]`).
    token: Option<String>,
    /// Environment of the workers started and the coordinator restarted from now on.
    env: Vec<(String, String)>,
}

impl Cluster {
    /// A coordinator on 127.0.`net`.1:7070 and one worker per platform given, on
    /// 127.0.`net`.(2..):7071, each with `slots` executions at once.
    fn start(net: u8, workers: &[&str], slots: usize, coordinator_extra: &str) -> Cluster {
        Cluster::start_as(net, workers, slots, coordinator_extra, None)
    }

    /// [`Cluster::start`], `kiln` passing `token`.
    fn start_as(net: u8, workers: &[&str], slots: usize, coordinator_extra: &str, token: Option<&str>) -> Cluster {
        workspace_binary("kiln-runner");
        let registry = TestRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let base = push_base(&registry, dir.path());
        let config = dir.path().join("coordinator.toml");
        let tls = certificate(dir.path(), "coordinator", &format!("127.0.{net}.1"));
        // A short lease, unless the test sets its own.
        let lease = if coordinator_extra.contains("lease-timeout") { "" } else { "lease-timeout = \"3s\"\n" };
        std::fs::write(
            &config,
            format!(
                "[coordinator]\nlisten = \"127.0.{net}.1:7070\"\nroot = \"{}\"\n{lease}{coordinator_extra}\n{tls}",
                dir.path().join("coordinator").display()
            ),
        )
        .unwrap();
        let coordinator = coordinator_kilnd(&config, &dir.path().join("coordinator.log"));
        let token = token.map(str::to_string);
        let mut cluster =
            Cluster { registry, base, net, coordinator, workers: Vec::new(), dir, token, env: Vec::new() };
        for (i, platform) in workers.iter().enumerate() {
            cluster.start_worker(&format!("w{}-{}", i + 1, platform.replace('/', "-")), i as u8 + 2, platform, slots);
        }
        cluster.wait_for_workers(workers.len());
        cluster
    }

    /// Starts a worker on 127.0.N.`host`; its files (config, state, log) are named after its
    /// name and host, so two workers may claim one name.
    fn start_worker(&mut self, name: &str, host: u8, platform: &str, slots: usize) {
        self.start_worker_with(name, host, platform, slots, "");
    }

    /// [`Cluster::start_worker`] with `extra` appended to its config.
    fn start_worker_with(&mut self, name: &str, host: u8, platform: &str, slots: usize, extra: &str) {
        let tls = certificate(self.dir.path(), name, &format!("127.0.{}.{host}", self.net));
        self.start_worker_raw(name, host, platform, &format!("max-parallelism = {slots}\n{extra}\n{tls}"));
    }

    /// Starts a worker whose config ends with `rest` (its own `[tls]` included).
    fn start_worker_raw(&mut self, name: &str, host: u8, platform: &str, rest: &str) {
        let files = format!("{name}-{host}");
        let config = self.dir.path().join(format!("{files}.toml"));
        std::fs::write(
            &config,
            format!(
                "[worker]\ncoordinator = \"https://127.0.{net}.1:7070\"\nname = \"{name}\"\nlisten = \"127.0.{net}.{host}:7071\"\n\
                 root = \"{}\"\nplatforms = [\"{platform}\"]\n{rest}",
                self.dir.path().join(&files).display(),
                net = self.net
            ),
        )
        .unwrap();
        let log = self.dir.path().join(format!("{files}.log"));
        let child = kilnd_command(&config, &log).envs(self.env.iter().cloned()).spawn().unwrap();
        self.workers.push((name.to_string(), child));
    }

    /// SIGKILLs the coordinator and starts it again on the same state directory.
    fn restart_coordinator(&mut self) {
        self.coordinator.kill().unwrap();
        self.coordinator.wait().unwrap();
        let config = self.dir.path().join("coordinator.toml");
        let log = self.dir.path().join(format!("coordinator-{}.log", unique()));
        let mut command = kilnd_command(&config, &log);
        command.env("KILN_RUNNER", "/nonexistent/kiln-runner").envs(self.env.iter().cloned());
        self.coordinator = command.spawn().unwrap();
    }

    /// Stops worker `index` (SIGTERM: it drains and exits) and starts a fresh one named
    /// `name` on 127.0.N.`host` with the same platform and slots, waiting until it is the
    /// one registered.
    fn replace_worker(&mut self, index: usize, name: &str, host: u8) {
        let (old, mut child) = self.workers.remove(index);
        stop(&mut child);
        let config = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "toml")
                    && p.file_name().unwrap().to_string_lossy().starts_with(&format!("{old}-"))
            })
            .unwrap();
        let config = std::fs::read_to_string(config).unwrap();
        let platform = config.lines().find_map(|l| l.strip_prefix("platforms = [\"")).unwrap();
        let platform = platform.trim_end_matches("\"]").to_string();
        let slots = config.lines().find_map(|l| l.strip_prefix("max-parallelism = ")).unwrap().parse().unwrap();
        self.start_worker(name, host, &platform, slots);
        self.wait_for_names(&format!("{name} replacing {old}"), |names| {
            names.iter().any(|n| n == name) && !names.contains(&old)
        });
    }

    /// Polls the coordinator's worker list until `done` holds for the registered names (the
    /// coordinator offers no event to wait on); `what` names the wait if it times out.
    fn wait_for_names(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        let names = |workers: &[Value]| -> Vec<String> {
            workers.iter().map(|w| w["name"].as_str().unwrap().to_string()).collect()
        };
        self.wait_for_workers_where(what, |workers| done(&names(workers)));
    }

    /// Polls `kiln workers --format json` until `done` holds for it (the coordinator offers
    /// no event to wait on); `what` names the wait if it times out.
    fn wait_for_workers_where(&self, what: &str, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let workers = self.workers_json();
            if done(&workers) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: workers are {workers:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn coordinator_alive(&mut self) -> bool {
        self.coordinator.try_wait().unwrap().is_none()
    }

    fn addr(&self) -> String {
        format!("https://127.0.{}.1:7070", self.net)
    }

    /// The cluster's CA certificate.
    fn ca(&self) -> PathBuf {
        self.dir.path().join("certs/ca.pem")
    }

    /// Client options for the coordinator: its CA, and `token`.
    fn client_options(&self, token: Option<&str>) -> kiln_client::ClientOptions {
        let tls = kiln_client::NodeTls::load(&self.ca(), None).unwrap();
        kiln_client::ClientOptions { tls: Some(tls), token: token.map(str::to_string) }
    }

    fn kiln(&self, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_binary("kiln"));
        command.arg("--addr").arg(self.addr()).arg("--tls-ca").arg(self.ca()).args(args);
        command.env_remove("KILN_ADDR").env_remove("KILN_TOKEN").env_remove("KILN_TLS_CA");
        if let Some(token) = &self.token {
            command.env("KILN_TOKEN", token);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.kiln(args).output().unwrap()
    }

    fn workers_json(&self) -> Vec<Value> {
        let out = self.run(&["workers", "--format", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
    }

    fn wait_for_workers(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.run(&["workers", "--format", "json"]);
            if out.status.success()
                && serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().len() == count
            {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not register: {}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The name of the first worker seen running a job.
    fn busy_worker(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let busy = self.workers_json().into_iter().find(|w| w["running"].as_u64().unwrap() > 0);
            if let Some(worker) = busy {
                return worker["name"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "no worker got work");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let context = self.dir.path().join(name);
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), dockerfile.replace("BASE", &self.base)).unwrap();
        context
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                all += &format!(
                    "\n--- {}\n{}",
                    entry.path().display(),
                    std::fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
        }
        all
    }

    /// Starts `kiln build CONTEXT --progress plain --metadata-file METADATA -o type=local,dest=OUT
    /// EXTRA...` with stderr piped.
    fn spawn_build(&self, context: &Path, metadata: &Path, out: &Path, extra: &[&str]) -> Child {
        let local = format!("type=local,dest={}", out.display());
        let mut args = vec!["build", context.to_str().unwrap(), "--progress", "plain"];
        args.extend_from_slice(&["--metadata-file", metadata.to_str().unwrap(), "-o", &local]);
        args.extend_from_slice(extra);
        self.kiln(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Builds `context`, returning the metadata file's content.
    fn build(&self, context: &Path, extra: &[&str]) -> Value {
        let metadata = self.dir.path().join(format!("meta-{}.json", unique()));
        let mut args = vec![
            "build",
            context.to_str().unwrap(),
            "--progress",
            "plain",
            "--metadata-file",
            metadata.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert!(out.status.success(), "build failed: {}\n{}", text(&out.stderr), self.logs());
        read_json(&metadata)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            stop(child);
        }
        stop(&mut self.coordinator);
    }
}

/// Writes a certificate for node `name` at `host` (and the cluster's CA, the first time)
/// under `DIR/certs` with `kilnd certs`; returns the `[tls]` section that uses it.
fn certificate(dir: &Path, name: &str, host: &str) -> String {
    let certs = dir.join("certs");
    let out = Command::new(workspace_binary("kilnd"))
        .args(["certs", "--out", certs.to_str().unwrap(), "--names", name, "--hosts", host])
        .output()
        .unwrap();
    assert!(out.status.success(), "kilnd certs: {}", text(&out.stderr));
    let file = |suffix: &str| certs.join(format!("{name}{suffix}.pem")).display().to_string();
    format!("[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n", certs.join("ca.pem").display(), file(""), file("-key"))
}

fn kilnd(config: &Path, log: &Path) -> Child {
    kilnd_command(config, log).spawn().unwrap()
}

/// A coordinator `kilnd`, with no runner to find: it executes nothing itself.
fn coordinator_kilnd(config: &Path, log: &Path) -> Child {
    kilnd_command(config, log).env("KILN_RUNNER", "/nonexistent/kiln-runner").spawn().unwrap()
}

/// A `kilnd` logging to `log`, with credentials for the tests' S3 servers.
fn kilnd_command(config: &Path, log: &Path) -> Command {
    let log = std::fs::File::create(log).unwrap();
    let mut command = Command::new(workspace_binary("kilnd"));
    command.arg("--config").arg(config).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null());
    command.envs(TestS3::ENV);
    command
}

/// SIGTERM (workers drain), then SIGKILL after a bounded wait.
fn stop(child: &mut Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).stderr(Stdio::null()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Pushes a two-platform busybox index (Debian's arm64 busybox for arm64).
fn push_base(registry: &TestRegistry, dir: &Path) -> String {
    let cas = Arc::new(BlobStore::open(&dir.join("base-cas"), Arc::new(MemoryKv::new())).unwrap());
    busybox_rootfs(&dir.join("rootfs-amd64"));
    arm64_busybox_rootfs(&dir.join("rootfs-arm64"));
    let mut manifests = Vec::new();
    for (platform, rootfs) in [("linux/amd64", "rootfs-amd64"), ("linux/arm64", "rootfs-arm64")] {
        let digest = store_image(&cas, &dir.join(rootfs), platform);
        let (os, architecture) = platform.split_once('/').unwrap();
        manifests.push(Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest,
            size: cas.info(&digest).unwrap().size,
            platform: Some(PlatformField { architecture: architecture.into(), os: os.into(), variant: None }),
            annotations: Default::default(),
        });
    }
    let index = kiln_registry::store_index(&cas, manifests, MediaTypes::Oci).unwrap();
    let base = registry.reference("kiln/busybox:cluster");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(RegistryClient::new(RegistryOptions::default()).unwrap().push(&base, &index.digest, &cas))
        .unwrap();
    base.to_string()
}

/// The record of the vertex whose name contains `needle`.
fn record<'a>(metadata: &'a Value, needle: &str) -> &'a Value {
    metadata["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str().unwrap().contains(needle))
        .unwrap_or_else(|| panic!("no vertex {needle} in {metadata:#}"))
}

#[test]
fn stages_spread_over_workers_and_platforms_build_on_their_own_workers_into_one_index() {
    let cluster = Cluster::start(11, &["linux/amd64", "linux/amd64", "linux/arm64"], 1, "");
    let workers = cluster.workers_json();
    let names: Vec<&str> = workers.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["w1-linux-amd64", "w2-linux-amd64", "w3-linux-arm64"]);
    assert_eq!(workers[2]["platforms"], serde_json::json!(["linux/arm64"]));
    assert_eq!(workers[0]["state"], "ready");
    assert_eq!(workers[0]["address"], "https://127.0.11.2:7071");
    let info = cluster.run(&["info", "--format", "json"]);
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!((info["role"].as_str(), info["workers"].as_u64()), (Some("coordinator"), Some(3)));

    // Independent stages spread over both amd64 workers (one slot each).
    let context = cluster.context(
        "stages",
        "FROM BASE AS base\n\
         FROM base AS one\nRUN sleep 1 && echo one > /one\n\
         FROM base AS two\nRUN sleep 1 && echo two > /two\n\
         FROM base\nCOPY --from=one /one /one\nCOPY --from=two /two /two\n",
    );
    let out = cluster.dir.path().join("stages-out");
    let metadata =
        cluster.build(&context, &["--platform", "linux/amd64", "-o", &format!("type=local,dest={}", out.display())]);
    let one = record(&metadata, "RUN sleep 1 && echo one")["worker"].as_str().unwrap().to_string();
    let two = record(&metadata, "RUN sleep 1 && echo two")["worker"].as_str().unwrap().to_string();
    assert_ne!(one, two, "{metadata:#}");
    assert!(one.contains("amd64") && two.contains("amd64"), "{one} {two}");
    assert_eq!(std::fs::read_to_string(out.join("one")).unwrap(), "one\n");
    assert_eq!(std::fs::read_to_string(out.join("two")).unwrap(), "two\n");

    // Two platforms: each RUN on a worker of its platform (arm64 through qemu), one index.
    let context = cluster.context("multi", "FROM BASE\nRUN uname -m > /arch\n");
    let pushed = format!("{}/kiln/multi:v1", cluster.registry.addr);
    let out = cluster.dir.path().join("multi-out");
    let metadata = cluster.build(
        &context,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &format!("type=image,name={pushed},push=true"),
            "-o",
            &format!("type=local,dest={}", out.display()),
        ],
    );
    for run in metadata["vertices"].as_array().unwrap().iter().filter(|v| v["name"].as_str().unwrap().contains("RUN")) {
        let platform = run["platform"].as_str().unwrap().replace('/', "-");
        assert!(run["worker"].as_str().unwrap().ends_with(&platform), "{run}");
    }
    assert_eq!(std::fs::read_to_string(out.join("linux_amd64/arch")).unwrap(), "x86_64\n");
    assert_eq!(std::fs::read_to_string(out.join("linux_arm64/arch")).unwrap(), "aarch64\n");
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{pushed}")])
        .output()
        .unwrap();
    let index: Value = serde_json::from_slice(&inspect.stdout).unwrap_or_else(|_| panic!("{}", text(&inspect.stderr)));
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(platforms, ["amd64", "arm64"]);
}

#[test]
fn ten_concurrent_clients_sharing_a_step_execute_it_once() {
    let cluster = Cluster::start(12, &["linux/amd64", "linux/amd64"], 4, "");
    let dockerfile =
        "FROM BASE\nRUN sleep 1 && cat /proc/sys/kernel/random/uuid > /shared\nARG N\nRUN echo $N > /own\n";
    let mut children = Vec::new();
    for n in 0..10 {
        let context = cluster.context(&format!("client{n}"), dockerfile);
        let metadata = cluster.dir.path().join(format!("client{n}.json"));
        let out = cluster.dir.path().join(format!("client{n}-out"));
        let child = cluster.spawn_build(&context, &metadata, &out, &["--build-arg", &format!("N={n}")]);
        children.push((metadata, out, child));
    }
    let mut executed = 0;
    let mut shared = Vec::new();
    for (n, (metadata, out, child)) in children.into_iter().enumerate() {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "client {n}: {}\n{}", text(&output.stderr), cluster.logs());
        let metadata = read_json(&metadata);
        let status = record(&metadata, "RUN sleep 1")["status"].as_str().unwrap().to_string();
        assert!(["executed", "deduplicated", "cached"].contains(&status.as_str()), "{status}");
        executed += usize::from(status == "executed");
        assert_eq!(std::fs::read_to_string(out.join("own")).unwrap(), format!("{n}\n"));
        shared.push(std::fs::read_to_string(out.join("shared")).unwrap());
    }
    assert_eq!(executed, 1, "the shared step ran once cluster-wide");
    assert!(shared.iter().all(|s| *s == shared[0]), "every client got the one result: {shared:?}");
    // The size of a worker's cache, measured when its jobs ended, comes with its heartbeats.
    cluster.wait_for_workers_where("a cache size told", |workers| {
        workers.iter().any(|w| w["cache_bytes"].as_u64().is_some_and(|bytes| bytes > 0))
    });
}

#[test]
fn a_worker_killed_mid_build_loses_no_build() {
    let cluster = Cluster::start(13, &["linux/amd64", "linux/amd64"], 2, "");
    let context = cluster.context(
        "kill",
        "FROM BASE AS base\nRUN echo base > /base\n\
         FROM base AS a\nRUN sleep 2 && echo a > /a\n\
         FROM base AS b\nRUN sleep 2 && echo b > /b\n\
         FROM base AS c\nRUN sleep 2 && echo c > /c\n\
         FROM base AS d\nRUN sleep 2 && echo d > /d\n\
         FROM base\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\nCOPY --from=d /d /d\n",
    );
    let out = cluster.dir.path().join("kill-out");
    let metadata = cluster.dir.path().join("kill.json");
    let build = cluster.spawn_build(&context, &metadata, &out, &[]);
    // Kill the worker that runs a sleep step as soon as it runs one: it also holds layers
    // other steps need (the base stage), which must be recomputed elsewhere.
    let victim = cluster.busy_worker();
    std::thread::sleep(Duration::from_millis(300));
    let mut cluster = cluster;
    let child = &mut cluster.workers.iter_mut().find(|(name, _)| *name == victim).unwrap().1;
    child.kill().unwrap();
    child.wait().unwrap();

    let output = build.wait_with_output().unwrap();
    assert!(output.status.success(), "{}\n{}", text(&output.stderr), cluster.logs());
    for file in ["base", "a", "b", "c", "d"] {
        assert_eq!(std::fs::read_to_string(out.join(file)).unwrap(), format!("{file}\n"));
    }
    let names: Vec<String> = cluster.workers_json().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect();
    assert!(!names.contains(&victim), "{names:?}");
    let metadata = read_json(&metadata);
    for run in
        metadata["vertices"].as_array().unwrap().iter().filter(|v| v["name"].as_str().unwrap().contains("sleep 2"))
    {
        assert_ne!(run["worker"].as_str(), Some(victim.as_str()), "{run}");
    }
}

#[test]
fn a_rebuild_after_one_edit_uploads_one_file_and_a_platform_without_workers_times_out() {
    let cluster = Cluster::start(14, &["linux/amd64"], 4, "placement-timeout = \"2s\"\n");
    let context = cluster.context("edit", "FROM BASE\nCOPY . /src\nRUN cat /src/file7.txt > /seven\n");
    for i in 0..20 {
        std::fs::write(context.join(format!("file{i}.txt")), format!("content {i}\n")).unwrap();
    }
    let out = cluster.dir.path().join("edit-out");
    let local = format!("type=local,dest={}", out.display());
    let first = cluster.build(&context, &["-o", &local]);
    assert_eq!(first["context"]["files"], 21);
    assert_eq!(first["context"]["uploaded_files"], 21);
    let again = cluster.build(&context, &["-o", &local]);
    assert_eq!(again["context"]["uploaded_files"], 0);
    std::fs::write(context.join("file7.txt"), "edited\n").unwrap();
    let edited = cluster.build(&context, &["-o", &local]);
    assert_eq!(edited["context"]["uploaded_files"], 1);
    assert_eq!(edited["context"]["uploaded_bytes"], 7);
    assert_eq!(std::fs::read_to_string(out.join("seven")).unwrap(), "edited\n");

    // No arm64 worker: the RUN waits, then fails naming the platform and the workers.
    let context = cluster.context("arm", "FROM scratch\nRUN true\n");
    let started = Instant::now();
    let out = cluster.run(&["build", context.to_str().unwrap(), "--platform", "linux/arm64", "--progress", "plain"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no worker for linux/arm64 within 2 s (connected: w1-linux-amd64 (linux/amd64))"),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[test]
fn an_adaptive_worker_takes_more_steps_than_cpus_while_its_machine_is_calm() {
    // A worker without max-parallelism, reading pressure files whose stall totals never grow
    // (a calm machine). Its periodic heartbeats go every 100 s: only those its capacity's
    // changes send can raise the capacity in time.
    let mut cluster = Cluster::start(35, &[], 1, "lease-timeout = \"300s\"");
    let pressure = cluster.dir.path().join("pressure");
    std::fs::create_dir_all(&pressure).unwrap();
    let calm = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
    for file in ["cpu.pressure", "memory.pressure"] {
        std::fs::write(pressure.join(file), calm).unwrap();
    }
    cluster.env.push(("KILN_PRESSURE_DIR".into(), pressure.display().to_string()));
    let tls = certificate(cluster.dir.path(), "adaptive", "127.0.35.2");
    cluster.start_worker_raw("adaptive", 2, "linux/amd64", &tls);
    cluster.wait_for_workers(1);
    let cpus = std::thread::available_parallelism().unwrap().get();
    let registered = cluster.workers_json().remove(0);
    assert_eq!(
        (registered["max_parallelism"].as_u64(), registered["slots"].as_u64()),
        (Some(32 * cpus as u64), Some(cpus as u64)),
        "{registered}"
    );
    // Steps that can only end together: each marks its start in a shared cache mount and
    // waits for all the others' marks (giving up after 60 s). Placed one per CPU, they would
    // never end.
    let steps = cpus + 4;
    let mut dockerfile = String::new();
    for k in 0..steps {
        dockerfile += &format!(
            "FROM BASE AS s{k}\nRUN --mount=type=cache,target=/barrier,sharing=shared touch /barrier/{k} && n=0 && \
             until [ \"$(ls /barrier | wc -l)\" -ge {steps} ]; do n=$((n+1)); \
             if [ $n -ge 1200 ]; then echo \"only $(ls /barrier | wc -l) of {steps} steps ran at once\" >&2; exit 1; fi; \
             sleep 0.05; done && touch /done-{k}\n"
        );
    }
    dockerfile += "FROM BASE\n";
    for k in 0..steps {
        dockerfile += &format!("COPY --from=s{k} /done-{k} /\n");
    }
    let context = cluster.context("barrier", &dockerfile);
    let out = cluster.dir.path().join("barrier-out");
    let local = format!("type=local,dest={}", out.display());
    let built = cluster.run(&["build", context.to_str().unwrap(), "--progress", "plain", "--debug", "-o", &local]);
    let progress = text(&built.stderr);
    assert!(built.status.success(), "build failed: {progress}\n{}", cluster.logs());
    assert!((0..steps).all(|k| out.join(format!("done-{k}")).exists()));
    // Each step let in past the CPUs says why, at debug level.
    let admitted = progress.lines().filter(|l| l.contains("[admission] admitted as step")).count();
    assert!(admitted >= steps - cpus, "{admitted} admissions shown:\n{progress}");
    // Its jobs done, the worker's capacity goes back to one per CPU.
    cluster.wait_for_workers_where("the capacity shrunk back", |workers| {
        workers[0]["slots"].as_u64() == Some(cpus as u64)
    });
}

#[test]
fn a_draining_worker_finishes_its_step_and_takes_no_more() {
    let mut cluster = Cluster::start(15, &["linux/amd64", "linux/amd64"], 1, "web-listen = \"127.0.15.1:7080\"");
    // The web UI's workers, with the steps they run.
    let web_workers = || {
        let (status, body) = kiln_testkit::http_get("127.0.15.1:7080", "/api/workers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap().as_array().unwrap().clone()
    };
    let context = cluster.context("drain", "FROM BASE\nRUN sleep 2 && echo done > /done\n");
    let metadata = cluster.dir.path().join("drain.json");
    let out = cluster.dir.path().join("drain-out");
    let submitted = kiln_types::now_ms();
    let mut build = cluster.spawn_build(&context, &metadata, &out, &[]);
    // Wait for the RUN step to start (the image source before it ran and finished).
    let (lines_sender, lines) = std::sync::mpsc::channel();
    let stderr = build.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let _ = lines_sender.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    while !lines.recv_timeout(Duration::from_secs(60)).expect("the build runs").contains("RUN sleep 2") {}
    let victim = cluster.busy_worker();
    // The web UI shows the step on its worker, with the worker's slots and heartbeat.
    let shown = web_workers().into_iter().find(|w| w["name"] == victim.as_str()).unwrap();
    let steps = shown["steps"].as_array().unwrap();
    assert!(steps.len() == 1 && steps[0]["name"].as_str().unwrap().contains("RUN sleep 2"), "{shown}");
    let since = steps[0]["since"].as_u64().unwrap();
    assert!((submitted..=kiln_types::now_ms()).contains(&since), "started before the build: {shown}");
    assert_eq!((shown["running"].as_u64(), shown["max_parallelism"].as_u64()), (Some(1), Some(1)), "{shown}");
    assert!(shown["last_heartbeat"].as_u64().unwrap() > 0, "{shown}");
    let child = &mut cluster.workers.iter_mut().find(|(name, _)| *name == victim).unwrap().1;
    Command::new("kill").arg(child.id().to_string()).status().unwrap();
    // It shows as draining while its step runs.
    let deadline = Instant::now() + Duration::from_millis(1500);
    loop {
        let states = cluster.workers_json();
        let state = states.iter().find(|w| w["name"] == victim.as_str()).map(|w| w["state"].clone());
        if state == Some(Value::from("draining")) {
            // The web UI agrees, and the step is still there: it finishes.
            let shown = web_workers().into_iter().find(|w| w["name"] == victim.as_str()).unwrap();
            assert_eq!(shown["state"], "draining", "{shown}");
            assert_eq!(shown["steps"].as_array().unwrap().len(), 1, "{shown}");
            break;
        }
        assert!(Instant::now() < deadline, "{states:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let status = build.wait().unwrap();
    let progress = reader.join().unwrap();
    assert!(status.success(), "{progress}\n{}", cluster.logs());
    assert_eq!(std::fs::read_to_string(out.join("done")).unwrap(), "done\n");
    let metadata = read_json(&metadata);
    assert_eq!(record(&metadata, "RUN sleep 2")["worker"].as_str(), Some(victim.as_str()), "it finished its step");
    let child = &mut cluster.workers.iter_mut().find(|(name, _)| *name == victim).unwrap().1;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the drained worker did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a drained worker exits cleanly");
    let names: Vec<String> = cluster.workers_json().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect();
    assert!(!names.contains(&victim), "{names:?}");
}
