//! The real `kilnd` binary: it serves on its socket, answers, and stops cleanly on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `kilnd --standalone ARGS --root ROOT` and waits for its socket.
fn standalone(root: &Path, args: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    standalone_with(root, args, &[])
}

/// [`standalone`] with more environment.
fn standalone_with(root: &Path, args: &[&str], env: &[(&str, &Path)]) -> (std::process::Child, std::path::PathBuf) {
    let runner = Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln-runner");
    let daemon = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--standalone")
        .args(args)
        .arg("--root")
        .arg(root)
        .env("KILN_RUNNER", &runner)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let socket = root.join("kilnd.sock");
    wait_until("the socket", || socket.exists());
    (daemon, socket)
}

#[test]
fn standalone_daemon_serves_its_socket_and_stops_on_sigterm() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().unwrap();
    // Open to everyone before the daemon starts, as a directory created by hand may be.
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut daemon, socket) = standalone(root.path(), &[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let info = runtime.block_on(async {
        let client = kiln_client::Client::connect(&format!("unix://{}", socket.display())).await.unwrap();
        client.info().await.unwrap()
    });
    assert_eq!(info.root, root.path().display().to_string());
    assert_eq!(info.worker, "local");
    // The state directory is root's alone: another user lists nothing in it.
    assert_eq!(std::fs::metadata(root.path()).unwrap().permissions().mode() & 0o7777, 0o710);
    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(root.path().join("blobs"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("Permission denied"), "{nobody:?}");
    let pid = std::fs::read_to_string(root.path().join("kilnd.pid")).unwrap();
    assert_eq!(pid.trim(), daemon.id().to_string());

    // A second daemon on the same state directory refuses to start and leaves the first alone.
    let second =
        Command::new(env!("CARGO_BIN_EXE_kilnd")).args(["--standalone", "--root"]).arg(root.path()).output().unwrap();
    assert!(!second.status.success());
    assert!(socket.exists());

    Command::new("kill").arg(daemon.id().to_string()).status().unwrap();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "kilnd exits cleanly on SIGTERM");
    assert!(!socket.exists() && !root.path().join("kilnd.pid").exists());

    let refused = Command::new(env!("CARGO_BIN_EXE_kilnd")).output().unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("give --standalone or --config FILE"));
}

/// Connects to `socket` as the user nobody with `group` as its only group; the error, if any.
fn connect_as(socket: &Path, group: u32) -> String {
    let connect = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])";
    let out = Command::new("setpriv")
        .args(["--reuid=65534", &format!("--regid={group}"), "--clear-groups", "/usr/bin/python3", "-c", connect])
        .arg(socket)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_socket_group_may_use_the_daemon_and_nobody_else() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let root = tempfile::tempdir().unwrap();
    // Debian's `daemon` group (gid 1) stands in for a `kiln` group.
    let (mut daemon, socket) = standalone(root.path(), &["--group", "daemon"]);
    let metadata = std::fs::metadata(&socket).unwrap();
    assert_eq!((metadata.permissions().mode() & 0o777, metadata.gid()), (0o660, 1));
    let state = std::fs::metadata(root.path()).unwrap();
    assert_eq!((state.permissions().mode() & 0o7777, state.gid()), (0o710, 1));
    assert_eq!(connect_as(&socket, 1), "", "a member of the group connects");
    assert!(connect_as(&socket, 65534).contains("Permission denied"), "others do not");
    Command::new("kill").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());
    let unknown = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args(["--standalone", "--group", "no-such-group-here", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--group no-such-group-here: no such group"));
}

#[test]
fn a_config_file_with_both_roles_runs_standalone_and_bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("kiln.toml");
    let root = dir.path().join("worker");
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:{port}\"\n[worker]\nroot = \"{}\"\nmax-parallelism = 2\n\
             [log]\nformat = \"json\"\n[tls]\ninsecure = true\n",
            root.display()
        ),
    )
    .unwrap();
    let runner = Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln-runner");
    let log = dir.path().join("kilnd.log");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--config")
        .arg(&config)
        .env("KILN_RUNNER", &runner)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Waits for the daemon to say it listens: probing the port with connects could succeed
    // by a TCP self-connect (a probe's own source port is the free port) and then hold it.
    let listening = format!("listening on 127.0.0.1:{port}");
    wait_until("the TCP listener", || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&listening)));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let info = runtime.block_on(async {
        let client = kiln_client::Client::connect(&format!("http://127.0.0.1:{port}")).await.unwrap();
        client.info().await.unwrap()
    });
    assert_eq!(info.root, root.display().to_string());
    Command::new("kill").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());
    // `[log] format = "json"` (or `--log-format json`): one JSON object per line.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let listening = format!("listening on 127.0.0.1:{port}");
    assert!(lines.iter().any(|l| l["fields"]["message"] == listening.as_str() && l["level"] == "INFO"), "{lines:?}");

    std::fs::write(&config, "[worker]\ncoordinator = \"http://127.0.0.1:1\"\nmax-paralelism = 2\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kilnd")).arg("--config").arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("kiln.toml") && stderr.contains("max-paralelism"), "{stderr}");
}

/// Starts a standalone daemon from `config` (its TCP listener on `port`), logging to `log`.
fn from_config(config: &Path, log: &Path, port: u16) -> Stopped {
    let runner = Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln-runner");
    let daemon = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--config")
        .arg(config)
        .env("KILN_RUNNER", &runner)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let daemon = Stopped(daemon);
    let listening = format!("listening on 127.0.0.1:{port}");
    wait_until("the TCP listener", || std::fs::read_to_string(log).is_ok_and(|l| l.contains(&listening)));
    daemon
}

/// A daemon killed when the test ends, however it ends.
struct Stopped(std::process::Child);

impl Stopped {
    /// Stops it with SIGTERM and checks that it exits cleanly.
    fn stop(mut self) {
        Command::new("kill").arg(self.0.id().to_string()).status().unwrap();
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Calls `Info` over one connection until refused (at most `bound` times): the calls that
/// passed, and the refusal.
fn info_until_refused(address: &str, token: Option<&str>, bound: usize) -> (usize, kiln_client::ClientError) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = kiln_client::ClientOptions { tls: None, token: token.map(str::to_string) };
        let client = kiln_client::Client::connect_with(address, &options).await.unwrap();
        for passed in 0..bound {
            if let Err(error) = client.info().await {
                return (passed, error);
            }
        }
        panic!("{bound} requests over one connection were all served");
    })
}

#[test]
fn rates_tenant_limits_and_request_bounds_are_enforced_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let sha = |token: &str| kiln_types::Digest::of(token.as_bytes()).hex();
    let token = |name: &str| {
        format!(
            "[[coordinator.tokens]]\nname = \"{name}\"\ntenant = \"{name}\"\nrole = \"build\"\nsha256 = \"{}\"\n",
            sha(name)
        )
    };
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:{port}\"\n[worker]\nroot = \"{}\"\n[tls]\ninsecure = true\n{}{}\
             [coordinator.tenants.small]\nmax-queued-vertices = 2\n",
            dir.path().join("root").display(),
            token("small") + &token("busy"),
            token("calm"),
        ),
    )
    .unwrap();
    let daemon = from_config(&config, &dir.path().join("kilnd.log"), port);
    let address = format!("http://127.0.0.1:{port}");

    // A token over its rate is refused on its own; another token is not.
    let (passed, refused) = info_until_refused(&address, Some("busy"), 5000);
    assert!(passed >= kiln_api::TOKEN_RATE.1 as usize, "{passed}");
    assert_eq!(refused.kind(), kiln_model::ErrorKind::Exhausted, "{refused}");
    assert!(refused.to_string().contains("token \"busy\": over 50 requests per second"), "{refused}");
    // (The address's own bucket, shared by both, is twice a token's: room for calm.)
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let options = kiln_client::ClientOptions { tls: None, token: Some("calm".into()) };
        let client = kiln_client::Client::connect_with(&address, &options).await.unwrap();
        for n in 0..100 {
            client.info().await.unwrap_or_else(|e| panic!("calm's request {n}, limited by busy: {e}"));
        }
    });

    // A build planning more vertices than its tenant may have: refused on one line.
    let context = dir.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("a"), "a").unwrap();
    std::fs::write(context.join("Dockerfile"), "FROM scratch\nCOPY a /a\nCOPY a /b\nCOPY a /c\n").unwrap();
    let kiln = |token: &str, args: &[&str]| {
        Command::new(Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln"))
            .args(["--addr", &address, "--token", token])
            .args(args)
            .env_remove("KILN_ADDR")
            .output()
            .unwrap()
    };
    let out = kiln("small", &["build", context.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("tenant \"small\"") && stderr.contains("(max-queued-vertices)"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Oversized parts of a request: the CLI refuses before sending, the daemon if sent.
    let mut args = vec!["build".to_string(), context.display().to_string()];
    for n in 0..=kiln_model::bounds::BUILD_ARGS {
        args.extend(["--build-arg".to_string(), format!("A{n}=v")]);
    }
    let out = kiln("calm", &args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--build-arg is 1025 arguments, over the limit of 1024"),
        "{stderr}"
    );
    let refused = runtime.block_on(async {
        let options = kiln_client::ClientOptions { tls: None, token: Some("calm".into()) };
        let client = kiln_client::Client::connect_with(&address, &options).await.unwrap();
        let request = kiln_client::BuildRequest {
            dockerfile: "#".repeat(kiln_model::bounds::DOCKERFILE + 1),
            file_name: "Dockerfile.huge".into(),
            context_manifest: Some(Default::default()),
            ..Default::default()
        };
        client.build(request).await.err()
    });
    let refused = refused.expect("an oversized Dockerfile was accepted");
    assert_eq!(refused.kind(), kiln_model::ErrorKind::BadRequest, "{refused}");
    let expected = format!("the Dockerfile Dockerfile.huge is {} bytes", kiln_model::bounds::DOCKERFILE + 1);
    assert!(refused.to_string().contains(&expected), "{refused}");

    // Over TCP, no context may be a path on the daemon's disk: not a named directory, not a
    // nested target's.
    let uploaded = || kiln_client::BuildRequest {
        dockerfile: "FROM secrets\nCOPY --from=secrets / /\n".into(),
        context_manifest: Some(Default::default()),
        ..Default::default()
    };
    let mut directory = uploaded();
    directory.named_contexts.insert(
        "secrets".into(),
        kiln_model::NamedContext::Local { dir: "/etc".into(), dockerignore: String::new(), manifest: None },
    );
    let mut nested = uploaded();
    nested.named_contexts.insert(
        "secrets".into(),
        kiln_model::NamedContext::Target(Box::new(kiln_client::BuildRequest {
            dockerfile: "FROM scratch\nCOPY . /\n".into(),
            context: "/etc".into(),
            ..Default::default()
        })),
    );
    for request in [directory, nested] {
        let refused = runtime.block_on(async {
            let options = kiln_client::ClientOptions { tls: None, token: Some("calm".into()) };
            let client = kiln_client::Client::connect_with(&address, &options).await.unwrap();
            client.build(request).await.err()
        });
        let refused = refused.expect("a path on the daemon's disk was accepted over TCP");
        assert!(refused.to_string().contains("over TCP the client uploads the context"), "{refused}");
    }

    daemon.stop();

    // Without tokens, each client address has its own rate.
    let root = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = root.path().join("kilnd.log");
    let daemon = Stopped(
        Command::new(env!("CARGO_BIN_EXE_kilnd"))
            .args(["--standalone", "--insecure", "--listen", &format!("127.0.0.1:{port}"), "--root"])
            .arg(root.path().join("root"))
            .env("KILN_RUNNER", Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln-runner"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let listening = format!("listening on 127.0.0.1:{port}");
    wait_until("the TCP listener", || std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&listening)));
    let address = format!("http://127.0.0.1:{port}");
    let (passed, refused) = info_until_refused(&address, None, 10_000);
    assert!(passed >= kiln_api::CONNECTION_RATE.1 as usize, "{passed}");
    assert!(refused.to_string().contains("client 127.0.0.1: over 100 requests per second"), "{refused}");
    daemon.stop();
}

#[test]
fn a_standalone_daemon_serves_metrics_health_and_its_queue() {
    use kiln_testkit::{http_get, sample};
    let root = tempfile::tempdir().unwrap();
    let address = "127.0.32.1:9090";
    let (mut daemon, _) =
        standalone(&root.path().join("state"), &["--metrics-listen", address, "--max-parallelism", "3"]);
    wait_until("the metrics listener", || http_get(address, "/healthz").0 == 200);
    assert_eq!(http_get(address, "/readyz"), (200, "ready\n".to_string()));
    let queue: serde_json::Value = serde_json::from_str(&http_get(address, "/v1/queue").1).unwrap();
    let host = kiln_types::Platform::host().to_string();
    let load = &queue["platforms"][&host];
    assert_eq!((&load["queued"], &load["workers"], &load["slots_free"]), (&0.into(), &1.into(), &3.into()), "{queue}");

    let context = root.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("Dockerfile"), "FROM scratch\nCOPY a /a\n").unwrap();
    std::fs::write(context.join("a"), "a\n").unwrap();
    let built = Command::new(kiln_testkit::workspace_binary("kiln"))
        .args(["build", "--progress", "plain"])
        .arg(&context)
        .env("KILN_ROOT", root.path().join("state"))
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    // The build's slot is given back just after its result.
    let free = format!("kiln_worker_slots{{platform=\"{host}\",state=\"free\"}}");
    wait_until("the slot back", || sample(&http_get(address, "/metrics").1, &free) == 3.0);
    let page = http_get(address, "/metrics").1;
    assert_eq!(sample(&page, "kiln_builds_total{status=\"succeeded\"}"), 1.0, "{page}");
    assert!(sample(&page, "kiln_vertices_total{outcome=\"executed\"}") >= 1.0, "{page}");
    assert!(sample(&page, "kiln_vertex_phase_seconds_count{phase=\"execute\"}") >= 1.0, "{page}");

    // `kilnd drain` (a pod's preStop hook) stops the daemon and returns once it has exited.
    let drained = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--root")
        .arg(root.path().join("state"))
        .arg("drain")
        .output()
        .unwrap();
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    assert!(String::from_utf8_lossy(&drained.stderr).contains("has exited"));
    assert!(daemon.try_wait().unwrap().is_some_and(|status| status.success()), "the daemon is gone");
}

#[test]
fn the_history_keeps_what_its_retention_allows_and_prunes_at_start() {
    let root = tempfile::tempdir().unwrap();
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), "FROM scratch\nCOPY a /a\n").unwrap();
    let kiln = |socket: &Path, args: &[&str]| {
        Command::new(Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln"))
            .args(["--addr", &format!("unix://{}", socket.display())])
            .args(args)
            .env_remove("KILN_ADDR")
            .output()
            .unwrap()
    };
    let ids = |socket: &Path| -> Vec<String> {
        let out = kiln(socket, &["history", "ls", "--format", "json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        list.iter().map(|b| b["id"].as_str().unwrap().to_string()).collect()
    };
    let (mut daemon, socket) = standalone(root.path(), &[]);
    for n in 0..3 {
        std::fs::write(context.path().join("a"), format!("{n}")).unwrap();
        let out = kiln(&socket, &["build", context.path().to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let all = ids(&socket);
    assert_eq!(all.len(), 3);
    Command::new("kill").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());

    // Restarted with room for two builds: the oldest goes, with its records.
    let (mut daemon, socket) = standalone(root.path(), &["--history-max-builds", "2"]);
    wait_until("the history pruned to two builds", || ids(&socket).len() == 2);
    assert_eq!(ids(&socket), all[1..]);
    let out = kiln(&socket, &["history", "inspect", &all[0]]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the history"));
    let out = kiln(&socket, &["history", "inspect", &all[2], "--format", "json"]);
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["vertices"].as_array().map(Vec::len), Some(2), "{inspected:#}");
    Command::new("kill").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());

    // An idle daemon lets builds older than its maximum age go, without a restart or more
    // builds ending.
    let (daemon, socket) = standalone(root.path(), &["--history-max-age", "2s"]);
    // Stopped even when an assertion fails.
    let daemon = Stopped(daemon);
    wait_until("the history emptied by age", || ids(&socket).is_empty());
    let out = kiln(&socket, &["build", context.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the idle daemon pruned the build by age", || ids(&socket).is_empty());
    daemon.stop();

    // A bad age is refused, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args(["--standalone", "--history-max-age", "soon", "--root"])
        .arg(root.path())
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--history-max-age"));
}

#[test]
fn without_max_parallelism_steps_past_the_cpus_start_while_the_machine_is_calm() {
    let registry = kiln_testkit::TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let base = kiln_testkit::push_busybox(&registry, dir.path(), "kiln/busybox:admission");
    // The machine's pressure, as the daemon is told to read it: calm (stall totals that do
    // not grow), whatever else this machine runs.
    let pressure = dir.path().join("pressure");
    std::fs::create_dir_all(&pressure).unwrap();
    for file in ["cpu.pressure", "memory.pressure"] {
        let text = "some avg10=0.00 avg60=0.00 avg300=0.00 total=5\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        std::fs::write(pressure.join(file), text).unwrap();
    }
    let cpus = std::thread::available_parallelism().unwrap().get();
    let stages = 3 * cpus;
    let mut dockerfile = String::new();
    for n in 0..stages {
        dockerfile += &format!("FROM {base} AS s{n}\nRUN sleep 2 && echo {n} > /out\n");
    }
    dockerfile += &format!("FROM {base}\n");
    for n in 0..stages {
        dockerfile += &format!("COPY --from=s{n} /out /out{n}\n");
    }
    let context = dir.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("Dockerfile"), dockerfile).unwrap();

    let (daemon, socket) = standalone_with(&dir.path().join("root"), &[], &[("KILN_PRESSURE_DIR", &pressure)]);
    // Stopped even when an assertion fails.
    let daemon = Stopped(daemon);
    let metadata = dir.path().join("metadata.json");
    let out = Command::new(Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln"))
        .args(["--addr", &format!("unix://{}", socket.display()), "build", "--progress", "plain"])
        .arg("--metadata-file")
        .arg(&metadata)
        .arg(&context)
        .env_remove("KILN_ADDR")
        // `--debug`, as a CI job sets it.
        .env("KILN_DEBUG", "1")
        .output()
        .unwrap();
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{progress}");
    // Every RUN step ran at once: each started before any ended.
    let metadata: serde_json::Value = serde_json::from_slice(&std::fs::read(&metadata).unwrap()).unwrap();
    let runs: Vec<&serde_json::Value> =
        metadata["vertices"].as_array().unwrap().iter().filter(|v| v["kind"] == "exec").collect();
    assert_eq!(runs.len(), stages);
    // RFC 3339 with milliseconds, whole seconds without them: made comparable as text.
    let time = |v: &serde_json::Value, key: &str| {
        let text = v[key].as_str().unwrap();
        if text.contains('.') { text.to_string() } else { text.replace('Z', ".000Z") }
    };
    let last_start = runs.iter().map(|v| time(v, "started")).max().unwrap();
    let first_end = runs.iter().map(|v| time(v, "completed")).min().unwrap();
    assert!(
        last_start < first_end,
        "not all at once: the last started at {last_start}, the first ended at {first_end}"
    );
    // The steps past the CPUs say why they were let in (a COPY that came while the last
    // ones ran may say so too).
    let admitted = progress.lines().filter(|l| l.contains("[admission] admitted as step")).count();
    assert!(admitted >= stages - cpus, "{admitted} admissions told: {progress}");

    // A client that did not ask for them is sent none of those lines, and one that did is
    // (the same build again, its steps run again, through the Rust client).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let debug_lines = |debug: bool| {
        runtime.block_on(async {
            let client = kiln_client::Client::connect(&format!("unix://{}", socket.display())).await.unwrap();
            let request = kiln_model::BuildRequest {
                dockerfile: std::fs::read_to_string(context.join("Dockerfile")).unwrap(),
                file_name: "Dockerfile".into(),
                context: context.clone(),
                no_cache: true,
                debug,
                ..Default::default()
            };
            let mut events = client.build(request).await.unwrap();
            let (mut lines, mut ended) = (0, false);
            while let Some(event) = events.next().await.unwrap() {
                match event {
                    kiln_model::BuildEvent::Log { line, .. } if line.stream == kiln_model::LogStream::Debug => {
                        lines += 1
                    }
                    kiln_model::BuildEvent::Result { error, .. } => ended = error.is_none(),
                    _ => {}
                }
            }
            assert!(ended, "the build (debug: {debug}) failed");
            lines
        })
    };
    assert_eq!(debug_lines(false), 0);
    assert!(debug_lines(true) > 0);
    daemon.stop();
}
