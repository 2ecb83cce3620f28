//! Tests for the shell lexer.

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
        "$", "{", "}", ":", "-", "+", "?", "#", "%", "/", "\\", "`", "'", "\"", " ", "<", "*", "a", "PWD", "NULL", "1",
        "@", "한", "\u{feff}", "\n", "${", "${PWD", "\\}",
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
