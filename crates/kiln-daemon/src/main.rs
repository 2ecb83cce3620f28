//! `kilnd`: the Kiln daemon. `kilnd --standalone` runs the coordinator and a worker in one
//! process and serves the control API on a unix socket in its state directory (the embedded
//! default that `kiln` starts when none runs), and on TCP with `--listen`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::Parser;
use kiln_api::ControlService;
use kiln_config::ConfigFile;
use kiln_engine::{Engine, EngineConfig};
use kiln_worker::WorkerConfig;

#[derive(Parser)]
#[command(name = "kilnd", version, about = "The Kiln daemon")]
struct Args {
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
    /// Also serve clients on this TCP address (HOST:PORT).
    #[arg(long)]
    listen: Option<String>,
    /// Executions at once on this worker (default: four per CPU, since build steps often wait
    /// on IO or sleep; BuildKit has no limit unless configured).
    #[arg(long)]
    max_parallelism: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let mut worker_settings = None;
    if let Some(path) = &args.config {
        let config = ConfigFile::load(path)?.validate(&path.display().to_string())?;
        match (config.coordinator, config.worker) {
            (Some(coordinator), Some(worker)) => {
                args.standalone = true;
                args.root = worker.root.clone();
                args.listen.get_or_insert(coordinator.listen.to_string());
                args.max_parallelism.get_or_insert(worker.max_parallelism);
                worker_settings = Some(worker);
            }
            _ => bail!(
                "{}: a coordinator or a worker alone is not supported by this kilnd yet; give both sections (standalone)",
                path.display()
            ),
        }
    }
    if !args.standalone {
        bail!(
            "only --standalone is supported by this kilnd (the cluster roles come with [coordinator]/[worker] config)"
        );
    }
    let root = std::path::absolute(&args.root).context("resolving --root")?;
    let socket = args.socket.clone().unwrap_or_else(|| root.join("kilnd.sock"));

    let mut worker = WorkerConfig::new(&root).map_err(anyhow::Error::msg)?;
    if let Some(settings) = &worker_settings {
        worker.cgroup_parent = settings.cgroup_parent.clone();
        worker.step_timeout = settings.step_timeout;
        worker.registry.insecure = settings.insecure_registries.clone();
    }
    let max_parallelism =
        args.max_parallelism.unwrap_or_else(|| 4 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    // A worker may declare only platforms it can run (natively or through a fix-binary
    // binfmt emulator); by default it declares all of them.
    let runnable = kiln_worker::runnable_platforms();
    let platforms = match &worker_settings {
        Some(settings) => {
            if let Some(missing) = settings.platforms.iter().find(|p| !runnable.contains(p)) {
                let runnable: Vec<String> = runnable.iter().map(|p| p.to_string()).collect();
                bail!("worker.platforms: {missing} cannot run on this machine (it runs {})", runnable.join(", "));
            }
            settings.platforms.clone()
        }
        None => runnable,
    };
    let engine = Arc::new(Engine::start(EngineConfig { worker, max_parallelism, name: "local".into(), platforms })?);
    eprintln!("kilnd: standalone, state in {}, socket {}", root.display(), socket.display());
    let pid_file = root.join("kilnd.pid");
    std::fs::write(&pid_file, std::process::id().to_string())
        .with_context(|| format!("writing {}", pid_file.display()))?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    if let Some(listen) = &args.listen {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        eprintln!("kilnd: listening on {}", listener.local_addr()?);
        let service = ControlService::new(Arc::clone(&engine), &root);
        servers.spawn(kiln_api::serve_tcp(service, listener, until_stopped(stopped.clone())));
    }
    let service = ControlService::new(Arc::clone(&engine), &root);
    let unix_socket = socket.clone();
    let unix_stop = until_stopped(stopped.clone());
    servers.spawn(async move { kiln_api::serve_unix(service, &unix_socket, unix_stop).await });
    while let Some(result) = servers.join_next().await {
        result?.map_err(anyhow::Error::msg)?;
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}
