//! Who is asking: the tenants and roles client tokens map to.

use std::fmt;

/// What a client may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Read its tenant's build history (`kiln history`, the web UI); no builds.
    Read,
    /// Submit builds and read what they produced.
    Build,
    /// Everything, including the whole cluster's workers, disk usage and pruning.
    Admin,
}

impl Role {
    /// Its name in configs (`build`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Build => "build",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "read" => Ok(Role::Read),
            "build" => Ok(Role::Build),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not read, build or admin")),
        }
    }
}

/// A client token as a daemon's config holds it: hashed, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientToken {
    /// What logs call it (`ci-team-a`).
    pub name: String,
    /// The tenant its builds belong to.
    pub tenant: String,
    /// What it may do.
    pub role: Role,
    /// The SHA-256 of the token, lowercase hex.
    pub sha256: String,
}

/// The caller of a request, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name (`local` for the unix socket, `anonymous` where no tokens are
    /// configured).
    pub name: String,
    /// The tenant.
    pub tenant: String,
    /// The role.
    pub role: Role,
}

/// The tenant of callers that no token names: the unix socket's and a daemon's without
/// tokens.
pub const DEFAULT_TENANT: &str = "default";

impl Caller {
    /// A caller of the default tenant with every right (the unix socket: local access is
    /// the local trust model).
    pub fn local(name: &str) -> Caller {
        Caller { name: name.to_string(), tenant: DEFAULT_TENANT.to_string(), role: Role::Admin }
    }
}

/// What one tenant may use: `[coordinator.tenants.NAME]` (`[tenants.NAME]` on a standalone
/// daemon). Every limit is off when unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantPolicy {
    /// The tenants that share cache entries, in-flight work and uploaded contexts: those with
    /// the same group trust each other's results. Default: the tenant's own name.
    pub cache_group: Option<String>,
    /// Builds in progress at once.
    pub max_builds: Option<usize>,
    /// Vertices of the tenant's builds in progress (a new build's whole graph counts).
    pub max_queued_vertices: Option<usize>,
    /// Bytes of one build's uploaded context, and of one upload.
    pub max_upload: Option<u64>,
    /// Bytes of uploaded contexts the tenant's cache group keeps stored.
    pub max_stored: Option<u64>,
}

impl TenantPolicy {
    /// The cache group of `tenant` under this policy: `None` for the default group (the
    /// unix socket's, and every tenant's when none is configured), whose cache keys are
    /// unscoped.
    pub fn cache_group(&self, tenant: &str) -> Option<String> {
        let group = self.cache_group.as_deref().unwrap_or(tenant);
        (group != DEFAULT_TENANT).then(|| group.to_string())
    }
}
