//! Bake-file fuzz target: the input's first line is a `--set` override, the rest a bake file
//! read as HCL, as JSON and as a compose file (with a fixed environment); whatever loads is
//! resolved for the `default` group and for each of its targets, with and without the
//! override, and printed. Errors are fine; panics are not.

#![no_main]

use kiln_bake::{BakeFile, Override, load, print, resolve};
use libfuzzer_sys::fuzz_target;

/// The environment the files see: a bool, a number and a string variable.
fn env(name: &str) -> Option<String> {
    match name {
        "DEBUG" => Some("true".into()),
        "COUNT" => Some("3".into()),
        "TAG" => Some("v1".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (first, rest) = text.split_once('\n').unwrap_or(("", text));
    let overrides: Vec<Override> = Override::parse(first).into_iter().collect();
    for name in ["docker-bake.hcl", "docker-bake.json", "compose.yaml"] {
        let files = [BakeFile { name: name.to_string(), text: rest.to_string() }];
        let Ok(definition) = load(&files, &env) else { continue };
        let mut requested: Vec<Vec<String>> = vec![Vec::new()];
        requested.extend(definition.targets.keys().take(8).map(|t| vec![t.clone()]));
        for asked in &requested {
            for set in [&[][..], &overrides[..]] {
                if let Ok(resolved) = resolve(&definition, asked, set) {
                    let _ = print(&definition, asked, &resolved).to_string();
                }
            }
        }
    }
});
