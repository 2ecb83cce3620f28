//! The build context as the front end sees it: a sorted list of entries (after
//! `.dockerignore`) and on-demand content digests, behind the [`ContextFiles`] trait.
//!
//! Selecting the files a COPY reads and hashing them lives here, so the same rules apply
//! to the real directory walker in the CLI and to in-memory contexts in tests.

use std::collections::BTreeMap;

use kiln_types::{Digest, Sha256Writer};

use crate::ignore::{PatternList, glob_match, has_glob};

/// What a context entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link with its target.
    Symlink(String),
}

/// One path of the build context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextEntry {
    /// Path relative to the context root, `/`-separated, no leading `/`.
    pub path: String,
    /// Kind of entry.
    pub kind: EntryKind,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
}

/// Failure to read the context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// Reading a file failed.
    #[error("reading {path} from the build context: {message}")]
    Read {
        /// Context-relative path.
        path: String,
        /// The underlying error.
        message: String,
    },
    /// A source path selects nothing.
    #[error("{0}: not found in the build context")]
    NotFound(String),
    /// A pattern is malformed.
    #[error("{0}")]
    Pattern(String),
}

/// Read access to a build context.
pub trait ContextFiles {
    /// Every entry that survives `.dockerignore`, sorted by path.
    fn entries(&self) -> &[ContextEntry];
    /// The sha256 of a regular file's content.
    fn file_digest(&self, path: &str) -> Result<Digest, ContextError>;
}

/// Cleans a context-relative path: no leading `/`, `.` and `..` resolved inside the root,
/// so a source can never escape the context. The root itself is the empty string.
pub fn clean_relative(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// True when `path` matches a wildcard source segment by segment (Go `filepath.Match` per
/// segment), or lies below a directory that does.
fn matches_wildcard(pattern: &str, path: &str) -> Result<bool, ContextError> {
    let pattern_parts: Vec<&str> = pattern.split('/').collect();
    let path_parts: Vec<&str> = path.split('/').collect();
    if path_parts.len() < pattern_parts.len() {
        return Ok(false);
    }
    for (p, name) in pattern_parts.iter().zip(&path_parts) {
        if !glob_match(p, name).map_err(|e| ContextError::Pattern(e.to_string()))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The entries selected by COPY-style `sources` (context-relative, cleaned, may hold
/// wildcards), minus `exclude` patterns. Errors name the first plain path that selects
/// nothing; a wildcard that matches nothing selects nothing.
pub fn select<'a>(
    context: &'a dyn ContextFiles,
    sources: &[String],
    exclude: &PatternList,
) -> Result<Vec<&'a ContextEntry>, ContextError> {
    let mut chosen: BTreeMap<&str, &ContextEntry> = BTreeMap::new();
    for source in sources {
        let mut any = false;
        for entry in context.entries() {
            let hit =
                if has_glob(source) { matches_wildcard(source, &entry.path)? } else { is_under(&entry.path, source) };
            if hit {
                any = true;
                if !exclude.is_excluded(&entry.path) {
                    chosen.insert(&entry.path, entry);
                }
            }
        }
        // A source through symlinks of the context (itself one, or below one) is followed,
        // as BuildKit's copy does: the links and what they lead to are selected too.
        if !has_glob(source) {
            let (links, target) = follow_links(context, source)?;
            if !links.is_empty() {
                let under: Vec<&ContextEntry> =
                    context.entries().iter().filter(|e| is_under(&e.path, &target)).collect();
                if under.is_empty() && !target.is_empty() {
                    return Err(ContextError::NotFound(source.clone()));
                }
                any = true;
                for entry in links.into_iter().chain(under) {
                    if !exclude.is_excluded(&entry.path) {
                        chosen.insert(&entry.path, entry);
                    }
                }
            }
        }
        // The context root always exists, even when `.dockerignore` leaves it empty; a
        // wildcard may match nothing (BuildKit's AllowEmptyWildcard).
        if !any && !source.is_empty() && !has_glob(source) {
            return Err(ContextError::NotFound(source.clone()));
        }
    }
    Ok(chosen.into_values().collect())
}

/// The entry at exactly `path`.
fn entry_at<'a>(context: &'a dyn ContextFiles, path: &str) -> Option<&'a ContextEntry> {
    let entries = context.entries();
    entries.binary_search_by(|e| e.path.as_str().cmp(path)).ok().map(|i| &entries[i])
}

/// Follows the context's symlinks along `path` (absolute targets from the context root, at
/// most 40 of them, as Linux): the symlink entries passed and the path they lead to.
fn follow_links<'a>(
    context: &'a dyn ContextFiles,
    path: &str,
) -> Result<(Vec<&'a ContextEntry>, String), ContextError> {
    let mut links = Vec::new();
    let mut pending: std::collections::VecDeque<String> = path.split('/').map(str::to_owned).collect();
    let mut resolved: Vec<String> = Vec::new();
    while let Some(part) = pending.pop_front() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => resolved.push(part),
        }
        let Some(entry) = entry_at(context, &resolved.join("/")) else { continue };
        let EntryKind::Symlink(target) = &entry.kind else { continue };
        if links.len() >= 40 {
            return Err(ContextError::NotFound(format!("{path} (too many levels of symbolic links)")));
        }
        links.push(entry);
        resolved.pop();
        if target.starts_with('/') {
            resolved.clear();
        }
        for part in target.split('/').rev() {
            pending.push_front(part.to_owned());
        }
    }
    Ok((links, resolved.join("/")))
}

/// Digest of a selection: every selected path with its kind, mode and content. Paths are
/// context-relative, so the same files selected by two instructions hash the same.
pub fn selection_digest(context: &dyn ContextFiles, entries: &[&ContextEntry]) -> Result<Digest, ContextError> {
    let mut hasher = Sha256Writer::new();
    hasher.field(b"kiln.context.v1");
    for entry in entries {
        hasher.field(entry.path.as_bytes());
        hasher.field(&entry.mode.to_le_bytes());
        match &entry.kind {
            EntryKind::Dir => hasher.field(b"dir"),
            EntryKind::Symlink(target) => {
                hasher.field(b"symlink");
                hasher.field(target.as_bytes());
            }
            EntryKind::File => {
                hasher.field(b"file");
                hasher.field(context.file_digest(&entry.path)?.as_bytes());
            }
        }
    }
    Ok(hasher.finish())
}

/// An in-memory context for tests, fuzzing and `kiln plan` on stdin.
#[derive(Debug, Clone, Default)]
pub struct MemoryContext {
    entries: Vec<ContextEntry>,
    contents: BTreeMap<String, Vec<u8>>,
}

impl MemoryContext {
    /// Builds a context from `(path, content)` files; parent directories are implied.
    /// Files matched by `dockerignore` are left out, as the real walker does.
    pub fn new(files: &[(&str, &str)], dockerignore: &PatternList) -> MemoryContext {
        let mut ctx = MemoryContext::default();
        let mut dirs = std::collections::BTreeSet::new();
        for (path, content) in files {
            let path = clean_relative(path);
            let mut parent = path.as_str();
            while let Some((dir, _)) = parent.rsplit_once('/') {
                dirs.insert(dir.to_owned());
                parent = dir;
            }
            ctx.contents.insert(path, content.as_bytes().to_vec());
        }
        let dir_entries = dirs.into_iter().map(|path| ContextEntry { path, kind: EntryKind::Dir, mode: 0o755 });
        let file_entries =
            ctx.contents.keys().map(|path| ContextEntry { path: path.clone(), kind: EntryKind::File, mode: 0o644 });
        let mut entries: Vec<ContextEntry> =
            dir_entries.chain(file_entries).filter(|e| !dockerignore.is_excluded(&e.path)).collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        ctx.entries = entries;
        ctx
    }
}

impl ContextFiles for MemoryContext {
    fn entries(&self) -> &[ContextEntry] {
        &self.entries
    }

    fn file_digest(&self, path: &str) -> Result<Digest, ContextError> {
        let content = self.contents.get(path).ok_or_else(|| ContextError::NotFound(path.to_owned()))?;
        Ok(Digest::of(content))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(files: &[(&str, &str)], ignore: &str) -> MemoryContext {
        MemoryContext::new(files, &PatternList::parse_ignore_file(ignore).unwrap())
    }

    fn selected(ctx: &MemoryContext, sources: &[&str], exclude: &[&str]) -> Vec<String> {
        let sources: Vec<String> = sources.iter().map(|s| clean_relative(s)).collect();
        let exclude = PatternList::new(exclude).unwrap();
        select(ctx, &sources, &exclude).unwrap().iter().map(|e| e.path.clone()).collect()
    }

    #[test]
    fn cleaning_never_escapes_the_root() {
        assert_eq!(clean_relative("../../etc/passwd"), "etc/passwd");
        assert_eq!(clean_relative("/a/./b/../c/"), "a/c");
        assert_eq!(clean_relative("."), "");
    }

    #[test]
    fn selects_paths_directories_and_wildcards() {
        let c = ctx(&[("a.txt", "1"), ("b.txt", "2"), ("src/main.rs", "3"), ("src/lib.rs", "4")], "");
        assert_eq!(selected(&c, &["a.txt"], &[]), ["a.txt"]);
        assert_eq!(selected(&c, &["src"], &[]), ["src", "src/lib.rs", "src/main.rs"]);
        assert_eq!(selected(&c, &["*.txt"], &[]), ["a.txt", "b.txt"]);
        assert_eq!(selected(&c, &["src/*.rs"], &["src/lib.rs"]), ["src/main.rs"]);
        assert_eq!(selected(&c, &["."], &[]).len(), 5);
    }

    #[test]
    fn missing_sources_are_named() {
        let c = ctx(&[("a.txt", "1")], "");
        let err = select(&c, &["nope".into()], &PatternList::default()).unwrap_err();
        assert_eq!(err.to_string(), "nope: not found in the build context");
        // A wildcard may match nothing, as BuildKit allows (`COPY yarn.lock* ./`).
        let selected = select(&c, &["a.txt".into(), "*.md".into(), "b[x]".into()], &PatternList::default()).unwrap();
        assert_eq!(selected.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(), ["a.txt"]);
    }

    #[test]
    fn digest_depends_only_on_selected_content() {
        let before = ctx(&[("a.txt", "1"), ("b.txt", "2")], "");
        let after = ctx(&[("a.txt", "1"), ("b.txt", "changed")], "");
        let digest = |c: &MemoryContext, src: &str| {
            let sel = select(c, &[src.to_owned()], &PatternList::default()).unwrap();
            selection_digest(c, &sel).unwrap()
        };
        assert_eq!(digest(&before, "a.txt"), digest(&after, "a.txt"));
        assert_ne!(digest(&before, "b.txt"), digest(&after, "b.txt"));
    }

    #[test]
    fn dockerignore_hides_files_from_selection() {
        let c = ctx(&[("a.txt", "1"), ("secret.key", "2"), ("logs/x.log", "3")], "*.key\nlogs\n");
        assert_eq!(selected(&c, &["."], &[]), ["a.txt"]);
    }
}
