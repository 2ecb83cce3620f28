//! Shell-lexer fuzz target.
//!
//! Input layout: byte 0 is a flags byte, the rest is UTF-8 text (other input is skipped)
//! whose first line is the word to expand and whose other lines are `KEY=VALUE`
//! environment entries (a line without `=` sets `KEY` to the empty string).
//!
//! The word is expanded with `process_word` and `process_words` under all 16 combinations
//! of `raw_quotes`, `raw_escapes`, `skip_unset_env` and `skip_process_quotes`, with both
//! escape characters (`\` and `` ` ``). The flags byte picks the environment's
//! representation (bit 0: `BTreeMap` instead of a `Vec` of pairs, where later entries win)
//! and whether `process_word_with_unmatched` runs too (bit 1). Errors are fine; panics are not.

#![no_main]

use std::collections::BTreeMap;

use kiln_dockerfile::shell::{Env, Lexer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (word, env_text) = text.split_once('\n').unwrap_or((text, ""));

    let pairs: Vec<(String, String)> = env_text
        .lines()
        .map(|line| {
            let (key, value) = line.split_once('=').unwrap_or((line, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect();
    let map: BTreeMap<String, String> = pairs.iter().cloned().collect();
    let env: &dyn Env = if flags & 1 != 0 { &map } else { &pairs };
    let with_unmatched = flags & 2 != 0;

    for escape in ['\\', '`'] {
        for combo in 0u8..16 {
            let lexer = Lexer::new(escape)
                .raw_quotes(combo & 1 != 0)
                .raw_escapes(combo & 2 != 0)
                .skip_unset_env(combo & 4 != 0)
                .skip_process_quotes(combo & 8 != 0);
            let _ = lexer.process_word(word, env);
            let _ = lexer.process_words(word, env);
            if with_unmatched {
                let _ = lexer.process_word_with_unmatched(word, env);
            }
        }
    }
});
