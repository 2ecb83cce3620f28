//! Pull and push against a real registry (Debian's `docker-registry` on loopback), with
//! `skopeo` as the independent client.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_kv::MemoryKv;
use kiln_layer::{Compression, TarOptions, export_layer};
use kiln_registry::*;
use kiln_testkit::TestRegistry;
use kiln_types::{Digest, ImageReference, Platform};

fn store(dir: &Path) -> Arc<BlobStore> {
    Arc::new(BlobStore::open(dir, Arc::new(MemoryKv::new())).unwrap())
}

fn put_json(cas: &BlobStore, value: &serde_json::Value) -> (Digest, u64) {
    let info = cas.put(&serde_json::to_vec(value).unwrap(), None).unwrap();
    (info.digest, info.size)
}

/// Builds a one-layer image whose only file holds `content`; returns the manifest digest.
fn build_image(cas: &BlobStore, scratch: &Path, platform: &str, content: &str) -> Digest {
    let layer_dir = scratch.join(format!("layer-{platform}-{content}").replace('/', "-"));
    std::fs::create_dir_all(layer_dir.join("etc")).unwrap();
    std::fs::write(layer_dir.join("etc/content"), content).unwrap();
    let layer = export_layer(&layer_dir, cas, Compression::Gzip, &TarOptions { source_date_epoch: Some(0) }).unwrap();
    let platform: Platform = platform.parse().unwrap();
    let (config_digest, config_size) = put_json(
        cas,
        &serde_json::json!({
            "architecture": platform.architecture, "os": platform.os,
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id.to_string()]}
        }),
    );
    put_json(
        cas,
        &serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size},
            "layers": [{"mediaType": Compression::Gzip.oci_media_type(), "digest": layer.digest.to_string(), "size": layer.size}]
        }),
    )
    .0
}

fn client() -> RegistryClient {
    RegistryClient::new(RegistryOptions::default()).unwrap()
}

fn skopeo(args: &[&str]) -> String {
    let output = Command::new("skopeo").args(args).output().expect("skopeo is installed");
    assert!(output.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn push_then_pull_round_trips_and_skopeo_agrees() {
    let registry = TestRegistry::start();
    let scratch = tempfile::tempdir().unwrap();
    let local = store(&scratch.path().join("local"));
    let manifest = build_image(&local, scratch.path(), "linux/amd64", "hello");
    let reference = registry.reference("kiln/test:v1");
    client().push(&reference, &manifest, &local).await.unwrap();
    // Pushing again sends no blobs and succeeds.
    client().push(&reference, &manifest, &local).await.unwrap();

    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")]);
    assert_eq!(Digest::of(raw.as_bytes()), manifest, "the registry holds our exact manifest bytes");

    let fresh = store(&scratch.path().join("fresh"));
    let pulled = client().pull(&reference, &"linux/amd64".parse().unwrap(), &fresh).await.unwrap();
    assert_eq!(pulled.manifest_digest, manifest);
    assert_eq!(pulled.index_digest, None);
    assert_eq!(pulled.config.config["Cmd"], serde_json::json!(["/bin/sh"]));
    for (layer, _) in pulled.layers() {
        assert_eq!(fresh.read(&layer.digest).unwrap(), local.read(&layer.digest).unwrap());
    }
    let mut by_digest = reference.clone();
    by_digest.tag = None;
    by_digest.digest = Some(manifest);
    let pinned = client().resolve(&by_digest, &"linux/amd64".parse().unwrap(), &fresh).await.unwrap();
    assert_eq!(pinned.manifest_digest, manifest);
}

#[tokio::test]
async fn an_index_resolves_to_exactly_the_requested_platform() {
    let registry = TestRegistry::start();
    let scratch = tempfile::tempdir().unwrap();
    let cas = store(&scratch.path().join("cas"));
    let amd64 = build_image(&cas, scratch.path(), "linux/amd64", "amd64");
    let arm64 = build_image(&cas, scratch.path(), "linux/arm64", "arm64");
    let entry = |digest: Digest, arch: &str| Descriptor {
        media_type: OCI_MANIFEST.into(),
        digest,
        size: cas.info(&digest).unwrap().size,
        platform: Some(PlatformField { architecture: arch.into(), os: "linux".into(), variant: None }),
        annotations: BTreeMap::new(),
    };
    let index = Index {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        manifests: vec![entry(amd64, "amd64"), entry(arm64, "arm64")],
        annotations: BTreeMap::new(),
    };
    let index_digest = cas.put(&serde_json::to_vec(&index).unwrap(), None).unwrap().digest;
    let reference = registry.reference("kiln/multi:latest");
    client().push(&reference, &index_digest, &cas).await.unwrap();

    let fresh = store(&scratch.path().join("fresh"));
    let pulled = client().pull(&reference, &"linux/arm64/v8".parse().unwrap(), &fresh).await.unwrap();
    assert_eq!((pulled.index_digest, pulled.manifest_digest), (Some(index_digest), arm64));
    assert_eq!(pulled.config.architecture, "arm64");

    let err = client().resolve(&reference, &"linux/s390x".parse().unwrap(), &fresh).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    let text = err.to_string();
    assert!(text.contains("no image for platform linux/s390x") && text.contains("linux/amd64, linux/arm64"), "{text}");
}

#[tokio::test]
async fn missing_images_and_dead_registries_are_clear_errors() {
    let registry = TestRegistry::start();
    let scratch = tempfile::tempdir().unwrap();
    let cas = store(scratch.path());
    let platform: Platform = "linux/amd64".parse().unwrap();
    let missing = registry.reference("kiln/nothing:here");
    let err = client().pull(&missing, &platform, &cas).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("kiln/nothing:here"), "{err}");

    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead: ImageReference = format!("127.0.0.1:{port}/kiln/any:tag").parse().unwrap();
    let options = RegistryOptions { attempts: 2, ..RegistryOptions::default() };
    let err = RegistryClient::new(options).unwrap().pull(&dead, &platform, &cas).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Network, "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("after 2 attempts"), "{text}");
}

#[tokio::test]
async fn a_corrupted_blob_in_the_registry_never_enters_the_store() {
    let registry = TestRegistry::start();
    let scratch = tempfile::tempdir().unwrap();
    let local = store(&scratch.path().join("local"));
    let manifest = build_image(&local, scratch.path(), "linux/amd64", "precious");
    let reference = registry.reference("kiln/corrupt:v1");
    client().push(&reference, &manifest, &local).await.unwrap();
    let layer = local.read(&manifest).map(|b| match ManifestKind::parse(&b).unwrap() {
        ManifestKind::Image(m) => m.layers[0].digest,
        ManifestKind::Index(_) => unreachable!(),
    });
    let layer = layer.unwrap();
    let hex = layer.hex();
    let data = registry.data().join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]));
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let fresh = store(&scratch.path().join("fresh"));
    let err = client().pull(&reference, &"linux/amd64".parse().unwrap(), &fresh).await.unwrap_err();
    assert!(err.to_string().contains(&layer.to_string()), "{err}");
    assert!(!fresh.contains(&layer));
}

#[tokio::test]
async fn oci_layouts_round_trip_and_skopeo_reads_them() {
    let registry = TestRegistry::start();
    let scratch = tempfile::tempdir().unwrap();
    let cas = store(&scratch.path().join("cas"));
    let manifest = build_image(&cas, scratch.path(), "linux/amd64", "layout");
    let layout = scratch.path().join("layout");
    write_layout(&layout, &[("busybox", manifest)], &cas).unwrap();

    let fresh = store(&scratch.path().join("fresh"));
    let platform: Platform = "linux/amd64".parse().unwrap();
    let read = read_layout(&layout, Some("busybox"), &platform, &fresh).unwrap();
    assert_eq!(read.manifest_digest, manifest);
    assert!(read.layers().all(|(layer, _)| fresh.contains(&layer.digest)));
    let err = read_layout(&layout, Some("other"), &platform, &fresh).unwrap_err();
    assert!(err.to_string().contains("no image named \"other\""), "{err}");

    let reference = registry.reference("kiln/from-layout:v1");
    let source = format!("oci:{}:busybox", layout.display());
    skopeo(&["copy", "--dest-tls-verify=false", &source, &format!("docker://{reference}")]);
    let pulled = client().resolve(&reference, &platform, &fresh).await.unwrap();
    assert_eq!(pulled.manifest_digest, manifest, "skopeo kept the digest of our layout's manifest");
}

#[tokio::test]
async fn registries_that_need_credentials_get_them_from_docker_config() {
    let registry = TestRegistry::start_with_auth(Some(("kiln", "s3cret")));
    let scratch = tempfile::tempdir().unwrap();
    let cas = store(&scratch.path().join("cas"));
    let manifest = build_image(&cas, scratch.path(), "linux/amd64", "private");
    let reference = registry.reference("kiln/private:v1");
    let with = |user: &str, password: &str| {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let config = format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, registry.addr);
        let credentials = Credentials::parse(config.as_bytes()).unwrap();
        RegistryClient::new(RegistryOptions { credentials, ..RegistryOptions::default() }).unwrap()
    };
    with("kiln", "s3cret").push(&reference, &manifest, &cas).await.unwrap();
    let platform: Platform = "linux/amd64".parse().unwrap();
    let fresh = store(&scratch.path().join("fresh"));
    assert_eq!(with("kiln", "s3cret").pull(&reference, &platform, &fresh).await.unwrap().manifest_digest, manifest);

    for client in [client(), with("kiln", "wrong")] {
        let err = client.resolve(&reference, &platform, &fresh).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unauthorized, "{err}");
        assert!(err.to_string().contains("kiln/private:v1") && err.to_string().contains("401"), "{err}");
    }
}

#[tokio::test]
async fn a_registry_that_never_answers_times_out_after_retries() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept connections and hold them open without a word.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let reference: ImageReference = format!("{addr}/kiln/silent:v1").parse().unwrap();
    let options =
        RegistryOptions { attempts: 2, timeout: std::time::Duration::from_millis(500), ..RegistryOptions::default() };
    let err = RegistryClient::new(options)
        .unwrap()
        .resolve(&reference, &"linux/amd64".parse().unwrap(), &store(scratch.path()))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("kiln/silent:v1") && err.to_string().contains("after 2 attempts"), "{err}");
    silent.abort();
}

#[tokio::test]
async fn a_429_with_any_transient_error_code_is_retried() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    // Every request is refused as rate limited, with the code Docker's registry uses for 503.
    let busy = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buffer = vec![0; 64 * 1024];
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 || !buffer[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        return;
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"slow down"}]}"#;
                    let response = format!(
                        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let scratch = tempfile::tempdir().unwrap();
    let reference: ImageReference = format!("{addr}/kiln/busy:v1").parse().unwrap();
    let options = RegistryOptions { attempts: 3, ..RegistryOptions::default() };
    let err = RegistryClient::new(options)
        .unwrap()
        .resolve(&reference, &"linux/amd64".parse().unwrap(), &store(scratch.path()))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Server, "{err}");
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    // Each attempt made at least one request (oci-client may probe /v2/ first).
    assert!(requests.load(std::sync::atomic::Ordering::SeqCst) >= 3, "{err}");
    busy.abort();
}

#[tokio::test]
async fn blobs_another_repository_holds_are_mounted_and_uploaded_when_the_mount_fails() {
    let registry = TestRegistry::start();
    let scratch = tempfile::tempdir().unwrap();
    let cas = store(&scratch.path().join("cas"));
    let manifest = build_image(&cas, scratch.path(), "linux/amd64", "mounted");
    let ManifestKind::Image(manifest) = ManifestKind::parse(&cas.read(&manifest).unwrap()).unwrap() else {
        panic!("an image manifest")
    };
    let layer = &manifest.layers[0];
    let repo = |name: &str| registry.reference(&format!("kiln/{name}:v1"));
    let client = client();
    assert!(client.push_blob(&repo("a"), layer, &cas).await.unwrap(), "uploaded to a");
    assert!(!client.blob_exists(&repo("b"), &layer.digest).await.unwrap());
    assert!(!client.push_blob(&repo("b"), layer, &cas).await.unwrap(), "mounted into b from a, not uploaded");
    assert!(client.blob_exists(&repo("b"), &layer.digest).await.unwrap());
    // A client that does not know where the blob is uploads it.
    assert!(self::client().push_blob(&repo("c"), layer, &cas).await.unwrap());

    // The repository the client last saw the blob in loses it: the mount fails and the
    // blob is uploaded instead.
    registry.delete_blob("kiln/b", &layer.digest);
    assert!(!client.blob_exists(&repo("b"), &layer.digest).await.unwrap());
    assert!(client.push_blob(&repo("d"), layer, &cas).await.unwrap(), "uploaded after the failed mount");
    let fresh = store(&scratch.path().join("fresh"));
    client.fetch_blob(&repo("d"), layer, &fresh).await.unwrap();
    assert_eq!(fresh.read(&layer.digest).unwrap(), cas.read(&layer.digest).unwrap());
}
