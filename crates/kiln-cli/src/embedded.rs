//! The embedded default: a standalone `kilnd` on a unix socket in the state directory,
//! started when none answers (as buildx boots its builder), shared by every local build.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_client::{Client, ClientOptions, NodeTls};

/// The state directory: `$KILN_ROOT`, or `/var/lib/kiln`.
pub fn root() -> PathBuf {
    std::env::var_os("KILN_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib/kiln"))
}

/// The daemon the command talks to, and how.
pub struct Daemon {
    /// `--addr`: none for the embedded daemon.
    pub address: Option<String>,
    /// `--tls-ca`.
    pub tls_ca: Option<PathBuf>,
    /// `--token`.
    pub token: Option<String>,
}

impl Daemon {
    /// Connects to `--addr`, or to the embedded daemon (starting it when needed).
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let Some(address) = &self.address else { return connect_embedded().await };
        let tls = self.tls_ca.as_deref().map(|ca| NodeTls::load(ca, None)).transpose()?;
        let options = ClientOptions { tls, token: self.token.clone() };
        Client::connect_with(address, &options).await.map_err(anyhow::Error::msg)
    }
}

/// Connects to the embedded daemon, starting it when none answers.
async fn connect_embedded() -> anyhow::Result<Client> {
    let root = std::path::absolute(root())?;
    let address = format!("unix://{}", root.join("kilnd.sock").display());
    if let Ok(client) = Client::connect(&address).await {
        return Ok(client);
    }
    start_daemon(&root)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(&address).await {
            Ok(client) => return Ok(client),
            Err(error) if Instant::now() > deadline => {
                bail!("the embedded kilnd did not come up ({error}); see {}", root.join("kilnd.log").display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Starts `kilnd --standalone` for `root` in its own process group, so it outlives this
/// command; its output goes to `ROOT/kilnd.log`.
fn start_daemon(root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let kilnd = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("kilnd")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("kilnd"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(root.join("kilnd.log"))?;
    Command::new(&kilnd)
        .arg("--standalone")
        .arg("--root")
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", kilnd.display()))?;
    Ok(())
}
