//! Measures exporting one large layer into a blob store (tar, compression, both digests):
//! `cargo run --release -p kiln-layer --example export_throughput -- [MIB] [DIR]`. The layer is
//! MIB (default 1024) of files of 16 MiB, half random and half text-like (compressible), in a
//! fresh directory under DIR (default the system's temporary directory).

use std::sync::Arc;
use std::time::Instant;

use kiln_cas::BlobStore;
use kiln_kv::MemoryKv;
use kiln_layer::{Compression, TarOptions, export_layer};

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(1024);
    let parent = std::env::args().nth(2).map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(parent).unwrap();
    let layer = dir.path().join("layer");
    std::fs::create_dir_all(&layer).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for file in 0..mib / 16 {
        let mut bytes = vec![0u8; 16 << 20];
        for chunk in bytes.chunks_mut(8) {
            // xorshift for the random half; a repeating sentence for the other.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = if file % 2 == 0 { state.to_le_bytes() } else { *b"kiln ok " };
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        std::fs::write(layer.join(format!("f{file}")), bytes).unwrap();
    }
    let cas = BlobStore::open(&dir.path().join("cas"), Arc::new(MemoryKv::new())).unwrap();
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let started = Instant::now();
        let blob = export_layer(&layer, &cas, compression, &TarOptions::default()).unwrap();
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{compression:?}: {mib} MiB in {seconds:.2} s ({:.0} MiB/s), blob {} MiB",
            mib as f64 / seconds,
            blob.size >> 20
        );
    }
}
