//! Layer directory → OCI layer tar, deterministic, with overlay whiteouts translated.
//!
//! A layer directory is in overlayfs format: a deleted path is a character device 0/0 and a
//! directory that hides everything below it carries `trusted.overlay.opaque=y`. The OCI format
//! spells those `.wh.<name>` and `<dir>/.wh..wh..opq`. Entries are written in bytewise sorted
//! order, depth first, with numeric ids and no user names, so equal content gives equal bytes.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kiln_cas::BlobStore;
use kiln_types::{Digest, Sha256Writer};
use serde::{Deserialize, Serialize};

use crate::{LayerError, io_at};

/// The xattr overlayfs puts on opaque directories.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Prefix of OCI whiteout file names.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the OCI opaque-directory marker.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (the default, what every registry client reads).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer with this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Options that shape the tar bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TarOptions {
    /// `SOURCE_DATE_EPOCH`: modification times later than this are clamped to it.
    pub source_date_epoch: Option<u64>,
}

/// A layer exported into the blob store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerBlob {
    /// Digest of the compressed blob (what manifests reference).
    pub digest: Digest,
    /// Digest of the uncompressed tar (the image config's diff id).
    pub diff_id: Digest,
    /// Size of the compressed blob.
    pub size: u64,
    /// The compression used.
    pub compression: Compression,
    /// Bytes of the uncompressed tar, when known (Kiln wrote it; not for a pulled blob or a
    /// record from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_size: Option<u64>,
}

/// Writes the layer directory as a tar into `out`.
pub fn write_layer_tar<W: Write>(dir: &Path, out: W, options: &TarOptions) -> Result<W, LayerError> {
    let mut writer = TarWriter { builder: tar::Builder::new(out), options: *options, links: HashMap::new() };
    writer.builder.mode(tar::HeaderMode::Complete);
    writer.builder.follow_symlinks(false);
    writer.walk(dir, Path::new(""))?;
    writer.builder.into_inner().map_err(io_at(dir))
}

/// Exports the layer directory into the blob store, hashing the tar (diff id) and the
/// compressed stream (digest) in one pass.
pub fn export_layer(
    dir: &Path,
    cas: &BlobStore,
    compression: Compression,
    options: &TarOptions,
) -> Result<LayerBlob, LayerError> {
    let ingest = cas.ingest()?;
    let (diff_id, tar_size, ingest) = match compression {
        Compression::None => {
            let hashing = write_layer_tar(dir, HashingWriter::new(ingest), options)?;
            let written = hashing.written();
            let (diff_id, ingest) = hashing.finish();
            (diff_id, written, ingest)
        }
        Compression::Gzip => {
            let encoder = crate::pgzip::ParallelGzip::new(ingest, flate2::Compression::default());
            let hashing = write_layer_tar(dir, HashingWriter::new(encoder), options)?;
            let written = hashing.written();
            let (diff_id, encoder) = hashing.finish();
            (diff_id, written, encoder.finish().map_err(io_at(dir))?)
        }
        Compression::Zstd => {
            let workers = crate::compression_threads().min(ZSTD_WORKERS);
            let encoder = zstd_encoder(ingest, workers).map_err(io_at(dir))?;
            let hashing = write_layer_tar(dir, HashingWriter::new(encoder), options)?;
            let written = hashing.written();
            let (diff_id, encoder) = hashing.finish();
            (diff_id, written, encoder.finish().map_err(io_at(dir))?)
        }
    };
    let info = ingest.commit(None)?;
    Ok(LayerBlob { digest: info.digest, diff_id, size: info.size, compression, tar_size: Some(tar_size) })
}

/// The most threads a zstd export uses: each holds 8 MiB jobs and their output, and the
/// tar and its digest on one thread bound the export well before.
const ZSTD_WORKERS: usize = 4;

/// A zstd encoder (level 3) compressing on `workers` threads. zstd's multi-threaded output
/// depends only on the input, whatever the number of workers (one or more): a layer has one
/// digest on every machine. Its jobs are 8 MiB at this level, so a small layer takes one.
pub(crate) fn zstd_encoder<W: Write>(out: W, workers: usize) -> std::io::Result<zstd::Encoder<'static, W>> {
    let mut encoder = zstd::Encoder::new(out, 3)?;
    encoder.multithread(u32::try_from(workers.max(1)).unwrap_or(u32::MAX))?;
    Ok(encoder)
}

/// Passes bytes through while hashing them.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256Writer,
    written: u64,
}

impl<W> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256Writer::new(), written: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of everything written, and the inner writer.
    pub fn finish(self) -> (Digest, W) {
        (self.hasher.finish(), self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct TarWriter<W: Write> {
    builder: tar::Builder<W>,
    options: TarOptions,
    /// First path seen for each (device, inode) with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> TarWriter<W> {
    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<(), LayerError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(io_at(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_at(dir))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            let rel = rel.join(&name);
            let meta = fs::symlink_metadata(&path).map_err(io_at(&path))?;
            self.entry(&path, &rel, &meta)?;
            if meta.is_dir() {
                self.walk(&path, &rel)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, path: &Path, rel: &Path, meta: &Metadata) -> Result<(), LayerError> {
        let file_type = meta.file_type();
        let mut header = self.header(meta);
        if file_type.is_char_device() && meta.rdev() == 0 {
            let name = rel.file_name().expect("walked entries have names");
            let mut whiteout = std::ffi::OsString::from(WHITEOUT_PREFIX);
            whiteout.push(name);
            return self.marker(rel.with_file_name(whiteout), meta);
        }
        if file_type.is_socket() {
            // Sockets cannot be represented in a tar and are left out, as Docker does.
            return Ok(());
        }
        self.append_xattrs(path)?;
        if file_type.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            self.builder.append_data(&mut header, rel, io::empty()).map_err(io_at(path))?;
            if xattr::get(path, OPAQUE_XATTR).map_err(io_at(path))?.as_deref() == Some(b"y") {
                self.marker(rel.join(OPAQUE_MARKER), meta)?;
            }
        } else if file_type.is_symlink() {
            header.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(path).map_err(io_at(path))?;
            self.builder.append_link(&mut header, rel, target).map_err(io_at(path))?;
        } else if file_type.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    header.set_entry_type(tar::EntryType::Link);
                    let first = first.clone();
                    return self.builder.append_link(&mut header, rel, first).map_err(io_at(path));
                }
                self.links.insert(key, rel.to_path_buf());
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(path).map_err(io_at(path))?;
            self.builder.append_data(&mut header, rel, file).map_err(io_at(path))?;
        } else if file_type.is_char_device() || file_type.is_block_device() || file_type.is_fifo() {
            let kind = if file_type.is_fifo() {
                tar::EntryType::Fifo
            } else if file_type.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            header.set_entry_type(kind);
            let rdev = meta.rdev();
            header.set_device_major(nix::sys::stat::major(rdev) as u32).map_err(io_at(path))?;
            header.set_device_minor(nix::sys::stat::minor(rdev) as u32).map_err(io_at(path))?;
            self.builder.append_data(&mut header, rel, io::empty()).map_err(io_at(path))?;
        }
        Ok(())
    }

    /// An empty regular file that stands for a whiteout or an opaque marker.
    fn marker(&mut self, rel: PathBuf, meta: &Metadata) -> Result<(), LayerError> {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        header.set_mtime(self.mtime(meta));
        self.builder.append_data(&mut header, &rel, io::empty()).map_err(io_at(&rel))
    }

    fn header(&self, meta: &Metadata) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_size(0);
        header.set_mtime(self.mtime(meta));
        header
    }

    fn mtime(&self, meta: &Metadata) -> u64 {
        let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
        match self.options.source_date_epoch {
            Some(epoch) => mtime.min(epoch),
            None => mtime,
        }
    }

    /// Extended attributes as PAX `SCHILY.xattr.*` records, overlay's own left out.
    fn append_xattrs(&mut self, path: &Path) -> Result<(), LayerError> {
        let mut names: Vec<_> = xattr::list(path)
            .map_err(io_at(path))?
            .filter(|name| !name.as_bytes().starts_with(b"trusted.overlay."))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        names.sort();
        let mut records = Vec::new();
        for name in names {
            if let Some(value) = xattr::get(path, &name).map_err(io_at(path))? {
                records.push((format!("SCHILY.xattr.{}", name.to_string_lossy()), value));
            }
        }
        let pax = records.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        self.builder.append_pax_extensions(pax).map_err(io_at(path))
    }
}
