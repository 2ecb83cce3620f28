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
    /// The expansion grew past [`MAX_WORD_LEN`] bytes.
    #[error("the expansion of {word} is longer than {limit} bytes")]
    TooLong {
        /// The limit that was exceeded.
        limit: usize,
        /// The input word (its start, when it is long itself).
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

/// The longest expansion of one word, in bytes: eight times what Linux accepts as one
/// argument or environment string (`MAX_ARG_STRLEN`, 128 KiB), so any word a step can use
/// fits, and `ARG A2=${A1}${A1}`-style doubling fails at this size instead of exhausting
/// memory.
pub const MAX_WORD_LEN: usize = 1 << 20;

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

    /// Fails once an expansion passes [`MAX_WORD_LEN`].
    fn check_len(&self, text: &str) -> Result<(), ShellError> {
        if text.len() <= MAX_WORD_LEN { Ok(()) } else { Err(self.too_long()) }
    }

    fn too_long(&self) -> ShellError {
        let mut word: String = self.source.chars().take(80).collect();
        if word.len() < self.source.len() {
            word.push('…');
        }
        ShellError::TooLong { limit: MAX_WORD_LEN, word }
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
            self.check_len(&result)?;
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
                Some('$') => {
                    result.push_str(&self.dollar()?);
                    self.check_len(&result)?;
                }
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
            return replace_all(&glob, &text, &replacement, MAX_WORD_LEN).ok_or_else(|| self.too_long());
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

mod glob;

use glob::{Glob, replace_all, reverse_pattern};

#[cfg(test)]
mod tests;
