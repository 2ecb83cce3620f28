//! Blob store behaviour: verification, atomic publication, index upkeep.

use std::io::{Read, Write};
use std::sync::Arc;

use kiln_kv::{MemoryKv, SledKv};
use kiln_types::Digest;

use super::*;

fn store(dir: &Path) -> BlobStore {
    BlobStore::open(dir, Arc::new(MemoryKv::new())).unwrap()
}

#[test]
fn put_then_read_back_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let cas = store(dir.path());
    let info = cas.put(b"hello", None).unwrap();
    assert_eq!(info.digest, Digest::of(b"hello"));
    assert_eq!(info.size, 5);
    assert_eq!(cas.read(&info.digest).unwrap(), b"hello");
    assert_eq!(cas.info(&info.digest).unwrap(), info);
    assert_eq!(cas.list().unwrap(), vec![info]);
}

#[test]
fn wrong_expected_digest_is_rejected_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cas = store(dir.path());
    let claimed = Digest::of(b"something else");
    let err = cas.put(b"hello", Some(&claimed)).unwrap_err();
    assert!(err.to_string().contains(&claimed.to_string()), "{err}");
    assert!(!cas.contains(&claimed));
    assert!(!cas.contains(&Digest::of(b"hello")));
    assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
}

#[test]
fn abandoned_ingest_leaves_no_blob_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let cas = store(dir.path());
    {
        let mut ingest = cas.ingest().unwrap();
        ingest.write_all(b"half a bl").unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
    assert!(cas.list().unwrap().is_empty());
}

#[test]
fn stray_temp_files_from_a_crash_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ingest")).unwrap();
    std::fs::write(dir.path().join("ingest/123-0-0"), b"partial").unwrap();
    let _cas = store(dir.path());
    assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
}

#[test]
fn verify_detects_and_removes_a_corrupted_blob() {
    let dir = tempfile::tempdir().unwrap();
    let cas = store(dir.path());
    let info = cas.put(b"precious", None).unwrap();
    assert!(cas.verify(&info.digest).is_ok());
    std::fs::write(cas.path(&info.digest), b"tampered").unwrap();
    let err = cas.verify(&info.digest).unwrap_err();
    assert!(matches!(err, CasError::DigestMismatch { .. }), "{err}");
    assert!(!cas.contains(&info.digest));
    assert!(matches!(cas.info(&info.digest), Err(CasError::NotFound(_))));
}

#[test]
fn verifying_reader_passes_good_content_and_fails_bad_content() {
    let good = Digest::of(b"payload");
    let mut out = Vec::new();
    VerifyingReader::new(&b"payload"[..], good, Some(7)).read_to_end(&mut out).unwrap();
    assert_eq!(out, b"payload");

    let err = VerifyingReader::new(&b"pay1oad"[..], good, None).read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("digest mismatch"), "{err}");

    let err = VerifyingReader::new(&b"payload"[..], good, Some(3)).read_to_end(&mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("expected 3 bytes"), "{err}");

    let err = VerifyingReader::new(&b"pay"[..], good, Some(7)).read_to_end(&mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("got 3"), "{err}");
}

#[test]
fn index_survives_reopen_with_sled() {
    let dir = tempfile::tempdir().unwrap();
    let digest;
    {
        let kv = Arc::new(SledKv::open(&dir.path().join("index")).unwrap());
        let cas = BlobStore::open(&dir.path().join("cas"), kv).unwrap();
        digest = cas.put_reader(&mut &b"streamed content"[..], None).unwrap().digest;
    }
    let kv = Arc::new(SledKv::open(&dir.path().join("index")).unwrap());
    let cas = BlobStore::open(&dir.path().join("cas"), kv).unwrap();
    assert_eq!(cas.list().unwrap().len(), 1);
    assert_eq!(cas.info(&digest).unwrap().size, 16);
}

#[test]
fn unsynced_blobs_appear_only_when_published_as_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cas = store(dir.path());
    let mut batch = Vec::new();
    for content in [&b"first"[..], b"second"] {
        let mut ingest = cas.ingest().unwrap();
        ingest.write_all(content).unwrap();
        batch.push(ingest.finish_unsynced(Some(&Digest::of(content))).unwrap());
    }
    assert!(!cas.contains(&Digest::of(b"first")), "visible before publication");
    let published = cas.publish(batch).unwrap();
    assert_eq!(published.iter().map(|b| b.digest).collect::<Vec<_>>(), [Digest::of(b"first"), Digest::of(b"second")]);
    assert_eq!(cas.read(&Digest::of(b"second")).unwrap(), b"second");
    assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);

    // Verified before it waits; one dropped unpublished leaves no temporary file.
    let mut wrong = cas.ingest().unwrap();
    wrong.write_all(b"third").unwrap();
    assert!(matches!(wrong.finish_unsynced(Some(&Digest::of(b"other"))), Err(CasError::DigestMismatch { .. })));
    let mut dropped = cas.ingest().unwrap();
    dropped.write_all(b"fourth").unwrap();
    drop(dropped.finish_unsynced(None).unwrap());
    assert!(!cas.contains(&Digest::of(b"fourth")));
    assert_eq!(std::fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
}
