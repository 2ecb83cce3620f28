//! The default network of a RUN step: a network namespace of its own, with outbound access
//! through the worker (routed and masqueraded) but no way to the worker itself, to other
//! steps, to the link-local metadata address or to the coordinator.
//!
//! Creating a namespace and its veth pair takes a few `ip` commands (60–100 ms here),
//! so namespaces are kept in a pool, as BuildKit keeps its CNI namespaces: a step takes one
//! and gives it back. A step with `--security=insecure` could have changed its namespace
//! (it has `CAP_NET_ADMIN`): its namespace is deleted instead of reused.
//!
//! Addresses: each namespace is a /30 of `10.89.0.0/16` (the worker's end `.1`, the step's
//! `.2`), allocated host-wide under a lock file, since several workers may share a host.
//! Namespaces are named `kiln-PID-BLOCK` after the worker's process and their /30: what a
//! crashed worker left is deleted when the next one sets up its first namespace.
//!
//! IPv6 is off on the worker's end of each pair, so a step has no IPv6 neighbour to reach
//! the worker through. Forwarding (`net.ipv4.ip_forward`) is switched on for the host and
//! left on.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// The addresses of every step namespace.
const SUBNET: &str = "10.89.0.0/16";
/// Interfaces on the worker's side are `kiln…`: the rules match them all with `kiln+`.
const INTERFACE_PREFIX: &str = "kiln";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Held while allocating addresses.
const LOCK: &str = "/run/kiln-netns.lock";

/// A namespace in the pool.
#[derive(Debug)]
struct Namespace {
    name: String,
}

impl Namespace {
    fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }
}

/// The pool of step namespaces of one worker.
pub(crate) struct NetPool {
    state: Mutex<PoolState>,
    /// What steps must not reach besides the worker itself (the coordinator).
    unreachable: Vec<SocketAddr>,
    /// The `/etc/resolv.conf` steps get, read once: the DNS rules allow its nameservers.
    resolv_conf: String,
}

#[derive(Default)]
struct PoolState {
    free: Vec<Namespace>,
    /// The host's rules are in place.
    ready: bool,
}

impl NetPool {
    /// An empty pool; namespaces are made as steps need them. Steps will not reach
    /// `unreachable` (TCP), and may query the host's nameservers.
    pub(crate) fn new(unreachable: Vec<SocketAddr>) -> NetPool {
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        NetPool { state: Mutex::default(), unreachable, resolv_conf: step_resolv_conf(&host) }
    }

    /// A namespace for one step, given back when the lease is dropped: deleted instead
    /// when the step `may_change` it. Blocking (runs `ip`).
    pub(crate) fn lease(self: &Arc<Self>, may_change: bool) -> Result<Lease, String> {
        let namespace = self.take()?;
        Ok(Lease { pool: Arc::clone(self), namespace: Some(namespace), may_change })
    }

    /// A free namespace, or a new one.
    fn take(&self) -> Result<Namespace, String> {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !state.ready {
                remove_orphans();
                host_rules(&self.unreachable, &nameservers(&self.resolv_conf))?;
                state.ready = true;
            }
            if let Some(namespace) = state.free.pop() {
                return Ok(namespace);
            }
        }
        create()
    }
}

/// A step's namespace, while it runs.
pub(crate) struct Lease {
    pool: Arc<NetPool>,
    namespace: Option<Namespace>,
    may_change: bool,
}

impl Lease {
    /// The namespace's path, for the runner to enter.
    pub(crate) fn path(&self) -> PathBuf {
        self.namespace.as_ref().map(Namespace::path).unwrap_or_default()
    }

    /// The step's `/etc/resolv.conf`: nameservers it can reach, which the rules let it query
    /// (even on the worker's host or a link-local address: NodeLocal DNSCache, a cloud's).
    pub(crate) fn resolv_conf(&self) -> &str {
        &self.pool.resolv_conf
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(namespace) = self.namespace.take() else { return };
        if self.may_change {
            crate::blocking_in_drop(|| delete(&namespace.name));
        } else {
            self.pool.state.lock().unwrap_or_else(|e| e.into_inner()).free.push(namespace);
        }
    }
}

impl Drop for NetPool {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for namespace in state.free.drain(..) {
            delete(&namespace.name);
        }
    }
}

/// Runs `ip`/`iptables` with `args`; the error names the command and says what it said.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program).args(args).output().map_err(|e| {
        format!(
            "step network: running {program}: {e} (the default RUN network needs iproute2 and iptables; \
             `worker.default-network = \"worker\"` or `kilnd --default-network worker` runs steps in the worker's network)"
        )
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!("step network: {program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
}

/// Adds an iptables rule unless it is there (several workers on one host share them).
fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), String> {
    let check: Vec<&str> = ["-w", "-t", table, "-C", chain].iter().copied().chain(rule.iter().copied()).collect();
    if run("iptables", &check).is_ok() {
        return Ok(());
    }
    let insert: Vec<&str> = ["-w", "-t", table, "-I", chain, "1"].iter().copied().chain(rule.iter().copied()).collect();
    run("iptables", &insert)
}

/// The host's side: forwarding on, steps masqueraded outbound, and dropped towards the
/// worker itself, each other, link-local addresses and `unreachable` (matched by the
/// address a step dialled too, so a virtual IP translated to it is caught), except DNS to
/// `resolvers`.
fn host_rules(unreachable: &[SocketAddr], resolvers: &[std::net::IpAddr]) -> Result<(), String> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| format!("step network: enabling forwarding: {e}"))?;
    let steps = format!("{INTERFACE_PREFIX}+");
    ensure_rule("nat", "POSTROUTING", &["-s", SUBNET, "!", "-d", SUBNET, "-j", "MASQUERADE"])?;
    // Inserted at the top in reverse order: the drops end up before the accepts.
    ensure_rule(
        "filter",
        "FORWARD",
        &["-o", &steps, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
    )?;
    ensure_rule("filter", "FORWARD", &["-i", &steps, "-j", "ACCEPT"])?;
    // Loopback addresses need no rule: a step's loopback is its own.
    for address in unreachable.iter().filter(|a| a.is_ipv4() && !a.ip().is_loopback()) {
        let (ip, port) = (address.ip().to_string(), address.port().to_string());
        ensure_rule("filter", "FORWARD", &["-i", &steps, "-d", &ip, "-p", "tcp", "--dport", &port, "-j", "DROP"])?;
        let dialled = ["-m", "conntrack", "--ctorigdst", &ip, "--ctorigdstport", &port];
        let rule: Vec<&str> = ["-i", &steps, "-p", "tcp"].into_iter().chain(dialled).chain(["-j", "DROP"]).collect();
        ensure_rule("filter", "FORWARD", &rule)?;
    }
    ensure_rule("filter", "FORWARD", &["-i", &steps, "-d", "169.254.0.0/16", "-j", "DROP"])?;
    ensure_rule("filter", "FORWARD", &["-i", &steps, "-o", &steps, "-j", "DROP"])?;
    // Anything addressed to the worker's host itself: its services, whichever address.
    ensure_rule("filter", "INPUT", &["-i", &steps, "-j", "DROP"])?;
    // Inserted last, so first: DNS to the nameservers steps are given.
    for resolver in resolvers.iter().filter(|ip| ip.is_ipv4()) {
        let ip = resolver.to_string();
        for protocol in ["udp", "tcp"] {
            for chain in ["INPUT", "FORWARD"] {
                ensure_rule(
                    "filter",
                    chain,
                    &["-i", &steps, "-d", &ip, "-p", protocol, "--dport", "53", "-j", "ACCEPT"],
                )?;
            }
        }
    }
    Ok(())
}

/// Creates a namespace with its veth pair on a free /30. Its names come from the /30, which
/// is unique on the host while the namespace lives: `kiln-PID-BLOCK`, interfaces `kilnBLOCK`
/// (hex, within Linux's 15 characters).
fn create() -> Result<Namespace, String> {
    // Addresses are allocated host-wide: the lock spans finding a free /30 and taking it.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .map_err(|e| format!("step network: {LOCK}: {e}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("step network: locking {LOCK}: {e}"))?;
    let (block, host, step) = free_block()?;
    let name = format!("kiln-{}-{block}", std::process::id());
    let outside = format!("{INTERFACE_PREFIX}{block:x}");
    let inside = format!("{outside}i");
    let name = name.as_str();
    // A name that exists is not ours to delete.
    run("ip", &["netns", "add", name])?;
    let created = (|| {
        run("ip", &["link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", name])?;
        // Without IPv6 on the worker's end, a step has no link-local way to the worker.
        let ipv6 = format!("/proc/sys/net/ipv6/conf/{outside}/disable_ipv6");
        if Path::new(&ipv6).exists() {
            std::fs::write(&ipv6, "1").map_err(|e| format!("step network: {ipv6}: {e}"))?;
        }
        run("ip", &["addr", "add", &format!("{host}/30"), "dev", &outside])?;
        run("ip", &["link", "set", &outside, "up"])?;
        run("ip", &["-n", name, "addr", "add", &format!("{step}/30"), "dev", &inside])?;
        run("ip", &["-n", name, "link", "set", &inside, "name", "eth0"])?;
        run("ip", &["-n", name, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        run("ip", &["-n", name, "route", "add", "default", "via", &host.to_string()])
    })();
    if let Err(error) = created {
        delete(name);
        return Err(error);
    }
    Ok(Namespace { name: name.to_string() })
}

/// The first /30 of [`SUBNET`] no interface on the host uses: its number within the subnet,
/// the worker's end and the step's.
fn free_block() -> Result<(u32, Ipv4Addr, Ipv4Addr), String> {
    let output = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .map_err(|e| format!("step network: running ip: {e}"))?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let used: std::collections::HashSet<u32> = listing
        .split_whitespace()
        .filter_map(|word| word.split('/').next()?.parse::<Ipv4Addr>().ok())
        .map(|ip| u32::from(ip) >> 2)
        .collect();
    let base = u32::from(Ipv4Addr::new(10, 89, 0, 0)) >> 2;
    (base..base + (1 << 14))
        .find(|block| !used.contains(block))
        .map(|block| (block - base, Ipv4Addr::from((block << 2) + 1), Ipv4Addr::from((block << 2) + 2)))
        .ok_or_else(|| format!("step network: every /30 of {SUBNET} is in use"))
}

/// Deletes a namespace (its veth pair goes with it); failures are logged, not fatal.
fn delete(name: &str) {
    if let Err(error) = run("ip", &["netns", "del", name]) {
        tracing::warn!("{error}");
    }
}

/// Deletes the namespaces of workers that are gone.
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("kiln-").and_then(|rest| rest.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            delete(&name);
        }
    }
}

/// The nameservers a resolv.conf names.
fn nameservers(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf.lines().filter_map(|line| line.trim().strip_prefix("nameserver")?.trim().parse().ok()).collect()
}

/// `/etc/resolv.conf` for a step in its own namespace: the host's, without nameservers on
/// the host's loopback (unreachable from the step); Docker's fallback when none is left.
fn step_resolv_conf(host: &str) -> String {
    let mut lines: Vec<&str> = host
        .lines()
        .filter(|line| {
            let mut words = line.split_whitespace();
            !(words.next() == Some("nameserver")
                && words.next().is_some_and(|ip| ip.starts_with("127.") || ip == "::1"))
        })
        .collect();
    if !lines.iter().any(|line| line.trim_start().starts_with("nameserver")) {
        lines.extend(["nameserver 8.8.8.8", "nameserver 8.8.4.4"]);
    }
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_loses_loopback_nameservers() {
        let host = "search example.org\nnameserver 127.0.0.53\nnameserver 10.96.0.10\n";
        assert_eq!(step_resolv_conf(host), "search example.org\nnameserver 10.96.0.10\n");
        assert_eq!(step_resolv_conf("nameserver ::1\n"), "nameserver 8.8.8.8\nnameserver 8.8.4.4\n");
        let allowed = nameservers(&step_resolv_conf("nameserver 169.254.20.10\nnameserver 127.0.0.53\n"));
        assert_eq!(allowed, ["169.254.20.10".parse::<std::net::IpAddr>().unwrap()]);
    }
}
