//! `--cache-to` and `--cache-from` between two embedded daemons with separate state
//! directories: one builds and exports to a real registry, a real S3 server (moto) and a
//! directory; the other starts empty and imports.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_kv::MemoryKv;
use kiln_registry::{RegistryClient, RegistryOptions};
use kiln_types::{Digest, Platform};

use kiln_testkit::TestS3;
use serde_json::Value;

use crate::build::{Setup, read_metadata, text};

const DOCKERFILE: &str = "\
FROM BASE AS build
RUN echo built > /built-file
FROM BASE
COPY data.txt /data.txt
COPY --from=build /built-file /copied
RUN cat /data.txt /copied > /final
";

/// The test's context: [`DOCKERFILE`] and the file it copies.
fn app(setup: &Setup) -> std::path::PathBuf {
    let context = setup.context("app", DOCKERFILE);
    std::fs::write(context.join("data.txt"), "data\n").unwrap();
    context
}

/// Runs a build in the daemon `state`; returns the metadata file's contents.
fn build(setup: &Setup, state: &str, context: &Path, args: &[&str]) -> Value {
    let meta = setup.dir.path().join(format!("{state}.json"));
    let mut all = vec!["build", "--progress", "plain", "--metadata-file", meta.to_str().unwrap()];
    all.extend(["--build-arg", "SOURCE_DATE_EPOCH=0"]);
    all.extend(args);
    all.push(context.to_str().unwrap());
    let out = setup.run_in(state, &all, &TestS3::ENV);
    assert!(out.status.success(), "{state}: kiln {all:?} failed: {}", text(&out.stderr));
    read_metadata(&meta)
}

/// The diff ids of an image in the test registry.
fn diff_ids(setup: &Setup, name: &str) -> Vec<Digest> {
    let client = RegistryClient::new(RegistryOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(BlobStore::open(dir.path(), Arc::new(MemoryKv::new())).unwrap());
    let platform = Platform::host();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let image = runtime.block_on(client.resolve(&setup.registry.reference(name), &platform, &cas)).unwrap();
    image.config.rootfs.diff_ids
}

/// Each RUN and COPY vertex by name: (status, cache source).
fn steps(metadata: &Value) -> BTreeMap<String, (String, String)> {
    metadata["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"] != "source")
        .map(|v| {
            let source = v["cache_source"].as_str().unwrap_or("").to_string();
            (v["name"].as_str().unwrap().to_string(), (v["status"].as_str().unwrap().to_string(), source))
        })
        .collect()
}

#[test]
fn a_cache_exported_by_one_daemon_serves_an_empty_one() {
    let setup = Setup::new();
    let s3 = TestS3::start("kiln-cache");
    let context = app(&setup);
    let registry_cache = format!("{}/cache/app:buildcache", setup.registry.addr);
    let local_cache = setup.dir.path().join("local-cache");
    let image = |name: &str| format!("type=image,name={}/out/{name}:1,push=true", setup.registry.addr);

    let registry_to = format!("type=registry,ref={registry_cache},mode=max");
    let local_to = format!("type=local,dest={},mode=max", local_cache.display());
    let (s3_max, s3_min) = (s3.cache_spec("max"), s3.cache_spec("min"));
    let s3_max_to = format!("{s3_max},mode=max,compression=zstd");
    let a = build(
        &setup,
        "a",
        &context,
        &[
            "--output",
            &image("a"),
            "--cache-to",
            &registry_to,
            "--cache-to",
            &local_to,
            "--cache-to",
            &s3_max_to,
            "--cache-to",
            &s3_min,
        ],
    );
    assert!(steps(&a).values().all(|(status, _)| status == "executed"), "{a}");
    let keys = s3.keys();
    assert!(keys.iter().any(|k| k == "manifests/max") && keys.iter().any(|k| k == "manifests/min"), "{keys:?}");
    // Readable by whoever reads the directory, though a root daemon wrote it.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&local_cache.join("manifests/kiln").metadata().unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644);

    // Each kind of cache, into an empty daemon: every step is cached from it, and the image is
    // the same bytes (same layers, same diff ids).
    let local_from = format!("type=local,src={}", local_cache.display());
    for (state, from, source) in [
        ("b-registry", format!("type=registry,ref={registry_cache}"), format!("registry:{registry_cache}")),
        ("b-local", local_from, format!("local:{}", local_cache.display())),
        ("b-s3", s3_max.clone(), "s3:kiln-cache/max".to_string()),
    ] {
        let b = build(&setup, state, &context, &["--output", &image(state), "--cache-from", &from]);
        for (name, (status, cached_from)) in steps(&b) {
            assert_eq!((status.as_str(), cached_from.as_str()), ("cached", source.as_str()), "{state}: {name}: {b}");
        }
        // Layers keep the blobs they came as (as BuildKit reuses a layer's blob in any
        // compression): same bytes from a gzip cache, the same diff ids from a zstd one.
        assert_eq!(diff_ids(&setup, &format!("out/{state}:1")), diff_ids(&setup, "out/a:1"), "{state}");
        if state != "b-s3" {
            assert_eq!(b["containerimage.digest"], a["containerimage.digest"], "{state}");
        }
    }

    // mode=min holds only the final stage: building the intermediate stage executes it;
    // mode=max holds it too.
    let target = ["--target", "build"];
    let min = build(&setup, "c-min", &context, &[&target[..], &["--cache-from", &s3_min]].concat());
    assert!(steps(&min).values().all(|(status, _)| status == "executed"), "{min}");
    let max = build(&setup, "c-max", &context, &[&target[..], &["--cache-from", &s3_max]].concat());
    assert!(steps(&max).values().all(|(status, _)| status == "cached"), "{max}");
}

#[test]
fn broken_caches_are_misses_and_warnings_but_exports_fail_loudly() {
    let setup = Setup::new();
    let s3 = TestS3::start("kiln-broken");
    let context = app(&setup);
    let spec = s3.cache_spec("app");
    build(&setup, "a", &context, &["--cache-to", &format!("{spec},mode=max")]);

    // Every layer blob gone (the config stays): each vertex misses and executes; the build works.
    let manifest: Value = serde_json::from_slice(&s3.get("manifests/app")).unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    for key in s3.keys() {
        if key.starts_with("blobs/") && !key.ends_with(&config) {
            s3.delete(&key);
        }
    }
    let b = build(&setup, "b", &context, &["--cache-from", &spec]);
    assert!(steps(&b).values().all(|(status, _)| status == "executed"), "{b}");

    // An unreachable cache: importing warns and builds, exporting fails the build unless
    // ignore-error=true.
    let nowhere = "type=s3,bucket=b,region=us-east-1,endpoint_url=http://127.0.0.1:9,use_path_style=true";
    let out = setup.run_in(
        "c",
        &["build", "--progress", "plain", "--cache-from", nowhere, context.to_str().unwrap()],
        &TestS3::ENV,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("WARNING: cache s3:b/kiln"), "{}", text(&out.stderr));
    let out = setup.run_in(
        "c",
        &["build", "--progress", "plain", "--cache-to", nowhere, context.to_str().unwrap()],
        &TestS3::ENV,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cache s3:b/kiln"), "{}", text(&out.stderr));
    let ignored = format!("{nowhere},ignore-error=true");
    let out = setup.run_in(
        "c",
        &["build", "--progress", "plain", "--cache-to", &ignored, context.to_str().unwrap()],
        &TestS3::ENV,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}
