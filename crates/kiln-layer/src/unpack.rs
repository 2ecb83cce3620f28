//! OCI layer tar → layer directory in overlayfs format, refusing anything that escapes it.
//!
//! `.wh.<name>` becomes a character device 0/0 and `.wh..wh..opq` the opaque xattr, so the
//! result can be an overlay lower directory as is. Entry names with `..` that climb out,
//! entries whose parent is a symlink, and hard links to outside paths are errors that name
//! the entry (tar-slip), never writes outside the destination.
//!
//! Entry-level helpers return a message that the unpacker wraps with the entry into
//! `LayerError::BadTar`.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use kiln_types::{Digest, Sha256Writer};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;

use crate::export::{OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX};
use crate::resolve::{clean_lexically, resolve_in_root};
use crate::{LayerError, io_at};

/// What unpacking found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Digest of the uncompressed tar stream.
    pub diff_id: Digest,
    /// Number of entries written.
    pub entries: u64,
}

/// Unpacks a layer (plain, gzip or zstd, detected from its first bytes) into `dest`, which
/// should be a new, empty directory.
pub fn unpack_layer(reader: impl Read, dest: &Path) -> Result<UnpackStats, LayerError> {
    fs::create_dir_all(dest).map_err(io_at(dest))?;
    let decompressed = decompress(reader).map_err(io_at(dest))?;
    let mut hashing = HashingReader { inner: decompressed, hasher: Sha256Writer::new() };
    let mut unpacker = Unpacker {
        dest,
        confine: Confine::Layer,
        dir_times: Vec::new(),
        entries: 0,
        owner: None,
        dir_modes: Vec::new(),
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries().map_err(io_at(dest))? {
            let entry = entry.map_err(|e| LayerError::BadTar { reason: e.to_string() })?;
            unpacker.entry(entry)?;
        }
    }
    // The diff id covers the whole stream, including the end-of-archive padding.
    io::copy(&mut hashing, &mut io::sink()).map_err(io_at(dest))?;
    unpacker.finish()?;
    Ok(UnpackStats { diff_id: hashing.hasher.finish(), entries: unpacker.entries })
}

/// Plain, gzip or zstd, told apart by the first bytes.
fn decompress<'r>(reader: impl Read + 'r) -> io::Result<Box<dyn Read + 'r>> {
    let mut buffered = BufReader::new(reader);
    let magic = buffered.fill_buf()?;
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(buffered))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

/// Whether the file is a tar archive, plain or gzip/zstd-compressed (what `ADD` unpacks).
pub fn is_archive(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return false };
    let Ok(reader) = decompress(file) else { return false };
    // A first header with a valid checksum, as Docker's detection reads one entry.
    let mut archive = tar::Archive::new(reader);
    matches!(archive.entries().map(|mut entries| entries.next()), Ok(Some(Ok(_))))
}

/// Extracts a tar archive (plain, gzip or zstd) into `dest` inside `root`, as `ADD` does:
/// names and links resolve inside `root` (symlinks in the existing tree are followed there),
/// `.wh.` files are ordinary files. Returns the number of entries.
pub fn extract_archive(reader: impl Read, root: &Path, dest: &Path) -> Result<u64, LayerError> {
    extract_archive_as(reader, root, dest, None)
}

/// [`extract_archive`] with every entry, and the directories it creates for `dest`, owned by
/// `owner` when given (`ADD --chown` of a local archive, as BuildKit 0.23 and later).
pub fn extract_archive_as(
    reader: impl Read,
    root: &Path,
    dest: &Path,
    owner: Option<(u32, u32)>,
) -> Result<u64, LayerError> {
    let missing: Vec<&Path> = dest.ancestors().take_while(|p| p.starts_with(root) && !p.exists()).collect();
    fs::create_dir_all(dest).map_err(io_at(dest))?;
    if let Some((uid, gid)) = owner {
        for created in missing {
            lchown(created, Some(uid), Some(gid)).map_err(io_at(created))?;
        }
    }
    let mut unpacker = Unpacker {
        dest,
        confine: Confine::Root(root),
        dir_times: Vec::new(),
        entries: 0,
        owner,
        dir_modes: Vec::new(),
    };
    let mut archive = tar::Archive::new(decompress(reader).map_err(io_at(dest))?);
    for entry in archive.entries().map_err(io_at(dest))? {
        let entry = entry.map_err(|e| LayerError::BadTar { reason: e.to_string() })?;
        unpacker.entry(entry)?;
    }
    unpacker.finish()?;
    Ok(unpacker.entries)
}

/// How entry paths are kept inside the destination.
#[derive(Clone, Copy)]
enum Confine<'a> {
    /// A layer: symlinked parents are refused, whiteouts are translated.
    Layer,
    /// A tree inside this root: symlinks resolve inside the root, no whiteouts.
    Root(&'a Path),
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256Writer,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    confine: Confine<'a>,
    /// Directory modification times, applied last because writing children changes them.
    dir_times: Vec<(PathBuf, u64)>,
    entries: u64,
    /// Every entry's owner instead of the archive's.
    owner: Option<(u32, u32)>,
    /// Directory modes applied last (unpacking as a user other than root).
    dir_modes: Vec<(PathBuf, u32)>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), LayerError> {
        // Names are bytes: a name that is not UTF-8 is kept as it is (and shown lossily).
        let name_bytes = entry.path_bytes().into_owned();
        let raw_name = String::from_utf8_lossy(&name_bytes).into_owned();
        let slip = |reason: &str| LayerError::TarSlip { entry: raw_name.clone(), reason: reason.to_string() };
        let rel = clean_lexically(std::ffi::OsStr::from_bytes(&name_bytes))
            .ok_or_else(|| slip("climbs out of the layer with `..`"))?;
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            return Ok(()); // The root itself ("./"): nothing to create.
        };
        let parent = self.ensure_parent(&rel).map_err(|e| match e {
            ParentError::Symlink(p) => slip(&format!("its parent {} is a symlink", p.display())),
            ParentError::Io(path, source) => LayerError::Io { path, source },
        })?;
        let path = parent.join(&name);
        self.entries += 1;

        let name_bytes = name.as_bytes();
        let layer = matches!(self.confine, Confine::Layer);
        if layer && name_bytes == OPAQUE_MARKER.as_bytes() {
            xattr::set(&parent, OPAQUE_XATTR, b"y").map_err(io_at(&parent))?;
            return Ok(());
        }
        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()).filter(|_| layer) {
            let target = parent.join(std::ffi::OsStr::from_bytes(hidden));
            remove_existing(&target)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(|e| io_at(&target)(e.into()))?;
            return Ok(());
        }

        let header = entry.header().clone();
        let kind = header.entry_type();
        let is_dir = kind.is_dir();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() && is_dir => {}
            Ok(_) => remove_existing(&path)?,
            Err(_) => {}
        }
        let mode = header.mode().map_err(|e| LayerError::BadTar { reason: format!("{raw_name}: {e}") })? & 0o7777;
        match kind {
            tar::EntryType::Directory => {
                if !path.is_dir() {
                    fs::create_dir(&path).map_err(io_at(&path))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = File::create_new(&path).map_err(io_at(&path))?;
                io::copy(&mut entry, &mut file).map_err(io_at(&path))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name().ok().flatten().ok_or_else(|| slip("symlink without a target"))?;
                symlink(&*target, &path).map_err(io_at(&path))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| slip("hard link without a target"))?;
                let source = self
                    .hardlink_source(Path::new(std::ffi::OsStr::from_bytes(&target)))
                    .map_err(|reason| slip(&reason))?;
                fs::hard_link(&source, &path).map_err(io_at(&path))?;
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let flag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let dev = makedev(major.into(), minor.into());
                match mknod(&path, flag, Mode::from_bits_truncate(mode), dev) {
                    // Only root makes device nodes; anyone else skips them, as tar does.
                    Err(nix::errno::Errno::EPERM) if !nix::unistd::geteuid().is_root() => return Ok(()),
                    other => other.map_err(|e| io_at(&path)(e.into()))?,
                }
            }
            other => {
                return Err(LayerError::BadTar { reason: format!("{raw_name}: unsupported entry type {other:?}") });
            }
        }
        self.apply_metadata(&mut entry, &header, &path, mode)
    }

    fn apply_metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        header: &tar::Header,
        path: &Path,
        mode: u32,
    ) -> Result<(), LayerError> {
        let (uid, gid) = self.owner.unwrap_or((header.uid().unwrap_or(0) as u32, header.gid().unwrap_or(0) as u32));
        // Only root can give files away; anyone else unpacks them as their own (as tar does).
        if nix::unistd::geteuid().is_root() {
            lchown(path, Some(uid), Some(gid)).map_err(io_at(path))?;
        }
        let kind = header.entry_type();
        let root = nix::unistd::geteuid().is_root();
        if kind.is_dir() && !root {
            // Without root a read-only directory (a Go module cache's 0555) would refuse its
            // own children: its mode goes on last, with its time.
            self.dir_modes.push((path.to_path_buf(), mode));
        } else if kind != tar::EntryType::Symlink {
            // chown clears set-id bits, so the mode goes on afterwards.
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_at(path))?;
        }
        if let Ok(Some(extensions)) = entry.pax_extensions() {
            for extension in extensions.flatten() {
                if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    let name = std::ffi::OsStr::from_bytes(name);
                    if !name.as_bytes().starts_with(b"trusted.overlay.") {
                        match xattr::set(path, name, extension.value_bytes()) {
                            // Privileged attributes (security.capability) need root; anyone
                            // else unpacks the file without them, as tar does.
                            Err(e) if !root && e.raw_os_error() == Some(nix::errno::Errno::EPERM as i32) => {}
                            other => other.map_err(io_at(path))?,
                        }
                    }
                }
            }
        }
        let mtime = header.mtime().unwrap_or(0);
        if kind.is_dir() {
            self.dir_times.push((path.to_path_buf(), mtime));
        } else {
            set_mtime(path, mtime)?;
        }
        Ok(())
    }

    /// Creates missing parent directories of `rel` and returns the parent's path. A parent
    /// that is a symlink is refused instead of followed.
    fn ensure_parent(&self, rel: &Path) -> Result<PathBuf, ParentError> {
        if let Confine::Root(root) = self.confine {
            let parent = self.dest.join(rel.parent().unwrap_or(Path::new("")));
            let relative = parent.strip_prefix(root).unwrap_or(&parent);
            let resolved = resolve_in_root(root, relative, true).map_err(|e| ParentError::Io(parent.clone(), e))?;
            fs::create_dir_all(&resolved).map_err(|e| ParentError::Io(resolved.clone(), e))?;
            return Ok(resolved);
        }
        let mut current = self.dest.to_path_buf();
        let Some(parent) = rel.parent() else { return Ok(current) };
        for component in parent.components() {
            current.push(component);
            match fs::symlink_metadata(&current) {
                Ok(meta) if meta.file_type().is_symlink() => return Err(ParentError::Symlink(current)),
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&current).map_err(|e| ParentError::Io(current.clone(), e))?;
                    fs::create_dir(&current).map_err(|e| ParentError::Io(current.clone(), e))?;
                }
                Err(_) => fs::create_dir(&current).map_err(|e| ParentError::Io(current.clone(), e))?,
            }
        }
        Ok(current)
    }

    fn hardlink_source(&self, target_path: &Path) -> Result<PathBuf, String> {
        let target = target_path.display();
        let rel = clean_lexically(target_path).ok_or("hard link target climbs out of the layer")?;
        if let Confine::Root(root) = self.confine {
            let full = self.dest.join(&rel);
            let relative = full.strip_prefix(root).unwrap_or(&full);
            let source = resolve_in_root(root, relative, false).map_err(|e| e.to_string())?;
            return match fs::symlink_metadata(&source) {
                Ok(meta) if !meta.is_dir() => Ok(source),
                Ok(_) => Err(format!("hard link target {target} is a directory")),
                Err(_) => Err(format!("hard link target {target} is not in the archive")),
            };
        }
        let mut current = self.dest.to_path_buf();
        for component in rel.components() {
            current.push(component);
            let meta = fs::symlink_metadata(&current)
                .map_err(|_| format!("hard link target {target} is not in this layer"))?;
            if meta.file_type().is_symlink() && current != self.dest.join(&rel) {
                return Err(format!("hard link target {target} passes through a symlink"));
            }
        }
        if current.is_dir() && !current.is_symlink() {
            return Err(format!("hard link target {target} is a directory"));
        }
        Ok(current)
    }

    fn finish(&mut self) -> Result<(), LayerError> {
        for (path, mode) in self.dir_modes.drain(..).rev() {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_at(&path))?;
        }
        for (path, mtime) in self.dir_times.drain(..).rev() {
            set_mtime(&path, mtime)?;
        }
        Ok(())
    }
}

enum ParentError {
    Symlink(PathBuf),
    Io(PathBuf, io::Error),
}

fn remove_existing(path: &Path) -> Result<(), LayerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map_err(io_at(path)),
        Ok(_) => fs::remove_file(path).map_err(io_at(path)),
        Err(_) => Ok(()),
    }
}

fn set_mtime(path: &Path, mtime: u64) -> Result<(), LayerError> {
    let time = TimeSpec::new(mtime as i64, 0);
    utimensat(None, path, &time, &time, UtimensatFlags::NoFollowSymlink).map_err(|e| io_at(path)(e.into()))
}
