//! The coordinators a client or a worker may reach. Each URL of a comma-separated list is one;
//! a URL whose host name resolves to several addresses (a Kubernetes headless Service in front
//! of a replica set, or several `/etc/hosts` lines) stands for one coordinator per address,
//! each one's certificate still checked against the name.

use std::net::{IpAddr, SocketAddr};

/// A coordinator to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http://HOST:PORT` or `https://HOST:PORT` (`unix:///PATH` for a local daemon); HOST is
    /// an address when the target came from a name.
    pub url: String,
    /// The name the address came from: the server's certificate must be valid for it.
    pub name: Option<String>,
}

impl Target {
    /// A URL as given.
    pub fn url(url: &str) -> Target {
        Target { url: url.to_string(), name: None }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} ({name})", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// The targets of `urls`, in order, each once: a URL whose host is a name resolving to two or
/// more addresses becomes one target per address; any other URL (an address, a name with one
/// address, one that does not resolve now) stays as given, and connecting to it says why it
/// fails. Names are resolved afresh on every call: a replaced member's new address is found.
pub async fn resolve(urls: &[String]) -> Vec<Target> {
    let mut targets = Vec::new();
    for url in urls {
        for target in expand(url).await {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    targets
}

async fn expand(url: &str) -> Vec<Target> {
    let as_given = vec![Target::url(url)];
    let Some((host, port)) = host_and_port(url) else { return as_given };
    let Ok(resolved) = tokio::net::lookup_host((host, port)).await else { return as_given };
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for address in resolved {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    // Members of one replica set share an address family; a name with an IPv4 and an IPv6
    // address (`localhost`, a dual-stack host) is one daemon.
    let family = addresses.first().is_some_and(SocketAddr::is_ipv4);
    addresses.retain(|a| a.is_ipv4() == family);
    if addresses.len() < 2 {
        return as_given;
    }
    let scheme = url.split_once("://").map_or("http", |(scheme, _)| scheme);
    addresses.into_iter().map(|a| Target { url: format!("{scheme}://{a}"), name: Some(host.to_string()) }).collect()
}

/// The host name and port of a TCP URL whose host is a name (not an address).
fn host_and_port(url: &str) -> Option<(&str, u16)> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
    let port = port.parse().ok()?;
    let is_address = host.parse::<IpAddr>().is_ok() || host.starts_with('[');
    (!is_address && !host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_are_resolved() {
        assert_eq!(host_and_port("https://kiln.example:7070"), Some(("kiln.example", 7070)));
        assert_eq!(host_and_port("http://127.0.0.1:7070"), None);
        assert_eq!(host_and_port("http://[::1]:7070"), None);
        assert_eq!(host_and_port("unix:///run/kiln.sock"), None);
        assert_eq!(host_and_port("https://kiln.example"), None);
    }

    #[tokio::test]
    async fn a_name_with_one_address_and_addresses_stay_as_given() {
        let urls = vec!["http://127.0.0.1:1".to_string(), "http://127.0.0.1:1".to_string(), "http://[::1]:2".into()];
        assert_eq!(resolve(&urls).await, [Target::url("http://127.0.0.1:1"), Target::url("http://[::1]:2")]);
        // localhost has an IPv4 and an IPv6 address: one daemon, not two.
        let local = vec!["http://localhost:7070".to_string()];
        assert_eq!(resolve(&local).await, [Target::url("http://localhost:7070")]);
    }
}
