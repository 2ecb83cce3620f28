//! The RUN sandbox of the embedded daemon: what a step may not do, and entitlements (its
//! worker grants none, so a step that needs one fails before anything runs, saying what to
//! pass or what the daemon lacks).

use crate::build::{Setup, text};

/// Each probe a step runs, and whether the sandbox allows it.
const PROBES: &[(&str, bool)] = &[
    ("true", true),
    ("chroot / true", true),
    ("mount -t tmpfs none /mnt", false),
    // Allowed to unprivileged users on the host: the seccomp filter refuses it here.
    ("unshare -U true", false),
    ("unshare -m true", false),
    ("nsenter -t 1 -n true", false),
    ("insmod /probe.ko", false),
    ("test -s /proc/kcore", false),
    ("test -s /proc/keys", false),
    ("touch /proc/sysrq-trigger", false),
    // A device node may be made, but only the usual devices opened: not a disk.
    ("mknod /probe-loop b 7 0 && exec 3< /probe-loop", false),
    ("head -c 1 /dev/urandom > /dev/null && : > /dev/zero", true),
    ("echo kiln > /proc/sys/kernel/hostname", false),
];

#[test]
fn a_sandboxed_step_cannot_mount_unshare_load_modules_or_read_the_kernel() {
    let setup = Setup::new();
    let probes: Vec<String> = PROBES
        .iter()
        .map(|(probe, _)| {
            format!(
                "if ({probe}) 2>/dev/null; then echo 'allowed: {probe}'; else echo 'refused: {probe}'; fi >> /probes"
            )
        })
        .collect();
    let dockerfile = format!("FROM BASE\nRUN echo module > /probe.ko && {}\n", probes.join(" && "));
    let context = setup.context("sandbox", &dockerfile);
    let dest = setup.dir.path().join("sandbox-out");
    let local = format!("type=local,dest={}", dest.display());
    let out = setup.run_in("state", &["build", "--progress", "plain", "-o", &local, context.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results = std::fs::read_to_string(dest.join("probes")).unwrap();
    for (probe, allowed) in PROBES {
        let expected = format!("{}: {probe}", if *allowed { "allowed" } else { "refused" });
        assert!(results.lines().any(|l| l == expected), "expected {expected:?} in:\n{results}");
    }
}

#[test]
fn steps_beyond_the_sandbox_need_the_client_and_the_daemon_to_allow_them() {
    let setup = Setup::new();
    for (flag, entitlement) in [("--security=insecure", "security.insecure"), ("--network=host", "network.host")] {
        let context = setup.context(entitlement, &format!("FROM BASE\nRUN {flag} touch /ran\n"));
        let context = context.to_str().unwrap();
        let out = setup.run_in("state", &["build", "--progress", "plain", context], &[]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(&format!("RUN {flag} needs `--allow {entitlement}`")), "{stderr}");
        assert!(!stderr.contains("touch /ran\n#"), "nothing ran: {stderr}");
        let out = setup.run_in("state", &["build", "--progress", "plain", "--allow", entitlement, context], &[]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains(&format!("{entitlement} is not granted by this daemon (worker.entitlements")),
            "{stderr}"
        );
    }
    let out = setup.run_in("state", &["build", "--allow", "root", "."], &[]);
    assert!(text(&out.stderr).contains("unknown entitlement \"root\""), "{}", text(&out.stderr));
}
