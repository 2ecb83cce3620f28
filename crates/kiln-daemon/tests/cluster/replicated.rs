//! Replicated coordinators: three coordinator `kilnd`s (raft over mutual TLS) on 127.0.N.1-3
//! and workers that know all three; `kiln` is given the list. Leaders are SIGKILLed and
//! SIGSTOPped; followers are killed and restarted.

use super::*;

struct Replicated {
    /// Serves the base image for as long as the cluster runs.
    _registry: TestRegistry,
    base: String,
    dir: tempfile::TempDir,
    net: u8,
    /// Member `i + 1`'s process, while it runs.
    coordinators: Vec<Option<Child>>,
    workers: Vec<Child>,
}

impl Replicated {
    /// Three coordinators and `workers` amd64 workers with two slots each.
    fn start(net: u8, workers: usize) -> Replicated {
        workspace_binary("kiln-runner");
        let registry = TestRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let base = push_base(&registry, dir.path());
        let mut cluster =
            Replicated { _registry: registry, base, dir, net, coordinators: Vec::new(), workers: Vec::new() };
        for id in 1..=3 {
            cluster.coordinators.push(None);
            cluster.start_coordinator(id);
        }
        for i in 0..workers {
            let host = format!("127.0.{net}.{}", 11 + i);
            let name = format!("w{}", i + 1);
            let tls = certificate(cluster.dir.path(), &name, &host);
            let config = cluster.dir.path().join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[worker]\ncoordinator = \"{}\"\nname = \"{name}\"\nlisten = \"{host}:7071\"\nroot = \"{}\"\n\
                     platforms = [\"linux/amd64\"]\nmax-parallelism = 2\n{tls}",
                    cluster.list(),
                    cluster.dir.path().join(&name).display(),
                ),
            )
            .unwrap();
            cluster.workers.push(kilnd(&config, &cluster.dir.path().join(format!("{name}.log"))));
        }
        cluster
    }

    fn url(&self, id: u64) -> String {
        format!("https://127.0.{}.{id}:7070", self.net)
    }

    /// Every coordinator's URL, comma-separated.
    fn list(&self) -> String {
        (1..=3).map(|id| self.url(id)).collect::<Vec<_>>().join(",")
    }

    /// Starts member `id` (again) on its state directory.
    fn start_coordinator(&mut self, id: u64) {
        let name = format!("coordinator-{id}");
        let config = self.dir.path().join(format!("{name}.toml"));
        if !config.exists() {
            // Valid for its address and for the name every member's address answers to.
            let hosts = format!("127.0.{}.{id},{ALL_MEMBERS}", self.net);
            let tls = certificate(self.dir.path(), &name, &hosts);
            let peers: Vec<String> = (1..=3).map(|peer| format!("\"{peer}={}\"", self.url(peer))).collect();
            std::fs::write(
                &config,
                format!(
                    "[coordinator]\nlisten = \"127.0.{net}.{id}:7070\"\nroot = \"{}\"\nlease-timeout = \"3s\"\n\
                     metrics-listen = \"127.0.{net}.{id}:9090\"\nnode-id = {id}\npeers = [{}]\n{tls}",
                    self.dir.path().join(&name).display(),
                    peers.join(", "),
                    net = self.net,
                ),
            )
            .unwrap();
        }
        let log = self.dir.path().join(format!("{name}-{}.log", unique()));
        self.coordinators[id as usize - 1] = Some(coordinator_kilnd(&config, &log));
    }

    fn signal(&self, id: u64, signal: &str) {
        let child = self.coordinators[id as usize - 1].as_ref().expect("member running");
        let status = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(status.success());
    }

    fn kill(&mut self, id: u64) {
        let mut child = self.coordinators[id as usize - 1].take().expect("member running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn kiln(&self, addr: &str, args: &[&str]) -> Command {
        let mut command = Command::new(workspace_binary("kiln"));
        command.arg("--addr").arg(addr).arg("--tls-ca").arg(self.dir.path().join("certs/ca.pem")).args(args);
        command.env_remove("KILN_ADDR").env_remove("KILN_TOKEN").env_remove("KILN_TLS_CA");
        command
    }

    /// `kiln history ls --format json` through the list.
    fn history(&self) -> Vec<Value> {
        let out = self.kiln(&self.list(), &["history", "ls", "--format", "json"]).output().unwrap();
        assert!(out.status.success(), "kiln history ls: {}\n{}", text(&out.stderr), self.logs());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `kiln info --format json` through `addr`, or why it failed.
    fn info(&self, addr: &str) -> Result<Value, String> {
        let out = self.kiln(addr, &["info", "--format", "json"]).output().unwrap();
        if !out.status.success() {
            return Err(text(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Polls `kiln info` through the list until `done` holds for its answer (the cluster
    /// offers no event to wait on); `what` names the wait when it times out.
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = Err(String::new());
        while Instant::now() < deadline {
            last = self.info(&self.list());
            if let Ok(info) = &last
                && done(info)
            {
                return info.clone();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: the last answer was {last:?}\n{}", self.logs());
    }

    /// Waits for a leader other than `not` whose term is above `term`, with `workers` workers
    /// registered with it.
    fn wait_for_leader(&self, not: Option<u64>, term: u64, workers: u64) -> Value {
        self.wait_for("a new leader with its workers", |info| {
            let leader = info["raft"]["leader"].as_u64();
            leader.is_some()
                && leader != not
                && info["raft"]["term"].as_u64().unwrap() > term
                && info["workers"].as_u64() == Some(workers)
        })
    }

    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let context = self.dir.path().join(name);
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), dockerfile.replace("BASE", &self.base)).unwrap();
        context
    }

    /// Builds `context` through the list into `out`; the metadata.
    fn build(&self, context: &Path, out: &Path) -> Value {
        let metadata = self.dir.path().join(format!("meta-{}.json", unique()));
        let local = format!("type=local,dest={}", out.display());
        let args = ["build", context.to_str().unwrap(), "--progress", "plain", "--metadata-file"];
        let out = self.kiln(&self.list(), &args).arg(&metadata).args(["-o", &local]).output().unwrap();
        assert!(out.status.success(), "build failed: {}\n{}", text(&out.stderr), self.logs());
        read_json(&metadata)
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
                all += &format!("\n--- {}\n{content}", entry.path().display());
            }
        }
        all
    }
}

impl Drop for Replicated {
    fn drop(&mut self) {
        for child in &mut self.workers {
            stop(child);
        }
        for child in self.coordinators.iter_mut().flatten() {
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            stop(child);
        }
    }
}

/// The name that resolves to every coordinator, for clients whose `/etc/hosts` says so.
const ALL_MEMBERS: &str = "kiln-coordinators";

fn leader_of(info: &Value) -> u64 {
    info["raft"]["leader"].as_u64().expect("a leader")
}

fn term_of(info: &Value) -> u64 {
    info["raft"]["term"].as_u64().unwrap()
}

fn roles(info: &Value) -> Vec<(u64, String)> {
    let members = info["raft"]["members"].as_array().unwrap();
    members.iter().map(|m| (m["id"].as_u64().unwrap(), m["role"].as_str().unwrap_or("").to_string())).collect()
}

#[test]
fn replicated_coordinators_keep_the_cluster_through_the_loss_of_a_leader_or_a_follower() {
    let mut cluster = Replicated::start(28, 2);
    let info = cluster.wait_for_leader(None, 0, 2);
    let leader = leader_of(&info);
    assert_eq!(info["raft"]["node_id"].as_u64(), Some(leader), "the leader answers: {info:#}");
    let expected: Vec<(u64, String)> =
        (1..=3).map(|id| (id, if id == leader { "leader" } else { "follower" }.to_string())).collect();
    assert_eq!(roles(&info), expected, "{info:#}");
    for member in info["raft"]["members"].as_array().unwrap() {
        assert_eq!(member["address"].as_str(), Some(cluster.url(member["id"].as_u64().unwrap()).as_str()));
    }
    // A follower's address alone reaches the leader: it answers with the leader's URL and
    // the client goes there.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let through_follower = cluster.info(&cluster.url(follower)).unwrap();
    assert_eq!(through_follower["raft"]["node_id"].as_u64(), Some(leader), "{through_follower:#}");
    // Each member's metrics: one leader, every member ready (a follower knows the leader),
    // and a follower sends an autoscaler to the leader's queue.
    for id in 1..=3 {
        let address = format!("127.0.28.{id}:9090");
        let page = kiln_testkit::http_get(&address, "/metrics").1;
        let leads = kiln_testkit::sample(&page, "kiln_raft_is_leader");
        assert_eq!(leads, f64::from(id == leader), "member {id}: {page}");
        assert_eq!(kiln_testkit::sample(&page, "kiln_raft_term"), term_of(&info) as f64, "member {id}");
        assert_eq!(kiln_testkit::http_get(&address, "/readyz").0, 200, "member {id}");
    }
    let (status, _) = kiln_testkit::http_get(&format!("127.0.28.{follower}:9090"), "/v1/queue?pool=p");
    assert_eq!(status, 307);
    let redirect = kiln_testkit::http_response(&format!("127.0.28.{follower}:9090"), "/v1/queue?pool=p").unwrap();
    assert!(redirect.contains(&format!("location: http://127.0.28.{leader}:9090/v1/queue?pool=p\r\n")), "{redirect}");

    let context = cluster.context("steps", "FROM BASE\nRUN echo one > /one\nRUN cat /one > /two\n");
    let metadata = cluster.build(&context, &cluster.dir.path().join("out-1"));
    assert_eq!(record(&metadata, "echo one")["status"], "executed", "{metadata:#}");

    // The leader dies: another is elected, the workers register with it, and what the old
    // leader recorded (the cache index) is there: nothing runs again.
    let killed_at = Instant::now();
    cluster.kill(leader);
    let info = cluster.wait_for_leader(Some(leader), term_of(&info), 2);
    eprintln!("a new leader and both workers {} ms after the SIGKILL", killed_at.elapsed().as_millis());
    let second = leader_of(&info);
    let out = cluster.dir.path().join("out-2");
    let metadata = cluster.build(&context, &out);
    for step in ["echo one", "cat /one"] {
        assert_eq!(record(&metadata, step)["status"], "cached", "{metadata:#}");
    }
    assert_eq!(std::fs::read_to_string(out.join("two")).unwrap(), "one\n");

    // The old leader comes back as a follower and catches up.
    cluster.start_coordinator(leader);
    let info = cluster.wait_for("the old leader back as a follower", |info| {
        let members = info["raft"]["members"].as_array().unwrap();
        let commit = members.iter().map(|m| m["applied"].as_u64().unwrap()).max().unwrap();
        members.iter().any(|m| {
            m["id"].as_u64() == Some(leader) && m["role"] == "follower" && m["applied"].as_u64() == Some(commit)
        })
    });
    assert_eq!(leader_of(&info), second);

    // A follower dies: nothing visible happens (no election, builds go on), and back, it
    // catches up with what was committed without it.
    let follower = (1..=3).find(|id| *id != second).unwrap();
    cluster.kill(follower);
    let context = cluster.context("after-follower", "FROM BASE\nRUN echo two > /two\n");
    let out = cluster.dir.path().join("out-3");
    let metadata = cluster.build(&context, &out);
    assert_eq!(record(&metadata, "echo two")["status"], "executed", "{metadata:#}");
    assert_eq!(std::fs::read_to_string(out.join("two")).unwrap(), "two\n");
    let without = cluster.info(&cluster.list()).unwrap();
    assert_eq!((leader_of(&without), term_of(&without)), (second, term_of(&info)), "{without:#}");
    cluster.start_coordinator(follower);
    cluster.wait_for("the follower back and caught up", |info| {
        let members = info["raft"]["members"].as_array().unwrap();
        let leader_applied = members.iter().find(|m| m["role"] == "leader").and_then(|m| m["applied"].as_u64());
        members.iter().any(|m| m["id"].as_u64() == Some(follower) && m["applied"].as_u64() == leader_applied)
    });

    // The leader stops (SIGSTOP): the others elect a leader and go on without it; when it
    // resumes it follows the new one.
    let info = cluster.wait_for("all three members", |info| roles(info).iter().all(|(_, role)| !role.is_empty()));
    cluster.signal(second, "STOP");
    let info = cluster.wait_for_leader(Some(second), term_of(&info), 2);
    let third = leader_of(&info);
    let context = cluster.context("after-stop", "FROM BASE\nRUN echo three > /three\n");
    let metadata = cluster.build(&context, &cluster.dir.path().join("out-4"));
    assert_eq!(record(&metadata, "echo three")["status"], "executed", "{metadata:#}");
    cluster.signal(second, "CONT");
    let info = cluster.wait_for("the stopped leader following", |info| {
        roles(info).iter().any(|(id, role)| *id == second && role == "follower")
    });
    assert_eq!(leader_of(&info), third, "{info:#}");
    assert!(
        (1..=3).all(|id| cluster.coordinators[id as usize - 1].as_mut().unwrap().try_wait().unwrap().is_none()),
        "a coordinator exited: {}",
        cluster.logs()
    );

    // All three die and come back: a leader, its workers and the cache index are back.
    let term = term_of(&info);
    let before = cluster.history();
    assert_eq!(before.len(), 4, "{before:#?}");
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.start_coordinator(id);
    }
    cluster.wait_for_leader(None, term, 2);
    let out = cluster.dir.path().join("out-5");
    let metadata = cluster.build(&context, &out);
    assert_eq!(record(&metadata, "echo three")["status"], "cached", "{metadata:#}");
    // The build history is back with them: the four builds before, then this one.
    let history = cluster.history();
    assert_eq!(history.len(), 5, "{history:#?}");
    assert_eq!(history[..4], before[..], "{history:#?}");
    assert!(history.iter().all(|b| b["status"] == "succeeded" && b["submissions"] == 1), "{history:#?}");
    assert_eq!(history[4]["id"], metadata["build_id"]);
    assert_eq!(history[4]["counts"]["cached"], 2, "{history:#?}");
    assert_eq!(
        std::fs::read_to_string(out.join("three")).unwrap(),
        "three
"
    );
}

/// Whether plain progress `log` shows the step whose line contains `needle` done.
fn step_done(log: &str, needle: &str) -> bool {
    let number = log.lines().find_map(|line| {
        let (number, rest) = line.strip_prefix('#')?.split_once(' ')?;
        rest.contains(needle).then(|| number.to_string())
    });
    number.is_some_and(|number| log.lines().any(|line| line.starts_with(&format!("#{number} DONE"))))
}

/// A `kiln build` running in the background, its progress collected as it comes.
struct Running {
    child: Child,
    progress: Arc<std::sync::Mutex<String>>,
    metadata: PathBuf,
    out: PathBuf,
}

impl Running {
    /// Starts the build; `lines` hears of each progress line it prints.
    fn start(cluster: &Replicated, name: &str, dockerfile: &str, lines: std::sync::mpsc::Sender<()>) -> Running {
        let context = cluster.context(name, dockerfile);
        let metadata = cluster.dir.path().join(format!("{name}.json"));
        let out = cluster.dir.path().join(format!("{name}-out"));
        let local = format!("type=local,dest={}", out.display());
        let args = ["build", context.to_str().unwrap(), "--progress", "plain", "-o", &local, "--metadata-file"];
        let mut child = cluster
            .kiln(&cluster.list(), &args)
            .arg(&metadata)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let progress = Arc::new(std::sync::Mutex::new(String::new()));
        let collected = Arc::clone(&progress);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut progress = collected.lock().unwrap();
                progress.push_str(&line);
                progress.push('\n');
                let _ = lines.send(());
            }
        });
        Running { child, progress, metadata, out }
    }

    fn progress(&self) -> String {
        self.progress.lock().unwrap().clone()
    }
}

#[test]
fn builds_under_way_when_the_leader_is_killed_finish_without_running_a_finished_step_again() {
    let mut cluster = Replicated::start(29, 2);
    let info = cluster.wait_for_leader(None, 0, 2);
    let leader = leader_of(&info);
    let (lines, printed) = std::sync::mpsc::channel();
    let builds: Vec<Running> = (0..10)
        .map(|i| {
            let dockerfile =
                format!("FROM BASE\nRUN echo first-{i} > /first\nRUN sleep 3 && echo second-{i} > /second\n");
            Running::start(&cluster, &format!("build-{i}"), &dockerfile, lines.clone())
        })
        .collect();
    // One more, whose client goes with the leader: nobody reattaches to it.
    let abandoned_dockerfile = "FROM BASE\nRUN echo abandoned > /first\nRUN sleep 30\n";
    let mut abandoned = Running::start(&cluster, "abandoned", abandoned_dockerfile, lines.clone());
    // Every build has a finished step when the leader dies (the second steps are running or
    // waiting for a slot).
    let deadline = Instant::now() + Duration::from_secs(120);
    let first_steps_done = |builds: &[Running], abandoned: &Running| {
        (0..10).all(|i| step_done(&builds[i].progress(), &format!("echo first-{i}")))
            && step_done(&abandoned.progress(), "echo abandoned")
    };
    while !first_steps_done(&builds, &abandoned) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(printed.recv_timeout(left).is_ok(), "the first steps did not finish\n{}", cluster.logs());
    }
    // A build may have finished already (its second step ran early); the last to finish its
    // first step is still running its second.
    let mut builds = builds;
    let finished: Vec<bool> = builds.iter_mut().map(|b| b.child.try_wait().unwrap().is_some()).collect();
    assert!(finished.iter().any(|done| !done), "every build finished before the kill");
    // Its client stops before the leader dies (so the leader does not see it leave), and dies
    // after.
    assert!(abandoned.child.try_wait().unwrap().is_none(), "the abandoned build ended before the kill");
    let abandoned_pid = abandoned.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &abandoned_pid]).status().unwrap().success());
    let killed_at = Instant::now();
    cluster.kill(leader);
    abandoned.child.kill().unwrap();
    abandoned.child.wait().unwrap();
    // The new leader's first assignment: the first step adopted (what ran at the kill is
    // assigned first, to the worker that holds it).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !builds.iter().any(|b| b.progress().contains("adopted: worker")) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(printed.recv_timeout(left).is_ok(), "nothing was adopted\n{}", cluster.logs());
    }
    eprintln!("the new leader's first assignment {} ms after the SIGKILL", killed_at.elapsed().as_millis());
    let (mut adopted, mut reattached) = (0, Vec::new());
    for (i, mut build) in builds.into_iter().enumerate() {
        let status = build.child.wait().unwrap();
        let progress = build.progress();
        assert!(status.success(), "build {i} failed:\n{progress}\n{}", cluster.logs());
        assert_eq!(std::fs::read_to_string(build.out.join("first")).unwrap(), format!("first-{i}\n"));
        assert_eq!(std::fs::read_to_string(build.out.join("second")).unwrap(), format!("second-{i}\n"));
        if finished[i] {
            continue;
        }
        // Under way at the kill: it went to the new leader, where the step it had seen done
        // was not run again.
        let metadata = read_json(&build.metadata);
        let id = metadata["build_id"].as_str().unwrap().to_string();
        assert!(progress.contains(&format!("reattaching to build {id} on the new leader")), "build {i}:\n{progress}");
        reattached.push(id);
        assert_eq!(record(&metadata, &format!("echo first-{i}"))["status"], "cached", "build {i}: {metadata:#}");
        adopted += progress.matches("adopted: worker").count();
    }
    eprintln!("10 builds finished {} ms after the leader's SIGKILL", killed_at.elapsed().as_millis());
    // The second steps running at the kill ran on and were adopted by the new leader: no step
    // started twice on any worker.
    let workers: String = ["w1", "w2"]
        .iter()
        .map(|w| std::fs::read_to_string(cluster.dir.path().join(format!("{w}.log"))).unwrap())
        .collect();
    for i in 0..10 {
        for step in [format!("echo first-{i}"), format!("echo second-{i}")] {
            let starts = workers.lines().filter(|l| l.contains(&step) && l.ends_with("started")).count();
            assert_eq!(starts, 1, "{step} started {starts} times\n{workers}");
        }
    }
    eprintln!("{adopted} steps adopted by the new leader (running or finished on a worker at the kill)");
    assert!(adopted > 0, "no running step was adopted\n{}", cluster.logs());
    // The new leader knew the builds its clients reattached to: they were in the log.
    let history = cluster.history();
    assert_eq!(history.len(), 11, "{history:#?}");
    for id in &reattached {
        let entry = history.iter().find(|b| b["id"] == id.as_str()).expect("every build in the history");
        assert_eq!(
            (&entry["status"], &entry["submissions"]),
            (&serde_json::json!("succeeded"), &serde_json::json!(2)),
            "{entry:#}"
        );
    }
    // The build nobody reattached to is ended once its client has had the grace to come back.
    let finished_ids: Vec<Value> =
        (0..10).map(|i| read_json(&cluster.dir.path().join(format!("build-{i}.json")))["build_id"].clone()).collect();
    let deadline = Instant::now() + Duration::from_millis(kiln_model::ADOPTION_GRACE_MS) + Duration::from_secs(60);
    let settled = loop {
        let history = cluster.history();
        let entry =
            history.into_iter().find(|b| !finished_ids.contains(&b["id"])).expect("the abandoned build's entry");
        if entry["status"] != "running" || Instant::now() > deadline {
            break entry;
        }
        // The history offers no event to wait on.
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(settled["status"], "failed", "{settled:#}");
    assert!(settled["error"].as_str().unwrap().contains("did not reattach"), "{settled:#}");
}

/// `kiln ARGS` with `--addr https://kiln-coordinators:7070`, in a mount namespace of its own
/// where `/etc/hosts` is `hosts`: the name resolves to the addresses listed there, for this
/// process only.
fn kiln_by_name(cluster: &Replicated, hosts: &Path, args: &[&str]) -> std::process::Output {
    let script = "mount --bind \"$0\" /etc/hosts && exec \"$@\"";
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", script]).arg(hosts);
    command.arg(workspace_binary("kiln")).arg("--addr").arg(format!("https://{ALL_MEMBERS}:7070"));
    command.arg("--tls-ca").arg(cluster.dir.path().join("certs/ca.pem")).args(args);
    command.env_remove("KILN_ADDR").env_remove("KILN_TOKEN").env_remove("KILN_TLS_CA");
    command.output().unwrap()
}

#[test]
fn one_name_that_resolves_to_every_coordinator_reaches_the_leader_before_and_after_a_failover() {
    let mut cluster = Replicated::start(30, 1);
    let info = cluster.wait_for_leader(None, 0, 1);
    let leader = leader_of(&info);
    // The leader's address comes first: once it is killed, the name's first address is dead.
    let order: Vec<u64> = std::iter::once(leader).chain((1..=3).filter(|id| *id != leader)).collect();
    let hosts = cluster.dir.path().join("hosts");
    let lines: String = order.iter().map(|id| format!("127.0.{}.{id} {ALL_MEMBERS}\n", cluster.net)).collect();
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{lines}")).unwrap();

    let out = kiln_by_name(&cluster, &hosts, &["info", "--format", "json"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), cluster.logs());
    let through_name: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(through_name["raft"]["node_id"].as_u64(), Some(leader), "{through_name:#}");

    cluster.kill(leader);
    let info = cluster.wait_for_leader(Some(leader), term_of(&info), 1);
    let context = cluster.context("by-name", "FROM BASE\nRUN echo named > /named\n");
    let dest = cluster.dir.path().join("by-name-out");
    let output = format!("type=local,dest={}", dest.display());
    let args = ["build", context.to_str().unwrap(), "--progress", "plain", "-o", &output];
    let out = kiln_by_name(&cluster, &hosts, &args);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), cluster.logs());
    assert_eq!(std::fs::read_to_string(dest.join("named")).unwrap(), "named\n");
    let out = kiln_by_name(&cluster, &hosts, &["info", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let through_name: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(through_name["raft"]["node_id"], info["raft"]["leader"], "{through_name:#}");
}
