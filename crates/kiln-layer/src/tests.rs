//! Layer tars byte for byte, round trips, hostile tars, and overlay snapshots (as root).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::Path;
use std::sync::Arc;

use kiln_cas::BlobStore;
use kiln_kv::MemoryKv;
use kiln_types::now_ms;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::*;

const EPOCH: u64 = 1_700_000_000;

/// One tar entry as the tests compare it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    path: String,
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_tar(bytes: &[u8]) -> Vec<Seen> {
    let mut archive = tar::Archive::new(bytes);
    let mut seen = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        let kind = match header.entry_type() {
            tar::EntryType::Regular => 'f',
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Char => 'c',
            tar::EntryType::Fifo => 'p',
            other => panic!("unexpected {other:?}"),
        };
        let mut xattrs = Vec::new();
        if let Some(ext) = entry.pax_extensions().unwrap() {
            for ext in ext {
                let ext = ext.unwrap();
                xattrs.push((ext.key().unwrap().to_string(), ext.value_bytes().to_vec()));
            }
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        seen.push(Seen {
            path: String::from_utf8(entry.path_bytes().to_vec()).unwrap(),
            kind,
            mode: header.mode().unwrap(),
            uid: header.uid().unwrap(),
            gid: header.gid().unwrap(),
            mtime: header.mtime().unwrap(),
            link: entry.link_name().unwrap().map(|l| l.display().to_string()),
            data,
            xattrs,
        });
    }
    seen
}

fn seen(path: &str, kind: char, mode: u32, link: Option<&str>, data: &[u8]) -> Seen {
    Seen {
        path: path.to_string(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: EPOCH,
        link: link.map(str::to_string),
        data: data.to_vec(),
        xattrs: Vec::new(),
    }
}

/// A layer directory in overlay format exercising every entry kind.
fn sample_layer(dir: &Path) {
    fs::create_dir_all(dir.join("etc/conf.d")).unwrap();
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::write(dir.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::hard_link(dir.join("usr/bin/tool"), dir.join("usr/bin/tool-alias")).unwrap();
    symlink("tool", dir.join("usr/bin/link")).unwrap();
    fs::write(dir.join("etc/owned"), b"mine").unwrap();
    lchown(dir.join("etc/owned"), Some(1000), Some(100)).unwrap();
    fs::set_permissions(dir.join("etc/owned"), fs::Permissions::from_mode(0o640)).unwrap();
    xattr::set(dir.join("etc/owned"), "user.kiln", b"tagged").unwrap();
    xattr::set(dir.join("etc/conf.d"), OPAQUE_XATTR, b"y").unwrap();
    fs::write(dir.join("etc/conf.d/new.conf"), b"x=1\n").unwrap();
    mknod(&dir.join("etc/removed"), SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).unwrap();
    nix::unistd::mkfifo(&dir.join("etc/pipe"), Mode::from_bits_truncate(0o600)).unwrap();
    for path in ["etc", "etc/conf.d", "usr", "usr/bin"] {
        fs::set_permissions(dir.join(path), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn export_plain(dir: &Path) -> Vec<u8> {
    write_layer_tar(dir, Vec::new(), &TarOptions { source_date_epoch: Some(EPOCH) }).unwrap()
}

#[test]
fn layer_tar_has_exact_entries_with_whiteouts_and_opaque_markers() {
    let dir = tempfile::tempdir().unwrap();
    sample_layer(dir.path());
    let entries = read_tar(&export_plain(dir.path()));
    let mut owned = seen("etc/owned", 'f', 0o640, None, b"mine");
    owned.uid = 1000;
    owned.gid = 100;
    owned.xattrs = vec![("SCHILY.xattr.user.kiln".to_string(), b"tagged".to_vec())];
    let expected = vec![
        seen("etc", 'd', 0o755, None, b""),
        seen("etc/conf.d", 'd', 0o755, None, b""),
        seen("etc/conf.d/.wh..wh..opq", 'f', 0, None, b""),
        seen("etc/conf.d/new.conf", 'f', 0o644, None, b"x=1\n"),
        owned,
        seen("etc/pipe", 'p', 0o600, None, b""),
        seen("etc/.wh.removed", 'f', 0, None, b""),
        seen("usr", 'd', 0o755, None, b""),
        seen("usr/bin", 'd', 0o755, None, b""),
        seen("usr/bin/link", 'l', 0o777, Some("tool"), b""),
        seen("usr/bin/tool", 'f', 0o4755, None, b"#!/bin/sh\necho tool\n"),
        seen("usr/bin/tool-alias", 'h', 0o4755, Some("usr/bin/tool"), b""),
    ];
    assert_eq!(entries, expected);
}

#[test]
fn zstd_compresses_on_many_threads_into_bytes_that_do_not_depend_on_how_many() {
    use std::io::Write as _;
    // Three of zstd's 8 MiB jobs at level 3: half noise, half text.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let input: Vec<u8> = (0..17usize << 20)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if i % 8192 < 4096 { state as u8 } else { b"kiln"[i % 4] }
        })
        .collect();
    let compress = |workers| {
        let mut encoder = crate::export::zstd_encoder(Vec::new(), workers).unwrap();
        encoder.write_all(&input).unwrap();
        encoder.finish().unwrap()
    };
    let one = compress(1);
    assert_eq!(compress(3), one, "the same bytes on three threads as on one");
    assert_ne!(zstd::encode_all(&input[..], 3).unwrap(), one, "multi-threaded mode is on");
    assert_eq!(zstd::decode_all(&one[..]).unwrap(), input);
}

#[test]
fn equal_content_gives_equal_digests_and_epoch_clamps_times() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    sample_layer(a.path());
    sample_layer(b.path());
    assert_eq!(export_plain(a.path()), export_plain(b.path()));

    let cas_dir = tempfile::tempdir().unwrap();
    let cas = BlobStore::open(cas_dir.path(), Arc::new(MemoryKv::new())).unwrap();
    let options = TarOptions { source_date_epoch: Some(EPOCH) };
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let first = export_layer(a.path(), &cas, compression, &options).unwrap();
        let second = export_layer(b.path(), &cas, compression, &options).unwrap();
        assert_eq!(first, second, "{compression:?}");
        assert_eq!(first.diff_id, kiln_types::Digest::of(&export_plain(a.path())));
        let stats =
            unpack_layer(cas.open_blob(&first.digest).unwrap(), &cas_dir.path().join(format!("{compression:?}")))
                .unwrap();
        assert_eq!(stats.diff_id, first.diff_id, "{compression:?}");
    }
    fs::write(b.path().join("etc/owned"), b"MINE").unwrap();
    assert_ne!(export_plain(a.path()), export_plain(b.path()));
}

#[test]
fn unpack_restores_what_export_wrote() {
    let (src, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    sample_layer(src.path());
    let tar = export_plain(src.path());
    let stats = unpack_layer(&tar[..], dest.path()).unwrap();
    assert_eq!(stats.diff_id, kiln_types::Digest::of(&tar));
    assert_eq!(read_tar(&export_plain(dest.path())), read_tar(&tar));

    let removed = fs::symlink_metadata(dest.path().join("etc/removed")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&removed.file_type()));
    assert_eq!(removed.rdev(), 0);
    assert_eq!(xattr::get(dest.path().join("etc/conf.d"), OPAQUE_XATTR).unwrap().as_deref(), Some(&b"y"[..]));
    let tool = fs::metadata(dest.path().join("usr/bin/tool")).unwrap();
    assert_eq!(tool.nlink(), 2);
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!(tool.mtime(), EPOCH as i64);
    let owned = fs::metadata(dest.path().join("etc/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 100));
    assert_eq!(fs::metadata(dest.path().join("etc")).unwrap().mtime(), EPOCH as i64);
}

/// Appends an entry with raw name bytes, bypassing the tar crate's own path checks.
fn raw_entry(builder: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut header = tar::Header::new_old();
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

fn hostile(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, link) in entries {
        let data: &[u8] = if *kind == tar::EntryType::Regular { b"pwned" } else { b"" };
        raw_entry(&mut builder, name, *kind, link, data);
    }
    builder.into_inner().unwrap()
}

#[test]
fn hostile_tars_are_rejected_without_writing_outside() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    type Case<'a> = (&'a str, Vec<(&'a str, tar::EntryType, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("dotdot", vec![("../evil", Regular, "")], "climbs out"),
        ("nested dotdot", vec![("a/b/../../../evil", Regular, "")], "climbs out"),
        ("symlink parent", vec![("link", Symlink, "OUTSIDE"), ("link/evil", Regular, "")], "is a symlink"),
        ("relative symlink parent", vec![("up", Symlink, "../.."), ("up/evil", Regular, "")], "is a symlink"),
        ("hardlink out", vec![("h", Link, "../../etc/passwd")], "climbs out"),
        ("hardlink absolute", vec![("h", Link, "/etc/passwd")], "not in this layer"),
        (
            "hardlink through symlink",
            vec![("s", Symlink, "OUTSIDE"), ("h", Link, "s/secret")],
            "passes through a symlink",
        ),
        ("hardlink to dir", vec![("d", Directory, ""), ("h", Link, "d")], "is a directory"),
    ];
    for (label, entries, message) in cases {
        let scratch = tempfile::tempdir().unwrap();
        let outside = scratch.path().join("outside");
        let dest = scratch.path().join("a/b/dest");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        fs::create_dir_all(&dest).unwrap();
        let entries: Vec<_> = entries
            .iter()
            .map(|(n, k, l)| (*n, *k, if *l == "OUTSIDE" { outside.to_str().unwrap() } else { *l }))
            .collect();
        let err = unpack_layer(&hostile(&entries)[..], &dest).unwrap_err();
        assert!(err.to_string().contains(message), "{label}: {err}");
        assert!(matches!(err, LayerError::TarSlip { .. }), "{label}: {err}");
        let outside_names: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(outside_names, vec!["secret"], "{label}");
        assert!(!scratch.path().join("a/evil").exists() && !scratch.path().join("evil").exists(), "{label}");
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"secret", "{label}");
    }
}

#[test]
fn absolute_names_land_inside_the_destination() {
    use tar::EntryType::Regular;
    let dest = tempfile::tempdir().unwrap();
    unpack_layer(&hostile(&[("/abs/file", Regular, ""), ("./dot/file", Regular, "")])[..], dest.path()).unwrap();
    assert_eq!(fs::read(dest.path().join("abs/file")).unwrap(), b"pwned");
    assert_eq!(fs::read(dest.path().join("dot/file")).unwrap(), b"pwned");
}

#[test]
fn garbage_is_a_clear_error() {
    let dest = tempfile::tempdir().unwrap();
    let err = unpack_layer(&[0x1f, 0x8b, 1, 2, 3][..], dest.path()).unwrap_err();
    assert!(matches!(err, LayerError::BadTar { .. } | LayerError::Io { .. }), "{err}");
}

fn mounts_under(root: &Path) -> usize {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = root.display().to_string();
    table.lines().filter(|line| line.split(' ').nth(4).is_some_and(|point| point.starts_with(&root))).count()
}

#[test]
fn overlay_snapshot_captures_changes_as_a_layer() {
    let scratch = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(&scratch.path().join("snap"), Arc::new(MemoryKv::new())).unwrap();
    let base_src = scratch.path().join("base");
    fs::create_dir_all(base_src.join("etc/conf.d")).unwrap();
    fs::write(base_src.join("etc/conf.d/old.conf"), b"old").unwrap();
    fs::write(base_src.join("etc/hostname"), b"base").unwrap();
    fs::write(base_src.join("keep"), b"keep").unwrap();
    let base_tar = export_plain(&base_src);
    let base = store.import_layer(&base_tar[..], Some(&kiln_types::Digest::of(&base_tar))).unwrap();
    assert_eq!(store.import_layer(&base_tar[..], Some(&kiln_types::Digest::of(&base_tar))).unwrap(), base);

    let active = store.prepare(std::slice::from_ref(&base)).unwrap();
    let root = active.root();
    assert_eq!(fs::read(root.join("keep")).unwrap(), b"keep");
    fs::remove_file(root.join("etc/hostname")).unwrap();
    fs::remove_dir_all(root.join("etc/conf.d")).unwrap();
    fs::create_dir(root.join("etc/conf.d")).unwrap();
    fs::write(root.join("etc/conf.d/new.conf"), b"new").unwrap();
    fs::write(root.join("added"), b"added").unwrap();
    let layer = store.commit(active).unwrap().expect("changes make a layer");
    assert_eq!(mounts_under(scratch.path()), 0);

    let names: Vec<_> = read_tar(&export_plain(&store.layer_path(&layer))).into_iter().map(|e| e.path).collect();
    assert_eq!(
        names,
        ["added", "etc", "etc/conf.d", "etc/conf.d/.wh..wh..opq", "etc/conf.d/new.conf", "etc/.wh.hostname"]
    );

    let view = store.view(&[base.clone(), layer.clone()]).unwrap();
    assert!(!view.root().join("etc/hostname").exists());
    assert!(!view.root().join("etc/conf.d/old.conf").exists());
    assert_eq!(fs::read(view.root().join("etc/conf.d/new.conf")).unwrap(), b"new");
    assert!(fs::write(view.root().join("x"), b"").is_err(), "views are read-only");
    drop(view);

    let unchanged = store.prepare(&[base, layer]).unwrap();
    assert_eq!(store.commit(unchanged).unwrap(), None);
    let empty = store.view(&[]).unwrap();
    assert_eq!(fs::read_dir(empty.root()).unwrap().count(), 0);
    drop(empty);
    assert_eq!(mounts_under(scratch.path()), 0);
    assert_eq!(fs::read_dir(scratch.path().join("snap/a")).unwrap().count(), 0);
}

#[test]
fn a_mount_held_busy_by_another_process_still_commits() {
    let scratch = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(&scratch.path().join("snap"), Arc::new(MemoryKv::new())).unwrap();
    let active = store.prepare(&[]).unwrap();
    fs::write(active.root().join("made"), b"made").unwrap();
    // A process whose working directory is inside the mount keeps it busy, as a child
    // between clone and exec does with a copied descriptor.
    let mut holder = std::process::Command::new("sleep").arg("600").current_dir(active.root()).spawn().unwrap();
    let layer = store.commit(active);
    holder.kill().unwrap();
    holder.wait().unwrap();
    let layer = layer.unwrap().expect("the change makes a layer");
    assert_eq!(fs::read(store.layer_path(&layer).join("made")).unwrap(), b"made");
    assert_eq!(mounts_under(scratch.path()), 0, "detached from the mount table");
}

#[test]
fn reopening_the_store_clears_a_crashed_mount() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path().join("snap");
    let store = SnapshotStore::open(&root, Arc::new(MemoryKv::new())).unwrap();
    let active = store.prepare(&[]).unwrap();
    std::mem::forget(active);
    assert_eq!(mounts_under(scratch.path()), 1);
    let _store = SnapshotStore::open(&root, Arc::new(MemoryKv::new())).unwrap();
    assert_eq!(mounts_under(scratch.path()), 0);
    assert_eq!(fs::read_dir(root.join("a")).unwrap().count(), 0);
}

#[test]
fn wrong_diff_id_and_missing_layers_are_errors() {
    let scratch = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(scratch.path(), Arc::new(MemoryKv::new())).unwrap();
    let tar = hostile(&[("file", tar::EntryType::Regular, "")]);
    let wrong = kiln_types::Digest::of(b"not it");
    let err = store.import_layer(&tar[..], Some(&wrong)).unwrap_err();
    assert!(err.to_string().contains(&wrong.to_string()), "{err}");
    let missing = LayerId::parse("0123456789abcdef").unwrap();
    let err = store.prepare(&[missing]).unwrap_err();
    assert!(err.to_string().contains("0123456789abcdef"), "{err}");
    assert_eq!(fs::read_dir(scratch.path().join("a")).unwrap().count(), 0);
}

#[test]
fn archives_extract_inside_the_root_following_its_symlinks() {
    use tar::EntryType::{Regular, Symlink};
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("usr/lib")).unwrap();
    symlink("usr/lib", root.path().join("lib")).unwrap();
    symlink(outside.path(), root.path().join("escape")).unwrap();
    let archive = hostile(&[
        ("lib/libx.so", Regular, ""),
        ("escape/evil", Regular, ""),
        (".wh.kept", Regular, ""),
        ("link", Symlink, "/etc/passwd"),
    ]);
    let mut compressed = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut compressed, &archive).unwrap();
    let compressed = compressed.finish().unwrap();
    let tar_path = root.path().join("upload.tar.gz");
    fs::write(&tar_path, &compressed).unwrap();
    assert!(is_archive(&tar_path));
    assert!(!is_archive(&root.path().join("usr")));

    assert_eq!(extract_archive(&compressed[..], root.path(), root.path()).unwrap(), 4);
    assert_eq!(fs::read(root.path().join("usr/lib/libx.so")).unwrap(), b"pwned");
    assert_eq!(fs::read(root.path().join("escape/evil")).ok(), None, "the absolute symlink is not followed out");
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    assert_eq!(fs::read(root.path().join(".wh.kept")).unwrap(), b"pwned", "no whiteouts in ADD archives");
    assert_eq!(fs::read_link(root.path().join("link")).unwrap(), Path::new("/etc/passwd"));

    let err =
        extract_archive(&hostile(&[("../../x", Regular, "")])[..], root.path(), &root.path().join("usr")).unwrap_err();
    assert!(matches!(err, LayerError::TarSlip { .. }), "{err}");
}

#[test]
fn chains_longer_than_a_page_of_mount_options_mount_up_to_overlayfs_limit() {
    let scratch = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(&scratch.path().join("snap"), Arc::new(MemoryKv::new())).unwrap();
    // 200 layers of about 70 bytes of path each: far more than one page of options.
    let mut chain = Vec::new();
    for n in 0..200 {
        let src = scratch.path().join(format!("src{n}"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join(format!("f{n}")), n.to_string()).unwrap();
        fs::write(src.join("top"), n.to_string()).unwrap();
        let tar = export_plain(&src);
        chain.push(store.import_layer(&tar[..], Some(&kiln_types::Digest::of(&tar))).unwrap());
    }
    let active = store.prepare(&chain).unwrap();
    assert_eq!(fs::read_to_string(active.root().join("f0")).unwrap(), "0");
    assert_eq!(fs::read_to_string(active.root().join("top")).unwrap(), "199", "the last layer is on top");
    fs::write(active.root().join("new"), "x").unwrap();
    assert!(store.commit(active).unwrap().is_some());
    let view = store.view(&chain).unwrap();
    assert_eq!(fs::read_to_string(view.root().join("f150")).unwrap(), "150");
    drop(view);

    let too_many: Vec<LayerId> = std::iter::repeat_n(chain[0].clone(), MAX_LAYERS + 1).collect();
    let err = store.view(&too_many).unwrap_err();
    assert!(matches!(err, LayerError::TooManyLayers(501)), "{err}");
    assert_eq!(mounts_under(scratch.path()), 0);
}

/// Commits a layer holding one file of `bytes` bytes.
fn layer_of(store: &SnapshotStore, name: &str, bytes: usize) -> LayerId {
    let active = store.prepare(&[]).unwrap();
    fs::write(active.root().join(name), vec![7u8; bytes]).unwrap();
    store.commit(active).unwrap().expect("a change")
}

#[test]
fn held_and_freshly_made_layers_are_never_removed_and_removal_frees_blobs_and_records() {
    let scratch = tempfile::tempdir().unwrap();
    let kv: kiln_kv::SharedKv = Arc::new(MemoryKv::new());
    let cas = BlobStore::open(&scratch.path().join("blobs"), kv.clone()).unwrap();
    let store = SnapshotStore::open(&scratch.path().join("snap"), kv.clone()).unwrap();

    // A layer that no hold has released yet has no record: it is being made.
    let fresh = layer_of(&store, "fresh", 10_000);
    assert_eq!(store.remove_layer(&fresh, &cas).unwrap(), None);

    let hold = store.hold();
    hold.add(std::slice::from_ref(&fresh)).unwrap();
    let exported = store.export(&fresh, &cas, Compression::Gzip, &TarOptions::default()).unwrap();
    assert_eq!(store.remove_layer(&fresh, &cas).unwrap(), None, "held");
    let usage = store.usage(&cas).unwrap();
    assert_eq!(usage.len(), 1);
    assert!(usage[0].in_use && usage[0].usage.is_none());
    assert!(usage[0].size >= 10_000 + exported.size, "{usage:?}");
    hold.release();

    let record = store.usage(&cas).unwrap()[0].usage.expect("recorded on release");
    assert_eq!(record.usage_count, 1);
    let removed = store.remove_layer(&fresh, &cas).unwrap().expect("unused and released");
    assert_eq!(removed.diff_id, Some(exported.diff_id));
    assert!(removed.size >= 10_000 + exported.size, "{removed:?}");
    assert!(!store.has_layer(&fresh));
    assert!(!cas.contains(&exported.digest), "its export is freed with it");
    assert!(store.usage(&cas).unwrap().is_empty());
    assert_eq!(fs::read_dir(scratch.path().join("snap/trash")).unwrap().count(), 0);

    // Holding a layer that is gone says which.
    let hold = store.hold();
    assert_eq!(hold.add(std::slice::from_ref(&fresh)), Err(fresh.clone()));
}

#[test]
fn a_hold_started_before_a_layer_was_used_keeps_it() {
    let scratch = tempfile::tempdir().unwrap();
    let kv: kiln_kv::SharedKv = Arc::new(MemoryKv::new());
    let cas = BlobStore::open(&scratch.path().join("blobs"), kv.clone()).unwrap();
    let store = SnapshotStore::open(&scratch.path().join("snap"), kv.clone()).unwrap();
    let layer = layer_of(&store, "shared", 100);
    let first = store.hold();
    first.add(std::slice::from_ref(&layer)).unwrap();
    // A second build starts while the first still has the layer, and reaches it later
    // (deduplication) without having held it yet.
    let second = store.hold();
    drop(first);
    assert_eq!(store.remove_layer(&layer, &cas).unwrap(), None);
    drop(second);
    let record = store.usage(&cas).unwrap()[0].usage.unwrap();
    while now_ms() <= record.last_used {}
    assert!(store.remove_layer(&layer, &cas).unwrap().is_some());
}

#[test]
fn reopening_records_layers_a_stopped_process_left_unrecorded() {
    let scratch = tempfile::tempdir().unwrap();
    let kv: kiln_kv::SharedKv = Arc::new(MemoryKv::new());
    let cas = BlobStore::open(&scratch.path().join("blobs"), kv.clone()).unwrap();
    let root = scratch.path().join("snap");
    let layer = layer_of(&SnapshotStore::open(&root, kv.clone()).unwrap(), "left", 100);
    let store = SnapshotStore::open(&root, kv).unwrap();
    assert!(store.usage(&cas).unwrap()[0].usage.is_some());
    assert!(store.remove_layer(&layer, &cas).unwrap().is_some());
}

#[test]
fn an_imported_layer_is_recorded_kept_while_older_holds_live_and_collected_after() {
    let scratch = tempfile::tempdir().unwrap();
    let kv: kiln_kv::SharedKv = Arc::new(MemoryKv::new());
    let cas = BlobStore::open(&scratch.path().join("blobs"), kv.clone()).unwrap();
    let store = SnapshotStore::open(&scratch.path().join("snap"), kv.clone()).unwrap();
    let source = scratch.path().join("src");
    fs::create_dir_all(&source).unwrap();
    fs::write(source.join("file"), b"imported").unwrap();
    let tar = export_plain(&source);
    // A build began before the import (a coordinator bringing a result in for its export).
    let build = store.hold();
    let id = store.import_layer(&tar[..], Some(&kiln_types::Digest::of(&tar))).unwrap();
    let record = store.usage(&cas).unwrap()[0].usage.expect("recorded on import");
    assert_eq!(store.remove_layer(&id, &cas).unwrap(), None, "the build may still use it");
    drop(build);
    while now_ms() <= record.last_used {}
    assert!(store.remove_layer(&id, &cas).unwrap().is_some(), "nobody holds it: it does not leak");
}
