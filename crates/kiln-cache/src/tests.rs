use std::sync::atomic::Ordering;

use kiln_kv::MemoryKv;

use super::*;

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

struct Node {
    _dir: tempfile::TempDir,
    cas: Arc<BlobStore>,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cas = BlobStore::open(dir.path(), Arc::new(MemoryKv::default())).unwrap();
    Node { _dir: dir, cas: Arc::new(cas) }
}

/// A layer blob stored in `node` (its bytes stand in for a compressed tar).
fn layer(node: &Node, content: &str) -> CachedLayer {
    let info = node.cas.put(content.as_bytes(), None).unwrap();
    CachedLayer {
        blob: Descriptor::new(GZIP, info.digest, info.size),
        diff_id: Digest::of(format!("diff of {content}").as_bytes()),
        tar_size: Some(10 * content.len() as u64),
    }
}

fn record(n: u8, platform: &str, layers: &[&CachedLayer]) -> ExportRecord {
    ExportRecord {
        key: Digest::of(&[n]),
        platform: platform.into(),
        layers: layers.iter().map(|l| (*l).clone()).collect(),
    }
}

fn memory_cache() -> Arc<ObjectCache<MemoryObjects>> {
    Arc::new(ObjectCache::new("s3:twin/kiln".into(), MemoryObjects::default(), "ci/", "kiln"))
}

#[tokio::test]
async fn an_export_is_imported_by_another_node_with_its_blobs() {
    let (a, b) = (node(), node());
    let (base, top) = (layer(&a, "base"), layer(&a, "top"));
    let cache = memory_cache();
    let records = vec![record(1, "linux/amd64", &[&base]), record(2, "linux/amd64", &[&base, &top])];
    let stats = export(cache.as_ref(), records, Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert_eq!((stats.records, stats.blobs, stats.uploaded), (2, 2, 2));
    let keys = cache.objects().keys();
    assert!(keys.contains(&"ci/manifests/kiln".to_string()), "{keys:?}");
    assert!(keys.contains(&format!("ci/blobs/sha256/{}", top.blob.digest.hex())), "{keys:?}");

    let store: Arc<dyn CacheStore> = cache.clone();
    let (imports, warnings) = Imports::load(&[store], &b.cas).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(imports.len(), 2);
    let hit = imports.get(&Digest::of(&[2])).expect("imported");
    assert_eq!(hit.layers, [base.clone(), top.clone()]);
    assert_eq!(hit.store.label(), "s3:twin/kiln");
    for layer in &hit.layers {
        hit.store.fetch_blob(&layer.blob, &b.cas).await.unwrap();
    }
    assert_eq!(b.cas.read(&top.blob.digest).unwrap(), b"top");

    // The same export again uploads no layer: only the config and the manifest change.
    let before = cache.objects().uploads.load(Ordering::SeqCst);
    let again = vec![record(1, "linux/amd64", &[&base]), record(2, "linux/amd64", &[&base, &top])];
    let stats = export(cache.as_ref(), again, Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert_eq!(stats.uploaded, 0);
    assert_eq!(cache.objects().uploads.load(Ordering::SeqCst), before, "at most the config, which is unchanged");
}

#[tokio::test]
async fn a_registry_cache_checks_no_listed_blob_again_unless_the_registry_lost_one() {
    let registry = kiln_testkit::TestRegistry::start();
    let a = node();
    let (base, top) = (layer(&a, "base"), layer(&a, "top"));
    let client = RegistryClient::new(kiln_registry::RegistryOptions::default()).unwrap();
    let reference = format!("{}/cache/app:kiln", registry.addr);
    let store = RegistryStore::new(format!("registry:{reference}"), &reference, client).unwrap();
    let records = || vec![record(1, "linux/amd64", &[&base]), record(2, "linux/amd64", &[&base, &top])];
    let stats = export(&store, records(), Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert_eq!((stats.blobs, stats.uploaded), (2, 2));
    let stats = export(&store, records(), Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert_eq!((stats.blobs, stats.uploaded), (2, 0), "listed in the manifest, so neither checked nor sent");

    // The repository loses a blob its manifest names: the registry refuses the next manifest,
    // and the export checks its blobs and sends the lost one.
    registry.delete_blob("cache/app", &top.blob.digest);
    let stats = export(&store, records(), Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert_eq!((stats.blobs, stats.uploaded), (2, 1));
    let b = node();
    let store: Arc<dyn CacheStore> = Arc::new(store);
    let (imports, warnings) = Imports::load(&[store], &b.cas).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let hit = imports.get(&Digest::of(&[2])).expect("imported");
    for layer in &hit.layers {
        hit.store.fetch_blob(&layer.blob, &b.cas).await.unwrap();
    }
    assert_eq!(b.cas.read(&top.blob.digest).unwrap(), b"top");
}

#[tokio::test]
async fn exports_of_other_platforms_are_kept_and_the_same_platform_is_replaced() {
    let a = node();
    let cache = memory_cache();
    let (amd, arm, amd2) = (layer(&a, "amd"), layer(&a, "arm"), layer(&a, "amd2"));
    export(cache.as_ref(), vec![record(1, "linux/amd64", &[&amd])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    export(cache.as_ref(), vec![record(2, "linux/arm64", &[&arm])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    export(cache.as_ref(), vec![record(3, "linux/amd64", &[&amd2])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    let store: Arc<dyn CacheStore> = cache.clone();
    let (imports, _) = Imports::load(&[store], &node().cas).await;
    assert!(imports.get(&Digest::of(&[1])).is_none(), "replaced by the later amd64 export");
    assert!(imports.get(&Digest::of(&[2])).is_some(), "arm64 kept");
    assert!(imports.get(&Digest::of(&[3])).is_some());

    // A fleet's shared cache keeps every key, newest first, up to its limit.
    let shared = memory_cache();
    for (n, layer) in [(1, &amd), (2, &arm), (3, &amd2)] {
        export(shared.as_ref(), vec![record(n, "linux/amd64", &[layer])], Merge::Accumulate(2), &a.cas).await.unwrap();
    }
    let store: Arc<dyn CacheStore> = shared.clone();
    let (imports, _) = Imports::load(&[store], &node().cas).await;
    assert!(imports.get(&Digest::of(&[1])).is_none(), "the oldest went over the limit");
    assert!(imports.get(&Digest::of(&[2])).is_some() && imports.get(&Digest::of(&[3])).is_some());
}

#[tokio::test]
async fn unreadable_caches_are_warnings_and_unwritable_ones_errors() {
    let a = node();
    let cache = memory_cache();
    let store: Arc<dyn CacheStore> = cache.clone();
    let (imports, warnings) = Imports::load(&[Arc::clone(&store)], &a.cas).await;
    assert!(imports.is_empty());
    assert_eq!(warnings, ["cache s3:twin/kiln: nothing was exported there yet"]);

    cache.objects().fail.store(true, Ordering::SeqCst);
    let (_, warnings) = Imports::load(&[Arc::clone(&store)], &a.cas).await;
    assert!(warnings[0].contains("s3:twin/kiln") && warnings[0].contains("injected"), "{warnings:?}");
    let err = export(cache.as_ref(), vec![record(1, "", &[&layer(&a, "x")])], Merge::ReplacePlatforms, &a.cas)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cache s3:twin/kiln") && err.to_string().contains("injected"), "{err}");
    cache.objects().fail.store(false, Ordering::SeqCst);

    // A manifest that is not Kiln's is overwritten by an export, and a warning on import.
    cache.objects().put("ci/manifests/kiln".into(), b"{}".to_vec()).await.unwrap();
    let (_, warnings) = Imports::load(&[Arc::clone(&store)], &a.cas).await;
    assert!(warnings[0].contains("manifest is not valid"), "{warnings:?}");
    export(cache.as_ref(), vec![record(1, "", &[&layer(&a, "x")])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert_eq!(Imports::load(&[store], &a.cas).await.0.len(), 1);
}

#[tokio::test]
async fn a_corrupt_or_missing_blob_never_enters_the_store() {
    let (a, b) = (node(), node());
    let cache = memory_cache();
    let good = layer(&a, "good");
    export(cache.as_ref(), vec![record(1, "", &[&good])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    let key = format!("ci/blobs/sha256/{}", good.blob.digest.hex());
    cache.objects().put(key.clone(), b"evil".to_vec()).await.unwrap();
    let err = cache.fetch_blob(&good.blob, &b.cas).await.unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    assert!(!b.cas.contains(&good.blob.digest));
    cache.objects().remove(&key);
    assert!(cache.fetch_blob(&good.blob, &b.cas).await.unwrap_err().to_string().contains("no such object"));
}

#[tokio::test]
async fn a_directory_cache_round_trips() {
    let (a, b) = (node(), node());
    let dir = tempfile::tempdir().unwrap();
    let cache = ObjectCache::new("local:d".into(), DirObjects::new(dir.path()), "", "kiln");
    let top = layer(&a, "top");
    export(&cache, vec![record(7, "linux/amd64", &[&top])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    assert!(dir.path().join("manifests/kiln").is_file());
    assert!(dir.path().join("blobs/sha256").join(top.blob.digest.hex()).is_file());
    let store: Arc<dyn CacheStore> = Arc::new(cache);
    let (imports, warnings) = Imports::load(&[store], &b.cas).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let hit = imports.get(&Digest::of(&[7])).unwrap();
    hit.store.fetch_blob(&hit.layers[0].blob, &b.cas).await.unwrap();
    assert_eq!(b.cas.read(&top.blob.digest).unwrap(), b"top");
    // An object larger than asked for is refused, not read.
    let objects = DirObjects::new(dir.path());
    let small = objects.get("manifests/kiln".into(), 4).await.unwrap_err();
    assert!(small.contains("larger than 4 bytes"), "{small}");
    assert_eq!(objects.get("manifests/none".into(), 4).await.unwrap(), None);
}

#[tokio::test]
async fn a_cache_whose_config_is_lost_is_replaced_by_the_next_export() {
    let a = node();
    let cache = memory_cache();
    export(cache.as_ref(), vec![record(1, "", &[&layer(&a, "x")])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    let manifest = cache.objects().get("ci/manifests/kiln".into(), 1 << 20).await.unwrap().unwrap();
    let config = format::config_of(&manifest).unwrap();
    assert!(cache.objects().remove(&format!("ci/blobs/sha256/{}", config.digest.hex())));
    let store: Arc<dyn CacheStore> = cache.clone();
    let (imports, warnings) = Imports::load(&[Arc::clone(&store)], &node().cas).await;
    assert!(imports.is_empty() && warnings[0].contains("is gone"), "{warnings:?}");
    export(cache.as_ref(), vec![record(2, "", &[&layer(&a, "y")])], Merge::ReplacePlatforms, &a.cas).await.unwrap();
    let (imports, warnings) = Imports::load(&[store], &node().cas).await;
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(imports.get(&Digest::of(&[2])).is_some() && imports.len() == 1);
}

#[tokio::test]
async fn large_blobs_go_to_s3_in_parts() {
    let server = kiln_testkit::TestS3::start("kiln-parts");
    let credentials = aws_sdk_s3::config::Credentials::new("kiln-test", "kiln-test", None, None, "test");
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(credentials)
        .endpoint_url(&server.endpoint)
        .force_path_style(true)
        .build();
    let objects = S3Objects::new(aws_sdk_s3::Client::from_conf(config), &server.bucket).with_part_size(5 << 20);
    let cache = ObjectCache::new("s3:kiln-parts/kiln".into(), objects, "", "kiln");
    let a = node();
    // 11 MiB of varied bytes: three parts of 5, 5 and 1 MiB.
    let content: Vec<u8> = (0..11u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let info = a.cas.put(&content, None).unwrap();
    let blob = Descriptor::new(GZIP, info.digest, info.size);
    assert!(cache.push_blob(&blob, &a.cas).await.unwrap(), "sent");
    assert!(!cache.push_blob(&blob, &a.cas).await.unwrap(), "there already");
    let b = node();
    cache.fetch_blob(&blob, &b.cas).await.unwrap();
    assert_eq!(b.cas.read(&blob.digest).unwrap(), content);
    // Nothing is left of the upload but the object.
    assert_eq!(server.keys(), [format!("blobs/sha256/{}", blob.digest.hex())]);
}
