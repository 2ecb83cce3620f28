//! Path resolution confined to a root directory, the way a chroot would resolve it.
//!
//! Build steps copy from and into filesystems whose symlinks were written by untrusted
//! Dockerfiles and images. Every path the worker touches inside a snapshot or context goes
//! through [`resolve_in_root`], so `../`, absolute symlinks and symlink chains land inside the
//! root, never outside it.

use std::ffi::OsStr;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed before resolution gives up, as Linux does (`ELOOP`).
pub const MAX_SYMLINK_HOPS: usize = 40;

/// Resolves `path` (absolute or relative to the root) inside `root`. Symlinks in every
/// component are followed with the root as `/`; the last component is followed only when
/// `follow_last` is set. Missing components are fine: the result is where they would be.
pub fn resolve_in_root(root: &Path, path: impl AsRef<Path>, follow_last: bool) -> io::Result<PathBuf> {
    let path = path.as_ref();
    let mut hops = 0;
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = components(path).into_iter().rev().collect();
    while let Some(component) = pending.pop() {
        if component == ".." {
            resolved.pop();
            continue;
        }
        let candidate = join(root, &resolved).join(&component);
        let is_last = pending.is_empty();
        let meta = std::fs::symlink_metadata(&candidate);
        match meta {
            Ok(meta) if meta.file_type().is_symlink() && (follow_last || !is_last) => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(io::Error::other(format!("{}: too many levels of symbolic links", path.display())));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                pending.extend(components(&target).into_iter().rev());
            }
            _ => resolved.push(component),
        }
    }
    Ok(join(root, &resolved))
}

/// The path's normal components, with `..` kept (it is handled during resolution) and `.`,
/// the root and prefixes dropped.
fn components(path: &Path) -> Vec<std::ffi::OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsStr::new("..").to_os_string()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn join(root: &Path, parts: &[std::ffi::OsString]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(parts);
    path
}

/// The path relative to the root with `.` and `..` removed lexically, or `None` when `..`
/// would climb above the root. Used for names that must not be resolved through symlinks,
/// such as tar entry names.
pub fn clean_lexically(path: &(impl AsRef<Path> + ?Sized)) -> Option<PathBuf> {
    let mut parts: Vec<&OsStr> = Vec::new();
    for component in path.as_ref().components() {
        match component {
            Component::Normal(name) => parts.push(name),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Some(parts.iter().collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("../../../../etc", root.join("usr/escape")).unwrap();
        symlink("/", root.join("usr/slash")).unwrap();
        symlink("chain2", root.join("chain1")).unwrap();
        symlink("./usr/../usr", root.join("chain2")).unwrap();
        symlink("loop", root.join("loop")).unwrap();

        let check = |path: &str, follow: bool, expected: &str| {
            assert_eq!(resolve_in_root(root, path, follow).unwrap(), root.join(expected), "{path}");
        };
        check("/lib/x.so", true, "usr/lib/x.so");
        check("lib", false, "lib");
        check("lib", true, "usr/lib");
        check("../../../etc/passwd", true, "etc/passwd");
        check("usr/escape/passwd", true, "etc/passwd");
        check("usr/slash/../../tmp", true, "tmp");
        check("chain1/lib", true, "usr/lib");
        // As in Linux, `..` after a symlink climbs from the symlink's target, not its parent.
        check("lib/../bin", true, "usr/bin");
        check("/missing/dir/file", true, "missing/dir/file");
        let err = resolve_in_root(root, "loop/x", true).unwrap_err();
        assert!(err.to_string().contains("too many levels"), "{err}");
    }

    #[test]
    fn lexical_cleaning_refuses_to_climb() {
        assert_eq!(clean_lexically("./a/b/../c"), Some(PathBuf::from("a/c")));
        assert_eq!(clean_lexically("/abs/path"), Some(PathBuf::from("abs/path")));
        assert_eq!(clean_lexically("a/../../etc"), None);
        assert_eq!(clean_lexically("../x"), None);
        assert_eq!(clean_lexically("./"), Some(PathBuf::new()));
    }
}
