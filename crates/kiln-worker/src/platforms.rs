//! Which platforms this machine can run: its own, plus those an emulator registered with
//! binfmt_misc can run inside containers (the fix-binary `F` flag: the interpreter is opened
//! at registration, so it need not exist in the container's root filesystem).

use std::path::Path;

use kiln_types::Platform;

/// binfmt_misc handlers (Debian's qemu-user-static names) and the platform each runs.
const EMULATORS: &[(&str, &str)] = &[
    ("qemu-aarch64", "linux/arm64"),
    ("qemu-arm", "linux/arm/v7"),
    ("qemu-riscv64", "linux/riscv64"),
    ("qemu-ppc64le", "linux/ppc64le"),
    ("qemu-s390x", "linux/s390x"),
];

/// The host's platform first, then every platform an enabled fix-binary handler runs.
pub fn runnable_platforms() -> Vec<Platform> {
    runnable_platforms_in(Path::new("/proc/sys/fs/binfmt_misc"))
}

fn runnable_platforms_in(binfmt: &Path) -> Vec<Platform> {
    let host = Platform::host();
    let mut platforms = vec![host.clone()];
    for (handler, platform) in EMULATORS {
        let Ok(text) = std::fs::read_to_string(binfmt.join(handler)) else { continue };
        let enabled = text.lines().next() == Some("enabled");
        let fix_binary = text.lines().any(|l| l.strip_prefix("flags:").is_some_and(|f| f.contains('F')));
        let platform: Platform = platform.parse().expect("a valid platform");
        if enabled && fix_binary && platform != host {
            platforms.push(platform);
        }
    }
    platforms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_enabled_fix_binary_handlers_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("qemu-riscv64"), "disabled\nflags: PF\n").unwrap();
        std::fs::write(dir.path().join("qemu-s390x"), "enabled\nflags: P\n").unwrap();
        let platforms: Vec<String> = runnable_platforms_in(dir.path()).iter().map(|p| p.to_string()).collect();
        assert_eq!(platforms[0], Platform::host().to_string());
        assert!(platforms.contains(&"linux/arm64".to_string()) || Platform::host().architecture == "arm64");
        assert!(!platforms.contains(&"linux/riscv64".to_string()), "disabled");
        assert!(!platforms.contains(&"linux/s390x".to_string()), "no fix-binary flag: would not run in a container");
    }
}
