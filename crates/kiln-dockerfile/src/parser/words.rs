//! Argument splitters used by the parser: builder flags, words, whitespace lists, JSON arrays.

/// Splits leading `--flag[=value]` words off `line`; returns the rest (trimmed) and the flags.
///
/// A bare `--` ends the flags. Quotes inside a flag group its value and backslashes escape
/// the next character, as in BuildKit's `extractBuilderFlags`.
pub(super) fn extract_builder_flags(line: &str) -> (&str, Vec<String>) {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut flags = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && chars[i].1.is_whitespace() {
            i += 1;
        }
        let starts_flag = i + 1 < chars.len() && chars[i].1 == '-' && chars[i + 1].1 == '-';
        if !starts_flag {
            let rest = chars.get(i).map_or("", |&(pos, _)| &line[pos..]);
            return (rest.trim(), flags);
        }
        let (word, next, quoted) = flag_word(&chars, i);
        i = next;
        if word == "--" {
            let rest = chars.get(i).map_or("", |&(pos, _)| &line[pos..]);
            return (rest.trim(), flags);
        }
        if quoted || !word.is_empty() {
            flags.push(word);
        }
    }
}

/// Reads one flag word starting at `start`; returns it, the index after it, and whether it
/// contained quotes (so an empty quoted value still counts).
fn flag_word(chars: &[(usize, char)], start: usize) -> (String, usize, bool) {
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut quoted = false;
    let mut i = start;
    while i < chars.len() {
        let c = chars[i].1;
        match quote {
            None if c.is_whitespace() => break,
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                quoted = true;
            }
            Some(q) if c == q => quote = None,
            _ if c == '\\' => {
                if i + 1 < chars.len() {
                    i += 1;
                    word.push(chars[i].1);
                }
            }
            _ => word.push(c),
        }
        i += 1;
    }
    (word, i, quoted)
}

/// Splits on unquoted whitespace, keeping quotes and escapes in the words (they are removed
/// later by the shell lexer), as BuildKit's `parseWords`.
pub(super) fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut blank_ok = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at_last = i + 1 == chars.len();
        if !in_word {
            if c.is_whitespace() {
                i += 1;
                continue;
            }
            in_word = true;
        }
        match quote {
            None => {
                if c.is_whitespace() {
                    if blank_ok || !word.is_empty() {
                        words.push(std::mem::take(&mut word));
                    }
                    in_word = false;
                    blank_ok = false;
                    i += 1;
                    continue;
                }
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    blank_ok = true;
                }
                if c == escape {
                    if at_last {
                        i += 1;
                        continue;
                    }
                    word.push(c);
                    i += 1;
                }
                word.push(chars[i]);
            }
            Some(q) => {
                if c == q {
                    quote = None;
                }
                if c == escape && q != '\'' {
                    if at_last {
                        quote = None;
                        i += 1;
                        continue;
                    }
                    word.push(c);
                    i += 1;
                }
                word.push(chars[i]);
            }
        }
        i += 1;
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push(word);
    }
    words
}

/// Splits on runs of `[\t\v\f\r ]`, as BuildKit's `parseStringsWhitespaceDelimited`.
pub(super) fn split_whitespace(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        return Vec::new();
    }
    rest.split(['\t', '\u{b}', '\u{c}', '\r', ' ']).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// What a would-be JSON argument turned out to be.
pub(super) enum JsonArray {
    /// A JSON array of strings.
    Strings(Vec<String>),
    /// A JSON array with a non-string element: an error in BuildKit.
    NotStrings,
    /// Not JSON at all: the caller falls back to the shell form.
    NotJson,
}

pub(super) fn parse_json_array(rest: &str) -> JsonArray {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return JsonArray::NotJson;
    }
    match serde_json::from_str::<Vec<serde_json::Value>>(rest) {
        Err(_) => JsonArray::NotJson,
        Ok(values) => {
            let strings: Option<Vec<String>> = values.into_iter().map(|v| v.as_str().map(str::to_owned)).collect();
            strings.map_or(JsonArray::NotStrings, JsonArray::Strings)
        }
    }
}
