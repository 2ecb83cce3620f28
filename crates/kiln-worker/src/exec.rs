//! Exec vertices: a container over an overlay of the rootfs chain, run by `kiln-runner`.
//!
//! Helper errors are messages naming the mount, file or limit; `exec` wraps them with the
//! vertex into `WorkerError::Failed` (a step that ran and failed is `StepFailed`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_graph::{ExecOp, NetworkMode, SecurityMode};
use kiln_layer::resolve_in_root;
use kiln_runner_spec::{Network, RunMount, RunMountKind, RunResult, RunSpec};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWriteExt as _, BufReader};

use crate::user::resolve_user;
use crate::{
    BuildInputs, LogLine, LogSink, LogStream, Mounted, Snapshot, Worker, WorkerError, blocking, blocking_in_drop, chain,
};

/// Output lines kept for the error message of a failed step.
const TAIL_LINES: usize = 20;
/// Paths the runtime mounts over in every container.
const RUNTIME_TARGETS: [&str; 5] = ["/proc", "/dev", "/sys", "/etc/hosts", "/etc/resolv.conf"];
const HOSTS: &str = "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Removes the step directory (secrets, hosts files) however the step ends.
struct StepDir(PathBuf);

impl Drop for StepDir {
    fn drop(&mut self) {
        let dir = &self.0;
        blocking_in_drop(|| drop(std::fs::remove_dir_all(dir)));
    }
}

/// A tmpfs at `STEP/secrets`, for a step that mounts secrets: the secret files and the
/// container's state (libcontainer keeps its config, whose environment may hold a secret)
/// never reach a disk. Unmounted (lazily,
/// off the async threads) before the step directory is removed.
struct SecretsTmpfs(PathBuf);

impl SecretsTmpfs {
    fn mount(step_dir: &Path) -> Result<SecretsTmpfs, String> {
        use nix::mount::MsFlags;
        let dir = step_dir.join("secrets");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        nix::mount::mount(Some("tmpfs"), &dir, Some("tmpfs"), flags, Some("size=64m,mode=0700"))
            .map_err(|e| format!("mounting a tmpfs for the step's secrets at {}: {e}", dir.display()))?;
        Ok(SecretsTmpfs(dir))
    }
}

impl Drop for SecretsTmpfs {
    fn drop(&mut self) {
        let dir = &self.0;
        blocking_in_drop(|| {
            let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        });
    }
}

/// Deletes the step's container if the runner did not finish (killed or cancelled), and the
/// runner's result file whatever happened.
struct RunnerGuard {
    runner: PathBuf,
    state_root: PathBuf,
    id: String,
    result: PathBuf,
    finished: bool,
}

impl Drop for RunnerGuard {
    fn drop(&mut self) {
        blocking_in_drop(|| {
            if !self.finished {
                let _ = std::process::Command::new(&self.runner)
                    .args(["cleanup", "--id", &self.id, "--state-root"])
                    .arg(&self.state_root)
                    .status();
            }
            let _ = std::fs::remove_file(&self.result);
        });
    }
}

impl Worker {
    pub(crate) async fn exec(
        &self,
        exec: &ExecOp,
        inputs: &[Snapshot],
        build: &BuildInputs,
        logs: Option<&LogSink>,
        name: &str,
    ) -> Result<Snapshot, WorkerError> {
        let fail = |message: String| WorkerError::Failed { vertex: name.to_string(), message };
        fits_exec(&exec.args, &exec.env).map_err(fail)?;
        let base = chain(&exec.rootfs, inputs).map_err(fail)?.to_vec();
        let id = self.step_id();
        let step_dir = StepDir(self.runtime.dir.join("steps").join(&id));

        // Create the step directory with its runtime files, mount, read the image's users and
        // create the working directory, off the async threads.
        let (snapshots, chain_for_mount) = (Arc::clone(&self.snapshots), base.clone());
        let (user_spec, cwd_spec, dir) = (exec.user.clone(), exec.cwd.clone(), step_dir.0.clone());
        // The default network is a namespace from the pool (given back when the step ends);
        // an insecure step may change its namespace, which is then deleted instead.
        let insecure = exec.security == SecurityMode::Insecure;
        let pool = self.networks.clone().filter(|_| exec.network == NetworkMode::Default);
        let (active, user, mut run_mounts, lease) = blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let lease = pool.map(|pool| pool.lease(insecure)).transpose()?;
            let run_mounts = runtime_files(&dir, lease.as_ref().map(crate::netns::Lease::resolv_conf))?;
            let active = snapshots.prepare(&chain_for_mount).map_err(|e| e.to_string())?;
            let user = resolve_user(&active.root(), &user_spec)?;
            let cwd =
                resolve_in_root(&active.root(), &cwd_spec, true).map_err(|e| format!("working directory: {e}"))?;
            std::fs::create_dir_all(&cwd).map_err(|e| format!("creating working directory {cwd_spec}: {e}"))?;
            Ok((active, user, run_mounts, lease))
        })
        .await
        .map_err(fail)?;
        // From here a step that fails or is cancelled unmounts off the async threads.
        let active = Mounted::new(active);
        let rootfs = active.root();

        let secrets = if exec.secret_ids().is_empty() {
            None
        } else {
            let dir = step_dir.0.clone();
            Some(blocking(move || SecretsTmpfs::mount(&dir)).await.map_err(fail)?)
        };
        let mut mounts = self.prepare_mounts(&exec.mounts, inputs, build, &step_dir.0).await.map_err(fail)?;
        run_mounts.append(&mut mounts.run_mounts);
        let targets: Vec<String> =
            RUNTIME_TARGETS.iter().map(|t| t.to_string()).chain(run_mounts.iter().map(|m| m.target.clone())).collect();
        let stubs = missing_paths(&rootfs, &targets);

        let mut env = exec.env.clone();
        env.append(&mut mounts.env);
        let spec = RunSpec {
            id: id.clone(),
            // libcontainer keeps the container's config (its environment) in its state.
            state_root: secrets
                .as_ref()
                .map_or_else(|| self.runtime.dir.join("runner"), |tmpfs| tmpfs.0.join("runner")),
            rootfs: rootfs.clone(),
            args: exec.args.clone(),
            env,
            cwd: exec.cwd.clone(),
            uid: user.uid,
            gid: user.gid,
            additional_gids: user.additional_gids,
            hostname: "buildkitsandbox".into(),
            network: match (exec.network, &lease) {
                (NetworkMode::Default, Some(lease)) => Network::Namespace(lease.path()),
                (NetworkMode::Default, None) => Network::Worker,
                (NetworkMode::None, _) => Network::None,
                (NetworkMode::Host, _) => Network::Host,
            },
            insecure,
            mounts: run_mounts,
            limits: self.config.limits,
            cgroup_parent: self.config.cgroup_parent.clone(),
            timeout_ms: self.config.step_timeout.map(|t| t.as_millis() as u64),
        };
        let outcome = self.run_container(&spec, logs).await;
        drop(mounts);
        drop(lease);
        let (result, tail) = outcome.map_err(fail)?;
        if result.exit_code != 0 {
            let status = if result.timed_out {
                "timed out".to_string()
            } else if let Some(signal) = result.signal {
                format!("killed by signal {signal}")
            } else {
                format!("exit code: {}", result.exit_code)
            };
            let failed = WorkerError::StepFailed {
                vertex: name.to_string(),
                command: exec.args.join(" "),
                status,
                tail: tail.into_iter().collect(),
            };
            // Measured now, while the step's writes still take the space (tools do not all
            // say ENOSPC: busybox says "I/O error").
            return Err(self.out_of_space_if_full(failed));
        }
        let (snapshots, active) = (Arc::clone(&self.snapshots), active.into_inner());
        let layer =
            blocking(move || snapshots.commit_pruned(active, &stubs).map_err(|e| e.to_string())).await.map_err(fail)?;
        let mut layers = base;
        layers.extend(layer);
        Ok(Snapshot { layers })
    }

    /// Hands the spec to a runner, streams its output to the log sink, and waits for the
    /// result. The spec carries the step's environment, secrets included: it goes over a
    /// pipe and never reaches a disk.
    async fn run_container(
        &self,
        spec: &RunSpec,
        logs: Option<&LogSink>,
    ) -> Result<(RunResult, VecDeque<String>), String> {
        let starting = |e: std::io::Error| format!("starting {}: {e}", self.runners.program().display());
        let mut runner = self.runners.take().await.map_err(starting)?;
        let mut guard = RunnerGuard {
            runner: self.config.runner.clone(),
            state_root: spec.state_root.clone(),
            id: spec.id.clone(),
            result: runner.result.clone(),
            finished: false,
        };
        let bytes = serde_json::to_vec(spec).expect("serialisable");
        let mut stdin = runner.child.stdin.take().expect("piped");
        if let Err(error) = stdin.write_all(&bytes).await {
            // It died between being found alive and now: one started for this step instead.
            let status = runner.child.try_wait();
            tracing::warn!("an idle runner was gone ({error}, {status:?}); starting another");
            runner = self.runners.take().await.map_err(starting)?;
            guard.result = runner.result.clone();
            stdin = runner.child.stdin.take().expect("piped");
            stdin.write_all(&bytes).await.map_err(|e| format!("handing the step to the runner: {e}"))?;
        }
        drop(stdin);
        let (mut child, result_path) = (runner.child, runner.result);
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (out_tail, err_tail) =
            tokio::join!(pump(stdout, LogStream::Stdout, logs), pump(stderr, LogStream::Stderr, logs));
        let mut tail: VecDeque<String> = out_tail.into_iter().chain(err_tail).collect();
        while tail.len() > TAIL_LINES {
            tail.pop_front();
        }
        // A runner that ran the step wrote its result, and deleted the container, before
        // closing its output: the step is over without waiting for the process to exit (it
        // is reaped in the background).
        let read = blocking(move || Ok(std::fs::read(&result_path))).await?;
        let read = match read {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            other => Some(other.map_err(|e| format!("reading the runner's result: {e}"))?),
        };
        if let Some(result) = read.and_then(|bytes| serde_json::from_slice::<RunResult>(&bytes).ok()) {
            guard.finished = true;
            tokio::spawn(async move { drop(child.wait().await) });
            return Ok((result, tail));
        }
        let status = child.wait().await.map_err(|e| format!("waiting for the runner: {e}"))?;
        guard.finished = true;
        let reason = match tail.back() {
            Some(line) if !status.success() => line.clone(),
            _ => format!("runner exited with {status} and no result"),
        };
        Err(format!("running the step failed: {reason}"))
    }
}

/// `/etc/hosts` and `/etc/resolv.conf` for the step, outside its rootfs (blocking).
fn runtime_files(step_dir: &Path, resolv_conf: Option<&str>) -> Result<Vec<RunMount>, String> {
    let hosts = step_dir.join("hosts");
    let resolv = step_dir.join("resolv.conf");
    std::fs::write(&hosts, HOSTS).map_err(|e| e.to_string())?;
    // A step in a namespace of its own gets its network's (no resolver on the host's
    // loopback); one in the worker's network the host's own, as it is now.
    let resolv_conf = match resolv_conf {
        Some(text) => text.to_string(),
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    };
    std::fs::write(&resolv, resolv_conf).map_err(|e| e.to_string())?;
    let bind = |target: &str, source: PathBuf| RunMount {
        target: target.to_string(),
        kind: RunMountKind::Bind { source, readonly: false },
    };
    Ok(vec![bind("/etc/hosts", hosts), bind("/etc/resolv.conf", resolv)])
}

/// Linux's limit on one argument or environment string, terminating NUL included
/// (`MAX_ARG_STRLEN`, 32 pages).
const MAX_ARG_STRLEN: usize = 32 * 4096;

/// Whether a command and environment can be handed to execve, which fails with a bare E2BIG
/// (the step would end with exit code 255) when one string or all of them are too long.
fn fits_exec(args: &[String], env: &[String]) -> Result<(), String> {
    let e2big = "the command and environment are too big for Linux to start the step (E2BIG)";
    for (kind, text) in args.iter().map(|a| ("an argument", a)).chain(env.iter().map(|e| ("the variable", e))) {
        if text.len() + 1 > MAX_ARG_STRLEN {
            let what = match kind {
                "the variable" => format!("the variable {}", text.split('=').next().unwrap_or_default()),
                _ => format!("an argument starting {:?}", text.chars().take(40).collect::<String>()),
            };
            return Err(format!(
                "{e2big}: {what} is {} bytes, over the {MAX_ARG_STRLEN}-byte limit for one string",
                text.len()
            ));
        }
    }
    // Each string costs its bytes, its NUL and a pointer on the new process's stack.
    let total: usize = args.iter().chain(env).map(|s| s.len() + 1 + std::mem::size_of::<usize>()).sum();
    let limit = nix::unistd::sysconf(nix::unistd::SysconfVar::ARG_MAX).ok().flatten().unwrap_or(2 << 20) as usize;
    if total > limit {
        return Err(format!("{e2big}: {total} bytes in all, over this worker's ARG_MAX of {limit}"));
    }
    Ok(())
}

/// The longest log line forwarded; longer output is cut into lines of this size, so one
/// step that prints megabytes without a newline cannot make a message no stream carries.
const MAX_LOG_LINE: usize = 16 * 1024;

/// Forwards lines to the log sink and keeps the last few. Output that is not UTF-8 is
/// forwarded lossily: the pipe is read to its end whatever the step prints, so a step never
/// blocks on a full pipe nobody reads.
async fn pump(reader: impl AsyncRead + Unpin, stream: LogStream, logs: Option<&LogSink>) -> VecDeque<String> {
    let mut reader = BufReader::new(reader);
    let mut tail = VecDeque::new();
    let mut line = Vec::new();
    let mut emit = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(line)).into_owned();
        line.clear();
        if let Some(logs) = logs {
            let _ = logs.send(LogLine { stream, line: text.clone() });
        }
        tail.push_back(text);
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
    };
    // Set after a line was cut at the limit: a newline right after it ends that line.
    let mut cut = false;
    loop {
        let buffer = match reader.fill_buf().await {
            Ok(buffer) if !buffer.is_empty() => buffer,
            _ => break,
        };
        if std::mem::take(&mut cut) && buffer[0] == b'\n' {
            reader.consume(1);
            continue;
        }
        let (length, complete) = match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (buffer.len(), false),
        };
        let taken = length.min(MAX_LOG_LINE - line.len());
        line.extend_from_slice(&buffer[..taken]);
        reader.consume(taken);
        if complete && taken == length {
            emit(&mut line);
        } else if line.len() >= MAX_LOG_LINE {
            emit(&mut line);
            cut = true;
        }
    }
    if !line.is_empty() {
        emit(&mut line);
    }
    tail
}

/// For each mount target missing from the rootfs, the target relative to the root: the
/// runtime creates it as a mountpoint, and the commit removes it again.
fn missing_paths(rootfs: &Path, targets: &[String]) -> Vec<String> {
    targets
        .iter()
        .filter_map(|target| resolve_in_root(rootfs, target, false).ok())
        .filter(|path| std::fs::symlink_metadata(path).is_err())
        .filter_map(|path| path.strip_prefix(rootfs).ok().map(|rel| rel.to_string_lossy().into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_cut_into_bounded_lines_read_lossily() {
        let mut output = b"first\n".to_vec();
        output.extend(std::iter::repeat_n(b'x', MAX_LOG_LINE));
        output.extend(b"\nbad \xff byte\n");
        output.extend(std::iter::repeat_n(b'y', MAX_LOG_LINE + 10));
        output.extend(b"\nlast without newline");
        let tail = pump(&output[..], LogStream::Stdout, None).await;
        let lines: Vec<String> = tail.into_iter().collect();
        let x = "x".repeat(MAX_LOG_LINE);
        let y = "y".repeat(MAX_LOG_LINE);
        assert_eq!(
            lines,
            ["first".to_string(), x, "bad \u{FFFD} byte".into(), y, "y".repeat(10), "last without newline".into()]
        );
    }
}
