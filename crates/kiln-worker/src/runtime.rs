//! The worker's runtime directory: what lives only as long as a step (the runner's container
//! state and bundles, the step directories with their hosts files and results).
//!
//! None of it needs to survive a reboot, and writing it to the state directory's disk costs a
//! serial step about half a millisecond (ext4 allocating and freeing inodes, flushing files
//! libcontainer truncates and rewrites). So when `/dev/shm` is a tmpfs, as on Debian, under
//! systemd and in every Kubernetes pod, the runtime directory is `/dev/shm/kiln/NAME`; NAME
//! hashes the state directory's device, inode and path, so that workers whose containers
//! share one `/dev/shm` (`--ipc=host`) get their own even at the same path. Otherwise it is
//! `STATE/run`. A worker holds a lock on its runtime directory (`lock`) while it lives;
//! opening a worker removes the runtime directories nobody holds whose state directory is
//! gone (workers of removed test roots, say).

use std::fs::File;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};

use kiln_types::Digest;
use nix::fcntl::{Flock, FlockArg};

/// Where runtime directories go when it is a tmpfs.
const SHARED_MEMORY: &str = "/dev/shm";
/// The file in a runtime directory naming its state directory.
const STATE_FILE: &str = "state-directory";
/// The file a worker holds locked while it uses the runtime directory.
const LOCK_FILE: &str = "lock";

/// A worker's runtime directory, locked while this lives.
pub(crate) struct Runtime {
    pub dir: PathBuf,
    _lock: Flock<File>,
}

/// Creates (if needed) and locks the runtime directory of the worker whose state directory
/// is `root`, after removing those of vanished state directories.
pub(crate) fn open(root: &Path) -> Result<Runtime, String> {
    open_in(Path::new(SHARED_MEMORY), root)
}

fn open_in(shared_memory: &Path, root: &Path) -> Result<Runtime, String> {
    let root = root.canonicalize().map_err(|e| format!("{}: {e}", root.display()))?;
    let parent = shared_memory.join("kiln");
    let private_tmpfs = is_tmpfs(shared_memory)
        && create(&parent).is_ok()
        // `/dev/shm` is writable by everyone: a `kiln` another user made (or a symbolic
        // link) would let them change what containers the runner creates.
        && private(&parent).map_err(|reason| tracing::warn!("not keeping step state in {}: {reason}", parent.display())).is_ok();
    if !private_tmpfs {
        let dir = root.join("run");
        create(&dir)?;
        return lock(dir);
    }
    remove_orphans(&parent);
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let identity = format!("{}:{}:{}", meta.dev(), meta.ino(), root.display());
    let dir = parent.join(&Digest::of(identity.as_bytes()).hex()[..16]);
    create(&dir)?;
    let runtime = lock(dir)?;
    // Written whole or not at all: a worker sweeping at this moment reads the old one or
    // the new one.
    let (file, staged) = (runtime.dir.join(STATE_FILE), runtime.dir.join(format!("{STATE_FILE}.new")));
    std::fs::write(&staged, root.as_os_str().as_encoded_bytes())
        .and_then(|()| std::fs::rename(&staged, &file))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(runtime)
}

fn create(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating the runtime directory {}: {e}", dir.display()))
}

/// Takes the runtime directory's lock; another worker holding it is an error.
fn lock(dir: PathBuf) -> Result<Runtime, String> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| format!("{}: another worker uses this runtime directory ({errno})", path.display()))?;
    Ok(Runtime { dir, _lock: lock })
}

/// Whether `dir` is a directory (not a link to one) of this user that no one else may use.
fn private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(format!("owned by uid {} with mode {:o}", meta.uid(), meta.mode() & 0o7777));
    }
    Ok(())
}

fn is_tmpfs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Removes the runtime directories under `parent` that no worker holds and whose state
/// directory is gone. One with no readable state file is left alone (its worker may be
/// creating it).
fn remove_orphans(parent: &Path) {
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let Ok(owner) = std::fs::read(entry.path().join(STATE_FILE)) else { continue };
        let owner = PathBuf::from(std::ffi::OsString::from_vec(owner));
        if owner.as_os_str().is_empty() || owner.exists() {
            continue;
        }
        let Ok(held) = File::open(entry.path().join(LOCK_FILE)) else { continue };
        if Flock::lock(held, FlockArg::LockExclusiveNonblock).is_err() {
            continue;
        }
        if let Err(error) = std::fs::remove_dir_all(entry.path()) {
            let dir = entry.path();
            tracing::warn!("removing the runtime directory {} of {}: {error}", dir.display(), owner.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_a_tmpfs_each_state_directory_gets_its_own_and_vanished_ones_are_removed() {
        let state = tempfile::tempdir().unwrap();
        let shared_memory = tempfile::tempdir_in(SHARED_MEMORY).unwrap();
        let (first, second) = (state.path().join("first"), state.path().join("second"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        let first_runtime = open_in(shared_memory.path(), &first).unwrap();
        let second_runtime = open_in(shared_memory.path(), &second).unwrap();
        let (first_dir, second_dir) = (first_runtime.dir.clone(), second_runtime.dir.clone());
        assert!(first_dir.starts_with(shared_memory.path()) && second_dir.starts_with(shared_memory.path()));
        assert_ne!(first_dir, second_dir);
        let held = open_in(shared_memory.path(), &first).err().unwrap_or_default();
        assert!(held.contains("another worker uses this runtime directory"), "{held}");
        drop(first_runtime);
        assert_eq!(open_in(shared_memory.path(), &first).unwrap().dir, first_dir, "not stable across opens");

        // Gone while its worker still runs: kept; gone and let go: removed.
        std::fs::remove_dir_all(&first).unwrap();
        std::fs::remove_dir_all(&second).unwrap();
        drop(second_runtime);
        let third = state.path().join("third");
        std::fs::create_dir_all(&third).unwrap();
        let _held_first = lock(first_dir.clone()).unwrap();
        let _third = open_in(shared_memory.path(), &third).unwrap();
        assert!(first_dir.exists(), "the runtime directory of a running worker was removed");
        assert!(!second_dir.exists(), "the runtime directory of a removed state directory is left");
    }

    #[test]
    fn without_a_private_tmpfs_it_is_under_the_state_directory() {
        let state = tempfile::tempdir().unwrap();
        let in_state = state.path().canonicalize().unwrap().join("run");
        // Not a tmpfs.
        assert_eq!(open_in(Path::new("/proc"), state.path()).unwrap().dir, in_state);
        // A tmpfs where `kiln` is open to others.
        let shared_memory = tempfile::tempdir_in(SHARED_MEMORY).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir(shared_memory.path().join("kiln")).unwrap();
        std::fs::set_permissions(shared_memory.path().join("kiln"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let other_state = tempfile::tempdir().unwrap();
        let in_other_state = other_state.path().canonicalize().unwrap().join("run");
        assert_eq!(open_in(shared_memory.path(), other_state.path()).unwrap().dir, in_other_state);
    }
}
