//! `kilnd`'s configuration: one TOML file with a `[coordinator]` and/or a `[worker]` section.
//!
//! The file maps onto serde structs that refuse unknown keys (a typo is an error, not a
//! silently ignored setting); every field documents its default. [`ConfigFile::validate`]
//! turns the text values (addresses, URLs, platforms, durations, sizes) into typed ones, with
//! errors that name the key.

mod units;

pub use units::{UnitError, parse_duration, parse_size};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_model::{CacheDirection, CacheMode, CacheSpec, ClientToken, TenantPolicy};
use kiln_types::Platform;
use serde::Deserialize;

/// A configuration problem, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range or malformed.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The key, e.g. `worker.platforms[1]`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The coordinator role.
    pub coordinator: Option<CoordinatorSection>,
    /// The worker role.
    pub worker: Option<WorkerSection>,
    /// How the daemon logs.
    #[serde(default)]
    pub log: LogSection,
    /// Certificates for every listener and every connection to another node.
    #[serde(default)]
    pub tls: TlsSection,
    /// `[[tokens]]`: the client tokens of a standalone daemon (those of a coordinator are
    /// `[[coordinator.tokens]]`).
    #[serde(default)]
    pub tokens: Vec<TokenSection>,
    /// `[tenants.NAME]`: a standalone daemon's tenant policies (a coordinator's are
    /// `[coordinator.tenants.NAME]`).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSection>,
}

/// `[tls]`: one CA for the cluster, and this node's certificate (named after the node, with
/// every host it is reached at) and key, PEM files. Required for every daemon that listens
/// on TCP, unless `insecure = true`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSection {
    /// The CA certificate that signs every node's certificate.
    pub ca: Option<PathBuf>,
    /// This node's certificate (chain).
    pub cert: Option<PathBuf>,
    /// This node's private key.
    pub key: Option<PathBuf>,
    /// Plain TCP without TLS or node identities: loopback tests only. Default: `false`.
    #[serde(default)]
    pub insecure: bool,
}

/// One client token: `[[coordinator.tokens]]` or `[[tokens]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenSection {
    /// What logs call it.
    pub name: String,
    /// The tenant its builds belong to.
    pub tenant: String,
    /// `build` or `admin`.
    pub role: String,
    /// The token's SHA-256, hex (`printf %s TOKEN | sha256sum`); never the token itself.
    pub sha256: String,
}

/// `[coordinator.tenants.NAME]` or `[tenants.NAME]`: what one tenant shares and may use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TenantSection {
    /// The tenants with the same group share cache entries, in-flight work and uploaded
    /// contexts. Default: the tenant's own name (`default` is the unix socket's group).
    pub cache_group: Option<String>,
    /// Builds in progress at once. Default: no limit.
    pub max_builds: Option<usize>,
    /// Vertices of the tenant's builds in progress. Default: no limit.
    pub max_queued_vertices: Option<usize>,
    /// Bytes of one build's context, and of one upload (`512MiB`). Default: no limit.
    pub max_upload: Option<String>,
    /// Bytes of uploaded contexts the tenant's cache group keeps stored (`10GiB`). Default:
    /// no limit.
    pub max_stored: Option<String>,
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogSection {
    /// `text` or `json` (one object per line); `kilnd --log-format` wins. Default: `text`.
    pub format: Option<String>,
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CoordinatorSection {
    /// Address for clients and workers, `HOST:PORT`. Required.
    pub listen: String,
    /// State directory. Default: `/var/lib/kiln/coordinator`.
    #[serde(default = "default_coordinator_root")]
    pub root: PathBuf,
    /// A worker whose lease is not renewed for this long is lost. Default: `10s`.
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout: String,
    /// A build waiting for a worker of its platform fails after this long. Default: `5m`.
    #[serde(default = "default_placement_timeout")]
    pub placement_timeout: String,
    /// Times a vertex is requeued after its worker is lost. Default: `3`.
    #[serde(default = "default_retry_budget")]
    pub retry_budget: u32,
    /// A context upload that sends nothing for this long is ended (its partial file removed).
    /// Default: `60s`.
    #[serde(default = "default_upload_idle_timeout")]
    pub upload_idle_timeout: String,
    /// The fleet's shared cache.
    #[serde(default)]
    pub cache: CoordinatorCacheSection,
    /// Client tokens; without any, every client that reaches the port is an admin of the
    /// default tenant.
    #[serde(default)]
    pub tokens: Vec<TokenSection>,
    /// Tenant policies, by tenant.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSection>,
    /// This coordinator's id among `peers`. Default: none (a single coordinator).
    pub node_id: Option<u64>,
    /// Every replicated coordinator, this one included, as `ID=URL` (`1=https://HOST:PORT`).
    /// Default: none.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/v1/queue` are served (plain HTTP),
    /// `HOST:PORT`. Default: none.
    pub metrics_listen: Option<String>,
    /// Where the build history's web UI is served (plain HTTP), `HOST:PORT`. Default: none.
    pub web_listen: Option<String>,
    /// The most builds the history keeps (the oldest ended ones go first). Default: 1000.
    pub history_max_builds: Option<usize>,
    /// How long the history keeps an ended build (`30d`). Default: no limit.
    pub history_max_age: Option<String>,
}

/// `[coordinator.cache]`: the shared cache tier every build imports from and exports to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CoordinatorCacheSection {
    /// A `--cache-to` spec (`type=s3,...`, `type=registry,...`, `type=local,dest=...`).
    /// Default: none.
    pub shared: Option<String>,
    /// What each build exports to it: `min` or `max` (or `mode=` inside `shared`, not both).
    /// Default: `max`.
    pub mode: Option<String>,
}

/// `[worker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerSection {
    /// The coordinator's URL, `http://HOST:PORT`. Required unless the file also has a
    /// `[coordinator]` (standalone).
    pub coordinator: Option<String>,
    /// The worker's unique name in the cluster. Default: `HOSTNAME-PORT` of `listen`, or
    /// `HOSTNAME-IP-PORT` when `listen` names an address.
    pub name: Option<String>,
    /// Address of this worker's blob service for peers, `HOST:PORT`. Default: `127.0.0.1:0`.
    #[serde(default = "default_worker_listen")]
    pub listen: String,
    /// State directory. Default: `/var/lib/kiln/worker`.
    #[serde(default = "default_worker_root")]
    pub root: PathBuf,
    /// Platforms this worker builds for; each must be runnable here. Default: the host's.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Labels for placement. Default: none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Executions at once. Default: adaptive, by the machine's pressure (docs/parallelism.md).
    pub max_parallelism: Option<usize>,
    /// cgroup path prefix for step containers. Default: `/kiln`.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    /// Kill a step after this long. Default: no limit.
    pub step_timeout: Option<String>,
    /// Registries spoken to over plain HTTP, `HOST:PORT` (loopback ones always are). Default: none.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Garbage collection of the worker's store.
    #[serde(default)]
    pub gc: GcSection,
    /// What steps may do beyond the sandbox when a client asks (`--allow`): `network.host`,
    /// `security.insecure` (buildkitd's `--allow-insecure-entitlement`). Default: none.
    #[serde(default)]
    pub entitlements: Vec<String>,
    /// The network of RUN steps without `--network`: `isolated` (a namespace of their own
    /// with outbound access) or `worker` (the worker's). Default: `isolated`.
    pub default_network: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (plain HTTP), `HOST:PORT`.
    /// Default: none.
    pub metrics_listen: Option<String>,
}

/// `[worker.gc]`: BuildKit's policy knobs (docs/gc.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GcSection {
    /// Never collect below this, e.g. `10GB`. Default: 10% of the disk, at most 10 GB.
    pub reserved_space: Option<String>,
    /// Collect above this much used space. Default: 60% of the disk, at most 100 GB.
    pub max_used_space: Option<String>,
    /// Collect while less than this is free on the disk. Default: no such limit.
    pub min_free_space: Option<String>,
    /// Records unused for longer than this are collected even under the limits. Default: `48h`.
    pub keep_duration: Option<String>,
}

fn default_coordinator_root() -> PathBuf {
    PathBuf::from("/var/lib/kiln/coordinator")
}
fn default_worker_root() -> PathBuf {
    PathBuf::from("/var/lib/kiln/worker")
}
fn default_lease_timeout() -> String {
    "10s".into()
}
fn default_upload_idle_timeout() -> String {
    "60s".into()
}

fn default_placement_timeout() -> String {
    "5m".into()
}
fn default_retry_budget() -> u32 {
    3
}
fn default_worker_listen() -> String {
    "127.0.0.1:0".into()
}
fn default_cgroup_parent() -> String {
    "/kiln".into()
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The coordinator role, when configured.
    pub coordinator: Option<CoordinatorConfig>,
    /// The worker role, when configured.
    pub worker: Option<WorkerConfig>,
    /// Log JSON lines instead of text (`[log] format = "json"`).
    pub log_json: bool,
    /// How TCP connections are secured.
    pub tls: Tls,
    /// Client tokens (the coordinator's, or a standalone daemon's `[[tokens]]`).
    pub tokens: Vec<ClientToken>,
    /// Tenant policies by tenant (the coordinator's, or a standalone daemon's).
    pub tenants: BTreeMap<String, TenantPolicy>,
}

/// How a daemon's TCP connections are secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Mutual TLS between nodes, TLS for clients.
    Files {
        /// The cluster's CA certificate.
        ca: PathBuf,
        /// This node's certificate.
        cert: PathBuf,
        /// Its private key.
        key: PathBuf,
    },
    /// Plain TCP (`insecure = true`).
    Insecure,
}

/// The coordinator role, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// State directory.
    pub root: PathBuf,
    /// Lease timeout.
    pub lease_timeout: Duration,
    /// Placement timeout.
    pub placement_timeout: Duration,
    /// Requeues per vertex after worker loss.
    pub retry_budget: u32,
    /// Idle limit of a context upload.
    pub upload_idle_timeout: Duration,
    /// The shared cache tier (with the mode builds export in).
    pub shared_cache: Option<CacheSpec>,
    /// The replica set, when the coordinator is replicated.
    pub replicas: Option<Replicas>,
    /// The metrics and health listener.
    pub metrics_listen: Option<SocketAddr>,
    /// The web UI's listener.
    pub web_listen: Option<SocketAddr>,
    /// The history's retention: most builds.
    pub history_max_builds: Option<usize>,
    /// The history's retention: longest kept.
    pub history_max_age: Option<Duration>,
}

/// A replicated coordinator's place in its replica set (`node-id`, `peers`).
#[derive(Debug, Clone, PartialEq)]
pub struct Replicas {
    /// This coordinator's id.
    pub node_id: u64,
    /// Every member's URL by id, this one's included.
    pub peers: BTreeMap<u64, String>,
}

/// An optional `HOST:PORT`, parsed.
fn socket_address(text: Option<&str>) -> Result<Option<SocketAddr>, String> {
    text.map(|text| text.parse().map_err(|e| format!("{text:?} is not HOST:PORT ({e})"))).transpose()
}

/// The coordinator URLs of a worker's `coordinator` (or a client's `--addr`): a
/// comma-separated list.
pub fn coordinator_urls(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|url| !url.is_empty()).collect()
}

/// Whether `url` is `http://HOST:PORT` or `https://HOST:PORT`.
fn is_node_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| {
        !r.is_empty() && !r.contains('/') && r.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok())
    })
}

/// The `node-id` and `peers` of `[coordinator]`, checked.
fn replicas(section: &CoordinatorSection) -> Result<Option<Replicas>, (&'static str, String)> {
    let node_id = match (section.node_id, section.peers.is_empty()) {
        (None, true) => return Ok(None),
        (None, false) => return Err(("coordinator.node-id", "required with peers".into())),
        (Some(_), true) => return Err(("coordinator.peers", "required with node-id".into())),
        (Some(0), false) => return Err(("coordinator.node-id", "must be at least 1".into())),
        (Some(id), false) => id,
    };
    let mut peers = BTreeMap::new();
    for peer in &section.peers {
        let (id, url) = peer.split_once('=').ok_or_else(|| ("coordinator.peers", format!("{peer:?} is not ID=URL")))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| ("coordinator.peers", format!("{peer:?}: the id must be a number from 1")))?;
        let url = url.trim();
        if !is_node_url(url) {
            return Err(("coordinator.peers", format!("{peer:?}: {url:?} is not http(s)://HOST:PORT")));
        }
        if peers.insert(id, url.to_string()).is_some() {
            return Err(("coordinator.peers", format!("the id {id} is listed twice")));
        }
    }
    if !peers.contains_key(&node_id) {
        return Err(("coordinator.node-id", format!("{node_id} is not among the peers")));
    }
    Ok(Some(Replicas { node_id, peers }))
}

/// The worker role, typed.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    /// The coordinator's URL (`None` when standalone).
    pub coordinator: Option<String>,
    /// The worker's name, when the file gives one; otherwise [`default_worker_name`] of the
    /// address it bound.
    pub name: Option<String>,
    /// Blob service address.
    pub listen: SocketAddr,
    /// State directory.
    pub root: PathBuf,
    /// Platforms.
    pub platforms: Vec<Platform>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Executions at once, when set (without it, a worker adapts to its machine's pressure:
    /// docs/parallelism.md).
    pub max_parallelism: Option<usize>,
    /// cgroup prefix.
    pub cgroup_parent: String,
    /// Step timeout.
    pub step_timeout: Option<Duration>,
    /// Plain-HTTP registries.
    pub insecure_registries: Vec<String>,
    /// GC policy.
    pub gc: GcPolicy,
    /// Entitlements granted.
    pub entitlements: Vec<kiln_model::Entitlement>,
    /// The network of RUN steps without `--network`.
    pub default_network: kiln_model::DefaultNetwork,
    /// The metrics and health listener.
    pub metrics_listen: Option<SocketAddr>,
}

/// Garbage collection limits, in bytes and time; `None` takes the default for the disk.
#[derive(Debug, Clone, PartialEq)]
pub struct GcPolicy {
    /// Always kept.
    pub reserved_space: Option<u64>,
    /// Upper bound on used space.
    pub max_used_space: Option<u64>,
    /// Lower bound on free disk space.
    pub min_free_space: Option<u64>,
    /// Recently used records are kept this long.
    pub keep_duration: Duration,
}

impl ConfigFile {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        ConfigFile::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_string(), message: e.to_string().trim_end().to_string() })
    }

    /// Checks every value and converts it; `path` names the file in errors.
    pub fn validate(&self, path: &str) -> Result<Config, ConfigError> {
        let invalid =
            |key: &str, message: String| ConfigError::Invalid { path: path.to_string(), key: key.to_string(), message };
        let unit = |key: &str, error: UnitError| invalid(key, error.to_string());
        if self.coordinator.is_none() && self.worker.is_none() {
            return Err(invalid("(file)", "needs a [coordinator] or a [worker] section".into()));
        }
        let coordinator = match &self.coordinator {
            None => None,
            Some(c) => Some(CoordinatorConfig {
                listen: c
                    .listen
                    .parse()
                    .map_err(|e| invalid("coordinator.listen", format!("{:?} is not HOST:PORT ({e})", c.listen)))?,
                root: c.root.clone(),
                lease_timeout: parse_duration(&c.lease_timeout).map_err(|e| unit("coordinator.lease-timeout", e))?,
                placement_timeout: parse_duration(&c.placement_timeout)
                    .map_err(|e| unit("coordinator.placement-timeout", e))?,
                retry_budget: c.retry_budget,
                upload_idle_timeout: parse_duration(&c.upload_idle_timeout)
                    .map_err(|e| unit("coordinator.upload-idle-timeout", e))?,
                replicas: replicas(c).map_err(|(key, message)| invalid(key, message))?,
                metrics_listen: socket_address(c.metrics_listen.as_deref())
                    .map_err(|message| invalid("coordinator.metrics-listen", message))?,
                web_listen: socket_address(c.web_listen.as_deref())
                    .map_err(|message| invalid("coordinator.web-listen", message))?,
                history_max_builds: c.history_max_builds,
                history_max_age: c
                    .history_max_age
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .map_err(|e| unit("coordinator.history-max-age", e))?,
                shared_cache: match &c.cache.shared {
                    None => None,
                    Some(text) => {
                        let mut spec = CacheSpec::parse(text, CacheDirection::To)
                            .map_err(|e| invalid("coordinator.cache.shared", e.reason))?;
                        // An unreachable shared cache must not fail every build of the fleet.
                        spec.ignore_error = true;
                        let has_mode = kiln_model::spec_fields(text)
                            .is_ok_and(|fields| fields.iter().any(|field| field.starts_with("mode=")));
                        if c.cache.mode.is_some() && has_mode {
                            return Err(invalid("coordinator.cache.mode", "the mode is given in `shared` too".into()));
                        }
                        spec.mode = match c.cache.mode.as_deref() {
                            None if has_mode => spec.mode,
                            None | Some("max") => CacheMode::Max,
                            Some("min") => CacheMode::Min,
                            Some(other) => {
                                return Err(invalid("coordinator.cache.mode", format!("{other:?} is not min or max")));
                            }
                        };
                        Some(spec)
                    }
                },
            }),
        };
        let worker = match &self.worker {
            None => None,
            Some(w) => {
                let coordinator_url = match (&w.coordinator, &self.coordinator) {
                    (Some(list), _) => {
                        let urls = coordinator_urls(list);
                        if urls.is_empty() {
                            return Err(invalid("worker.coordinator", "names no coordinator".into()));
                        }
                        if let Some(url) = urls.iter().find(|url| !is_node_url(url)) {
                            return Err(invalid("worker.coordinator", format!("{url:?} is not http://HOST:PORT")));
                        }
                        Some(list.clone())
                    }
                    (None, Some(_)) => None,
                    (None, None) => {
                        return Err(invalid("worker.coordinator", "required without a [coordinator] section".into()));
                    }
                };
                let mut platforms = Vec::new();
                for (i, text) in w.platforms.iter().enumerate() {
                    platforms.push(
                        text.parse::<Platform>()
                            .map_err(|e| invalid(&format!("worker.platforms[{i}]"), e.to_string()))?,
                    );
                }
                if platforms.is_empty() {
                    platforms.push(Platform::host());
                }
                if w.max_parallelism == Some(0) {
                    return Err(invalid("worker.max-parallelism", "must be at least 1".into()));
                }
                let max_parallelism = w.max_parallelism;
                let size = |key: &str, value: &Option<String>| {
                    value.as_deref().map(|v| parse_size(v).map_err(|e| unit(key, e))).transpose()
                };
                let listen: SocketAddr = w
                    .listen
                    .parse()
                    .map_err(|e| invalid("worker.listen", format!("{:?} is not HOST:PORT ({e})", w.listen)))?;
                let name = match &w.name {
                    Some(name) if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                        return Err(invalid("worker.name", format!("{name:?} must be non-empty, without spaces")));
                    }
                    Some(name) => Some(name.clone()),
                    None => None,
                };
                Some(WorkerConfig {
                    coordinator: coordinator_url,
                    name,
                    listen,
                    root: w.root.clone(),
                    platforms,
                    labels: w.labels.clone(),
                    max_parallelism,
                    cgroup_parent: w.cgroup_parent.clone(),
                    step_timeout: w
                        .step_timeout
                        .as_deref()
                        .map(|t| parse_duration(t).map_err(|e| unit("worker.step-timeout", e)))
                        .transpose()?,
                    insecure_registries: w.insecure_registries.clone(),
                    entitlements: w
                        .entitlements
                        .iter()
                        .enumerate()
                        .map(|(i, e)| e.parse().map_err(|m| invalid(&format!("worker.entitlements[{i}]"), m)))
                        .collect::<Result<_, _>>()?,
                    default_network: w
                        .default_network
                        .as_deref()
                        .map(|n| n.parse().map_err(|m| invalid("worker.default-network", m)))
                        .transpose()?
                        .unwrap_or_default(),
                    metrics_listen: socket_address(w.metrics_listen.as_deref())
                        .map_err(|message| invalid("worker.metrics-listen", message))?,
                    gc: GcPolicy {
                        reserved_space: size("worker.gc.reserved-space", &w.gc.reserved_space)?,
                        max_used_space: size("worker.gc.max-used-space", &w.gc.max_used_space)?,
                        min_free_space: size("worker.gc.min-free-space", &w.gc.min_free_space)?,
                        keep_duration: match &w.gc.keep_duration {
                            Some(d) => parse_duration(d).map_err(|e| unit("worker.gc.keep-duration", e))?,
                            None => Duration::from_secs(48 * 3600),
                        },
                    },
                })
            }
        };
        let log_json = match self.log.format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => return Err(invalid("log.format", format!("{other:?} is not text or json"))),
        };
        let tls = match (&self.tls.ca, &self.tls.cert, &self.tls.key, self.tls.insecure) {
            (Some(ca), Some(cert), Some(key), false) => {
                Tls::Files { ca: ca.clone(), cert: cert.clone(), key: key.clone() }
            }
            (None, None, None, true) => Tls::Insecure,
            (Some(_), Some(_), Some(_), true) => {
                return Err(invalid("tls.insecure", "certificates are given: remove `insecure = true`".into()));
            }
            (None, None, None, false) => {
                return Err(invalid(
                    "tls",
                    "kilnd serves TCP: give ca, cert and key (`kilnd certs` writes a development set), \
                     or insecure = true for loopback tests"
                        .into(),
                ));
            }
            (ca, cert, _, _) => {
                let missing = if ca.is_none() {
                    "ca"
                } else if cert.is_none() {
                    "cert"
                } else {
                    "key"
                };
                return Err(invalid(&format!("tls.{missing}"), "required with the other two".into()));
            }
        };
        let worker_urls = worker.as_ref().and_then(|w| w.coordinator.as_deref()).map(coordinator_urls);
        let peer_urls = coordinator.as_ref().and_then(|c| c.replicas.as_ref()).map(|r| r.peers.values());
        let (key, urls): (&str, Vec<&str>) = match (worker_urls, peer_urls) {
            (Some(urls), _) => ("worker.coordinator", urls),
            (None, Some(peers)) => ("coordinator.peers", peers.map(String::as_str).collect()),
            (None, None) => ("", Vec::new()),
        };
        for url in urls {
            match (&tls, url.starts_with("https://")) {
                (Tls::Files { .. }, false) => {
                    return Err(invalid(key, format!("{url:?}: https:// with [tls] certificates")));
                }
                (Tls::Insecure, true) => {
                    return Err(invalid(key, format!("{url:?}: http:// with insecure = true")));
                }
                _ => {}
            }
        }
        let (tokens, key) = match &self.coordinator {
            Some(c) => (&c.tokens, "coordinator.tokens"),
            None => (&self.tokens, "tokens"),
        };
        if self.coordinator.is_some() && !self.tokens.is_empty() {
            return Err(invalid("tokens", "a coordinator's tokens are [[coordinator.tokens]]".into()));
        }
        let tokens = tokens
            .iter()
            .enumerate()
            .map(|(i, token)| client_token(token).map_err(|message| invalid(&format!("{key}[{i}]"), message)))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, token) in tokens.iter().enumerate() {
            if tokens[..i].iter().any(|t| t.sha256 == token.sha256) {
                return Err(invalid(&format!("{key}[{i}]"), format!("{:?} has another token's sha256", token.name)));
            }
        }
        let (sections, key) = match &self.coordinator {
            Some(c) => (&c.tenants, "coordinator.tenants"),
            None => (&self.tenants, "tenants"),
        };
        if self.coordinator.is_some() && !self.tenants.is_empty() {
            return Err(invalid("tenants", "a coordinator's tenants are [coordinator.tenants.NAME]".into()));
        }
        let mut tenants = BTreeMap::new();
        for (name, section) in sections {
            let key = format!("{key}.{name}");
            if name != kiln_model::DEFAULT_TENANT && !tokens.iter().any(|t| t.tenant == *name) {
                return Err(invalid(
                    &key,
                    format!("no token names the tenant {name:?} (a typo would lift its limits)"),
                ));
            }
            let policy =
                tenant_policy(section).map_err(|(field, message)| invalid(&format!("{key}.{field}"), message))?;
            tenants.insert(name.clone(), policy);
        }
        Ok(Config { coordinator, worker, log_json, tls, tokens, tenants })
    }
}

/// A tenant section, checked; an error names the field.
fn tenant_policy(section: &TenantSection) -> Result<TenantPolicy, (&'static str, String)> {
    if let Some(group) = &section.cache_group
        && (group.is_empty() || group.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(("cache-group", format!("{group:?} must be non-empty, without spaces")));
    }
    let at_least_one = |field: &'static str, value: Option<usize>| match value {
        Some(0) => Err((field, "at least 1 (leave it out for no limit)".to_string())),
        _ => Ok(value),
    };
    let size = |field: &'static str, value: &Option<String>| {
        value.as_deref().map(parse_size).transpose().map_err(|e| (field, e.to_string()))
    };
    Ok(TenantPolicy {
        cache_group: section.cache_group.clone(),
        max_builds: at_least_one("max-builds", section.max_builds)?,
        max_queued_vertices: at_least_one("max-queued-vertices", section.max_queued_vertices)?,
        max_upload: size("max-upload", &section.max_upload)?,
        max_stored: size("max-stored", &section.max_stored)?,
    })
}

/// A token entry, checked.
fn client_token(token: &TokenSection) -> Result<ClientToken, String> {
    let sha256 = token.sha256.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("sha256 of {:?}: 64 hex digits, the SHA-256 of the token", token.name));
    }
    if token.tenant.is_empty() || token.tenant.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("tenant of {:?}: {:?} must be non-empty, without spaces", token.name, token.tenant));
    }
    let role = token.role.parse().map_err(|e| format!("role of {:?}: {e}", token.name))?;
    Ok(ClientToken { name: token.name.clone(), tenant: token.tenant.clone(), role, sha256 })
}

#[cfg(test)]
mod tests;

/// The name of a worker that gives none: unique per address it listens on (two workers on
/// one host listen on different addresses, and a name belongs to one live session), so
/// `bound` must be the address actually bound (a configured port 0 is a port chosen then).
/// `HOSTNAME-PORT` when listening on every address, else `HOSTNAME-IP-PORT`.
pub fn default_worker_name(bound: SocketAddr) -> String {
    if bound.ip().is_unspecified() {
        format!("{}-{}", hostname(), bound.port())
    } else {
        format!("{}-{}-{}", hostname(), bound.ip(), bound.port())
    }
}

/// This machine's host name (`kiln` when unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kiln".to_string())
}
