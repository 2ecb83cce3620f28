//! What the worker tells `kiln-runner` to run, and what the runner reports back.
//!
//! This crate holds only these plain data types and the way to find the executable, so
//! whatever names a step (the worker) never compiles libcontainer; the libcontainer half is
//! the `kiln-runner` package, a binary, because libcontainer forks and changes the process's
//! working directory, so it must never run inside the multi-threaded daemon (youki keeps
//! `libcontainer` and the `youki` binary apart likewise).
//!
//! Protocol: the worker starts `kiln-runner run --spec - --result FILE` with the step's
//! output pipes as stdout and stderr, ahead of the step, and later writes a [`RunSpec`] as
//! JSON to its standard input and closes it (`--spec FILE` reads a file instead; an empty
//! standard input makes the runner exit 0, having run nothing). While it waits, the runner
//! compiles the seccomp filter and finds the cgroup hierarchies. The container inherits
//! the output pipes, so output streams straight to the worker. The runner deletes the
//! container, writes a [`RunResult`] to the result file, points its stdout and stderr at
//! `/dev/null` (so the worker sees the pipes end without waiting for the process to exit)
//! and exits 0. A runner that closes its output without a result failed, and its last
//! stderr line says why. `kiln-runner cleanup --state-root
//! DIR [--id ID]` removes containers a killed runner left behind.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Exit code of the runner when it could not run the step at all.
pub const RUNNER_FAILED: i32 = 125;

/// One step to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Container id, unique on this worker (`[A-Za-z0-9_+.-]`).
    pub id: String,
    /// libcontainer's state directory.
    pub state_root: PathBuf,
    /// The root filesystem, already mounted (the overlay's merged directory).
    pub rootfs: PathBuf,
    /// argv.
    pub args: Vec<String>,
    /// Environment, `KEY=value`; must hold `PATH`.
    pub env: Vec<String>,
    /// Working directory inside the container; created by the worker beforehand.
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups (always set, so root's groups never leak in).
    pub additional_gids: Vec<u32>,
    /// Host name inside the container.
    pub hostname: String,
    /// Network namespace choice.
    pub network: Network,
    /// Extra privileges (`RUN --security=insecure`).
    pub insecure: bool,
    /// Mounts on top of the standard /proc, /dev and /sys.
    pub mounts: Vec<RunMount>,
    /// cgroup limits.
    pub limits: Limits,
    /// cgroup path prefix, e.g. `/kiln`; the container gets `PREFIX/ID`.
    pub cgroup_parent: String,
    /// Kill the step after this many milliseconds.
    pub timeout_ms: Option<u64>,
}

/// Which network namespace the step runs in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// The worker's own network namespace (`worker.default-network = "worker"`).
    Worker,
    /// A fresh namespace with only the loopback interface, up.
    None,
    /// The host's namespace; on a worker that is its own namespace too.
    Host,
    /// A namespace the worker prepared (its `ip netns` path): the default, isolated from
    /// the worker with outbound access.
    Namespace(PathBuf),
}

/// A mount inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunMount {
    /// Absolute path inside the container.
    pub target: String,
    /// What is mounted.
    pub kind: RunMountKind,
}

/// The kinds of mount a step can ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RunMountKind {
    /// A host path (file or directory) bound in.
    Bind {
        /// Host path.
        source: PathBuf,
        /// Mounted read-only.
        readonly: bool,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Size limit in bytes.
        size: Option<u64>,
    },
}

/// cgroup limits for one step; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory limit in bytes (swap is limited to the same amount).
    pub memory_bytes: Option<i64>,
    /// CPU quota in microseconds per 100 ms period (100000 = one core).
    pub cpu_quota_us: Option<i64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
}

/// How the step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// Exit code (128 + signal when killed by a signal).
    pub exit_code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Time from create to exit, in microseconds.
    pub elapsed_us: u64,
}

/// Finds the `kiln-runner` executable: `$KILN_RUNNER`, next to the current executable, or
/// one directory up (where cargo puts binaries relative to test executables).
pub fn locate() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_RUNNER") {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("kiln-runner"), dir.parent().unwrap_or(Path::new("/")).join("kiln-runner")]
        .into_iter()
        .find(|candidate| candidate.is_file())
}
