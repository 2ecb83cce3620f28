//! The devices a sandboxed step may use, and how a host enforces them: on a cgroup v1 host as
//! rules in the step's `devices` cgroup (`cgroup.rs`), on a cgroup v2 host as an eBPF device
//! program attached to the step's cgroup ([`restrict`]).
//!
//! libcontainer can load such a program itself (its `cgroupsv2_devices` feature), but it
//! first raises `RLIMIT_MEMLOCK` to 128 MiB and fails the container when it cannot: a worker
//! without `CAP_SYS_RESOURCE` (and a hard limit below that) could then run no step at all,
//! although kernels since 5.11 account BPF memory to the cgroup and never read the limit. So
//! the runner assembles the program (a dozen instructions a rule, as runc does) and loads and
//! attaches it with the `bpf` system call: Kiln's only `unsafe` code, in this module, behind
//! two typed wrappers ([`prog_load`], [`prog_attach`]).

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

use anyhow::Context as _;
use nix::libc;

/// A device rule: the devices of a kind (and major, and minor number, `None` for any) and
/// what may be done with them.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub kind: Kind,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: Access,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Char,
    Block,
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Creating a node (`mknod`), not opening it.
    Mknod,
    /// Reading, writing and creating.
    All,
}

const fn allow(kind: Kind, major: Option<u32>, minor: Option<u32>, access: Access) -> Rule {
    Rule { kind, major, minor, access }
}

/// The devices a sandboxed step may use, as runc and Docker allow them: any device node may
/// be created, and only these opened: null, zero, full, random, urandom, tty, console,
/// ptmx, the pseudo-terminals and tun. No disk, however a step names it.
pub const ALLOWED: &[Rule] = &[
    allow(Kind::Char, None, None, Access::Mknod),
    allow(Kind::Block, None, None, Access::Mknod),
    allow(Kind::Char, Some(1), Some(3), Access::All),
    allow(Kind::Char, Some(1), Some(5), Access::All),
    allow(Kind::Char, Some(1), Some(7), Access::All),
    allow(Kind::Char, Some(1), Some(8), Access::All),
    allow(Kind::Char, Some(1), Some(9), Access::All),
    allow(Kind::Char, Some(5), Some(0), Access::All),
    allow(Kind::Char, Some(5), Some(1), Access::All),
    allow(Kind::Char, Some(5), Some(2), Access::All),
    allow(Kind::Char, Some(136), None, Access::All),
    allow(Kind::Char, Some(10), Some(200), Access::All),
];

impl Rule {
    /// The rule as a line of a v1 `devices.allow` file: `c 1:3 rwm`.
    pub fn v1_line(&self) -> String {
        let number = |n: Option<u32>| n.map_or_else(|| "*".to_string(), |n| n.to_string());
        let kind = match self.kind {
            Kind::Char => 'c',
            Kind::Block => 'b',
        };
        let access = match self.access {
            Access::Mknod => "m",
            Access::All => "rwm",
        };
        format!("{kind} {}:{} {access}", number(self.major), number(self.minor))
    }
}

// The kernel's `struct bpf_cgroup_dev_ctx` (`access_type` = kind | access << 16, major,
// minor: three u32s) and the constants of `include/uapi/linux/bpf.h`.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_ALL: i32 = 1 | 2 | 4;
const PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const CMD_PROG_LOAD: libc::c_long = 5;
const CMD_PROG_ATTACH: libc::c_long = 8;
const ATTACH_CGROUP_DEVICE: u32 = 6;
/// Programs on the parents attached with the same flag (as systemd and runc attach theirs)
/// still run: a device is usable only if all allow it. A parent's program attached without
/// flags refuses the attach (`EPERM`); one attached with `BPF_F_ALLOW_OVERRIDE` is replaced
/// by this one for the step.
const F_ALLOW_MULTI: u32 = 2;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// Destination register in the low four bits, source in the high four.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The kernel's `dst_reg:4, src_reg:4` bitfields: the destination in the low bits on a
/// little-endian machine, in the high bits on a big-endian one.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    let regs = if cfg!(target_endian = "little") { dst | (src << 4) } else { (dst << 4) | src };
    Insn { code, regs, off, imm }
}

/// `dst = *(u32 *)(src + off)`
const fn load_word(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// `dst &= imm` (64-bit)
const fn and(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}
/// `dst >>= imm` (64-bit, logical)
const fn shift_right(dst: u8, imm: i32) -> Insn {
    insn(0x77, dst, 0, 0, imm)
}
/// `dst = src` (64-bit)
const fn mov(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
/// `dst = imm` (64-bit)
const fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
/// `if dst != imm goto +off`
const fn jump_ne(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}
/// `if dst != src goto +off`
const fn jump_ne_reg(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x5d, dst, src, off, 0)
}
const EXIT: Insn = insn(0x95, 0, 0, 0, 0);

/// The device program: 1 (allow) if a rule allows the access, else 0. Registers: r2 the
/// kind, r3 the access asked for, r4 the major number, r5 the minor.
fn program(rules: &[Rule]) -> Vec<Insn> {
    let mut code = vec![
        load_word(2, 1, 0),
        and(2, 0xffff),
        load_word(3, 1, 0),
        shift_right(3, 16),
        load_word(4, 1, 4),
        load_word(5, 1, 8),
    ];
    for rule in rules {
        // Each test jumps past the rule's block when it fails; the offsets are patched in
        // once the block's length is known.
        let mut block = vec![jump_ne(
            2,
            match rule.kind {
                Kind::Char => DEV_CHAR,
                Kind::Block => DEV_BLOCK,
            },
            0,
        )];
        let access = match rule.access {
            Access::Mknod => ACC_MKNOD,
            Access::All => ACC_ALL,
        };
        if access != ACC_ALL {
            // Everything asked for must be allowed: (asked & allowed) == asked.
            block.extend([mov(1, 3), and(1, access), jump_ne_reg(1, 3, 0)]);
        }
        if let Some(major) = rule.major {
            block.push(jump_ne(4, major as i32, 0));
        }
        if let Some(minor) = rule.minor {
            block.push(jump_ne(5, minor as i32, 0));
        }
        block.extend([mov_imm(0, 1), EXIT]);
        let len = block.len();
        for (at, insn) in block.iter_mut().enumerate() {
            if matches!(insn.code, 0x55 | 0x5d) {
                insn.off = (len - at - 1) as i16;
            }
        }
        code.extend(block);
    }
    code.extend([mov_imm(0, 0), EXIT]);
    code
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to the fields the runner sets.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `BPF_PROG_LOAD` of a device program: its instructions, and a buffer for the verifier's
/// log (a log too small for all of it fails the load with `ENOSPC`).
fn prog_load(code: &[Insn], license: &CStr, log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let (log_level, log_size, log_buf) = match log {
        Some(log) => (1, log.len() as u32, log.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let mut attr = ProgLoad {
        prog_type: PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: code.len() as u32,
        insns: code.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
    };
    // SAFETY: `attr` is the `#[repr(C)]` prefix of `union bpf_attr` for BPF_PROG_LOAD, passed
    // with its size (the kernel reads the rest as zero). Its pointers are to `code` and
    // `license`, which the kernel only reads, and to `log`, writable for `log_size` bytes;
    // all three outlive the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, CMD_PROG_LOAD, &mut attr as *mut ProgLoad, size_of::<ProgLoad>() as libc::c_uint)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor, nobody else's.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_PROG_ATTACH` of a device program to a cgroup directory.
fn prog_attach(cgroup: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = ProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: ATTACH_CGROUP_DEVICE,
        attach_flags: F_ALLOW_MULTI,
    };
    // SAFETY: `attr` is the `#[repr(C)]` prefix of `union bpf_attr` for BPF_PROG_ATTACH,
    // passed with its size; it holds no pointers, and both descriptors are open for the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            CMD_PROG_ATTACH,
            &mut attr as *mut ProgAttach,
            size_of::<ProgAttach>() as libc::c_uint,
        )
    };
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Loads the device program of `rules` into the kernel. A program the verifier refused is
/// loaded once more with its log, for the error.
fn load(rules: &[Rule]) -> anyhow::Result<OwnedFd> {
    let code = program(rules);
    let license = c"Apache-2.0";
    match prog_load(&code, license, None) {
        Ok(program) => Ok(program),
        Err(error) if matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => Err(error).context(
            "loading the device program (a worker needs CAP_SYS_ADMIN or CAP_BPF in the host's user namespace)",
        ),
        Err(error) => {
            let mut log = vec![0u8; 1 << 20];
            let _ = prog_load(&code, license, Some(&mut log));
            let log = String::from_utf8_lossy(log.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
            anyhow::bail!("loading the device program: {error}; the verifier said: {}", log.trim())
        }
    }
}

/// Restricts what runs in the cgroup v2 directory `cgroup` to the devices [`ALLOWED`].
pub fn restrict(cgroup: &Path) -> anyhow::Result<()> {
    let program = load(ALLOWED)?;
    let dir = std::fs::File::open(cgroup).with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    prog_attach(dir.as_fd(), program.as_fd()).map_err(|error| {
        let hint = if error.raw_os_error() == Some(libc::EPERM) {
            " (a parent cgroup holds a device program attached without BPF_F_ALLOW_MULTI, which \
             allows no other below it; or the worker lacks CAP_SYS_ADMIN)"
        } else {
            ""
        };
        anyhow::anyhow!("attaching the device program to the cgroup {}: {error}{hint}", cgroup.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines_are_runcs() {
        let lines: Vec<String> = ALLOWED.iter().map(Rule::v1_line).collect();
        assert_eq!(lines[..3], ["c *:* m", "b *:* m", "c 1:3 rwm"]);
        assert_eq!(lines[10], "c 136:* rwm");
    }

    /// Runs the program on one access the way the kernel would (only the instructions
    /// [`program`] emits).
    fn verdict(code: &[Insn], kind: i32, access: i32, major: u32, minor: u32) -> u64 {
        let ctx = [(kind | access << 16) as u32, major, minor];
        let mut regs = [0u64; 11];
        let mut pc = 0;
        loop {
            let Insn { code: op, regs: r, off, imm } = code[pc];
            let (low, high) = ((r & 0xf) as usize, (r >> 4) as usize);
            let (dst, src) = if cfg!(target_endian = "little") { (low, high) } else { (high, low) };
            pc += 1;
            match op {
                0x61 => regs[dst] = ctx[off as usize / 4] as u64,
                0x57 => regs[dst] &= imm as u64,
                0x77 => regs[dst] >>= imm,
                0xbf => regs[dst] = regs[src],
                0xb7 => regs[dst] = imm as u64,
                0x55 if regs[dst] != imm as u64 => pc += off as usize,
                0x5d if regs[dst] != regs[src] => pc += off as usize,
                0x55 | 0x5d => {}
                0x95 => return regs[0],
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn the_program_allows_what_the_rules_allow_and_nothing_else() {
        let code = program(ALLOWED);
        let (read, write) = (2, 4);
        // Any node may be made.
        assert_eq!(verdict(&code, DEV_BLOCK, ACC_MKNOD, 7, 0), 1);
        assert_eq!(verdict(&code, DEV_CHAR, ACC_MKNOD, 4, 1), 1);
        // The usual devices may be opened.
        assert_eq!(verdict(&code, DEV_CHAR, read | write, 1, 3), 1);
        assert_eq!(verdict(&code, DEV_CHAR, read, 136, 7), 1);
        assert_eq!(verdict(&code, DEV_CHAR, write, 10, 200), 1);
        // A disk, a loop device, memory and a console other than /dev/console may not.
        assert_eq!(verdict(&code, DEV_BLOCK, read, 7, 0), 0);
        assert_eq!(verdict(&code, DEV_BLOCK, read | ACC_MKNOD, 7, 0), 0);
        assert_eq!(verdict(&code, DEV_BLOCK, write, 253, 0), 0);
        assert_eq!(verdict(&code, DEV_CHAR, read, 1, 1), 0);
        assert_eq!(verdict(&code, DEV_CHAR, read, 4, 1), 0);
        // Nothing allowed, nothing open.
        assert_eq!(verdict(&program(&[]), DEV_CHAR, read, 1, 3), 0);
    }
}
