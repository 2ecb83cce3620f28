//! BuildKit's `Node.Dump()` format, used by the conformance corpus and by `kiln plan --ast`.

use std::fmt::Write as _;

use super::{Ast, Node};

/// Dumps every instruction as `(cmd ["--flag"...] "arg"...)`, one per line, newline-terminated.
pub fn dump_ast(ast: &Ast) -> String {
    let mut out = String::new();
    for node in &ast.nodes {
        let _ = writeln!(out, "({})", dump_node(node));
    }
    out
}

fn dump_node(node: &Node) -> String {
    let mut out = node.instruction.to_lowercase();
    if !node.flags.is_empty() {
        let quoted: Vec<String> = node.flags.iter().map(|f| go_quote(f)).collect();
        let _ = write!(out, " [{}]", quoted.join(" "));
    }
    if let Some(sub) = &node.sub {
        let _ = write!(out, " ({})", dump_node(sub));
    }
    for arg in &node.args {
        out.push(' ');
        out.push_str(&go_quote(arg));
    }
    out.trim().to_owned()
}

/// Quotes a string the way Go's `strconv.Quote` does (for the characters Dockerfiles hold).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || is_go_unprintable(c) => {
                if (c as u32) <= 0xffff {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                } else {
                    let _ = write!(out, "\\U{:08x}", c as u32);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Format and separator characters Go does not consider printable.
fn is_go_unprintable(c: char) -> bool {
    matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}')
}
