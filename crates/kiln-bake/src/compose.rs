//! Compose files as bake reads them: each service with a `build` section is a target named
//! after it (`.` in a name becomes `_`), the `default` group lists them (by name), and
//! `build.x-bake` sets bake attributes compose lacks. Variables are interpolated from the
//! environment as compose does (`$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
//! `${VAR:?error}`, `${VAR?error}`, `$$`).

use std::path::Path;

use serde_json::{Map, Value};
use yaml_rust2::Yaml;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

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
    let Some(document) = read_yaml(&file.text, env).map_err(|(line, e)| fail(line, e))? else { return Ok(()) };
    let Some(services) = document.get("services") else { return Ok(()) };
    let services = services.as_object().ok_or_else(|| fail(None, "services: not a map".into()))?;
    let secrets = document.get("secrets").and_then(Value::as_object).cloned().unwrap_or_default();
    // Paths in a compose file are relative to its directory.
    let dir = Path::new(&file.name).parent().filter(|d| !d.as_os_str().is_empty());
    let relative = |path: &str| match dir {
        Some(dir) if !Path::new(path).is_absolute() => dir.join(path).display().to_string(),
        _ => path.to_string(),
    };
    let mut group = definition.groups.remove("default").unwrap_or_default();
    for (service, body) in services {
        let Some(build) = body.get("build").filter(|b| !b.is_null()) else { continue };
        let name = service.replace('.', "_");
        let fail = |message: String| fail(None, format!("services.{service}.build: {message}"));
        let mut target = target_of(build, body.get("image"), &secrets, &relative).map_err(fail)?;
        target.context = Some(relative(target.context.as_deref().unwrap_or(".")));
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
        if !group.contains(&name) {
            group.push(name);
        }
    }
    definition.groups.insert("default".to_string(), group);
    Ok(())
}

/// A service's `build` section (a context path, or a map) as a target.
fn target_of(
    build: &Value,
    image: Option<&Value>,
    secrets: &Map<String, Value>,
    relative: &dyn Fn(&str) -> String,
) -> Result<Target, String> {
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
                        // A service's image is that service's target; a directory is relative
                        // to the compose file.
                        let source = match source.strip_prefix("service:") {
                            Some(service) => format!("target:{}", service.replace('.', "_")),
                            None if source.contains("://") || source.starts_with("target:") => source,
                            None => relative(&source),
                        };
                        Some((name, source))
                    })
                    .collect();
            }
            "secrets" => target.secret = service_secrets(value, secrets, relative)?,
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
fn service_secrets(
    value: &Value,
    secrets: &Map<String, Value>,
    relative: &dyn Fn(&str) -> String,
) -> Result<Vec<String>, String> {
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
                (Some(file), _) => format!("id={id},src={}", relative(file)),
                (None, Some(var)) => format!("id={id},env={var}"),
                (None, None) => return Err(format!("secrets: {source:?} has neither file nor environment")),
            };
        specs.push(spec);
    }
    Ok(specs)
}

/// The deepest nesting of a compose file's collections.
const MAX_DEPTH: usize = 64;

/// The most values a compose file may have.
const MAX_NODES: usize = 1 << 20;

/// The first document of a YAML text as JSON, its strings interpolated. Built from the
/// parser's events: aliases are refused (expanding them is how a few lines of YAML grow
/// into gigabytes), and nesting and size are bounded. The error has the line when known.
fn read_yaml(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Value>, (Option<usize>, String)> {
    let mut builder = Builder { env, stack: Vec::new(), done: None, error: None, nodes: 0, documents: 0 };
    Parser::new_from_str(text)
        .load(&mut builder, false)
        .map_err(|e| (Some(e.marker().line()), e.info().to_string()))?;
    match builder.error {
        Some(error) => Err(error),
        None => Ok(builder.done),
    }
}

/// Builds JSON from YAML events.
struct Builder<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    /// Open collections: an array, or an object with the key waiting for its value.
    stack: Vec<(Value, Option<String>)>,
    done: Option<Value>,
    error: Option<(Option<usize>, String)>,
    nodes: usize,
    documents: usize,
}

impl Builder<'_> {
    fn value(&mut self, value: Value) -> Result<(), String> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(format!("more than {MAX_NODES} values"));
        }
        let Some((parent, key)) = self.stack.last_mut() else {
            self.done = Some(value);
            return Ok(());
        };
        match (parent, key.take()) {
            (Value::Object(map), Some(key)) => drop(map.insert(key, value)),
            (Value::Object(_), None) => {
                *key = Some(match value {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err("a map key that is not a string".into()),
                });
            }
            (parent, _) => {
                if let Value::Array(items) = parent {
                    items.push(value);
                }
            }
        }
        Ok(())
    }

    fn open(&mut self, collection: Value) -> Result<(), String> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH} levels"));
        }
        self.stack.push((collection, None));
        Ok(())
    }

    fn event(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::DocumentStart => self.documents += 1,
            // Only the first document is read.
            _ if self.documents > 1 => {}
            Event::Alias(_) => return Err("YAML aliases are not supported".into()),
            Event::Scalar(text, style, _, _) => {
                let value = match style {
                    TScalarStyle::Plain => match Yaml::from_str(&text) {
                        Yaml::Integer(n) => Value::from(n),
                        Yaml::Real(real) => real.parse::<f64>().map_or(Value::String(real), Value::from),
                        Yaml::Boolean(b) => Value::Bool(b),
                        Yaml::Null => Value::Null,
                        _ => Value::String(interpolate(&text, self.env)?),
                    },
                    _ => Value::String(interpolate(&text, self.env)?),
                };
                self.value(value)?;
            }
            Event::SequenceStart(..) => self.open(Value::Array(Vec::new()))?,
            Event::MappingStart(..) => self.open(Value::Object(Map::new()))?,
            Event::SequenceEnd | Event::MappingEnd => {
                let (collection, _) = self.stack.pop().ok_or("unbalanced YAML")?;
                self.value(collection)?;
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_none()
            && let Err(error) = self.event(event)
        {
            self.error = Some((Some(mark.line()), error));
        }
    }
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
