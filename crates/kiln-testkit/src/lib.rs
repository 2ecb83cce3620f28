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

    /// Unlinks a blob from a repository through the registry's API (the blob stays in the
    /// registry's storage for other repositories).
    pub fn delete_blob(&self, repository: &str, digest: &Digest) {
        use std::io::{Read as _, Write as _};
        let addr = &self.addr;
        let mut stream = std::net::TcpStream::connect(addr).expect("the registry answers");
        write!(stream, "DELETE /v2/{repository}/blobs/{digest} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .expect("a request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("an answer");
        let status = answer.lines().next().unwrap_or_default();
        assert!(status.contains(" 202 "), "deleting {digest} from {repository}: {status}");
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

/// An S3-compatible server (`moto_server`, from PyPI) on a free loopback port with one empty
/// bucket; killed on drop. Clients authenticate with any key: set [`TestS3::ENV`].
pub struct TestS3 {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
}

impl TestS3 {
    /// The AWS environment a client of this server needs.
    pub const ENV: [(&str, &str); 3] = [
        ("AWS_ACCESS_KEY_ID", "kiln-test"),
        ("AWS_SECRET_ACCESS_KEY", "kiln-test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];

    /// Starts the server, waits until it answers and creates `bucket`.
    pub fn start(bucket: &str) -> TestS3 {
        let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("an address").port();
        let addr = format!("127.0.0.1:{port}");
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-moto/bin/moto_server");
        let program = if venv.exists() { venv } else { PathBuf::from("moto_server") };
        let mut child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moto_server is installed (cargo xtask ci installs it)");
        // Python takes a while to start: wait for the line it prints once it listens. The
        // reader keeps draining its request log, which would otherwise fill the pipe.
        let stderr = child.stderr.take().expect("piped");
        let started = wait_for_line(stderr, "Running on", None, Duration::from_secs(60));
        let server = TestS3 { child, endpoint: format!("http://{addr}"), bucket: bucket.to_string() };
        started.expect("moto_server did not start listening");
        server.request("PUT", &format!("/{bucket}")).expect("creating the bucket");
        server
    }

    /// A `--cache-to`/`--cache-from` spec for the cache `name` in the bucket.
    pub fn cache_spec(&self, name: &str) -> String {
        format!(
            "type=s3,bucket={},region=us-east-1,endpoint_url={},name={name},use_path_style=true",
            self.bucket, self.endpoint
        )
    }

    /// The keys stored in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let listing = self.request("GET", &format!("/{}?list-type=2", self.bucket)).expect("listing the bucket");
        String::from_utf8_lossy(&listing)
            .split("<Key>")
            .skip(1)
            .filter_map(|part| part.split_once("</Key>"))
            .map(|(key, _)| key.to_string())
            .collect()
    }

    /// An object's bytes.
    pub fn get(&self, key: &str) -> Vec<u8> {
        let response = self.request("GET", &format!("/{}/{key}", self.bucket)).expect("reading an object");
        let body = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |at| at + 4);
        response[body..].to_vec()
    }

    /// Deletes an object (a blob lost from the cache).
    pub fn delete(&self, key: &str) {
        self.request("DELETE", &format!("/{}/{key}", self.bucket)).expect("deleting an object");
    }

    /// One HTTP/1.1 request with a made-up signature (moto does not check signatures); the
    /// response on a 2xx.
    fn request(&self, method: &str, path: &str) -> std::io::Result<Vec<u8>> {
        use std::io::{Read as _, Write as _};
        let addr = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        // Anonymous requests may not read private objects; any credential may.
        let auth =
            "AWS4-HMAC-SHA256 Credential=kiln-test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let head = String::from_utf8_lossy(&response[..response.len().min(200)]).into_owned();
        if !head.split(' ').nth(1).unwrap_or("").starts_with('2') {
            return Err(std::io::Error::other(format!("{method} {path}: {}", head.lines().next().unwrap_or(""))));
        }
        Ok(response)
    }
}

impl Drop for TestS3 {
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

/// Drains `stream` (a child's output) on a thread, appending each line to `log` when given,
/// and waits up to `within` for a line containing `needle`: the event a starting server prints
/// once it listens. An error says the stream ended or the time ran out first.
pub fn wait_for_line(
    stream: impl std::io::Read + Send + 'static,
    needle: &str,
    log: Option<&Path>,
    within: Duration,
) -> Result<(), String> {
    use std::io::Write as _;
    let mut log = log.map(|path| std::fs::File::create(path).expect("creating the log"));
    let (seen, heard) = std::sync::mpsc::channel();
    let wanted = needle.to_string();
    std::thread::spawn(move || {
        let mut seen = Some(seen);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
            if let Some(log) = &mut log {
                let _ = writeln!(log, "{line}");
            }
            if line.contains(&wanted) {
                seen.take().map(|s| s.send(()));
            }
        }
    });
    heard.recv_timeout(within).map_err(|e| match e {
        std::sync::mpsc::RecvTimeoutError::Timeout => format!("no line with {needle:?} within {within:?}"),
        std::sync::mpsc::RecvTimeoutError::Disconnected => format!("the output ended before a line with {needle:?}"),
    })
}

/// The whole response (status line, headers, body) to `GET path` from a plain-HTTP server at
/// `address` (HTTP/1.0, read to the end); `None` when nothing listens there (yet).
pub fn http_response(address: &str, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").expect("sending the request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reading the response");
    Some(response)
}

/// `GET path` from a plain-HTTP server at `address`: the status and the body; status 0 and
/// the error when nothing listens there (yet).
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    let Some(response) = http_response(address, path) else {
        return (0, format!("connecting to {address}: nothing answers"));
    };
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (status, body)
}

/// The value of the sample `series` (`name` or `name{label="value",...}`, labels in the
/// order Prometheus' text format sorts them) in a `/metrics` page; panics, showing the page,
/// when the page lacks it.
pub fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
}

/// `python3 -m http.server` on a loopback port of its own choosing (port 0, read back from
/// its banner, so no other test can take the port in between), serving a directory; killed
/// on drop.
pub struct HttpServer {
    child: std::process::Child,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
}

impl HttpServer {
    /// Serves `dir`.
    pub fn start(dir: &Path) -> HttpServer {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new("python3")
            .args(["-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        let mut banner = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut banner).unwrap();
        let port = banner
            .split_whitespace()
            .skip_while(|word| *word != "port")
            .nth(1)
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("http.server banner without a port: {banner:?}"));
        HttpServer { child, port }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes the host's busybox as a linux/amd64 image to `registry` under `name`
/// (`REPOSITORY:TAG`), its files staged under `dir`; returns the image's reference.
pub fn push_busybox(registry: &TestRegistry, dir: &Path, name: &str) -> String {
    let cas = std::sync::Arc::new(
        BlobStore::open(&dir.join("image-cas"), std::sync::Arc::new(kiln_kv::MemoryKv::new())).unwrap(),
    );
    busybox_rootfs(&dir.join("rootfs"));
    let manifest = store_image(&cas, &dir.join("rootfs"), "linux/amd64");
    let reference = registry.reference(name);
    let client = kiln_registry::RegistryClient::new(kiln_registry::RegistryOptions::default()).unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(client.push(&reference, &manifest, &cas)).unwrap();
    reference.to_string()
}
