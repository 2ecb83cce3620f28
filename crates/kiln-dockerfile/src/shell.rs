//! Dockerfile shell lexer: quote handling, escapes and variable expansion, matching BuildKit.
//!
//! This follows the rules of BuildKit's `frontend/dockerfile/shell` package, including its
//! quirks, so that a Dockerfile expands to the same words under Kiln as under BuildKit.
//! Input is processed as a sequence of `char`s, so multi-byte UTF-8 is never split.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

/// Looks up variables during expansion.
pub trait Env {
    /// Returns the value of `name`, or `None` when the variable is unset.
    fn get(&self, name: &str) -> Option<String>;
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

/// A list of `(name, value)` pairs, in which the last occurrence of a name wins, as in a
/// process environment built up by successive `ENV` instructions.
impl Env for [(String, String)] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.clone())
    }
}

/// Same as the slice implementation; it exists because a slice cannot become `&dyn Env`.
impl Env for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<String> {
        Env::get(self.as_slice(), name)
    }
}

/// Any lookup function, for callers whose variables live elsewhere.
impl<F: Fn(&str) -> Option<String>> Env for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Why a word could not be expanded. Every variant names the input word it came from,
/// except [`ShellError::Required`], whose message is the one the Dockerfile author wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// A `'` has no closing partner.
    #[error("unterminated single quote in {word}")]
    UnterminatedSingleQuote {
        /// The whole input word.
        word: String,
    },
    /// A `"` has no closing partner.
    #[error("unterminated double quote in {word}")]
    UnterminatedDoubleQuote {
        /// The whole input word.
        word: String,
    },
    /// A `${` has no closing `}`.
    #[error("missing '}}' in {word}")]
    MissingBrace {
        /// The whole input word.
        word: String,
    },
    /// A `${name/pattern` has no `/` ending the pattern.
    #[error("missing '/' after the pattern in {word}")]
    MissingSlash {
        /// The whole input word.
        word: String,
    },
    /// A `${` is followed by `{`, `}` or `:` instead of a variable name.
    #[error("bad substitution in {word}")]
    BadSubstitution {
        /// The whole input word.
        word: String,
    },
    /// A `${name...}` uses an operator that is not supported, such as `:=` or `:#`.
    #[error("unsupported modifier ({modifier}) in {word}")]
    UnsupportedModifier {
        /// The operator as written, for example `:=`.
        modifier: String,
        /// The whole input word.
        word: String,
    },
    /// `${name?message}` or `${name:?message}` found the variable unset (or empty).
    #[error("{name}: {message}")]
    Required {
        /// The variable that had to be set.
        name: String,
        /// The author's message, or a default saying what was wrong.
        message: String,
    },
    /// `${...}` substitutions are nested more than [`MAX_NESTING`] levels deep.
    #[error("substitutions nested more than {limit} levels deep in {word}")]
    NestingTooDeep {
        /// The nesting limit that was exceeded.
        limit: usize,
        /// The whole input word.
        word: String,
    },
    /// The pattern of a `#`, `%` or `/` operator is malformed.
    #[error("invalid pattern ({pattern}) in {word}: {reason}")]
    InvalidPattern {
        /// The pattern after quote removal and expansion.
        pattern: String,
        /// What is wrong with the pattern.
        reason: String,
        /// The whole input word.
        word: String,
    },
}

/// How deeply `${...}` substitutions may nest. Each level recurses, so the limit keeps
/// hostile input from overflowing the stack; real Dockerfiles nest a handful of levels.
pub const MAX_NESTING: usize = 200;

/// BuildKit's Dockerfile shell lexer. It is cheap to clone and holds no per-word state.
#[derive(Debug, Clone)]
pub struct Lexer {
    escape: char,
    raw_quotes: bool,
    raw_escapes: bool,
    skip_unset_env: bool,
    skip_process_quotes: bool,
}

impl Default for Lexer {
    /// A lexer using the default escape character, the backslash.
    fn default() -> Self {
        Self::new('\\')
    }
}

impl Lexer {
    /// Creates a lexer whose escape character is `escape` (`\` or `` ` ``).
    #[must_use]
    pub fn new(escape: char) -> Self {
        Self { escape, raw_quotes: false, raw_escapes: false, skip_unset_env: false, skip_process_quotes: false }
    }

    /// Keeps quote characters in the output (BuildKit's `RawQuotes`).
    #[must_use]
    pub fn raw_quotes(mut self, on: bool) -> Self {
        self.raw_quotes = on;
        self
    }

    /// Keeps escape characters in the output (BuildKit's `RawEscapes`).
    #[must_use]
    pub fn raw_escapes(mut self, on: bool) -> Self {
        self.raw_escapes = on;
        self
    }

    /// Leaves references to unset variables as written (BuildKit's `SkipUnsetEnv`).
    #[must_use]
    pub fn skip_unset_env(mut self, on: bool) -> Self {
        self.skip_unset_env = on;
        self
    }

    /// Treats quote characters as ordinary characters (BuildKit's `SkipProcessQuotes`),
    /// as BuildKit does when expanding heredoc bodies.
    #[must_use]
    pub fn skip_process_quotes(mut self, on: bool) -> Self {
        self.skip_process_quotes = on;
        self
    }

    /// Expands one word as ENV/ARG/COPY etc. values are expanded (BuildKit `ProcessWord`).
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        Ok(self.run(word, env)?.result)
    }

    /// Like [`Lexer::process_word`], but also returns the names of variables that were
    /// referenced but unset (BuildKit `ProcessWordWithMatches`' "unmatched" set), sorted.
    pub fn process_word_with_unmatched(&self, word: &str, env: &dyn Env) -> Result<(String, Vec<String>), ShellError> {
        let outcome = self.run(word, env)?;
        Ok((outcome.result, outcome.unmatched.into_iter().collect()))
    }

    /// Splits into words after expansion (BuildKit `ProcessWords`), as for EXPOSE/VOLUME/USER
    /// arguments. Unquoted whitespace, including whitespace from unquoted variable values,
    /// separates words; quoted whitespace does not.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        Ok(self.run(word, env)?.words)
    }

    fn run(&self, word: &str, env: &dyn Env) -> Result<Outcome, ShellError> {
        let mut scan = Scan::new(self, env, word);
        let (result, words) = scan.until(None, self.raw_escapes)?;
        Ok(Outcome { result, words, unmatched: scan.unmatched })
    }
}

/// Everything one pass over a word produces.
struct Outcome {
    result: String,
    words: Vec<String>,
    unmatched: BTreeSet<String>,
}

/// The state of one pass over one input word.
struct Scan<'a> {
    lexer: &'a Lexer,
    env: &'a dyn Env,
    source: &'a str,
    chars: Vec<char>,
    pos: usize,
    /// The word being built for word splitting. BuildKit shares this one buffer between
    /// the outer scan and the nested scans of `${name:-word}`-style operators, and each
    /// nested scan clears it; so a partial word right before such an operator is dropped
    /// from the split words. Kiln keeps that quirk so EXPOSE and heredoc detection split
    /// exactly as BuildKit does. The unsplit result is not affected.
    word_buf: String,
    unmatched: BTreeSet<String>,
    /// How many `${` are open at the current position.
    depth: usize,
}

impl<'a> Scan<'a> {
    fn new(lexer: &'a Lexer, env: &'a dyn Env, source: &'a str) -> Self {
        // BuildKit reads words through Go's text/scanner, which drops a leading byte order mark.
        let chars = source.strip_prefix('\u{feff}').unwrap_or(source).chars().collect();
        Scan { lexer, env, source, chars, pos: 0, word_buf: String::new(), unmatched: BTreeSet::new(), depth: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let ch = self.peek();
        if ch.is_some() {
            self.pos += 1;
        }
        ch
    }

    fn word(&self) -> String {
        self.source.to_string()
    }

    /// Scans until `stop` (consumed) or, when `stop` is `None`, the end of input. Returns the
    /// expanded text and its split words. `raw_escapes` says whether escape characters are
    /// kept; operators override it for their nested words, as BuildKit does.
    fn until(&mut self, stop: Option<char>, raw_escapes: bool) -> Result<(String, Vec<String>), ShellError> {
        let mut result = String::new();
        let mut words = Vec::new();
        self.word_buf.clear();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.pos += 1;
                return Ok((result, self.finish_words(words)));
            }
            let quotes = !self.lexer.skip_process_quotes;
            let (text, split) = match ch {
                '$' => (self.dollar()?, true),
                '<' => (self.possible_heredoc(), false),
                '\'' if quotes => (self.single_quote()?, false),
                '"' if quotes => (self.double_quote(raw_escapes)?, false),
                _ => {
                    if !self.plain_char(raw_escapes, &mut result, &mut words) {
                        break;
                    }
                    continue;
                }
            };
            result.push_str(&text);
            self.add_text(&mut words, &text, split);
        }
        match stop {
            Some('/') => Err(ShellError::MissingSlash { word: self.word() }),
            Some(_) => Err(ShellError::MissingBrace { word: self.word() }),
            None => Ok((result, self.finish_words(words))),
        }
    }

    /// Consumes one ordinary character, or an escape and the character it protects.
    /// Returns false when an escape character ends the input, which ends the scan.
    fn plain_char(&mut self, raw_escapes: bool, result: &mut String, words: &mut Vec<String>) -> bool {
        let Some(ch) = self.next() else {
            return false;
        };
        if ch != self.lexer.escape {
            result.push(ch);
            self.add_char(words, ch);
            return true;
        }
        if raw_escapes {
            result.push(ch);
            self.word_buf.push(ch);
        }
        let Some(escaped) = self.next() else {
            return false;
        };
        result.push(escaped);
        self.word_buf.push(escaped);
        true
    }

    /// Adds expanded text to the split words; only `$` expansions are split on whitespace,
    /// quoted text and heredoc markers are kept whole.
    fn add_text(&mut self, words: &mut Vec<String>, text: &str, split: bool) {
        if split {
            text.chars().for_each(|ch| self.add_char(words, ch));
        } else {
            self.word_buf.push_str(text);
        }
    }

    fn add_char(&mut self, words: &mut Vec<String>, ch: char) {
        if !ch.is_whitespace() {
            self.word_buf.push(ch);
        } else if !self.word_buf.is_empty() {
            words.push(std::mem::take(&mut self.word_buf));
        }
    }

    fn finish_words(&mut self, mut words: Vec<String>) -> Vec<String> {
        if !self.word_buf.is_empty() {
            words.push(std::mem::take(&mut self.word_buf));
        }
        words
    }

    /// Everything up to the next `'` is literal; there is no way to escape a `'` inside.
    fn single_quote(&mut self) -> Result<String, ShellError> {
        let mut result = String::new();
        self.next();
        if self.lexer.raw_quotes {
            result.push('\'');
        }
        loop {
            match self.next() {
                None => return Err(ShellError::UnterminatedSingleQuote { word: self.word() }),
                Some('\'') => break,
                Some(ch) => result.push(ch),
            }
        }
        if self.lexer.raw_quotes {
            result.push('\'');
        }
        Ok(result)
    }

    /// Inside `"`, variables expand and the escape character protects only `"`, `$` and
    /// itself; before any other character it stays literal.
    fn double_quote(&mut self, raw_escapes: bool) -> Result<String, ShellError> {
        let mut result = String::new();
        self.next();
        if self.lexer.raw_quotes {
            result.push('"');
        }
        loop {
            match self.peek() {
                None => return Err(ShellError::UnterminatedDoubleQuote { word: self.word() }),
                Some('"') => break,
                Some('$') => result.push_str(&self.dollar()?),
                Some(_) => self.double_quoted_char(raw_escapes, &mut result),
            }
        }
        self.next();
        if self.lexer.raw_quotes {
            result.push('"');
        }
        Ok(result)
    }

    fn double_quoted_char(&mut self, raw_escapes: bool, result: &mut String) {
        let Some(mut ch) = self.next() else {
            return;
        };
        if ch == self.lexer.escape {
            if raw_escapes {
                result.push(ch);
            }
            match self.peek() {
                // An escape right before the end is dropped; the missing `"` is reported next.
                None => return,
                Some(next) if next == '"' || next == '$' || next == self.lexer.escape => {
                    ch = next;
                    self.pos += 1;
                }
                // BuildKit writes the escape again here, so with raw escapes it appears twice.
                Some(_) => {}
            }
        }
        result.push(ch);
    }

    /// `<<` followed by blanks is kept together so heredoc markers survive word splitting.
    fn possible_heredoc(&mut self) -> String {
        self.next();
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.next();
        let mut result = "<<".to_string();
        while let Some(ch @ (' ' | '\t' | '\r')) = self.peek() {
            result.push(ch);
            self.pos += 1;
        }
        result
    }

    /// Expands `$name` or `${...}`; the scanner is on the `$`.
    fn dollar(&mut self) -> Result<String, ShellError> {
        self.next();
        if self.peek() != Some('{') {
            return Ok(self.bare_variable());
        }
        self.next();
        if self.depth >= MAX_NESTING {
            return Err(ShellError::NestingTooDeep { limit: MAX_NESTING, word: self.word() });
        }
        self.depth += 1;
        let expanded = self.braced();
        self.depth -= 1;
        expanded
    }

    /// Expands `${...}`; the scanner is just past the `{`.
    fn braced(&mut self) -> Result<String, ShellError> {
        match self.peek() {
            None => return Err(ShellError::MissingBrace { word: self.word() }),
            Some('{' | '}' | ':') => return Err(ShellError::BadSubstitution { word: self.word() }),
            Some(_) => {}
        }
        let name = self.name();
        match self.next() {
            None => Err(ShellError::MissingBrace { word: self.word() }),
            Some('}') => Ok(self.plain_variable(&name, || format!("${{{name}}}"))),
            Some(':') => match self.next() {
                Some(op) => self.operator(&name, true, op),
                None => Err(ShellError::MissingBrace { word: self.word() }),
            },
            Some(op @ ('+' | '-' | '?' | '#' | '%')) => self.operator(&name, false, op),
            Some('/') => self.replace(&name),
            Some(op) => Err(self.unsupported(op.to_string())),
        }
    }

    /// `$name`: a `$` not followed by a name (such as `$.` or a final `$`) stays literal.
    fn bare_variable(&mut self) -> String {
        let name = self.name();
        if name.is_empty() {
            return "$".to_string();
        }
        self.plain_variable(&name, || format!("${name}"))
    }

    /// The value of `name`; an unset variable is empty, or written back as `as_written`
    /// when unset references are to be kept.
    fn plain_variable(&mut self, name: &str, as_written: impl FnOnce() -> String) -> String {
        match self.lookup(name) {
            Some(value) => value,
            None if self.lexer.skip_unset_env => as_written(),
            None => String::new(),
        }
    }

    /// Reads a variable name: a run of digits (positional), one special parameter character,
    /// or letters, digits and underscores.
    fn name(&mut self) -> String {
        match self.peek() {
            Some(ch) if is_digit(ch) => self.take_while(is_digit),
            Some(ch) if is_special_param(ch) => {
                self.pos += 1;
                ch.to_string()
            }
            _ => self.take_while(|ch| is_letter(ch) || is_digit(ch) || ch == '_'),
        }
    }

    fn take_while(&mut self, accept: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        while self.peek().is_some_and(&accept) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    fn lookup(&mut self, name: &str) -> Option<String> {
        let value = self.env.get(name);
        if value.is_none() {
            self.unmatched.insert(name.to_string());
        }
        value
    }

    fn unsupported(&self, modifier: String) -> ShellError {
        ShellError::UnsupportedModifier { modifier, word: self.word() }
    }

    /// Replaces an error from a nested scan that ran into the end of input with `missing`,
    /// since the real problem is then the unclosed `${`.
    fn or_missing(&self, err: ShellError, missing: ShellError) -> ShellError {
        if self.peek().is_none() { missing } else { err }
    }

    /// Handles `${name<op>word}`, where `op` is `-`, `+`, `?`, `#`, `##`, `%` or `%%`,
    /// optionally preceded by `:` (`null_is_unset`). The word is always expanded, even when
    /// its value is not used, so its errors and unset variables are always reported.
    fn operator(&mut self, name: &str, null_is_unset: bool, op: char) -> Result<String, ShellError> {
        let colon = if null_is_unset { ":" } else { "" };
        let written_op = format!("{colon}{op}");
        // Patterns keep their escapes so that `\*` can still mean a literal star.
        let is_trim = op == '#' || op == '%';
        if null_is_unset && is_trim {
            return Err(self.unsupported(written_op));
        }
        let (word, _) = self
            .until(Some('}'), is_trim)
            .map_err(|err| self.or_missing(err, ShellError::MissingBrace { word: self.word() }))?;
        let value = self.lookup(name);
        if value.is_none() && self.lexer.skip_unset_env {
            return Ok(format!("${{{name}{written_op}{word}}}"));
        }
        let empty = value.as_deref().is_none_or(|v| null_is_unset && v.is_empty());
        match op {
            '-' if empty => Ok(word),
            '-' => Ok(value.unwrap_or_default()),
            '+' if empty => Ok(String::new()),
            '+' => Ok(word),
            '?' => required(name, value, empty, word),
            '#' | '%' => self.trim(op, &value.unwrap_or_default(), &word),
            _ => Err(self.unsupported(written_op)),
        }
    }

    /// `#` trims a matching prefix and `%` a matching suffix; doubling the operator makes the
    /// pattern's stars match as much as possible instead of as little.
    fn trim(&self, op: char, value: &str, word: &str) -> Result<String, ShellError> {
        let (greedy, pattern) = match word.strip_prefix(op) {
            Some(rest) => (true, rest),
            None => (false, word),
        };
        let text: Vec<char> = value.chars().collect();
        if op == '#' {
            let glob = self.glob(pattern, pattern, greedy)?;
            let end = glob.find(&text, 0, true).map_or(0, |(_, end)| end);
            return Ok(text[end..].iter().collect());
        }
        // Leftmost matching cannot find the shortest match that ends at the end of the text,
        // so both the pattern and the text are reversed to make it a search at the start.
        let glob = self.glob(&reverse_pattern(pattern), pattern, greedy)?;
        let reversed: Vec<char> = text.into_iter().rev().collect();
        let end = glob.find(&reversed, 0, true).map_or(0, |(_, end)| end);
        Ok(reversed[end..].iter().rev().collect())
    }

    /// Compiles `pattern`; errors name `written`, the pattern as the author wrote it.
    fn glob(&self, pattern: &str, written: &str, greedy: bool) -> Result<Glob, ShellError> {
        Glob::parse(pattern, greedy).map_err(|reason| ShellError::InvalidPattern {
            pattern: written.to_string(),
            reason,
            word: self.word(),
        })
    }

    /// Handles `${name/pattern/replacement}` and, with `//`, replacing every match.
    fn replace(&mut self, name: &str) -> Result<String, ShellError> {
        let all = self.peek() == Some('/');
        if all {
            self.next();
        }
        let (pattern, _) = self
            .until(Some('/'), true)
            .map_err(|err| self.or_missing(err, ShellError::MissingSlash { word: self.word() }))?;
        let (replacement, _) = self
            .until(Some('}'), true)
            .map_err(|err| self.or_missing(err, ShellError::MissingBrace { word: self.word() }))?;
        let value = self.lookup(name);
        if value.is_none() && self.lexer.skip_unset_env {
            // BuildKit writes a `//` operator back with a single slash; kept for fidelity.
            return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
        }
        let glob = self.glob(&pattern, &pattern, true)?;
        let text: Vec<char> = value.unwrap_or_default().chars().collect();
        if all {
            return Ok(replace_all(&glob, &text, &replacement));
        }
        let Some((start, end)) = glob.find(&text, 0, false) else {
            return Ok(text.iter().collect());
        };
        let mut out: String = text[..start].iter().collect();
        out.push_str(&replacement);
        out.extend(&text[end..]);
        Ok(out)
    }
}

/// Result of `${name?message}` and `${name:?message}`.
fn required(name: &str, value: Option<String>, empty: bool, message: String) -> Result<String, ShellError> {
    let default = match &value {
        None => "is not allowed to be unset",
        Some(_) if empty => "is not allowed to be empty",
        Some(v) => return Ok(v.clone()),
    };
    let message = if message.is_empty() { default.to_string() } else { message };
    Err(ShellError::Required { name: name.to_string(), message })
}

/// Replaces every match the way Go's `Regexp.ReplaceAllString` does: an empty match right
/// after a previous match is skipped, and `$0` in the replacement stands for the match.
fn replace_all(glob: &Glob, text: &[char], replacement: &str) -> String {
    let mut out = String::new();
    let (mut last_end, mut search) = (0, 0);
    while search <= text.len() {
        let Some((start, end)) = glob.find(text, search, false) else {
            break;
        };
        out.extend(&text[last_end..start]);
        if end > last_end || start == 0 {
            let matched: String = text[start..end].iter().collect();
            out.push_str(&expand_template(replacement, &matched));
        }
        last_end = end;
        // Always move on by at least one character, so an empty match cannot repeat forever.
        search = if search + 1 > end { search + 1 } else { end };
    }
    out.extend(&text[last_end..]);
    out
}

/// Expands a Go regexp replacement template. The glob has no capture groups, so `$0` and
/// `${0}` give the whole match, `$$` gives `$`, any other group reference gives nothing, and
/// a `$` that starts no reference stays literal.
fn expand_template(template: &str, matched: &str) -> String {
    let chars: Vec<char> = template.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while let Some(&ch) = chars.get(i) {
        i += 1;
        if ch != '$' {
            out.push(ch);
        } else if chars.get(i) == Some(&'$') {
            out.push('$');
            i += 1;
        } else if let Some((name, len)) = group_reference(&chars[i..]) {
            if name == "0" {
                out.push_str(matched);
            }
            i += len;
        } else {
            out.push('$');
        }
    }
    out
}

/// Parses `name` or `{name}` at the start of `rest`, returning the name and its length.
fn group_reference(rest: &[char]) -> Option<(String, usize)> {
    let braced = rest.first() == Some(&'{');
    let start = usize::from(braced);
    let len = rest[start..].iter().take_while(|&&c| is_letter(c) || is_digit(c) || c == '_').count();
    if len == 0 || (braced && rest.get(start + len) != Some(&'}')) {
        return None;
    }
    let name = rest[start..start + len].iter().collect();
    Some((name, start + len + usize::from(braced)))
}

/// Reverses a glob pattern, keeping each backslash in front of the character it escapes.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut units: Vec<&[char]> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let len = if chars[i] == '\\' && i + 1 < chars.len() { 2 } else { 1 };
        units.push(&chars[i..i + len]);
        i += len;
    }
    units.iter().rev().flat_map(|unit| unit.iter()).collect()
}

/// Go's `unicode.IsLetter`. Exact for Latin-1; beyond it, approximated by the Alphabetic
/// property, which also admits a few combining marks and letter-like numerals.
fn is_letter(ch: char) -> bool {
    ch.is_alphabetic()
}

/// Go's `unicode.IsDigit`. Exact for Latin-1 (only `0`-`9`); beyond it, approximated by the
/// Numeric property, which also admits superscripts and similar number forms.
fn is_digit(ch: char) -> bool {
    if u32::from(ch) < 0x100 { ch.is_ascii_digit() } else { ch.is_numeric() }
}

/// The POSIX special parameters; in a Dockerfile they are never set.
fn is_special_param(ch: char) -> bool {
    matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

/// One element of a glob pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    /// Matches exactly this character.
    Literal(char),
    /// `?`: any one character except a newline.
    Any,
    /// `*`: any run of characters without a newline.
    Star,
}

impl Token {
    fn accepts(self, ch: char) -> bool {
        match self {
            Token::Literal(want) => ch == want,
            Token::Any | Token::Star => ch != '\n',
        }
    }
}

/// A compiled glob. BuildKit turns globs into Go regular expressions, so matching follows
/// their rules: stars and `?` do not cross newlines, `[` is an ordinary character, and the
/// first match by regexp priority (leftmost, then greedy or lazy stars) is taken.
#[derive(Debug)]
struct Glob {
    tokens: Vec<Token>,
    greedy: bool,
}

/// The threads of the matcher at one position, in priority order, without duplicates.
struct Threads {
    list: Vec<(usize, usize)>,
    seen: Vec<bool>,
}

impl Threads {
    fn new(states: usize) -> Self {
        Threads { list: Vec::new(), seen: vec![false; states] }
    }
}

impl Glob {
    /// Parses a pattern: `*`, `?`, and a backslash escaping `*`, `?` or `\`. A backslash
    /// before `}` or `/` is dropped, since it only kept them from ending the `${...}`.
    fn parse(pattern: &str, greedy: bool) -> Result<Glob, String> {
        // BuildKit scans the pattern with Go's text/scanner, which drops a leading byte order mark.
        let pattern = pattern.strip_prefix('\u{feff}').unwrap_or(pattern);
        let mut chars = pattern.chars().peekable();
        let mut tokens = Vec::new();
        while let Some(ch) = chars.next() {
            tokens.push(match ch {
                '*' => Token::Star,
                '?' => Token::Any,
                '\\' if matches!(chars.peek(), Some('}' | '/')) => continue,
                '\\' => match chars.next() {
                    Some(escaped @ ('*' | '?' | '\\')) => Token::Literal(escaped),
                    Some(other) => return Err(format!("invalid escape '\\{other}'")),
                    None => return Err("it ends with an escape character".to_string()),
                },
                other => Token::Literal(other),
            });
        }
        Ok(Glob { tokens, greedy })
    }

    /// Finds the first match at or after `from` (only at `from` when `anchored`), as
    /// `(start, end)` indexes into `text`. It runs all candidate matches side by side in
    /// priority order, so time is linear in the text for a given pattern.
    fn find(&self, text: &[char], from: usize, anchored: bool) -> Option<(usize, usize)> {
        let states = self.tokens.len() + 1;
        let mut current = Threads::new(states);
        let mut found = None;
        for pos in from..=text.len() {
            if found.is_none() && (!anchored || pos == from) {
                self.add(&mut current, 0, pos);
            }
            if current.list.is_empty() {
                if found.is_some() || anchored {
                    break;
                }
                continue;
            }
            let mut next = Threads::new(states);
            for &(pc, start) in &current.list {
                let Some(&token) = self.tokens.get(pc) else {
                    // A thread reached the end: it beats every lower-priority thread.
                    found = Some((start, pos));
                    break;
                };
                if text.get(pos).is_some_and(|&ch| token.accepts(ch)) {
                    let pc = if token == Token::Star { pc } else { pc + 1 };
                    self.add(&mut next, pc, start);
                }
            }
            current = next;
        }
        found
    }

    /// Adds the thread at `pc` and those reachable from it without consuming input. A star
    /// may be skipped; greedy stars prefer to consume, lazy ones prefer to skip.
    fn add(&self, threads: &mut Threads, mut pc: usize, start: usize) {
        let mut stars = Vec::new();
        let mut end = None;
        while !threads.seen[pc] {
            threads.seen[pc] = true;
            if self.tokens.get(pc) != Some(&Token::Star) {
                end = Some(pc);
                break;
            }
            stars.push(pc);
            pc += 1;
        }
        if self.greedy {
            threads.list.extend(stars.iter().map(|&star| (star, start)));
            threads.list.extend(end.map(|pc| (pc, start)));
        } else {
            threads.list.extend(end.map(|pc| (pc, start)));
            threads.list.extend(stars.iter().rev().map(|&star| (star, start)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The environment of BuildKit's envVarTest, plus a few values for operator cases.
    fn env() -> Vec<(String, String)> {
        [
            ("PWD", "/home"),
            ("SHELL", "bash"),
            ("KOREAN", "한국어"),
            ("NULL", ""),
            ("FOO", "xxyy"),
            ("PATH_", "/tmp/tmp/bar.txt"),
            ("STARS", "a***yy*"),
            ("GLOB", "()[]{}^$.*?|\\x"),
            ("SPACE", "abc  def"),
            ("LEADING", "  ab c"),
            ("TRAILING", "ab c   "),
            ("MULTI", "ab\ncd"),
            ("URL", "http://google.de"),
            ("BS", "\\"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn check_with(lexer: &Lexer, input: &str, expected: &str) {
        match lexer.process_word(input, &env()) {
            Ok(got) => assert_eq!(got, expected, "input {input:?}"),
            Err(err) => panic!("input {input:?}: unexpected error {err}"),
        }
    }

    fn check(input: &str, expected: &str) {
        check_with(&Lexer::new('\\'), input, expected);
    }

    fn check_backtick(input: &str, expected: &str) {
        check_with(&Lexer::new('`'), input, expected);
    }

    /// Asserts that `input` fails with exactly the message `expected`.
    fn check_err(input: &str, expected: &str) {
        match Lexer::new('\\').process_word(input, &env()) {
            Ok(got) => panic!("input {input:?}: expected an error, got {got:?}"),
            Err(err) => assert_eq!(err.to_string(), expected, "input {input:?}"),
        }
    }

    fn check_words(input: &str, expected: &[&str]) {
        match Lexer::new('\\').process_words(input, &env()) {
            Ok(got) => assert_eq!(got, expected, "input {input:?}"),
            Err(err) => panic!("input {input:?}: unexpected error {err}"),
        }
    }

    #[test]
    fn quoting() {
        let cases = [
            ("hello", "hello"),
            ("he'll'o", "hello"),
            ("\"hel'lo\"", "hel'lo"),
            ("\"''\"", "''"),
            ("'\"hello\"'", "\"hello\""),
            ("'he${XX}'", "he${XX}"),
            ("'$PWD'", "$PWD"),
            ("\"$PWD\"", "/home"),
            ("\"he'$PWD'\"", "he'/home'"),
            ("'hello\\'", "hello\\"),
            ("'hello\\there'", "hello\\there"),
            ("a' b 'c", "a b c"),
            ("<<EOF", "<<EOF"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn backslash_escapes() {
        let cases = [
            ("he\\'llo", "he'llo"),
            ("abc\\tdef", "abctdef"),
            ("\"abc\\tdef\"", "abc\\tdef"),
            ("\"abc\\\\tdef\"", "abc\\tdef"),
            ("'abc\\tdef'", "abc\\tdef"),
            ("hello\\", "hello"),
            ("hello\\\\", "hello\\"),
            ("he\\$PWD", "he$PWD"),
            ("he\\\\$PWD", "he\\/home"),
            ("\"he\\$PWD\"", "he$PWD"),
            ("\"he\\\\$PWD\"", "he\\/home"),
            ("\"a\\\"b\"", "a\"b"),
            ("\\${}aaa", "${}aaa"),
            ("he${XXX:-\\$PWD:}xx", "he$PWD:xx"),
            ("he${XXX:-\\${PWD}z}xx", "he${PWDz}xx"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn backtick_escapes() {
        let cases = [
            ("he`'llo", "he'llo"),
            ("a`tb", "atb"),
            ("C:\\path", "C:\\path"),
            ("\"C:\\path\"", "C:\\path"),
            ("he`$PWD", "he$PWD"),
            ("\"he`$PWD\"", "he$PWD"),
            ("\"a`\"b\"", "a\"b"),
            ("\"a``b\"", "a`b"),
            ("\"a`tb\"", "a`tb"),
            ("hello`", "hello"),
            ("${XXX:-`}}", "}"),
            ("${FOO#`x}", "xxyy"),
        ];
        for (input, expected) in cases {
            check_backtick(input, expected);
        }
    }

    #[test]
    fn plain_variables() {
        let cases = [
            ("he$PWD", "he/home"),
            ("he${PWD}", "he/home"),
            ("he$pwd.", "he."),
            ("he${hi}xx", "hexx"),
            ("$.", "$."),
            ("he$.x", "he$.x"),
            ("a$", "a$"),
            ("${aaa}}", "}"),
            ("$KOREAN", "한국어"),
            ("안녕$KOREAN", "안녕한국어"),
            ("$PWD_x", ""),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn positional_and_special_parameters() {
        let cases = [
            ("he$1x", "hex"),
            ("$999aaa", "aaa"),
            ("${001:-bbb}aaa", "bbbaaa"),
            ("$@@@", "@@"),
            ("${#:-bbb}", "bbb"),
            ("${$:+bbb}", ""),
            ("$0", ""),
            ("$!x", "x"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn default_and_alternative_operators() {
        let cases = [
            ("he${XXX:-000}xx", "he000xx"),
            ("he${PWD:-000}xx", "he/homexx"),
            ("he${XXX:-${YYY:-yyy}}xx", "heyyyxx"),
            ("${NULL:-x}", "x"),
            ("${NULL-x}", ""),
            ("${XXX-x}", "x"),
            ("he${PWD:+${SHELL}}xx", "hebashxx"),
            ("he${XXX:+000}xx", "hexx"),
            ("${NULL:+x}", ""),
            ("${NULL+x}", "x"),
            ("${XXX+x}", ""),
            ("he${PWD:+${PWD}:}xx", "he/home:xx"),
            ("${aaa:-bbb {foo}", "bbb {foo"),
            ("${XXX:-\"a}b\"}", "a}b"),
            ("${XXX:-'${PWD}'}", "${PWD}"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn required_operators() {
        check("he${PWD?}", "he/home");
        check("he${PWD:?}", "he/home");
        check("he${NULL?}", "he");
        check_err("${FOO_UNSET?}", "FOO_UNSET: is not allowed to be unset");
        check_err("${FOO_UNSET:?}", "FOO_UNSET: is not allowed to be unset");
        check_err("${NULL:?}", "NULL: is not allowed to be empty");
        check_err("${NULL:?set it $PWD}", "NULL: set it /home");
    }

    #[test]
    fn trim_operators() {
        let cases = [
            ("${FOO#*x*y}", "y"),
            ("${FOO#*}", "xxyy"),
            ("${FOO##*x}", "yy"),
            ("${FOO#x}", "xyy"),
            ("${FOO#}", "xxyy"),
            ("${FOO%y}", "xxy"),
            ("${FOO%%y*}", "xx"),
            ("${FOO%*y}", "xxy"),
            ("${FOO%%*y}", ""),
            ("${STARS%%\\**\\*}", "a"),
            ("${FOO#?\\?}", "xxyy"),
            ("${GLOB#()[]{\\}^$.\\*\\?|\\\\}", "x"),
            ("${FOO#[x]}", "xxyy"),
            ("${MULTI#*}", "ab\ncd"),
            ("${MULTI##*}", "\ncd"),
            ("${MULTI%%?d}", "ab\n"),
            ("${KOREAN#?}", "국어"),
            ("${KOREAN%어}", "한국"),
            ("${XXX#x}", ""),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn replace_operators() {
        let cases = [
            ("${PATH_/\\/tmp/} - ${PATH_//\\/tmp/}", "/tmp/bar.txt - /bar.txt"),
            ("${PATH_/\\/?/X}", "Xmp/tmp/bar.txt"),
            ("${URL/http:\\/\\//https://}", "https://google.de"),
            ("${PATH_//\\//\\/}", "\\/tmp\\/tmp\\/bar.txt"),
            ("${FOO/x*/z}", "z"),
            ("${FOO//y/'<$0>'}", "xx<y><y>"),
            ("${FOO//y/<\\$0>}", "xx<\\y><\\y>"),
            ("${FOO/y/<\\$0>}", "xx<\\$0>y"),
            ("${FOO//'$0'/-}", "xxyy"),
            ("${FOO/$NULL/ww}", "wwxxyy"),
            ("${FOO///}", "xxyy"),
            ("${MULTI//*/z}", "z\nz"),
            ("${KOREAN//국/-}", "한-어"),
            ("${XXX/a/b}", ""),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
    }

    #[test]
    fn expansion_errors() {
        let cases = [
            ("he'llo", "unterminated single quote in he'llo"),
            ("\"abc", "unterminated double quote in \"abc"),
            ("\"hello\\\"", "unterminated double quote in \"hello\\\""),
            ("${}", "bad substitution in ${}"),
            ("he${}xx", "bad substitution in he${}xx"),
            ("${{aaa}", "bad substitution in ${{aaa}"),
            ("${:-bbb}", "bad substitution in ${:-bbb}"),
            ("he${PWD", "missing '}' in he${PWD"),
            ("${aaa:-bbb ${foo}", "missing '}' in ${aaa:-bbb ${foo}"),
            ("${aaa:-'bbb}", "missing '}' in ${aaa:-'bbb}"),
            ("${FOO//ww}", "missing '/' after the pattern in ${FOO//ww}"),
            ("he${.}", "unsupported modifier (.) in he${.}"),
            ("${PWD:=000}", "unsupported modifier (:=) in ${PWD:=000}"),
            ("${XXX:YYY}", "unsupported modifier (:Y) in ${XXX:YYY}"),
            ("${FOO:#x}", "unsupported modifier (:#) in ${FOO:#x}"),
            ("${FOO#\\x}", "invalid pattern (\\x) in ${FOO#\\x}: invalid escape '\\x'"),
            ("${FOO%x\\}", "missing '}' in ${FOO%x\\}"),
            ("${FOO#$BS}", "invalid pattern (\\) in ${FOO#$BS}: it ends with an escape character"),
            ("${FOO%\\xa}", "invalid pattern (\\xa) in ${FOO%\\xa}: invalid escape '\\x'"),
        ];
        for (input, expected) in cases {
            check_err(input, expected);
        }
    }

    #[test]
    fn nested_default_words_are_always_expanded() {
        check_err("${PWD:-${XXX?}}", "XXX: is not allowed to be unset");
        check_err("${PWD:+'x}", "missing '}' in ${PWD:+'x}");
    }

    #[test]
    fn raw_quotes_and_escapes() {
        let raw_quotes = Lexer::new('\\').raw_quotes(true);
        check_with(&raw_quotes, "a'b'\"c\"", "a'b'\"c\"");
        check_with(&raw_quotes, "\"$PWD\"", "\"/home\"");
        let raw_escapes = Lexer::new('\\').raw_escapes(true);
        check_with(&raw_escapes, "a\\ b\\$c", "a\\ b\\$c");
        check_with(&raw_escapes, "\"a\\\"b\"", "a\\\"b");
        // BuildKit writes an escape that protects nothing twice inside double quotes.
        check_with(&raw_escapes, "\"a\\tb\"", "a\\\\tb");
        // Words of `-`/`+` operators never keep their escapes.
        check_with(&raw_escapes, "${XXX:-a\\$b}", "a$b");
    }

    #[test]
    fn skip_unset_env_keeps_references() {
        let lexer = Lexer::new('\\').skip_unset_env(true);
        let cases = [
            ("$XXX-$PWD", "$XXX-/home"),
            ("${XXX}", "${XXX}"),
            ("${XXX:-a$PWD}", "${XXX:-a/home}"),
            ("${XXX:=x}", "${XXX:=x}"),
            ("${XXX//a/b}", "${XXX/a/b}"),
            ("${NULL:-x}", "x"),
            ("$1", "$1"),
        ];
        for (input, expected) in cases {
            check_with(&lexer, input, expected);
        }
    }

    #[test]
    fn skip_process_quotes_treats_quotes_as_text() {
        let lexer = Lexer::new('\\').skip_process_quotes(true);
        check_with(&lexer, "'$PWD' \"x", "'/home' \"x");
    }

    #[test]
    fn unmatched_variables_are_reported_sorted() {
        let lexer = Lexer::new('\\');
        let (word, unmatched) =
            lexer.process_word_with_unmatched("${ZED:-.}$PWD${ABC}${PWD:+$MID}$1", &env()).expect("valid word");
        assert_eq!(word, "./home");
        assert_eq!(unmatched, ["1", "ABC", "MID", "ZED"]);
    }

    #[test]
    fn word_splitting() {
        check_words("hello", &["hello"]);
        check_words("hello${SPACE}bye", &["helloabc", "defbye"]);
        check_words("hello\"${SPACE}\"bye", &["helloabc  defbye"]);
        check_words("hello ${LEADING}def", &["hello", "ab", "cdef"]);
        check_words("hello\"${LEADING}\" def", &["hello  ab c", "def"]);
        check_words("hello${TRAILING}d", &["helloab", "c", "d"]);
        check_words("hel\"lo${TRAILING}\"", &["helloab c   "]);
        check_words("hello there  ", &["hello", "there"]);
        check_words("hello\\ there", &["hello there"]);
        check_words("hello\\\" there", &["hello\"", "there"]);
        check_words("hello'$there'", &["hello$there"]);
        check_words("a '' b \"\"", &["a", "b"]);
        check_words("cat <<  EOF >x", &["cat", "<<  EOF", ">x"]);
        check_words("", &[]);
    }

    #[test]
    fn word_splitting_keeps_buildkit_buffer_quirk() {
        // A nested operator word clears the partial word before it, as in BuildKit.
        check_words("a he${XXX:-x}y", &["a", "xy"]);
        check_words("he\"${PWD#/}\" z", &["home", "z"]);
        assert_eq!(Lexer::new('\\').process_word("a he${XXX:-x}y", &env()), Ok("a hexy".to_string()));
    }

    #[test]
    fn multibyte_input() {
        let cases = [
            ("안녕하세요", "안녕하세요"),
            ("안'녕'하세요", "안녕하세요"),
            ("안녕\\'하세요", "안녕'하세요"),
            ("\"안녕\\t하세요\"", "안녕\\t하세요"),
            ("안녕${XXX:-${PWD:-yyy}}xx", "안녕/homexx"),
            ("\u{feff}$PWD", "/home"),
            ("é${PWD}😀", "é/home😀"),
        ];
        for (input, expected) in cases {
            check(input, expected);
        }
        check_err("안'녕하세요", "unterminated single quote in 안'녕하세요");
    }

    #[test]
    fn env_implementations() {
        let lexer = Lexer::new('\\');
        let map: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(lexer.process_word("$A", &map), Ok("1".to_string()));
        let hash: HashMap<String, String> = [("A".to_string(), "2".to_string())].into();
        assert_eq!(lexer.process_word("$A", &hash), Ok("2".to_string()));
        let pairs = vec![("A".to_string(), "3".to_string()), ("A".to_string(), "4".to_string())];
        assert_eq!(lexer.process_word("$A", &pairs), Ok("4".to_string()));
        assert_eq!(Env::get(pairs.as_slice(), "A"), Some("4".to_string()));
        let closure = |name: &str| (name == "A").then(|| "5".to_string());
        assert_eq!(lexer.process_word("$A$a", &closure), Ok("5".to_string()));
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |levels: usize| "${X:-\"".repeat(levels) + &"\"}".repeat(levels);
        check(&nested(MAX_NESTING), "");
        let deep = nested(MAX_NESTING + 1);
        let err = Lexer::new('\\').process_word(&deep, &env());
        assert!(matches!(err, Err(ShellError::NestingTooDeep { .. })));
    }

    #[test]
    fn glob_matching_is_linear_enough() {
        // Backtracking would take exponential time on this pattern.
        let value = "a".repeat(2000);
        let env = |name: &str| (name == "V").then(|| value.clone());
        let word = format!("${{V#{}b}}", "*a".repeat(50));
        assert_eq!(Lexer::new('\\').process_word(&word, &env), Ok(value.clone()));
    }

    #[test]
    fn garbled_input_never_panics() {
        const PIECES: &[&str] = &[
            "$", "{", "}", ":", "-", "+", "?", "#", "%", "/", "\\", "`", "'", "\"", " ", "<", "*", "a", "PWD", "NULL",
            "1", "@", "한", "\u{feff}", "\n", "${", "${PWD", "\\}",
        ];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        for round in 0..600 {
            let len = 1 + next(16);
            let word: String = (0..len).map(|_| PIECES[next(PIECES.len())]).collect();
            let lexer = Lexer::new(if round % 3 == 0 { '`' } else { '\\' })
                .raw_quotes(round % 2 == 0)
                .raw_escapes(round % 5 == 0)
                .skip_unset_env(round % 7 == 0)
                .skip_process_quotes(round % 11 == 0);
            let _ = lexer.process_word_with_unmatched(&word, &env());
            let _ = lexer.process_words(&word, &env());
        }
    }
}
