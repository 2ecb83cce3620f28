//! The architecture's fences, checked from `cargo metadata` and the sources (ARCHITECTURE.md
//! "Invariants"): pure crates pull in no async runtime, each heavy dependency has one owning
//! crate, and no crate (nor the workspace) declares a dependency it does not use.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

/// Crates that do no IO: nothing async may enter their normal dependency closure.
const PURE: &[&str] = &["kiln-types", "kiln-graph", "kiln-model", "kiln-dockerfile", "kiln-bake"];

/// What a pure crate must never depend on, directly or not.
const FORBIDDEN_IN_PURE: &[&str] = &["tokio", "tonic", "hyper", "mio"];

/// Heavy dependencies and the crates allowed to name them as normal dependencies.
const OWNERS: &[(&str, &[&str])] = &[
    ("sled", &["kiln-kv"]),
    ("oci-client", &["kiln-registry"]),
    ("reqwest", &["kiln-registry"]),
    ("libcontainer", &["kiln-runner"]),
    ("prost", &["kiln-proto"]),
    ("tonic", &["kiln-proto", "kiln-api", "kiln-client"]),
    ("kiln-proto", &["kiln-api", "kiln-client"]),
    ("aws-sdk-s3", &["kiln-cache"]),
    ("aws-config", &["kiln-cache"]),
    ("raft", &["kiln-raft"]),
    ("protobuf", &["kiln-raft"]),
    ("slog", &["kiln-raft"]),
    ("opentelemetry", &["kiln-telemetry"]),
    ("opentelemetry_sdk", &["kiln-telemetry"]),
    ("opentelemetry-otlp", &["kiln-telemetry"]),
    ("tracing-opentelemetry", &["kiln-telemetry"]),
    ("prometheus", &["kiln-telemetry"]),
    ("hcl-rs", &["kiln-bake"]),
    ("axum", &["kiln-telemetry", "kiln-web"]),
];

/// Checks every fence; the error lists each violation with the crate and the path to it.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout).context("reading cargo metadata")?;
    let mut violations = Vec::new();
    pure_closures(&metadata, &mut violations);
    owners(&metadata, &mut violations);
    unused_dependencies(&metadata, &mut violations)?;
    unused_workspace_dependencies(root, &metadata, &mut violations)?;
    unsafe_code(root, &metadata, &mut violations)?;
    if violations.is_empty() {
        eprintln!(
            "fences: pure crates, dependency owners, unused dependencies and unsafe code are as ARCHITECTURE.md says"
        );
        return Ok(());
    }
    for violation in &violations {
        eprintln!("fence: {violation}");
    }
    bail!("{} architecture fences are broken (ARCHITECTURE.md, Invariants)", violations.len())
}

fn workspace_packages(metadata: &Value) -> Vec<&Value> {
    let members: BTreeSet<&str> =
        metadata["workspace_members"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| members.contains(p["id"].as_str().unwrap_or("")))
        .collect()
}

/// Normal (non-dev, non-build) dependencies of each package id, from the resolve graph.
fn normal_edges(metadata: &Value) -> HashMap<&str, Vec<&str>> {
    let mut edges = HashMap::new();
    for node in metadata["resolve"]["nodes"].as_array().into_iter().flatten() {
        let id = node["id"].as_str().unwrap_or("");
        let deps = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["dep_kinds"].as_array().into_iter().flatten().any(|k| k["kind"].is_null()))
            .filter_map(|d| d["pkg"].as_str())
            .collect();
        edges.insert(id, deps);
    }
    edges
}

fn package_name<'a>(metadata: &'a Value, id: &str) -> &'a str {
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == id)
        .and_then(|p| p["name"].as_str())
        .unwrap_or("?")
}

/// Pure crates reach no forbidden crate through normal dependencies; a violation names the
/// path from the pure crate to it.
fn pure_closures(metadata: &Value, violations: &mut Vec<String>) {
    let edges = normal_edges(metadata);
    for package in workspace_packages(metadata) {
        let name = package["name"].as_str().unwrap_or("");
        if !PURE.contains(&name) {
            continue;
        }
        let start = package["id"].as_str().unwrap_or("");
        // Breadth first, remembering how each crate was reached.
        let mut came_from: HashMap<&str, &str> = HashMap::from([(start, start)]);
        let mut queue = std::collections::VecDeque::from([start]);
        while let Some(id) = queue.pop_front() {
            for next in edges.get(id).into_iter().flatten() {
                if came_from.contains_key(next) {
                    continue;
                }
                came_from.insert(next, id);
                queue.push_back(next);
                let next_name = package_name(metadata, next);
                if FORBIDDEN_IN_PURE.contains(&next_name) {
                    let mut path = vec![next_name];
                    let mut at = id;
                    while at != start {
                        path.push(package_name(metadata, at));
                        at = came_from[at];
                    }
                    path.push(name);
                    path.reverse();
                    violations
                        .push(format!("{name} is a pure crate but depends on {next_name}: {}", path.join(" -> ")));
                }
            }
        }
    }
}

/// Each heavy dependency only in its owners' normal dependencies.
fn owners(metadata: &Value, violations: &mut Vec<String>) {
    for package in workspace_packages(metadata) {
        let name = package["name"].as_str().unwrap_or("");
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            if !dependency["kind"].is_null() {
                continue;
            }
            let dep = dependency["name"].as_str().unwrap_or("");
            if let Some((_, allowed)) = OWNERS.iter().find(|(heavy, _)| *heavy == dep)
                && !allowed.contains(&name)
            {
                let manifest = package["manifest_path"].as_str().unwrap_or("");
                violations.push(format!(
                    "{name} depends on {dep} ({manifest}), which only {} may (one owner per heavy dependency)",
                    allowed.join(", ")
                ));
            }
        }
    }
}

/// Every Rust source file of a package (src, tests, examples, benches, build.rs).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if name != "target" && name != "fuzz" {
                sources(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// A dependency is used when its crate name appears as a path (`name::`), in a `use`, or as
/// an `extern crate`, in any of the package's sources (as cargo-machete decides it).
fn unused_dependencies(metadata: &Value, violations: &mut Vec<String>) -> anyhow::Result<()> {
    // A package's library may have another name (`hcl-rs` is `hcl`).
    let mut libraries: HashMap<&str, &str> = HashMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let lib = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "lib" || k == "proc-macro")));
        if let (Some(name), Some(lib)) = (package["name"].as_str(), lib.and_then(|t| t["name"].as_str())) {
            libraries.insert(name, lib);
        }
    }
    for package in workspace_packages(metadata) {
        let name = package["name"].as_str().unwrap_or("");
        let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or(""));
        let dir = manifest.parent().context("a manifest has a directory")?;
        let mut files = Vec::new();
        sources(dir, &mut files).with_context(|| format!("reading the sources of {name}"))?;
        let mut text = String::new();
        for file in &files {
            text += &std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        }
        let mut unused: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for dependency in package["dependencies"].as_array().into_iter().flatten() {
            let name = dependency["name"].as_str().unwrap_or("");
            let dep = dependency["rename"].as_str().or_else(|| libraries.get(name).copied()).unwrap_or(name);
            let ident = dep.replace('-', "_");
            let used = [format!("{ident}::"), format!("use {ident}"), format!("extern crate {ident}")]
                .iter()
                .any(|needle| text.contains(needle.as_str()));
            if !used {
                let kind = dependency["kind"].as_str().unwrap_or("normal");
                unused.entry(kind).or_default().push(dependency["name"].as_str().unwrap_or(""));
            }
        }
        for (kind, deps) in unused {
            violations.push(format!(
                "{name} declares {kind} dependencies it does not use: {} ({})",
                deps.join(", "),
                manifest.display()
            ));
        }
    }
    Ok(())
}

/// The one file allowed to lift the workspace's `unsafe_code = "deny"`: the runner's `bpf`
/// system calls (a cgroup v2 host's device program).
const UNSAFE_ISLAND: &str = "crates/kiln-runner/src/devices.rs";

/// Unsafe code only in [`UNSAFE_ISLAND`]: every member takes the workspace's lints, and no
/// attribute of any other source names the lint (to allow, expect or warn of it).
fn unsafe_code(root: &Path, metadata: &Value, violations: &mut Vec<String>) -> anyhow::Result<()> {
    let lint = ["unsafe", "_code"].concat();
    let island = root.join(UNSAFE_ISLAND).canonicalize().with_context(|| format!("reading {UNSAFE_ISLAND}"))?;
    for package in workspace_packages(metadata) {
        let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or(""));
        let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        if !text.contains("[lints]\nworkspace = true") {
            violations
                .push(format!("{} does not take the workspace's lints ([lints] workspace = true)", manifest.display()));
        }
        let dir = manifest.parent().context("a manifest has a directory")?;
        let mut files = Vec::new();
        sources(dir, &mut files).with_context(|| format!("reading the sources of {}", dir.display()))?;
        for file in files {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let names_it = text.lines().map(str::trim_start).any(|l| l.starts_with("#") && l.contains(&lint));
            if names_it && file.canonicalize().ok().as_ref() != Some(&island) {
                violations
                    .push(format!("{} has an attribute on unsafe code (only {UNSAFE_ISLAND} may)", file.display()));
            }
        }
    }
    Ok(())
}

/// `[workspace.dependencies]` entries no member uses.
fn unused_workspace_dependencies(root: &Path, metadata: &Value, violations: &mut Vec<String>) -> anyhow::Result<()> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let used: BTreeSet<&str> = workspace_packages(metadata)
        .iter()
        .flat_map(|p| p["dependencies"].as_array().into_iter().flatten())
        // A renamed dependency (`webpki = { package = "rustls-webpki" }`) is declared by its
        // new name.
        .flat_map(|d| [d["name"].as_str(), d["rename"].as_str()].into_iter().flatten())
        .collect();
    let mut section = "";
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section != "[workspace.dependencies]" {
            continue;
        }
        let Some((key, _)) = line.split_once('=') else { continue };
        let key = key.trim();
        if !key.is_empty() && !key.starts_with('#') && !used.contains(key) {
            violations
                .push(format!("[workspace.dependencies] declares {key}, which no crate uses ({})", manifest.display()));
        }
    }
    Ok(())
}
