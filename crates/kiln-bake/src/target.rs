//! A bake target: its fields as buildx names them, how a later definition merges over an
//! earlier one (and a target over what it inherits), and how `--print` shows it.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// One target's settings (`None` or empty: not set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// `context`.
    pub context: Option<String>,
    /// `contexts`: name → `target:NAME`, `docker-image://REF`, a path or a URL.
    pub contexts: BTreeMap<String, String>,
    /// `dockerfile`.
    pub dockerfile: Option<String>,
    /// `dockerfile-inline`.
    pub dockerfile_inline: Option<String>,
    /// `args` (`None`: unset, taken from the environment by buildx).
    pub args: BTreeMap<String, Option<String>>,
    /// `labels`.
    pub labels: BTreeMap<String, Option<String>>,
    /// `tags`.
    pub tags: Vec<String>,
    /// `cache-from`.
    pub cache_from: Vec<String>,
    /// `cache-to`.
    pub cache_to: Vec<String>,
    /// `target` (the stage).
    pub target: Option<String>,
    /// `secret`.
    pub secret: Vec<String>,
    /// `platforms`.
    pub platforms: Vec<String>,
    /// `output`.
    pub output: Vec<String>,
    /// `pull`.
    pub pull: Option<bool>,
    /// `no-cache`.
    pub no_cache: Option<bool>,
    /// `inherits`, in order.
    pub inherits: Vec<String>,
}

impl Target {
    /// Sets the attribute `key` from its value.
    pub fn set(&mut self, key: &str, value: Value) -> Result<(), String> {
        let named = |e: String| format!("{key}: {e}");
        match key {
            "context" => self.context = Some(string(&value).map_err(named)?),
            "dockerfile" => self.dockerfile = Some(string(&value).map_err(named)?),
            "dockerfile-inline" => self.dockerfile_inline = Some(string(&value).map_err(named)?),
            "target" => self.target = Some(string(&value).map_err(named)?),
            "contexts" => {
                self.contexts =
                    optional_map(&value).map_err(named)?.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
            }
            "args" => self.args = optional_map(&value).map_err(named)?,
            "labels" => self.labels = optional_map(&value).map_err(named)?,
            "tags" => self.tags = strings(&value).map_err(named)?,
            "cache-from" => self.cache_from = strings(&value).map_err(named)?,
            "cache-to" => self.cache_to = strings(&value).map_err(named)?,
            "secret" => self.secret = strings(&value).map_err(named)?,
            "platforms" => self.platforms = strings(&value).map_err(named)?,
            "output" => self.output = strings(&value).map_err(named)?,
            "inherits" => self.inherits = strings(&value).map_err(named)?,
            "pull" => self.pull = Some(boolean(&value).map_err(named)?),
            "no-cache" => self.no_cache = Some(boolean(&value).map_err(named)?),
            other => return Err(format!("unknown attribute {other:?}")),
        }
        Ok(())
    }

    /// `later` over this target, as buildx merges: single values and lists that replace
    /// (tags, platforms, outputs, cache-to) taken from `later` when it sets them; maps merged
    /// key by key; `cache-from` and `secret` appended without repeats.
    pub fn merged_with(&self, later: &Target) -> Target {
        let replace =
            |ours: &Vec<String>, theirs: &Vec<String>| if theirs.is_empty() { ours.clone() } else { theirs.clone() };
        let append = |ours: &Vec<String>, theirs: &Vec<String>| {
            let mut all = ours.clone();
            for item in theirs {
                if !all.contains(item) {
                    all.push(item.clone());
                }
            }
            all
        };
        let mut args = self.args.clone();
        args.extend(later.args.iter().filter(|(_, v)| v.is_some()).map(|(k, v)| (k.clone(), v.clone())));
        let mut labels = self.labels.clone();
        labels.extend(later.labels.iter().filter(|(_, v)| v.is_some()).map(|(k, v)| (k.clone(), v.clone())));
        let mut contexts = self.contexts.clone();
        contexts.extend(later.contexts.clone());
        Target {
            context: later.context.clone().or_else(|| self.context.clone()),
            contexts,
            dockerfile: later.dockerfile.clone().or_else(|| self.dockerfile.clone()),
            dockerfile_inline: later.dockerfile_inline.clone().or_else(|| self.dockerfile_inline.clone()),
            args,
            labels,
            tags: replace(&self.tags, &later.tags),
            cache_from: append(&self.cache_from, &later.cache_from),
            cache_to: replace(&self.cache_to, &later.cache_to),
            target: later.target.clone().or_else(|| self.target.clone()),
            secret: append(&self.secret, &later.secret),
            platforms: replace(&self.platforms, &later.platforms),
            output: replace(&self.output, &later.output),
            pull: later.pull.or(self.pull),
            no_cache: later.no_cache.or(self.no_cache),
            inherits: replace(&self.inherits, &later.inherits),
        }
    }

    /// The targets its `target:NAME` contexts name.
    pub fn linked_targets(&self) -> Vec<&str> {
        self.contexts.values().filter_map(|source| source.strip_prefix("target:")).collect()
    }

    /// buildx's defaults: the context `.`, the Dockerfile `Dockerfile`.
    pub fn fill_defaults(&mut self) {
        self.context.get_or_insert_with(|| ".".to_string());
        if self.dockerfile_inline.is_none() {
            self.dockerfile.get_or_insert_with(|| "Dockerfile".to_string());
        }
    }

    /// The target as `--print` shows it (buildx's field names; unset fields left out).
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        let mut put = |key: &str, value: Value| {
            let empty = match &value {
                Value::Null => true,
                Value::Array(items) => items.is_empty(),
                Value::Object(map) => map.is_empty(),
                _ => false,
            };
            if !empty {
                out.insert(key.to_string(), value);
            }
        };
        put("context", json!(self.context));
        put("contexts", json!(self.contexts));
        put("dockerfile", json!(self.dockerfile));
        put("dockerfile-inline", json!(self.dockerfile_inline));
        let args: BTreeMap<&String, &String> =
            self.args.iter().filter_map(|(k, v)| v.as_ref().map(|v| (k, v))).collect();
        put("args", json!(args));
        let labels: BTreeMap<&String, &String> =
            self.labels.iter().filter_map(|(k, v)| v.as_ref().map(|v| (k, v))).collect();
        put("labels", json!(labels));
        put("tags", json!(self.tags));
        put("cache-from", Value::Array(self.cache_from.iter().map(|s| spec_object(s, "registry", "ref")).collect()));
        put("cache-to", Value::Array(self.cache_to.iter().map(|s| spec_object(s, "registry", "ref")).collect()));
        put("target", json!(self.target));
        put("secret", Value::Array(self.secret.iter().map(|s| spec_object(s, "file", "src")).collect()));
        put("platforms", json!(self.platforms));
        put("output", Value::Array(self.output.iter().map(|s| spec_object(s, "local", "dest")).collect()));
        put("pull", json!(self.pull));
        put("no-cache", json!(self.no_cache));
        Value::Object(out)
    }
}

/// A `type=...,key=value` spec as buildx prints it: a flat object; a bare value is `kind`'s
/// `key` (a cache reference, an output directory).
fn spec_object(spec: &str, kind: &str, key: &str) -> Value {
    if !spec.contains('=') {
        return json!({"type": kind, key: spec});
    }
    let fields: Map<String, Value> = spec
        .split(',')
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), Value::String(v.trim().to_string())))
        .collect();
    Value::Object(fields)
}

fn string(value: &Value) -> Result<String, String> {
    crate::eval::text_of(value)
}

fn boolean(value: &Value) -> Result<bool, String> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => s.parse().map_err(|_| format!("{s:?} is not true or false")),
        other => Err(format!("{other} is not true or false")),
    }
}

/// A list of strings.
pub fn strings(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Array(items) => items.iter().map(string).collect(),
        Value::Null => Ok(Vec::new()),
        other => Err(format!("{other} is not a list")),
    }
}

/// A map of strings whose values may be null.
fn optional_map(value: &Value) -> Result<BTreeMap<String, Option<String>>, String> {
    match value {
        Value::Object(map) => {
            map.iter().map(|(k, v)| Ok((k.clone(), if v.is_null() { None } else { Some(string(v)?) }))).collect()
        }
        Value::Null => Ok(BTreeMap::new()),
        other => Err(format!("{other} is not a map")),
    }
}
