//! The raw Dockerfile parser: logical lines, directives, flags, arguments and heredocs.
//!
//! This is BuildKit's `parser` package behaviour: it knows how each instruction splits its
//! arguments but does no variable expansion and does not judge whether an instruction is
//! valid (that is [`crate::instructions`]). Line numbers are 1-based and refer to the file.
//!
//! The helpers for one line return a message; [`parse`] wraps it into [`ParseError`] with the
//! file and line.

mod dump;
mod words;

use std::collections::{BTreeMap, BTreeSet};

pub use dump::{dump_ast, go_quote};
use words::{JsonArray, extract_builder_flags, parse_json_array, parse_words, split_whitespace};

use crate::shell::Lexer;

/// One instruction as written: keyword, flags and arguments, before any expansion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// Lowercased keyword, e.g. `run` (unknown keywords are kept for a later error).
    pub instruction: String,
    /// The logical line after continuation joining.
    pub original: String,
    /// Leading `--name[=value]` flags, without the dashes removed.
    pub flags: Vec<String>,
    /// Arguments; for ENV and LABEL they are (key, value, separator) triples as in BuildKit.
    pub args: Vec<String>,
    /// The arguments came from a JSON array (exec form).
    pub json: bool,
    /// Heredocs opened on this line, in order.
    pub heredocs: Vec<Heredoc>,
    /// First line of the instruction, 1-based.
    pub start_line: usize,
    /// Last line of the instruction (including heredoc bodies), 1-based.
    pub end_line: usize,
    /// Comment lines directly above the instruction.
    pub comments: Vec<String>,
    /// The instruction an `ONBUILD` wraps.
    pub sub: Option<Box<Node>>,
}

/// A here-document attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed, e.g. `EOF`.
    pub name: String,
    /// The body, with line endings as in the file.
    pub content: String,
    /// Variables in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from body lines.
    pub chomp: bool,
    /// File descriptor written before `<<` (`3<<EOF`), if any.
    pub file_descriptor: Option<u32>,
}

impl Heredoc {
    /// The body as the command sees it: with `<<-`, leading tabs removed from every line.
    pub fn chomped_content(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        self.content.split_inclusive('\n').map(|l| l.trim_start_matches('\t')).collect()
    }
}

/// Parser directives from the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// The escape character: `\` (default) or `` ` ``.
    pub escape: char,
    /// `# syntax=` value, if any.
    pub syntax: Option<String>,
    /// `# check=` value, if any.
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives { escape: '\\', syntax: None, check: None }
    }
}

/// A non-fatal finding, e.g. an empty continuation line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Line the warning is about, 1-based.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ast {
    /// Directives found at the top.
    pub directives: Directives,
    /// Instructions in order.
    pub nodes: Vec<Node>,
    /// Non-fatal findings.
    pub warnings: Vec<Warning>,
}

/// A syntax error with the line range it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// First line of the offending instruction, 1-based.
    pub line: usize,
    /// What is wrong, for people.
    pub message: String,
}

fn error(line: usize, message: impl Into<String>) -> ParseError {
    ParseError { line, message: message.into() }
}

/// How deeply `ONBUILD` may wrap instructions in the raw parse (`ONBUILD ONBUILD ...`, which
/// the instruction layer then rejects). Each level recurses, so the limit keeps hostile input
/// from overflowing the stack.
pub const MAX_ONBUILD_NESTING: usize = 16;

/// Instructions whose shell or file arguments may open heredocs.
const HEREDOC_INSTRUCTIONS: [&str; 3] = ["add", "copy", "run"];

/// Parses a whole Dockerfile.
pub fn parse(text: &str) -> Result<Ast, ParseError> {
    let mut parser = Parser::new(text);
    parser.run()?;
    if parser.ast.nodes.is_empty() {
        return Err(error(parser.line.max(1), "file with no instructions"));
    }
    Ok(parser.ast)
}

struct Parser<'a> {
    lines: Vec<&'a str>,
    next: usize,
    line: usize,
    directive_scan: DirectiveScan,
    ast: Ast,
}

#[derive(Default)]
struct DirectiveScan {
    done: bool,
    seen: BTreeSet<String>,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        Parser {
            lines: text.split_inclusive('\n').collect(),
            next: 0,
            line: 0,
            directive_scan: DirectiveScan::default(),
            ast: Ast::default(),
        }
    }

    fn next_line(&mut self) -> Option<&'a str> {
        let line = self.lines.get(self.next).copied()?;
        self.next += 1;
        self.line += 1;
        Some(line)
    }

    fn escape(&self) -> char {
        self.ast.directives.escape
    }

    fn run(&mut self) -> Result<(), ParseError> {
        let mut comments = Vec::new();
        while let Some(raw) = self.next_line() {
            if is_comment(raw) {
                let text = trim_newline(raw).trim_start()[1..].trim().to_owned();
                if text.is_empty() { comments.clear() } else { comments.push(text) }
            }
            let content = self.process_line(raw, true)?;
            let start_line = self.line;
            let (first, mut at_end) = trim_continuation(content, self.escape());
            if at_end && first.is_empty() {
                continue;
            }
            let mut logical = first.to_owned();
            let mut empty_continuation = false;
            while !at_end {
                let Some(raw) = self.next_line() else { break };
                let content = self.process_line(raw, false)?;
                if is_comment(raw) {
                    continue;
                }
                if content.trim_start().is_empty() {
                    empty_continuation = true;
                    continue;
                }
                let (part, end) = trim_continuation(content, self.escape());
                logical.push_str(part);
                at_end = end;
            }
            if empty_continuation {
                let message = format!("empty continuation line found in: {logical}");
                self.ast.warnings.push(Warning { line: self.line, message });
            }
            let mut node = node_from_line(&logical, self.escape(), 0).map_err(|m| error(start_line, m))?;
            node.comments = std::mem::take(&mut comments);
            node.start_line = start_line;
            self.read_heredocs(&mut node, &logical, start_line)?;
            node.end_line = self.line;
            self.ast.nodes.push(node);
        }
        Ok(())
    }

    /// Strips the newline (and leading space when asked), feeds directive detection and
    /// blanks comment lines, as BuildKit's `processLine` does.
    fn process_line(&mut self, raw: &'a str, strip_left: bool) -> Result<&'a str, ParseError> {
        let mut token = trim_newline(raw);
        if strip_left {
            token = token.trim_start();
        }
        self.possible_directive(token)?;
        Ok(if is_comment(token) { "" } else { token })
    }

    fn possible_directive(&mut self, line: &str) -> Result<(), ParseError> {
        if self.directive_scan.done {
            return Ok(());
        }
        let Some((key, value)) = directive_parts(line) else {
            self.directive_scan.done = true;
            return Ok(());
        };
        let key = key.to_ascii_lowercase();
        if !["syntax", "escape", "check"].contains(&key.as_str()) {
            self.directive_scan.done = true;
            return Ok(());
        }
        if !self.directive_scan.seen.insert(key.clone()) {
            return Err(error(self.line, format!("only one {key} parser directive can be used")));
        }
        let directives = &mut self.ast.directives;
        match key.as_str() {
            "escape" => {
                directives.escape = match value {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        let msg = format!("invalid escape token '{other}' does not match ` or \\");
                        return Err(error(self.line, msg));
                    }
                }
            }
            "syntax" => directives.syntax = Some(value.to_owned()),
            _ => directives.check = Some(value.to_owned()),
        }
        Ok(())
    }

    fn read_heredocs(&mut self, node: &mut Node, logical: &str, start_line: usize) -> Result<(), ParseError> {
        let applies = HEREDOC_INSTRUCTIONS.contains(&node.instruction.as_str()) && !node.json;
        if !applies || !logical.contains("<<") {
            return Ok(());
        }
        let mut heredocs = heredocs_from_line(logical).map_err(|m| error(start_line, m))?;
        for heredoc in &mut heredocs {
            let mut terminated = false;
            while let Some(raw) = self.next_line() {
                let mut candidate = trim_newline(raw);
                if heredoc.chomp {
                    candidate = candidate.trim_start_matches('\t');
                }
                if candidate == heredoc.name {
                    terminated = true;
                    break;
                }
                heredoc.content.push_str(raw);
            }
            if !terminated {
                let msg = format!(
                    "unterminated heredoc: no line with the delimiter {:?} before the end of the file",
                    heredoc.name
                );
                return Err(error(start_line, msg));
            }
        }
        node.heredocs = heredocs;
        Ok(())
    }
}

fn trim_newline(line: &str) -> &str {
    line.strip_suffix("\r\n").or_else(|| line.strip_suffix('\n')).unwrap_or(line)
}

fn is_comment(line: &str) -> bool {
    trim_newline(line).trim_start().starts_with('#')
}

/// Matches `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`.
fn directive_parts(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?.trim_start();
    let key_len = rest.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(rest.len());
    let key = &rest[..key_len];
    if !key.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let value = rest[key_len..].trim_start().strip_prefix('=')?.trim();
    if value.is_empty() {
        return None;
    }
    Some((key, value))
}

/// Removes a trailing escape character (and blanks after it); `true` means the logical line
/// ends. As in BuildKit, an escape preceded by another escape (`\\` at the end) is an
/// escaped escape, not a continuation.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    match trimmed.strip_suffix(escape) {
        Some(rest) if !rest.ends_with(escape) => (rest, false),
        _ => (line, true),
    }
}

/// Builds a node from one logical line; errors are plain messages, located by the caller.
fn node_from_line(line: &str, escape: char, depth: usize) -> Result<Node, String> {
    let trimmed = line.trim();
    let (keyword, rest) = match trimmed.find(['\t', '\u{b}', '\u{c}', '\r', ' ']) {
        Some(i) => (&trimmed[..i], trimmed[i..].trim_start_matches([' ', '\t', '\u{b}', '\u{c}', '\r'])),
        None => (trimmed, ""),
    };
    let instruction = keyword.to_lowercase();
    let (rest, flags) = extract_builder_flags(rest);
    let mut node = Node { instruction, original: line.to_owned(), flags, ..Node::default() };
    parse_arguments(&mut node, rest, escape, depth)?;
    Ok(node)
}

fn parse_arguments(node: &mut Node, rest: &str, escape: char, depth: usize) -> Result<(), String> {
    match node.instruction.as_str() {
        "add" | "copy" | "volume" => maybe_json_to_list(node, rest)?,
        "arg" => node.args = parse_words(rest, escape),
        "cmd" | "entrypoint" | "run" | "shell" => maybe_json(node, rest)?,
        "env" => node.args = name_value(rest, "ENV", escape)?,
        "label" => node.args = name_value(rest, "LABEL", escape)?,
        "expose" | "from" => node.args = split_whitespace(rest),
        "healthcheck" => health_config(node, rest)?,
        "maintainer" | "stopsignal" | "user" | "workdir" if !rest.is_empty() => node.args = vec![rest.to_owned()],
        "onbuild" if !rest.is_empty() => {
            if depth >= MAX_ONBUILD_NESTING {
                return Err(format!("ONBUILD nested more than {MAX_ONBUILD_NESTING} levels deep"));
            }
            node.sub = Some(Box::new(node_from_line(rest, escape, depth + 1)?));
        }
        _ => {}
    }
    Ok(())
}

fn maybe_json(node: &mut Node, rest: &str) -> Result<(), String> {
    if rest.is_empty() {
        return Ok(());
    }
    match parse_json_array(rest) {
        JsonArray::Strings(args) => {
            node.args = args;
            node.json = true;
        }
        JsonArray::NotStrings => return Err(not_string_array()),
        JsonArray::NotJson => node.args = vec![rest.to_owned()],
    }
    Ok(())
}

fn maybe_json_to_list(node: &mut Node, rest: &str) -> Result<(), String> {
    match parse_json_array(rest) {
        JsonArray::Strings(args) => {
            node.args = args;
            node.json = true;
        }
        JsonArray::NotStrings => return Err(not_string_array()),
        JsonArray::NotJson => node.args = split_whitespace(rest),
    }
    Ok(())
}

fn not_string_array() -> String {
    "when using JSON array syntax, arrays must be comprised of strings only".to_owned()
}

/// ENV/LABEL: the legacy `KEY value` form or `k=v ...`, as (key, value, separator) triples.
fn name_value(rest: &str, keyword: &str, escape: char) -> Result<Vec<String>, String> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else { return Ok(Vec::new()) };
    if !first.contains('=') {
        let parts: Vec<&str> = rest.splitn(2, [' ', '\t', '\u{b}', '\u{c}', '\r']).collect();
        let value = parts.get(1).map(|v| v.trim_start_matches([' ', '\t', '\u{b}', '\u{c}', '\r']));
        return match value {
            Some(v) if !v.is_empty() => Ok(vec![parts[0].to_owned(), v.to_owned(), String::new()]),
            _ => Err(format!("{keyword} must have two arguments")),
        };
    }
    let mut triples = Vec::with_capacity(words.len() * 3);
    for word in &words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(format!("syntax error - can't find = in {word:?}. Must be of the form: name=value"));
        };
        triples.extend([key.to_owned(), value.to_owned(), "=".to_owned()]);
    }
    Ok(triples)
}

fn health_config(node: &mut Node, rest: &str) -> Result<(), String> {
    let sep = rest.find(char::is_whitespace).unwrap_or(rest.len());
    if sep == 0 {
        return Ok(());
    }
    let kind = rest[..sep].to_owned();
    maybe_json(node, rest[sep..].trim_start())?;
    node.args.insert(0, kind);
    Ok(())
}

/// Finds `<<WORD` heredoc openers among the words of a line.
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let env = BTreeMap::<String, String>::new();
    let lexer = Lexer::new('\\').raw_quotes(true).raw_escapes(true);
    let words = lexer.process_words(line, &env).unwrap_or_default();
    let mut found = Vec::new();
    for word in words {
        if let Some(heredoc) = parse_heredoc(&word)? {
            found.push(heredoc);
        }
    }
    Ok(found)
}

/// Parses one word of the form `[fd]<<[-]NAME`; `None` when the word is not a heredoc opener.
pub fn parse_heredoc(word: &str) -> Result<Option<Heredoc>, String> {
    let digits = word.find(|c: char| !c.is_ascii_digit()).unwrap_or(word.len());
    let Some(after) = word[digits..].strip_prefix("<<") else { return Ok(None) };
    let (chomp, rest) = match after.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, after),
    };
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    let env = BTreeMap::<String, String>::new();
    let lexer = Lexer::new('\\').skip_unset_env(true);
    let words = lexer.process_words(rest, &env).map_err(|e| e.to_string())?;
    let [name] = words.as_slice() else { return Ok(None) };
    let raw = lexer.raw_quotes(true).process_words(rest, &env).map_err(|e| e.to_string())?;
    let quotes = |s: &str| s.matches(['\'', '"']).count();
    let expand = raw.first().is_some_and(|r| quotes(r) == quotes(name));
    let file_descriptor = word[..digits].parse().ok();
    Ok(Some(Heredoc { name: name.clone(), content: String::new(), expand, chomp, file_descriptor }))
}

#[cfg(test)]
mod tests;
