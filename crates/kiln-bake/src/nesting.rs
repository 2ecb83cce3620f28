//! A scan before hcl-edit parses: it refuses a bracket, string or interpolation left open at
//! the end of the text, and nesting deeper than [`MAX_NESTING`]. hcl-edit's parser backtracks
//! through every open level on its way to such an error. A few hundred bytes of unclosed
//! `{`/`[` took it minutes (found by fuzzing, docs/fuzzing.md). The scan knows strings,
//! template interpolations, heredocs and comments, so a valid file always passes.

/// The deepest nesting of brackets and interpolations a bake file may have.
pub const MAX_NESTING: usize = 32;

#[derive(Clone, Copy)]
enum Frame {
    /// `{`, `[` or `(`, and the line it opened on.
    Bracket(char, usize),
    /// A quoted string, from its line.
    Str(usize),
    /// `${` or `%{`, from its line.
    Interpolation(usize),
    /// The whole text is a template's content (no closing quote).
    Template,
}

/// Checks `text`, HCL (`template`: a template's content, as a JSON string holds it). The
/// error is the 1-based line and what is wrong.
pub fn check(text: &str, template: bool) -> Result<(), (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut stack: Vec<Frame> = if template { vec![Frame::Template] } else { Vec::new() };
    let (mut i, mut line) = (0, 1);
    let depth =
        |stack: &[Frame]| stack.iter().filter(|f| matches!(f, Frame::Bracket(..) | Frame::Interpolation(_))).count();
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            line += 1;
        }
        match stack.last().copied() {
            Some(Frame::Str(_) | Frame::Template) => {
                let in_string = matches!(stack.last(), Some(Frame::Str(_)));
                match (c, next) {
                    ('\\', Some(_)) if in_string => i += 1,
                    ('"', _) if in_string => drop(stack.pop()),
                    ('$' | '%', Some(n)) if n == c => i += 1,
                    ('$' | '%', Some('{')) => {
                        stack.push(Frame::Interpolation(line));
                        i += 1;
                    }
                    _ => {}
                }
            }
            _ => match (c, next) {
                ('"', _) => stack.push(Frame::Str(line)),
                ('#', _) | ('/', Some('/')) => {
                    while i + 1 < chars.len() && chars[i + 1] != '\n' {
                        i += 1;
                    }
                }
                ('/', Some('*')) => {
                    i += 2;
                    while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                        if chars[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    i += 1;
                }
                ('<', Some('<')) => {
                    let mut j = i + 2;
                    if chars.get(j) == Some(&'-') {
                        j += 1;
                    }
                    let start = j;
                    while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                        j += 1;
                    }
                    if j > start {
                        // The heredoc's lines, through the one that is only its marker; `i`
                        // goes to the newline ending that line.
                        let marker: String = chars[start..j].iter().collect();
                        while j < chars.len() && chars[j] != '\n' {
                            j += 1;
                        }
                        while j < chars.len() {
                            line += 1;
                            j += 1;
                            let body = j;
                            while j < chars.len() && chars[j] != '\n' {
                                j += 1;
                            }
                            if chars[body..j].iter().collect::<String>().trim() == marker {
                                break;
                            }
                        }
                        i = j;
                        continue;
                    }
                }
                ('{' | '[' | '(', _) => {
                    stack.push(Frame::Bracket(c, line));
                    if depth(&stack) > MAX_NESTING {
                        return Err((line, format!("nesting deeper than {MAX_NESTING} levels")));
                    }
                }
                ('}', _) if matches!(stack.last(), Some(Frame::Interpolation(_))) => drop(stack.pop()),
                ('}' | ']' | ')', _) if matches!(stack.last(), Some(Frame::Bracket(..))) => drop(stack.pop()),
                _ => {}
            },
        }
        if let Some(Frame::Interpolation(_)) = stack.last()
            && depth(&stack) > MAX_NESTING
        {
            return Err((line, format!("nesting deeper than {MAX_NESTING} levels")));
        }
        i += 1;
    }
    match stack.into_iter().rev().find(|f| !matches!(f, Frame::Template)) {
        None => Ok(()),
        Some(Frame::Bracket(c, at)) => Err((at, format!("this {c} is never closed"))),
        Some(Frame::Str(at)) => Err((at, "this string is never closed".into())),
        Some(Frame::Interpolation(at)) => Err((at, "this ${ or %{ is never closed".into())),
        Some(Frame::Template) => Ok(()),
    }
}
