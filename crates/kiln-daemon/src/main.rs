//! `kilnd`: the Kiln daemon, in one of three roles chosen by its config:
//! - standalone (`--standalone`, or a config with both sections): a coordinator and a worker
//!   in one process, serving the control API on a unix socket in its state directory (the
//!   embedded default that `kiln` starts when none runs) and on TCP with `--listen`;
//! - coordinator (`[coordinator]` only): the control API, the worker service and the blob
//!   service (uploaded contexts) on `coordinator.listen`, scheduling on connected workers;
//! - worker (`[worker]` only): executes assignments from `worker.coordinator` and serves its
//!   layers to peers on `worker.listen`.

mod agent;
mod certs;
mod probe;
mod replica;
mod web;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use kiln_api::{Access, BlobsService, ControlService, Runs, Services, Tenants, WorkersService};
use kiln_client::NodeTls;
use kiln_cluster::ClusterSettings;
use kiln_config::{ConfigFile, CoordinatorConfig, Tls, WorkerConfig as WorkerSettings};
use kiln_engine::{Engine, EngineConfig, Parallelism};
use kiln_model::WorkerInfo;
use kiln_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

#[derive(Parser)]
#[command(name = "kilnd", version, about = "The Kiln daemon")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file with `[coordinator]` and/or `[worker]` sections.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run the coordinator and a worker in this one process.
    #[arg(long)]
    standalone: bool,
    /// State directory (blobs, layers, caches, the socket).
    #[arg(long, env = "KILN_ROOT", default_value = "/var/lib/kiln")]
    root: PathBuf,
    /// Unix socket for clients (default: ROOT/kilnd.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The group whose members may use the unix socket (as dockerd's `--group`): the socket
    /// is `0660` and the state directory `0710` with this group. Default: root's only.
    #[arg(long)]
    group: Option<String>,
    /// Also serve clients on this TCP address (HOST:PORT); needs `--insecure` (or a config
    /// with `[tls]` certificates).
    #[arg(long)]
    listen: Option<String>,
    /// Serve `--listen` as plain TCP, without TLS or tokens (loopback tests only).
    #[arg(long)]
    insecure: bool,
    /// Executions at once on this worker (default: as many as the machine takes without CPU
    /// or memory pressure, docs/parallelism.md; BuildKit has no limit unless configured).
    #[arg(long)]
    max_parallelism: Option<usize>,
    /// The network of RUN steps without `--network`: `isolated` (a namespace of their own,
    /// the default) or `worker` (the daemon's; `[worker] default-network` in a config).
    #[arg(long)]
    default_network: Option<kiln_model::DefaultNetwork>,
    /// A worker's name, over its config's `worker.name` (one config for a pool of workers,
    /// each pod naming itself).
    #[arg(long, env = "KILN_WORKER_NAME")]
    worker_name: Option<String>,
    /// Serve `/metrics`, `/healthz`, `/readyz` and `/v1/queue` on this TCP address
    /// (HOST:PORT, plain HTTP; `metrics-listen` in a config).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Serve the build history's web UI on this TCP address (HOST:PORT, plain HTTP;
    /// `coordinator.web-listen` in a config).
    #[arg(long)]
    web_listen: Option<String>,
    /// The most builds the history keeps, the oldest ended ones going first
    /// (`coordinator.history-max-builds`; default 1000).
    #[arg(long)]
    history_max_builds: Option<usize>,
    /// How long the history keeps an ended build, such as `30d` (`coordinator.history-max-age`;
    /// default: no limit).
    #[arg(long, value_parser = kiln_config::parse_duration)]
    history_max_age: Option<Duration>,
    /// Log lines as text or as one JSON object each (default: the config's `[log] format`,
    /// else text); levels come from `RUST_LOG` (default `info`).
    #[arg(long, env = "KILN_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

/// What `kilnd` does besides serving.
#[derive(clap::Subcommand)]
enum Command {
    /// Check the `--config` file (every key, as the daemon would read it) and say which
    /// role it gives, without starting anything.
    Check,
    /// Drain the daemon of the state directory (the `--config`'s, else `--root`): SIGTERM to
    /// the kilnd in `ROOT/kilnd.pid` (a worker finishes its steps and takes no more), then
    /// wait until it has exited (a Kubernetes `preStop` hook).
    Drain,
    /// Write a development CA (`ca.pem`, `ca-key.pem`; an existing pair in DIR is reused)
    /// and a certificate and key for each node (`NAME.pem`, `NAME-key.pem`), valid for its
    /// name and every host.
    Certs {
        /// The directory to write to.
        #[arg(long)]
        out: PathBuf,
        /// Node names (a worker's name is its certificate's).
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
        /// Host names and IP addresses the nodes are reached at.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

/// How `kilnd` writes its log.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs to stderr with `tracing`: text (colours only on a terminal) or JSON lines, each with
/// the spans it happened in (worker session, job, build), so one build can be followed
/// across the coordinator's and the workers' logs. With an OTLP endpoint in the standard
/// `OTEL_*` variables, builds, vertices and phases are also exported as traces (whatever
/// `RUST_LOG` keeps in the log); `instance` names this process in them.
fn init_logging(format: LogFormat, instance: &str) -> anyhow::Result<Option<kiln_telemetry::Traces>> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = match format {
        LogFormat::Text => log.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => log.json().with_current_span(true).with_span_list(true).boxed(),
    };
    let (traces, exporter) = match kiln_telemetry::otlp_layer(instance).map_err(anyhow::Error::msg)? {
        Some((layer, exporter)) => (Some(layer), Some(exporter)),
        None => (None, None),
    };
    tracing_subscriber::registry().with(log.with_filter(filter)).with(traces).init();
    if exporter.is_some() {
        tracing::info!("exporting traces over OTLP as {instance}");
    }
    Ok(exporter)
}

/// The name of this process in traces (`service.instance.id`).
fn instance_name(role: &Role) -> String {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    match role {
        Role::Standalone(_) => format!("standalone@{host}"),
        Role::Coordinator(config) => match &config.replicas {
            Some(replicas) => format!("coordinator-{}@{host}", replicas.node_id),
            None => format!("coordinator@{host}"),
        },
        // The name it will register under (a listener on port 0 gets its name once bound).
        Role::Worker(settings) => {
            settings.name.clone().unwrap_or_else(|| kiln_config::default_worker_name(settings.listen))
        }
    }
}

enum Role {
    Standalone(Option<WorkerSettings>),
    Coordinator(CoordinatorConfig),
    Worker(WorkerSettings),
}

impl Role {
    /// What it is, in words.
    fn describe(&self) -> &'static str {
        match self {
            Role::Standalone(_) => "standalone",
            Role::Coordinator(config) if config.replicas.is_some() => "replicated coordinator",
            Role::Coordinator(_) => "coordinator",
            Role::Worker(_) => "worker",
        }
    }
}

/// The role a config's sections give, with the flags that stand in for its keys applied
/// (`--metrics-listen`, `--worker-name`) and its own (`root`, `listen`, ...) taken into `args`.
fn role_of(
    coordinator: Option<CoordinatorConfig>,
    worker: Option<WorkerSettings>,
    args: &mut Args,
    path: &Path,
) -> anyhow::Result<Role> {
    if let Some(name) = &args.worker_name
        && !matches!((&coordinator, &worker), (None, Some(_)))
    {
        // Perhaps from the environment (KILN_WORKER_NAME) of a pod that runs another role.
        eprintln!("kilnd: the worker name {name:?} is ignored: {} is not a worker's config", path.display());
    }
    let role = match (coordinator, worker) {
        (Some(coordinator), Some(worker)) => {
            args.root = worker.root.clone();
            args.listen.get_or_insert(coordinator.listen.to_string());
            if let Some(n) = worker.max_parallelism {
                args.max_parallelism.get_or_insert(n);
            }
            if let Some(address) = coordinator.metrics_listen.or(worker.metrics_listen) {
                args.metrics_listen.get_or_insert(address.to_string());
            }
            history_settings_from(args, &coordinator);
            Role::Standalone(Some(worker))
        }
        (Some(coordinator), None) => {
            args.root = coordinator.root.clone();
            if let Some(address) = coordinator.metrics_listen {
                args.metrics_listen.get_or_insert(address.to_string());
            }
            history_settings_from(args, &coordinator);
            Role::Coordinator(coordinator)
        }
        (None, Some(mut worker)) => {
            if worker.coordinator.is_none() {
                bail!("{}: worker.coordinator is required for a worker alone", path.display());
            }
            if let Some(name) = &args.worker_name {
                if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    bail!("--worker-name {name:?} must be non-empty, without spaces");
                }
                worker.name = Some(name.clone());
            }
            args.root = worker.root.clone();
            if let Some(address) = worker.metrics_listen {
                args.metrics_listen.get_or_insert(address.to_string());
            }
            Role::Worker(worker)
        }
        (None, None) => bail!("{}: needs a [coordinator] or a [worker] section", path.display()),
    };
    Ok(role)
}

/// How a daemon's TCP listeners and connections are secured, and who may call it.
#[derive(Clone)]
struct Security {
    /// This node's TLS (`None`: plain TCP, `insecure`).
    tls: Option<NodeTls>,
    /// Client tokens.
    tokens: Vec<kiln_model::ClientToken>,
    /// The tenants' cache groups and limits, shared by every listener's control service.
    tenants: Arc<Tenants>,
}

impl Security {
    /// Loads the config's certificates.
    fn load(tls: &Tls, tokens: Vec<kiln_model::ClientToken>, tenants: Arc<Tenants>) -> anyhow::Result<Security> {
        let tls = match tls {
            Tls::Files { ca, cert, key } => Some(NodeTls::load(ca, Some((cert, key)))?),
            Tls::Insecure => None,
        };
        Ok(Security { tls, tokens, tenants })
    }

    /// A listener's access rules and TLS; `clients` when build clients connect to it.
    fn listener(&self, address: &std::net::SocketAddr, clients: bool) -> (Access, Option<NodeTls>) {
        match &self.tls {
            Some(tls) => (Access::tcp(true, self.tokens.clone()), Some(tls.clone())),
            None => {
                tracing::warn!(
                    "INSECURE: {address} is plain TCP without TLS: no node identities, and anyone who reaches it can \
                     read the traffic{}; for loopback tests only",
                    if clients { " and submit builds" } else { " and fetch its blobs" }
                );
                (Access::tcp(false, self.tokens.clone()), None)
            }
        }
    }

    /// The URL scheme of this node's addresses.
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(Command::Certs { out, names, hosts }) = &args.command {
        for file in certs::generate(out, names, hosts)? {
            println!("{}", file.display());
        }
        return Ok(());
    }
    if let Some(Command::Drain) = &args.command {
        return drain(&args).await;
    }
    let mut log_format = args.log_format.unwrap_or(LogFormat::Text);
    let (role, security) = match args.config.clone() {
        Some(path) => {
            let config = ConfigFile::load(&path)?.validate(&path.display().to_string())?;
            if config.log_json && args.log_format.is_none() {
                log_format = LogFormat::Json;
            }
            if args.insecure {
                bail!("--insecure is for --standalone without --config: the config's [tls] says how to listen");
            }
            let role = role_of(config.coordinator, config.worker, &mut args, &path)?;
            if let Some(Command::Check) = &args.command {
                println!("{}: a valid {} config", path.display(), role.describe());
                return Ok(());
            }
            let security = Security::load(&config.tls, config.tokens, Tenants::new(config.tenants))?;
            (role, security)
        }
        None if matches!(args.command, Some(Command::Check)) => bail!("kilnd check needs --config FILE"),
        None if args.standalone => {
            if args.listen.is_some() && !args.insecure {
                bail!(
                    "--listen serves TCP: add --insecure for plain TCP (loopback tests only), or use --config \
                     with [tls] certificates and [[tokens]]"
                );
            }
            (Role::Standalone(None), Security { tls: None, tokens: Vec::new(), tenants: Arc::default() })
        }
        None => bail!("give --standalone or --config FILE with [coordinator] and/or [worker]"),
    };
    let exporter = init_logging(log_format, &instance_name(&role))?;
    let root = std::path::absolute(&args.root).context("resolving the state directory")?;
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // Uploaded contexts, layers and caches are root's alone, as in /var/lib/docker (0710):
    // other local users can neither list nor read anything below the state directory.
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o710))
        .with_context(|| format!("restricting {} to its owner", root.display()))?;
    // Members of `--group` reach the socket: they may pass through the state directory
    // (not list it) to the socket, which they may open.
    let group = match &args.group {
        None => None,
        Some(name) => {
            let group = nix::unistd::Group::from_name(name)
                .with_context(|| format!("--group {name}: looking it up"))?
                .with_context(|| format!("--group {name}: no such group"))?;
            std::os::unix::fs::chown(&root, None, Some(group.gid.as_raw()))
                .with_context(|| format!("giving {} to the group {name}", root.display()))?;
            Some(group.gid.as_raw())
        }
    };

    // One token stops everything: SIGTERM or SIGINT cancels it, and every part of the daemon
    // shuts down in order from it. One tracker holds the tasks that serve requests (builds,
    // worker sessions), which a stopping daemon waits for before flushing its state.
    let stopped = CancellationToken::new();
    let (tasks, abandoned) = (TaskTracker::new(), CancellationToken::new());
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("handling SIGTERM")?;
    let stop = stopped.clone();
    let signals = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("stopping");
        stop.cancel();
    };
    tokio::spawn(signals.instrument(tracing::info_span!("signals")));
    let lifecycle = Lifecycle { stopped, tasks, abandoned };
    let result = match role {
        Role::Standalone(settings) => standalone(&args, &root, settings, &security, group, lifecycle).await,
        Role::Coordinator(config) => coordinator(&args, &root, config, &security, group, lifecycle).await,
        Role::Worker(settings) => {
            worker(&root, settings, &security, args.metrics_listen.as_deref(), lifecycle.stopped).await
        }
    };
    if let Some(exporter) = exporter {
        // The spans still buffered go out before the process ends.
        tokio::task::spawn_blocking(move || exporter.shutdown()).await?;
    }
    result
}

/// `kilnd drain`: SIGTERM to the daemon of the state directory (the config's, else `--root`),
/// then wait for it to exit.
async fn drain(args: &Args) -> anyhow::Result<()> {
    let root = match &args.config {
        Some(path) => {
            let config = ConfigFile::load(path)?.validate(&path.display().to_string())?;
            match (config.coordinator, config.worker) {
                (_, Some(worker)) => worker.root,
                (Some(coordinator), None) => coordinator.root,
                (None, None) => bail!("{}: needs a [coordinator] or a [worker] section", path.display()),
            }
        }
        None => args.root.clone(),
    };
    let file = root.join("kilnd.pid");
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let pid: i32 = text.trim().parse().with_context(|| format!("{}: {text:?} is not a pid", file.display()))?;
    // A pid file a crashed daemon left may name another process by now (its command name is
    // readable by anyone).
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if command.trim() != "kilnd" {
        eprintln!("{} names no running kilnd (pid {pid}): nothing to drain", file.display());
        return Ok(());
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).with_context(|| format!("signalling {pid}"))?;
    eprintln!("draining kilnd {pid}");
    // Nothing announces a process's end to an unrelated process: look until it is gone (the
    // hook's own grace bounds the wait).
    while running(pid) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("kilnd {pid} has exited");
    Ok(())
}

/// Whether `pid` still runs: it exists and has not exited (a zombie, not reaped yet by its
/// parent, has).
fn running(pid: nix::unistd::Pid) -> bool {
    if nix::sys::signal::kill(pid, None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `PID (COMM) STATE ...`: the command may hold spaces and parentheses, the state follows
    // the last `)`.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// `ROOT/kilnd.pid`, written once the state directory is ours (its database opened, which a
/// second daemon on the same directory cannot), removed when the daemon ends.
struct PidFile(PathBuf);

impl PidFile {
    fn write(root: &Path) -> anyhow::Result<PidFile> {
        let path = root.join("kilnd.pid");
        std::fs::write(&path, std::process::id().to_string()).with_context(|| format!("writing {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How the parts of a serving daemon stop together: the one token, and the tracker of the
/// tasks serving requests.
struct Lifecycle {
    stopped: CancellationToken,
    tasks: TaskTracker,
    /// Cancelled when the grace has run out: builds still running end.
    abandoned: CancellationToken,
}

async fn until_stopped(stopped: CancellationToken) {
    stopped.cancelled_owned().await;
}

/// The worker settings of a config section over the defaults for `root`.
fn worker_config(root: &Path, settings: Option<&WorkerSettings>) -> anyhow::Result<WorkerConfig> {
    let mut worker = WorkerConfig::new(root).map_err(anyhow::Error::msg)?;
    if let Some(settings) = settings {
        worker.cgroup_parent = settings.cgroup_parent.clone();
        worker.step_timeout = settings.step_timeout;
        worker.registry.insecure = settings.insecure_registries.clone();
        let gc = &settings.gc;
        worker.gc = kiln_worker::GcPolicy {
            reserved_space: gc.reserved_space,
            max_used_space: gc.max_used_space,
            min_free_space: gc.min_free_space,
            keep_duration: gc.keep_duration,
        };
        worker.entitlements = settings.entitlements.clone();
        worker.default_network = settings.default_network;
    }
    Ok(worker)
}

/// The addresses the coordinator's URL resolves to now: steps in the isolated network must
/// not reach them (a name that does not resolve yet blocks nothing; its port still needs a
/// certificate or a token).
async fn coordinator_addresses(url: &str) -> Vec<std::net::SocketAddr> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = match authority.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() && !authority.ends_with(']') => authority.to_string(),
        _ => format!("{authority}:{}", if scheme == "https" { 443 } else { 80 }),
    };
    match tokio::net::lookup_host(with_port).await {
        Ok(addresses) => addresses.collect(),
        Err(error) => {
            tracing::warn!("resolving {url}: {error}");
            Vec::new()
        }
    }
}

/// A worker may declare only platforms it can run (natively or through a fix-binary binfmt
/// emulator); by default it declares all of them.
fn platforms(settings: Option<&WorkerSettings>) -> anyhow::Result<Vec<kiln_types::Platform>> {
    let runnable = kiln_worker::runnable_platforms();
    let Some(settings) = settings else { return Ok(runnable) };
    if let Some(missing) = settings.platforms.iter().find(|p| !runnable.contains(p)) {
        let runnable: Vec<String> = runnable.iter().map(|p| p.to_string()).collect();
        bail!("worker.platforms: {missing} cannot run on this machine (it runs {})", runnable.join(", "));
    }
    Ok(settings.platforms.clone())
}

/// The web listener and the history's retention of a coordinator's config, under the flags.
fn history_settings_from(args: &mut Args, coordinator: &kiln_config::CoordinatorConfig) {
    if let Some(address) = coordinator.web_listen {
        args.web_listen.get_or_insert(address.to_string());
    }
    if let Some(max) = coordinator.history_max_builds {
        args.history_max_builds.get_or_insert(max);
    }
    if let Some(age) = coordinator.history_max_age {
        args.history_max_age.get_or_insert(age);
    }
}

/// The history's retention the flags (or the config) ask for.
fn retention(args: &Args) -> kiln_api::Retention {
    kiln_api::Retention {
        max_builds: args.history_max_builds.unwrap_or(kiln_api::MAX_ENTRIES),
        max_age: args.history_max_age,
    }
}

/// Serves the metrics and health endpoints on `address` for as long as the daemon runs.
async fn serve_metrics(address: &str, probe: Arc<dyn kiln_telemetry::Probe>) -> anyhow::Result<()> {
    let listener = bind(address).await.context("metrics-listen")?;
    let serving = async move {
        if let Err(error) = kiln_telemetry::serve(listener, probe, std::future::pending()).await {
            tracing::error!("the metrics listener failed: {error}");
        }
    };
    tokio::spawn(serving.instrument(tracing::info_span!("metrics_server")));
    Ok(())
}

async fn bind(address: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("listening on {address}"))?;
    tracing::info!("listening on {}", listener.local_addr()?);
    Ok(listener)
}

async fn standalone(
    args: &Args,
    root: &Path,
    settings: Option<WorkerSettings>,
    security: &Security,
    group: Option<u32>,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let socket = args.socket.clone().unwrap_or_else(|| root.join("kilnd.sock"));
    let mut worker = worker_config(root, settings.as_ref())?;
    if let Some(network) = args.default_network {
        worker.default_network = network;
    }
    let parallelism = Parallelism::from_setting(args.max_parallelism);
    let platforms = platforms(settings.as_ref())?;
    let engine = Arc::new(Engine::start(EngineConfig { worker, parallelism, name: "local".into(), platforms })?);
    if let Some(gc) = engine.gc() {
        tokio::spawn(Arc::clone(gc).run(lifecycle.stopped.clone()).instrument(tracing::info_span!("gc")));
    }
    let _pid = PidFile::write(root)?;
    tracing::info!("standalone, state in {}, socket {}", root.display(), socket.display());
    let runs = Runs::new(Arc::clone(engine.store())).with_retention(retention(args));
    if let Some(address) = &args.metrics_listen {
        let probe = probe::Builds {
            engine: Arc::clone(&engine),
            runs: runs.clone(),
            replication: None,
            stopped: lifecycle.stopped.clone(),
        };
        serve_metrics(address, Arc::new(probe)).await?;
    }
    let tcp = match &args.listen {
        Some(listen) => {
            let listener = bind(listen).await?;
            let (access, tls) = security.listener(&listener.local_addr()?, true);
            let control = ControlService::new(Arc::clone(&engine), root)
                .with_tenants(Arc::clone(&security.tenants))
                .with_runs(runs.clone())
                .with_web(args.web_listen.as_ref().map(|a| format!("http://{a}")))
                .tracked_by(lifecycle.tasks.clone(), lifecycle.abandoned.clone());
            Some((listener, Services { control: Some(control), access, tls, ..Services::default() }))
        }
        None => None,
    };
    let listeners = Listeners { tcp, web: args.web_listen.clone(), tokens: security.tokens.clone() };
    serve(&engine, root, (&socket, group), listeners, (&security.tenants, runs), None, lifecycle).await
}

/// A daemon's listeners besides its unix socket: the control API over TCP, the web UI.
struct Listeners {
    tcp: Option<(tokio::net::TcpListener, Services)>,
    web: Option<String>,
    /// The client tokens the web UI takes.
    tokens: Vec<kiln_model::ClientToken>,
}

/// How long in-flight requests (builds streaming their results, worker sessions closing)
/// get to finish once the daemon is asked to stop, before it stops anyway: well within the
/// 30 s Kubernetes gives a pod between SIGTERM and SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long builds ended after [`SHUTDOWN_GRACE`] get to clean up before the index is flushed.
const ABANDON_GRACE: Duration = Duration::from_secs(2);

/// Serves the control API on the unix socket and `tcp`'s services on its listener until
/// stopped, then shuts down in order: no new connections, worker sessions closed (workers
/// reconnect to the next coordinator), in-flight requests and the build tasks behind them given
/// one [`SHUTDOWN_GRACE`] together, the
/// cache index flushed, the socket removed.
async fn serve(
    engine: &Arc<Engine>,
    root: &Path,
    (socket, group): (&Path, Option<u32>),
    Listeners { tcp, web, tokens }: Listeners,
    (tenants, runs): (&Arc<Tenants>, Runs),
    replication: Option<Arc<kiln_api::Replication>>,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let Lifecycle { stopped, tasks, abandoned } = lifecycle;
    // The state directory is ours (its database is open): what an earlier daemon spooled is
    // garbage now.
    let spools = root.to_path_buf();
    tokio::task::spawn_blocking(move || kiln_api::clear_spools(&spools))
        .await?
        .with_context(|| format!("clearing old export spools in {}", root.display()))?;
    let mut servers = tokio::task::JoinSet::new();
    // Both control services know the builds running here (a client may reattach through
    // either): `runs` is theirs.
    if let Some((listener, services)) = tcp {
        let serving = kiln_api::serve_tcp(services, listener, until_stopped(stopped.clone()));
        servers.spawn(serving.instrument(tracing::info_span!("tcp_server")));
    }
    let service = ControlService::new(Arc::clone(engine), root)
        .with_tenants(Arc::clone(tenants))
        .replicated(replication.clone())
        .with_runs(runs)
        .with_web(web.as_ref().map(|a| format!("http://{a}")))
        .tracked_by(tasks.clone(), abandoned.clone());
    service.settle_abandoned_builds();
    service.prune_by_age(stopped.clone());
    if let Some(address) = &web {
        if tokens.is_empty() {
            tracing::warn!("no client tokens: whoever reaches the web UI on {address} sees every build");
        }
        let (book, runs) = service.history();
        let load = probe::Builds { engine: Arc::clone(engine), runs, replication, stopped: stopped.clone() };
        let history = web::History { book, load, tokens };
        web::serve(address, history, stopped.clone()).await?;
    }
    let unix_socket = socket.to_path_buf();
    servers.spawn({
        let stopped = stopped.clone();
        async move { kiln_api::serve_unix(service, &unix_socket, group, until_stopped(stopped)).await }
            .instrument(tracing::info_span!("unix_server"))
    });
    let result = tokio::select! {
        // A server that ends on its own failed (its listener broke).
        Some(ended) = servers.join_next() => Some(ended),
        () = until_stopped(stopped.clone()) => None,
    };
    // However it came to this, every server stops now.
    stopped.cancel();
    if let Some(cluster) = engine.cluster() {
        let closed = cluster.close_sessions();
        tracing::info!("stopping: closed {closed} worker sessions");
    }
    // One grace for everything still serving: the servers' open requests, then the tasks
    // behind them (builds whose clients are gone still record what they computed).
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let drained = tokio::time::timeout_at(deadline, async {
        while let Some(ended) = servers.join_next().await {
            ended?.map_err(anyhow::Error::msg)?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await;
    if drained.is_err() {
        tracing::warn!("stopping with requests still open after {} s", SHUTDOWN_GRACE.as_secs());
        servers.abort_all();
    }
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait()).await.is_err() {
        // The grace is over: the builds still running end now, and get a moment to record
        // their end (their spools removed, their jobs cancelled) before the index is flushed.
        tracing::warn!("stopping: ending {} builds still running after {} s", tasks.len(), SHUTDOWN_GRACE.as_secs());
        abandoned.cancel();
        if tokio::time::timeout(ABANDON_GRACE, tasks.wait()).await.is_err() {
            tracing::warn!("stopping with {} request tasks still running", tasks.len());
        }
    }
    let flushing = Arc::clone(engine);
    tokio::task::spawn_blocking(move || flushing.flush()).await?.context("flushing the metadata store")?;
    let _ = std::fs::remove_file(socket);
    match result {
        Some(ended) => ended?.map_err(anyhow::Error::msg),
        None => drained.unwrap_or(Ok(())),
    }
}

async fn coordinator(
    args: &Args,
    root: &Path,
    config: CoordinatorConfig,
    security: &Security,
    group: Option<u32>,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let settings = ClusterSettings {
        lease_ms: config.lease_timeout.as_millis() as u64,
        placement_timeout_ms: config.placement_timeout.as_millis() as u64,
        retry_budget: config.retry_budget,
        ..ClusterSettings::default()
    };
    let lease_ms = settings.lease_ms;
    let engine_config = EngineConfig {
        worker: worker_config(root, None)?,
        parallelism: Parallelism::Fixed(1),
        name: "coordinator".into(),
        platforms: vec![],
    };
    let shared_cache = config.shared_cache.clone();
    let kv = Engine::open_store(root)?;
    // A replicated coordinator keeps its cache index through the log.
    let replicated = config.replicas.as_ref().map(|_| replica::replicated_store(&kv));
    let cache_index = match &replicated {
        Some(store) => (Arc::clone(&store.cache_index), Some(Arc::clone(&store.durable))),
        None => (Arc::clone(&kv), None),
    };
    let engine = Arc::new(Engine::start_coordinator(
        engine_config,
        settings,
        Arc::new(agent::PeerFetcher(security.tls.clone())),
        shared_cache,
        Arc::clone(&kv),
        cache_index,
    )?);
    let replication = match (&config.replicas, replicated) {
        (Some(replicas), Some(store)) => {
            let stopping = lifecycle.stopped.clone();
            Some(replica::start(replicas, kv, store, &engine, security.tls.clone(), config.lease_timeout, stopping)?)
        }
        _ => None,
    };
    if let Some(gc) = engine.gc() {
        tokio::spawn(Arc::clone(gc).run(lifecycle.stopped.clone()).instrument(tracing::info_span!("gc")));
    }
    let _pid = PidFile::write(root)?;
    let runs = Runs::new(Arc::clone(engine.store())).with_retention(retention(args));
    if let Some(address) = &args.metrics_listen {
        let probe = probe::Builds {
            engine: Arc::clone(&engine),
            runs: runs.clone(),
            replication: replication.clone(),
            stopped: lifecycle.stopped.clone(),
        };
        serve_metrics(address, Arc::new(probe)).await?;
    }
    let cluster = Arc::clone(engine.cluster().expect("a coordinator has a cluster"));
    let socket = args.socket.clone().unwrap_or_else(|| root.join("kilnd.sock"));
    tracing::info!("coordinator, state in {}, socket {}", root.display(), socket.display());
    let listener = bind(&config.listen.to_string()).await?;
    let (access, tls) = security.listener(&listener.local_addr()?, true);
    let access = access.led_by(replication.clone());
    if security.tokens.is_empty() {
        tracing::warn!("no [[coordinator.tokens]]: every client that reaches {} is an admin", config.listen);
    }
    if replication.is_some() && security.tls.is_none() {
        tracing::warn!("raft traffic travels in plain TCP (insecure = true): any host that reaches the port can join");
    }
    let services = Services {
        control: Some(
            ControlService::new(Arc::clone(&engine), root)
                .with_upload_idle_timeout(config.upload_idle_timeout)
                .with_node_tls(security.tls.clone())
                .with_tenants(Arc::clone(&security.tenants))
                .replicated(replication.clone())
                .with_runs(runs.clone())
                .with_web(args.web_listen.as_ref().map(|a| format!("http://{a}")))
                .tracked_by(lifecycle.tasks.clone(), lifecycle.abandoned.clone()),
        ),
        raft: replication.clone().map(kiln_api::RaftService::new),
        // Workers fetch uploaded context files from the coordinator they connected to.
        workers: Some(WorkersService::new(cluster, "", lease_ms).tracked_by(lifecycle.tasks.clone())),
        blobs: Some(BlobsService::new(Arc::clone(engine.stores().cas()))),
        storage: None,
        access,
        tls,
    };
    let listeners =
        Listeners { tcp: Some((listener, services)), web: args.web_listen.clone(), tokens: security.tokens.clone() };
    let result =
        serve(&engine, root, (&socket, group), listeners, (&security.tenants, runs), replication.clone(), lifecycle)
            .await;
    if let Some(replication) = replication {
        // Stopped on its own (not by this stop): the coordinator fails, so that its
        // supervisor sees it and restarts it.
        let failed = replication.node().status().stopped;
        let node = Arc::clone(replication.node());
        tokio::task::spawn_blocking(move || node.stop()).await?;
        if failed {
            result?;
            bail!("the replicated log stopped (the error above says why)");
        }
    }
    result
}

async fn worker(
    root: &Path,
    settings: WorkerSettings,
    security: &Security,
    metrics_listen: Option<&str>,
    stopped: CancellationToken,
) -> anyhow::Result<()> {
    let platforms = platforms(Some(&settings))?;
    let listener = bind(&settings.listen.to_string()).await?;
    let local = listener.local_addr()?;
    let name = settings.name.clone().unwrap_or_else(|| kiln_config::default_worker_name(local));
    let coordinator = settings.coordinator.clone().expect("checked when the role was chosen");
    let config = WorkerConfig {
        name: name.clone(),
        unreachable: {
            let mut addresses = Vec::new();
            for url in kiln_config::coordinator_urls(&coordinator) {
                addresses.extend(coordinator_addresses(url).await);
            }
            addresses
        },
        ..worker_config(root, Some(&settings))?
    };
    let kv: kiln_kv::SharedKv =
        Arc::new(kiln_kv::SledKv::open(&root.join("db")).with_context(|| format!("opening {}", root.display()))?);
    let worker = Arc::new(Worker::open(config, kv)?);
    let _pid = PidFile::write(root)?;
    let host = if local.ip().is_unspecified() { name.clone() } else { local.ip().to_string() };
    // Without max-parallelism, the worker's capacity adapts to its machine's pressure.
    let parallelism = Parallelism::from_setting(settings.max_parallelism);
    let admission = kiln_solver::admission::Admission::for_cluster(parallelism, parallelism.pressure());
    let info = WorkerInfo {
        name,
        platforms,
        labels: settings.labels.clone(),
        max_parallelism: admission.ceiling(),
        capacity: admission.current_capacity(),
        free_disk: 0,
        cache_bytes: 0,
        address: format!("{}://{host}:{}", security.scheme(), local.port()),
        entitlements: settings.entitlements.clone(),
    };
    tracing::info!("worker {} for {coordinator}, state in {}", info.name, root.display());
    // Only nodes of the cluster connect here: the coordinator and peer workers.
    let (access, tls) = security.listener(&local, false);
    let services = Services {
        blobs: Some(BlobsService::new(Arc::clone(worker.cas()))),
        storage: Some(kiln_api::StorageService::new(Arc::clone(worker.gc()))),
        access,
        tls,
        ..Services::default()
    };
    // The blob service outlives the session: peers may still fetch while the worker drains.
    // It stops once the session has ended, finishing the fetches under way (bounded).
    let session_over = CancellationToken::new();
    let server = tokio::spawn(kiln_api::serve_tcp(services, listener, until_stopped(session_over.clone())));
    let registered = tokio::sync::watch::Sender::new(false);
    if let Some(address) = metrics_listen {
        let probe = probe::WorkerProbe { registered: registered.subscribe(), stopped: stopped.clone() };
        serve_metrics(address, Arc::new(probe)).await?;
    }
    let control = Arc::new(agent::Coordinator::new(&coordinator, security.tls.clone()));
    kiln_worker::agent::run(
        Arc::clone(&worker),
        control,
        Arc::new(agent::PeerFetcher(security.tls.clone())),
        (info, admission),
        root.to_path_buf(),
        (stopped, registered),
    )
    .await;
    session_over.cancel();
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(served) => served?.map_err(anyhow::Error::msg)?,
        Err(_) => tracing::warn!("stopping with blob fetches still open after {} s", SHUTDOWN_GRACE.as_secs()),
    }
    Ok(())
}
