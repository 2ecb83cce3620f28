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

/// The value Go's UTF-8 decoder returns for a byte that does not start a valid sequence.
const RUNE_ERROR: u32 = 0xFFFD;

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

/// Go filepath.Match semantics: does `name` match the shell pattern `pattern`.
///
/// `*` matches any run of non-`/` characters, `?` one non-`/` character, `[...]` a class
/// (ranges, `^` negation, `\` escapes; a class may match `/`), and `\` escapes the next
/// character. Errors are reported for malformed patterns even when the name fails to match
/// early, as Go does.
///
/// # Errors
///
/// Fails with [`PatternError::BadPattern`] when the pattern is malformed: an unclosed or empty
/// class, an unescaped `-` or `]` where a class member belongs, or a trailing `\`.
pub fn glob_match(pattern: &str, name: &str) -> Result<bool, PatternError> {
    go_match(pattern.as_bytes(), name.as_bytes())
        .map_err(|BadGlob| PatternError::BadPattern { pattern: pattern.to_string(), line: None })
}

/// True when the string contains glob metacharacters (`*`, `?`, `[`), as BuildKit checks before wildcard expansion.
///
/// As in BuildKit's `containsWildcards`, a character escaped with `\` does not count.
#[must_use]
pub fn has_glob(s: &str) -> bool {
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'\\' => {
                bytes.next();
            }
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
    }
    false
}

/// Marks a malformed glob inside the matcher, before the pattern text is attached.
#[derive(Debug)]
struct BadGlob;

/// Go's `filepath.Match` on bytes.
///
/// Working on bytes rather than characters matters: Go lets a `*` skip single bytes, so a
/// following `?` or class may start inside a multi-byte character, and this reproduces that.
fn go_match(mut pattern: &[u8], mut name: &[u8]) -> Result<bool, BadGlob> {
    while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            // A trailing star matches the rest of the name unless a separator remains.
            return Ok(!name.contains(&b'/'));
        }
        // A chunk's syntax does not depend on the name, so checking it once lets the matching
        // below stop at the first mismatch, where Go parses the whole chunk every time.
        check_chunk(chunk)?;
        let last = pattern.is_empty();
        let found = match_chunk(chunk, name)
            .filter(|tail| !last || tail.is_empty())
            .or_else(|| star.then(|| match_after_star(chunk, name, last)).flatten());
        let Some(tail) = found else {
            validate_rest(pattern)?;
            return Ok(false);
        };
        name = tail;
    }
    Ok(name.is_empty())
}

/// Lets a star skip 1.. bytes of `name` (never a `/`) before `chunk` matches.
///
/// The last chunk must also consume the whole name.
fn match_after_star<'a>(chunk: &[u8], name: &'a [u8], last: bool) -> Option<&'a [u8]> {
    for skip in 1..=name.len() {
        if name[skip - 1] == b'/' {
            break;
        }
        if let Some(tail) = match_chunk(chunk, &name[skip..])
            && (!last || tail.is_empty())
        {
            return Some(tail);
        }
    }
    None
}

/// Checks the syntax of the pattern left after a failed match, so errors are never masked.
fn validate_rest(mut pattern: &[u8]) -> Result<(), BadGlob> {
    while !pattern.is_empty() {
        let (_, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        check_chunk(chunk)?;
    }
    Ok(())
}

/// Splits off the next chunk: leading stars, then text up to the next star outside a class.
fn scan_chunk(pattern: &[u8]) -> (bool, &[u8], &[u8]) {
    let stars = pattern.iter().take_while(|&&b| b == b'*').count();
    let pattern = &pattern[stars..];
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            // Skip the escaped byte; a trailing '\' is reported by check_chunk.
            b'\\' if i + 1 < pattern.len() => i += 1,
            b'[' => in_range = true,
            b']' => in_range = false,
            b'*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (stars > 0, &pattern[..i], &pattern[i..])
}

/// Checks the syntax of a star-free chunk: its classes, and that no `\` ends it.
fn check_chunk(mut chunk: &[u8]) -> Result<(), BadGlob> {
    while let Some((&head, rest)) = chunk.split_first() {
        chunk = match head {
            b'[' => match_class(rest, 0)?.1,
            b'\\' => rest.get(1..).ok_or(BadGlob)?,
            _ => rest,
        };
    }
    Ok(())
}

/// Matches a checked, star-free chunk against the start of `s`, returning what is left of `s`.
fn match_chunk<'a>(mut chunk: &[u8], mut s: &'a [u8]) -> Option<&'a [u8]> {
    while let Some((&head, rest)) = chunk.split_first() {
        if s.is_empty() {
            return None;
        }
        chunk = match head {
            b'[' => {
                let r = take_rune(&mut s);
                let (hit, rest) = match_class(rest, r).ok()?;
                if !hit {
                    return None;
                }
                rest
            }
            b'?' if s.first() == Some(&b'/') => return None,
            b'?' => {
                take_rune(&mut s);
                rest
            }
            b'\\' => {
                let (&lit, rest) = rest.split_first()?;
                s = match_byte(lit, s)?;
                rest
            }
            lit => {
                s = match_byte(lit, s)?;
                rest
            }
        };
    }
    Some(s)
}

/// Consumes one byte of the name if it equals the literal pattern byte.
fn match_byte(lit: u8, s: &[u8]) -> Option<&[u8]> {
    let (&b, rest) = s.split_first()?;
    (b == lit).then_some(rest)
}

/// Parses a class body (after `[`) and tests `r` against it.
///
/// Returns whether the class accepts `r` and the pattern after the closing `]`.
fn match_class(mut chunk: &[u8], r: u32) -> Result<(bool, &[u8]), BadGlob> {
    let negated = chunk.first() == Some(&b'^');
    if negated {
        chunk = &chunk[1..];
    }
    let mut matched = false;
    let mut ranges = 0;
    loop {
        if ranges > 0 && chunk.first() == Some(&b']') {
            return Ok((matched != negated, &chunk[1..]));
        }
        let (lo, rest) = get_esc(chunk)?;
        chunk = rest;
        let mut hi = lo;
        if let Some((b'-', rest)) = chunk.split_first() {
            (hi, chunk) = get_esc(rest)?;
        }
        matched |= lo <= r && r <= hi;
        ranges += 1;
    }
}

/// Reads one possibly escaped class character; something must follow it.
fn get_esc(chunk: &[u8]) -> Result<(u32, &[u8]), BadGlob> {
    let chunk = match chunk.split_first() {
        None | Some((b'-' | b']', _) | (b'\\', [])) => return Err(BadGlob),
        Some((b'\\', rest)) => rest,
        Some(_) => chunk,
    };
    let (r, n) = decode_rune(chunk);
    if r == RUNE_ERROR && n == 1 {
        return Err(BadGlob);
    }
    let rest = &chunk[n..];
    if rest.is_empty() {
        return Err(BadGlob);
    }
    Ok((r, rest))
}

/// Decodes the next character of `s` and advances past it.
fn take_rune(s: &mut &[u8]) -> u32 {
    let (r, n) = decode_rune(s);
    *s = &s[n..];
    r
}

/// Decodes one UTF-8 character like Go's `utf8.DecodeRune`: an invalid or truncated sequence
/// yields U+FFFD with a width of one byte, and empty input a width of zero.
fn decode_rune(s: &[u8]) -> (u32, usize) {
    let Some(&lead) = s.first() else {
        return (RUNE_ERROR, 0);
    };
    let width = match lead {
        0x00..=0x7F => return (u32::from(lead), 1),
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return (RUNE_ERROR, 1),
    };
    s.get(..width)
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .and_then(|text| text.chars().next())
        .map_or((RUNE_ERROR, 1), |ch| (u32::from(ch), width))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles `patterns` with `PatternList::new` and checks the verdict for `path`.
    fn check(patterns: &[&str], path: &str, expected: bool) {
        let list =
            PatternList::new(patterns).unwrap_or_else(|err| panic!("patterns {patterns:?} failed to compile: {err}"));
        assert_eq!(list.is_excluded(path), expected, "patterns={patterns:?} path={path:?}");
    }

    /// Parses `text` as an ignore file and checks the verdict for `path`.
    fn check_file(text: &str, path: &str, expected: bool) {
        let list = PatternList::parse_ignore_file(text)
            .unwrap_or_else(|err| panic!("ignore file {text:?} failed to parse: {err}"));
        assert_eq!(list.is_excluded(path), expected, "file={text:?} path={path:?}");
    }

    /// patternmatcher's TestMatches table (single patterns, MatchesOrParentMatches).
    const MOBY_MATCHES: &[(&str, &str, bool)] = &[
        ("**", "file", true),
        ("**", "file/", true),
        ("**/", "file", true),
        ("**/", "file/", true),
        ("**", "/", true),
        ("**/", "/", true),
        ("**", "dir/file", true),
        ("**/", "dir/file", true),
        ("**", "dir/file/", true),
        ("**/", "dir/file/", true),
        ("**/**", "dir/file", true),
        ("**/**", "dir/file/", true),
        ("dir/**", "dir/file", true),
        ("dir/**", "dir/file/", true),
        ("dir/**", "dir/dir2/file", true),
        ("dir/**", "dir/dir2/file/", true),
        ("**/dir", "dir", true),
        ("**/dir", "dir/file", true),
        ("**/dir2/*", "dir/dir2/file", true),
        ("**/dir2/*", "dir/dir2/file/", true),
        ("**/dir2/**", "dir/dir2/dir3/file", true),
        ("**/dir2/**", "dir/dir2/dir3/file/", true),
        ("**file", "file", true),
        ("**file", "dir/file", true),
        ("**/file", "dir/file", true),
        ("**file", "dir/dir/file", true),
        ("**/file", "dir/dir/file", true),
        ("**/file*", "dir/dir/file", true),
        ("**/file*", "dir/dir/file.txt", true),
        ("**/file*txt", "dir/dir/file.txt", true),
        ("**/file*.txt", "dir/dir/file.txt", true),
        ("**/file*.txt*", "dir/dir/file.txt", true),
        ("**/**/*.txt", "dir/dir/file.txt", true),
        ("**/**/*.txt2", "dir/dir/file.txt", false),
        ("**/*.txt", "file.txt", true),
        ("**/**/*.txt", "file.txt", true),
        ("a**/*.txt", "a/file.txt", true),
        ("a**/*.txt", "a/dir/file.txt", true),
        ("a**/*.txt", "a/dir/dir/file.txt", true),
        ("a/*.txt", "a/dir/file.txt", false),
        ("a/*.txt", "a/file.txt", true),
        ("a/*.txt**", "a/file.txt", true),
        ("a[b-d]e", "ae", false),
        ("a[b-d]e", "ace", true),
        ("a[b-d]e", "aae", false),
        ("a[^b-d]e", "aze", true),
        (".*", ".foo", true),
        (".*", "foo", false),
        ("abc.def", "abcdef", false),
        ("abc.def", "abc.def", true),
        ("abc.def", "abcZdef", false),
        ("abc?def", "abcZdef", true),
        ("abc?def", "abcdef", false),
        ("a\\\\", "a\\", true),
        ("**/foo/bar", "foo/bar", true),
        ("**/foo/bar", "dir/foo/bar", true),
        ("**/foo/bar", "dir/dir2/foo/bar", true),
        ("abc/**", "abc", false),
        ("abc/**", "abc/def", true),
        ("abc/**", "abc/def/ghi", true),
        ("**/.foo", ".foo", true),
        ("**/.foo", "bar.foo", false),
        ("a(b)c/def", "a(b)c/def", true),
        ("a(b)c/def", "a(b)c/xyz", false),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
        (
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            true,
        ),
        ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", true),
        ("a\\*b", "a*b", true),
    ];

    #[test]
    fn moby_matches_table() {
        for &(pattern, path, expected) in MOBY_MATCHES {
            check(&[pattern], path, expected);
        }
    }

    /// patternmatcher's multi-pattern table plus its small single-purpose tests.
    const MOBY_MULTI: &[(&[&str], &str, bool)] = &[
        (&["**", "!util/docker/web"], "util/docker/web/foo", false),
        (&["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", true),
        (
            &["**", "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            false,
        ),
        (&["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", false),
        (&["*"], "fileutils.go", true),
        (&["*.go"], "fileutils.go", true),
        (&["!fileutils.go", "*.go"], "fileutils.go", true),
        (&["docs", "!docs/README.md"], "docs/README.md", false),
        (&["docs/", "!docs/README.md"], "docs/README.md", false),
        (&["docs/*", "!docs/README.md"], "docs/README.md", false),
        (&["*.go", "!fileutils.go"], "fileutils.go", false),
        (&["*.go"], ".", false),
        (&[], "/any/path/there", false),
        (&["docs", "  !docs/README.md"], "docs/README.md", false),
        (&["docs", "!docs/README.md  "], "docs/README.md", false),
    ];

    #[test]
    fn moby_multi_pattern_table() {
        for &(patterns, path, expected) in MOBY_MULTI {
            check(patterns, path, expected);
        }
    }

    /// Exceptions, ordering and the parent-directory rule, including fsutil's open tests.
    const EXCEPTIONS: &[(&[&str], &str, bool)] = &[
        (&["foo", "!foo/bar", "foo/bar/baz", "!foo/bar/baz/x"], "foo/bar/baz/x", false),
        (&["foo", "!foo/bar", "foo/bar/baz", "!foo/bar/baz/x"], "foo/bar/baz/y", true),
        (&["foo", "!foo/bar", "foo/bar/baz", "!foo/bar/baz/x"], "foo/bar/other", false),
        (&["foo", "!foo/bar", "foo/bar/baz", "!foo/bar/baz/x"], "foo/other", true),
        (&["a"], "a/b/c/d", true),
        (&["a/b"], "a/b/c/d", true),
        (&["a/b"], "a/bc/d", false),
        (&["b"], "a/b/c", false),
        (&["*/b"], "a/b/c", true),
        (&["a", "!a/b"], "a/b/c", false),
        (&["a", "!a/b", "a"], "a/b/c", true),
        (&["!a", "a"], "a", true),
        (&["a", "!a"], "a", false),
        (&["bar"], "foo", false),
        (&["bar"], "bar", true),
        // The Docker documentation's examples.
        (&["*/temp*"], "somedir/temporary.txt", true),
        (&["*/temp*"], "somedir/temp", true),
        (&["*/temp*"], "temp", false),
        (&["*/temp*"], "a/b/temp", false),
        (&["*/*/temp*"], "somedir/subdir/temporary.txt", true),
        (&["temp?"], "temp1", true),
        (&["temp?"], "temp", false),
        (&["temp?"], "temp12", false),
        (&["**/*.go"], "a/b/c.go", true),
        (&["**/*.go"], "c.go", true),
        (&["*.md", "!README.md"], "README.md", false),
        (&["*.md", "!README.md"], "CHANGES.md", true),
        (&["*.md", "!README*.md", "README-secret.md"], "README-secret.md", true),
        (&["*.md", "!README*.md", "README-secret.md"], "README-public.md", false),
    ];

    #[test]
    fn exception_and_parent_table() {
        for &(patterns, path, expected) in EXCEPTIONS {
            check(patterns, path, expected);
        }
    }

    /// Behaviour that follows from moby's match shortcuts and regex construction.
    const MOBY_QUIRKS: &[(&str, &str, bool)] = &[
        // A leading "**" without a slash is a plain byte-suffix test.
        ("**b", "ab", true),
        ("**b", "x/ab", true),
        ("**b", "b/c", true),
        // A "**" in the middle spans whole directories only.
        ("a**b", "ab", true),
        ("a**b", "ax/b", true),
        ("a**b", "axb", false),
        // A trailing "**" after plain text is a byte-prefix test.
        ("foo**", "foobar/baz", true),
        ("foo**", "fo", false),
        ("foo/**", "foo", false),
        // A class can match '/', unlike '*' and '?'.
        ("a[^b]c", "a/c", true),
        ("a[/]c", "a/c", true),
        ("a?c", "a/c", false),
        // Escapes are literal; an escaped letter is the letter itself.
        ("\\d", "d", true),
        ("\\d", "1", false),
        ("a\\[b", "a[b", true),
        ("[*]", "*", true),
        ("[*]", "x", false),
        ("[\\]]", "]", true),
        ("a]b", "a]b", true),
        ("a^b", "a^b", true),
        ("*a^b", "xa^b", false),
        ("*^", "", true),
        ("^*", "x", true),
        ("^*", "^x", true),
        ("[!a]", "!", true),
        ("[!a]", "b", false),
        // Go's "." never matches a newline, so "**" does not span one, while '*' does.
        ("a/**/b", "a/x\ny/b", false),
        ("a/*/b", "a/x\ny/b", true),
        // Patterns and paths with multi-byte characters.
        ("*.résumé", "mon.résumé", true),
        ("d?ta", "dåta", true),
        ("[α-ω]*", "λx", true),
        ("[^α-ω]*", "λx", false),
        ("**/☺", "a/☺", true),
        // Cleaning: "./", "..", trailing and doubled slashes.
        ("./foo", "foo", true),
        ("foo/../bar", "bar", true),
        ("foo/../bar", "foo", false),
        ("a//b/", "a/b", true),
        ("../foo", "foo", false),
        // A leading '/' survives in `new`, so it never matches a relative path.
        ("/foo", "foo", false),
        // Go's text scanner skips a byte-order mark that opens a pattern.
        ("\u{FEFF}*.go", "x.go", true),
    ];

    #[test]
    fn moby_quirks_table() {
        for &(pattern, path, expected) in MOBY_QUIRKS {
            check(&[pattern], path, expected);
        }
    }

    /// patternmatcher's TestMatch table (its copy of Go's, with the parent rule applied).
    const MOBY_GLOB: &[(&str, &str, Option<bool>)] = &[
        ("abc", "abc", Some(true)),
        ("*", "abc", Some(true)),
        ("*c", "abc", Some(true)),
        ("a*", "a", Some(true)),
        ("a*", "abc", Some(true)),
        ("a*", "ab/c", Some(true)),
        ("a*/b", "abc/b", Some(true)),
        ("a*/b", "a/c/b", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
        ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)),
        ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
        ("ab[c]", "abc", Some(true)),
        ("ab[b-d]", "abc", Some(true)),
        ("ab[e-g]", "abc", Some(false)),
        ("ab[^c]", "abc", Some(false)),
        ("ab[^b-d]", "abc", Some(false)),
        ("ab[^e-g]", "abc", Some(true)),
        ("a\\*b", "a*b", Some(true)),
        ("a\\*b", "ab", Some(false)),
        ("a?b", "a☺b", Some(true)),
        ("a[^a]b", "a☺b", Some(true)),
        ("a???b", "a☺b", Some(false)),
        ("a[^a][^a][^a]b", "a☺b", Some(false)),
        ("[a-ζ]*", "α", Some(true)),
        ("*[a-ζ]", "A", Some(false)),
        ("a?b", "a/b", Some(false)),
        ("a*b", "a/b", Some(false)),
        ("[\\]a]", "]", Some(true)),
        ("[\\-]", "-", Some(true)),
        ("[x\\-]", "x", Some(true)),
        ("[x\\-]", "-", Some(true)),
        ("[x\\-]", "z", Some(false)),
        ("[\\-x]", "x", Some(true)),
        ("[\\-x]", "-", Some(true)),
        ("[\\-x]", "a", Some(false)),
        ("[]a]", "]", None),
        ("[-]", "-", None),
        ("[x-]", "x", None),
        ("[x-]", "-", None),
        ("[x-]", "z", None),
        ("[-x]", "x", None),
        ("[-x]", "-", None),
        ("[-x]", "a", None),
        ("\\", "a", None),
        ("[a-b-c]", "a", None),
        ("[", "a", None),
        ("[^", "a", None),
        ("[^bc", "a", None),
        ("a[", "a", None),
        ("a[", "ab", None),
        ("*x", "xxx", Some(true)),
    ];

    #[test]
    fn moby_glob_table() {
        for &(pattern, path, expected) in MOBY_GLOB {
            match expected {
                Some(expected) => check(&[pattern], path, expected),
                None => assert!(
                    matches!(PatternList::new(&[pattern]), Err(PatternError::BadPattern { .. })),
                    "pattern {pattern:?} should be rejected"
                ),
            }
        }
    }

    /// Go's `filepath.Match` table from `match_test.go`; `None` means `ErrBadPattern`.
    const GO_MATCH: &[(&str, &str, Option<bool>)] = &[
        ("abc", "abc", Some(true)),
        ("*", "abc", Some(true)),
        ("*c", "abc", Some(true)),
        ("a*", "a", Some(true)),
        ("a*", "abc", Some(true)),
        ("a*", "ab/c", Some(false)),
        ("a*/b", "abc/b", Some(true)),
        ("a*/b", "a/c/b", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxe/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Some(true)),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Some(false)),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Some(false)),
        ("a*b?c*x", "abxbbxdbxebxczzx", Some(true)),
        ("a*b?c*x", "abxbbxdbxebxczzy", Some(false)),
        ("ab[c]", "abc", Some(true)),
        ("ab[b-d]", "abc", Some(true)),
        ("ab[e-g]", "abc", Some(false)),
        ("ab[^c]", "abc", Some(false)),
        ("ab[^b-d]", "abc", Some(false)),
        ("ab[^e-g]", "abc", Some(true)),
        ("a\\*b", "a*b", Some(true)),
        ("a\\*b", "ab", Some(false)),
        ("a?b", "a☺b", Some(true)),
        ("a[^a]b", "a☺b", Some(true)),
        ("a???b", "a☺b", Some(false)),
        ("a[^a][^a][^a]b", "a☺b", Some(false)),
        ("[a-ζ]*", "α", Some(true)),
        ("*[a-ζ]", "A", Some(false)),
        ("a?b", "a/b", Some(false)),
        ("a*b", "a/b", Some(false)),
        ("[\\]a]", "]", Some(true)),
        ("[\\-]", "-", Some(true)),
        ("[x\\-]", "x", Some(true)),
        ("[x\\-]", "-", Some(true)),
        ("[x\\-]", "z", Some(false)),
        ("[\\-x]", "x", Some(true)),
        ("[\\-x]", "-", Some(true)),
        ("[\\-x]", "a", Some(false)),
        ("[]a]", "]", None),
        ("[-]", "-", None),
        ("[x-]", "x", None),
        ("[x-]", "-", None),
        ("[x-]", "z", None),
        ("[-x]", "x", None),
        ("[-x]", "-", None),
        ("[-x]", "a", None),
        ("\\", "a", None),
        ("[a-b-c]", "a", None),
        ("[", "a", None),
        ("[^", "a", None),
        ("[^bc", "a", None),
        ("a[", "a", None),
        ("a[", "ab", None),
        ("a[", "x", None),
        ("a/b[", "x", None),
        ("*x", "xxx", Some(true)),
    ];

    /// Further `filepath.Match` cases: separators, empty inputs, and byte-level star skipping.
    const GO_MATCH_EXTRA: &[(&str, &str, Option<bool>)] = &[
        ("", "", Some(true)),
        ("", "a", Some(false)),
        ("*", "", Some(true)),
        ("*", "a/b", Some(false)),
        ("*/*", "a/b", Some(true)),
        ("a/*", "a/", Some(true)),
        ("[/]", "/", Some(true)),
        ("[^a]", "/", Some(true)),
        ("?", "", Some(false)),
        ("[z-a]", "m", Some(false)),
        ("[z-a]", "z", Some(false)),
        ("*.txt", "notes.txt", Some(true)),
        ("*.txt", ".txt", Some(true)),
        ("*.txt", "dir/notes.txt", Some(false)),
        ("\\[x]", "[x]", Some(true)),
        ("a*b[", "ab", None),
        ("x[", "y", None),
        ("*[", "abc", None),
        ("a\\", "a", None),
        // Go lets '*' skip single bytes, so a class can then swallow the tail of a character.
        ("*[^a][^a]", "€", Some(true)),
        ("[^a][^a]", "€", Some(false)),
        ("*?", "é", Some(true)),
    ];

    #[test]
    fn go_match_table() {
        for &(pattern, name, expected) in GO_MATCH.iter().chain(GO_MATCH_EXTRA) {
            let got = glob_match(pattern, name);
            match expected {
                Some(expected) => assert_eq!(got, Ok(expected), "{pattern:?} vs {name:?}"),
                None => {
                    assert!(matches!(got, Err(PatternError::BadPattern { .. })), "{pattern:?} vs {name:?} gave {got:?}")
                }
            }
        }
    }

    /// patternmatcher's TestCompile kinds, plus a few more shapes.
    const KINDS: &[(&str, Kind)] = &[
        ("*", Kind::Regex),
        ("file*", Kind::Regex),
        ("*file", Kind::Regex),
        ("a*/b", Kind::Regex),
        ("**", Kind::Suffix),
        ("**/**", Kind::Regex),
        ("dir/**", Kind::Prefix),
        ("**/dir", Kind::Suffix),
        ("**/dir2/*", Kind::Regex),
        ("**/dir2/**", Kind::Regex),
        ("**file", Kind::Suffix),
        ("**/file*txt", Kind::Regex),
        ("**/**/*.txt", Kind::Regex),
        ("a[b-d]e", Kind::Regex),
        (".*", Kind::Regex),
        ("abc.def", Kind::Exact),
        ("abc?def", Kind::Regex),
        ("**/foo/bar", Kind::Suffix),
        ("a(b)c/def", Kind::Exact),
        ("a.|)$(}+{bc", Kind::Exact),
        ("dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", Kind::Exact),
        ("foo**", Kind::Prefix),
        ("a\\.b", Kind::Regex),
        ("a]b", Kind::Regex),
        ("a**b", Kind::Regex),
    ];

    #[test]
    fn compile_kinds() {
        for &(pattern, kind) in KINDS {
            let got = translate(pattern).map(|(kind, _)| kind);
            assert_eq!(got, Some(kind), "pattern {pattern:?}");
        }
    }

    #[test]
    fn pattern_list_cleaning() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["docs", "config"], &["docs", "config"]),
            (&["docs", "config", ""], &["docs", "config"]),
            (&["  ", "\t"], &[]),
            (&["docs/", "./a/./b/", "a//b/../c"], &["docs", "a/b", "a/c"]),
            (&[" !docs/README.md "], &["!docs/README.md"]),
            (&["/abs", "!./x", "!a/../b"], &["/abs", "!./x", "b"]),
            (&["!!x"], &["!!x"]),
        ];
        for &(input, expected) in cases {
            let list = PatternList::new(input).expect("valid patterns");
            assert_eq!(list.patterns(), expected, "input {input:?}");
            assert_eq!(list.is_empty(), expected.is_empty());
        }
        assert!(PatternList::default().is_empty());
    }

    #[test]
    fn read_ignore_file_like_moby() {
        // ignorefile's TestReadAll.
        let content = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
        let expected = ["test1", "test2", "a/file/here", "lastfile", "!inverted/abs/path", "!", "!"];
        assert_eq!(read_ignore_file(content), Ok(expected.map(String::from).to_vec()));
        assert_eq!(read_ignore_file(""), Ok(vec![]));
        let cases: &[(&str, &[&str])] = &[
            ("\u{FEFF}#comment\nfoo", &["foo"]),
            ("\u{FEFF}foo\r\nbar\r\n", &["foo", "bar"]),
            ("foo\n\u{FEFF}bar", &["foo", "\u{FEFF}bar"]),
            ("  # not a comment\n#comment", &["# not a comment"]),
            ("/\n//a//\n/./b/../c", &["/", "a", "c"]),
            ("!  /x/\n!!y\n..\n../a", &["!x", "!!y", "..", "../a"]),
            ("a\n\n\n", &["a"]),
        ];
        for &(text, expected) in cases {
            assert_eq!(read_ignore_file(text), Ok(expected.iter().map(ToString::to_string).collect()), "{text:?}");
        }
    }

    #[test]
    fn ignore_file_matching() {
        check_file("/foo", "foo", true);
        check_file("foo\n!./foo", "foo", false);
        check_file("*\n!src\nsrc/*.tmp", "src/main.rs", false);
        check_file("*\n!src\nsrc/*.tmp", "src/x.tmp", true);
        check_file("*\n!src\nsrc/*.tmp", "README", true);
        check_file("# only a comment\n\n", "anything", false);
        check_file("foo\n\u{FEFF}bar", "bar", false);
        check_file("  node_modules  \r\n", "node_modules/x/y.js", true);
    }

    #[test]
    fn errors_name_pattern_and_line() {
        let err = PatternList::new(&["!"]).unwrap_err();
        assert_eq!(err.to_string(), "illegal exclusion pattern \"!\"");
        let err = PatternList::new(&["ok", "!/"]).unwrap_err();
        assert_eq!(err, PatternError::IllegalExclusion { pattern: "!/".into(), line: None });
        let err = PatternList::parse_ignore_file("a\n\n# c\n!\n").unwrap_err();
        assert_eq!(err.to_string(), "illegal exclusion pattern \"!\" on line 4");
        let err = PatternList::parse_ignore_file("a\n[\n").unwrap_err();
        assert_eq!(err.to_string(), "syntax error in pattern \"[\" on line 2");
        let err = glob_match("a[", "a").unwrap_err();
        assert_eq!(err.to_string(), "syntax error in pattern \"a[\"");
        // Valid glob, but moby's regex rejects the reversed range "l-O" (moby issue 52203).
        let err = PatternList::new(&["[Local-Only]/"]).unwrap_err();
        assert!(matches!(err, PatternError::BadPattern { .. }), "{err:?}");
        assert!(PatternList::new(&["[z-a]"]).is_err());
    }

    #[test]
    fn oversized_patterns_fail_cleanly() {
        let huge = "?".repeat(60_000);
        let err = PatternList::new(&[huge.as_str()]).unwrap_err();
        assert!(matches!(err, PatternError::TooLarge { line: None, .. }), "{err:?}");
        // The glob matcher has no size limit and must stay fast on long inputs.
        let deep = format!("**/{}", "x/".repeat(20_000));
        assert_eq!(glob_match(&deep, &"a".repeat(60_000)), Ok(false));
    }

    #[test]
    fn long_lines_fail_like_bufio() {
        let fits = "a".repeat(MAX_IGNORE_LINE - 1);
        assert!(PatternList::parse_ignore_file(&fits).is_ok());
        let long = format!("[\n{}", "a".repeat(MAX_IGNORE_LINE));
        // The over-long line wins over the bad pattern before it, as the file is read first.
        assert_eq!(PatternList::parse_ignore_file(&long).unwrap_err(), PatternError::LineTooLong { line: 2 });
        let with_cr = format!("{}\r\n", "a".repeat(MAX_IGNORE_LINE - 1));
        assert!(read_ignore_file(&with_cr).is_err());
    }

    /// fsutil's directory-skipping rule: `(patterns, excluded dir, must descend)`.
    const DESCEND: &[(&[&str], &str, bool)] = &[
        (&["foo"], "foo", false),
        (&["foo*", "!foo/bar2"], "foo", true),
        (&["foo", "!foo/bar"], "foo", true),
        (&["foo", "!bar"], "foo", false),
        (&["foo", "!foobar"], "foo", false),
        (&["foo", "!foo/bar/baz"], "foo", true),
        (&["foo", "!foo/bar/*"], "foo", true),
        (&["foo", "!foo/bar/*"], "foo/bar", true),
        (&["foo", "!foo/bar/**"], "foo/bar", true),
        (&["foo", "!foo/bar/**"], "foo/baz", false),
        (&["foo", "!foo/*/**"], "foo", true),
        (&["foo", "!foo/*/**"], "foo/x", false),
        (&["**/bar", "!foo/bar/baz"], "foo/bar", true),
        (&["**/bar", "!foo/bar/baz"], "x/bar", false),
        // Any wildcard in any exception makes the walker descend everywhere.
        (&["foo", "!foo/*.txt"], "foo", true),
        (&["foo", "!other/*.txt"], "foo", true),
        (&["foo", "!other/[ab]"], "foo", true),
        (&["foo", "!other/a\\b"], "foo", true),
        (&["foo", "!other/a^b"], "foo", true),
        (&["foo", "!x/**/y"], "foo", true),
    ];

    #[test]
    fn must_descend_table() {
        for &(patterns, dir, expected) in DESCEND {
            let list = PatternList::new(patterns).expect("valid patterns");
            assert!(list.is_excluded(dir), "{dir:?} should be excluded by {patterns:?}");
            assert_eq!(list.must_descend(dir), expected, "patterns={patterns:?} dir={dir:?}");
        }
    }

    /// A directory the test walker is inside.
    struct OpenDir {
        path: String,
        /// Whether the directory itself has been reported.
        reported: bool,
        /// Whether nothing below it is visited.
        skipped: bool,
        state: WalkState,
    }

    /// Walks entries given in walk order (`"dir x"` / `"file x"`) the way fsutil's filter does:
    /// excluded directories are skipped unless `must_descend`, and a directory is reported only
    /// once it or something below it is included.
    fn walk(entries: &[&str], patterns: &[&str]) -> Vec<String> {
        let list = PatternList::new(patterns).expect("valid patterns");
        let mut stack: Vec<OpenDir> = Vec::new();
        let mut out = Vec::new();
        for entry in entries {
            let (kind, path) = entry.split_once(' ').expect("kind and path");
            stack.retain(|open| path.starts_with(&format!("{}/", open.path)));
            if stack.iter().any(|open| open.skipped) {
                continue;
            }
            let parent = stack.last().map(|open| open.state.clone()).unwrap_or_default();
            let (excluded, state) = list.walk_match(path, &parent);
            assert_eq!(excluded, list.is_excluded(path), "{patterns:?} {path:?}");
            if !excluded {
                for open in stack.iter_mut().filter(|open| !open.reported) {
                    out.push(format!("dir {}", open.path));
                    open.reported = true;
                }
                out.push(entry.to_string());
            }
            if kind == "dir" {
                let skipped = excluded && !list.must_descend(path);
                let path = path.to_string();
                let reported = !excluded;
                stack.push(OpenDir { path, reported, skipped, state });
            }
        }
        out
    }

    #[test]
    fn walker_follows_fsutil() {
        let tree = ["file bar", "dir foo", "file foo/bar2", "file foo2"];
        assert_eq!(walk(&tree, &["foo*", "!foo/bar2"]), ["file bar", "dir foo", "file foo/bar2"]);
        let nested = ["dir foo", "file foo/bar"];
        assert_eq!(walk(&nested, &["foo", "!foo/bar"]), ["dir foo", "file foo/bar"]);
        assert!(walk(&nested, &["foo"]).is_empty());
        let deep = ["dir foo", "dir foo/bar", "file foo/bar/baz", "file foo/x"];
        assert_eq!(walk(&deep, &["**/bar"]), ["dir foo", "file foo/x"]);
        assert_eq!(
            walk(&deep, &["**/bar", "!foo/bar/baz"]),
            ["dir foo", "dir foo/bar", "file foo/bar/baz", "file foo/x"]
        );
        assert_eq!(walk(&deep, &["*", "!**/baz"]), ["dir foo", "dir foo/bar", "file foo/bar/baz"]);
    }

    #[test]
    fn walk_match_keeps_fsutil_corner() {
        let list = PatternList::new(&["a/c", "!a"]).expect("valid patterns");
        let (dir_excluded, dir_state) = list.walk_match("a", &WalkState::default());
        assert!(!dir_excluded);
        assert!(list.walk_match("a/c", &dir_state).0);
        assert!(!list.is_excluded("a/c"));
        // Without parent information it falls back to the parent-directory rule.
        assert!(!list.walk_match("a/c", &WalkState::default()).0);
        // Inherited matches apply without re-testing the child.
        let list = PatternList::new(&["a", "!a/b"]).expect("valid patterns");
        let (excluded, state) = list.walk_match("a", &WalkState::default());
        assert!(excluded);
        let (excluded, state) = list.walk_match("a/b", &state);
        assert!(!excluded);
        assert!(!list.walk_match("a/b/c", &state).0);
    }

    #[test]
    fn has_glob_table() {
        let cases = [
            ("", false),
            ("plain/path.txt", false),
            ("*.txt", true),
            ("file?.txt", true),
            ("dir/[ab]", true),
            ("a]b", false),
            ("\\*.txt", false),
            ("\\\\*.txt", true),
            ("a\\", false),
            ("é*", true),
        ];
        for (input, expected) in cases {
            assert_eq!(has_glob(input), expected, "{input:?}");
        }
    }

    #[test]
    fn clean_path_like_go() {
        let cases = [
            ("", "."),
            ("abc", "abc"),
            ("a/b/c", "a/b/c"),
            (".", "."),
            ("..", ".."),
            ("../..", "../.."),
            ("../../abc", "../../abc"),
            ("/abc", "/abc"),
            ("/", "/"),
            ("abc/", "abc"),
            ("./", "."),
            ("../", ".."),
            ("/abc/", "/abc"),
            ("abc//def//ghi", "abc/def/ghi"),
            ("//abc", "/abc"),
            ("///abc", "/abc"),
            ("//abc//", "/abc"),
            ("abc/./def", "abc/def"),
            ("/./abc/def", "/abc/def"),
            ("abc/.", "abc"),
            ("abc/def/ghi/../jkl", "abc/def/jkl"),
            ("abc/def/../ghi/../jkl", "abc/jkl"),
            ("abc/def/..", "abc"),
            ("abc/def/../..", "."),
            ("/abc/def/../..", "/"),
            ("abc/def/../../..", ".."),
            ("/abc/def/../../..", "/"),
            ("abc/def/../../../ghi/jkl/../../../mno", "../../mno"),
            ("/../abc", "/abc"),
            ("abc/./../def", "def"),
            ("abc//./../def", "def"),
            ("abc/../../././../def", "../../def"),
        ];
        for (input, expected) in cases {
            assert_eq!(clean_path(input), expected, "{input:?}");
        }
    }

    /// A small deterministic generator, so the garbled-input tests need no dependencies.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) as usize) % n
        }

        fn string(&mut self, alphabet: &[char], max_len: usize) -> String {
            let len = self.below(max_len + 1);
            (0..len).map(|_| alphabet[self.below(alphabet.len())]).collect()
        }
    }

    const GARBLE: &[char] = &[
        'a', 'b', '/', '*', '?', '[', ']', '^', '!', '-', '\\', '.', ' ', '#', 'é', '☺', '\u{FEFF}', '\n', '\r', '{',
        '(', '$', '|', '+',
    ];

    #[test]
    fn garbled_input_never_panics() {
        let mut rng = Lcg(0x5eed);
        for _ in 0..3000 {
            let patterns: Vec<String> = (0..=rng.below(4)).map(|_| rng.string(GARBLE, 12)).collect();
            let file = patterns.join("\n");
            let _ = read_ignore_file(&file);
            for list in [PatternList::new(&patterns), PatternList::parse_ignore_file(&file)].into_iter().flatten() {
                let _ = list.patterns();
                for _ in 0..4 {
                    let path = rng.string(GARBLE, 10);
                    let fresh = list.walk_match(&path, &WalkState::default()).0;
                    assert_eq!(fresh, list.is_excluded(&path), "{patterns:?} {path:?}");
                    let _ = list.must_descend(&path);
                }
            }
            let _ = glob_match(&rng.string(GARBLE, 10), &rng.string(GARBLE, 10));
            let _ = has_glob(&rng.string(GARBLE, 10));
        }
    }

    /// True when a '^' may act as moby's regex anchor rather than a class negation.
    fn has_anchor_caret(pattern: &str) -> bool {
        pattern.contains("\\[") || pattern.match_indices('^').any(|(at, _)| !pattern[..at].ends_with('['))
    }

    /// Without `**`, '/', a leading '!' or a bare '^', a single pattern must agree with `filepath.Match`
    /// on single-segment names, which cross-checks the regex translation against the glob.
    #[test]
    fn regex_translation_agrees_with_glob() {
        let pattern_chars = ['a', 'b', '-', '.', '*', '?', '[', ']', '^', '\\', 'é', '!'];
        let name_chars = ['a', 'b', '-', '.', '*', '?', '[', ']', '^', '\\', '!', '\n'];
        let mut rng = Lcg(42);
        let mut compared = 0;
        for _ in 0..4000 {
            let pattern = rng.string(&pattern_chars, 8);
            let skip = pattern.contains("**") || pattern.starts_with('!') || pattern.is_empty();
            if skip || has_anchor_caret(&pattern) {
                continue;
            }
            let list = PatternList::new(&[pattern.as_str()]);
            for _ in 0..4 {
                let name = rng.string(&name_chars, 6);
                match (glob_match(&pattern, &name), &list) {
                    (Ok(want), Ok(list)) => {
                        assert_eq!(list.is_excluded(&name), want, "{pattern:?} vs {name:?}");
                        compared += 1;
                    }
                    (Err(_), Ok(_)) => panic!("{pattern:?} accepted but glob rejects it"),
                    _ => {}
                }
            }
        }
        assert!(compared > 1000, "only {compared} comparisons ran");
    }
}
