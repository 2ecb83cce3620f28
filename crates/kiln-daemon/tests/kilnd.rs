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
    let runner = Path::new(env!("CARGO_BIN_EXE_kilnd")).with_file_name("kiln-runner");
    let daemon = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .arg("--standalone")
        .args(args)
        .arg("--root")
        .arg(root)
        .env("KILN_RUNNER", &runner)
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
