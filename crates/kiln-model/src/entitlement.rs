//! Entitlements: what a build step may do beyond the sandbox (buildx's `--allow`). A client
//! asks for them, a worker's config grants them.

use std::fmt;

use kiln_graph::{NetworkMode, Op, SecurityMode};
use serde::{Deserialize, Serialize};

/// A privilege beyond the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Entitlement {
    /// `RUN --network=host`: the worker's own network namespace.
    #[serde(rename = "network.host")]
    NetworkHost,
    /// `RUN --security=insecure`: every capability the worker holds, no masked paths.
    #[serde(rename = "security.insecure")]
    SecurityInsecure,
}

impl Entitlement {
    /// Its name (`network.host`, `security.insecure`), as buildx spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "network.host",
            Entitlement::SecurityInsecure => "security.insecure",
        }
    }

    /// The entitlements a step needs.
    pub fn needed_by(op: &Op) -> Vec<Entitlement> {
        let Op::Exec(exec) = op else { return Vec::new() };
        let mut needed = Vec::new();
        if exec.network == NetworkMode::Host {
            needed.push(Entitlement::NetworkHost);
        }
        if exec.security == SecurityMode::Insecure {
            needed.push(Entitlement::SecurityInsecure);
        }
        needed
    }

    /// The flag of the Dockerfile instruction that needs it.
    pub fn flag(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "RUN --network=host",
            Entitlement::SecurityInsecure => "RUN --security=insecure",
        }
    }
}

impl fmt::Display for Entitlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Entitlement {
    type Err = String;

    fn from_str(text: &str) -> Result<Entitlement, String> {
        match text {
            "network.host" => Ok(Entitlement::NetworkHost),
            "security.insecure" => Ok(Entitlement::SecurityInsecure),
            other => Err(format!("unknown entitlement {other:?} (network.host or security.insecure)")),
        }
    }
}

/// The network of a RUN step that names none (`RUN --network=default`, the default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DefaultNetwork {
    /// A network namespace of its own with outbound access, cut off from the worker, the
    /// other steps, link-local addresses and the coordinator.
    #[default]
    Isolated,
    /// The worker's own network namespace (where creating namespaces is not possible).
    Worker,
}

impl std::str::FromStr for DefaultNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<DefaultNetwork, String> {
        match text {
            "isolated" => Ok(DefaultNetwork::Isolated),
            "worker" => Ok(DefaultNetwork::Worker),
            other => Err(format!("{other:?} is not isolated or worker")),
        }
    }
}
