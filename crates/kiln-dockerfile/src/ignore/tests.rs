//! Tests for the `.dockerignore` and glob matcher.

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
    assert_eq!(walk(&deep, &["**/bar", "!foo/bar/baz"]), ["dir foo", "dir foo/bar", "file foo/bar/baz", "file foo/x"]);
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
    'a', 'b', '/', '*', '?', '[', ']', '^', '!', '-', '\\', '.', ' ', '#', 'é', '☺', '\u{FEFF}', '\n', '\r', '{', '(',
    '$', '|', '+',
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
