//! Go's `filepath.Match` glob, used for COPY/ADD source wildcards.

use super::PatternError;

/// The value Go's UTF-8 decoder returns for a byte that does not start a valid sequence.
const RUNE_ERROR: u32 = 0xFFFD;

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
pub(super) struct BadGlob;

/// Go's `filepath.Match` on bytes.
///
/// Working on bytes rather than characters matters: Go lets a `*` skip single bytes, so a
/// following `?` or class may start inside a multi-byte character, and this reproduces that.
pub(super) fn go_match(mut pattern: &[u8], mut name: &[u8]) -> Result<bool, BadGlob> {
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
