//! The seccomp filter of a sandboxed step, after Docker's default profile for a container
//! without `CAP_SYS_ADMIN`: the system calls a build needs are allowed, the rest fail with
//! `EPERM`. Among those refused: `mount`, `umount2`, `unshare`, `setns`, `pivot_root`, the
//! kernel keyring (`keyctl`, `add_key`, `request_key`), module loading, `bpf`, `perf_event_open`,
//! `kexec_*`, `reboot`, `swapon`, clock and host-name changes; `clone` creating namespaces
//! (a user namespace is how an unprivileged process gets to mount); `clone3`, whose flags a
//! filter cannot read, fails with `ENOSYS` so that libc falls back to `clone`. An insecure
//! step (`--security=insecure`) runs unconfined, as Docker's privileged mode does.
//!
//! libseccomp compiles the filter (it knows this architecture's system call numbers) before
//! the runner reads its spec, while it waits for a step; the container's init process only
//! installs the compiled program, through [`StepExecutor`], right before it executes the
//! step's command.

use std::io::{Read as _, Seek as _};

use anyhow::Context as _;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use seccompiler::{BpfProgram, sock_filter};

/// System calls a sandboxed step may make, whatever their arguments. Names the kernel or
/// the architecture lacks are skipped when the filter is built.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chroot",
    "clock_adjtime",
    "clock_getres",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchownat",
    "fcntl",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstatfs",
    "fsync",
    "ftruncate",
    "futex",
    "futex_requeue",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresuid",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "gettid",
    "gettimeofday",
    "getuid",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "modify_ldt",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_getfd",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "ptrace",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "sendfile",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsuid",
    "setgid",
    "setgroups",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setresgid",
    "setresuid",
    "setreuid",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_tid_address",
    "setuid",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "socket",
    "socketpair",
    "splice",
    "stat",
    "statfs",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_settime",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_settime",
    "times",
    "tkill",
    "truncate",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "write",
    "writev",
];

/// The `clone` flags that create namespaces: `CLONE_NEWNS`, `CLONE_NEWCGROUP`, `CLONE_NEWUTS`,
/// `CLONE_NEWIPC`, `CLONE_NEWUSER`, `CLONE_NEWPID`, `CLONE_NEWNET`.
const NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// `EPERM`, what a refused call returns.
const EPERM: i32 = 1;
/// `ENOSYS`, what `clone3` returns.
const ENOSYS: i32 = 38;

/// The personalities Docker allows: Linux, 32-bit Linux, `UNAME26`, both, and the query.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The filter, compiled: [`ALLOWED`], `clone` without namespace flags, the usual
/// personalities, `clone3` as `ENOSYS`, every other call `EPERM`.
pub fn sandbox() -> anyhow::Result<BpfProgram> {
    let mut filter = ScmpFilterContext::new(ScmpAction::Errno(EPERM)).context("creating the seccomp filter")?;
    let allow = |filter: &mut ScmpFilterContext, name: &str, conditions: &[ScmpArgCompare]| -> anyhow::Result<()> {
        // A name this kernel's architecture lacks has nothing to allow.
        let Ok(call) = ScmpSyscall::from_name(name) else { return Ok(()) };
        filter.add_rule_conditional(ScmpAction::Allow, call, conditions).with_context(|| format!("allowing {name}"))?;
        Ok(())
    };
    for name in ALLOWED {
        allow(&mut filter, name, &[])?;
    }
    allow(&mut filter, "clone", &[ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(NAMESPACE_FLAGS), 0)])?;
    // One rule per value: the conditions of one rule must all hold.
    for value in PERSONALITIES {
        allow(&mut filter, "personality", &[ScmpArgCompare::new(0, ScmpCompareOp::Equal, value)])?;
    }
    if let Ok(clone3) = ScmpSyscall::from_name("clone3") {
        filter.add_rule(ScmpAction::Errno(ENOSYS), clone3).context("refusing clone3")?;
    }
    export(&filter)
}

/// The BPF program libseccomp would load for `filter`.
fn export(filter: &ScmpFilterContext) -> anyhow::Result<BpfProgram> {
    let memory = nix::sys::memfd::memfd_create(c"kiln-seccomp", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .context("creating a memory file for the seccomp filter")?;
    filter.export_bpf(&memory).context("compiling the seccomp filter")?;
    let mut file = std::fs::File::from(memory);
    let mut bytes = Vec::new();
    file.rewind().and_then(|()| file.read_to_end(&mut bytes)).context("reading the compiled seccomp filter")?;
    // `struct sock_filter`: u16 code, u8 jt, u8 jf, u32 k, in the machine's byte order.
    Ok(bytes
        .chunks_exact(8)
        .map(|i| sock_filter {
            code: u16::from_ne_bytes([i[0], i[1]]),
            jt: i[2],
            jf: i[3],
            k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
        })
        .collect())
}

/// Executes the step's command in the container's init process: after installing the
/// sandbox's compiled filter when the step has one, through the standard library's `exec`,
/// which gives the command default signal handling (the runner, a Rust program, ignores
/// SIGPIPE, and an ignored signal stays ignored across `execve`: `yes | head` would never
/// end). libcontainer's own executor checks beforehand that the command exists.
#[derive(Clone)]
pub struct StepExecutor {
    pub filter: Option<BpfProgram>,
}

impl Executor for StepExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        use std::os::unix::process::CommandExt as _;
        let args = spec.process().as_ref().and_then(|p| p.args().as_ref()).ok_or(ExecutorError::InvalidArg)?;
        let (program, rest) = args.split_first().ok_or(ExecutorError::InvalidArg)?;
        if let Some(filter) = &self.filter {
            seccompiler::apply_filter(filter)
                .map_err(|e| ExecutorError::Other(format!("installing the seccomp filter: {e}")))?;
        }
        // The environment is the step's by now (libcontainer's `setup_envs`), PATH included.
        let error = std::process::Command::new(program).arg0(program).args(rest).exec();
        Err(ExecutorError::Other(format!("executing {program}: {error}")))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}
