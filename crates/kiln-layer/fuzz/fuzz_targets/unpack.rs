//! Unpacks arbitrary bytes as a layer tar (byte 0 even) or as an `ADD` archive (odd) into
//! `SCRATCH/a/dest`, then checks nothing appeared outside `dest`. Run as root (mknod, chown).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, tar)) = data.split_first() else { return };
    let scratch = tempfile::tempdir().expect("scratch directory");
    let dest = scratch.path().join("a/dest");
    std::fs::create_dir_all(&dest).expect("dest");
    let _ = if mode & 1 == 0 {
        kiln_layer::unpack_layer(tar, &dest).map(|_| ())
    } else {
        kiln_layer::extract_archive(tar, &dest, &dest).map(|_| ())
    };
    let names = |dir: &std::path::Path| -> Vec<_> {
        std::fs::read_dir(dir).expect("readable").map(|e| e.expect("entry").file_name()).collect()
    };
    assert_eq!(names(scratch.path()), ["a"], "something was written beside the destination");
    assert_eq!(names(&scratch.path().join("a")), ["dest"], "something was written beside the destination");
});
