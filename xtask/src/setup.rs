//! What a fresh machine lacks for the tests and the demo: Debian packages, installed once.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages the tests use, with a file that shows each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("busybox-static", "/bin/busybox"),
    ("docker-registry", "/usr/bin/docker-registry"),
    ("skopeo", "/usr/bin/skopeo"),
    // Docker's BuildKit: the reference the engine's output is compared with.
    ("docker.io", "/usr/sbin/dockerd"),
    // arm64 binaries on this x86-64 machine, for multi-platform builds.
    ("qemu-user-static", "/usr/bin/qemu-aarch64-static"),
    ("binfmt-support", "/usr/sbin/update-binfmts"),
    // A virtual environment for the S3 server the cache tests use (moto, from PyPI).
    ("python3-venv", "/usr/share/doc/python3-venv/copyright"),
    // The seccomp library the runner links (it compiles the steps' filter).
    ("libseccomp-dev", "/usr/include/seccomp.h"),
    // An XFS filesystem in a file: a context's files are reflinked from the blob store there.
    ("xfsprogs", "/usr/sbin/mkfs.xfs"),
    ("pkg-config", "/usr/bin/pkg-config"),
    // The isolated network of RUN steps: namespaces, veth pairs, masquerading.
    ("iproute2", "/usr/sbin/ip"),
    ("iptables", "/usr/sbin/iptables"),
    // deploy/compose.yaml is checked with it; openssl reads the chart's certificates.
    ("docker-compose", "/usr/bin/docker-compose"),
    ("openssl", "/usr/bin/openssl"),
    // The web UI's tests drive a real headless browser over WebDriver.
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
];

/// The Helm library (Helm 4's SDK over its C ABI: no helm binary, no network) and the
/// Kubernetes schemas the chart's tests use, from PyPI.
const HELM_TOOLS: &[&str] = &["helm-python-sdk==0.2.2", "kubernetes-validate==1.37.0", "PyYAML==6.0.4"];

/// The virtual environment with [`HELM_TOOLS`], made when missing; returns its python.
pub fn ensure_helm_tools() -> anyhow::Result<std::path::PathBuf> {
    let venv = crate::workspace_root().join("target/kiln-helm");
    let python = venv.join("bin/python");
    let marker = venv.join("kiln-tools.txt");
    let wanted = HELM_TOOLS.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|installed| installed == wanted) {
        return Ok(python);
    }
    run("python3", &["-m", "venv", venv.to_str().unwrap_or_default()])?;
    let pip = venv.join("bin/pip");
    let mut args = vec!["install", "--quiet"];
    args.extend_from_slice(HELM_TOOLS);
    run(pip.to_str().unwrap_or_default(), &args)?;
    std::fs::write(&marker, wanted)?;
    Ok(python)
}

/// The moto release the S3 tests run against.
const MOTO_VERSION: &str = "5.2.1";

/// Where `moto_server` is installed when the machine has none on its PATH (kiln-testkit
/// looks here too).
pub fn moto_venv() -> std::path::PathBuf {
    crate::workspace_root().join("target/kiln-moto")
}

/// Makes an S3-compatible server available to the tests: `moto_server` from PyPI in a
/// virtual environment under `target/`, unless one is on the PATH already.
pub fn ensure_moto() -> anyhow::Result<()> {
    let on_path = Command::new("moto_server").arg("--help").output().is_ok_and(|o| o.status.success());
    let venv = moto_venv();
    if on_path || venv.join("bin/moto_server").exists() {
        return Ok(());
    }
    run("python3", &["-m", "venv", venv.to_str().unwrap_or_default()])?;
    let pip = venv.join("bin/pip");
    let package = format!("moto[server]=={MOTO_VERSION}");
    run(pip.to_str().unwrap_or_default(), &["install", "--quiet", &package])
}

/// Where the arm64 busybox lands (tests and the base image read it from here).
pub fn arm64_busybox() -> std::path::PathBuf {
    crate::workspace_root().join("target/kiln-arm64/busybox")
}

/// Makes arm64 binaries runnable here (binfmt_misc with qemu's fix-binary flag, so they also
/// run inside containers) and fetches Debian's arm64 `busybox-static`.
pub fn ensure_arm64() -> anyhow::Result<()> {
    let binfmt = Path::new("/proc/sys/fs/binfmt_misc");
    if !binfmt.join("register").exists() {
        run("mount", &["-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])?;
    }
    if !binfmt.join("qemu-aarch64").exists() {
        run("update-binfmts", &["--enable", "qemu-aarch64"])?;
    }
    let busybox = arm64_busybox();
    if busybox.exists() {
        return Ok(());
    }
    let dir = busybox.parent().expect("has a parent").to_path_buf();
    std::fs::create_dir_all(&dir)?;
    let architectures = Command::new("dpkg").arg("--print-foreign-architectures").output()?;
    if !String::from_utf8_lossy(&architectures.stdout).lines().any(|a| a == "arm64") {
        run("dpkg", &["--add-architecture", "arm64"])?;
        run("apt-get", &["update", "-qq"])?;
    }
    let download =
        Command::new("apt-get").args(["download", "-qq", "busybox-static:arm64"]).current_dir(&dir).status()?;
    if !download.success() {
        run("apt-get", &["update", "-qq"])?;
        let retry =
            Command::new("apt-get").args(["download", "-qq", "busybox-static:arm64"]).current_dir(&dir).status()?;
        if !retry.success() {
            bail!("apt-get download busybox-static:arm64 failed");
        }
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("the downloaded busybox-static:arm64 package")?;
    let unpacked = dir.join("deb");
    run("dpkg-deb", &["-x", deb.to_str().unwrap_or_default(), unpacked.to_str().unwrap_or_default()])?;
    std::fs::rename(unpacked.join("bin/busybox"), &busybox)?;
    let _ = std::fs::remove_dir_all(&unpacked);
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Installs whichever of [`PACKAGES`] are missing.
pub fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PACKAGES.iter().filter(|(_, marker)| !Path::new(marker).exists()).map(|(package, _)| *package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("$ apt-get install {}", missing.join(" "));
    let update = Command::new("apt-get").args(["update", "-qq"]).status().context("running apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed with {update}");
    }
    let install = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !install.success() {
        bail!("apt-get install {} failed with {install}", missing.join(" "));
    }
    Ok(())
}

/// The cargo-deny release the licence and ban checks run with.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Installs cargo-deny from crates.io when it is missing (a few minutes, once per machine).
pub fn ensure_cargo_deny() -> anyhow::Result<()> {
    let installed = Command::new("cargo").args(["deny", "--version"]).output();
    if installed.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DENY_VERSION)) {
        return Ok(());
    }
    run("cargo", &["install", "--locked", "--quiet", "cargo-deny", "--version", CARGO_DENY_VERSION])
}
