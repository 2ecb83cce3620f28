//! Config parsing: the examples under deploy/config, defaults, and errors that name the key.

use super::*;

/// Validates `text`, with `[tls] insecure = true` added when it has no `[tls]` of its own.
fn validate(text: &str) -> Result<Config, String> {
    let text = if text.contains("[tls]") { text.to_string() } else { format!("{text}\n[tls]\ninsecure = true\n") };
    ConfigFile::parse(&text, "kiln.toml").and_then(|file| file.validate("kiln.toml")).map_err(|e| e.to_string())
}

#[test]
fn every_example_under_deploy_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let file = ConfigFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            file.validate(&path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
            seen += 1;
        }
    }
    assert!(seen >= 4, "expected the example configs, found {seen}");
}

#[test]
fn defaults_fill_what_is_left_out() {
    let config = validate("[worker]\ncoordinator = \"http://127.0.0.1:7070\"\n").unwrap();
    let worker = config.worker.unwrap();
    assert_eq!(worker.platforms, vec![Platform::host()]);
    assert_eq!(worker.root, PathBuf::from("/var/lib/kiln/worker"));
    assert_eq!(worker.gc.keep_duration, Duration::from_secs(48 * 3600));
    assert_eq!(worker.gc.reserved_space, None, "a share of the disk, decided by the worker");
    assert!(worker.max_parallelism.is_none());
    let named = |listen: &str| {
        let text = format!("[worker]\ncoordinator = \"http://127.0.0.1:7070\"\nlisten = \"{listen}\"\n");
        let listen: std::net::SocketAddr = listen.parse().unwrap();
        assert_eq!(validate(&text).unwrap().worker.unwrap().name, None);
        crate::default_worker_name(listen)
    };
    // Two workers of one host listen on different addresses, so their default names differ.
    assert_ne!(named("127.0.0.2:7071"), named("127.0.0.3:7071"));
    assert!(named("127.0.0.2:7071").ends_with("-127.0.0.2-7071"), "{}", named("127.0.0.2:7071"));
    assert!(named("0.0.0.0:7071").ends_with("-7071") && !named("0.0.0.0:7071").contains("0.0.0.0"));
    let config = validate("[coordinator]\nlisten = \"127.0.0.1:7070\"\n").unwrap();
    let coordinator = config.coordinator.unwrap();
    assert_eq!((coordinator.lease_timeout, coordinator.retry_budget), (Duration::from_secs(10), 3));
    assert_eq!(coordinator.upload_idle_timeout, Duration::from_secs(60));
    assert_eq!(coordinator.shared_cache, None);
    let shared =
        "[coordinator]\nlisten = \"127.0.0.1:7070\"\n[coordinator.cache]\nshared = \"type=registry,ref=r/c\"\n";
    let spec = validate(shared).unwrap().coordinator.unwrap().shared_cache.unwrap();
    assert_eq!((spec.source(), spec.mode), ("registry:r/c".to_string(), kiln_model::CacheMode::Max));
}

#[test]
fn mistakes_are_errors_that_name_the_key() {
    let cases = [
        ("[worker]\ncoordinator = \"http://c:1\"\nmax-paralelism = 4\n", "unknown field `max-paralelism`"),
        ("[coordinator]\nlisten = \"nowhere\"\n", "coordinator.listen"),
        (
            "[coordinator]\nlisten = \"127.0.0.1:1\"\n[coordinator.cache]\nshared = \"type=s3\"\n",
            "coordinator.cache.shared",
        ),
        (
            "[coordinator]\nlisten = \"127.0.0.1:1\"\n[coordinator.cache]\nshared = \"r/c\"\nmode = \"all\"\n",
            "coordinator.cache.mode",
        ),
        (
            "[coordinator]\nlisten = \"127.0.0.1:1\"\n[coordinator.cache]\nshared = \"type=registry,ref=r/c,mode=min\"\nmode = \"max\"\n",
            "given in `shared` too",
        ),
        ("[worker]\ncoordinator = \"ftp://c:1\"\n", "worker.coordinator"),
        ("[worker]\nroot = \"/w\"\n", "worker.coordinator: required"),
        ("[worker]\ncoordinator = \"http://c:1\"\nplatforms = [\"linux/amd64\", \"\"]\n", "worker.platforms[1]"),
        ("[worker]\ncoordinator = \"http://c:1\"\nmax-parallelism = 0\n", "at least 1"),
        (
            "[worker]\ncoordinator = \"http://c:1\"\n[worker.gc]\nreserved-space = \"lots\"\n",
            "worker.gc.reserved-space",
        ),
        ("[coordinator]\nlisten = \"127.0.0.1:1\"\nlease-timeout = \"10 parsecs\"\n", "coordinator.lease-timeout"),
        (
            "[coordinator]\nlisten = \"127.0.0.1:1\"\n[log]\nformat = \"xml\"\n",
            "log.format: \"xml\" is not text or json",
        ),
        ("[runner]\n", "unknown field `runner`"),
        ("", "needs a [coordinator] or a [worker]"),
        ("[worker\n", "kiln.toml"),
    ];
    for (text, expected) in cases {
        let err = validate(text).unwrap_err();
        assert!(err.contains(expected), "{text:?}: {err}");
        assert!(err.starts_with("kiln.toml"), "{err}");
    }
}

#[test]
fn tls_and_tokens() {
    let worker = "[worker]\ncoordinator = \"https://c:1\"\n";
    let files = format!("{worker}[tls]\nca = \"/t/ca.pem\"\ncert = \"/t/w.pem\"\nkey = \"/t/w-key.pem\"\n");
    let tls = validate(&files).unwrap().tls;
    let expected = Tls::Files { ca: "/t/ca.pem".into(), cert: "/t/w.pem".into(), key: "/t/w-key.pem".into() };
    assert_eq!(tls, expected);
    assert_eq!(validate("[worker]\ncoordinator = \"http://c:1\"\n").unwrap().tls, Tls::Insecure);
    assert!(validate(worker).unwrap_err().contains("worker.coordinator: \"https://c:1\": http:// with insecure"));
    let hash = "a".repeat(64);
    let coordinator =
        |tokens: &str| format!("[coordinator]\nlisten = \"127.0.0.1:1\"\n{tokens}[tls]\ninsecure = true\n");
    let token = |name: &str, role: &str, sha: &str| {
        format!(
            "[[coordinator.tokens]]\nname = \"{name}\"\ntenant = \"team-a\"\nrole = \"{role}\"\nsha256 = \"{sha}\"\n"
        )
    };
    let tokens = validate(&coordinator(&token("ci", "build", &hash.to_uppercase()))).unwrap().tokens;
    assert_eq!(
        tokens,
        [ClientToken {
            name: "ci".into(),
            tenant: "team-a".into(),
            role: kiln_model::Role::Build,
            sha256: hash.clone()
        }]
    );
    let with_tenant =
        |section: &str| coordinator(&(token("ci", "build", &hash) + "[coordinator.tenants.team-a]\n" + section));
    let tenants = "cache-group = \"shared\"\nmax-builds = 2\nmax-upload = \"1MiB\"\n";
    let policies = validate(&with_tenant(tenants)).unwrap().tenants;
    let expected = kiln_model::TenantPolicy {
        cache_group: Some("shared".into()),
        max_builds: Some(2),
        max_queued_vertices: None,
        max_upload: Some(1 << 20),
        max_stored: None,
    };
    assert_eq!(policies.get("team-a"), Some(&expected));
    let cases = [
        (format!("{worker}[tls]\n"), "tls: kilnd serves TCP".to_string()),
        (with_tenant("max-builds = 0\n"), "coordinator.tenants.team-a.max-builds: at least 1".into()),
        (with_tenant("max-upload = \"lots\"\n"), "coordinator.tenants.team-a.max-upload".into()),
        (with_tenant("cache-group = \"\"\n"), "coordinator.tenants.team-a.cache-group".into()),
        (with_tenant("max-build = 1\n"), "max-build".into()),
        (
            coordinator("[coordinator.tenants.team-b]\nmax-builds = 1\n"),
            "coordinator.tenants.team-b: no token names the tenant \"team-b\"".into(),
        ),
        (format!("{worker}[tls]\nca = \"/ca.pem\"\ncert = \"/c.pem\"\n"), "tls.key: required".to_string()),
        (format!("{files}insecure = true\n"), "tls.insecure".to_string()),
        (files.replace("https", "http"), "worker.coordinator: \"http://c:1\": https://".to_string()),
        (coordinator(&token("ci", "root", &hash)), "coordinator.tokens[0]: role of \"ci\"".to_string()),
        (coordinator(&token("ci", "build", "abc")), "coordinator.tokens[0]: sha256".to_string()),
        (coordinator(&(token("a", "build", &hash) + &token("b", "admin", &hash))), "coordinator.tokens[1]".to_string()),
    ];
    for (text, expected) in cases {
        let err = validate(&text).unwrap_err();
        assert!(err.contains(&expected), "{text:?}: {err}");
    }
}

#[test]
fn units_parse() {
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
    assert_eq!(parse_size("42").unwrap(), 42);
    assert!(parse_duration("5").is_err() && parse_size("5XB").is_err());
}

#[test]
fn replicated_coordinators_and_coordinator_lists() {
    let coordinator = |keys: &str| format!("[coordinator]\nlisten = \"127.0.0.1:1\"\n{keys}");
    let peers = "peers = [\"1=http://127.0.0.1:7070\", \"2=http://127.0.0.2:7070\", \" 3 = http://c3:7070\"]\n";
    let config = validate(&coordinator(&format!("node-id = 2\n{peers}"))).unwrap();
    let replicas = config.coordinator.unwrap().replicas.unwrap();
    assert_eq!(replicas.node_id, 2);
    assert_eq!(replicas.peers.len(), 3);
    assert_eq!(replicas.peers[&3], "http://c3:7070");
    assert_eq!(validate(&coordinator("")).unwrap().coordinator.unwrap().replicas, None);
    let cases = [
        (format!("node-id = 4\n{peers}"), "coordinator.node-id: 4 is not among the peers"),
        (format!("node-id = 0\n{peers}"), "coordinator.node-id: must be at least 1"),
        (peers.to_string(), "coordinator.node-id: required with peers"),
        ("node-id = 1\n".to_string(), "coordinator.peers: required with node-id"),
        ("node-id = 1\npeers = [\"1=http://a:1\", \"1=http://b:1\"]\n".into(), "the id 1 is listed twice"),
        ("node-id = 1\npeers = [\"http://a:1\"]\n".into(), "is not ID=URL"),
        ("node-id = 1\npeers = [\"x=http://a:1\"]\n".into(), "the id must be a number"),
        ("node-id = 1\npeers = [\"1=http://a\"]\n".into(), "is not http(s)://HOST:PORT"),
        (
            "node-id = 1\npeers = [\"1=https://a:1\"]\n[tls]\ninsecure = true\n".into(),
            "coordinator.peers: \"https://a:1\": http://",
        ),
    ];
    for (keys, expected) in cases {
        let error = validate(&coordinator(&keys)).unwrap_err();
        assert!(error.contains(expected), "{keys:?}: {error}");
    }

    let worker = validate("[worker]\ncoordinator = \"http://a:1, http://b:2,http://c:3\"\n").unwrap().worker.unwrap();
    let list = worker.coordinator.unwrap();
    assert_eq!(crate::coordinator_urls(&list), vec!["http://a:1", "http://b:2", "http://c:3"]);
    let error = validate("[worker]\ncoordinator = \"http://a:1,ftp://b:2\"\n").unwrap_err();
    assert!(error.contains("worker.coordinator: \"ftp://b:2\""), "{error}");
    let error = validate("[worker]\ncoordinator = \" , \"\n").unwrap_err();
    assert!(error.contains("names no coordinator"), "{error}");
}
