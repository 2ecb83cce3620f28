//! Whole builds through the engine: a real registry, real containers, every output type,
//! checked with skopeo and tar as independent readers.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_engine::{BuildRequest, Engine, EngineConfig, OutputSpec, Progress};
use kiln_kv::MemoryKv;
use kiln_registry::{RegistryClient, RegistryOptions};
use kiln_solver::Status;
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
        let engine = Engine::start(EngineConfig { worker, max_parallelism: 4, name: "local".into() }).unwrap();
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
    ) -> (Result<kiln_engine::BuildSummary, kiln_engine::BuildFailure>, Vec<Progress>) {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let result = self.engine.build(request, sender).await;
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
            .any(|p| matches!(p, Progress::Export { name, completed: Some(_), .. } if name.starts_with("pushing")))
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
}
