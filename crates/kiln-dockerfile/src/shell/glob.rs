//! Glob patterns of `${v#p}`, `${v%p}` and `${v/p/r}`, matched as BuildKit's Go regexps are.
//!
//! A pattern that does not compile is a message the lexer wraps into its `ShellError`.

use super::{is_digit, is_letter};

/// Replaces every match the way Go's `Regexp.ReplaceAllString` does: an empty match right
/// after a previous match is skipped, and `$0` in the replacement stands for the match.
pub(super) fn replace_all(glob: &Glob, text: &[char], replacement: &str, limit: usize) -> Option<String> {
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
            if out.len() > limit {
                return None;
            }
        }
        last_end = end;
        // Always move on by at least one character, so an empty match cannot repeat forever.
        search = if search + 1 > end { search + 1 } else { end };
    }
    out.extend(&text[last_end..]);
    Some(out)
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
pub(super) fn reverse_pattern(pattern: &str) -> String {
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
pub(super) struct Glob {
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
    pub(super) fn parse(pattern: &str, greedy: bool) -> Result<Glob, String> {
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
    pub(super) fn find(&self, text: &[char], from: usize, anchored: bool) -> Option<(usize, usize)> {
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
