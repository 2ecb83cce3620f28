//! `--set PATTERN.KEY[.NAME][+]=VALUE`: overrides applied to the targets whose names match
//! the pattern (`*`, `?` wildcards), after what they inherit and before the defaults, as
//! buildx applies them.

use regex::Regex;

use crate::Target;

/// One `--set`.
#[derive(Debug, Clone)]
pub struct Override {
    /// The target name pattern.
    pattern: Regex,
    /// The attribute (`tags`, `args`, ...; buildx's `platform` and `secrets` spellings too).
    key: String,
    /// The map key of `args.NAME`, `labels.NAME` and `contexts.NAME`.
    name: Option<String>,
    /// `+=`: appends to a list instead of replacing it.
    append: bool,
    value: String,
    /// As given, for errors.
    text: String,
}

/// Attributes whose value is a list: several `--set` of one build up the list.
const LISTS: [&str; 6] = ["tags", "cache-from", "cache-to", "output", "secret", "platforms"];

impl Override {
    /// Parses `PATTERN.KEY[.NAME][+]=VALUE`.
    pub fn parse(text: &str) -> Result<Override, String> {
        let fail = |why: &str| format!("--set {text}: {why}");
        let (left, value) = text.split_once('=').ok_or_else(|| fail("expected PATTERN.KEY=VALUE"))?;
        let (left, append) = match left.strip_suffix('+') {
            Some(left) => (left, true),
            None => (left, false),
        };
        let mut parts = left.splitn(3, '.');
        let (pattern, key) = match (parts.next(), parts.next()) {
            (Some(pattern), Some(key)) if !pattern.is_empty() && !key.is_empty() => (pattern, key),
            _ => return Err(fail("expected PATTERN.KEY=VALUE")),
        };
        let name = parts.next().map(str::to_string);
        let key = match key {
            "platform" => "platforms",
            "secrets" => "secret",
            "no_cache" => "no-cache",
            other => other,
        };
        let maps = ["args", "labels", "contexts"];
        match (maps.contains(&key), &name) {
            (true, None) => return Err(fail(&format!("{key} needs a name: {pattern}.{key}.NAME=VALUE"))),
            (false, Some(_)) => return Err(fail(&format!("{key} takes no name"))),
            _ => {}
        }
        let known = ["context", "dockerfile", "dockerfile-inline", "target", "pull", "no-cache"];
        if !maps.contains(&key) && !LISTS.contains(&key) && !known.contains(&key) {
            return Err(fail(&format!("unknown attribute {key:?}")));
        }
        if append && !LISTS.contains(&key) {
            return Err(fail(&format!("+= appends to lists; {key} is not one")));
        }
        let glob = pattern.chars().fold(String::from("^"), |mut re, c| {
            match c {
                '*' => re.push_str(".*"),
                '?' => re.push('.'),
                other => re.push_str(&regex::escape(&other.to_string())),
            }
            re
        });
        let pattern = Regex::new(&format!("{glob}$")).map_err(|e| fail(&e.to_string()))?;
        Ok(Override { pattern, key: key.to_string(), name, append, value: value.to_string(), text: text.to_string() })
    }

    /// Whether it applies to the target `name`.
    pub fn matches(&self, name: &str) -> bool {
        self.pattern.is_match(name)
    }
}

/// Applies the overrides that match `name`, in order. A list attribute set by `--set`
/// (without `+`) is replaced by the values of the `--set`s of it; `+=` adds to the list.
pub fn apply(target: &mut Target, name: &str, overrides: &[Override]) -> Result<(), String> {
    let mut replaced: Vec<String> = Vec::new();
    for o in overrides.iter().filter(|o| o.matches(name)) {
        let fail = |why: String| format!("--set {}: {why}", o.text);
        let boolean = || o.value.parse::<bool>().map_err(|_| fail(format!("{:?} is not true or false", o.value)));
        match o.key.as_str() {
            "context" => target.context = Some(o.value.clone()),
            "dockerfile" => target.dockerfile = Some(o.value.clone()),
            "dockerfile-inline" => target.dockerfile_inline = Some(o.value.clone()),
            "target" => target.target = Some(o.value.clone()),
            "pull" => target.pull = Some(boolean()?),
            "no-cache" => target.no_cache = Some(boolean()?),
            "args" | "labels" | "contexts" => {
                let key = o.name.clone().unwrap_or_default();
                match o.key.as_str() {
                    "args" => drop(target.args.insert(key, Some(o.value.clone()))),
                    "labels" => drop(target.labels.insert(key, Some(o.value.clone()))),
                    _ => drop(target.contexts.insert(key, o.value.clone())),
                }
            }
            list => {
                let values: Vec<String> = if list == "platforms" {
                    o.value.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()
                } else {
                    vec![o.value.clone()]
                };
                let items = match list {
                    "tags" => &mut target.tags,
                    "cache-from" => &mut target.cache_from,
                    "cache-to" => &mut target.cache_to,
                    "output" => &mut target.output,
                    "secret" => &mut target.secret,
                    _ => &mut target.platforms,
                };
                if !o.append && !replaced.iter().any(|r| r == list) {
                    items.clear();
                    replaced.push(list.to_string());
                }
                items.extend(values);
            }
        }
    }
    Ok(())
}
