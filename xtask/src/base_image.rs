//! `cargo xtask base-image`: a small busybox image (linux/amd64 and linux/arm64) as an OCI
//! layout, pushed to a local registry that this command starts when none answers.
//!
//! The layer is built from Debian's `busybox-static` with GNU tar in a reproducible way
//! (sorted names, fixed times and owners), so every machine gets the same digests.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::{setup, workspace_root};

/// Where the local registry listens unless `KILN_REGISTRY` says otherwise.
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:5000";
/// The repository and tag the base image is pushed as.
pub const IMAGE_NAME: &str = "kiln/busybox:latest";

/// Builds the layout, makes sure a registry runs, pushes, and returns the image reference.
pub fn run() -> anyhow::Result<String> {
    setup::ensure_packages()?;
    setup::ensure_arm64()?;
    let out = workspace_root().join("target/kiln-base");
    let layout = build_layout(&out)?;
    let registry = std::env::var("KILN_REGISTRY").unwrap_or_else(|_| DEFAULT_REGISTRY.to_string());
    ensure_registry(&registry)?;
    let reference = format!("{registry}/{IMAGE_NAME}");
    let status = Command::new("skopeo")
        .args(["copy", "--quiet", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:busybox", layout.display()))
        .arg(format!("docker://{reference}"))
        .status()
        .context("running skopeo")?;
    if !status.success() {
        bail!("skopeo copy to {reference} failed with {status}");
    }
    Ok(reference)
}

/// Builds `OUT/oci`, an OCI layout whose `busybox` tag is an index of a linux/amd64 and a
/// linux/arm64 image (Debian's busybox-static of each architecture).
pub fn build_layout(out: &Path) -> anyhow::Result<PathBuf> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    let layout = out.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut manifests = Vec::new();
    for (architecture, busybox) in [("amd64", PathBuf::from("/bin/busybox")), ("arm64", setup::arm64_busybox())] {
        let (digest, size) = build_image(out, &blobs, architecture, &busybox)?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "platform": {"architecture": architecture, "os": "linux"}
        }));
    }
    let image_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests
    });
    let (index_digest, index_size) = write_blob(&blobs, &serde_json::to_vec(&image_index)?)?;
    let layout_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index_size,
            "annotations": {"org.opencontainers.image.ref.name": "busybox"}
        }]
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&layout_index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(layout)
}

/// One platform's image: rootfs, reproducible layer, config and manifest in `blobs`.
fn build_image(out: &Path, blobs: &Path, architecture: &str, busybox: &Path) -> anyhow::Result<(String, u64)> {
    let rootfs = out.join(format!("rootfs-{architecture}"));
    build_rootfs(&rootfs, busybox)?;
    let layer_tar = out.join(format!("layer-{architecture}.tar"));
    let tar = Command::new("tar")
        .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer_tar)
        .arg(".")
        .status()
        .context("running tar")?;
    if !tar.success() {
        bail!("tar failed with {tar}");
    }
    let gzip = Command::new("gzip").args(["-n", "-6", "-k"]).arg(&layer_tar).status().context("running gzip")?;
    if !gzip.success() {
        bail!("gzip failed with {gzip}");
    }
    let diff_id = sha256_file(&layer_tar)?;
    let layer_gz = out.join(format!("layer-{architecture}.tar.gz"));
    let layer_digest = sha256_file(&layer_gz)?;
    let layer_size = std::fs::metadata(&layer_gz)?.len();
    std::fs::rename(&layer_gz, blobs.join(&layer_digest[7..]))?;
    let config = serde_json::json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"]
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask base-image (Debian busybox-static)"}]
    });
    let (config_digest, config_size) = write_blob(blobs, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}]
    });
    write_blob(blobs, &serde_json::to_vec(&manifest)?)
}

/// A root filesystem with busybox, its applets as symlinks, and the usual directories.
fn build_rootfs(rootfs: &Path, busybox: &Path) -> anyhow::Result<()> {
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "var", "home", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    set_mode(&rootfs.join("tmp"), 0o1777)?;
    set_mode(&rootfs.join("root"), 0o700)?;
    std::fs::copy(busybox, rootfs.join("bin/busybox")).with_context(|| format!("copying {}", busybox.display()))?;
    let list = Command::new("/bin/busybox").arg("--list-full").output().context("listing busybox applets")?;
    for applet in String::from_utf8(list.stdout)?.lines().filter(|a| *a != "bin/busybox") {
        let link = rootfs.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).with_context(|| format!("linking {applet}"))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?)
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> anyhow::Result<(String, u64)> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    std::fs::write(blobs.join(&digest[7..]), bytes)?;
    Ok((digest, bytes.len() as u64))
}

/// Whether a registry answers `GET /v2/` at `addr`.
pub fn registry_answers(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// The shared registry's directory (its config, data and log): `KILN_REGISTRY_DIR`, by
/// default `/var/lib/kiln-registry`.
pub fn registry_dir() -> PathBuf {
    PathBuf::from(std::env::var("KILN_REGISTRY_DIR").unwrap_or_else(|_| "/var/lib/kiln-registry".into()))
}

/// Removes the repositories under `prefix/` from the shared registry and collects the blobs
/// nothing references any more (the registry's own `garbage-collect`). Only while nothing
/// pushes to it.
pub fn prune_registry(prefix: &str) -> anyhow::Result<()> {
    let dir = registry_dir();
    let repositories = dir.join("data/docker/registry/v2/repositories").join(prefix);
    if !repositories.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(&repositories).with_context(|| format!("removing {}", repositories.display()))?;
    let collected = Command::new("docker-registry")
        .arg("garbage-collect")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running docker-registry garbage-collect")?;
    if !collected.success() {
        bail!("docker-registry garbage-collect {} failed: {collected}", dir.join("config.yml").display());
    }
    Ok(())
}

/// Starts Debian's `docker-registry` on `addr` in its own process group, so it outlives
/// this command, unless a registry already answers there.
pub fn ensure_registry(addr: &str) -> anyhow::Result<()> {
    if registry_answers(addr) {
        return Ok(());
    }
    let dir = registry_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{ level: warn }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\n  delete: {{ enabled: true }}\nhttp: {{ addr: {addr} }}\n",
            dir.join("data").display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("registry.log"))?;
    Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting docker-registry")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !registry_answers(addr) {
        if Instant::now() > deadline {
            bail!("docker-registry did not answer on {addr} within 10 s; see {}", dir.join("registry.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("started docker-registry on {addr} (data in {})", dir.display());
    Ok(())
}
