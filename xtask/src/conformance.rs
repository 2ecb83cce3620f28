//! The BuildKit Dockerfile conformance corpus: parser dumps, parser failures, variable
//! expansion and word splitting, each counted per part.

use std::fs;
use std::path::Path;

use anyhow::Context as _;
use kiln_dockerfile::parser::{dump_ast, parse};
use kiln_dockerfile::shell::Lexer;

/// Pass and fail counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Totals {
    fn record(&mut self, ok: bool, part: &str, case: &str, detail: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            eprintln!("FAIL {part}: {case}: {}", detail());
        }
    }

    fn add(&mut self, other: Totals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.skipped += other.skipped;
    }
}

/// One part of the corpus: a folder or file checked by one function.
type Part = fn(&Path) -> anyhow::Result<Totals>;

/// Runs every part and prints `N passed, M failed` last.
pub fn run(corpus: &Path) -> anyhow::Result<Totals> {
    let mut total = Totals::default();
    let parts: [(&str, Part); 4] = [
        ("parser-cases", parser_cases),
        ("parser-negative", parser_negative),
        ("shell-envVarTest", env_var_test),
        ("shell-wordsTest", words_test),
    ];
    for (name, part) in parts {
        let t = part(&corpus.join(name)).with_context(|| format!("reading {name} in {}", corpus.display()))?;
        let skipped = if t.skipped > 0 { format!(" ({} Windows-only skipped)", t.skipped) } else { String::new() };
        println!("{name}: {} passed, {} failed{skipped}", t.passed, t.failed);
        total.add(t);
    }
    let skipped = if total.skipped > 0 { format!(" ({} skipped: Windows-only)", total.skipped) } else { String::new() };
    println!("{} passed, {} failed{skipped}", total.passed, total.failed);
    Ok(total)
}

fn case_dirs(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut dirs: Vec<_> = fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    dirs.retain(|d| d.is_dir());
    dirs.sort();
    Ok(dirs)
}

fn name_of(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn parser_cases(dir: &Path) -> anyhow::Result<Totals> {
    let mut t = Totals::default();
    for case in case_dirs(dir)? {
        let text = fs::read_to_string(case.join("Dockerfile"))?;
        let expected = fs::read_to_string(case.join("result"))?;
        let got = parse(&text).map(|ast| dump_ast(&ast));
        let ok = got.as_deref().ok() == Some(expected.as_str());
        t.record(ok, "parser-cases", &name_of(&case), || format!("expected\n{expected}got\n{got:?}"));
    }
    Ok(t)
}

fn parser_negative(dir: &Path) -> anyhow::Result<Totals> {
    let mut t = Totals::default();
    for case in case_dirs(dir)? {
        let text = fs::read_to_string(case.join("Dockerfile"))?;
        let got = parse(&text);
        t.record(got.is_err(), "parser-negative", &name_of(&case), || format!("parsed without error: {got:?}"));
    }
    Ok(t)
}

fn env_var_test(file: &Path) -> anyhow::Result<Totals> {
    let env: Vec<(String, String)> = [("PWD", "/home"), ("SHELL", "bash"), ("KOREAN", "한국어"), ("NULL", "")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let lexer = Lexer::new('\\');
    let mut t = Totals::default();
    for line in fs::read_to_string(file)?.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('|').collect();
        let [platform, input, expected] = fields.as_slice() else {
            t.record(false, "shell-envVarTest", line, || "malformed line".into());
            continue;
        };
        if platform.trim() == "W" {
            t.skipped += 1;
            continue;
        }
        let (input, expected) = (input.trim(), expected.trim());
        let got = lexer.process_word(input, &env);
        let ok = match &got {
            Ok(word) => expected != "error" && word == expected,
            Err(_) => expected == "error",
        };
        t.record(ok, "shell-envVarTest", input, || format!("expected {expected:?}, got {got:?}"));
    }
    Ok(t)
}

fn words_test(file: &Path) -> anyhow::Result<Totals> {
    let lexer = Lexer::new('\\');
    let mut env: Vec<(String, String)> = Vec::new();
    let mut t = Totals::default();
    for line in fs::read_to_string(file)?.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(assignment) = line.strip_prefix("ENV ") {
            let (k, v) = assignment.split_once('=').unwrap_or((assignment, ""));
            env.push((k.to_owned(), v.to_owned()));
            continue;
        }
        let Some((input, expected)) = line.split_once('|') else {
            t.record(false, "shell-wordsTest", line, || "malformed line".into());
            continue;
        };
        let input = input.trim();
        let expected: Vec<&str> = expected.trim_start().split(',').collect();
        let got = lexer.process_words(input, &env);
        let ok = match &got {
            Ok(words) => expected != ["error"] && *words == expected,
            Err(_) => expected == ["error"],
        };
        t.record(ok, "shell-wordsTest", input, || format!("expected {expected:?}, got {got:?}"));
    }
    Ok(t)
}
