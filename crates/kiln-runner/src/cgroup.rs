//! A step's cgroup on a cgroup v1 host (legacy or hybrid), made by the runner itself.
//!
//! libcontainer moves the container's first process into its cgroup by pid (writing to
//! `cgroup.procs`). That takes the kernel's global `cgroup_threadgroup_rwsem` for writing,
//! which, once the machine has been idle for a few tens of milliseconds, waits for an RCU
//! grace period: about 11 ms per step here, more than the rest of a step's start. A thread
//! that moves itself (writing `0` to `tasks`) takes no global lock (on kernels since 5.x that
//! skip it for a single thread; on older ones this costs what it did). So on a v1 host the
//! runner creates the step's cgroup in the hierarchies of libcontainer's controllers and
//! moves itself in ([`StepCgroup::join`]);
//! libcontainer then forks the container from there with the cgroup filesystem out of its
//! sight ([`hide_from_libcontainer`]), so that it moves nothing (and does not read the mount
//! table once per controller); the runner moves itself back out and sets the limits
//! ([`StepCgroup::leave`]) before the step's command starts.
//!
//! On a cgroup v2 host libcontainer does it all, as before: there, `clone3` into the cgroup
//! (`CLONE_INTO_CGROUP`) would be the way, which libcontainer does not take yet.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use kiln_runner_spec::Limits;

use crate::devices;

/// Where the hierarchies are mounted.
pub const ROOT: &str = "/sys/fs/cgroup";

/// The controllers the runner puts a step under: libcontainer's list. Named hierarchies
/// (`name=systemd`) and others stay as the runner has them, so that the service manager
/// still finds the step's processes where it put the daemon.
const CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_prio",
    "net_cls",
    "freezer",
];

/// One v1 hierarchy: where it is mounted, the runner's own cgroup in it, and its controllers.
#[derive(Debug)]
struct Hierarchy {
    mount: PathBuf,
    own: PathBuf,
    controllers: BTreeSet<String>,
}

/// The step's cgroup, in every v1 hierarchy. Dropped before [`StepCgroup::leave`], it moves
/// the runner back out (so that the cgroup can be removed).
#[derive(Debug)]
pub struct StepCgroup {
    /// Each hierarchy with the step's directory in it.
    joined: Vec<(Hierarchy, PathBuf)>,
    left: bool,
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        if !self.left {
            for (hierarchy, _) in &self.joined {
                let _ = write(&hierarchy.own.join("tasks"), "0");
            }
        }
    }
}

/// A cgroup's path (absolute within a hierarchy) relative to the hierarchy's mount.
pub fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

/// The host's v1 hierarchies, found before the runner has a step.
#[derive(Debug)]
pub struct Hierarchies(Vec<Hierarchy>);

impl Hierarchies {
    /// The v1 hierarchies mounted under `/sys/fs/cgroup` with the runner's cgroup in each;
    /// `None` on a cgroup v2 host.
    pub fn discover() -> anyhow::Result<Option<Hierarchies>> {
        let root = nix::sys::statfs::statfs(ROOT).with_context(|| format!("reading {ROOT}"))?;
        if root.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC {
            return Ok(None);
        }
        hierarchies().map(|found| Some(Hierarchies(found)))
    }
}

impl StepCgroup {
    /// Creates the cgroup `path` (absolute within each hierarchy) and moves the calling
    /// thread, the runner's only one, into it.
    pub fn join(hierarchies: Hierarchies, path: &Path) -> anyhow::Result<StepCgroup> {
        let relative = relative(path);
        let mut cgroup = StepCgroup { joined: Vec::new(), left: false };
        for hierarchy in hierarchies.0 {
            let dir = hierarchy.mount.join(relative);
            create(&hierarchy, relative)?;
            write(&dir.join("tasks"), "0")?;
            cgroup.joined.push((hierarchy, dir));
        }
        Ok(cgroup)
    }

    /// Moves the runner back to its own cgroups and sets the step's limits and, for a
    /// sandboxed step, the devices it may use ([`devices::ALLOWED`]). The container's
    /// processes stay.
    pub fn leave(mut self, limits: &Limits, sandboxed: bool) -> anyhow::Result<()> {
        for (hierarchy, _) in &self.joined {
            write(&hierarchy.own.join("tasks"), "0")?;
        }
        self.left = true;
        if sandboxed && !self.joined.iter().any(|(hierarchy, _)| hierarchy.controllers.contains("devices")) {
            bail!(
                "no devices cgroup hierarchy is mounted under {ROOT}: a sandboxed step's devices cannot be restricted"
            );
        }
        for (hierarchy, dir) in &self.joined {
            let has = |controller: &str| hierarchy.controllers.contains(controller);
            if let Some(bytes) = limits.memory_bytes.filter(|_| has("memory")) {
                write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                // With swap accounting, no swap beyond the limit (libcontainer's `swap = limit`).
                let swap = dir.join("memory.memsw.limit_in_bytes");
                if swap.exists() {
                    write(&swap, &bytes.to_string())?;
                }
            }
            if let Some(quota) = limits.cpu_quota_us.filter(|_| has("cpu")) {
                write(&dir.join("cpu.cfs_period_us"), "100000")?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
            if let Some(pids) = limits.pids.filter(|_| has("pids")) {
                write(&dir.join("pids.max"), &pids.to_string())?;
            }
            if sandboxed && has("devices") {
                write(&dir.join("devices.deny"), "a")?;
                for rule in devices::ALLOWED {
                    write(&dir.join("devices.allow"), &rule.v1_line())?;
                }
            }
        }
        Ok(())
    }
}

/// The runner's own mount namespace while libcontainer creates the container, and the way
/// back to the host's.
pub struct Hidden {
    host: Option<fs::File>,
}

/// Moves the runner into a mount namespace of its own (receiving the host's mounts, sending
/// none) with an empty tmpfs at `/sys/fs/cgroup`: libcontainer then takes the host for a v1
/// host without hierarchies and leaves cgroups alone. Call after [`StepCgroup::join`], and
/// [`Hidden::reveal`] once the container is created (its own mount namespace, made from this
/// one, drops all of it at `pivot_root`). The runner must be single-threaded.
pub fn hide_from_libcontainer() -> anyhow::Result<Hidden> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let host = fs::File::open("/proc/self/ns/mnt").context("opening the runner's mount namespace")?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("creating a mount namespace for the runner")?;
    let hidden = Hidden { host: Some(host) };
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .context("making the runner's mounts receive-only")?;
    umount2(ROOT, MntFlags::MNT_DETACH).with_context(|| format!("hiding {ROOT} from libcontainer"))?;
    mount(Some("tmpfs"), ROOT, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=4k"))
        .with_context(|| format!("hiding {ROOT} from libcontainer"))?;
    Ok(hidden)
}

impl Hidden {
    /// Returns the runner to the host's mount namespace.
    pub fn reveal(mut self) {
        if let Some(host) = self.host.take() {
            return_to(host);
        }
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            return_to(host);
        }
    }
}

/// Enters the host's mount namespace again. A runner that cannot ends at once: where it is,
/// it could not remove the step's cgroup, and the worker's `cleanup` (which it then runs)
/// can.
fn return_to(host: fs::File) {
    if let Err(errno) = nix::sched::setns(host, nix::sched::CloneFlags::CLONE_NEWNS) {
        eprintln!("kiln-runner: returning to the host's mount namespace: {errno}");
        std::process::exit(kiln_runner_spec::RUNNER_FAILED);
    }
}

/// The v1 hierarchies mounted under `/sys/fs/cgroup`, with the runner's cgroup in each.
fn hierarchies() -> anyhow::Result<Vec<Hierarchy>> {
    let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let own: Vec<(BTreeSet<String>, &str)> = own
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            Some((controllers.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect(), path))
        })
        .collect();
    let table = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut found = Vec::new();
    for line in table.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - TYPE SOURCE SUPER-OPTIONS
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let (left, right): (Vec<&str>, Vec<&str>) = (left.split(' ').collect(), right.split(' ').collect());
        if right.first() != Some(&"cgroup") || left.len() < 5 {
            continue;
        }
        let (mount_root, mount) = (left[3], PathBuf::from(left[4]));
        if mount.parent() != Some(Path::new(ROOT)) {
            continue;
        }
        // The super options: controllers, `name=...` and options such as `rw` or `xattr`.
        let options: BTreeSet<String> =
            right.get(2).map(|options| options.split(',')).into_iter().flatten().map(str::to_string).collect();
        let controllers: BTreeSet<String> =
            options.iter().filter(|o| CONTROLLERS.contains(&o.as_str())).cloned().collect();
        if controllers.is_empty() || options.iter().any(|o| o.starts_with("name=")) {
            continue;
        }
        // This process's line for the hierarchy names the same controllers.
        let Some((_, path)) = own.iter().find(|(set, _)| *set == controllers) else { continue };
        let path = path.strip_prefix(mount_root).unwrap_or(path);
        let own = mount.join(path.trim_start_matches('/'));
        found.push(Hierarchy { mount, own, controllers });
    }
    Ok(found)
}

/// Creates the step's directory in `hierarchy`, with the parents it lacks. A new cpuset
/// cgroup starts with no CPUs or memory nodes, so that nothing can join it: each new level
/// gets its parent's.
fn create(hierarchy: &Hierarchy, relative: &Path) -> anyhow::Result<()> {
    let cpuset = hierarchy.controllers.contains("cpuset");
    let mut dir = hierarchy.mount.clone();
    for component in relative.components() {
        let parent = dir.clone();
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error).with_context(|| format!("creating the cgroup {}", dir.display())),
        }
        if cpuset {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = fs::read_to_string(dir.join(file)).with_context(|| format!("reading {file}"))?;
                if value.trim().is_empty() {
                    let inherited = fs::read_to_string(parent.join(file)).with_context(|| format!("reading {file}"))?;
                    write(&dir.join(file), inherited.trim())?;
                }
            }
        }
    }
    Ok(())
}

fn write(file: &Path, value: &str) -> anyhow::Result<()> {
    fs::write(file, value).with_context(|| format!("writing {value} to {}", file.display()))
}
