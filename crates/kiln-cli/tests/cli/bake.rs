//! `kiln bake` and named contexts on the embedded default: default files and their
//! overrides, `--print`, `--set`, `target:` and directory contexts, labels.

use std::process::Command;

use serde_json::{Value, json};

use super::build::Setup;
use super::build::text;

#[test]
fn bake_prints_merges_overrides_and_builds_targets_with_their_contexts() {
    let setup = Setup::new();
    let repo = setup.dir.path().join("repo");
    std::fs::create_dir_all(repo.join("docs")).unwrap();
    std::fs::write(repo.join("docs/guide.md"), "guide\n").unwrap();
    std::fs::write(
        repo.join("Dockerfile.base"),
        format!(
            "FROM {}\nRUN echo base > /base\nENV FROM_BASE=1\nRUN --mount=type=secret,id=token cp /run/secrets/token /token\n",
            setup.base()
        ),
    )
    .unwrap();
    std::fs::write(
        repo.join("Dockerfile"),
        "FROM base\nARG MSG=unset\nRUN echo $MSG-$FROM_BASE > /msg\nCOPY --from=docs /guide.md /guide.md\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("docker-bake.hcl"),
        r#"
variable "TAG" {
  default = "dev"
}
group "default" {
  targets = ["app"]
}
target "base" {
  dockerfile = "Dockerfile.base"
  secret = ["id=token,env=BAKE_TOKEN"]
}
target "app" {
  contexts = { base = "target:base", docs = "docs" }
  args = { MSG = "hello" }
  labels = { "org.example.tag" = TAG }
  output = ["type=local,dest=out"]
}
"#,
    )
    .unwrap();
    // The override file is read after the main one and wins where both set something.
    std::fs::write(repo.join("docker-bake.override.hcl"), "target \"app\" {\n  args = { EXTRA = \"1\" }\n}\n").unwrap();
    let bake = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.arg("bake").args(args).current_dir(&repo);
        command.env("KILN_ROOT", setup.dir.path().join("state")).env_remove("KILN_ADDR");
        command.envs(env.iter().copied()).output().unwrap()
    };

    let out = bake(&["--print", "--set", "app.args.MSG=hi"], &[("TAG", "v2")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed,
        json!({
            "group": {"default": {"targets": ["app"]}},
            "target": {
                "app": {
                    "context": ".", "dockerfile": "Dockerfile",
                    "contexts": {"base": "target:base", "docs": "docs"},
                    "args": {"EXTRA": "1", "MSG": "hi"},
                    "labels": {"org.example.tag": "v2"},
                    "output": [{"type": "local", "dest": "out"}]
                },
                "base": {
                    "context": ".", "dockerfile": "Dockerfile.base", "output": [{"type": "cacheonly"}],
                    "secret": [{"id": "token", "env": "BAKE_TOKEN"}]
                }
            }
        })
    );

    let out = bake(
        &["--progress", "plain", "--set", "app.args.MSG=hi", "--metadata-file", "meta.json"],
        &[("BAKE_TOKEN", "s3cret")],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(std::fs::read_to_string(repo.join("out/msg")).unwrap(), "hi-1\n");
    assert_eq!(std::fs::read_to_string(repo.join("out/base")).unwrap(), "base\n");
    assert_eq!(std::fs::read_to_string(repo.join("out/guide.md")).unwrap(), "guide\n");
    assert_eq!(std::fs::read_to_string(repo.join("out/token")).unwrap(), "s3cret", "the base target's secret");
    assert!(stderr.contains("[app] [base] [2/3] RUN echo base"), "{stderr}");
    let metadata: Value = serde_json::from_slice(&std::fs::read(repo.join("meta.json")).unwrap()).unwrap();
    assert_eq!(metadata.as_object().unwrap().keys().collect::<Vec<_>>(), ["app"]);
    assert_eq!(metadata["app"]["status"], "succeeded");

    // Errors name the file and line, the target, the --set.
    std::fs::write(repo.join("bad.hcl"), "target \"x\" {\n  bogus = 1\n}\n").unwrap();
    let out = bake(&["-f", "bad.hcl", "x"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("bad.hcl:2: "), "{}", text(&out.stderr));
    let out = bake(&["nothing"], &[]);
    assert!(text(&out.stderr).contains("no target or group named \"nothing\""), "{}", text(&out.stderr));
    let out = bake(&["--set", "app.contexts.docs=oci-layout://./layout"], &[("BAKE_TOKEN", "x")]);
    assert!(text(&out.stderr).contains("target app: contexts.docs"), "{}", text(&out.stderr));
}

#[test]
fn build_contexts_replace_images_and_stages_and_labels_reach_the_image() {
    let setup = Setup::new();
    let context = setup.context(
        "named",
        "FROM tools\nCOPY --from=docs /guide.md /guide.md\nCOPY --from=notes /notes.txt /notes.txt\nLABEL from=dockerfile\n",
    );
    let served = setup.dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("notes.txt"), "downloaded\n").unwrap();
    let server = kiln_testkit::HttpServer::start(&served);
    let docs = setup.dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("guide.md"), "named\n").unwrap();
    let image = format!("{}/kiln/named:v1", setup.registry.addr);
    let out_dir = setup.dir.path().join("named-out");
    let out = setup.run(&[
        "build",
        context.to_str().unwrap(),
        "--build-context",
        &format!("tools=docker-image://{}", setup.base()),
        "--build-context",
        &format!("docs={}", docs.display()),
        "--build-context",
        &format!("notes=http://127.0.0.1:{}/notes.txt", server.port),
        "--label",
        "extra=1",
        "--label",
        "from=flag",
        "-o",
        &format!("type=image,name={image},push=true"),
        "-o",
        &format!("type=local,dest={}", out_dir.display()),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(out_dir.join("guide.md")).unwrap(), "named\n");
    assert_eq!(std::fs::read_to_string(out_dir.join("notes.txt")).unwrap(), "downloaded\n", "a URL context");
    assert!(out_dir.join("bin/busybox").exists(), "FROM tools is the image");
    let config = Command::new("skopeo")
        .args(["inspect", "--config", "--tls-verify=false", &format!("docker://{image}")])
        .output()
        .unwrap();
    let config: Value = serde_json::from_slice(&config.stdout).unwrap();
    assert_eq!(config["config"]["Labels"], json!({"extra": "1", "from": "flag"}), "{config:#}");

    for (value, error) in [
        ("x=ftp://example.invalid/x", "--build-context x: \"ftp://example.invalid/x\": Kiln takes"),
        ("=y", "--build-context \"=y\": expected NAME=VALUE"),
        ("x=/nonexistent-dir", "--build-context x: /nonexistent-dir is not a directory"),
    ] {
        let out = setup.run(&["build", context.to_str().unwrap(), "--build-context", value]);
        assert!(!out.status.success() && text(&out.stderr).contains(error), "{value}: {}", text(&out.stderr));
    }
}
