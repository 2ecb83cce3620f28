//! Identity and transport: mutual TLS between the nodes, tokens for clients. Real
//! certificates from `kilnd certs`, real processes.

use super::hardening::{crafted_build_as, request, result_error, upload_as, wait_for_log};
use super::*;

/// The SHA-256 of a token, as a config holds it.
fn sha256(token: &str) -> String {
    kiln_types::Digest::of(token.as_bytes()).hex()
}

fn tokens() -> String {
    let entry = |name: &str, tenant: &str, role: &str, token: &str| {
        format!(
            "[[coordinator.tokens]]\nname = \"{name}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            sha256(token)
        )
    };
    entry("ci-team-a", "team-a", "build", "build-secret") + &entry("ops", "ops", "admin", "admin-secret")
}

#[test]
fn clients_need_a_known_token_and_nodes_a_certificate_for_their_name() {
    let mut cluster = Cluster::start_as(23, &["linux/amd64"], 2, &tokens(), Some("admin-secret"));
    let with_token = |token: Option<&str>, args: &[&str]| {
        let mut command = cluster.kiln(args);
        command.env_remove("KILN_TOKEN");
        if let Some(token) = token {
            command.arg("--token").arg(token);
        }
        command.output().unwrap()
    };

    // No token, or a token the coordinator does not know: refused, saying what to pass.
    for (token, expected) in
        [(None, "needs a token: pass --token TOKEN or set KILN_TOKEN"), (Some("guess"), "knows no such token")]
    {
        let out = with_token(token, &["workers"]);
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{token:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    // A build token builds, but may not list the fleet.
    let out = with_token(Some("build-secret"), &["workers"]);
    assert!(text(&out.stderr).contains("listing the workers needs an admin token"), "{}", text(&out.stderr));
    let context = cluster.context("app", "FROM BASE\nRUN echo hello > /greeting\n");
    let dest = cluster.dir.path().join("out");
    let local = format!("type=local,dest={}", dest.display());
    let out = with_token(Some("build-secret"), &["build", context.to_str().unwrap(), "-o", &local]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), cluster.logs());
    assert_eq!(std::fs::read_to_string(dest.join("greeting")).unwrap(), "hello\n");

    // Without the CA the client cannot check the coordinator; over plain HTTP the TLS
    // listener does not answer.
    let mut no_ca = Command::new(workspace_binary("kiln"));
    no_ca.args(["--addr", &cluster.addr(), "--token", "admin-secret", "workers"]).env_remove("KILN_TLS_CA");
    let out = no_ca.env_remove("KILN_ADDR").output().unwrap();
    assert!(text(&out.stderr).contains("https:// needs the CA"), "{}", text(&out.stderr));
    let plain = cluster.addr().replace("https://", "http://");
    let out = with_token(Some("admin-secret"), &["--addr", &plain, "workers"]);
    assert!(!out.status.success());

    // A worker whose certificate another CA signed never registers.
    let foreign = cluster.dir.path().join("foreign");
    let out = Command::new(workspace_binary("kilnd"))
        .args(["certs", "--out", foreign.to_str().unwrap(), "--names", "rogue", "--hosts", "127.0.23.3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rogue_tls = format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/rogue.pem\"\nkey = \"{0}/rogue-key.pem\"\n",
        foreign.display()
    );
    cluster.start_worker_raw("rogue", 3, "linux/amd64", &rogue_tls);
    wait_for_log(&cluster, "rogue-3.log", "cannot connect to https://127.0.23.1:7070");

    // A worker with a certificate of the cluster's CA, issued for another name, cannot
    // register under the first worker's name.
    let own = certificate(cluster.dir.path(), "impostor", "127.0.23.4");
    cluster.start_worker_raw("w1-linux-amd64", 4, "linux/amd64", &own);
    wait_for_log(&cluster, "w1-linux-amd64-4.log", "its certificate is not valid for that name");
    let names: Vec<String> = cluster.workers_json().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["w1-linux-amd64"]);
    let listed = &cluster.workers_json()[0];
    assert_eq!(listed["address"], "https://127.0.23.2:7071", "the original worker keeps its name");
}

#[test]
fn entitled_steps_run_only_where_a_worker_grants_them_and_the_client_asked() {
    let mut cluster = Cluster::start(24, &["linux/amd64"], 2, "");
    cluster.start_worker_with("granting", 3, "linux/amd64", 2, "entitlements = [\"security.insecure\"]");
    cluster.wait_for_workers(2);
    let caps = "RUN grep CapEff /proc/self/status > /caps";
    let dockerfile = format!("FROM BASE\n{caps}\nRUN --security=insecure grep CapEff /proc/self/status > /insecure\n");
    let context = cluster.context("insecure", &dockerfile);
    let dest = cluster.dir.path().join("insecure-out");
    let local = format!("type=local,dest={}", dest.display());

    // Not asked for: refused before anything runs.
    let out = cluster.run(&["build", context.to_str().unwrap(), "--progress", "plain", "-o", &local]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("needs `--allow security.insecure`"), "{}", text(&out.stderr));
    assert!(!dest.exists());

    // Asked for: the step runs on the one worker that grants it, with more capabilities.
    let metadata = cluster.build(&context, &["--allow", "security.insecure", "-o", &local]);
    let insecure = metadata["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str().unwrap().contains("--security=insecure"))
        .unwrap();
    assert_eq!(insecure["worker"], "granting", "{metadata}");
    let effective = |file: &str| std::fs::read_to_string(dest.join(file)).unwrap();
    assert_ne!(effective("caps"), effective("insecure"), "insecure gets more capabilities");

    // No worker grants network.host.
    let host = cluster.context("host", "FROM BASE\nRUN --network=host true\n");
    let out = cluster.run(&["build", host.to_str().unwrap(), "--allow", "network.host"]);
    assert!(
        text(&out.stderr).contains("network.host is not granted by any worker for linux/amd64"),
        "{}",
        text(&out.stderr)
    );
}

/// Tokens of three build tenants (team-c shares team-a's cache group) and an admin.
fn tenant_tokens() -> String {
    let entry = |tenant: &str, role: &str| {
        format!(
            "[[coordinator.tokens]]\nname = \"{tenant}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            sha256(&format!("{tenant}-token"))
        )
    };
    let policies = "[coordinator.tenants.team-b]\nmax-builds = 1\nmax-upload = \"64KiB\"\nmax-stored = \"96KiB\"\n\
                    [coordinator.tenants.team-c]\ncache-group = \"team-a\"\n";
    entry("team-a", "build") + &entry("team-b", "build") + &entry("team-c", "build") + &entry("ops", "admin") + policies
}

/// `kiln build CONTEXT --metadata-file METADATA -o type=local,dest=OUT` as `tenant`, stderr
/// piped.
fn spawn_build_as(cluster: &Cluster, tenant: &str, context: &Path, metadata: &Path, out: &Path) -> Child {
    let mut child = cluster.kiln(&[]);
    let local = format!("type=local,dest={}", out.display());
    child.args(["build", context.to_str().unwrap(), "--progress", "plain", "-o", &local]);
    child.arg("--metadata-file").arg(metadata).env("KILN_TOKEN", format!("{tenant}-token"));
    child.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Builds as `tenant`: the metadata and the output directory.
fn build_as(cluster: &Cluster, tenant: &str, context: &Path) -> (Value, PathBuf) {
    let (metadata, out) = (
        cluster.dir.path().join(format!("meta-{}.json", unique())),
        cluster.dir.path().join(format!("out-{}", unique())),
    );
    let output = spawn_build_as(cluster, tenant, context, &metadata, &out).wait_with_output().unwrap();
    assert!(output.status.success(), "{tenant}: {}\n{}", text(&output.stderr), cluster.logs());
    (read_json(&metadata), out)
}

#[test]
fn tenants_share_no_results_or_uploads_unless_grouped_and_stay_within_their_limits() {
    let cluster = Cluster::start_as(26, &["linux/amd64"], 4, &tenant_tokens(), Some("ops-token"));
    let dockerfile = "FROM BASE\nCOPY note /note\nRUN sleep 2 && cat /proc/sys/kernel/random/uuid > /shared\n";
    let contexts: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|t| {
            let context = cluster.context(&format!("same-{t}"), dockerfile);
            std::fs::write(context.join("note"), "the same context\n").unwrap();
            context
        })
        .collect();

    // team-a and team-b build the same thing at once: two executions, neither waits on or
    // reports the other's vertex.
    let (meta_a, out_a) = (cluster.dir.path().join("a.json"), cluster.dir.path().join("a-out"));
    let (meta_b, out_b) = (cluster.dir.path().join("b.json"), cluster.dir.path().join("b-out"));
    let first = spawn_build_as(&cluster, "team-a", &contexts[0], &meta_a, &out_a);
    cluster.busy_worker();
    let second = spawn_build_as(&cluster, "team-b", &contexts[1], &meta_b, &out_b);
    for (tenant, child) in [("team-a", first), ("team-b", second)] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{tenant}: {}\n{}", text(&output.stderr), cluster.logs());
    }
    for metadata in [&meta_a, &meta_b] {
        let metadata = read_json(metadata);
        assert_eq!(record(&metadata, "RUN sleep 2")["status"], "executed", "{metadata:#}");
        let statuses: Vec<&str> =
            metadata["vertices"].as_array().unwrap().iter().map(|v| v["status"].as_str().unwrap()).collect();
        assert!(!statuses.contains(&"deduplicated") && !statuses.contains(&"cached"), "{statuses:?}");
    }
    let shared = |out: &Path| std::fs::read_to_string(out.join("shared")).unwrap();
    assert_ne!(shared(&out_a), shared(&out_b), "each tenant computed its own result");

    // team-c shares team-a's cache group: a hit on team-a's result. team-b hits its own.
    let (metadata, out) = build_as(&cluster, "team-c", &contexts[2]);
    assert_eq!(record(&metadata, "RUN sleep 2")["status"], "cached", "{metadata:#}");
    assert_eq!(shared(&out), shared(&out_a));
    let (metadata, out) = build_as(&cluster, "team-b", &contexts[1]);
    assert_eq!(record(&metadata, "RUN sleep 2")["status"], "cached", "{metadata:#}");
    assert_eq!(shared(&out), shared(&out_b));

    // team-a's uploaded file: team-b cannot build from it by digest, and must send the
    // bytes itself; team-c (same group) need not.
    let private = cluster.dir.path().join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("only-a"), format!("team-a's file {}\n", unique())).unwrap();
    let (manifest, sent) = upload_as(&cluster, Some("team-a-token"), &private);
    assert_eq!(sent.uploaded_files, 1);
    let copy = |manifest| request("FROM scratch\nCOPY only-a /\n", Some(manifest), &[]);
    let events = crafted_build_as(&cluster, Some("team-b-token"), copy(manifest.clone())).unwrap();
    let error = result_error(&events).unwrap_or_default();
    assert!(error.contains("only-a") && error.contains("was not uploaded"), "{error}");
    assert_eq!(upload_as(&cluster, Some("team-c-token"), &private).1.uploaded_files, 0, "same group");
    assert_eq!(upload_as(&cluster, Some("team-b-token"), &private).1.uploaded_files, 1, "team-b sends it");
    let events = crafted_build_as(&cluster, Some("team-b-token"), copy(manifest)).unwrap();
    assert_eq!(result_error(&events), None);

    // A cache mount is the cache group's: team-b neither sees nor shares team-a's files.
    let writer =
        cluster.context("cache-writer", "FROM BASE\nRUN --mount=type=cache,target=/cache echo a > /cache/mark\n");
    build_as(&cluster, "team-a", &writer);
    let reader = "FROM BASE\nRUN --mount=type=cache,target=/cache cat /cache/mark > /seen || echo nothing > /seen\n";
    for (tenant, expected) in [("team-b", "nothing\n"), ("team-c", "a\n")] {
        let context = cluster.context(&format!("cache-reader-{tenant}"), reader);
        let (_, out) = build_as(&cluster, tenant, &context);
        assert_eq!(std::fs::read_to_string(out.join("seen")).unwrap(), expected, "{tenant}");
    }

    // team-b's limits: a context over max-upload, and a second build while one is in
    // progress, are refused on one line.
    let big = cluster.context("big", "FROM scratch\nCOPY big /\n");
    std::fs::write(big.join("big"), vec![7u8; 100 << 10]).unwrap();
    let output = spawn_build_as(
        &cluster,
        "team-b",
        &big,
        &cluster.dir.path().join("big.json"),
        &cluster.dir.path().join("big-out"),
    )
    .wait_with_output()
    .unwrap();
    let stderr = text(&output.stderr);
    assert!(!output.status.success() && stderr.contains("max-upload"), "{stderr}");
    // Each 60 KiB context fits max-upload; the second would keep more than max-stored.
    for (n, fits) in [(1, true), (2, false)] {
        let context = cluster.context(&format!("stored-{n}"), "FROM scratch\nCOPY data /\n");
        std::fs::write(context.join("data"), vec![n as u8; 60 << 10]).unwrap();
        let (metadata, out) = (cluster.dir.path().join(format!("s{n}.json")), cluster.dir.path().join(format!("s{n}")));
        let output = spawn_build_as(&cluster, "team-b", &context, &metadata, &out).wait_with_output().unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.success(), fits, "{stderr}");
        assert!(fits || stderr.contains("(max-stored)"), "{stderr}");
    }
    let long = cluster.context("long", "FROM BASE\nRUN sleep 120\n");
    let mut running = spawn_build_as(
        &cluster,
        "team-b",
        &long,
        &cluster.dir.path().join("long.json"),
        &cluster.dir.path().join("long-out"),
    );
    cluster.busy_worker();
    let output = spawn_build_as(
        &cluster,
        "team-b",
        &contexts[1],
        &cluster.dir.path().join("c.json"),
        &cluster.dir.path().join("c-out"),
    )
    .wait_with_output()
    .unwrap();
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("has 1 builds in progress, its limit (max-builds)"),
        "{stderr}"
    );
    // Other tenants are not limited by team-b's builds.
    let (metadata, _) = build_as(&cluster, "team-a", &contexts[0]);
    assert_eq!(metadata["status"], "succeeded");
    running.kill().unwrap();
    running.wait().unwrap();
}

/// A host outside the worker, in a network namespace of the test's: `10.250.NET.2`, with
/// the link-local metadata address `169.254.169.254` too, serving `DIR/hello` over HTTP on
/// port 8080. The worker's host routes to it.
struct OutsideHost {
    namespace: String,
    server: Child,
}

impl OutsideHost {
    fn start(net: u8, dir: &Path) -> OutsideHost {
        let namespace = format!("kiln-test-outside-{net}");
        let (outer, inner) = (format!("kto{net}"), format!("kti{net}"));
        let (host, outside) = (format!("10.250.{net}.1"), format!("10.250.{net}.2"));
        let _ = Command::new("ip").args(["netns", "del", &namespace]).output();
        let _ = Command::new("ip").args(["route", "del", "169.254.169.254/32"]).output();
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
        };
        ip(&["netns", "add", &namespace]);
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &namespace]);
        ip(&["addr", "add", &format!("{host}/24"), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ip(&["-n", &namespace, "addr", "add", &format!("{outside}/24"), "dev", &inner]);
        ip(&["-n", &namespace, "addr", "add", "169.254.169.254/32", "dev", &inner]);
        ip(&["-n", &namespace, "link", "set", &inner, "up"]);
        ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        ip(&["-n", &namespace, "route", "add", "default", "via", &host]);
        ip(&["route", "add", "169.254.169.254/32", "via", &outside]);
        std::fs::write(dir.join("hello"), "hello from outside\n").unwrap();
        let mut server = Command::new("ip")
            .args(["netns", "exec", &namespace, "python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"])
            .arg("--directory")
            .arg(dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Ready once it says it serves on stdout (the line comes after its listen()); an end
        // of its output first means it failed.
        let stdout = server.stdout.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let serving = lines.find(|line| line.as_ref().is_ok_and(|l| l.starts_with("Serving HTTP")));
        assert!(serving.is_some(), "the outside host's server did not start");
        // The host itself reaches both of its addresses: what the step cannot is the rules'.
        for address in [format!("{outside}:8080"), "169.254.169.254:8080".to_string()] {
            let address: std::net::SocketAddr = address.parse().unwrap();
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("the host cannot reach {address}: {e}"));
        }
        OutsideHost { namespace, server }
    }
}

impl Drop for OutsideHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["route", "del", "169.254.169.254/32"]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.namespace]).output();
    }
}

#[test]
fn a_run_step_reaches_outside_hosts_but_not_the_worker_the_coordinator_or_metadata() {
    let cluster = Cluster::start(27, &["linux/amd64"], 2, "");
    let served = cluster.dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let _outside = OutsideHost::start(27, &served);
    // A service of the worker's host on every address (the worker's own are on loopback).
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let targets = format!(
        "\"127.0.27.1 7070\" \"127.0.27.2 7071\" \"$gateway {port}\" \"10.250.27.1 {port}\" \"169.254.169.254 8080\""
    );
    let dockerfile = format!(
        "FROM BASE\nRUN wget -q -O /outside http://10.250.27.2:8080/hello\n\
         RUN gateway=$(ip route | awk '/default/ {{print $3}}') && for target in {targets}; do \
         if nc -w 3 $target </dev/null; then echo \"reached $target\"; else echo \"blocked $target\"; fi; done > /reach\n"
    );
    let context = cluster.context("network", &dockerfile);
    let dest = cluster.dir.path().join("network-out");
    cluster.build(&context, &["-o", &format!("type=local,dest={}", dest.display())]);
    assert_eq!(std::fs::read_to_string(dest.join("outside")).unwrap(), "hello from outside\n");
    let reach = std::fs::read_to_string(dest.join("reach")).unwrap();
    assert_eq!(reach.lines().count(), 5, "{reach}");
    assert!(reach.lines().all(|line| line.starts_with("blocked")), "{reach}");
    assert!(!reach.contains("blocked  "), "the step found its gateway: {reach}");
    drop(listener);
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if kind.is_file()
            && std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path);
        }
    }
    found
}

#[test]
fn a_secret_leaves_no_trace_in_state_directories_outputs_caches_or_logs() {
    let cluster = Cluster::start(25, &["linux/amd64"], 2, "");
    let marker = format!("kiln-secret-marker-{}", unique());
    let outside = tempfile::tempdir().unwrap();
    let source = outside.path().join("token");
    std::fs::write(&source, &marker).unwrap();
    let context = cluster.context(
        "secret",
        "FROM BASE\n\
         RUN --mount=type=secret,id=token sha256sum /run/secrets/token | cut -c1-64 > /digest\n\
         RUN --mount=type=secret,id=token stat -f -c %T /run/secrets/token > /fstype\n\
         RUN --mount=type=secret,id=token,env=TOKEN test -n \"$TOKEN\" && echo used > /used\n",
    );
    let out = cluster.dir.path().join("secret-out");
    let s3 = TestS3::start("kiln-secrets");
    let metadata = cluster.build(
        &context,
        &[
            "--secret",
            &format!("id=token,src={}", source.display()),
            "-o",
            &format!("type=local,dest={}", out.display()),
            "--cache-to",
            &format!("{},mode=max", s3.cache_spec("secrets")),
        ],
    );
    // The steps saw the secret.
    let digest = kiln_types::Digest::of(marker.as_bytes()).hex();
    assert_eq!(std::fs::read_to_string(out.join("digest")).unwrap().trim(), digest, "{metadata}");
    assert_eq!(std::fs::read_to_string(out.join("used")).unwrap(), "used\n");
    // The secret file the step saw lived on the worker's tmpfs, never on its disk.
    assert_eq!(std::fs::read_to_string(out.join("fstype")).unwrap().trim(), "tmpfs");
    // Nothing kept it: the coordinator's and the worker's state directories, their logs,
    // the metadata file, the output and the exported cache.
    let found = files_containing(cluster.dir.path(), marker.as_bytes());
    assert!(found.is_empty(), "the secret is in {found:?}");
    // Nor the workers' runtime directories (on /dev/shm: the runner's state, the steps'
    // files), which name their state directory.
    let runtimes: Vec<_> = std::fs::read_dir("/dev/shm/kiln")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|dir| {
            std::fs::read_to_string(dir.join("state-directory"))
                .is_ok_and(|state| std::path::Path::new(&state).starts_with(cluster.dir.path()))
        })
        .collect();
    assert!(!runtimes.is_empty(), "no runtime directory of the cluster's workers in /dev/shm/kiln");
    for runtime in runtimes {
        let found = files_containing(&runtime, marker.as_bytes());
        assert!(found.is_empty(), "the secret is in {found:?}");
    }
    assert!(!metadata.to_string().contains(&marker));
    let keys = s3.keys();
    assert!(keys.iter().any(|k| k == "manifests/secrets"), "{keys:?}");
    for key in keys {
        let mut object = s3.get(&key);
        if object.starts_with(&[0x1f, 0x8b]) {
            // A layer: its files, uncompressed.
            let mut tar = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&object[..]), &mut tar).unwrap();
            object = tar;
        }
        assert!(!object.windows(marker.len()).any(|w| w == marker.as_bytes()), "the secret is in the cache's {key}");
    }
}
