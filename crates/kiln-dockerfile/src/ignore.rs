//! `.dockerignore` patterns and Go `filepath.Match` globs, matched the way BuildKit does.
//!
//! Two pattern languages live here.
//!
//! * [`PatternList`] implements the exclusion patterns of `.dockerignore` files and of
//!   `COPY --exclude`, following `github.com/moby/patternmatcher` (its `New`,
//!   `MatchesOrParentMatches` and the `ignorefile` reader) and the directory-skipping rule of
//!   the fsutil walker that BuildKit uses to send a build context.
//! * [`glob_match`] implements Go's `filepath.Match` on Unix, which BuildKit uses to expand
//!   wildcards in `COPY`/`ADD` sources one path segment at a time.
//!
//! Moby compiles every pattern into a Go regular expression by rewriting it character by
//! character, with byte-comparison shortcuts for plain, `prefix**` and `**suffix` patterns.
//! This module builds the same expressions for the `regex` crate and keeps those shortcuts and
//! their quirks (`**foo` is a plain suffix test, a bare `^` anchors). The one deliberate
//! difference: character classes and `\` escapes are read by the `filepath.Match` grammar that
//! moby already validates patterns with, so `[*]` is a class holding `*` and `\d` is the
//! letter `d`. Moby hands that raw text to Go's regexp instead, which turns it into a nested
//! class, a digit class or a match-time error.

use std::fmt::Write as _;
use std::iter::Peekable;
use std::str::Chars;

use regex::Regex;

/// The buffer limit of Go's default `bufio.Scanner`: a line this long or longer cannot be read.
///
/// Moby reads ignore files with a default scanner, so such a line makes the whole file fail.
const MAX_IGNORE_LINE: usize = 64 * 1024;

/// The byte-order mark that may open an ignore file or a pattern.
const BOM: char = '\u{FEFF}';

/// Characters that make fsutil give up its prefix shortcut for exception patterns.
const WALKER_PATTERN_CHARS: &[char] = &['*', '[', ']', '?', '^', '\\'];

/// An invalid pattern, or an ignore file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// A pattern that is only `!` once cleaned, so it excepts nothing.
    #[error("illegal exclusion pattern {pattern:?}{}", on_line(*.line))]
    IllegalExclusion {
        /// The pattern as written, with surrounding whitespace removed.
        pattern: String,
        /// The 1-based line of the ignore file it came from, if any.
        line: Option<usize>,
    },
    /// A pattern that breaks the glob syntax (Go's `filepath.ErrBadPattern`).
    #[error("syntax error in pattern {pattern:?}{}", on_line(*.line))]
    BadPattern {
        /// The pattern as written, with surrounding whitespace removed.
        pattern: String,
        /// The 1-based line of the ignore file it came from, if any.
        line: Option<usize>,
    },
    /// A pattern whose compiled matcher would exceed the regex size limit.
    #[error("pattern {pattern:?} is too large to compile{}", on_line(*.line))]
    TooLarge {
        /// The pattern as written, with surrounding whitespace removed.
        pattern: String,
        /// The 1-based line of the ignore file it came from, if any.
        line: Option<usize>,
    },
    /// An ignore-file line of 64 KiB or more, which Go's line scanner refuses.
    #[error("line {line} of the ignore file is too long (the limit is 65535 bytes)")]
    LineTooLong {
        /// The 1-based line number.
        line: usize,
    },
}

/// Formats the optional line number that ends an error message.
fn on_line(line: Option<usize>) -> String {
    line.map(|n| format!(" on line {n}")).unwrap_or_default()
}

/// A compiled list of .dockerignore-style patterns.
#[derive(Debug, Clone, Default)]
pub struct PatternList {
    patterns: Vec<Pattern>,
}

impl PatternList {
    /// Parses the text of a .dockerignore file.
    ///
    /// Lines are read as moby's `ignorefile.ReadAll` reads them (see [`read_ignore_file`]) and
    /// then compiled.
    ///
    /// # Errors
    ///
    /// Fails on a line of 64 KiB or more, a lone `!`, or a malformed pattern; the error names
    /// the pattern and its 1-based line.
    pub fn parse_ignore_file(text: &str) -> Result<Self, PatternError> {
        let mut list = Self::default();
        for (line, raw) in ignore_file_entries(text)? {
            list.push(&raw, Some(line))?;
        }
        Ok(list)
    }

    /// Builds from already-split patterns (as for `COPY --exclude=...`).
    ///
    /// This is moby's `patternmatcher.New`: each pattern is trimmed and cleaned, empty ones are
    /// dropped, and a leading `!` marks an exception. Unlike ignore files, a leading `/` is kept
    /// (and so never matches a relative path), because BuildKit passes `--exclude` values through
    /// untouched.
    ///
    /// # Errors
    ///
    /// Fails on a pattern that is only `!` once cleaned, or that is malformed.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, PatternError> {
        let mut list = Self::default();
        for pattern in patterns {
            list.push(pattern.as_ref(), None)?;
        }
        Ok(list)
    }

    /// The cleaned pattern strings in order, with `!` kept (for hashing / display).
    #[must_use]
    pub fn patterns(&self) -> Vec<String> {
        self.patterns.iter().map(Pattern::display).collect()
    }

    /// True when the list holds no pattern, so nothing is excluded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// True when `path` (relative to the context root, '/'-separated, no leading '/') is excluded,
    /// considering its parent directories as moby's MatchesOrParentMatches does.
    ///
    /// Patterns are applied in order and the last one that matches decides, so an exception
    /// (`!pattern`) re-includes what earlier patterns excluded. A pattern also matches a path
    /// when it matches any of the path's parent directories.
    #[must_use]
    pub fn is_excluded(&self, path: &str) -> bool {
        let parents = parent_dirs(path);
        let mut excluded = false;
        for pattern in &self.patterns {
            // Only a pattern that could flip the current verdict is worth evaluating.
            if pattern.exclusion != excluded {
                continue;
            }
            if pattern.matches(path) || parents.iter().any(|dir| pattern.matches(dir)) {
                excluded = !pattern.exclusion;
            }
        }
        excluded
    }

    /// Decides `path` the way fsutil's walker does, reusing its parent directory's result.
    ///
    /// This is moby's `MatchesUsingParentResults`, which the walker that sends the build
    /// context calls: pass the state returned for the parent directory (or the default state
    /// at the top level, which falls back to checking parent directories as [`Self::is_excluded`]
    /// does) and keep the returned state for the children. It differs from `is_excluded` in one
    /// corner: an exception skipped at the parent because nothing was excluded yet is later
    /// tested against the child's own path only, so `["a/c", "!a"]` excludes `a/c` here but not
    /// in `is_excluded`.
    #[must_use]
    pub fn walk_match(&self, path: &str, parent: &WalkState) -> (bool, WalkState) {
        // A state from another list carries no usable information, so it counts as none.
        let inherited = (parent.0.len() == self.patterns.len()).then_some(&parent.0);
        let parents = if inherited.is_some() { Vec::new() } else { parent_dirs(path) };
        let mut state = vec![false; self.patterns.len()];
        let mut excluded = false;
        for (index, pattern) in self.patterns.iter().enumerate() {
            let mut hit = inherited.is_some_and(|matched| matched[index]);
            if !hit {
                if pattern.exclusion != excluded {
                    continue;
                }
                hit = pattern.matches(path) || parents.iter().any(|dir| pattern.matches(dir));
            }
            state[index] = hit;
            if hit {
                excluded = !pattern.exclusion;
            }
        }
        (excluded, WalkState(state))
    }

    /// For an excluded directory: true when the walker must still descend because some exception
    /// pattern could match a path below it.
    ///
    /// This is fsutil's rule. With no exceptions at all the directory is skipped. When any
    /// exception contains a glob character the walker cannot reason about it and always
    /// descends. Otherwise it descends only when an exception names a path inside `dir`. A
    /// directory visited this way is not itself sent unless something below it is included.
    #[must_use]
    pub fn must_descend(&self, dir: &str) -> bool {
        let exceptions: Vec<&str> =
            self.patterns.iter().filter(|p| p.exclusion).map(|p| without_trailing_glob(&p.cleaned)).collect();
        if exceptions.iter().any(|e| e.contains(WALKER_PATTERN_CHARS)) {
            return true;
        }
        let dir_slash = format!("{dir}/");
        exceptions.iter().any(|e| format!("{e}/").starts_with(&dir_slash))
    }

    /// Compiles one raw pattern and appends it, unless it is blank.
    fn push(&mut self, raw: &str, line: Option<usize>) -> Result<(), PatternError> {
        if let Some(pattern) = Pattern::compile(raw, line)? {
            self.patterns.push(pattern);
        }
        Ok(())
    }
}

/// Which patterns matched a directory, handed down to its children by [`PatternList::walk_match`].
///
/// The default value means "no parent information", as for entries at the top of the walk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalkState(Vec<bool>);

/// Reads the text of a .dockerignore file into raw pattern strings, like moby's
/// `ignorefile.ReadAll`.
///
/// A UTF-8 byte-order mark opening the file is dropped, lines starting with `#` are comments
/// (checked before trimming, so ` #x` is a pattern), blank lines are skipped, and each pattern
/// is trimmed and cleaned with its leading `/` removed, keeping any `!` in front. The strings
/// are not validated; a lone `!` is returned as is and only [`PatternList`] rejects it.
///
/// # Errors
///
/// Fails only on a line of 64 KiB or more, which Go's line scanner refuses.
pub fn read_ignore_file(text: &str) -> Result<Vec<String>, PatternError> {
    Ok(ignore_file_entries(text)?.into_iter().map(|(_, pattern)| pattern).collect())
}

/// Reads an ignore file into `(1-based line, pattern)` pairs.
///
/// Every line is scanned before any pattern is used, because moby fails the whole file on an
/// over-long line before it compiles anything.
fn ignore_file_entries(text: &str) -> Result<Vec<(usize, String)>, PatternError> {
    let mut entries = Vec::new();
    for (index, raw) in scanner_lines(text).enumerate() {
        let line = index + 1;
        if raw.len() >= MAX_IGNORE_LINE {
            return Err(PatternError::LineTooLong { line });
        }
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let raw = if index == 0 { raw.strip_prefix(BOM).unwrap_or(raw) } else { raw };
        if let Some(pattern) = normalize_ignore_line(raw) {
            entries.push((line, pattern));
        }
    }
    Ok(entries)
}

/// Splits text into lines the way `bufio.ScanLines` does: a final newline ends the last line
/// rather than starting an empty one.
fn scanner_lines(text: &str) -> impl Iterator<Item = &str> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let empty = text.is_empty();
    body.split('\n').filter(move |_| !empty)
}

/// Turns one ignore-file line into a pattern, or `None` for comments and blank lines.
fn normalize_ignore_line(line: &str) -> Option<String> {
    if line.starts_with('#') {
        return None;
    }
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return None;
    }
    let (invert, body) = match trimmed.strip_prefix('!') {
        Some(rest) => (true, rest.trim()),
        None => (false, trimmed),
    };
    let mut pattern = String::new();
    if !body.is_empty() {
        pattern = clean_path(body);
        // Absolute patterns are relative to the context root; "/" alone stays as it is.
        if pattern.len() > 1 && pattern.starts_with('/') {
            pattern.remove(0);
        }
    }
    Some(if invert { format!("!{pattern}") } else { pattern })
}

/// One compiled pattern of a [`PatternList`].
#[derive(Debug, Clone)]
struct Pattern {
    /// The cleaned pattern without its `!`.
    cleaned: String,
    /// True for an exception (`!pattern`), which re-includes what it matches.
    exclusion: bool,
    matcher: Matcher,
}

/// How a pattern is tested, chosen as moby chooses it.
///
/// Moby avoids regular expressions for three simple shapes, and those shortcuts compare raw
/// bytes, which gives some patterns (like `**foo`, a plain suffix test) meanings a regular
/// expression would not. They are kept so that every pattern behaves exactly as in BuildKit.
#[derive(Debug, Clone)]
enum Matcher {
    /// The path must equal the cleaned pattern.
    Exact,
    /// The path must start with the cleaned pattern minus its trailing `**`.
    Prefix,
    /// The path must end with the cleaned pattern minus its leading `**`.
    Suffix,
    /// The path must match the regular expression in full.
    Regex(Regex),
}

/// The shape of a translated pattern, before any regular expression is compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exact,
    Prefix,
    Suffix,
    Regex,
}

impl Pattern {
    /// Compiles one raw pattern the way `patternmatcher.New` does; blank ones give `None`.
    fn compile(raw: &str, line: Option<usize>) -> Result<Option<Self>, PatternError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        let pattern = trimmed.to_string();
        // Moby cleans before looking at '!', so "!./x" keeps its "./" and "!a/../b" loses its '!'.
        let cleaned = clean_path(trimmed);
        let (exclusion, body) = match cleaned.strip_prefix('!') {
            Some("") => return Err(PatternError::IllegalExclusion { pattern, line }),
            Some(rest) => (true, rest),
            None => (false, cleaned.as_str()),
        };
        // Moby checks the syntax with filepath.Match before building anything, so do the same.
        if go_match(body.as_bytes(), b".").is_err() {
            return Err(PatternError::BadPattern { pattern, line });
        }
        // The regex can still fail (a reversed range such as "[z-a]"), which moby reports as
        // a bad pattern too, though only once a path is matched.
        let matcher = build_matcher(body).map_err(|err| match err {
            regex::Error::CompiledTooBig(_) => PatternError::TooLarge { pattern, line },
            _ => PatternError::BadPattern { pattern, line },
        })?;
        Ok(Some(Self { cleaned: body.to_string(), exclusion, matcher }))
    }

    /// The pattern as [`PatternList::patterns`] shows it.
    fn display(&self) -> String {
        let bang = if self.exclusion { "!" } else { "" };
        format!("{bang}{}", self.cleaned)
    }

    /// Tests one path (or parent directory) against this pattern alone.
    fn matches(&self, path: &str) -> bool {
        let pattern = self.cleaned.as_bytes();
        let path_bytes = path.as_bytes();
        match &self.matcher {
            Matcher::Exact => path == self.cleaned,
            Matcher::Prefix => {
                let prefix = pattern.get(..pattern.len().saturating_sub(2)).unwrap_or(&[]);
                path_bytes.starts_with(prefix)
            }
            Matcher::Suffix => {
                // Moby slices bytes here, so a pattern opening with a byte-order mark is cut
                // mid-character and then matches almost nothing; bytes reproduce that safely.
                let suffix = pattern.get(2..).unwrap_or(&[]);
                path_bytes.ends_with(suffix)
                    || suffix.split_first().is_some_and(|(first, rest)| *first == b'/' && path_bytes == rest)
            }
            Matcher::Regex(re) => re.is_match(path),
        }
    }
}

/// Chooses and compiles the matcher for a cleaned, validated pattern.
fn build_matcher(pattern: &str) -> Result<Matcher, regex::Error> {
    let Some((kind, source)) = translate(pattern) else {
        return Err(regex::Error::Syntax(format!("bad pattern {pattern:?}")));
    };
    Ok(match kind {
        Kind::Exact => Matcher::Exact,
        Kind::Prefix => Matcher::Prefix,
        Kind::Suffix => Matcher::Suffix,
        Kind::Regex => Matcher::Regex(Regex::new(&source)?),
    })
}

/// Translates a pattern into its match kind and a regular expression, as moby's `compile`
/// does; `None` when a character class is malformed.
///
/// `*` and `?` never match `/`; `**` matches any number of directories, including none; the
/// kind starts as exact and each construct moves it on exactly as moby's state machine does.
fn translate(pattern: &str) -> Option<(Kind, String)> {
    // Go's text/scanner silently skips a byte-order mark at the very start of its input.
    let body = pattern.strip_prefix(BOM).unwrap_or(pattern);
    let mut chars = body.chars().peekable();
    let mut re = String::from("^");
    let mut kind = Kind::Exact;
    let mut first = true;
    while let Some(ch) = chars.next() {
        kind = match ch {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                double_star(&mut chars, &mut re, kind, first)
            }
            '*' => push_regex(&mut re, "[^/]*"),
            '?' => push_regex(&mut re, "[^/]"),
            '\\' => escaped(&mut chars, &mut re, kind),
            '[' => translate_class(&mut chars, &mut re)?,
            ']' => push_regex(&mut re, r"\]"),
            // Moby copies '^' into its regex unescaped, where it anchors at the start of the
            // path, so in a wildcard pattern it matches only when nothing precedes it.
            '^' => {
                re.push('^');
                kind
            }
            other => {
                push_literal(&mut re, other);
                kind
            }
        };
        first = false;
    }
    re.push('$');
    Some((kind, re))
}

/// Appends a regex fragment for a wildcard, which always forces a regex match.
fn push_regex(re: &mut String, fragment: &str) -> Kind {
    re.push_str(fragment);
    Kind::Regex
}

/// Appends one character to match literally.
fn push_literal(re: &mut String, ch: char) {
    re.push_str(&regex::escape(ch.encode_utf8(&mut [0; 4])));
}

/// Handles `**` (already consumed), with the `/` that may follow it.
fn double_star(chars: &mut Peekable<Chars>, re: &mut String, kind: Kind, first: bool) -> Kind {
    if chars.peek() == Some(&'/') {
        chars.next();
    }
    let kind = if chars.peek().is_some() {
        // Any number of whole directories, even none.
        push_regex(re, "(?:.*/)?")
    } else if kind == Kind::Exact {
        // A trailing "**" after plain text is a prefix test, as in .gitignore.
        Kind::Prefix
    } else {
        push_regex(re, ".*")
    };
    // Moby marks any pattern that opens with "**" as a suffix test; a later wildcard still
    // turns it into a regex.
    if first { Kind::Suffix } else { kind }
}

/// Handles a `\` escape: the next character is literal, and a lone trailing `\` is itself.
fn escaped(chars: &mut Peekable<Chars>, re: &mut String, kind: Kind) -> Kind {
    if let Some(ch) = chars.next() {
        push_literal(re, ch);
        Kind::Regex
    } else {
        push_literal(re, '\\');
        kind
    }
}

/// Translates a `[...]` class (the `[` already consumed) by the `filepath.Match` grammar.
///
/// A negated class may match `/`, as it does in both Go's glob and moby's regex.
fn translate_class(chars: &mut Peekable<Chars>, re: &mut String) -> Option<Kind> {
    re.push('[');
    if chars.peek() == Some(&'^') {
        chars.next();
        re.push('^');
    }
    let mut ranges = 0;
    loop {
        if ranges > 0 && chars.peek() == Some(&']') {
            chars.next();
            break;
        }
        let lo = class_char(chars)?;
        let hi = if chars.peek() == Some(&'-') {
            chars.next();
            class_char(chars)?
        } else {
            lo
        };
        // Hex escapes keep every member literal, whatever regex syntax it resembles.
        let (lo, hi) = (u32::from(lo), u32::from(hi));
        // Writing to a String cannot fail.
        let _ = write!(re, "\\x{{{lo:X}}}-\\x{{{hi:X}}}");
        ranges += 1;
    }
    re.push(']');
    Some(Kind::Regex)
}

/// Reads one possibly escaped class member; `-` and `]` cannot appear unescaped.
fn class_char(chars: &mut Peekable<Chars>) -> Option<char> {
    match chars.next()? {
        '-' | ']' => None,
        '\\' => chars.next(),
        ch => Some(ch),
    }
}

/// Strips one trailing `/**` and then one trailing `/*`, as fsutil's
/// `patternWithoutTrailingGlob` does.
fn without_trailing_glob(pattern: &str) -> &str {
    let pattern = pattern.strip_suffix("/**").unwrap_or(pattern);
    pattern.strip_suffix("/*").unwrap_or(pattern)
}

/// The parent directories moby tests for `path`: every prefix of `filepath.Dir(path)` that ends
/// at a separator, plus that directory itself, or nothing when the parent is `.`.
fn parent_dirs(path: &str) -> Vec<String> {
    let Some(slash) = path.rfind('/') else {
        return Vec::new();
    };
    let parent = clean_path(&path[..=slash]);
    if parent == "." {
        return Vec::new();
    }
    let mut dirs: Vec<String> = parent.match_indices('/').map(|(at, _)| parent[..at].to_string()).collect();
    dirs.push(parent);
    dirs
}

/// Lexically cleans a '/'-separated path like Go's `filepath.Clean` on Unix.
///
/// Repeated and trailing slashes go, `.` elements go, `..` removes the element before it (or
/// is dropped at the root of an absolute path), and an empty result becomes `.`.
fn clean_path(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for element in path.split('/') {
        match element {
            "" | "." => {}
            ".." if parts.last().is_some_and(|last| *last != "..") => {
                parts.pop();
            }
            ".." if rooted => {}
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

mod glob;

use glob::go_match;
pub use glob::{glob_match, has_glob};

#[cfg(test)]
mod tests;
