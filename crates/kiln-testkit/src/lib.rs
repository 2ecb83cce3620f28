//! Helpers shared by integration tests: real parts, started and torn down per test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_cas::BlobStore;
use kiln_layer::{Compression, TarOptions, export_layer};
use kiln_registry::{OCI_CONFIG, OCI_MANIFEST};
use kiln_types::{Digest, ImageReference};

/// A `docker-registry` on a free loopback port with its storage in a temporary directory;
/// killed on drop.
pub struct TestRegistry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts the registry and waits until it accepts connections.
    pub fn start() -> TestRegistry {
        TestRegistry::start_with_auth(None)
    }

    /// Starts a registry that demands basic authentication as `user`/`password` (htpasswd
    /// with bcrypt, hashed by Python's `crypt`) when given.
    pub fn start_with_auth(auth: Option<(&str, &str)>) -> TestRegistry {
        let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("an address").port();
        let addr = format!("127.0.0.1:{port}");
        let dir = tempfile::tempdir().expect("registry directory");
        let config = format!(
            "version: 0.1\nlog: {{ level: error }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\n  delete: {{ enabled: true }}\nhttp: {{ addr: {addr} }}\n",
            dir.path().join("data").display()
        );
        let mut config = config;
        if let Some((user, password)) = auth {
            let hash = Command::new("python3")
                .args([
                    "-W",
                    "ignore",
                    "-c",
                    "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
                ])
                .arg(password)
                .output()
                .expect("python3 runs");
            let hash = String::from_utf8(hash.stdout).expect("a bcrypt hash");
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{}", hash.trim())).expect("htpasswd");
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n", htpasswd.display()));
        }
        std::fs::write(dir.path().join("config.yml"), config).expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed (cargo xtask ci installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start on {addr}");
            std::thread::sleep(Duration::from_millis(10));
        }
        TestRegistry { child, addr, dir }
    }

    /// `ADDR/name` as a reference.
    pub fn reference(&self, name: &str) -> ImageReference {
        format!("{}/{name}", self.addr).parse().expect("a valid reference")
    }

    /// The registry's storage directory (to corrupt blobs on purpose).
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// How many blobs (layers, configs and manifests) the registry stores.
    pub fn blob_count(&self) -> usize {
        fn count(dir: &std::path::Path) -> usize {
            std::fs::read_dir(dir).map_or(0, |entries| {
                entries
                    .flatten()
                    .map(|e| if e.path().is_dir() { count(&e.path()) } else { usize::from(e.file_name() == "data") })
                    .sum()
            })
        }
        count(&self.data().join("docker/registry/v2/blobs"))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arm64 static busybox `cargo xtask ci` fetches (`$KILN_ARM64_BUSYBOX` overrides).
pub fn arm64_busybox() -> PathBuf {
    std::env::var_os("KILN_ARM64_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-arm64/busybox"))
}

/// Like [`busybox_rootfs`] with the arm64 busybox (runs here through qemu-user-static).
pub fn arm64_busybox_rootfs(rootfs: &Path) {
    busybox_rootfs(rootfs);
    let binary = arm64_busybox();
    std::fs::copy(&binary, rootfs.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("{}: {e} (cargo xtask ci fetches the arm64 busybox)", binary.display()));
}

/// Fills `rootfs` with a static busybox, its applets, and root/nobody users.
pub fn busybox_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    std::fs::create_dir_all(rootfs.join("etc")).expect("etc");
    std::fs::create_dir_all(rootfs.join("tmp")).expect("tmp");
    let sticky = std::os::unix::fs::PermissionsExt::from_mode(0o1777);
    std::fs::set_permissions(rootfs.join("tmp"), sticky).expect("tmp mode");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed (cargo xtask ci)");
    let applets = Command::new("/bin/busybox").arg("--list").output().expect("busybox runs");
    for applet in String::from_utf8_lossy(&applets.stdout).lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .expect("passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
}

/// Stores a one-layer image of `rootfs` for `platform` (e.g. `linux/amd64`) in the blob
/// store; returns the manifest digest.
pub fn store_image(cas: &BlobStore, rootfs: &Path, platform: &str) -> Digest {
    let layer =
        export_layer(rootfs, cas, Compression::Gzip, &TarOptions { source_date_epoch: Some(0) }).expect("layer");
    let (os, arch) = platform.split_once('/').expect("os/arch");
    let config = serde_json::json!({
        "architecture": arch, "os": os,
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id.to_string()]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "kiln-testkit busybox rootfs"}]
    });
    let config = cas.put(&serde_json::to_vec(&config).expect("json"), None).expect("config");
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest.to_string(), "size": config.size},
        "layers": [{"mediaType": Compression::Gzip.oci_media_type(), "digest": layer.digest.to_string(), "size": layer.size}]
    });
    cas.put(&serde_json::to_vec(&manifest).expect("json"), None).expect("manifest").digest
}

/// The `kiln-runner` executable (see [`workspace_binary`]).
pub fn runner_binary() -> PathBuf {
    workspace_binary("kiln-runner")
}

/// A binary of this workspace (`kiln-runner`, `kilnd`, `kiln`), built on demand when this test
/// binary's package did not build it (`cargo test -p SOME-CRATE` builds only that crate's).
pub fn workspace_binary(name: &str) -> PathBuf {
    if let Some(path) = locate_binary(name) {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--bin", name])
        .current_dir(workspace)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {name} failed");
    locate_binary(name).unwrap_or_else(|| panic!("{name} was just built"))
}

fn locate_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)].into_iter().find(|p| p.is_file())
}

/// Mount points under `root` in this process's mount table.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = root.display().to_string();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|p| p.starts_with(&root))
        .map(str::to_string)
        .collect()
}
