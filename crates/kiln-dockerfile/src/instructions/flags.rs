//! Builder flags (`--name=value`) with BuildKit's `BFlags` rules: known names only, string
//! flags need a value, bool flags take an optional `=true|false`, list flags may repeat.
//!
//! Errors are messages naming the flag; the instruction wraps them with the file and line.

use std::collections::BTreeMap;

/// How a flag takes values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagKind {
    Bool,
    String,
    List,
}

/// Parsed flags of one instruction.
#[derive(Debug, Default)]
pub(crate) struct Flags {
    values: BTreeMap<&'static str, Vec<String>>,
}

impl Flags {
    /// Parses `raw` (e.g. `--from=build`) against the allowed `spec`.
    pub(crate) fn parse(raw: &[String], spec: &[(&'static str, FlagKind)]) -> Result<Flags, String> {
        let mut flags = Flags::default();
        for arg in raw {
            let Some(body) = arg.strip_prefix("--") else {
                return Err(format!("arguments to the instruction must start with --, got {arg:?}"));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some(&(key, kind)) = spec.iter().find(|(n, _)| *n == name) else {
                return Err(format!("unknown flag: {name}"));
            };
            let value = match (kind, value) {
                (FlagKind::Bool, None) => "true".to_owned(),
                (FlagKind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                    "true" | "false" => v.to_ascii_lowercase(),
                    _ => return Err(format!("expecting boolean value for flag {name}, not: {v}")),
                },
                (_, None) => return Err(format!("missing a value on flag: {name}")),
                (_, Some(v)) => v.to_owned(),
            };
            let entry = flags.values.entry(key).or_default();
            if kind != FlagKind::List && !entry.is_empty() {
                return Err(format!("duplicate flag specified: {name}"));
            }
            entry.push(value);
        }
        Ok(flags)
    }

    /// The value of a string flag, if given.
    pub(crate) fn string(&self, name: &str) -> Option<String> {
        self.values.get(name).and_then(|v| v.first().cloned())
    }

    /// The value of a bool flag (false when absent).
    pub(crate) fn bool(&self, name: &str) -> bool {
        self.values.get(name).and_then(|v| v.first()).is_some_and(|v| v == "true")
    }

    /// Every value of a list flag, in order.
    pub(crate) fn list(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &[(&str, FlagKind)] =
        &[("from", FlagKind::String), ("link", FlagKind::Bool), ("exclude", FlagKind::List)];

    fn parse(raw: &[&str]) -> Result<Flags, String> {
        let raw: Vec<String> = raw.iter().map(|s| s.to_string()).collect();
        Flags::parse(&raw, SPEC)
    }

    #[test]
    fn accepts_known_flags() {
        let f = parse(&["--from=build", "--link", "--exclude=a", "--exclude=b"]).unwrap();
        assert_eq!(f.string("from").as_deref(), Some("build"));
        assert!(f.bool("link"));
        assert_eq!(f.list("exclude"), ["a", "b"]);
        assert!(!parse(&["--link=false"]).unwrap().bool("link"));
    }

    #[test]
    fn rejects_bad_flags() {
        assert_eq!(parse(&["--user=me"]).unwrap_err(), "unknown flag: user");
        assert_eq!(parse(&["--from"]).unwrap_err(), "missing a value on flag: from");
        assert_eq!(parse(&["--from=a", "--from=b"]).unwrap_err(), "duplicate flag specified: from");
        assert!(parse(&["--link=maybe"]).unwrap_err().contains("boolean"));
    }
}
