//! File vertices: COPY, mkfile, mkdir and rm applied to an overlay of the base chain, with
//! every path resolved inside its own root.
//!
//! Errors here are messages naming the path: `Worker::execute` wraps them with the vertex
//! (name and Dockerfile line) into `WorkerError::Failed`, the typed error callers see.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_dockerfile::ignore::{PatternList, glob_match, has_glob};
use kiln_graph::{Chown, CopyAction, FileAction, FileOp, Input};
use kiln_layer::{ActiveSnapshot, SnapshotStore, extract_archive_as, is_archive, resolve_in_root};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use crate::chmod::Chmod;
use crate::user::resolve_owner;
use crate::{Snapshot, Worker, blocking, chain};

impl Worker {
    pub(crate) async fn file(&self, op: &FileOp, inputs: &[Snapshot]) -> Result<Snapshot, String> {
        let base = chain(&op.base, inputs)?.to_vec();
        let snapshots = Arc::clone(&self.snapshots);
        let (actions, inputs) = (op.actions.clone(), inputs.to_vec());
        blocking(move || {
            let active = snapshots.prepare(&base).map_err(|e| e.to_string())?;
            let mut sources = Sources { snapshots: &snapshots, inputs: &inputs, views: HashMap::new() };
            for action in &actions {
                apply(action, &active.root(), &mut sources)?;
            }
            drop(sources);
            let layer = snapshots.commit(active).map_err(|e| e.to_string())?;
            let mut layers = base;
            layers.extend(layer);
            Ok(Snapshot { layers })
        })
        .await
    }
}

/// Read-only views of the inputs copies read from, mounted once per file op.
struct Sources<'a> {
    snapshots: &'a SnapshotStore,
    inputs: &'a [Snapshot],
    views: HashMap<usize, ActiveSnapshot>,
}

impl Sources<'_> {
    fn root(&mut self, input: &Input) -> Result<PathBuf, String> {
        let index = match input {
            Input::Scratch => return Ok(PathBuf::from("/nonexistent-scratch")),
            Input::Index(i) => *i,
        };
        if !self.views.contains_key(&index) {
            let layers = chain(input, self.inputs)?;
            let view = self.snapshots.view(layers).map_err(|e| e.to_string())?;
            self.views.insert(index, view);
        }
        Ok(self.views[&index].root())
    }
}

fn apply(action: &FileAction, root: &Path, sources: &mut Sources<'_>) -> Result<(), String> {
    match action {
        FileAction::Copy(copy) => {
            let source_root = sources.root(&copy.from)?;
            copy_action(copy, &source_root, root)
        }
        FileAction::Mkfile { path, mode, data, chown } => {
            let owner = owner(root, chown.as_ref())?;
            let target = resolve_in_root(root, path, false).map_err(|e| format!("{path}: {e}"))?;
            remove_non_dir(&target)?;
            fs::write(&target, data).map_err(|e| format!("{path}: {e}"))?;
            set_meta(&target, Some(*mode), owner.or(Some((0, 0))))
        }
        FileAction::Mkdir { path, mode, parents, chown } => {
            let owner = owner(root, chown.as_ref())?;
            let target = resolve_in_root(root, path, true).map_err(|e| format!("{path}: {e}"))?;
            if target.is_dir() {
                return Ok(());
            }
            mkdir(root, &target, *parents, *mode, owner).map_err(|e| format!("mkdir {path}: {e}"))
        }
        FileAction::Rm { path, allow_not_found } => {
            let target = resolve_in_root(root, path, false).map_err(|e| format!("{path}: {e}"))?;
            match fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&target).map_err(|e| format!("rm {path}: {e}")),
                Ok(_) => fs::remove_file(&target).map_err(|e| format!("rm {path}: {e}")),
                Err(_) if *allow_not_found => Ok(()),
                Err(_) => Err(format!("rm {path}: not found")),
            }
        }
    }
}

fn owner(root: &Path, chown: Option<&Chown>) -> Result<Option<(u32, u32)>, String> {
    chown.map(|c| resolve_owner(root, &c.user, c.group.as_deref()).map_err(|e| format!("--chown: {e}"))).transpose()
}

/// Creates `target` (and, with `parents`, missing directories above it) with `mode`.
fn mkdir(root: &Path, target: &Path, parents: bool, mode: u32, owner: Option<(u32, u32)>) -> Result<(), String> {
    let mut missing = Vec::new();
    let mut current = target.to_path_buf();
    while !current.exists() && current.starts_with(root) && current != root {
        missing.push(current.clone());
        if !current.pop() {
            break;
        }
    }
    if missing.len() > 1 && !parents {
        return Err("parent directory does not exist".into());
    }
    for dir in missing.iter().rev() {
        fs::create_dir(dir).map_err(|e| e.to_string())?;
        set_meta(dir, Some(mode), owner)?;
    }
    Ok(())
}

/// Source paths after wildcard expansion, as (path relative to the source root, host path).
/// Names are kept as the filesystem has them (bytes that need not be UTF-8).
fn expand_sources(copy: &CopyAction, source_root: &Path) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let mut expanded = Vec::new();
    for source in &copy.sources {
        let clean = source.trim_start_matches('/').trim_end_matches('/');
        if has_glob(clean) {
            // A wildcard may match nothing, as in BuildKit (`COPY yarn.lock* ./`).
            glob_walk(source_root, Path::new(""), clean.split('/').collect::<Vec<_>>().as_slice(), &mut expanded)?;
        } else {
            let host = resolve_in_root(source_root, clean, true).map_err(|e| format!("{source}: {e}"))?;
            if fs::symlink_metadata(&host).is_err() {
                return Err(format!("{source}: not found"));
            }
            expanded.push((PathBuf::from(clean), host));
        }
    }
    Ok(expanded)
}

/// Matches names lossily, as Go matches them, and keeps the real names.
fn glob_walk(root: &Path, prefix: &Path, segments: &[&str], out: &mut Vec<(PathBuf, PathBuf)>) -> Result<(), String> {
    let Some((first, rest)) = segments.split_first() else { return Ok(()) };
    let dir = resolve_in_root(root, prefix, true).map_err(|e| e.to_string())?;
    let Ok(entries) = fs::read_dir(&dir) else { return Ok(()) };
    let mut names: Vec<std::ffi::OsString> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        if !glob_match(first, &name.to_string_lossy()).map_err(|e| format!("{first}: {e}"))? {
            continue;
        }
        let rel = prefix.join(&name);
        if rest.is_empty() {
            let host = resolve_in_root(root, &rel, true).map_err(|e| e.to_string())?;
            out.push((rel, host));
        } else {
            glob_walk(root, &rel, rest, out)?;
        }
    }
    Ok(())
}

struct CopyOptions {
    /// The destination root: every target resolves inside it.
    root: PathBuf,
    owner: Option<(u32, u32)>,
    mode: Option<Chmod>,
    exclude: PatternList,
    /// Files with several links copied so far, by (device, inode): later links to one of
    /// them become hard links to its copy, as BuildKit keeps them.
    links: HashMap<(u64, u64), PathBuf>,
}

impl CopyOptions {
    /// The mode of a directory the copy creates (the destination and its missing parents):
    /// 0755, or what `--chmod` makes of it (BuildKit 0.21 and later).
    fn created_dir_mode(&self) -> u32 {
        self.mode.as_ref().map_or(0o755, |chmod| chmod.apply(0o755, true))
    }
}

fn copy_action(copy: &CopyAction, source_root: &Path, dest_root: &Path) -> Result<(), String> {
    let mut options = CopyOptions {
        root: dest_root.to_path_buf(),
        owner: owner(dest_root, copy.chown.as_ref())?,
        mode: copy.chmod.as_deref().map(Chmod::parse).transpose()?,
        exclude: PatternList::new(&copy.exclude).map_err(|e| format!("--exclude: {e}"))?,
        links: HashMap::new(),
    };
    let sources = expand_sources(copy, source_root)?;
    let dest_text = &copy.dest;
    let dest = resolve_in_root(dest_root, dest_text, true).map_err(|e| format!("{dest_text}: {e}"))?;
    // Each source is copied to the destination in turn, as BuildKit copies them: into it
    // when it ends with `/` or is a directory by then, else onto it (several files onto one
    // path that is not a directory leave the last one).
    for (rel, host) in sources {
        let into_dir = dest_text.ends_with('/') || dest.is_dir();
        let meta = fs::metadata(&host).map_err(|e| format!("{}: {e}", rel.display()))?;
        if copy.unpack && meta.is_file() && is_archive(&host) {
            // ADD of a local archive extracts it into the destination directory.
            let file = fs::File::open(&host).map_err(|e| format!("{}: {e}", rel.display()))?;
            extract_archive_as(file, dest_root, &dest, options.owner)
                .map_err(|e| format!("ADD {}: {e}", rel.display()))?;
            continue;
        }
        let target = if copy.parents {
            dest.join(&rel)
        } else if meta.is_dir() {
            dest.clone()
        } else if into_dir {
            dest.join(Path::new(&rel).file_name().unwrap_or_default())
        } else {
            dest.clone()
        };
        // Symlinks already in the destination (`--parents` paths, `dest/name`) resolve inside
        // its root; the last component is replaced, never written through.
        let target = within(dest_root, &target, false)?;
        if let Some(parent) = target.parent()
            && !parent.exists()
        {
            let mode = options.created_dir_mode();
            mkdir(dest_root, parent, true, mode, options.owner).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        if meta.is_dir() {
            copy_tree(&host, &target, "", &mut options)?;
        } else {
            copy_entry(&host, &target, &mut options)?;
        }
    }
    Ok(())
}

/// Copies a directory's contents into an existing directory, keeping owners, modes and times
/// (seeding a cache mount from `from=`).
pub(crate) fn copy_contents(source: &Path, target: &Path) -> Result<(), String> {
    let mut options = CopyOptions {
        root: target.to_path_buf(),
        owner: None,
        mode: None,
        exclude: PatternList::default(),
        links: HashMap::new(),
    };
    copy_tree(source, target, "", &mut options)
}

/// Copies a directory's contents (not the directory itself, as COPY does) into `target`.
/// `rel` is empty for the copy's destination, which is created 0755 (or `--chmod`'s mode)
/// and owned by `--chown` or root; directories below it keep their source's mode and owner
/// (`--chmod`/`--chown` applied), as BuildKit copies them. Existing directories keep theirs.
fn copy_tree(source: &Path, target: &Path, rel: &str, options: &mut CopyOptions) -> Result<(), String> {
    // A symlink where a directory goes is followed inside the destination root, as BuildKit
    // does, never to the host.
    let target = &within(&options.root, target, true)?;
    if !target.is_dir() {
        remove_non_dir(target)?;
        fs::create_dir(target).map_err(|e| format!("{}: {e}", target.display()))?;
        let (mode, owner) = if rel.is_empty() {
            (options.created_dir_mode(), options.owner.unwrap_or((0, 0)))
        } else {
            let meta = fs::metadata(source).map_err(|e| format!("{}: {e}", source.display()))?;
            let mode = options.mode.as_ref().map_or(meta.mode() & 0o7777, |chmod| chmod.apply(meta.mode(), true));
            (mode, options.owner.unwrap_or((meta.uid(), meta.gid())))
        };
        set_meta(target, Some(mode), Some(owner))?;
    }
    let mut entries: Vec<_> =
        fs::read_dir(source).map_err(|e| format!("{}: {e}", source.display()))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let child_rel = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        if !options.exclude.is_empty() && options.exclude.is_excluded(&child_rel) {
            continue;
        }
        let (from, to) = (source.join(&name), target.join(&name));
        let meta = fs::symlink_metadata(&from).map_err(|e| format!("{}: {e}", from.display()))?;
        if meta.is_dir() {
            copy_tree(&from, &to, &child_rel, options)?;
            copy_times(&from, &to)?;
        } else {
            copy_entry(&from, &to, options)?;
        }
    }
    copy_times(source, target)
}

/// Copies one non-directory entry, never writing through an existing symlink. A file linked
/// from several places becomes one file with several links again.
fn copy_entry(from: &Path, to: &Path, options: &mut CopyOptions) -> Result<(), String> {
    let meta = fs::symlink_metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let inode = (meta.dev(), meta.ino());
    if meta.nlink() > 1
        && !meta.is_dir()
        && let Some(first) = options.links.get(&inode)
    {
        // Two links copied onto one path: the file is already there.
        if first == to {
            return Ok(());
        }
        remove_non_dir(to)?;
        return fs::hard_link(first, to).map_err(|e| format!("{}: {e}", to.display()));
    }
    remove_non_dir(to)?;
    if meta.nlink() > 1 && !meta.is_dir() {
        options.links.insert(inode, to.to_path_buf());
    }
    if meta.file_type().is_symlink() {
        let link = fs::read_link(from).map_err(|e| format!("{}: {e}", from.display()))?;
        std::os::unix::fs::symlink(link, to).map_err(|e| format!("{}: {e}", to.display()))?;
        let owner = options.owner.unwrap_or((meta.uid(), meta.gid()));
        std::os::unix::fs::lchown(to, Some(owner.0), Some(owner.1)).map_err(|e| format!("{}: {e}", to.display()))?;
    } else {
        fs::copy(from, to).map_err(|e| format!("{}: {e}", from.display()))?;
        let mode = options.mode.as_ref().map_or(meta.mode() & 0o7777, |chmod| chmod.apply(meta.mode(), false));
        set_meta(to, Some(mode), Some(options.owner.unwrap_or((meta.uid(), meta.gid()))))?;
    }
    copy_times(from, to)
}

/// `path` (somewhere under `root`) re-resolved inside `root`.
fn within(root: &Path, path: &Path, follow_last: bool) -> Result<PathBuf, String> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    resolve_in_root(root, rel, follow_last).map_err(|e| format!("{}: {e}", rel.display()))
}

fn remove_non_dir(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.is_dir() => fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display())),
        _ => Ok(()),
    }
}

fn set_meta(path: &Path, mode: Option<u32>, owner: Option<(u32, u32)>) -> Result<(), String> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn copy_times(from: &Path, to: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let time = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(None, to, &time, &time, UtimensatFlags::NoFollowSymlink).map_err(|e| format!("{}: {e}", to.display()))
}
