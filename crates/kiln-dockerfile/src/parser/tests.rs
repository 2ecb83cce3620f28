//! Parser tests: Dockerfile text in, BuildKit's dump format out.

use super::*;

#[track_caller]
fn check(dockerfile: &str, expected: &str) {
    let ast = parse(dockerfile).unwrap_or_else(|e| panic!("parse failed: {e}\n{dockerfile}"));
    assert_eq!(dump_ast(&ast), expected, "\n{dockerfile}");
}

#[track_caller]
fn check_error(dockerfile: &str, line: usize, fragment: &str) {
    let err = parse(dockerfile).expect_err("expected a parse error");
    assert_eq!(err.line, line, "{err}");
    assert!(err.message.contains(fragment), "{err} does not mention {fragment:?}");
}

#[test]
fn instructions_and_flags() {
    check(
        "FROM scratch\nCOPY --user=me --doit=true foo /tmp/\nCOPY --doit=true -- foo /tmp/\nCMD --doit -- [ ]\n",
        "(from \"scratch\")\n(copy [\"--user=me\" \"--doit=true\"] \"foo\" \"/tmp/\")\n(copy [\"--doit=true\"] \"foo\" \"/tmp/\")\n(cmd [\"--doit\"])\n",
    );
    check("RUN --mount=type=cache,target=/x make\n", "(run [\"--mount=type=cache,target=/x\"] \"make\")\n");
    check("copy --from=\"a b\" x y\n", "(copy [\"--from=a b\"] \"x\" \"y\")\n");
}

#[test]
fn json_and_shell_forms() {
    check("CMD [\"a\", \"b\"]\n", "(cmd \"a\" \"b\")\n");
    check("CMD []\n", "(cmd)\n");
    check("CMD ['a']\n", "(cmd \"['a']\")\n");
    check("CMD [\"unterminated\"\n", "(cmd \"[\\\"unterminated\\\"\")\n");
    check("ENTRYPOINT [\"\\u0000\", \"♥\"]\n", "(entrypoint \"\\x00\" \"♥\")\n");
    check("ADD [ \"test file\", \"/tmp/test file\" ]\n", "(add \"test file\" \"/tmp/test file\")\n");
    check("VOLUME /a /b\n", "(volume \"/a\" \"/b\")\n");
    check("SHELL [\"/bin/bash\", \"-c\"]\n", "(shell \"/bin/bash\" \"-c\")\n");
}

#[test]
fn env_label_and_arg_forms() {
    check("ENV name value with spaces\n", "(env \"name\" \"value with spaces\" \"\")\n");
    check("ENV a=1 b=\"2 3\"\n", "(env \"a\" \"1\" \"=\" \"b\" \"\\\"2 3\\\"\" \"=\")\n");
    check("ENV name=value\\ value2\n", "(env \"name\" \"value\\\\ value2\" \"=\")\n");
    check("LABEL maintainer Me <me@x>\n", "(label \"maintainer\" \"Me <me@x>\" \"\")\n");
    check("ARG abc=\"123 456\" def\n", "(arg \"abc=\\\"123 456\\\"\" \"def\")\n");
}

#[test]
fn healthcheck_and_onbuild() {
    check("HEALTHCHECK\n", "(healthcheck)\n");
    check(
        "HEALTHCHECK --interval=5s CMD /check --quiet\n",
        "(healthcheck [\"--interval=5s\"] \"CMD\" \"/check --quiet\")\n",
    );
    check("HEALTHCHECK CMD [\"a\", \"b\"]\n", "(healthcheck \"CMD\" \"a\" \"b\")\n");
    check("ONBUILD RUN [\"echo\", \"x\"]\n", "(onbuild (run \"echo\" \"x\"))\n");
    check("ONBUILD COPY . /\n", "(onbuild (copy \".\" \"/\"))\n");
}

#[test]
fn continuations_and_comments() {
    check("RUN echo hello\\\n  world\n", "(run \"echo hello  world\")\n");
    check("RUN a \\\n# comment inside\n\n b\n", "(run \"a  b\")\n");
    check("RUN something \\", "(run \"something\")\n");
    check("ENV C trailing\\\\\nENV D x\n", "(env \"C\" \"trailing\\\\\\\\\" \"\")\n(env \"D\" \"x\" \"\")\n");
    check("ENV E hello\\\n\\\nworld\n", "(env \"E\" \"helloworld\" \"\")\n");
    check("  # indented comment\n\tRUN x\n", "(run \"x\")\n");
    check("\u{feff}FROM a\n", "(from \"a\")\n");
    check("FROM a\r\nRUN b \\\r\n c\r\n", "(from \"a\")\n(run \"b  c\")\n");
}

#[test]
fn directives_only_at_the_top() {
    let ast = parse("# syntax=docker/dockerfile:1\n# escape=`\n# check=skip=all\nFROM a\nRUN x `\n  y\n").unwrap();
    assert_eq!(ast.directives.escape, '`');
    assert_eq!(ast.directives.syntax.as_deref(), Some("docker/dockerfile:1"));
    assert_eq!(ast.directives.check.as_deref(), Some("skip=all"));
    assert_eq!(dump_ast(&ast), "(from \"a\")\n(run \"x   y\")\n");
    let late = parse("# a comment\n# escape=`\nFROM a\nRUN x \\\n y\n").unwrap();
    assert_eq!(late.directives.escape, '\\', "a directive after a comment is a comment");
    let unknown = parse("# foo=bar\n# escape=`\nFROM a\n").unwrap();
    assert_eq!(unknown.directives.escape, '\\', "an unknown directive ends directive scanning");
}

#[test]
fn heredocs() {
    let ast =
        parse("RUN <<EOF\necho $HOME\nEOF\nRUN <<-'X' 3<<\"Y\" cat\n\tone\n\tX\ntwo\nY\nCOPY <<F /f\ncontent\nF\n")
            .unwrap();
    let [first, second, third] = ast.nodes.as_slice() else { panic!("{:?}", ast.nodes) };
    assert_eq!(first.heredocs.len(), 1);
    assert_eq!(first.heredocs[0].name, "EOF");
    assert_eq!(first.heredocs[0].content, "echo $HOME\n");
    assert!(first.heredocs[0].expand);
    assert_eq!((first.start_line, first.end_line), (1, 3));
    assert_eq!(second.heredocs.len(), 2);
    assert_eq!(second.heredocs[0].name, "X");
    assert!(second.heredocs[0].chomp && !second.heredocs[0].expand);
    assert_eq!(second.heredocs[0].chomped_content(), "one\n");
    assert_eq!(second.heredocs[1].name, "Y");
    assert_eq!(second.heredocs[1].file_descriptor, Some(3));
    assert_eq!(second.heredocs[1].content, "two\n");
    assert_eq!((second.start_line, second.end_line), (4, 8));
    assert_eq!(third.heredocs[0].content, "content\n");
    assert_eq!(third.args, ["<<F", "/f"]);
}

#[test]
fn json_form_has_no_heredocs() {
    let ast = parse("RUN [\"<<EOF\"]\nFROM a\n").unwrap();
    assert!(ast.nodes[0].heredocs.is_empty());
    assert_eq!(ast.nodes.len(), 2);
}

#[test]
fn line_numbers_span_continuations() {
    let ast = parse("\n\n# c\nFROM a\n\nRUN x \\\n  y \\\n  z\nCMD w\n").unwrap();
    let spans: Vec<_> = ast.nodes.iter().map(|n| (n.start_line, n.end_line)).collect();
    assert_eq!(spans, [(4, 4), (6, 8), (9, 9)]);
    assert_eq!(ast.nodes[0].comments, ["c"]);
}

#[test]
fn errors_name_the_line() {
    check_error("", 1, "no instructions");
    check_error("# only\n# comments\n", 2, "no instructions");
    check_error("FROM a\nENV PATH\n", 2, "ENV must have two arguments");
    check_error("FROM a\nENV a=b c\n", 2, "can't find =");
    check_error("FROM a\nCMD [ \"echo\", [ \"nested\" ] ]\n", 2, "strings only");
    check_error("FROM a\nRUN <<EOF\nnever closed\n", 2, "unterminated heredoc");
    check_error("# escape=`\n# escape=\\\nFROM a\n", 2, "only one escape");
    check_error("# escape=x\nFROM a\n", 1, "invalid escape");
}

#[test]
fn unknown_instructions_parse_and_fail_later() {
    check("FORM busybox\n", "(form)\n");
}

#[test]
fn go_quoting() {
    assert_eq!(go_quote("a\"b\\c\n\t\u{7}\u{1b}é"), "\"a\\\"b\\\\c\\n\\t\\a\\x1bé\"");
}

#[test]
fn garbage_never_panics() {
    let pieces = [
        "RUN",
        "<<",
        "EOF",
        "\\",
        "`",
        "\n",
        "\"",
        "'",
        "[",
        "]",
        "--x=",
        "# escape=`",
        "ONBUILD",
        " ",
        "é",
        "\r",
        "-",
        "$",
        "{",
    ];
    let mut seed = 7u64;
    for _ in 0..2000 {
        let mut text = String::new();
        for _ in 0..(seed % 24) {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
        }
        let _ = parse(&text);
    }
}

#[test]
fn onbuild_nesting_is_bounded() {
    let nested = |n: usize| format!("FROM a\n{}RUN x\n", "ONBUILD ".repeat(n));
    assert!(parse(&nested(MAX_ONBUILD_NESTING)).is_ok());
    for n in [MAX_ONBUILD_NESTING + 1, 10_000] {
        let err = parse(&nested(n)).expect_err("too deep");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("ONBUILD nested more than"), "{err}");
    }
}
