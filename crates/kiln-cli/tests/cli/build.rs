//! `kiln build` on the embedded default: the client starts `kilnd --standalone` in a fresh
//! state directory, real containers run, a real registry receives the image.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use kiln_testkit::{TestRegistry, workspace_binary};
use serde_json::Value;

/// A state directory whose embedded daemon is stopped at the end (and more of them, for
/// tests that need several daemons: each under its own name).
pub(crate) struct Setup {
    pub(crate) registry: TestRegistry,
    base: String,
    pub(crate) dir: tempfile::TempDir,
}

impl Setup {
    pub(crate) fn new() -> Setup {
        // `kiln` finds `kilnd` next to itself; `kilnd` finds `kiln-runner` the same way.
        workspace_binary("kilnd");
        workspace_binary("kiln-runner");
        let registry = TestRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let base = kiln_testkit::push_busybox(&registry, dir.path(), "kiln/busybox:cli");
        Setup { base, registry, dir }
    }

    /// The base image's reference.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Runs `kiln` against another embedded daemon, with its own state directory `name`.
    pub(crate) fn run_in(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(args).env("KILN_ROOT", self.dir.path().join(name)).env_remove("KILN_ADDR");
        command.envs(env.iter().copied()).output().unwrap()
    }

    pub(crate) fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let context = self.dir.path().join(name);
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), dockerfile.replace("BASE", &self.base)).unwrap();
        context
    }

    fn kiln(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(args).env("KILN_ROOT", self.root()).env_remove("KILN_ADDR");
        command
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.kiln(args).output().unwrap()
    }
}

impl Drop for Setup {
    /// Stops every embedded daemon started under the test's directory.
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return };
        for entry in entries.flatten() {
            stop_daemon(&entry.path());
        }
    }
}

/// Stops the embedded daemon rooted at `root`, if one runs, and waits (a while) for it to
/// exit. It is not this process's child, so its exit is seen in `/proc`.
pub(crate) fn stop_daemon(root: &Path) {
    let Ok(pid) = std::fs::read_to_string(root.join("kilnd.pid")) else { return };
    let _ = Command::new("kill").arg(pid.trim()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}", pid.trim())).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn read_metadata(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn statuses(metadata: &Value) -> Vec<String> {
    metadata["vertices"].as_array().unwrap().iter().map(|v| v["status"].as_str().unwrap().to_string()).collect()
}

#[test]
fn builds_report_progress_metadata_results_and_failures() {
    let setup = Setup::new();
    let context = setup.context(
        "app",
        "FROM BASE AS a\nRUN echo from-a > /a\nFROM BASE AS b\nRUN echo from-b > /b\nFROM BASE\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCMD [\"cat\", \"/a\"]\n",
    );
    let image = format!("{}/kiln/cli:v1", setup.registry.addr);
    let meta = setup.dir.path().join("meta.json");
    let context_arg = context.to_str().unwrap();
    let meta_arg = meta.to_str().unwrap();
    let out =
        setup.run(&["build", "--progress", "plain", "--metadata-file", meta_arg, "-t", &image, "--push", context_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("#1 ") && stderr.contains("DONE") && stderr.contains("pushing"), "{stderr}");

    let metadata = read_metadata(&meta);
    assert_eq!(metadata["status"], "succeeded");
    assert!(metadata["containerimage.digest"].as_str().unwrap().starts_with("sha256:"));
    for vertex in metadata["vertices"].as_array().unwrap() {
        for field in ["digest", "name", "kind", "stage", "status", "worker", "platform", "started", "completed"] {
            assert!(vertex.get(field).is_some_and(|v| !v.is_null()), "{field} missing in {vertex}");
        }
        assert!(vertex["started"].as_str().unwrap().ends_with('Z'), "RFC 3339: {vertex}");
    }
    assert!(statuses(&metadata).iter().all(|s| s == "executed"), "{metadata}");
    let inspect =
        Command::new("skopeo").args(["inspect", "--tls-verify=false", &format!("docker://{image}")]).output().unwrap();
    assert!(inspect.status.success(), "{}", text(&inspect.stderr));

    // A second build is fully cached; JSON progress is one object per line.
    let out = setup.run(&["build", "--progress", "json", "--metadata-file", meta_arg, context_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.lines().all(|line| serde_json::from_str::<Value>(line).is_ok()), "{stdout}");
    assert!(stdout.lines().any(|line| line.contains("\"type\":\"result\"")));
    assert!(statuses(&read_metadata(&meta)).iter().all(|s| s == "cached"), "{}", read_metadata(&meta));

    let failing = setup.context("failing", "FROM BASE\nRUN echo doomed-output && exit 3\n");
    let out = setup.run(&["build", "--progress", "plain", "--metadata-file", meta_arg, failing.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for expected in ["ERROR: failed to solve", "exit code: 3", "(line 2)", "doomed-output"] {
        assert!(stderr.contains(expected), "{expected:?} missing: {stderr}");
    }
    let failed = read_metadata(&meta);
    assert_eq!(failed["status"], "failed");

    // The daemon's history has the three builds, under the ids they printed at the end.
    let id = failed["build_id"].as_str().unwrap();
    assert!(stderr.contains(&format!("build id: {id}")), "{stderr}");
    let out = setup.run(&["history", "ls", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let history: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let counts = |b: &Value, outcome: &str| b["counts"][outcome].as_u64().unwrap();
    let statuses: Vec<(&str, u64, u64)> =
        history.iter().map(|b| (b["status"].as_str().unwrap(), counts(b, "executed"), counts(b, "failed"))).collect();
    assert_eq!(statuses, [("succeeded", 5, 0), ("succeeded", 0, 0), ("failed", 0, 1)], "{history:#?}");
    assert_eq!(history[2]["id"], id);
    assert!(history[2]["error"].as_str().unwrap().contains("exit code: 3"), "{history:#?}");
    assert!(history[1]["completed"].as_str().unwrap().ends_with('Z'), "RFC 3339: {history:#?}");

    // One build in full, its failing step's kept output, and its removal.
    let out = setup.run(&["history", "inspect", id, "--format", "json"]);
    let inspected: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    assert_eq!((inspected["status"].as_str(), inspected["submitted_by"].as_str()), (Some("failed"), Some("local")));
    assert!(inspected["dockerfile"].as_str().unwrap().contains("doomed-output"), "{inspected:#}");
    let failed_step = inspected["vertices"].as_array().unwrap().iter().find(|v| v["status"] == "failed").unwrap();
    assert!(failed_step["name"].as_str().unwrap().contains("RUN echo doomed-output"), "{inspected:#}");
    let out = setup.run(&["history", "logs", id, "doomed"]);
    assert!(text(&out.stdout).lines().any(|l| l == "doomed-output"), "{}{}", text(&out.stdout), text(&out.stderr));
    let out = setup.run(&["history", "rm", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = setup.run(&["history", "inspect", id]);
    assert!(!out.status.success() && text(&out.stderr).contains(&format!("build {id}: not in the history")));
    let out = setup.run(&["history", "ls", "--format", "json"]);
    assert_eq!(serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap().len(), 2);

    let out = setup.run(&["build", "--cache-to", "type=registry", context_arg]);
    assert!(
        !out.status.success()
            && text(&out.stderr).contains("--cache-to \"type=registry\": type=registry needs ref=REF")
    );
}

#[test]
fn concurrent_local_builds_share_one_daemon_and_one_execution() {
    let setup = Setup::new();
    let context = setup.context("shared", "FROM BASE\nRUN sleep 1 && echo shared > /shared\n");
    let children: Vec<_> = (0..3)
        .map(|i| {
            let meta = setup.dir.path().join(format!("meta-{i}.json"));
            let child = setup
                .kiln(&[
                    "build",
                    "--progress",
                    "plain",
                    "--metadata-file",
                    meta.to_str().unwrap(),
                    context.to_str().unwrap(),
                ])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (child, meta)
        })
        .collect();
    let mut runs = Vec::new();
    for (child, meta) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let metadata = read_metadata(&meta);
        let run = metadata["vertices"].as_array().unwrap().iter().find(|v| v["kind"] == "exec").unwrap().clone();
        runs.push((run["status"].as_str().unwrap().to_string(), metadata["build_id"].clone(), run));
    }
    runs.sort_by(|a, b| a.0.cmp(&b.0));
    let statuses: Vec<&str> = runs.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(statuses, ["deduplicated", "deduplicated", "executed"], "one execution for three builds");
    // A deduplicated step names the build that executed it, in the metadata and the history.
    let executor = runs[2].1.as_str().unwrap();
    for (_, id, run) in &runs[..2] {
        assert_eq!(run["deduplicated_from"], executor, "{run}");
        let out = setup.run(&["history", "inspect", id.as_str().unwrap(), "--format", "json"]);
        let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let step = inspected["vertices"].as_array().unwrap().iter().find(|v| v["kind"] == "exec").unwrap();
        assert_eq!(
            (step["status"].as_str(), step["deduplicated_from"].as_str()),
            (Some("deduplicated"), Some(executor))
        );
    }
    let daemons = Command::new("pgrep")
        .args(["-f", &format!("kilnd --standalone --root {}", setup.root().display())])
        .output()
        .unwrap();
    assert_eq!(text(&daemons.stdout).lines().count(), 1, "one embedded daemon");
}

#[test]
fn real_world_shaped_dockerfiles_build_as_buildkit_builds_them() {
    let setup = Setup::new();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/real-world");
    let base = format!("BASE={}", setup.base);
    let build = |name: &str| {
        let out = setup.dir.path().join(format!("{name}-out"));
        let context = fixtures.join(name);
        let local = format!("type=local,dest={}", out.display());
        let output = setup.run(&["build", context.to_str().unwrap(), "--build-arg", &base, "-o", &local]);
        assert!(output.status.success(), "{name}: {}", text(&output.stderr));
        out
    };
    // ARG and ENV values inherited from the base stage, a tool stage mounted at the working
    // directory, optional vendor files.
    let out = build("go-tools");
    assert_eq!(std::fs::read_to_string(out.join("usr/local/share/shfmt.txt")).unwrap(), "shfmt -mod=vendor\n");
    assert_eq!(
        std::fs::read_to_string(out.join("usr/local/share/built.txt")).unwrap(),
        "go1.22 amd64 noninteractive\n"
    );
    assert!(out.join("src/go.mod").exists());
    // Optional lock files, an unset --chown.
    let out = build("node-app");
    assert!(std::fs::read_to_string(out.join("app/installed.json")).unwrap().contains("\"app\""));
    assert_eq!(std::fs::read_to_string(out.join("app/src/index.js")).unwrap(), "console.log(\"hi\")\n");
    // Inherited ARG and ENV, an optional ssh mount left out, a heredoc, --chown and --chmod.
    let out = build("python-service");
    let resolved = std::fs::read_to_string(out.join("srv/app/resolved.txt")).unwrap();
    assert_eq!(resolved, "index https://pypi.example/simple ssh /run/buildkit/ssh_agent.0\nflask==3.0\n");
    use std::os::unix::fs::MetadataExt as _;
    let code = std::fs::metadata(out.join("srv/app/code")).unwrap();
    assert_eq!((code.mode() & 0o7777, code.uid(), code.gid()), (0o750, 1000, 1000));
    for fixture in ["go-tools", "node-app", "python-service"] {
        let (ok, _, stderr) = super::kiln(&["plan", fixtures.join(fixture).to_str().unwrap(), "--format", "json"]);
        assert!(ok, "{fixture}: {stderr}");
    }
}

/// Writes files whose names are not UTF-8 into `context`, returning the names' bytes.
pub(crate) fn non_utf8_files(context: &Path) -> [Vec<u8>; 2] {
    use std::os::unix::ffi::OsStrExt as _;
    let file = b"caf\xe9.txt".to_vec();
    let dir = b"d\xff".to_vec();
    std::fs::write(context.join(std::ffi::OsStr::from_bytes(&file)), "latin-1\n").unwrap();
    std::fs::create_dir(context.join(std::ffi::OsStr::from_bytes(&dir))).unwrap();
    std::fs::write(context.join(std::ffi::OsStr::from_bytes(&dir)).join("x"), "in dir\n").unwrap();
    [file, dir]
}

#[test]
fn context_names_that_are_not_utf8_are_kept_as_bytes() {
    use std::os::unix::ffi::OsStrExt as _;
    let setup = Setup::new();
    let context = setup.context("bytes", "FROM BASE\nCOPY . /ctx/\nCOPY caf*.txt /wild/\n");
    let [file, dir] = non_utf8_files(&context);
    let out = setup.dir.path().join("bytes-out");
    let local = format!("type=local,dest={}", out.display());
    let output = setup.run(&["build", context.to_str().unwrap(), "-o", &local]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let name = |dir: &str, bytes: &[u8]| out.join(dir).join(std::ffi::OsStr::from_bytes(bytes));
    assert_eq!(std::fs::read_to_string(name("ctx", &file)).unwrap(), "latin-1\n");
    assert_eq!(std::fs::read_to_string(name("ctx", &dir).join("x")).unwrap(), "in dir\n");
    assert_eq!(std::fs::read_to_string(name("wild", &file)).unwrap(), "latin-1\n");
}

#[test]
fn a_build_its_daemon_died_under_is_ended_in_the_history_by_the_next_daemon() {
    use std::io::BufRead as _;
    let setup = Setup::new();
    let context = setup.context("slow", "FROM BASE\nRUN sleep 20\n");
    let mut build = setup
        .kiln(&["build", "--progress", "plain", context.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The step runs: the build is in the history. Then the daemon dies under it.
    let stderr = std::io::BufReader::new(build.stderr.take().unwrap());
    let mut lines = stderr.lines().map_while(Result::ok);
    assert!(lines.any(|line| line.contains("RUN sleep 20")), "the step never started");
    let pid = std::fs::read_to_string(setup.root().join("kilnd.pid")).unwrap();
    assert!(Command::new("kill").args(["-KILL", pid.trim()]).status().unwrap().success());
    assert!(!build.wait().unwrap().success());
    // Gone (its store's lock released) before the next daemon opens the store.
    let gone = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{}", pid.trim())).exists() {
        assert!(Instant::now() < gone, "the daemon outlived its SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The next daemon (started by the next command) ends the entry nobody will finish.
    let deadline = Instant::now() + Duration::from_secs(60);
    let entry = loop {
        let out = setup.run(&["history", "ls", "--format", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let history: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(history.len(), 1, "{history:#?}");
        if history[0]["status"] != "running" || Instant::now() > deadline {
            break history[0].clone();
        }
        // The history offers no event to wait on.
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(entry["status"], "failed", "{entry:#}");
    assert_eq!(entry["error"], "the daemon stopped before the build finished", "{entry:#}");
}
