//! Compiles proto/kiln/v1/*.proto with protox (pure Rust) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["kiln/v1/control.proto", "kiln/v1/worker.proto", "kiln/v1/blobs.proto", "kiln/v1/raft.proto"];
    let descriptors = protox::compile(files, [&root])?;
    // Malformed messages are the sender's error (INVALID_ARGUMENT), not the server's.
    tonic_prost_build::configure().codec_path("crate::codec::KilnCodec").compile_fds(descriptors)?;
    for file in files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    Ok(())
}
