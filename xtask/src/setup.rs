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
];

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
