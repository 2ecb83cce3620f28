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
        let (parent, name) = self.parent(rel)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd =
            rustix::fs::openat(&parent, name, flags, Mode::from_raw_mode(0o600)).map_err(|e| self.error(rel, e))?;
        io::copy(source, &mut File::from(fd))?;
        Ok(())
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

    use super::*;

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
