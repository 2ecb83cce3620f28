//! `COPY --chmod`: octal (`755`) or symbolic (`u+x,g-w,o=r`) modes, as chmod(1) without umask.
//!
//! A mode that does not parse is a message naming it, which the COPY wraps with its vertex.

/// A parsed `--chmod` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chmod {
    /// Replace the permission bits.
    Octal(u32),
    /// Adjust them clause by clause.
    Symbolic(Vec<Clause>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Clause {
    /// Bits the clause may touch (from `u`, `g`, `o`, `a`).
    who: u32,
    op: char,
    perms: String,
}

const USER: u32 = 0o4700;
const GROUP: u32 = 0o2070;
const OTHER: u32 = 0o1007;

impl Chmod {
    /// Parses `--chmod=TEXT`.
    pub(crate) fn parse(text: &str) -> Result<Chmod, String> {
        let invalid = || format!("--chmod={text}: not an octal or symbolic mode");
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o7777).map(Chmod::Octal).ok_or_else(invalid);
        }
        let mut clauses = Vec::new();
        for part in text.split(',') {
            let op_at = part.find(['+', '-', '=']).ok_or_else(invalid)?;
            let (who_text, rest) = part.split_at(op_at);
            let mut who = 0;
            for c in who_text.chars() {
                who |= match c {
                    'u' => USER,
                    'g' => GROUP,
                    'o' => OTHER,
                    'a' => USER | GROUP | OTHER,
                    _ => return Err(invalid()),
                };
            }
            let op = rest.chars().next().ok_or_else(invalid)?;
            let perms = rest[1..].to_string();
            if !perms.chars().all(|c| "rwxXst".contains(c)) {
                return Err(invalid());
            }
            clauses.push(Clause { who: if who == 0 { USER | GROUP | OTHER } else { who }, op, perms });
        }
        Ok(Chmod::Symbolic(clauses))
    }

    /// The new mode of a file or directory whose mode is `mode`.
    pub(crate) fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        let clauses = match self {
            Chmod::Octal(octal) => return *octal,
            Chmod::Symbolic(clauses) => clauses,
        };
        let mut mode = mode & 0o7777;
        for clause in clauses {
            let mut bits = 0;
            for c in clause.perms.chars() {
                bits |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' if is_dir || mode & 0o111 != 0 => 0o111,
                    's' => 0o6000,
                    't' => 0o1000,
                    _ => 0,
                };
            }
            let bits = bits & clause.who;
            match clause.op {
                '+' => mode |= bits,
                '-' => mode &= !bits,
                _ => mode = (mode & !(clause.who & 0o7777)) | bits,
            }
        }
        mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_and_symbolic_modes_follow_chmod() {
        let check = |text: &str, mode: u32, is_dir: bool, expected: u32| {
            assert_eq!(Chmod::parse(text).unwrap().apply(mode, is_dir), expected, "{text} on {mode:o}");
        };
        check("755", 0o600, false, 0o755);
        check("4755", 0o600, false, 0o4755);
        check("u+x", 0o644, false, 0o744);
        check("+x", 0o644, false, 0o755);
        check("go-w", 0o666, false, 0o644);
        check("a=r", 0o777, false, 0o444);
        check("u=rwx,g=rx,o=", 0o000, false, 0o750);
        check("a+X", 0o644, false, 0o644);
        check("a+X", 0o644, true, 0o755);
        check("a+X", 0o744, false, 0o755);
        check("u+s,+t", 0o755, true, 0o5755);
        for bad in ["", "999", "8", "u+q", "z+x", "u", "12345"] {
            assert!(Chmod::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
