//! Whole-front-end fuzz target: a Dockerfile goes through the raw parser (and the AST
//! dump), the instruction parser and the converter, for the build platform alone and for
//! two target platforms. A prefix of the same input is also read as a `.dockerignore`
//! whose patterns filter the in-memory build context. Errors are fine; panics are not.

#![no_main]

use std::collections::BTreeMap;

use kiln_dockerfile::context::MemoryContext;
use kiln_dockerfile::ignore::{glob_match, PatternList};
use kiln_dockerfile::image::NoImageMetadata;
use kiln_dockerfile::{convert, instructions, parser, ConvertOptions};
use kiln_types::Platform;
use libfuzzer_sys::fuzz_target;

/// How much of the input, at most, is also read as a `.dockerignore`.
const IGNORE_PREFIX: usize = 256;

/// The files of the in-memory build context.
const FILES: &[(&str, &str)] = &[
    ("a.txt", "x"),
    ("src/main.rs", "fn main() {}\n"),
    ("docs/guide/readme.md", "# guide\n"),
    (".dockerignore", "*.tmp\n"),
];

/// The longest prefix of `text` of at most `max` bytes that ends on a char boundary.
fn prefix(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    // Raw parser, and the BuildKit-style dump of whatever it accepts.
    if let Ok(ast) = parser::parse(text) {
        let _ = parser::dump_ast(&ast);
    }
    // Typed instructions and stages.
    let _ = instructions::parse_dockerfile(text);

    // A slice of the input as a .dockerignore; also exercise the glob matcher and the
    // walker helpers with its lines.
    let ignore_text = prefix(text, IGNORE_PREFIX);
    let ignore = PatternList::parse_ignore_file(ignore_text).unwrap_or_default();
    for line in ignore_text.lines().take(8) {
        for (name, _) in FILES {
            let _ = glob_match(line, name);
        }
    }
    for path in ["a.txt", "src", "src/main.rs", "docs/guide", "docs/guide/readme.md", ""] {
        let _ = ignore.is_excluded(path);
        let _ = ignore.must_descend(path);
    }
    let context = MemoryContext::new(FILES, &ignore);

    let images = NoImageMetadata;
    let platform_sets = [vec![], vec![Platform::new("linux", "amd64", None), Platform::new("linux", "arm64", None)]];
    for platforms in platform_sets {
        let options = ConvertOptions {
            file_name: "Dockerfile".to_owned(),
            target: None,
            build_args: BTreeMap::new(),
            platforms,
            build_platform: Platform::host(),
            context: &context,
            images: &images,
            named: &Default::default(),
        };
        let _ = convert(text, &options);
    }
});
