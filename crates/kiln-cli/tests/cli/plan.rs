//! `kiln plan` end to end: the real binary on the fixtures under `tests/fixtures`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::kiln;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn plan_json(dir: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["plan", dir.to_str().unwrap(), "--format", "json"];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = kiln(&args);
    assert!(ok, "kiln plan failed: {stderr}");
    serde_json::from_str(&stdout).expect("plan prints JSON")
}

fn vertices(plan: &Value) -> &Vec<Value> {
    plan["vertices"].as_array().expect("vertices array")
}

fn count_kind(plan: &Value, kind: &str) -> usize {
    vertices(plan).iter().filter(|v| v["kind"] == kind).count()
}

#[test]
fn json_has_the_documented_shape() {
    let plan = plan_json(&fixture("parallel"), &[]);
    for v in vertices(&plan) {
        let digest = v["digest"].as_str().unwrap();
        assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
        assert!(["source", "exec", "file", "merge"].contains(&v["kind"].as_str().unwrap()));
        assert!(v["name"].is_string() && v["stage"].is_string() && v["inputs"].is_array());
    }
    let outputs = plan["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    let root = outputs[0]["digest"].as_str().unwrap();
    assert!(vertices(&plan).iter().any(|v| v["digest"] == root));
    // Every input is a vertex listed earlier (topological order).
    let mut seen = std::collections::HashSet::new();
    for v in vertices(&plan) {
        for input in v["inputs"].as_array().unwrap() {
            assert!(seen.contains(input.as_str().unwrap()), "input listed before use");
        }
        seen.insert(v["digest"].as_str().unwrap().to_owned());
    }
}

#[test]
fn parallel_stages_are_independent_branches() {
    let plan = plan_json(&fixture("parallel"), &[]);
    let runs: Vec<&Value> = vertices(&plan).iter().filter(|v| v["kind"] == "exec").collect();
    assert_eq!(runs.len(), 3);
    let inputs: Vec<&Value> = runs.iter().map(|r| &r["inputs"]).collect();
    assert!(inputs.iter().all(|i| *i == inputs[0]), "all three RUNs depend only on the base image");
}

#[test]
fn identical_stages_are_one_exec_and_env_makes_two() {
    assert_eq!(count_kind(&plan_json(&fixture("identical"), &[]), "exec"), 1);
    assert_eq!(count_kind(&plan_json(&fixture("env-differ"), &[]), "exec"), 2);
}

#[test]
fn unused_stages_do_not_appear() {
    let plan = plan_json(&fixture("unused"), &[]);
    let stages: Vec<&str> = vertices(&plan).iter().filter_map(|v| v["stage"].as_str()).collect();
    assert!(!stages.contains(&"unused"), "{stages:?}");
    let (ok, _, _) = kiln(&["plan", fixture("unused").to_str().unwrap(), "--target", "unused"]);
    assert!(ok, "an unused stage can still be targeted");
}

/// Copies a fixture into a scratch directory so tests can edit it.
fn scratch_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture(name), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn digest_named(plan: &Value, fragment: &str) -> String {
    let v = vertices(plan).iter().find(|v| v["name"].as_str().unwrap().contains(fragment));
    v.unwrap_or_else(|| panic!("no vertex named like {fragment}"))["digest"].as_str().unwrap().to_owned()
}

#[test]
fn context_edits_invalidate_only_what_reads_them() {
    let dir = scratch_copy("context");
    let before = plan_json(dir.path(), &[]);
    std::fs::write(dir.path().join("docs/readme.md"), "edited").unwrap();
    std::fs::write(dir.path().join("src/ignored.log"), "ignored by .dockerignore").unwrap();
    let after_docs = plan_json(dir.path(), &[]);
    assert_eq!(digest_named(&before, "COPY src/"), digest_named(&after_docs, "COPY src/"));
    assert_eq!(digest_named(&before, "RUN cat"), digest_named(&after_docs, "RUN cat"));
    assert_ne!(digest_named(&before, "COPY docs/"), digest_named(&after_docs, "COPY docs/"));
    std::fs::write(dir.path().join("src/a.txt"), "changed").unwrap();
    let after_src = plan_json(dir.path(), &[]);
    assert_ne!(digest_named(&before, "COPY src/"), digest_named(&after_src, "COPY src/"));
    assert_ne!(digest_named(&before, "RUN cat"), digest_named(&after_src, "RUN cat"));
}

#[test]
fn per_dockerfile_dockerignore_wins() {
    let dir = scratch_copy("context");
    let dockerfile = dir.path().join("Dockerfile");
    let before = plan_json(dir.path(), &["-f", dockerfile.to_str().unwrap()]);
    std::fs::write(dir.path().join("Dockerfile.dockerignore"), "src/b.txt\n").unwrap();
    let after = plan_json(dir.path(), &["-f", dockerfile.to_str().unwrap()]);
    assert_ne!(digest_named(&before, "COPY src/"), digest_named(&after, "COPY src/"));
}

#[test]
fn multi_platform_gives_one_output_per_platform() {
    let plan = plan_json(&fixture("multi-platform"), &["--platform", "linux/amd64,linux/arm64"]);
    let platforms: Vec<&str> =
        plan["outputs"].as_array().unwrap().iter().map(|o| o["platform"].as_str().unwrap()).collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let generator_runs =
        vertices(&plan).iter().filter(|v| v["name"].as_str().unwrap().contains("echo generator")).count();
    assert_eq!(generator_runs, 1, "the build-platform stage is shared");
}

#[test]
fn text_and_dot_formats() {
    let (ok, text, _) = kiln(&["plan", fixture("identical").to_str().unwrap()]);
    assert!(ok && text.contains("RUN echo expensive") && text.contains("(shared)"), "{text}");
    let (ok, dot, _) = kiln(&["plan", fixture("identical").to_str().unwrap(), "--format", "dot"]);
    assert!(ok && dot.starts_with("digraph kiln {") && dot.contains("->"), "{dot}");
}

#[test]
fn bad_input_fails_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM busybox\nCOPY missing.txt /\n").unwrap();
    let (ok, _, stderr) = kiln(&["plan", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("Dockerfile:2") && stderr.contains("missing.txt"), "{stderr}");
    let (ok, _, stderr) = kiln(&["plan", dir.path().to_str().unwrap(), "--platform", "linux"]);
    assert!(!ok && stderr.contains("invalid platform"), "{stderr}");
    std::fs::write(dir.path().join("Dockerfile"), [0xff, 0xfe, b'\n']).unwrap();
    let (ok, _, stderr) = kiln(&["plan", dir.path().to_str().unwrap()]);
    assert!(!ok && stderr.contains("not valid UTF-8"), "{stderr}");
}
