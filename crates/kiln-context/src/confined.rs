//! Writes confined to a directory. Every path is walked component by component from the
//! directory's file descriptor with `O_NOFOLLOW`, and leaves are created exclusively, so no
//! symlink (one written earlier by the same untrusted input, or planted before) can send a
//! write outside the directory or onto an existing file.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

/// A directory that untrusted relative paths are written into.
pub struct ConfinedDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Ownership, permission bits and modification time given to a written entry.
#[derive(Debug, Clone, Copy)]
pub struct EntryMeta {
    /// Permission bits (ignored for symlinks).
    pub mode: u32,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, u32),
}

/// How [`ConfinedDir::create_file_from`] made a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Shares the source's data blocks until either is written.
    Reflinked,
    /// Its own copy of the data.
    Copied,
}

impl ConfinedDir {
    /// Opens `path` (created when missing), which must be a directory.
    pub fn open(path: &Path) -> io::Result<ConfinedDir> {
        std::fs::create_dir_all(path)?;
        let fd = rustix::fs::open(path, OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(ConfinedDir { fd, path: path.to_path_buf() })
    }

    /// Creates the directory `rel` and any missing parents (mode 0755 until finished); an
    /// existing directory is fine, anything else there is an error.
    pub fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        open_or_create_dir(&parent, name).map(drop).map_err(|e| self.error(rel, e))
    }

    /// Creates the file `rel` (which must not exist) with the content of `source`.
    pub fn create_file(&self, rel: &Path, source: &mut impl io::Read) -> io::Result<()> {
        io::copy(source, &mut self.new_file(rel)?).map_err(|e| self.copy_error(rel, e))?;
        Ok(())
    }

    /// Creates the file `rel` (which must not exist) with the content of the file `source`:
    /// a reflink (the same data blocks, copied when either is written) where the filesystem
    /// makes them (XFS, Btrfs, both files on it), else a copy in the kernel. Says which.
    pub fn create_file_from(&self, rel: &Path, source: &File) -> io::Result<Copied> {
        let mut file = self.new_file(rel)?;
        // ext4 says EOPNOTSUPP, two filesystems EXDEV: copy then.
        if rustix::fs::ioctl_ficlone(&file, source).is_ok() {
            return Ok(Copied::Reflinked);
        }
        io::copy(&mut &*source, &mut file).map_err(|e| self.copy_error(rel, e))?;
        Ok(Copied::Copied)
    }

    /// The new, empty file `rel` (which must not exist), mode 0600 until finished.
    fn new_file(&self, rel: &Path) -> io::Result<File> {
        let (parent, name) = self.parent(rel)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd =
            rustix::fs::openat(&parent, name, flags, Mode::from_raw_mode(0o600)).map_err(|e| self.error(rel, e))?;
        Ok(File::from(fd))
    }

    /// A failed copy into `rel`, naming it.
    fn copy_error(&self, rel: &Path, error: io::Error) -> io::Error {
        io::Error::new(error.kind(), format!("writing {} in {}: {error}", rel.display(), self.path.display()))
    }

    /// Creates the symlink `rel` (which must not exist) pointing at `target`. The target is
    /// stored as written and never followed here.
    pub fn create_symlink(&self, rel: &Path, target: &str) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        rustix::fs::symlinkat(target, &parent, name).map_err(|e| self.error(rel, e))
    }

    /// Makes `rel` (which must not exist) another link to the file `existing`, both inside
    /// this directory.
    pub fn create_hard_link(&self, existing: &Path, rel: &Path) -> io::Result<()> {
        let (from_dir, from_name) = self.parent(existing)?;
        let (to_dir, to_name) = self.parent(rel)?;
        rustix::fs::linkat(&from_dir, from_name, &to_dir, to_name, AtFlags::empty()).map_err(|e| self.error(rel, e))
    }

    /// Gives the entry `rel` root ownership, `meta.mode` (unless it is a symlink) and
    /// `meta.mtime`, without following a symlink at `rel`.
    pub fn finish(&self, rel: &Path, meta: EntryMeta) -> io::Result<()> {
        let (parent, name) = self.parent(rel)?;
        let fail = |e| self.error(rel, e);
        rustix::fs::chownat(
            &parent,
            name,
            Some(rustix::fs::Uid::ROOT),
            Some(rustix::fs::Gid::ROOT),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(fail)?;
        let stat = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW).map_err(fail)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Symlink {
            let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = rustix::fs::openat(&parent, name, flags, Mode::empty()).map_err(fail)?;
            // fchmod does not take O_PATH descriptors; chmod through /proc/self/fd does, and
            // the descriptor pins the inode that was checked above.
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
            rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(meta.mode & 0o7777)).map_err(fail)?;
        }
        let time = Timespec { tv_sec: meta.mtime.0, tv_nsec: i64::from(meta.mtime.1) };
        let times = Timestamps { last_access: time, last_modification: time };
        rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(fail)
    }

    /// The directory holding `rel`, opened without following symlinks (missing directories
    /// are created), and the last component's name.
    fn parent<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        let mut parts: Vec<&OsStr> = Vec::new();
        for component in rel.components() {
            match component {
                Component::Normal(name) => parts.push(name),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                Component::ParentDir => return Err(self.error(rel, rustix::io::Errno::ACCESS)),
            }
        }
        let Some(name) = parts.pop() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: empty path", rel.display())));
        };
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        let mut dir = rustix::fs::openat(&self.fd, ".", flags, Mode::empty())?;
        for part in parts {
            dir = open_or_create_dir(&dir, part).map_err(|e| self.error(rel, e))?;
        }
        Ok((dir, name))
    }

    fn error(&self, rel: &Path, errno: rustix::io::Errno) -> io::Error {
        let why = match errno {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                "a parent is a symlink or not a directory (writes never leave the destination)".to_string()
            }
            rustix::io::Errno::EXIST => "already exists".to_string(),
            rustix::io::Errno::ACCESS => "`..` is not allowed".to_string(),
            other => io::Error::from(other).to_string(),
        };
        io::Error::new(io::Error::from(errno).kind(), format!("{} in {}: {why}", rel.display(), self.path.display()))
    }
}

/// The directory `name` in `parent`, created (0755) when missing; a symlink is refused.
fn open_or_create_dir(parent: &OwnedFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e),
    }
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    rustix::fs::openat(parent, name, flags, Mode::empty())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::process::Command;

    use super::*;

    /// An XFS filesystem in a sparse file, mounted on a loop device while it lives.
    struct Xfs {
        _dir: tempfile::TempDir,
        mount: std::path::PathBuf,
    }

    impl Xfs {
        fn new() -> Xfs {
            let dir = tempfile::tempdir().unwrap();
            let (image, mount) = (dir.path().join("xfs.img"), dir.path().join("mnt"));
            File::create(&image).unwrap().set_len(512 << 20).unwrap();
            std::fs::create_dir(&mount).unwrap();
            let run = |program: &str, args: &[&std::ffi::OsStr]| {
                let out = Command::new(program).args(args).output().unwrap();
                assert!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr));
            };
            run("mkfs.xfs", &["-q".as_ref(), image.as_os_str()]);
            run("mount", &["-o".as_ref(), "loop".as_ref(), image.as_os_str(), mount.as_os_str()]);
            Xfs { _dir: dir, mount }
        }

        fn free_bytes(&self) -> u64 {
            let stat = rustix::fs::statvfs(&self.mount).unwrap();
            stat.f_bfree * stat.f_frsize
        }
    }

    impl Drop for Xfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.mount).status();
        }
    }

    #[test]
    fn files_from_a_file_are_reflinked_where_the_filesystem_can_and_copied_elsewhere() {
        let xfs = Xfs::new();
        let content: Vec<u8> = (0..32u32 << 20).map(|i| (i % 251) as u8).collect();
        let source_path = xfs.mount.join("blob");
        std::fs::write(&source_path, &content).unwrap();
        rustix::fs::sync();
        let source = File::open(&source_path).unwrap();

        let free = xfs.free_bytes();
        let on_xfs = ConfinedDir::open(&xfs.mount.join("dest")).unwrap();
        assert_eq!(on_xfs.create_file_from(Path::new("d/file"), &source).unwrap(), Copied::Reflinked);
        rustix::fs::sync();
        assert!(free - xfs.free_bytes() < 1 << 20, "a reflink took {} bytes", free - xfs.free_bytes());
        // Writing one leaves the other as it was.
        std::fs::write(xfs.mount.join("dest/d/file"), b"changed").unwrap();
        assert_eq!(std::fs::read(&source_path).unwrap(), content);

        let elsewhere = tempfile::tempdir().unwrap();
        let copied = ConfinedDir::open(elsewhere.path()).unwrap();
        assert_eq!(copied.create_file_from(Path::new("file"), &source).unwrap(), Copied::Copied);
        assert_eq!(std::fs::read(elsewhere.path().join("file")).unwrap(), content);
    }

    #[test]
    fn writes_never_follow_a_symlink_out_of_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = ConfinedDir::open(dir.path()).unwrap();
        root.create_symlink(Path::new("a"), outside.path().to_str().unwrap()).unwrap();
        let err = root.create_file(Path::new("a/evil"), &mut &b"x"[..]).unwrap_err();
        assert!(err.to_string().contains("a/evil"), "{err}");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(root.create_dir(Path::new("a/sub")).is_err());
        assert!(!outside.path().join("evil").exists() && !outside.path().join("sub").exists());

        // An existing file (or a symlink to one) is never written through.
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        root.create_symlink(Path::new("v"), outside.path().join("victim").to_str().unwrap()).unwrap();
        let err = root.create_file(Path::new("v"), &mut &b"x"[..]).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        root.finish(Path::new("v"), EntryMeta { mode: 0o777, mtime: (1, 0) }).unwrap();
        assert_eq!(std::fs::read_to_string(outside.path().join("victim")).unwrap(), "keep");
        assert!(root.create_file(Path::new("../x"), &mut &b"x"[..]).is_err());
    }

    #[test]
    fn entries_get_their_mode_time_and_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let root = ConfinedDir::open(dir.path()).unwrap();
        root.create_file(Path::new("d/e/f"), &mut &b"hi"[..]).unwrap();
        root.finish(Path::new("d/e/f"), EntryMeta { mode: 0o640, mtime: (1000, 5) }).unwrap();
        root.create_dir(Path::new("d/e")).unwrap();
        symlink("/nowhere", dir.path().join("l")).unwrap();
        root.finish(Path::new("l"), EntryMeta { mode: 0o600, mtime: (7, 0) }).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(dir.path().join("d/e/f")).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.mtime(), meta.mtime_nsec()), (0o640, 1000, 5));
        assert_eq!(std::fs::read_to_string(dir.path().join("d/e/f")).unwrap(), "hi");
        assert_eq!(std::fs::symlink_metadata(dir.path().join("l")).unwrap().mtime(), 7);
    }
}
