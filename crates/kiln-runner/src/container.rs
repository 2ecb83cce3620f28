//! The libcontainer half: OCI spec from a [`RunSpec`], create, start, wait, delete.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_runner_spec::{Limits, Network, RunMount, RunMountKind, RunResult, RunSpec};
use libcontainer::capabilities::CapabilityExt as _;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::network::link::LinkClient;
use libcontainer::network::wrapper::create_network_client;
use libcontainer::oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, RootBuilder,
    Spec,
};
use libcontainer::syscall::syscall::SyscallType;
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::resource::{Resource, getrlimit};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use seccompiler::BpfProgram;

use crate::cgroup::{self, Hierarchies, StepCgroup};
use crate::devices;
use crate::seccomp::StepExecutor;

/// Capabilities a build step gets by default: containerd's default set, as BuildKit uses.
const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Extra capabilities for `--security=insecure`.
const INSECURE_CAPABILITIES: &[Capability] = &[
    Capability::SysAdmin,
    Capability::NetAdmin,
    Capability::SysPtrace,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysNice,
    Capability::DacReadSearch,
    Capability::LinuxImmutable,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::Lease,
    Capability::AuditControl,
    Capability::Syslog,
    Capability::Bpf,
    Capability::Perfmon,
];

/// The runner's capability bounding set, as a mask of capability numbers.
fn bounding_set() -> anyhow::Result<u64> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let mask = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).context("no CapBnd in /proc/self/status")?;
    u64::from_str_radix(mask.trim(), 16).with_context(|| format!("CapBnd {mask:?} is not a hexadecimal mask"))
}

fn containers_root(state_root: &Path) -> PathBuf {
    state_root.join("c")
}

fn bundle_dir(state_root: &Path, id: &str) -> PathBuf {
    state_root.join("b").join(id)
}

/// What the runner prepares before it has a step: the compiled seccomp filter of a sandboxed
/// step and, on a cgroup v1 host, the hierarchies.
pub struct Prepared {
    pub sandbox: BpfProgram,
    pub hierarchies: Option<Hierarchies>,
}

/// Runs the step to completion and deletes its container, whatever happens.
pub fn run(spec: &RunSpec, prepared: Prepared) -> anyhow::Result<RunResult> {
    cleanup(&spec.state_root, Some(&spec.id))?;
    match &spec.network {
        Network::None => {
            unshare(CloneFlags::CLONE_NEWNET).context("creating a network namespace")?;
            // A fresh namespace has its loopback down; build steps expect 127.0.0.1 to work.
            LinkClient::new(create_network_client())
                .and_then(|mut links| links.set_up(1))
                .map_err(|e| anyhow::anyhow!("bringing up loopback: {e}"))?;
        }
        Network::Namespace(path) => {
            let namespace =
                File::open(path).with_context(|| format!("opening the network namespace {}", path.display()))?;
            setns(namespace, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering the network namespace {}", path.display()))?;
        }
        Network::Worker | Network::Host => {}
    }
    let bundle = bundle_dir(&spec.state_root, &spec.id);
    fs::create_dir_all(&bundle).with_context(|| format!("creating {}", bundle.display()))?;
    let executor = StepExecutor { filter: (!spec.insecure).then_some(prepared.sandbox) };
    let result = run_in_bundle(spec, &bundle, executor, prepared.hierarchies);
    let cleaned = cleanup(&spec.state_root, Some(&spec.id));
    let result = result?;
    cleaned?;
    Ok(result)
}

fn run_in_bundle(
    spec: &RunSpec,
    bundle: &Path,
    executor: StepExecutor,
    hierarchies: Option<Hierarchies>,
) -> anyhow::Result<RunResult> {
    // The bundle first: `cleanup` finds the step's cgroup through it. On a cgroup v1 host the
    // runner puts the container in its cgroup itself (`cgroup.rs`).
    oci_spec(spec, hierarchies.is_none())?.save(bundle.join("config.json")).context("writing config.json")?;
    let cgroup = hierarchies.map(|found| StepCgroup::join(found, &cgroup_path(spec))).transpose()?;
    let started = Instant::now();
    let hidden = cgroup.as_ref().map(|_| cgroup::hide_from_libcontainer()).transpose()?;
    let built = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
        .with_root_path(containers_root(&spec.state_root))?
        .with_stdin(File::open("/dev/null")?)
        .with_executor(executor)
        .validate_id()?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(false)
        .build()
        .context("creating the container");
    if let Some(hidden) = hidden {
        hidden.reveal();
    }
    let mut container = built?;
    match cgroup {
        Some(cgroup) => cgroup.leave(&spec.limits, !spec.insecure)?,
        // A cgroup v2 host: libcontainer made the cgroup and set the limits; the devices
        // are the runner's (`devices.rs`).
        None if !spec.insecure => {
            devices::restrict(&Path::new(cgroup::ROOT).join(cgroup::relative(&cgroup_path(spec))))?
        }
        None => {}
    }
    container.start().context("starting the container")?;
    let pid = container.pid().context("the started container has no pid")?;

    // The watchdog thread starts only after libcontainer is done forking.
    let (done, finished) = mpsc::channel::<()>();
    let timeout = spec.timeout_ms.map(Duration::from_millis);
    let watchdog = timeout.map(|timeout| {
        std::thread::spawn(move || {
            if finished.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
                // Killing init ends its whole pid namespace.
                let _ = kill(pid, Signal::SIGKILL);
                return true;
            }
            false
        })
    });
    let (exit_code, signal) = loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => break (code, None),
            Ok(WaitStatus::Signaled(_, signal, _)) => break (128 + signal as i32, Some(signal as i32)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => bail!("waiting for the container: {errno}"),
        }
    };
    let elapsed_us = started.elapsed().as_micros() as u64;
    let _ = done.send(());
    let timed_out = watchdog.map(|w| w.join().unwrap_or(false)).unwrap_or(false);
    // The container is deleted by `cleanup`, which `run` always calls.
    Ok(RunResult { exit_code, signal, timed_out, elapsed_us })
}

/// Deletes the container `id` (or every container) under the state root, killing what still
/// runs in its cgroup, and removes bundles.
pub fn cleanup(state_root: &Path, id: Option<&str>) -> anyhow::Result<()> {
    let ids: Vec<String> = match id {
        Some(id) => vec![id.to_string()],
        None => ["c", "b"]
            .iter()
            .flat_map(|sub| fs::read_dir(state_root.join(sub)).into_iter().flatten().flatten())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect(),
    };
    for id in ids {
        cleanup_one(state_root, &id)?;
    }
    Ok(())
}

fn cleanup_one(state_root: &Path, id: &str) -> anyhow::Result<()> {
    let dir = containers_root(state_root).join(id);
    let bundle = bundle_dir(state_root, id);
    let cgroup = Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|spec| spec.linux().as_ref().and_then(|linux| linux.cgroups_path().clone()));
    // Not libcontainer's delete: its cgroup manager reads the mount table once per
    // controller (about a millisecond on a cgroup v1 host), and killing every process in
    // the container's cgroup, init included, is all a build step's container needs.
    if let Some(cgroup) = cgroup {
        remove_cgroup(&cgroup)?;
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if bundle.exists() {
        fs::remove_dir_all(&bundle).with_context(|| format!("removing {}", bundle.display()))?;
    }
    Ok(())
}

/// Kills every process in the cgroup (in every hierarchy: v1, hybrid or v2) and removes its
/// directories, waiting a bounded time for the processes to exit.
fn remove_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let relative = cgroup::relative(cgroup);
    let base = Path::new(cgroup::ROOT);
    let mut dirs: Vec<PathBuf> = fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .map(|hierarchy| hierarchy.path().join(relative))
        .chain(std::iter::once(base.join(relative)))
        .filter(|dir| dir.is_dir())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dirs.is_empty() {
        for dir in &dirs {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|line| line.trim().parse::<i32>().ok()) {
                let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = fs::remove_dir(dir);
        }
        dirs.retain(|dir| dir.exists());
        if !dirs.is_empty() {
            if Instant::now() > deadline {
                bail!("cgroup {} still has processes after SIGKILL", cgroup.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// The step's cgroup, absolute within each hierarchy: `PARENT/ID`.
fn cgroup_path(spec: &RunSpec) -> PathBuf {
    PathBuf::from(format!("{}/{}", spec.cgroup_parent.trim_end_matches('/'), spec.id))
}

/// The container's OCI spec; with `limits`, libcontainer sets the cgroup limits.
fn oci_spec(spec: &RunSpec, limits: bool) -> anyhow::Result<Spec> {
    let mut oci = Spec::default();
    oci.set_hostname(Some(spec.hostname.clone()));
    oci.set_root(Some(RootBuilder::default().path(spec.rootfs.clone()).readonly(false).build()?));

    let process = oci.process_mut().as_mut().context("default spec has a process")?;
    process.set_args(Some(spec.args.clone()));
    process.set_env(Some(spec.env.clone()));
    process.set_cwd(PathBuf::from(&spec.cwd));
    // A sandboxed step gains nothing by executing a set-user-id file (`no_new_privs`, as
    // containerd sets it); an insecure one may.
    process.set_no_new_privileges(Some(!spec.insecure));
    let user = process.user_mut();
    user.set_uid(spec.uid);
    user.set_gid(spec.gid);
    user.set_additional_gids(Some(spec.additional_gids.clone()));
    let mut caps: Capabilities = DEFAULT_CAPABILITIES.iter().copied().collect();
    if spec.insecure {
        // A step cannot get what the runner does not hold (a worker pod without every
        // capability): Docker's privileged mode grants the runtime's bounding set likewise.
        let bounding = bounding_set()?;
        caps.extend(INSECURE_CAPABILITIES.iter().copied().filter(|c| bounding & (1u64 << c.to_cap().index()) != 0));
    }
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .inheritable(Capabilities::new())
            .ambient(Capabilities::new())
            .build()?,
    ));
    // As many open files as the worker may grant: raising the hard limit past its own needs
    // CAP_SYS_RESOURCE, which a worker in a pod may not have.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let nofile = hard.min(1_048_576);
    let nofile = PosixRlimitBuilder::default().typ(PosixRlimitType::RlimitNofile).hard(nofile).soft(nofile);
    process.set_rlimits(Some(vec![nofile.build()?]));

    let mut mounts: Vec<Mount> = oci.mounts().clone().unwrap_or_default();
    // The cgroup filesystem is of no use to a build step and costs a mount per controller.
    mounts.retain(|m| m.destination() != Path::new("/sys/fs/cgroup"));
    for mount in &spec.mounts {
        mounts.push(oci_mount(mount)?);
    }
    oci.set_mounts(Some(mounts));

    let linux = oci.linux_mut().as_mut().context("default spec has linux settings")?;
    if let Some(namespaces) = linux.namespaces_mut() {
        // The runner already sits in the namespace the step should use (see `run`).
        namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
    }
    linux.set_cgroups_path(Some(cgroup_path(spec)));
    linux.set_resources(if limits { Some(resources(&spec.limits)?) } else { None });
    // A sandboxed step keeps the default masked (`/proc/kcore`, `/proc/keys`, ...) and
    // read-only (`/proc/sys`, ...) paths; its seccomp filter is installed by the executor
    // (`StepExecutor`).
    if spec.insecure {
        linux.set_masked_paths(Some(Vec::new()));
        linux.set_readonly_paths(Some(Vec::new()));
    }
    Ok(oci)
}

fn oci_mount(mount: &RunMount) -> anyhow::Result<Mount> {
    let builder = MountBuilder::default().destination(PathBuf::from(&mount.target));
    let built = match &mount.kind {
        RunMountKind::Bind { source, readonly } => {
            let mut options = vec!["rbind".to_string()];
            if *readonly {
                options.push("ro".to_string());
            }
            builder.typ("bind").source(source.clone()).options(options).build()?
        }
        RunMountKind::Tmpfs { size } => {
            let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
            if let Some(size) = size {
                options.push(format!("size={size}"));
            }
            builder.typ("tmpfs").source("tmpfs").options(options).build()?
        }
    };
    Ok(built)
}

fn resources(limits: &Limits) -> anyhow::Result<libcontainer::oci_spec::runtime::LinuxResources> {
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(bytes) = limits.memory_bytes {
        resources = resources.memory(LinuxMemoryBuilder::default().limit(bytes).swap(bytes).build()?);
    }
    if let Some(quota) = limits.cpu_quota_us {
        resources = resources.cpu(LinuxCpuBuilder::default().quota(quota).period(100_000u64).build()?);
    }
    if let Some(pids) = limits.pids {
        resources = resources.pids(LinuxPidsBuilder::default().limit(pids).build()?);
    }
    Ok(resources.build()?)
}
