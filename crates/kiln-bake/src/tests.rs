//! Bake files → `--print` JSON, and errors with their file and line.

use serde_json::json;

use super::*;

fn files(texts: &[(&str, &str)]) -> Vec<BakeFile> {
    texts.iter().map(|(name, text)| BakeFile { name: name.to_string(), text: text.to_string() }).collect()
}

fn printed(texts: &[(&str, &str)], env: &[(&str, &str)], requested: &[&str]) -> Result<Value, String> {
    let env: BTreeMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let definition = load(&files(texts), &|name| env.get(name).cloned()).map_err(|e| e.to_string())?;
    let requested: Vec<String> = requested.iter().map(|s| s.to_string()).collect();
    let resolved = resolve(&definition, &requested, &[])?;
    Ok(print(&definition, &requested, &resolved))
}

const MONOREPO: &str = r#"
variable "TAG" {
  default = "latest"
}
variable "REGISTRY" {
  default = "registry.example"
}
variable "DEBUG" {
  default = false
}
PREFIX = "${REGISTRY}/team"

group "default" {
  targets = ["api", "web"]
}

target "base" {
  dockerfile = "Dockerfile.base"
  args = { GO_VERSION = "1.22", DEBUG = DEBUG ? "1" : "0" }
  platforms = ["linux/amd64", "linux/arm64"]
  cache-from = ["type=registry,ref=${PREFIX}/cache"]
}

target "api" {
  inherits = ["base"]
  context = "services/api"
  contexts = { base = "target:base" }
  args = { SERVICE = "api" }
  tags = ["${PREFIX}/api:${TAG}", upper("${PREFIX}/api:${TAG}") == "X" ? "never" : "${PREFIX}/api:stable"]
  cache-from = ["${PREFIX}/api-cache"]
}

target "web" {
  inherits = ["base"]
  context = "services/web"
  platforms = ["linux/amd64"]
  output = ["type=image,push=true", "out/web"]
  labels = { "org.opencontainers.image.title" = join("-", ["web", TAG]) }
  no-cache = true
}
"#;

#[test]
fn targets_inherit_merge_and_print_in_buildx_shape() {
    let printed = printed(&[("docker-bake.hcl", MONOREPO)], &[("TAG", "v2"), ("DEBUG", "true")], &[]).unwrap();
    let expected = json!({
        "group": {"default": {"targets": ["api", "web"]}},
        "target": {
            // A context of api's: built for it, kept only in the cache.
            "base": {
                "context": ".",
                "dockerfile": "Dockerfile.base",
                "args": {"DEBUG": "1", "GO_VERSION": "1.22"},
                "cache-from": [{"type": "registry", "ref": "registry.example/team/cache"}],
                "platforms": ["linux/amd64", "linux/arm64"],
                "output": [{"type": "cacheonly"}]
            },
            "api": {
                "context": "services/api",
                "contexts": {"base": "target:base"},
                "dockerfile": "Dockerfile.base",
                "args": {"DEBUG": "1", "GO_VERSION": "1.22", "SERVICE": "api"},
                "tags": ["registry.example/team/api:v2", "registry.example/team/api:stable"],
                "cache-from": [
                    {"type": "registry", "ref": "registry.example/team/cache"},
                    {"type": "registry", "ref": "registry.example/team/api-cache"}
                ],
                "platforms": ["linux/amd64", "linux/arm64"]
            },
            "web": {
                "context": "services/web",
                "dockerfile": "Dockerfile.base",
                "args": {"DEBUG": "1", "GO_VERSION": "1.22"},
                "labels": {"org.opencontainers.image.title": "web-v2"},
                "cache-from": [{"type": "registry", "ref": "registry.example/team/cache"}],
                "platforms": ["linux/amd64"],
                "output": [{"type": "image", "push": "true"}, {"type": "local", "dest": "out/web"}],
                "no-cache": true
            }
        }
    });
    assert_eq!(printed, expected, "{printed:#}");
}

#[test]
fn later_files_override_earlier_ones_and_targets_can_be_named() {
    let override_file = r#"
variable "TAG" {
  default = "override"
}
target "api" {
  tags = ["api:${TAG}"]
}
"#;
    let printed =
        printed(&[("docker-bake.hcl", MONOREPO), ("docker-bake.override.hcl", override_file)], &[], &["api"]).unwrap();
    assert_eq!(printed["group"]["default"]["targets"], json!(["api"]));
    assert_eq!(printed["target"]["api"]["tags"], json!(["api:override"]));
    assert_eq!(printed["target"]["api"]["context"], "services/api", "the earlier definition stays under the later");
    assert!(printed["target"].get("web").is_none());
}

#[test]
fn expressions_templates_and_functions() {
    let text = r#"
variable "N" {
  default = 3
}
variable "NAMES" {
  default = ["a", "b"]
}
target "t" {
  args = {
    SUM = N * 2 + 1
    LIST = join(",", [for name in NAMES : upper(name) if name != "b"])
    MAP = length({ for name in NAMES : name => name })
    HEREDOC = <<EOT
%{ for n in NAMES }${n};%{ endfor }
EOT
    LOOKUP = lookup({ a = "x" }, "b", "fallback")
    TRIM = trimsuffix(trimprefix("v1.2.3-rc", "v"), "-rc")
    NEG = -N
  }
}
"#;
    let printed = printed(&[("f.hcl", text)], &[("N", "5")], &["t"]).unwrap();
    let args = &printed["target"]["t"]["args"];
    assert_eq!(args["SUM"], "11", "an override takes the default's type: {args}");
    assert_eq!(args["LIST"], "A");
    assert_eq!(args["MAP"], "2");
    assert_eq!(args["HEREDOC"], "a;b;\n");
    assert_eq!(args["LOOKUP"], "fallback");
    assert_eq!(args["TRIM"], "1.2.3");
    assert_eq!(args["NEG"], "-5");
}

#[test]
fn errors_name_the_file_the_line_and_the_chain() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "target \"t\" {\n  context = \".\"\n  colour = \"red\"\n}\n",
            "f.hcl:3: target \"t\": unknown attribute \"colour\"",
            &["t"],
        ),
        (
            "target \"t\" {\n  tags = [UNDEFINED]\n}\n",
            "f.hcl:2: target \"t\": tags: unknown variable UNDEFINED",
            &["t"],
        ),
        (
            "variable \"A\" {\n  default = B\n}\nvariable \"B\" {\n  default = A\n}\ntarget \"t\" {\n  args = { X = A }\n}\n",
            "variable cycle: A -> B -> A",
            &["t"],
        ),
        (
            "target \"a\" {\n  inherits = [\"b\"]\n}\ntarget \"b\" {\n  inherits = [\"a\"]\n}\n",
            "inherits cycle: a -> b -> a",
            &["a"],
        ),
        ("group \"g\" {\n  targets = [\"g\"]\n}\n", "group cycle: g -> g", &["g"]),
        ("target \"t\" {}\n", "no target or group named \"missing\"", &["missing"]),
        (
            "target \"t\" {\n  args = { X = nosuch(1) }\n}\n",
            "f.hcl:2: target \"t\": args: unknown function nosuch()",
            &["t"],
        ),
        ("target \"t\" {\n  tags = [\n", "f.hcl:", &["t"]),
        ("widget \"w\" {}\n", "f.hcl:1: unknown block \"widget\"", &["w"]),
        ("target \"a\" {\n  inherits = [\"nope\"]\n}\n", "target \"a\" inherits \"nope\", which is no target", &["a"]),
    ];
    for (text, expected, requested) in cases {
        let error = printed(&[("f.hcl", text)], &[], requested).unwrap_err();
        assert!(error.contains(expected), "{text}\nwanted {expected:?} in {error:?}");
    }
}

#[test]
fn a_matrix_makes_a_target_per_combination_and_a_group_of_them() {
    let text = r#"
function "image" {
  params = [service, variant]
  result = "registry.example/${service}:${variant}"
}
function "joined" {
  params = [first]
  variadic_params = rest
  result = join("+", concat([first], rest))
}
target "app" {
  matrix = {
    service = ["api", "web"]
    variant = ["alpine", "debian"]
  }
  name = "app-${service}-${variant}"
  args = { SERVICE = service, ALL = joined(service, variant, "x") }
  tags = [image(service, variant)]
}
"#;
    let printed = printed(&[("f.hcl", text)], &[], &["app"]).unwrap();
    let names = ["app-api-alpine", "app-api-debian", "app-web-alpine", "app-web-debian"];
    assert_eq!(printed["group"]["default"]["targets"], json!(["app"]));
    let targets = printed["target"].as_object().unwrap();
    assert_eq!(targets.keys().collect::<Vec<_>>(), names.iter().collect::<Vec<_>>(), "{printed:#}");
    assert_eq!(targets["app-web-debian"]["tags"], json!(["registry.example/web:debian"]));
    assert_eq!(targets["app-api-alpine"]["args"], json!({"ALL": "api+alpine+x", "SERVICE": "api"}));
}

#[test]
fn matrix_and_function_errors_say_what_is_wrong() {
    let cases: &[(&str, &str)] = &[
        ("target \"t\" {\n  matrix = { a = [\"x\", \"y\"] }\n}\n", "f.hcl:1: target \"t\": a matrix needs a name"),
        (
            "target \"t\" {\n  matrix = { a = [\"x\", \"y\"] }\n  name = \"same\"\n}\n",
            "f.hcl:3: target \"t\": name: the matrix names two targets \"same\"",
        ),
        (
            "target \"t\" {\n  matrix = { a = [\"x/y\"] }\n  name = a\n}\n",
            "f.hcl:3: target \"t\": name: \"x/y\" may hold only letters",
        ),
        ("target \"t\" {\n  name = \"n\"\n}\n", "target \"t\": name is for a matrix"),
        (
            "target \"t\" {\n  matrix = { a = \"x\" }\n  name = a\n}\n",
            "f.hcl:2: target \"t\": matrix: a: \"x\" is not a list",
        ),
        (
            "function \"f\" {\n  params = [x]\n  result = f(x)\n}\ntarget \"t\" {\n  args = { A = f(1) }\n}\n",
            "calls nest deeper than 64",
        ),
        (
            "function \"f\" {\n  params = [x]\n  result = x\n}\ntarget \"t\" {\n  args = { A = f(1, 2) }\n}\n",
            "f(): takes 1 argument, not 2",
        ),
        ("function \"f\" {\n  result = 1\n}\n", "f.hcl:1: function \"f\": params is required"),
    ];
    for (text, expected) in cases {
        let error = printed(&[("f.hcl", text)], &[], &["t"]).unwrap_err();
        assert!(error.contains(expected), "{text}\nwanted {expected:?} in {error:?}");
    }
}

#[test]
fn json_bake_files_read_like_hcl_with_strings_as_templates() {
    let json_file = r#"{
  "variable": {"TAG": {"default": "1.0"}},
  "function": {"tagged": {"params": ["name"], "result": "${name}:${TAG}"}},
  "group": {"default": {"targets": ["app"]}},
  "target": {
    "app": {
      "context": "app",
      "tags": ["${tagged(\"app\")}"],
      "args": {"N": 3, "FLAG": true, "UNSET": null},
      "platforms": ["linux/amd64"]
    }
  }
}"#;
    let app = printed(&[("docker-bake.json", json_file)], &[("TAG", "2.0")], &[]).unwrap();
    assert_eq!(
        app["target"]["app"],
        json!({
            "context": "app",
            "dockerfile": "Dockerfile",
            "args": {"FLAG": "true", "N": "3"},
            "tags": ["app:2.0"],
            "platforms": ["linux/amd64"]
        }),
        "{app:#}"
    );
    let error = printed(&[("bad.json", "{\n  \"target\": [1,\n")], &[], &[]).unwrap_err();
    assert!(error.starts_with("bad.json:"), "{error}");
    let error = printed(&[("x.json", r#"{"target": {"t": {"colour": "red"}}}"#)], &[], &["t"]).unwrap_err();
    assert!(error.contains("x.json: target \"t\": unknown attribute \"colour\""), "{error}");
}

/// The value of one expression, through a target's argument (as JSON text).
fn value_of(expr: &str) -> Result<Value, String> {
    let text = format!("target \"t\" {{\n  args = {{ V = jsonencode({expr}) }}\n}}\n");
    let out = printed(&[("f.hcl", &text)], &[], &["t"])?;
    Ok(serde_json::from_str(out["target"]["t"]["args"]["V"].as_str().unwrap()).unwrap())
}

#[test]
fn standard_functions_give_what_buildx_gives() {
    let cases: &[(&str, Value)] = &[
        (r#"format("%s-%d-%q-%%", "a", 7, "b")"#, json!("a-7-\"b\"-%")),
        (r#"substr("kilnd", 1, 3)"#, json!("iln")),
        (r#"substr("kilnd", -2, -1)"#, json!("nd")),
        (r#"strlen("héllo")"#, json!(5)),
        (r#"title("hello big world")"#, json!("Hello Big World")),
        (r#"chomp("x\n\n")"#, json!("x")),
        (r#"trim("--x--", "-")"#, json!("x")),
        (r#"indent(2, "a\nb")"#, json!("a\n  b")),
        (r#"reverse([1, 2, 3])"#, json!([3, 2, 1])),
        (r#"distinct(["a", "b", "a"])"#, json!(["a", "b"])),
        (r#"flatten([["a"], ["b", ["c"]]])"#, json!(["a", "b", "c"])),
        (r#"compact(["a", "", "b"])"#, json!(["a", "b"])),
        (r#"element(["a", "b"], 3)"#, json!("b")),
        (r#"indexof(["a", "b"], "b")"#, json!(1)),
        (r#"slice(["a", "b", "c"], 1, 3)"#, json!(["b", "c"])),
        (r#"sort(["b", "a"])"#, json!(["a", "b"])),
        (r#"zipmap(["a", "b"], [1, 2])"#, json!({"a": 1, "b": 2})),
        (r#"range(3)"#, json!([0, 1, 2])),
        (r#"range(1, 10, 4)"#, json!([1, 5, 9])),
        (r#"max(1, 7, 3)"#, json!(7)),
        (r#"min(4, -2)"#, json!(-2)),
        (r#"floor(2.7) + ceil(0.2)"#, json!(3)),
        (r#"pow(2, 10)"#, json!(1024)),
        (r#"parseint("ff", 16)"#, json!(255)),
        (r#"and(true, greaterthan(2, 1))"#, json!(true)),
        (r#"hasindex({ a = 1 }, "a")"#, json!(true)),
        (r#"jsondecode("{\"k\": [1]}")"#, json!({"k": [1]})),
        (r#"urlencode("a b/c")"#, json!("a%20b%2Fc")),
        (r#"basename("/srv/app/")"#, json!("app")),
        (r#"dirname("/srv/app/file")"#, json!("/srv/app")),
        (r#"coalescelist([], ["x"])"#, json!(["x"])),
        (r#"sanitize("a/b:c")"#, json!("a_b_c")),
        (r#"base64decode(base64encode("kiln"))"#, json!("kiln")),
        (r#"base64encode("kiln")"#, json!("a2lsbg==")),
        (r#"sha256("kiln")"#, json!("cdfe9ad58b46226d63eb322dacd35f4f7ac38096180c87258c142e4bca9a3cf5")),
        (r#"regex_replace("v1.2.3", "[.]", "-")"#, json!("v1-2-3")),
        (r#"regex("^v([0-9]+)[.]([0-9]+)", "v1.22.3")"#, json!(["1", "22"])),
        (r#"regex("(?P<major>[0-9]+)", "v7")"#, json!({"major": "7"})),
        (r#"regexall("[0-9]+", "a1b22")"#, json!(["1", "22"])),
        (r#"md5("kiln")"#, json!("9e8287435ae73a052c9459e215e46a28")),
        (r#"sha1("kiln")"#, json!("7908ea50dacbb9a91898af51d70a054211d46dee")),
        (r#"uuidv5("dns", "kiln.example")"#, json!("1776fae2-3566-5238-b9ea-e87a752dc868")),
        (r#"length(uuidv4())"#, json!(36)),
        (
            r#"formatdate("YYYY-MM-DD'T'hh:mm:ss ZZZ EEE MMM D, h AA", "2024-02-29T13:04:05Z")"#,
            json!("2024-02-29T13:04:05 UTC Thu Feb 29, 13 PM"),
        ),
        (
            r#"formatdate("DD MMMM YY, HH:mm ZZZZZ EEEE", "2023-01-07T00:30:00+02:00")"#,
            json!("07 January 23, 12:30 +02:00 Saturday"),
        ),
        (r#"formatdate("'It''s' YYYY", "1999-12-31T23:59:59Z")"#, json!("It's 1999")),
        (r#"timeadd("2024-02-28T23:30:00Z", "1h30m")"#, json!("2024-02-29T01:00:00Z")),
        (r#"timeadd("2024-01-01T00:00:00Z", "-1.5s")"#, json!("2023-12-31T23:59:58.5Z")),
        (r#"can(regex("^[0-9]+$", timestamp())) || length(timestamp()) == 20"#, json!(true)),
        (r#"setunion(["a", "b"], ["b", "c"])"#, json!(["a", "b", "c"])),
        (r#"setintersection(["a", "b", "c"], ["c", "a"])"#, json!(["a", "c"])),
        (r#"setsubtract(["a", "b", "c"], ["b"])"#, json!(["a", "c"])),
        (r#"setsymmetricdifference(["a", "b"], ["b", "c"])"#, json!(["a", "c"])),
        (r#"setproduct(["a", "b"], [1, 2])"#, json!([["a", 1], ["a", 2], ["b", 1], ["b", 2]])),
        (r#"chunklist(["a", "b", "c"], 2)"#, json!([["a", "b"], ["c"]])),
        (r#"formatlist("%s=%s", ["a", "b"], "x")"#, json!(["a=x", "b=x"])),
        (r#"log(8, 2)"#, json!(3)),
        (r#"try(jsondecode("{"), lookup({}, "k"), "fallback")"#, json!("fallback")),
        (r#"try(unknown_variable, 1)"#, json!(1)),
        (r#"[can(lookup({}, "k")), can(1)]"#, json!([false, true])),
    ];
    for (expr, expected) in cases {
        assert_eq!(&value_of(expr).unwrap_or_else(|e| panic!("{expr}: {e}")), expected, "{expr}");
    }
    for (expr, error) in [
        (r#"format("%x", 1)"#, "format(): %x is not supported"),
        (r#"slice(["a"], 0, 5)"#, "slice(): 0..5 is outside the list"),
        (r#"range(0, 1, 0)"#, "range(): the range"),
        (r#"parseint("zz", 10)"#, "parseint(): \"zz\""),
        (r#"try(lookup({}, "k"))"#, "try(): no argument evaluates; the last: lookup(): no key \"k\""),
        (r#"formatdate("YYY", "2024-01-01T00:00:00Z")"#, "formatdate(): \"YYY\": YYY is not a format letter sequence"),
        (r#"timeadd("2024-01-01T00:00:00Z", "1d")"#, "timeadd(): \"1d\" is not a duration"),
        (r#"formatdate("YYYY", "yesterday")"#, "formatdate(): \"yesterday\" is not an RFC 3339 timestamp"),
    ] {
        let got = value_of(expr).unwrap_err();
        assert!(got.contains(error), "{expr}: {got}");
    }
}

#[test]
fn target_contexts_bring_their_targets_and_cycles_are_named() {
    let text = r#"
target "base" {
  dockerfile = "base.Dockerfile"
}
target "app" {
  contexts = { base = "target:base", docs = "./docs" }
}
target "a" {
  contexts = { b = "target:b" }
}
target "b" {
  contexts = { a = "target:a" }
}
target "orphan" {
  contexts = { x = "target:missing" }
}
"#;
    let app = printed(&[("f.hcl", text)], &[], &["app"]).unwrap();
    assert_eq!(app["group"]["default"]["targets"], json!(["app"]));
    assert_eq!(app["target"]["base"]["output"], json!([{"type": "cacheonly"}]), "{app:#}");
    assert!(app["target"]["app"].get("output").is_none());
    let both = printed(&[("f.hcl", text)], &[], &["app", "base"]).unwrap();
    assert!(both["target"]["base"].get("output").is_none(), "a requested target keeps its outputs");
    let error = printed(&[("f.hcl", text)], &[], &["a"]).unwrap_err();
    assert!(error.contains("target: contexts cycle: a -> b -> a"), "{error}");
    let error = printed(&[("f.hcl", text)], &[], &["orphan"]).unwrap_err();
    assert!(error.contains("target \"orphan\": context target:missing: no such target"), "{error}");
}

#[test]
fn set_overrides_apply_by_pattern_after_inherits() {
    let text = r#"
target "common" {
  args = { A = "1" }
}
target "api" {
  inherits = ["common"]
  tags = ["api:1"]
  platforms = ["linux/amd64"]
}
target "web" {
  inherits = ["common"]
  tags = ["web:1"]
}
group "default" {
  targets = ["api", "web"]
}
"#;
    let definition = load(&files(&[("docker-bake.hcl", text)]), &|_| None).unwrap();
    let overrides: Vec<Override> = [
        "*.platform=linux/arm64, linux/amd64",
        "web.tags=web:2",
        "web.tags+=web:3",
        "api.tags+=api:2",
        "w?b.args.B=2",
        "api.no-cache=true",
    ]
    .iter()
    .map(|s| Override::parse(s).unwrap())
    .collect();
    let resolved = resolve(&definition, &[], &overrides).unwrap();
    assert_eq!(
        print(&definition, &[], &resolved),
        json!({
            "group": {"default": {"targets": ["api", "web"]}},
            "target": {
                "api": {
                    "context": ".", "dockerfile": "Dockerfile", "args": {"A": "1"},
                    "tags": ["api:1", "api:2"], "platforms": ["linux/arm64", "linux/amd64"], "no-cache": true
                },
                "web": {
                    "context": ".", "dockerfile": "Dockerfile", "args": {"A": "1", "B": "2"},
                    "tags": ["web:2", "web:3"], "platforms": ["linux/arm64", "linux/amd64"]
                }
            }
        })
    );
    for (text, error) in [
        ("api.bogus=1", "--set api.bogus=1: unknown attribute \"bogus\""),
        ("api.args=1", "--set api.args=1: args needs a name: api.args.NAME=VALUE"),
        ("api", "--set api: expected PATTERN.KEY=VALUE"),
        ("api.target+=x", "--set api.target+=x: += appends to lists; target is not one"),
    ] {
        assert_eq!(Override::parse(text).unwrap_err(), error);
    }
    let bad = [Override::parse("api.pull=maybe").unwrap()];
    assert_eq!(resolve(&definition, &[], &bad).unwrap_err(), "--set api.pull=maybe: \"maybe\" is not true or false");
}

#[test]
fn compose_services_are_targets_and_bake_files_override_them() {
    let compose = r#"
services:
  db:
    image: postgres:16
  base:
    build: ./base
    image: registry.example/base:${TAG:-dev}
  api.v2:
    build:
      context: api
      dockerfile: api.Dockerfile
      args:
        - GO_VERSION=1.22
        - COST=$$5
        - FROM_ENV
      labels:
        team: ${TEAM}
      additional_contexts:
        base: service:base
        docs: ./docs
      secrets:
        - npm
        - source: token
          target: gh
      x-bake:
        platforms: [linux/amd64, linux/arm64]
        cache-to: ["type=local,dest=cache"]
    image: registry.example/api
secrets:
  npm:
    file: ./npmrc
  token:
    environment: GH_TOKEN
"#;
    let bake = r#"
target "api_v2" {
  tags = ["registry.example/api:${TAG}"]
}
variable "TAG" {
  default = "latest"
}
"#;
    let files = [("compose.yaml", compose), ("docker-bake.hcl", bake)];
    let out = printed(&files, &[("TAG", "v3"), ("TEAM", "core")], &[]).unwrap();
    assert_eq!(
        out,
        json!({
            "group": {"default": {"targets": ["api_v2", "base"]}},
            "target": {
                "api_v2": {
                    "context": "api",
                    "contexts": {"base": "target:base", "docs": "./docs"},
                    "dockerfile": "api.Dockerfile",
                    "args": {"COST": "$5", "GO_VERSION": "1.22"},
                    "labels": {"team": "core"},
                    "tags": ["registry.example/api:v3"],
                    "cache-to": [{"type": "local", "dest": "cache"}],
                    "secret": [{"id": "npm", "src": "./npmrc"}, {"id": "gh", "env": "GH_TOKEN"}],
                    "platforms": ["linux/amd64", "linux/arm64"]
                },
                "base": {"context": "./base", "dockerfile": "Dockerfile", "tags": ["registry.example/base:v3"]}
            }
        })
    );
    // Unset variables take their defaults; files in a directory resolve contexts there.
    let ci = "services:\n  app:\n    build:\n      additional_contexts: [docs=./docs]\n      secrets: [npm]\n    image: a:${TAG:-dev}\n\
              secrets:\n  npm:\n    file: npmrc\n";
    let other = "services:\n  tool:\n    build: tool\n";
    let out = printed(&[("ci/compose.yml", ci), ("docker-compose.yml", other)], &[], &[]).unwrap();
    assert_eq!(out["target"]["app"]["context"], "ci/.");
    assert_eq!(out["target"]["app"]["contexts"], json!({"docs": "ci/./docs"}));
    assert_eq!(out["target"]["app"]["secret"], json!([{"id": "npm", "src": "ci/npmrc"}]));
    assert_eq!(out["target"]["app"]["tags"], json!(["a:dev"]));
    assert_eq!(out["group"]["default"]["targets"], json!(["app", "tool"]), "two compose files' services");

    for (text, error) in [
        (
            "services:\n  a:\n    build:\n      ssh: [default]\n",
            "compose.yaml: services.a.build: ssh: not supported by Kiln",
        ),
        ("services:\n  a:\n    build: .\n    image: ${MUST:?set MUST}\n", "compose.yaml:4: MUST: set MUST"),
        ("services:\n  a: [\n", "compose.yaml:3: "),
        ("x: &x [1, 2]\ny: [*x, *x]\n", "compose.yaml:2: YAML aliases are not supported"),
        (&format!("x: {}1{}\n", "[".repeat(70), "]".repeat(70)), "compose.yaml:1: nesting deeper than 64 levels"),
        (
            "services:\n  a:\n    build:\n      secrets: [nope]\n",
            "services.a.build: secrets: \"nope\" is not in the top-level secrets",
        ),
    ] {
        let error_text = printed(&[("compose.yaml", text)], &[], &[]).unwrap_err();
        assert!(error_text.contains(error), "{text}: {error_text}");
    }
}

#[test]
fn unclosed_and_too_deep_nesting_is_refused_before_parsing() {
    // Brackets inside strings, templates, heredocs and comments do not count.
    let valid = r#"
# a comment with { and [
/* a block comment with ( { */
target "t" {
  // another { comment
  args = { A = "}{", B = "${lower("}")}", C = "$${not {", D = "%%{ x" }
  dockerfile-inline = <<-EOT
    FROM busybox
    RUN echo '{ [ ('
  EOT
  tags = ["a:${join("-", ["x", "}"])}"]
}
"#;
    let out = printed(&[("f.hcl", valid)], &[], &["t"]).unwrap();
    assert_eq!(out["target"]["t"]["args"]["B"], "}");
    assert_eq!(out["target"]["t"]["tags"], json!(["a:x-}"]));
    for (text, error) in [
        ("target \"t\" {\n  args = { A = [\"x\"\n}\n", "f.hcl:2: this { is never closed"),
        ("target \"t\" {\n  tags = [\"x\n", "f.hcl:2: this string is never closed"),
        ("x = \"${lower(\n", "f.hcl:1: this ( is never closed"),
        ("x = \"${lower(\"a\")\n", "f.hcl:1: this ${ or %{ is never closed"),
    ] {
        assert_eq!(printed(&[("f.hcl", text)], &[], &[]).unwrap_err(), error, "{text}");
    }
    let deep = format!("x = {}1{}\n", "[".repeat(40), "]".repeat(40));
    assert_eq!(printed(&[("f.hcl", &deep)], &[], &[]).unwrap_err(), "f.hcl:1: nesting deeper than 32 levels");
    // The input the fuzzer found: unclosed objects inside traversals; hcl-edit alone took
    // seconds to minutes on it.
    let fuzzed = "f= {U%U%{f= UUU%U%{fU*UU%U[S%U%U[UUUUU%U%{f= {}*SSS%UUU%U%{f*UU%U[UUU%U%U%U[U%U%{f= {}*USS%U[UUUUU%U%{fUU*UU%U[S%U%U[U*U%{f=SSUUUUU*SS%U[UUU%U%U%U[UUUUU%U%{".repeat(4);
    assert!(printed(&[("f.hcl", &fuzzed)], &[], &[]).unwrap_err().contains("f.hcl:1: "));
    // A JSON file's template strings are checked the same way.
    let json_file = r#"{"target": {"t": {"tags": ["${lower(\"x\""]}}}"#;
    let error = printed(&[("f.json", json_file)], &[], &["t"]).unwrap_err();
    assert!(error.contains("template \"${lower(\\\"x\\\"\": this ( is never closed"), "{error}");
}
