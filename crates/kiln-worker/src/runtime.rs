//! The worker's runtime directory: what lives only as long as a step (the runner's container
//! state and bundles, the step directories with their hosts files and results).
//!
//! None of it needs to survive a reboot, and writing it to the state directory's disk costs a
//! serial step about half a millisecond (ext4 allocating and freeing inodes, flushing files
//! libcontainer truncates and rewrites). So when `/dev/shm` is a tmpfs, as on Debian, under
//! systemd and in every Kubernetes pod, the runtime directory is `/dev/shm/kiln/HASH`, HASH
//! naming the state directory (several workers on one machine each get their own); otherwise
//! it is `STATE/run`. Opening a worker removes the runtime directories of state directories
//! that no longer exist (workers of removed test roots, say).

use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};

use kiln_types::Digest;

/// Where runtime directories go when it is a tmpfs.
const SHARED_MEMORY: &str = "/dev/shm";
/// The file in a runtime directory naming its state directory.
const OWNER: &str = "root";

/// Creates (if needed) and returns the runtime directory of the worker whose state directory
/// is `root`, after removing those of vanished state directories.
pub(crate) fn open(root: &Path) -> Result<PathBuf, String> {
    open_in(Path::new(SHARED_MEMORY), root)
}

fn open_in(shared_memory: &Path, root: &Path) -> Result<PathBuf, String> {
    let root = root.canonicalize().map_err(|e| format!("{}: {e}", root.display()))?;
    if !is_tmpfs(shared_memory) {
        return create(&root.join("run"), None);
    }
    let parent = shared_memory.join("kiln");
    create(&parent, None)?;
    // `/dev/shm` is writable by everyone: a `kiln` another user made (or a symbolic link)
    // would let them change what containers the runner creates.
    if let Err(reason) = private(&parent) {
        tracing::warn!("not keeping step state in {}: {reason}", parent.display());
        return create(&root.join("run"), None);
    }
    remove_orphans(&parent);
    let name = &Digest::of(root.as_os_str().as_encoded_bytes()).hex()[..16];
    create(&parent.join(name), Some(&root))
}

fn create(dir: &Path, owner: Option<&Path>) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating the runtime directory {}: {e}", dir.display()))?;
    if let Some(owner) = owner {
        let file = dir.join(OWNER);
        std::fs::write(&file, owner.as_os_str().as_encoded_bytes()).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    Ok(dir.to_path_buf())
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

/// Removes the runtime directories under `parent` whose state directory is gone. One whose
/// owner file cannot be read is left alone (another worker may be creating it).
fn remove_orphans(parent: &Path) {
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let Ok(owner) = std::fs::read(entry.path().join(OWNER)) else { continue };
        let owner = PathBuf::from(std::ffi::OsString::from_vec(owner));
        if owner.exists() {
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
        assert!(first_runtime.starts_with(shared_memory.path()) && second_runtime.starts_with(shared_memory.path()));
        assert_ne!(first_runtime, second_runtime);
        assert_eq!(open_in(shared_memory.path(), &first).unwrap(), first_runtime, "not stable across opens");

        std::fs::remove_dir_all(&first).unwrap();
        open_in(shared_memory.path(), &second).unwrap();
        assert!(!first_runtime.exists(), "the runtime directory of a removed state directory is left");
        assert!(second_runtime.exists());
    }

    #[test]
    fn without_a_private_tmpfs_it_is_under_the_state_directory() {
        let state = tempfile::tempdir().unwrap();
        let in_state = state.path().canonicalize().unwrap().join("run");
        // Not a tmpfs.
        assert_eq!(open_in(Path::new("/proc"), state.path()).unwrap(), in_state);
        // A tmpfs where `kiln` is open to others.
        let shared_memory = tempfile::tempdir_in(SHARED_MEMORY).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir(shared_memory.path().join("kiln")).unwrap();
        std::fs::set_permissions(shared_memory.path().join("kiln"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(open_in(shared_memory.path(), state.path()).unwrap(), in_state);
    }
}
