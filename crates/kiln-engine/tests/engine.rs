//! Whole builds through the engine: a real registry, real containers, every output type,
//! checked with skopeo and tar as independent readers.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_engine::{BuildRequest, Engine, EngineConfig, OutputSpec};
use kiln_kv::MemoryKv;
use kiln_model::{BuildEvent, Status};
use kiln_registry::{RegistryClient, RegistryOptions};
use kiln_testkit::{TestRegistry, busybox_rootfs, runner_binary, store_image};
use kiln_worker::WorkerConfig;
use tokio::sync::mpsc;

struct Fixture {
    registry: TestRegistry,
    base: String,
    dir: tempfile::TempDir,
    engine: Engine,
}

impl Fixture {
    async fn new() -> Fixture {
        let registry = TestRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let cas = BlobStore::open(&dir.path().join("image-cas"), Arc::new(MemoryKv::new())).unwrap();
        busybox_rootfs(&dir.path().join("rootfs"));
        let manifest = store_image(&cas, &dir.path().join("rootfs"), "linux/amd64");
        let base = registry.reference("kiln/busybox:engine");
        RegistryClient::new(RegistryOptions::default()).unwrap().push(&base, &manifest, &Arc::new(cas)).await.unwrap();
        let mut worker = WorkerConfig::new(&dir.path().join("engine")).unwrap();
        worker.runner = runner_binary();
        worker.cgroup_parent = "/kiln-engine-test".into();
        let engine = Engine::start(EngineConfig {
            worker,
            parallelism: kiln_engine::Parallelism::Fixed(4),
            name: "local".into(),
            platforms: vec![],
        })
        .unwrap();
        Fixture { base: base.to_string(), registry, dir, engine }
    }

    fn request(&self, dockerfile: &str, files: &[(&str, &str)], outputs: Vec<OutputSpec>) -> BuildRequest {
        let context = self.dir.path().join("context");
        std::fs::create_dir_all(&context).unwrap();
        for (name, content) in files {
            std::fs::write(context.join(name), content).unwrap();
        }
        BuildRequest {
            dockerfile: dockerfile.replace("BASE", &self.base),
            file_name: "Dockerfile".into(),
            context,
            outputs,
            ..BuildRequest::default()
        }
    }

    async fn build(
        &self,
        request: BuildRequest,
    ) -> (Result<kiln_engine::BuildSummary, kiln_engine::BuildFailure>, Vec<BuildEvent>) {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let result = self.engine.build(request, None, sender).await;
        let mut progress = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            progress.push(event);
        }
        (result, progress)
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Unpacks every layer of an OCI layout's only image into `dest` with GNU tar (whiteouts
/// are not expected in these images).
fn unpack_layout(layout: &Path, dest: &Path) {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    std::fs::create_dir_all(dest).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let path = blob(layer["digest"].as_str().unwrap());
        run("tar", &["-xzf", path.to_str().unwrap(), "-C", dest.to_str().unwrap()]);
    }
}

/// A file of one architecture's image in a pushed index, as skopeo pulls it.
fn pulled_file(fixture: &Fixture, reference: &str, arch: &str, path: &str) -> String {
    let layout = fixture.dir.path().join(format!("pulled-{}-{arch}", reference.replace(['/', ':'], "_")));
    let source = format!("docker://{reference}");
    let dest = format!("oci:{}:x", layout.display());
    run("skopeo", &["copy", "--override-arch", arch, "--src-tls-verify=false", &source, &dest]);
    let rootfs = layout.with_extension("rootfs");
    unpack_layout(&layout, &rootfs);
    std::fs::read_to_string(rootfs.join(path)).unwrap()
}

#[tokio::test]
async fn a_build_exports_to_every_output_type_and_other_clients_read_them() {
    let fixture = Fixture::new().await;
    let out = fixture.dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let pushed = format!("{}/kiln/app:v1", fixture.registry.addr);
    let outputs = vec![
        OutputSpec::parse(&format!("type=image,name={pushed},push=true")).unwrap(),
        OutputSpec::parse(&format!("type=oci,dest={}", out.join("oci.tar").display())).unwrap(),
        OutputSpec::parse(&format!("type=docker,dest={},name=kiln/app:v1", out.join("docker.tar").display())).unwrap(),
        OutputSpec::parse(&format!("type=local,dest={}", out.join("local").display())).unwrap(),
        OutputSpec::parse(&format!("type=tar,dest={}", out.join("files.tar").display())).unwrap(),
    ];
    let dockerfile = "\
FROM BASE AS build
RUN mkdir -p /out && echo compiled > /out/app
FROM BASE
ENV GREETING=hello
WORKDIR /srv
COPY --from=build /out/app ./app
COPY notes.txt /srv/
LABEL org.example=kiln
EXPOSE 8080
CMD [\"cat\", \"/srv/app\"]
";
    let request = fixture.request(dockerfile, &[("notes.txt", "notes\n")], outputs);
    let (result, progress) = fixture.build(request).await;
    let summary = result.unwrap();
    assert!(summary.image.is_some());
    assert!(
        progress
            .iter()
            .any(|p| matches!(p, BuildEvent::Export { name, completed: Some(_), .. } if name.starts_with("pushing")))
    );

    // Another client reads the pushed image: config and files.
    let inspect: serde_json::Value = serde_json::from_str(&run(
        "skopeo",
        &["inspect", "--config", "--tls-verify=false", &format!("docker://{pushed}")],
    ))
    .unwrap();
    let config = &inspect["config"];
    assert!(config["Env"].as_array().unwrap().iter().any(|e| e == "GREETING=hello"), "{config}");
    assert_eq!(config["WorkingDir"], "/srv");
    assert_eq!(config["Cmd"], serde_json::json!(["cat", "/srv/app"]));
    assert_eq!(config["Labels"]["org.example"], "kiln");
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    // `docker history`: the base image's entry, then one per instruction that made a layer.
    let history: Vec<&str> =
        inspect["history"].as_array().unwrap().iter().map(|h| h["created_by"].as_str().unwrap()).collect();
    assert_eq!(history.first(), Some(&"kiln-testkit busybox rootfs"), "{history:?}");
    for instruction in ["WORKDIR /srv # kiln", "COPY --from=build /out/app ./app # kiln", "COPY notes.txt /srv/ # kiln"]
    {
        assert!(history.contains(&instruction), "{instruction:?} missing from {history:?}");
    }
    let layers = inspect["rootfs"]["diff_ids"].as_array().unwrap().len();
    let non_empty = inspect["history"].as_array().unwrap().iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(layers, non_empty, "one non-empty history entry per layer");
    let layout = fixture.dir.path().join("pulled");
    run(
        "skopeo",
        &["copy", "--src-tls-verify=false", &format!("docker://{pushed}"), &format!("oci:{}:app", layout.display())],
    );
    let rootfs = fixture.dir.path().join("pulled-rootfs");
    unpack_layout(&layout, &rootfs);
    assert_eq!(std::fs::read_to_string(rootfs.join("srv/app")).unwrap(), "compiled\n");
    assert_eq!(std::fs::read_to_string(rootfs.join("srv/notes.txt")).unwrap(), "notes\n");
    assert!(rootfs.join("bin/busybox").exists());

    // The tarballs are images skopeo understands; local and tar hold the same files.
    run("skopeo", &["inspect", &format!("oci-archive:{}", out.join("oci.tar").display())]);
    let docker = run("skopeo", &["inspect", &format!("docker-archive:{}", out.join("docker.tar").display())]);
    assert!(docker.contains("\"Architecture\": \"amd64\""), "{docker}");
    assert_eq!(std::fs::read_to_string(out.join("local/srv/app")).unwrap(), "compiled\n");
    let listing = run("tar", &["-tf", out.join("files.tar").to_str().unwrap()]);
    assert!(listing.lines().any(|l| l == "srv/app") && listing.lines().any(|l| l == "bin/busybox"), "{listing}");
}

#[tokio::test]
async fn base_image_config_reaches_the_graph_and_failures_name_the_line() {
    let fixture = Fixture::new().await;
    let parent = format!("{}/kiln/parent:v1", fixture.registry.addr);
    let outputs = vec![OutputSpec::parse(&format!("type=image,name={parent},push=true")).unwrap()];
    let request = fixture.request("FROM BASE\nENV FROM_PARENT=inherited\nUSER nobody\nWORKDIR /tmp\n", &[], outputs);
    fixture.build(request).await.0.unwrap();

    let out = fixture.dir.path().join("child");
    let outputs = vec![OutputSpec::Local { dest: out.clone() }];
    let dockerfile = format!("FROM {parent}\nRUN echo \"$FROM_PARENT $(id -u) $(pwd)\" > /tmp/seen\n");
    let (result, _) = fixture.build(fixture.request(&dockerfile, &[], outputs.clone())).await;
    result.unwrap();
    assert_eq!(std::fs::read_to_string(out.join("tmp/seen")).unwrap(), "inherited 65534 /tmp\n");

    let (result, _) = fixture.build(fixture.request(&dockerfile, &[], outputs)).await;
    assert!(result.unwrap().records.iter().all(|r| r.status == Status::Cached), "second build fully cached");

    let failing = "FROM BASE\nRUN echo preparing\nRUN echo about to fail && exit 4\n";
    let (result, _) = fixture.build(fixture.request(failing, &[], vec![])).await;
    let failure = result.unwrap_err();
    for expected in ["(line 3)", "exit code: 4", "about to fail"] {
        assert!(failure.message.contains(expected), "{expected:?} missing: {}", failure.message);
    }
    assert_eq!(failure.records.iter().filter(|r| r.status == Status::Failed).count(), 1);

    let (result, _) = fixture.build(fixture.request("FROM BASE\nCOPY missing.txt /\n", &[], vec![])).await;
    let message = result.unwrap_err().message;
    assert!(message.contains("Dockerfile:2") && message.contains("missing.txt"), "{message}");

    // More layers than one overlay mount stacks: refused before any step runs.
    let deep = format!("FROM BASE\nRUN echo first > /first\n{}", "RUN true\n".repeat(kiln_layer::MAX_LAYERS));
    let (result, _) = fixture.build(fixture.request(&deep, &[], vec![])).await;
    let failure = result.unwrap_err();
    let last = kiln_layer::MAX_LAYERS + 2;
    assert!(failure.message.contains(&format!("(line {last})")), "{}", failure.message);
    assert!(failure.message.contains("would stack 501 layers"), "{}", failure.message);
    assert!(failure.records.is_empty(), "nothing ran");
}

/// A private `dockerd` (Debian's docker.io) with its state in a temporary directory; stopped
/// on drop.
struct Dockerd {
    child: std::process::Child,
    socket: String,
    _dir: tempfile::TempDir,
}

impl Dockerd {
    fn start() -> Dockerd {
        let dir = tempfile::Builder::new().prefix("kd").tempdir_in("/tmp").unwrap();
        let socket = format!("unix://{}", dir.path().join("docker.sock").display());
        let child = Command::new("dockerd")
            .args(["--iptables=false", "--bridge=none", "-H", &socket])
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("x"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dockerd is installed (cargo xtask ci installs docker.io)");
        let dockerd = Dockerd { child, socket, _dir: dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !dockerd.docker(&["info"]).status.success() {
            assert!(std::time::Instant::now() < deadline, "dockerd did not start");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        dockerd
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/docker")
            .args(args)
            .env("DOCKER_HOST", &self.socket)
            .env("DOCKER_BUILDKIT", "1")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let output = self.docker(args);
        assert!(output.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

type Entries = std::collections::BTreeMap<String, (u8, u32, u64, u64, String, Vec<u8>)>;

/// Every entry of a filesystem tarball: kind, permission bits, owner, link target, content hash.
fn tar_entries(path: &Path) -> Entries {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut entries = Entries::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name =
            String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").trim_end_matches('/').to_string();
        if name.is_empty() {
            continue;
        }
        let header = entry.header().clone();
        let link = entry.link_name().unwrap().map(|l| l.display().to_string()).unwrap_or_default();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        let value = (
            header.entry_type().as_byte(),
            header.mode().unwrap() & 0o7777,
            header.uid().unwrap(),
            header.gid().unwrap(),
            link,
            sha2::Sha256::digest(&content).to_vec(),
        );
        entries.insert(name, value);
    }
    entries
}

#[tokio::test]
async fn files_match_what_docker_buildkit_builds_from_the_same_dockerfile() {
    let fixture = Fixture::new().await;
    let dockerd = Dockerd::start();
    let archive = fixture.dir.path().join("base.tar");
    run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{}", fixture.base),
            &format!("docker-archive:{}:kiln/busybox:latest", archive.display()),
        ],
    );
    dockerd.ok(&["load", "-i", archive.to_str().unwrap()]);

    // Besides the basics, where Docker 20.10's BuildKit agrees with current BuildKit: ARG
    // values inherited by a child stage and an ARG overriding an earlier ENV, a mount without
    // a target at the working directory, hard links and owners of subdirectories copied from
    // a stage, a new directory copy's mode, context symlinks as sources, several sources and
    // wildcards onto a path without a trailing slash, wildcards matching nothing, an unset
    // --chown.
    let dockerfile = "\
FROM BASE AS build
RUN mkdir -p /out/sub && echo compiled > /out/app && chmod 750 /out/app && ln -s app /out/link && echo deep > /out/sub/f
RUN ln /out/app /out/hard && chown 56:78 /out/sub && mkdir -m 0700 /src7 && echo s > /src7/f
FROM BASE AS argbase
ARG FROM_PARENT=inherited
ENV OVER=env
ARG OVER=arg
ENV AFTER=$OVER
FROM argbase AS argchild
RUN echo \"$FROM_PARENT $OVER $AFTER\" > /args
FROM BASE
WORKDIR /srv
COPY --from=argchild /args ./
RUN --mount=from=build cat out/app > /tmp/mounted
COPY --from=build /out/ ./
COPY --from=build /src7 /dst7
COPY notes.txt ./
COPY notes-link.txt /linked/
COPY notes.txt notes-link.txt /srv/many
COPY note*.txt /srv/wild
COPY notes.txt missing*.txt /srv/optional/
COPY --chown=${UNSET_UID}:${UNSET_GID} notes.txt /srv/owned
COPY notes.txt notes-link.txt /srv/
RUN mkdir -p /data && chown 1234:5678 /data && rm /bin/vi && rm -rf /home && echo changed >> /etc/group
USER nobody
RUN echo as-nobody > /tmp/who
";
    let tarball = fixture.dir.path().join("kiln.tar");
    let image_archive = fixture.dir.path().join("kiln-image.tar");
    let outputs = vec![
        OutputSpec::Tar { dest: tarball.clone() },
        OutputSpec::Docker { dest: image_archive.clone(), names: vec!["kiln/built:v1".into()] },
    ];
    let request = fixture.request(dockerfile, &[("notes.txt", "notes\n")], outputs);
    std::os::unix::fs::symlink("notes.txt", request.context.join("notes-link.txt")).unwrap();
    fixture.build(request).await.0.unwrap();

    let docker_context = fixture.dir.path().join("docker-context");
    std::fs::create_dir_all(&docker_context).unwrap();
    std::os::unix::fs::symlink("notes.txt", docker_context.join("notes-link.txt")).unwrap();
    std::fs::write(docker_context.join("Dockerfile"), dockerfile.replace("BASE", "kiln/busybox:latest")).unwrap();
    std::fs::copy(fixture.dir.path().join("context/notes.txt"), docker_context.join("notes.txt")).unwrap();
    dockerd.ok(&["build", "--network=none", "-q", "-t", "reference", docker_context.to_str().unwrap()]);
    let container = dockerd.ok(&["create", "reference"]);
    let exported = fixture.dir.path().join("docker.tar");
    dockerd.ok(&["export", "-o", exported.to_str().unwrap(), &container]);

    // What `docker create` adds to every container (mountpoints, its own files), not part of
    // the image.
    let container_only = [
        ".dockerenv",
        "etc/hostname",
        "etc/hosts",
        "etc/mtab",
        "etc/resolv.conf",
        "dev",
        "dev/console",
        "dev/pts",
        "dev/shm",
        "proc",
        "sys",
    ];
    let mut theirs = tar_entries(&exported);
    theirs.retain(|name, _| !container_only.contains(&name.as_str()));
    let ours = tar_entries(&tarball);
    let differences: Vec<&String> =
        theirs.keys().chain(ours.keys()).filter(|name| theirs.get(*name) != ours.get(*name)).collect();
    assert!(differences.is_empty(), "entries differ from Docker's BuildKit: {differences:?}");
    assert!(ours.contains_key("srv/sub/f") && ours.contains_key("tmp/who") && !ours.contains_key("bin/vi"));

    // `docker load` reads the type=docker tarball, and Docker runs the image as Kiln built it.
    let loaded = dockerd.ok(&["load", "-i", image_archive.to_str().unwrap()]);
    assert!(loaded.contains("kiln/built:v1"), "{loaded}");
    let script = "cat /tmp/who; id -u; pwd; ls -l /srv/app | cut -c1-10; cat /srv/sub/f";
    let ran = dockerd.ok(&["run", "--rm", "--network=none", "kiln/built:v1", "sh", "-c", script]);
    assert_eq!(ran, "as-nobody\n65534\n/srv\n-rwxr-x---\ndeep");
}

#[tokio::test]
async fn a_multi_platform_request_exports_one_index() {
    let fixture = Fixture::new().await;
    // Only build-platform stages run: the target stages are scratch plus a COPY, so no
    // emulation is needed to produce an arm64 image here.
    let dockerfile = "\
FROM --platform=$BUILDPLATFORM BASE AS build
ARG TARGETARCH
RUN mkdir /out && echo \"built for $TARGETARCH\" > /out/target
FROM scratch
COPY --from=build /out/ /
";
    let pushed = format!("{}/kiln/multi:v1", fixture.registry.addr);
    let mut request = fixture.request(
        dockerfile,
        &[],
        vec![OutputSpec::parse(&format!("type=image,name={pushed},push=true,oci-mediatypes=true")).unwrap()],
    );
    request.platforms = vec!["linux/amd64".parse().unwrap(), "linux/arm64".parse().unwrap()];
    fixture.build(request).await.0.unwrap();

    let raw: serde_json::Value = serde_json::from_str(&run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &format!("docker://{pushed}")],
    ))
    .unwrap();
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json");
    let platforms: Vec<String> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!("{}/{}", m["platform"]["os"].as_str().unwrap(), m["platform"]["architecture"].as_str().unwrap())
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    for (arch, expected) in [("arm64", "built for arm64\n"), ("amd64", "built for amd64\n")] {
        assert_eq!(pulled_file(&fixture, &pushed, arch, "target"), expected);
    }
}

#[tokio::test]
async fn run_steps_execute_on_each_requested_platform_and_unknown_platforms_fail() {
    let fixture = Fixture::new().await;
    // A two-platform base image: amd64, and arm64 with Debian's arm64 busybox.
    let cas = Arc::new(BlobStore::open(&fixture.dir.path().join("multi-cas"), Arc::new(MemoryKv::new())).unwrap());
    busybox_rootfs(&fixture.dir.path().join("rootfs-amd64"));
    kiln_testkit::arm64_busybox_rootfs(&fixture.dir.path().join("rootfs-arm64"));
    let mut manifests = Vec::new();
    for (platform, rootfs) in [("linux/amd64", "rootfs-amd64"), ("linux/arm64", "rootfs-arm64")] {
        let digest = store_image(&cas, &fixture.dir.path().join(rootfs), platform);
        let (os, architecture) = platform.split_once('/').unwrap();
        manifests.push(kiln_registry::Descriptor {
            media_type: kiln_registry::OCI_MANIFEST.into(),
            digest,
            size: cas.info(&digest).unwrap().size,
            platform: Some(kiln_registry::PlatformField {
                architecture: architecture.into(),
                os: os.into(),
                variant: None,
            }),
            annotations: Default::default(),
        });
    }
    let index = kiln_registry::store_index(&cas, manifests, kiln_registry::MediaTypes::Oci).unwrap();
    let base = fixture.registry.reference("kiln/busybox:multi");
    RegistryClient::new(RegistryOptions::default()).unwrap().push(&base, &index.digest, &cas).await.unwrap();

    let pushed = format!("{}/kiln/arch:v1", fixture.registry.addr);
    let output = OutputSpec::parse(&format!("type=image,name={pushed},push=true,oci-mediatypes=true")).unwrap();
    let mut request = fixture.request(&format!("FROM {base}\nRUN uname -m > /arch\n"), &[], vec![output]);
    request.platforms = vec!["linux/amd64".parse().unwrap(), "linux/arm64".parse().unwrap()];
    let (result, _) = fixture.build(request).await;
    result.unwrap();
    for (arch, expected) in [("amd64", "x86_64\n"), ("arm64", "aarch64\n")] {
        assert_eq!(pulled_file(&fixture, &pushed, arch, "arch"), expected, "{arch}");
    }

    // A base image without the platform fails at resolution, naming what the index offers.
    let mut request = fixture.request(&format!("FROM {base}\nRUN true\n"), &[], vec![]);
    request.platforms = vec!["linux/s390x".parse().unwrap()];
    let message = fixture.build(request).await.0.unwrap_err().message;
    assert!(message.contains("no image for platform linux/s390x"), "{message}");
    // A RUN for a platform no worker runs fails before anything executes.
    let mut request = fixture.request("FROM scratch\nRUN true\n", &[], vec![]);
    request.platforms = vec!["linux/s390x".parse().unwrap()];
    let message = fixture.build(request).await.0.unwrap_err().message;
    assert!(message.contains("no worker runs linux/s390x") && message.contains("linux/amd64"), "{message}");
}

/// Pushes `REGISTRY/kiln/foreign:v1`: a busybox image whose layer GNU tar and gzip wrote,
/// as a base from another tool is; returns its reference.
async fn push_foreign_base(fixture: &Fixture) -> String {
    let dir = fixture.dir.path().join("foreign");
    busybox_rootfs(&dir.join("rootfs"));
    let tar = dir.join("layer.tar");
    run("tar", &["--sort=name", "-C", dir.join("rootfs").to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    run("gzip", &["-9", "-n", "-k", tar.to_str().unwrap()]);
    let cas = Arc::new(BlobStore::open(&dir.join("cas"), Arc::new(MemoryKv::new())).unwrap());
    let diff_id = kiln_types::Digest::of(&std::fs::read(&tar).unwrap());
    let layer = cas.put(&std::fs::read(dir.join("layer.tar.gz")).unwrap(), None).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    });
    let config = cas.put(&serde_json::to_vec(&config).unwrap(), None).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest.to_string(), "size": config.size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.digest.to_string(), "size": layer.size}],
    });
    let manifest = cas.put(&serde_json::to_vec(&manifest).unwrap(), None).unwrap();
    let reference = fixture.registry.reference("kiln/foreign:v1");
    RegistryClient::new(RegistryOptions::default()).unwrap().push(&reference, &manifest.digest, &cas).await.unwrap();
    reference.to_string()
}

#[tokio::test]
async fn base_layers_keep_their_blobs_and_a_push_beside_the_base_uploads_only_new_ones() {
    let fixture = Fixture::new().await;
    let raw = |reference: &str| -> serde_json::Value {
        serde_json::from_str(&run("skopeo", &["inspect", "--raw", "--tls-verify=false", reference])).unwrap()
    };
    let config = |reference: &str| -> serde_json::Value {
        serde_json::from_str(&run("skopeo", &["inspect", "--config", "--tls-verify=false", reference])).unwrap()
    };
    let foreign = push_foreign_base(&fixture).await;
    let base = format!("docker://{foreign}");
    let (base_layer, base_diff) =
        (raw(&base)["layers"][0]["digest"].clone(), config(&base)["rootfs"]["diff_ids"][0].clone());

    // Pushed into the base's repository; Kiln would write the base layer differently.
    let pushed = format!("{}/kiln/foreign:derived", fixture.registry.addr);
    let oci = fixture.dir.path().join("derived.tar");
    let outputs = vec![
        OutputSpec::parse(&format!("type=image,name={pushed},push=true")).unwrap(),
        OutputSpec::parse(&format!("type=oci,dest={}", oci.display())).unwrap(),
    ];
    let request = fixture.request(&format!("FROM {foreign}\nRUN echo new > /new\n"), &[], outputs);
    let before = fixture.registry.blob_count();
    fixture.build(request).await.0.unwrap();
    // The new layer, the config and the manifest: the base layer was not sent again.
    assert_eq!(fixture.registry.blob_count() - before, 3);
    let derived = format!("docker://{pushed}");
    assert_eq!(raw(&derived)["layers"][0]["digest"], base_layer);
    assert_eq!(config(&derived)["rootfs"]["diff_ids"][0], base_diff);
    assert_eq!(raw(&derived)["layers"].as_array().unwrap().len(), 2);
    let archived = raw(&format!("oci-archive:{}", oci.display()));
    assert_eq!(archived["layers"][0]["digest"], base_layer, "{archived}");
}

#[tokio::test]
async fn a_cached_result_whose_layer_was_removed_is_a_miss_not_a_failure() {
    let fixture = Fixture::new().await;
    let dockerfile = "FROM BASE\nRUN echo kept > /kept\n";
    let (first, _) = fixture.build(fixture.request(dockerfile, &[], vec![])).await;
    let run = |summary: &kiln_engine::BuildSummary| {
        summary
            .records
            .iter()
            .find(|r| r.name.contains("echo kept"))
            .map(|r| (r.status, r.cache_source.clone()))
            .unwrap()
    };
    assert_eq!(run(&first.unwrap()), (Status::Executed, None));
    let (second, _) = fixture.build(fixture.request(dockerfile, &[], vec![])).await;
    assert_eq!(run(&second.unwrap()), (Status::Cached, Some("local".into())));
    // Every layer directory goes (as GC would take them): the next build executes again.
    let layers = fixture.dir.path().join("engine/snapshots/l");
    for entry in std::fs::read_dir(&layers).unwrap() {
        std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
    }
    let out = fixture.dir.path().join("third-out");
    let (third, _) =
        fixture.build(fixture.request(dockerfile, &[], vec![OutputSpec::Local { dest: out.clone() }])).await;
    assert_eq!(run(&third.unwrap()), (Status::Executed, None));
    assert_eq!(std::fs::read_to_string(out.join("kept")).unwrap(), "kept\n");
}

#[tokio::test]
async fn a_directory_cache_is_refused_to_a_client_on_another_machine() {
    let fixture = Fixture::new().await;
    let mut request = fixture.request("FROM BASE\n", &[], vec![]);
    // An uploaded context: the client is not on this machine.
    request.context_manifest = Some(kiln_model::ContextManifest::default());
    let dir = fixture.dir.path().join("never");
    request.cache_to = vec![
        kiln_model::CacheSpec::parse(&format!("type=local,dest={}", dir.display()), kiln_model::CacheDirection::To)
            .unwrap(),
    ];
    let (result, _) = fixture.build(request).await;
    let error = result.unwrap_err().message;
    assert!(error.contains("type=local caches are for clients on the daemon's own machine"), "{error}");
    assert!(!dir.exists());
}
