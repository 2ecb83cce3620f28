//! Compose files as bake reads them: each service with a `build` section is a target named
//! after it (`.` in a name becomes `_`), the `default` group lists them in file order, and
//! `build.x-bake` sets bake attributes compose lacks. Variables are interpolated from the
//! environment as compose does (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
//! `${VAR:?error}`, `${VAR?error}`, `$$`).

use std::path::Path;

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

use crate::{BakeError, BakeFile, Definition, Target};

/// Whether a file is a compose file (by its extension, as buildx tells).
pub(crate) fn is_compose(name: &str) -> bool {
    name.ends_with(".yml") || name.ends_with(".yaml")
}

/// Adds the compose file's services as targets (merged over earlier definitions of their
/// names) and the `default` group.
pub(crate) fn define(
    definition: &mut Definition,
    file: &BakeFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), BakeError> {
    let fail = |line: Option<usize>, message: String| BakeError { file: file.name.clone(), line, message };
    let documents =
        YamlLoader::load_from_str(&file.text).map_err(|e| fail(Some(e.marker().line()), e.info().to_string()))?;
    let Some(document) = documents.into_iter().next() else { return Ok(()) };
    let document = json_of(&document, env).map_err(|e| fail(None, e))?;
    let Some(services) = document.get("services") else { return Ok(()) };
    let services = services.as_object().ok_or_else(|| fail(None, "services: not a map".into()))?;
    let secrets = document.get("secrets").and_then(Value::as_object).cloned().unwrap_or_default();
    let dir = Path::new(&file.name).parent().filter(|d| !d.as_os_str().is_empty());
    let mut group = Vec::new();
    for (service, body) in services {
        let Some(build) = body.get("build").filter(|b| !b.is_null()) else { continue };
        let name = service.replace('.', "_");
        let fail = |message: String| fail(None, format!("services.{service}.build: {message}"));
        let mut target = target_of(build, body.get("image"), &secrets).map_err(fail)?;
        if let (Some(dir), Some(context)) = (dir, &target.context) {
            target.context = Some(dir.join(context).display().to_string());
        }
        if let Some(extension) = build.get("x-bake") {
            let extension = extension.as_object().ok_or_else(|| fail("x-bake: not a map".into()))?;
            for (key, value) in extension {
                target.set(key, value.clone()).map_err(|e| fail(format!("x-bake: {e}")))?;
            }
        }
        let merged = match definition.targets.remove(&name) {
            Some(earlier) => earlier.merged_with(&target),
            None => target,
        };
        definition.targets.insert(name.clone(), merged);
        group.push(name);
    }
    definition.groups.insert("default".to_string(), group);
    Ok(())
}

/// A service's `build` section (a context path, or a map) as a target.
fn target_of(build: &Value, image: Option<&Value>, secrets: &Map<String, Value>) -> Result<Target, String> {
    let mut target = Target::default();
    if let Value::String(context) = build {
        target.context = Some(context.clone());
        target.tags = image.and_then(Value::as_str).map(|i| vec![i.to_string()]).unwrap_or_default();
        return Ok(target);
    }
    let build = build.as_object().ok_or("not a context path or a map")?;
    let text = |key: &str, value: &Value| value.as_str().map(str::to_string).ok_or(format!("{key}: not a string"));
    for (key, value) in build {
        match key.as_str() {
            "context" => target.context = Some(text(key, value)?),
            "dockerfile" => target.dockerfile = Some(text(key, value)?),
            "dockerfile_inline" => target.dockerfile_inline = Some(text(key, value)?),
            "target" => target.target = Some(text(key, value)?),
            "args" => target.args = pairs(key, value)?,
            "labels" => target.labels = pairs(key, value)?,
            "tags" => target.tags = crate::target::strings(value)?,
            "cache_from" => target.cache_from = crate::target::strings(value)?,
            "cache_to" => target.cache_to = crate::target::strings(value)?,
            "platforms" => target.platforms = crate::target::strings(value)?,
            "no_cache" => target.no_cache = Some(value.as_bool().ok_or("no_cache: not true or false")?),
            "pull" => target.pull = Some(value.as_bool().ok_or("pull: not true or false")?),
            "additional_contexts" => {
                target.contexts = pairs(key, value)?
                    .into_iter()
                    .filter_map(|(name, source)| {
                        let source = source?;
                        // A service's image is that service's target.
                        let source = match source.strip_prefix("service:") {
                            Some(service) => format!("target:{}", service.replace('.', "_")),
                            None => source,
                        };
                        Some((name, source))
                    })
                    .collect();
            }
            "secrets" => target.secret = service_secrets(value, secrets)?,
            // Settings of the step sandbox that Kiln decides itself (docs/bake.md).
            "network" | "shm_size" | "isolation" | "x-bake" => {}
            other => return Err(format!("{other}: not supported by Kiln (docs/bake.md)")),
        }
    }
    if target.tags.is_empty()
        && let Some(image) = image.and_then(Value::as_str)
    {
        target.tags = vec![image.to_string()];
    }
    Ok(target)
}

/// A map, or a list of `KEY=VALUE` (a bare `KEY`: unset), as compose takes both.
fn pairs(key: &str, value: &Value) -> Result<std::collections::BTreeMap<String, Option<String>>, String> {
    match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| match v {
                Value::Null => Ok((k.clone(), None)),
                Value::String(s) => Ok((k.clone(), Some(s.clone()))),
                Value::Number(n) => Ok((k.clone(), Some(n.to_string()))),
                Value::Bool(b) => Ok((k.clone(), Some(b.to_string()))),
                _ => Err(format!("{key}.{k}: not a string")),
            })
            .collect(),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let item = item.as_str().ok_or(format!("{key}: not a list of KEY=VALUE"))?;
                Ok(match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (item.to_string(), None),
                })
            })
            .collect(),
        _ => Err(format!("{key}: not a map or a list")),
    }
}

/// A service's `build.secrets` (ids, or `{source, target}`) as bake secret specs, from the
/// file's top-level `secrets` (`file:` or `environment:`).
fn service_secrets(value: &Value, secrets: &Map<String, Value>) -> Result<Vec<String>, String> {
    let items = value.as_array().ok_or("secrets: not a list")?;
    let mut specs = Vec::new();
    for item in items {
        let (source, id) = match item {
            Value::String(source) => (source.as_str(), source.as_str()),
            Value::Object(long) => {
                let source = long.get("source").and_then(Value::as_str).ok_or("secrets: an entry without source")?;
                (source, long.get("target").and_then(Value::as_str).unwrap_or(source))
            }
            _ => return Err("secrets: not a list of names".into()),
        };
        let defined = secrets.get(source).ok_or(format!("secrets: {source:?} is not in the top-level secrets"))?;
        let spec =
            match (defined.get("file").and_then(Value::as_str), defined.get("environment").and_then(Value::as_str)) {
                (Some(file), _) => format!("id={id},src={file}"),
                (None, Some(var)) => format!("id={id},env={var}"),
                (None, None) => return Err(format!("secrets: {source:?} has neither file nor environment")),
            };
        specs.push(spec);
    }
    Ok(specs)
}

/// A YAML node as JSON, its strings interpolated.
fn json_of(node: &Yaml, env: &dyn Fn(&str) -> Option<String>) -> Result<Value, String> {
    Ok(match node {
        Yaml::String(text) => Value::String(interpolate(text, env)?),
        Yaml::Integer(n) => Value::from(*n),
        Yaml::Real(text) => text.parse::<f64>().ok().map(Value::from).unwrap_or_else(|| Value::String(text.clone())),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Null => Value::Null,
        Yaml::Array(items) => Value::Array(items.iter().map(|i| json_of(i, env)).collect::<Result<_, _>>()?),
        Yaml::Hash(map) => {
            let mut object = Map::new();
            for (key, value) in map {
                let key = match key {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(n) => n.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("a map key that is not a string: {other:?}")),
                };
                object.insert(key, json_of(value, env)?);
            }
            Value::Object(object)
        }
        Yaml::Alias(_) | Yaml::BadValue => return Err("an alias or a malformed value".into()),
    })
}

/// Compose's variable interpolation.
pub(crate) fn interpolate(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').ok_or_else(|| format!("{text:?}: unclosed ${{"))?;
            out.push_str(&substitute(&braced[..end], env)?);
            rest = &braced[end + 1..];
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            if end == 0 {
                out.push('$');
            } else {
                out.push_str(&env(&rest[..end]).unwrap_or_default());
            }
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// `${...}`'s inside: `VAR`, with `:-`/`-` defaults or `:?`/`?` errors.
fn substitute(inner: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let end = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
    let (name, operator) = inner.split_at(end);
    if name.is_empty() {
        return Err(format!("${{{inner}}}: no variable name"));
    }
    let value = env(name);
    let (empty_too, op, word) = match operator {
        "" => return Ok(value.unwrap_or_default()),
        _ if operator.starts_with(":-") || operator.starts_with(":?") => (true, &operator[1..2], &operator[2..]),
        _ if operator.starts_with('-') || operator.starts_with('?') => (false, &operator[..1], &operator[1..]),
        _ => return Err(format!("${{{inner}}}: unknown operator")),
    };
    let unset = value.as_deref().is_none_or(|v| empty_too && v.is_empty());
    match (unset, op) {
        (false, _) => Ok(value.unwrap_or_default()),
        (true, "-") => Ok(word.to_string()),
        (true, _) => Err(format!("{name}: {}", if word.is_empty() { "required" } else { word })),
    }
}
