//! `kiln bake` on a cluster: targets sharing a base through `target:` contexts build it once
//! and spread over the workers; a matrix pushes one image per variant; a failing target
//! hides none of the others' results.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

const BAKE: &str = r#"
group "default" {
  targets = ["services"]
}
target "base" {
  context = "base"
}
target "services" {
  name = "svc${n}"
  matrix = { n = ["1", "2", "3", "4", "5", "6"] }
  context = "svc${n}"
  contexts = { base = "target:base", docs = "./docs" }
  platforms = ["linux/amd64"]
  output = ["type=local,dest=out/svc${n}"]
}
"#;

const MATRIX: &str = r#"
variable "REGISTRY" {
}
target "img" {
  name = "img-${flavor}-${size}"
  matrix = { flavor = ["a", "b"], size = ["s", "m"] }
  dockerfile-inline = "FROM BASE\nARG FLAVOR\nARG SIZE\nRUN echo $FLAVOR-$SIZE > /variant\n"
  args = { FLAVOR = flavor, SIZE = size }
  labels = { "org.example.variant" = "${flavor}-${size}" }
  tags = ["${REGISTRY}/kiln/img:${flavor}-${size}"]
  platforms = ["linux/amd64"]
}
target "broken" {
  dockerfile-inline = "FROM BASE\nRUN echo failing on purpose && exit 3\n"
  tags = ["${REGISTRY}/kiln/broken:1"]
  platforms = ["linux/amd64"]
}
"#;

/// The records of every target whose names contain `needle`, by target.
fn records_of<'a>(metadata: &'a Value, needle: &str) -> BTreeMap<String, &'a Value> {
    let mut found = BTreeMap::new();
    for (target, entry) in metadata.as_object().unwrap() {
        if let Some(record) =
            entry["vertices"].as_array().unwrap().iter().find(|v| v["name"].as_str().unwrap().contains(needle))
        {
            found.insert(target.clone(), record);
        }
    }
    found
}

fn executed(records: &BTreeMap<String, &Value>) -> usize {
    records.values().filter(|r| r["status"] == "executed").count()
}

#[test]
fn a_bake_of_six_services_builds_their_base_once_over_two_workers_and_a_matrix_pushes_four_images() {
    let cluster = Cluster::start(34, &["linux/amd64", "linux/amd64"], 2, "");
    let repo = cluster.dir.path().join("monorepo");
    std::fs::create_dir_all(repo.join("base")).unwrap();
    std::fs::write(
        repo.join("base/Dockerfile"),
        format!(
            "FROM {}\nRUN sleep 1 && cat /proc/sys/kernel/random/uuid > /base-id\nENV FROM_BASE=yes\nWORKDIR /srv\n",
            cluster.base
        ),
    )
    .unwrap();
    for n in 1..=6 {
        let dir = repo.join(format!("svc{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("app.txt"), format!("app {n}\n")).unwrap();
        std::fs::write(
            dir.join("Dockerfile"),
            format!(
                "FROM base\nRUN cat /proc/sys/kernel/random/uuid > /shared\nCOPY app.txt app.txt\n\
                 RUN sleep 1 && echo $FROM_BASE-{n} > out\nCOPY --from=docs /guide.md guide.md\n"
            ),
        )
        .unwrap();
    }
    std::fs::create_dir_all(repo.join("docs")).unwrap();
    std::fs::write(repo.join("docs/guide.md"), "# guide\n").unwrap();
    std::fs::write(repo.join("docker-bake.hcl"), BAKE).unwrap();

    let metadata = repo.join("metadata.json");
    let out = cluster
        .kiln(&["bake", "--progress", "plain", "--metadata-file", metadata.to_str().unwrap()])
        .current_dir(&repo)
        .output()
        .unwrap();
    let progress = text(&out.stderr);
    assert!(out.status.success(), "bake failed: {progress}\n{}", cluster.logs());
    let metadata = read_json(&metadata);
    let targets: Vec<&String> = metadata.as_object().unwrap().keys().collect();
    assert_eq!(targets, ["svc1", "svc2", "svc3", "svc4", "svc5", "svc6"], "the base is built inside them only");

    // The base's step and the services' identical first step ran once for all six.
    let base = records_of(&metadata, "[base] [2/3] RUN sleep 1");
    assert_eq!(base.len(), 6, "{metadata:#}");
    assert_eq!(executed(&base), 1, "{metadata:#}");
    let shared = records_of(&metadata, "RUN cat /proc/sys/kernel/random/uuid > /shared");
    assert_eq!((shared.len(), executed(&shared)), (6, 1), "{metadata:#}");
    for record in base.values().chain(shared.values()) {
        assert!(["executed", "deduplicated", "cached"].contains(&record["status"].as_str().unwrap()), "{record}");
    }

    // Each service's own step ran, on both workers, some of them at the same time.
    let own = records_of(&metadata, "RUN sleep 1 && echo $FROM_BASE");
    assert_eq!((own.len(), executed(&own)), (6, 6), "{metadata:#}");
    let workers: BTreeSet<&str> = own.values().map(|r| r["worker"].as_str().unwrap()).collect();
    assert_eq!(workers.len(), 2, "spread over both workers: {metadata:#}");
    let spans: Vec<(&str, &str)> =
        own.values().map(|r| (r["started"].as_str().unwrap(), r["completed"].as_str().unwrap())).collect();
    let overlapping = spans.iter().enumerate().any(|(i, a)| spans[i + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlapping, "the services' steps ran in parallel: {spans:?}");

    // The results: the base's config (ENV, WORKDIR) and its one filesystem in every service.
    let base_id = std::fs::read_to_string(repo.join("out/svc1/base-id")).unwrap();
    let shared_id = std::fs::read_to_string(repo.join("out/svc1/shared")).unwrap();
    for n in 1..=6 {
        let svc = repo.join(format!("out/svc{n}"));
        assert_eq!(std::fs::read_to_string(svc.join("srv/out")).unwrap(), format!("yes-{n}\n"));
        assert_eq!(std::fs::read_to_string(svc.join("srv/app.txt")).unwrap(), format!("app {n}\n"));
        assert_eq!(std::fs::read_to_string(svc.join("srv/guide.md")).unwrap(), "# guide\n", "a directory context");
        assert_eq!(std::fs::read_to_string(svc.join("base-id")).unwrap(), base_id);
        assert_eq!(std::fs::read_to_string(svc.join("shared")).unwrap(), shared_id);
        assert!(progress.contains(&format!("[svc{n}] [base] [2/3] RUN sleep 1")), "{progress}");
    }

    // A 2 x 2 matrix pushes four images; a failing target fails the command and hides none
    // of the others' results.
    let registry = cluster.registry.addr.to_string();
    std::fs::write(repo.join("matrix.hcl"), MATRIX.replace("BASE", &cluster.base)).unwrap();
    let metadata = repo.join("matrix.json");
    let out = cluster
        .kiln(&["bake", "-f", "matrix.hcl", "img", "broken", "--push", "--metadata-file", metadata.to_str().unwrap()])
        .arg("--progress=plain")
        .env("REGISTRY", &registry)
        .current_dir(&repo)
        .output()
        .unwrap();
    let progress = text(&out.stderr);
    assert!(!out.status.success(), "the broken target fails the bake: {progress}");
    assert!(progress.contains("target broken: ERROR: failed to solve:"), "{progress}");
    let metadata = read_json(&metadata);
    assert_eq!(metadata["broken"]["status"], "failed", "{metadata:#}");
    assert!(metadata["broken"]["error"].as_str().unwrap().contains("exit"), "{metadata:#}");
    for flavor in ["a", "b"] {
        for size in ["s", "m"] {
            let entry = &metadata[format!("img-{flavor}-{size}")];
            let name = format!("{registry}/kiln/img:{flavor}-{size}");
            assert_eq!(
                (entry["status"].as_str(), entry["image.name"].as_str()),
                (Some("succeeded"), Some(name.as_str()))
            );
            let inspect = Command::new("skopeo")
                .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{name}")])
                .output()
                .unwrap();
            assert!(inspect.status.success(), "{name}: {}", text(&inspect.stderr));
            let digest = kiln_types::Digest::of(&inspect.stdout).to_string();
            assert_eq!(entry["containerimage.digest"].as_str(), Some(digest.as_str()), "{name}");
            let config = Command::new("skopeo")
                .args(["inspect", "--config", "--tls-verify=false", &format!("docker://{name}")])
                .output()
                .unwrap();
            let config: Value = serde_json::from_slice(&config.stdout).unwrap();
            let variant = format!("{flavor}-{size}");
            assert_eq!(
                config["config"]["Labels"]["org.example.variant"].as_str(),
                Some(variant.as_str()),
                "{config:#}"
            );
        }
    }
}
