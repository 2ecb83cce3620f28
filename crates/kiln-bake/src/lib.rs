//! Bake files as `docker buildx bake` reads them: HCL files (parsed by hcl-rs, evaluated by
//! [`eval`] with bake's functions) of `variable`, `target` and `group` blocks, resolved into
//! targets (`inherits` merged as buildx merges them) and printed in buildx's `--print` shape.
//! Pure: the caller reads the files and the environment.

mod compose;
mod dates;
mod eval;
mod functions;
mod nesting;
mod overrides;
mod syntax;
mod target;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use syntax::Kind;

pub use overrides::Override;
pub use target::Target;

/// A bake file's name (for errors) and text.
#[derive(Debug, Clone)]
pub struct BakeFile {
    /// Its name as given (`docker-bake.hcl`).
    pub name: String,
    /// Its text.
    pub text: String,
}

/// Why bake files could not be read: the file and line, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct BakeError {
    /// The file.
    pub file: String,
    /// The line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// The groups and targets of bake files, evaluated (not yet merged with what they inherit).
#[derive(Debug, Clone, Default)]
pub struct Definition {
    /// Groups: their targets (or groups), in order.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Targets as written (blocks of one name across files merged, later over earlier).
    pub targets: BTreeMap<String, Target>,
}

/// Reads bake files, later files over earlier ones. `env` gives environment variables: a
/// variable's value comes from the variable of its name when set.
pub fn load(files: &[BakeFile], env: &dyn Fn(&str) -> Option<String>) -> Result<Definition, BakeError> {
    let mut parsed = Vec::new();
    let mut scope = eval::Scope::default();
    // Variables and functions first, from every file: a target may use one a later file
    // defines.
    for file in files {
        let items = if compose::is_compose(&file.name) { Vec::new() } else { syntax::parse(file)? };
        for item in &items {
            let fail = |message: String| BakeError { file: file.name.clone(), line: item.line, message };
            match &item.kind {
                Kind::Attribute { key, expr } => scope.declare(key, eval::Source::Expr(expr.clone())),
                Kind::Block { ident, labels, body } if ident == "function" => {
                    let name = single_label(ident, labels).map_err(fail)?;
                    let function = function_of(body).map_err(|e| fail(format!("function {name:?}: {e}")))?;
                    scope.declare_function(&name, function);
                }
                Kind::Block { ident, labels, body } if ident == "variable" => {
                    let name = single_label(ident, labels).map_err(fail)?;
                    let mut default = None;
                    for inner in body {
                        match &inner.kind {
                            Kind::Attribute { key, expr } if key == "default" => default = Some(expr.clone()),
                            Kind::Attribute { key, .. } if key == "description" => {}
                            _ => {
                                let message = format!("variable {name:?}: only default and description are supported");
                                return Err(BakeError { file: file.name.clone(), line: inner.line, message });
                            }
                        }
                    }
                    let source = match env(&name) {
                        Some(text) => eval::Source::Env(text, default),
                        None => eval::Source::Expr(default.unwrap_or(hcl::Expression::String(String::new()))),
                    };
                    scope.declare(&name, source);
                }
                _ => {}
            }
        }
        parsed.push((file, items));
    }
    let mut definition = Definition::default();
    for (file, items) in &parsed {
        if compose::is_compose(&file.name) {
            compose::define(&mut definition, file, env)?;
            continue;
        }
        for item in items {
            let Kind::Block { ident, labels, body } = &item.kind else { continue };
            let fail = |message: String| BakeError { file: file.name.clone(), line: item.line, message };
            match ident.as_str() {
                "variable" | "function" => {}
                "group" => {
                    let name = single_label(ident, labels).map_err(fail)?;
                    let mut targets = Vec::new();
                    for inner in body {
                        let fail = |message: String| BakeError { file: file.name.clone(), line: inner.line, message };
                        match &inner.kind {
                            Kind::Attribute { key, expr } if key == "targets" => {
                                let value = scope
                                    .eval(expr, &eval::Locals::default())
                                    .and_then(|value| target::strings(&value))
                                    .map_err(|e| fail(format!("group {name:?}: targets: {e}")))?;
                                targets = value;
                            }
                            Kind::Attribute { key, .. } if key == "description" => {}
                            Kind::Attribute { key, .. } => {
                                return Err(fail(format!("group {name:?}: unknown attribute {key:?}")));
                            }
                            Kind::Block { ident, .. } => {
                                return Err(fail(format!("group {name:?}: unexpected block {ident:?}")));
                            }
                        }
                    }
                    definition.groups.insert(name, targets);
                }
                "target" => {
                    let label = single_label(ident, labels).map_err(fail)?;
                    define_targets(&mut definition, &mut scope, file, &label, body, item.line)?;
                }
                other => {
                    return Err(fail(format!("unknown block {other:?} (variable, function, target and group are)")));
                }
            }
        }
    }
    Ok(definition)
}

/// The targets of one `target` block: itself, or one per combination of its matrix (and a
/// group under its label listing them), each merged over an earlier definition of its name.
fn define_targets(
    definition: &mut Definition,
    scope: &mut eval::Scope,
    file: &BakeFile,
    label: &str,
    body: &[syntax::Item],
    line: Option<usize>,
) -> Result<(), BakeError> {
    let fail_at = |line: Option<usize>, message: String| BakeError { file: file.name.clone(), line, message };
    let mut attributes = Vec::new();
    for inner in body {
        match &inner.kind {
            Kind::Attribute { key, expr } => attributes.push((key.as_str(), expr, inner.line)),
            Kind::Block { ident, .. } => {
                return Err(fail_at(inner.line, format!("target {label:?}: unexpected block {ident:?}")));
            }
        }
    }
    let at = |key: &str| attributes.iter().find(|(k, _, _)| *k == key).copied();
    let (matrix, name) = (at("matrix"), at("name"));
    let combinations = match matrix {
        Some((_, expr, line)) => scope
            .eval(expr, &eval::Locals::default())
            .and_then(|value| combinations(&value))
            .map_err(|e| fail_at(line, format!("target {label:?}: matrix: {e}")))?,
        None => vec![eval::Locals::default()],
    };
    let mut generated: Vec<String> = Vec::new();
    for locals in combinations {
        let target_name = match (matrix, name) {
            (None, None) => label.to_string(),
            (None, Some((_, _, line))) => return Err(fail_at(line, format!("target {label:?}: name is for a matrix"))),
            (Some(_), None) => return Err(fail_at(line, format!("target {label:?}: a matrix needs a name"))),
            (Some(_), Some((_, expr, line))) => {
                let fail = |message: String| fail_at(line, format!("target {label:?}: name: {message}"));
                let value = scope.eval(expr, &locals).map_err(fail)?;
                let generated_name = eval::text_of(&value).map_err(fail)?;
                if generated_name.is_empty()
                    || !generated_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(fail(format!("{generated_name:?} may hold only letters, digits, _ and -")));
                }
                if generated.contains(&generated_name) {
                    return Err(fail(format!("the matrix names two targets {generated_name:?}")));
                }
                generated_name
            }
        };
        let mut target = Target::default();
        for (key, expr, line) in &attributes {
            if matches!(*key, "matrix" | "name") {
                continue;
            }
            let fail = |message: String| fail_at(*line, format!("target {target_name:?}: {message}"));
            let value = scope.eval(expr, &locals).map_err(|e| fail(format!("{key}: {e}")))?;
            target.set(key, value).map_err(fail)?;
        }
        // A target defined again (here or in a later file) merges over the first.
        let merged = match definition.targets.remove(&target_name) {
            Some(earlier) => earlier.merged_with(&target),
            None => target,
        };
        definition.targets.insert(target_name.clone(), merged);
        generated.push(target_name);
    }
    if matrix.is_some() {
        generated.sort();
        definition.groups.insert(label.to_string(), generated);
    }
    Ok(())
}

/// The targets `requested` (targets or groups; none: the `default` group) resolve to, each
/// merged with what it inherits, with buildx's defaults filled in; a target another one uses
/// as a context (`target:NAME`) comes too, its output only the cache (`type=cacheonly`)
/// unless it was requested. `overrides` (`--set`) apply after what a target inherits.
pub fn resolve(
    definition: &Definition,
    requested: &[String],
    overrides: &[Override],
) -> Result<BTreeMap<String, Target>, String> {
    let names: BTreeSet<String> = targets_of(definition, requested)?.into_iter().collect();
    let mut resolved = BTreeMap::new();
    let mut pending: Vec<String> = names.iter().cloned().collect();
    while let Some(name) = pending.pop() {
        if resolved.contains_key(&name) {
            continue;
        }
        let mut target = inherited(definition, &name, &mut Vec::new())?;
        overrides::apply(&mut target, &name, overrides)?;
        target.fill_defaults();
        if !names.contains(&name) {
            target.output = vec!["type=cacheonly".to_string()];
        }
        for linked in target.linked_targets() {
            if !definition.targets.contains_key(linked) {
                return Err(format!("target {name:?}: context target:{linked}: no such target"));
            }
            pending.push(linked.to_string());
        }
        resolved.insert(name, target);
    }
    if let Some(cycle) = context_cycle(&resolved) {
        return Err(format!("target: contexts cycle: {}", cycle.join(" -> ")));
    }
    Ok(resolved)
}

/// The targets `requested` (targets or groups; none: the `default` group) stand for, by name.
pub fn targets_of(definition: &Definition, requested: &[String]) -> Result<Vec<String>, String> {
    let requested = if requested.is_empty() { vec!["default".to_string()] } else { requested.to_vec() };
    let mut names = BTreeSet::new();
    for name in &requested {
        expand(definition, name, &mut Vec::new(), &mut names)?;
    }
    Ok(names.into_iter().collect())
}

/// A chain of targets that use one another through `target:` contexts, back to its start.
fn context_cycle(targets: &BTreeMap<String, Target>) -> Option<Vec<String>> {
    fn visit<'a>(
        targets: &'a BTreeMap<String, Target>,
        name: &'a str,
        chain: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = chain.iter().position(|c| *c == name) {
            let mut cycle: Vec<String> = chain[at..].iter().map(|c| c.to_string()).collect();
            cycle.push(name.to_string());
            return Some(cycle);
        }
        if !done.insert(name) {
            return None;
        }
        chain.push(name);
        for linked in targets.get(name).map(Target::linked_targets).unwrap_or_default() {
            if let Some(cycle) = visit(targets, linked, chain, done) {
                return Some(cycle);
            }
        }
        chain.pop();
        None
    }
    let mut done = BTreeSet::new();
    targets.keys().find_map(|name| visit(targets, name, &mut Vec::new(), &mut done))
}

/// The target names a target or group stands for.
fn expand(
    definition: &Definition,
    name: &str,
    chain: &mut Vec<String>,
    out: &mut BTreeSet<String>,
) -> Result<(), String> {
    if let Some(members) = definition.groups.get(name) {
        if chain.iter().any(|c| c == name) {
            chain.push(name.to_string());
            return Err(format!("group cycle: {}", chain.join(" -> ")));
        }
        chain.push(name.to_string());
        for member in members {
            expand(definition, member, chain, out)?;
        }
        chain.pop();
        return Ok(());
    }
    if definition.targets.contains_key(name) {
        out.insert(name.to_string());
        return Ok(());
    }
    Err(format!("no target or group named {name:?}"))
}

/// A target merged over the targets it inherits, in order.
fn inherited(definition: &Definition, name: &str, chain: &mut Vec<String>) -> Result<Target, String> {
    if chain.iter().any(|c| c == name) {
        chain.push(name.to_string());
        return Err(format!("inherits cycle: {}", chain.join(" -> ")));
    }
    let target = definition.targets.get(name).ok_or_else(|| match chain.last() {
        Some(child) => format!("target {child:?} inherits {name:?}, which is no target"),
        None => format!("no target named {name:?}"),
    })?;
    chain.push(name.to_string());
    let mut merged = Target::default();
    for parent in &target.inherits {
        merged = merged.merged_with(&inherited(definition, parent, chain)?);
    }
    chain.pop();
    let mut merged = merged.merged_with(target);
    merged.inherits.clear();
    Ok(merged)
}

/// `--print`'s JSON, in buildx's shape: the names asked for as the `default` group (none
/// asked for: the `default` group's targets), and every resolved target.
pub fn print(definition: &Definition, requested: &[String], resolved: &BTreeMap<String, Target>) -> Value {
    let mut names: Vec<String> = if requested.is_empty() {
        let mut expanded = BTreeSet::new();
        // Resolved already: expanding again cannot fail.
        let _ = expand(definition, "default", &mut Vec::new(), &mut expanded);
        expanded.into_iter().collect()
    } else {
        requested.to_vec()
    };
    names.sort();
    let targets: serde_json::Map<String, Value> =
        resolved.iter().map(|(name, t)| (name.clone(), t.to_json())).collect();
    json!({
        "group": {"default": {"targets": names}},
        "target": targets,
    })
}

/// Every combination of a matrix's values (keys in order, the last varying fastest), each as
/// the bindings of its keys.
fn combinations(matrix: &Value) -> Result<Vec<eval::Locals>, String> {
    let Value::Object(map) = matrix else { return Err(format!("{matrix} is not a map of lists")) };
    let mut combinations = vec![eval::Locals::default()];
    for (key, values) in map {
        let Value::Array(values) = values else { return Err(format!("{key}: {values} is not a list")) };
        if values.is_empty() {
            return Err(format!("{key}: an empty list makes no target"));
        }
        combinations = combinations
            .into_iter()
            .flat_map(|locals| {
                values.iter().map(move |value| {
                    let mut locals = locals.clone();
                    locals.set(key, value.clone());
                    locals
                })
            })
            .collect();
    }
    Ok(combinations)
}

/// A `function` block: `params = [a, b]`, `variadic_params = rest`, `result = EXPR` (names
/// may be quoted, as JSON files write them).
fn function_of(body: &[syntax::Item]) -> Result<eval::Function, String> {
    let (mut params, mut variadic, mut result) = (None, None, None);
    let name_of = |expr: &hcl::Expression| match expr {
        hcl::Expression::Variable(variable) => Ok(variable.as_str().to_string()),
        hcl::Expression::String(name) => Ok(name.clone()),
        other => Err(format!("{other} is not a parameter name")),
    };
    for inner in body {
        let Kind::Attribute { key, expr } = &inner.kind else { return Err("unexpected block".into()) };
        match key.as_str() {
            "params" => match expr {
                hcl::Expression::Array(items) => {
                    params = Some(items.iter().map(name_of).collect::<Result<Vec<_>, _>>()?)
                }
                other => return Err(format!("params: {other} is not a list of names")),
            },
            "variadic_params" => variadic = Some(name_of(expr)?),
            "result" => result = Some(expr.clone()),
            other => return Err(format!("unknown attribute {other:?}")),
        }
    }
    Ok(eval::Function {
        params: params.ok_or("params is required")?,
        variadic,
        result: result.ok_or("result is required")?,
    })
}

fn single_label(ident: &str, labels: &[String]) -> Result<String, String> {
    match labels {
        [label] => Ok(label.clone()),
        labels => Err(format!("a {ident} block takes one name, not {}", labels.len())),
    }
}

#[cfg(test)]
mod tests;
