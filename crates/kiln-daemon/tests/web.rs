//! The web UI in a real browser: a standalone `kilnd --web-listen` runs real builds (a
//! registry's busybox, real containers), and headless Chromium, driven over WebDriver by
//! Debian's chromedriver, reads the pages. Screenshots of each page go to
//! `target/kiln-web-screenshots/` (the current ones are committed under `docs/images/`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use kiln_testkit::{TestRegistry, workspace_binary};

/// How long the browser waits for what a page should show.
const PAGE_WAIT: Duration = Duration::from_secs(60);

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `kilnd`, its log in `log`, and waits for the line saying it serves the web UI on
/// `web` (its port).
fn kilnd(command: &mut Command, log: &Path, web: u16) -> Killed {
    let mut child = command.env("KILN_RUNNER", workspace_binary("kiln-runner")).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let daemon = Killed(child);
    let listening = format!("listening on 127.0.0.1:{web}");
    if let Err(error) = kiln_testkit::wait_for_line(stderr, &listening, Some(log), Duration::from_secs(60)) {
        panic!("kilnd: {error}\n{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    daemon
}

struct Site {
    _registry: TestRegistry,
    base: String,
    dir: tempfile::TempDir,
    _daemon: Killed,
    socket: PathBuf,
    web: String,
}

impl Site {
    fn start() -> Site {
        workspace_binary("kiln-runner");
        let registry = TestRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let base = kiln_testkit::push_busybox(&registry, dir.path(), "kiln/busybox:web");
        let root = dir.path().join("root");
        let port = free_port();
        let log = dir.path().join("kilnd.log");
        let daemon = kilnd(
            Command::new(env!("CARGO_BIN_EXE_kilnd"))
                .args([
                    "--standalone",
                    "--max-parallelism",
                    "2",
                    "--web-listen",
                    &format!("127.0.0.1:{port}"),
                    "--root",
                ])
                .arg(&root),
            &log,
            port,
        );
        Site {
            _registry: registry,
            base,
            socket: root.join("kilnd.sock"),
            dir,
            _daemon: daemon,
            web: format!("http://127.0.0.1:{port}"),
        }
    }

    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let context = self.dir.path().join(name);
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), dockerfile.replace("BASE", &self.base)).unwrap();
        context
    }

    /// Starts `kiln build CONTEXT` with a metadata file; returns it with the file.
    fn spawn_build(&self, context: &Path) -> (Child, PathBuf) {
        let metadata = context.with_extension("json");
        let child = Command::new(workspace_binary("kiln"))
            .args(["--addr", &format!("unix://{}", self.socket.display()), "build", "--progress", "plain"])
            .arg("--metadata-file")
            .arg(&metadata)
            .arg(context)
            .env_remove("KILN_ADDR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, metadata)
    }

    /// Builds `context` to its end; returns its metadata.
    fn build(&self, context: &Path) -> serde_json::Value {
        let (child, metadata) = self.spawn_build(context);
        let output = child.wait_with_output().unwrap();
        let written = std::fs::read(&metadata).unwrap_or_else(|e| {
            panic!("no metadata from the build ({e}): {}", String::from_utf8_lossy(&output.stderr))
        });
        serde_json::from_slice(&written).unwrap()
    }
}

/// Headless Chromium through chromedriver.
async fn browser() -> (Killed, Client) {
    let port = free_port();
    let mut child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; cargo xtask installs it)");
    let stdout = child.stdout.take().unwrap();
    let driver = Killed(child);
    kiln_testkit::wait_for_line(stdout, "started successfully", None, Duration::from_secs(60)).expect("chromedriver");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"]}),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a chromium session");
    (driver, client)
}

async fn screenshot(client: &Client, name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kiln-web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), client.screenshot().await.unwrap()).unwrap();
}

async fn wait_for(client: &Client, css: &str) -> fantoccini::elements::Element {
    client
        .wait()
        .at_most(PAGE_WAIT)
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never showed: {e}"))
}

#[test]
fn the_web_ui_shows_builds_timelines_dedup_failures_and_updates_live() {
    let site = Site::start();
    // A build, a failing one, and two that share a step (one waits on the other).
    let done =
        site.build(&site.context("done", "FROM BASE\nRUN echo one > /one\nRUN echo two && echo to-stderr >&2\n"));
    let failed = site.build(&site.context("failed", "FROM BASE\nRUN echo fine\nRUN echo doomed-output && exit 3\n"));
    let shared = "FROM BASE\nRUN sleep 1 && echo shared > /shared\n";
    let first = site.spawn_build(&site.context("shared-1", shared));
    let second = site.spawn_build(&site.context("shared-2", shared));
    let mut pair = Vec::new();
    for (child, metadata) in [first, second] {
        child.wait_with_output().unwrap();
        pair.push(serde_json::from_slice::<serde_json::Value>(&std::fs::read(metadata).unwrap()).unwrap());
    }
    let id = |metadata: &serde_json::Value| metadata["build_id"].as_str().unwrap().to_string();
    let step = |metadata: &serde_json::Value| {
        metadata["vertices"].as_array().unwrap().iter().find(|v| v["kind"] == "exec").unwrap().clone()
    };
    pair.sort_by_key(|m| step(m)["status"] != "deduplicated");
    let (waiter, executor) = (id(&pair[0]), id(&pair[1]));
    assert_eq!(step(&pair[0])["status"], "deduplicated", "{pair:#?}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (_driver, client) = browser().await;

        // The builds: every one, with its status.
        client.goto(&site.web).await.unwrap();
        for (metadata, status) in [(&done, "succeeded"), (&failed, "failed"), (&pair[0], "succeeded")] {
            wait_for(&client, &format!("tr.build[data-id='{}'][data-status='{status}']", id(metadata))).await;
        }
        screenshot(&client, "builds").await;

        // A build's timeline: one bar per vertex, its outcome as a class, the worker's name.
        client.goto(&format!("{}/builds/{}", site.web, id(&done))).await.unwrap();
        wait_for(&client, "#timeline .row.vertex").await;
        let bars = client.find_all(Locator::Css("#timeline .bar")).await.unwrap();
        assert_eq!(bars.len(), done["vertices"].as_array().unwrap().len());
        for vertex in done["vertices"].as_array().unwrap() {
            let bar = client
                .find(Locator::Css(&format!(".bar[data-digest='{}']", vertex["digest"].as_str().unwrap())))
                .await
                .unwrap();
            let class = bar.attr("class").await.unwrap().unwrap_or_default();
            assert!(class.contains(&format!("status-{}", vertex["status"].as_str().unwrap())), "{class} for {vertex}");
            let row = format!(".row[data-digest='{}'] .worker", vertex["digest"].as_str().unwrap());
            assert_eq!(client.find(Locator::Css(&row)).await.unwrap().text().await.unwrap(), "local");
        }
        // A step's output on click.
        let run = done["vertices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str().unwrap().contains("echo two"))
            .unwrap();
        client
            .find(Locator::Css(&format!(".bar[data-digest='{}']", run["digest"].as_str().unwrap())))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::XPath("//pre[@id='logs'][contains(., 'to-stderr')]"))
            .await
            .unwrap();
        screenshot(&client, "build").await;

        // A deduplicated step links to the build that executed it.
        client.goto(&format!("{}/builds/{waiter}", site.web)).await.unwrap();
        let link = wait_for(&client, "a.dedup").await;
        assert_eq!(link.attr("href").await.unwrap().as_deref(), Some(format!("/builds/{executor}").as_str()));

        // A failed build shows its failing line in context.
        client.goto(&format!("{}/builds/{}", site.web, id(&failed))).await.unwrap();
        let line = wait_for(&client, "#failing .failing-line").await;
        assert!(line.text().await.unwrap().contains("exit 3"), "{}", line.text().await.unwrap());
        assert!(client.find(Locator::Css(".bar.status-failed")).await.is_ok());
        screenshot(&client, "failed").await;

        // The builds page follows a build live: it appears running, then ends, without a reload.
        client.goto(&site.web).await.unwrap();
        wait_for(&client, "tr.build").await;
        let (running, metadata) = site.spawn_build(&site.context("live", "FROM BASE\nRUN sleep 3\nRUN echo after\n"));
        wait_for(&client, "tr.build[data-status='running']").await;
        screenshot(&client, "running").await;
        let output = running.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let live: serde_json::Value = serde_json::from_slice(&std::fs::read(metadata).unwrap()).unwrap();
        wait_for(&client, &format!("tr.build[data-id='{}'][data-status='succeeded']", id(&live))).await;

        // The workers page: this daemon's worker runs three stages two at a time (its
        // max-parallelism), the third queued, and shows its cache.
        client.goto(&format!("{}/workers", site.web)).await.unwrap();
        wait_for(&client, "tr.worker-row[data-name='local'][data-state='ready']").await;
        let stages = "FROM BASE AS one\nRUN sleep 4 && echo 1 > /a\nFROM BASE AS two\nRUN sleep 4 && echo 2 > /a\n\
                      FROM BASE AS three\nRUN sleep 4 && echo 3 > /a\nFROM BASE\nCOPY --from=one /a /1\n\
                      COPY --from=two /a /2\nCOPY --from=three /a /3\n";
        let (busy, _) = site.spawn_build(&site.context("busy", stages));
        let running = "//tr[@data-name='local']//div[contains(@class, 'running-step')][contains(., 'RUN sleep 4')]";
        client.wait().at_most(PAGE_WAIT).for_element(Locator::XPath(running)).await.unwrap();
        wait_for(&client, "tr[data-name='local'] td.slots[data-busy='2'][data-free='0']").await;
        let cache = client.find(Locator::Css("tr[data-name='local'] td.cache")).await.unwrap();
        let cached: u64 = cache.attr("data-bytes").await.unwrap().unwrap().parse().unwrap();
        assert!(cached > 0, "the earlier builds' layers are in the cache");
        screenshot(&client, "workers").await;
        let output = busy.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

        // The cluster page: the hit rate, what deduplication saved (the shared step's second
        // second), and the queue over time.
        client.goto(&format!("{}/cluster", site.web)).await.unwrap();
        let saved = wait_for(&client, "#dedup-saved").await;
        let saved_ms: u64 = saved.attr("data-ms").await.unwrap().unwrap().parse().unwrap();
        assert!(saved_ms >= 1000, "the shared step slept 1 s: {saved_ms} ms saved");
        assert!(client.find(Locator::Css("#cache-hit-rate")).await.unwrap().text().await.unwrap().ends_with('%'));
        let host = kiln_types::Platform::host().to_string();
        wait_for(&client, &format!("#queue-chart polyline.queue-line[data-platform='{host}']")).await;
        screenshot(&client, "cluster").await;
        client.close().await.unwrap();
    });
    // The queue was sampled while the third stage waited for a slot.
    let (status, body) = kiln_testkit::http_get(site.web.trim_start_matches("http://"), "/api/cluster");
    assert_eq!(status, 200, "{body}");
    let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
    let host = kiln_types::Platform::host().to_string();
    let queued = cluster["queues"].as_array().unwrap().iter().filter_map(|s| s["platforms"][&host]["queued"].as_u64());
    assert!(queued.max().unwrap_or(0) >= 1, "{cluster}");
    let steps = &cluster["steps"];
    assert!(steps["cached"].as_u64().unwrap() > 0 && steps["deduplicated"].as_u64().unwrap() >= 1, "{cluster}");

    // The CLI names the page of a build, and `kiln build` prints it at the end.
    let kiln = |args: &[&str]| {
        Command::new(workspace_binary("kiln"))
            .args(["--addr", &format!("unix://{}", site.socket.display())])
            .args(args)
            .env_remove("KILN_ADDR")
            .output()
            .unwrap()
    };
    let out = kiln(&["history", "open", &id(&done)]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{}/builds/{}", site.web, id(&done)));
    let out = kiln(&["build", site.dir.path().join("done").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("web: {}/builds/", site.web)), "{stderr}");
}

#[test]
fn with_tokens_the_web_ui_asks_for_one_and_shows_a_tenant_its_own_builds() {
    workspace_binary("kiln-runner");
    let registry = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let base = kiln_testkit::push_busybox(&registry, dir.path(), "kiln/busybox:tokens");
    let (api, web) = (free_port(), free_port());
    let sha = |token: &str| kiln_types::Digest::of(token.as_bytes()).hex();
    let token = |name: &str, tenant: &str, role: &str| {
        format!(
            "[[coordinator.tokens]]\nname = \"{name}\"\ntenant = \"{tenant}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            sha(name)
        )
    };
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[coordinator]\nlisten = \"127.0.0.1:{api}\"\nweb-listen = \"127.0.0.1:{web}\"\n[worker]\nroot = \"{}\"\n\
             [tls]\ninsecure = true\n{}{}",
            dir.path().join("root").display(),
            token("viewer", "default", "read"),
            token("stranger", "team-b", "read"),
        ),
    )
    .unwrap();
    let log = dir.path().join("kilnd.log");
    let _daemon = kilnd(Command::new(env!("CARGO_BIN_EXE_kilnd")).arg("--config").arg(&config), &log, web);
    // A build over the unix socket (the default tenant's).
    let context = dir.path().join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("Dockerfile"), format!("FROM {base}\nRUN echo hi\n")).unwrap();
    let kiln =
        |args: &[&str]| Command::new(workspace_binary("kiln")).args(args).env_remove("KILN_ADDR").output().unwrap();
    let socket = format!("unix://{}", dir.path().join("root/kilnd.sock").display());
    let out = kiln(&["--addr", &socket, "build", context.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A read token may look, not build.
    let tcp = format!("http://127.0.0.1:{api}");
    let out = kiln(&["--addr", &tcp, "--token", "viewer", "build", context.to_str().unwrap()]);
    let refused = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(refused.contains("needs a build or admin token; the token \"viewer\" may only read"), "{refused}");
    let out = kiln(&["--addr", &tcp, "--token", "viewer", "history", "ls", "--format", "json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().len(), 1);
    // The API wants a token.
    let (status, _) = kiln_testkit::http_get(&format!("127.0.0.1:{web}"), "/api/builds");
    assert_eq!(status, 401);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (_driver, client) = browser().await;
        let site = format!("http://127.0.0.1:{web}");
        let login = |token: &'static str| {
            let (client, site) = (&client, &site);
            async move {
                client.goto(&format!("{site}/login")).await.unwrap();
                wait_for(client, "#token").await.send_keys(token).await.unwrap();
                client.find(Locator::Css("#login-button")).await.unwrap().click().await.unwrap();
            }
        };
        // The pages send a browser without a token to the login.
        client.goto(&site).await.unwrap();
        wait_for(&client, "form#login").await;
        login("not-a-token").await;
        client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::XPath("//p[@id='login-error'][contains(., 'not one of')]"))
            .await
            .unwrap();
        // The default tenant's reader sees its build; another tenant's sees none.
        login("viewer").await;
        wait_for(&client, "tr.build[data-status='succeeded']").await;
        login("stranger").await;
        client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::XPath("//p[contains(., 'No builds yet')]"))
            .await
            .unwrap();
        client.close().await.unwrap();
    });
}
