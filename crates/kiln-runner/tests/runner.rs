//! Runs the real `kiln-runner` binary on a busybox root filesystem (as root).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_runner_spec::{Limits, Network, RunMount, RunMountKind, RunResult, RunSpec};

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// A root filesystem holding a static busybox and its applets, nothing else.
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        kiln_testkit::busybox_rootfs(&dir.path().join("rootfs"));
        Sandbox { dir }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn state_root(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn spec(&self, id: &str, script: &str) -> RunSpec {
        RunSpec {
            id: id.to_string(),
            state_root: self.state_root(),
            rootfs: self.rootfs(),
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into(), "GREETING=hi there".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: vec![0],
            hostname: "buildkitsandbox".into(),
            network: Network::None,
            insecure: false,
            mounts: Vec::new(),
            limits: Limits::default(),
            cgroup_parent: "/kiln-runner-test".into(),
            timeout_ms: Some(20_000),
        }
    }

    /// Starts a runner and hands it the spec on its standard input, as the worker does.
    fn spawn(&self, spec: &RunSpec) -> (std::process::Child, PathBuf) {
        self.spawn_with(spec, runner_command)
    }

    /// [`Sandbox::spawn`] with the runner started by `command` (given the result's path).
    fn spawn_with(&self, spec: &RunSpec, command: fn(&Path) -> Command) -> (std::process::Child, PathBuf) {
        let result_path = self.dir.path().join(format!("{}.result", spec.id));
        let mut child = command(&result_path).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&serde_json::to_vec(spec).unwrap()).unwrap();
        drop(stdin);
        (child, result_path)
    }

    fn run(&self, spec: &RunSpec) -> (RunResult, String, String) {
        self.run_with(spec, runner_command)
    }

    /// Runs `spec` to its end on a runner started by `command`.
    fn run_with(&self, spec: &RunSpec, command: fn(&Path) -> Command) -> (RunResult, String, String) {
        let (child, result_path) = self.spawn_with(spec, command);
        let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        assert!(status.success(), "runner failed: {stderr}");
        let result = serde_json::from_slice(&std::fs::read(result_path).unwrap()).unwrap();
        (result, String::from_utf8_lossy(&stdout).into_owned(), stderr)
    }

    /// Nothing of any container is left in the state root.
    fn assert_clean(&self) {
        for sub in ["c", "b"] {
            let dir = self.state_root().join(sub);
            let left: Vec<_> =
                std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
            assert!(left.is_empty(), "left behind in {}: {left:?}", dir.display());
        }
    }
}

/// `kiln-runner run --spec - --result RESULT` with piped standard streams.
fn runner_command(result: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln-runner"));
    command
        .args(["run", "--spec", "-", "--result"])
        .arg(result)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// [`runner_command`] on what looks to the runner like a cgroup v2 host: its own mount
/// namespace with the unified hierarchy mounted at `/sys/fs/cgroup`, this machine's v1
/// hierarchies out of its sight. libcontainer then makes the step's cgroup there, and only
/// there (a device program restricts what runs in a cgroup v2 directory on a hybrid host as
/// on a v2 one).
fn runner_on_cgroup_v2(result: &Path) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" run --spec - --result \"$1\"")
        .arg(env!("CARGO_BIN_EXE_kiln-runner"))
        .arg(result)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn wait_for(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_runner_whose_spec_never_comes_exits_quietly() {
    let sandbox = Sandbox::new();
    let result = sandbox.dir.path().join("never.result");
    let mut child = runner_command(&result).spawn().unwrap();
    drop(child.stdin.take());
    let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&stderr));
    assert!(stdout.is_empty() && stderr.is_empty());
    assert!(!result.exists());
}

#[test]
fn exit_code_output_user_env_and_cwd_come_through() {
    let sandbox = Sandbox::new();
    std::fs::create_dir_all(sandbox.rootfs().join("work")).unwrap();
    let mut spec =
        sandbox.spec("basics", "echo \"$GREETING\"; id -u; id -g; id -G; pwd; hostname; echo oops >&2; exit 7");
    spec.cwd = "/work".into();
    spec.uid = 1000;
    spec.gid = 1001;
    spec.additional_gids = vec![1001, 2000];
    let (result, stdout, stderr) = sandbox.run(&spec);
    assert_eq!(result.exit_code, 7);
    assert_eq!((result.signal, result.timed_out), (None, false));
    assert_eq!(stdout, "hi there\n1000\n1001\n1001 2000\n/work\nbuildkitsandbox\n");
    assert_eq!(stderr, "oops\n");
    sandbox.assert_clean();
}

#[test]
fn network_none_has_only_loopback_and_it_is_up() {
    let sandbox = Sandbox::new();
    // The client connects once the listener is in LISTEN state (port 4000 is 0FA0 in
    // /proc/net/tcp or tcp6), however long a busy machine takes to start it. Its input is a
    // file, readable at once: busybox nc half-closes at the end of its stdin, and a client
    // whose input was still being written could see the listener's end first and quit
    // without sending.
    let script = "ls /sys/class/net; cat /sys/class/net/lo/operstate; echo ping > /tmp/ping; \
                  nc -l -p 4000 > /tmp/got < /dev/null & \
                  until grep -qsE ':0FA0 [0-9A-F]+:0000 0A' /proc/net/tcp /proc/net/tcp6; do sleep 0.01; done; \
                  nc 127.0.0.1 4000 < /tmp/ping; wait; cat /tmp/got";
    let mut spec = sandbox.spec("netnone", script);
    spec.mounts.push(RunMount { target: "/tmp".into(), kind: RunMountKind::Tmpfs { size: Some(1 << 20) } });
    let (result, stdout, stderr) = sandbox.run(&spec);
    assert_eq!(result.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "lo\nunknown\nping\n");

    let mut spec = sandbox.spec("networker", "ls /sys/class/net | wc -l");
    spec.network = Network::Worker;
    let (_, stdout, _) = sandbox.run(&spec);
    let host_interfaces = std::fs::read_dir("/sys/class/net").unwrap().count();
    assert_eq!(stdout.trim(), host_interfaces.to_string());
    sandbox.assert_clean();
}

#[test]
fn insecure_steps_get_the_privileges_the_runner_holds() {
    let sandbox = Sandbox::new();
    let mut spec = sandbox.spec("insecure", "grep -E '^Cap(Eff|Bnd)' /proc/self/status");
    spec.insecure = true;
    let (result, stdout, stderr) = sandbox.run(&spec);
    assert_eq!(result.exit_code, 0, "{stderr}");
    let mask = |name: &str, text: &str| {
        let line = text.lines().find_map(|l| l.strip_prefix(name)).unwrap();
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    let ours = mask("CapBnd:", &std::fs::read_to_string("/proc/self/status").unwrap());
    let effective = mask("CapEff:", &stdout);
    // CAP_SYS_ADMIN is granted, and nothing the runner's bounding set lacks.
    assert_ne!(effective & (1 << 21), 0, "{stdout}");
    assert_eq!(effective & !ours, 0, "{stdout}");
    sandbox.assert_clean();
}

#[test]
fn on_a_cgroup_v2_host_a_sandboxed_step_opens_only_the_usual_devices() {
    let sandbox = Sandbox::new();
    // A node for the loop device may be made, as on a v1 host; opening it is the probe.
    let script = "rm -f /probe-loop && mknod /probe-loop b 7 0 && if (exec 3< /probe-loop); then echo disk opened; \
                  else echo disk refused; fi; head -c 1 /dev/urandom > /dev/null && : > /dev/null && echo usual used";
    let mut spec = sandbox.spec("v2-devices", script);
    spec.cgroup_parent = "/kiln-runner-test-v2".into();
    let (result, stdout, stderr) = sandbox.run_with(&spec, runner_on_cgroup_v2);
    assert_eq!(result.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "disk refused\nusual used\n");
    // Refused by the device program, not by anything else of the sandbox.
    assert!(stderr.contains("/probe-loop: Operation not permitted"), "{stderr}");

    spec.id = "v2-devices-insecure".into();
    spec.insecure = true;
    let (result, stdout, stderr) = sandbox.run_with(&spec, runner_on_cgroup_v2);
    assert_eq!(result.exit_code, 0, "{stderr}");
    assert_eq!(stdout, "disk opened\nusual used\n");
    sandbox.assert_clean();
    // The parent libcontainer made in the unified hierarchy (of a hybrid host, or of a v2
    // one): it can be removed only if the steps' own cgroups are gone.
    let parents = ["/sys/fs/cgroup/unified/kiln-runner-test-v2", "/sys/fs/cgroup/kiln-runner-test-v2"];
    assert!(parents.iter().any(|parent| std::fs::remove_dir(parent).is_ok()), "a step's cgroup is left");
}

#[test]
fn pids_and_memory_limits_are_enforced() {
    let sandbox = Sandbox::new();
    // Eight children alive at once (they are killed, never awaited), however slow the machine.
    let script = "p=''; for i in 1 2 3 4 5 6 7 8; do sleep 100 & p=\"$p $!\"; done; kill $p; wait";
    let (_, _, stderr) = sandbox.run(&sandbox.spec("unlimited", script));
    assert!(!stderr.contains("can't fork"), "{stderr}");
    let mut spec = sandbox.spec("pids", script);
    spec.limits.pids = Some(4);
    let (_, _, stderr) = sandbox.run(&spec);
    assert!(stderr.contains("can't fork"), "{stderr}");

    let mut spec = sandbox.spec("memory", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived");
    spec.limits.memory_bytes = Some(32 << 20);
    let (result, stdout, _) = sandbox.run(&spec);
    assert_ne!(result.exit_code, 0);
    assert!(!stdout.contains("survived"));
    sandbox.assert_clean();
}

#[test]
fn the_step_starts_with_sigpipe_at_its_default_and_no_signal_blocked() {
    let sandbox = Sandbox::new();
    // `yes` ends when `head` stops reading only if SIGPIPE kills it: a step that inherited
    // the runner's ignored SIGPIPE would loop until the timeout.
    let spec = sandbox.spec("signals", "yes kiln | head -c 10; echo; exec grep -E '^Sig(Ign|Blk)' /proc/self/status");
    let (result, stdout, _) = sandbox.run(&spec);
    assert_eq!((result.exit_code, result.timed_out), (0, false), "{stdout}");
    let mask = |name: &str| {
        let line = stdout.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("{name} in {stdout}"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    assert!(stdout.starts_with("kiln\nkiln\n"), "{stdout}");
    assert_eq!(mask("SigIgn:") & (1 << (13 - 1)), 0, "SIGPIPE is ignored: {stdout}");
    assert_eq!(mask("SigBlk:"), 0, "{stdout}");
    sandbox.assert_clean();
}

#[test]
fn timeout_kills_the_step() {
    let sandbox = Sandbox::new();
    let mut spec = sandbox.spec("timeout", "sleep 30");
    spec.timeout_ms = Some(300);
    let started = Instant::now();
    let (result, _, _) = sandbox.run(&spec);
    assert!(result.timed_out);
    assert_eq!(result.signal, Some(9));
    assert_eq!(result.exit_code, 137);
    assert!(started.elapsed() < Duration::from_secs(10));
    sandbox.assert_clean();
}

#[test]
fn mounts_bind_read_only_and_tmpfs() {
    let sandbox = Sandbox::new();
    let shared = sandbox.dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("input"), "from the host\n").unwrap();
    let mut spec = sandbox.spec(
        "mounts",
        "cat /src/input; touch /src/new 2>/dev/null || echo read-only; \
                                           echo scratch > /scratch/f && cat /scratch/f",
    );
    spec.mounts
        .push(RunMount { target: "/src".into(), kind: RunMountKind::Bind { source: shared.clone(), readonly: true } });
    spec.mounts.push(RunMount { target: "/scratch".into(), kind: RunMountKind::Tmpfs { size: None } });
    let (result, stdout, _) = sandbox.run(&spec);
    assert_eq!(result.exit_code, 0);
    assert_eq!(stdout, "from the host\nread-only\nscratch\n");
    assert!(!shared.join("new").exists());
    sandbox.assert_clean();
}

fn cgroup_exists(parent: &str, id: &str) -> bool {
    ["pids", "memory", "unified"].iter().any(|c| Path::new(&format!("/sys/fs/cgroup/{c}{parent}/{id}")).exists())
}

/// Kills the runner in the middle of its step, then runs `kiln-runner cleanup`, as the worker
/// does for a runner that did not finish.
fn kill_and_clean_up(sandbox: &Sandbox, mut runner: std::process::Child) {
    runner.kill().unwrap();
    runner.wait().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_kiln-runner"))
        .args(["cleanup", "--state-root"])
        .arg(sandbox.state_root())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn cleanup_removes_what_a_killed_runner_left() {
    let sandbox = Sandbox::new();
    let mut spec = sandbox.spec("orphan", "echo started; exec sleep 60");
    spec.cgroup_parent = "/kiln-runner-test-orphan".into();
    let (child, _) = sandbox.spawn(&spec);
    let state = sandbox.state_root().join("c/orphan");
    wait_for("the container to start", || {
        state.join("state.json").exists() && cgroup_exists(&spec.cgroup_parent, "orphan")
    });
    kill_and_clean_up(&sandbox, child);
    sandbox.assert_clean();
    assert!(!cgroup_exists(&spec.cgroup_parent, "orphan"), "cgroup left behind");
}

#[test]
fn the_step_is_alone_in_its_cgroup_and_the_runner_is_not_in_it() {
    let sandbox = Sandbox::new();
    let mut spec = sandbox.spec("member", "exec sleep 60");
    spec.cgroup_parent = "/kiln-runner-test-member".into();
    let (child, _) = sandbox.spawn(&spec);
    let procs: Vec<PathBuf> = ["pids", "memory", "unified"]
        .iter()
        .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}{}/member/cgroup.procs", spec.cgroup_parent)))
        .collect();
    let members = |file: &Path| -> Vec<String> {
        std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_string).collect()
    };
    // The step's command is running once its process has exec'd sleep.
    wait_for("the step to start", || {
        procs
            .iter()
            .flat_map(|f| members(f))
            .any(|pid| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with("sleep")))
    });
    let runner = child.id().to_string();
    for file in procs.iter().filter(|f| f.exists()) {
        let pids = members(file);
        assert_eq!(pids.len(), 1, "{}: {pids:?}", file.display());
        assert_ne!(pids[0], runner, "{}: the runner is in the step's cgroup", file.display());
    }
    kill_and_clean_up(&sandbox, child);
    assert!(!cgroup_exists(&spec.cgroup_parent, "member"), "cgroup left behind");
}

#[test]
fn a_missing_command_is_a_runner_error() {
    let sandbox = Sandbox::new();
    let mut spec = sandbox.spec("missing", "");
    spec.args = vec!["/no/such/binary".into()];
    let (child, _) = sandbox.spawn(&spec);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(kiln_runner_spec::RUNNER_FAILED));
    assert!(String::from_utf8_lossy(&output.stderr).contains("kiln-runner:"));
    sandbox.assert_clean();
}
