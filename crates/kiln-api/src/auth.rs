//! Who may call what: client tokens (hashed in the daemon's config) mapping to a tenant and a
//! role, and node certificates for the services only nodes call.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_model::{Caller, ClientToken, DEFAULT_TENANT, Role};
use kiln_types::Digest;
use tonic::transport::CertificateDer;
use tonic::{Request, Status};

use crate::error::ApiError;
use crate::limits::RateLimits;
use crate::replication::Replication;

/// The rules of one listener.
#[derive(Clone, Default)]
pub struct Access {
    /// The unix socket: every caller is local and trusted.
    local: bool,
    /// Connections are mutual TLS: node services need a certificate from the cluster's CA.
    mutual_tls: bool,
    /// Client tokens by the hex SHA-256 of the token; none: every client is an admin of the
    /// default tenant.
    tokens: Arc<HashMap<String, ClientToken>>,
    /// Request rates per client address and per token (TCP).
    limits: Option<Arc<RateLimits>>,
    /// A replicated coordinator's member: only the leader serves clients and workers.
    replication: Option<Arc<Replication>>,
}

impl Access {
    /// The unix socket's: local access is the local trust model.
    pub fn local() -> Access {
        Access { local: true, ..Access::default() }
    }

    /// A TCP listener's: with `mutual_tls`, node services check certificates; with
    /// `tokens`, every client request needs one of them.
    pub fn tcp(mutual_tls: bool, tokens: Vec<ClientToken>) -> Access {
        let tokens = tokens.into_iter().map(|t| (t.sha256.clone(), t)).collect();
        Access {
            local: false,
            mutual_tls,
            tokens: Arc::new(tokens),
            limits: Some(Arc::new(RateLimits::new())),
            replication: None,
        }
    }

    /// Serves clients and workers only while `replication`'s member leads.
    pub fn led_by(mut self, replication: Option<Arc<Replication>>) -> Access {
        self.replication = replication;
        self
    }

    /// Ok unless this is a replicated coordinator that does not lead.
    pub(crate) fn leading(&self) -> Result<(), ApiError> {
        self.replication.as_ref().map_or(Ok(()), |replication| replication.leading())
    }

    /// Checks that a node speaking for a raft member presented a certificate (`chain`) valid
    /// for the member's host.
    pub(crate) fn member(&self, chain: &[CertificateDer<'_>], host: &str) -> Result<(), ApiError> {
        if self.local || !self.mutual_tls || kiln_proto::tls::certificate_names(chain, host) {
            Ok(())
        } else {
            Err(ApiError::NotANode("the raft service"))
        }
    }

    /// The caller of a client request, from its bearer token.
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        if self.local {
            return Ok(Caller::local("local"));
        }
        if self.tokens.is_empty() {
            return Ok(Caller { name: "anonymous".into(), tenant: DEFAULT_TENANT.into(), role: Role::Admin });
        }
        let header = request.metadata().get("authorization").ok_or(ApiError::NoToken)?;
        let token = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).ok_or(ApiError::UnknownToken)?;
        let known = self.tokens.get(&Digest::of(token.as_bytes()).hex()).ok_or(ApiError::UnknownToken)?;
        Ok(Caller { name: known.name.clone(), tenant: known.tenant.clone(), role: known.role })
    }

    /// Counts a client request against its address's rate, before it is authenticated.
    fn within_peer_rate<T>(&self, request: &Request<T>) -> Result<(), ApiError> {
        self.limits.as_ref().map_or(Ok(()), |limits| limits.check_peer(request.remote_addr()))
    }

    /// Counts an authenticated client request against its token's rate.
    fn within_token_rate(&self, caller: &Caller) -> Result<(), ApiError> {
        let token = Some(caller.name.as_str()).filter(|_| !self.tokens.is_empty());
        self.limits.as_ref().map_or(Ok(()), |limits| limits.check_token(token))
    }

    /// Checks that a request to a node service (`service`) comes from a node: with mutual
    /// TLS, one that presented a certificate the CA signed (the handshake checked it).
    pub fn node<T>(&self, request: &Request<T>, service: &'static str) -> Result<(), ApiError> {
        if self.local || !self.mutual_tls || request.peer_certs().is_some_and(|chain| !chain.is_empty()) {
            Ok(())
        } else {
            Err(ApiError::NotANode(service))
        }
    }

    /// Checks that a worker registering as `name` presented a certificate (`chain`, which
    /// [`Access::node`] checked is there) valid for it.
    pub fn worker(&self, chain: &[CertificateDer<'_>], name: &str) -> Result<(), ApiError> {
        if self.local || !self.mutual_tls || kiln_proto::tls::certificate_names(chain, name) {
            Ok(())
        } else {
            Err(ApiError::NotThatWorker { name: name.to_string() })
        }
    }
}

/// The caller a request was authenticated as ([`Authenticate`] put it there).
pub(crate) fn caller_of<T>(request: &Request<T>) -> Caller {
    request.extensions().get::<Caller>().cloned().unwrap_or_else(|| Caller::local("local"))
}

/// Refuses a caller that may only read (`action` says what it tried).
pub(crate) fn builder(caller: &Caller, action: &'static str) -> Result<(), Status> {
    match caller.role {
        Role::Read => Err(ApiError::ReadOnly { action, token: caller.name.clone() }.into()),
        Role::Build | Role::Admin => Ok(()),
    }
}

/// Refuses a caller that is not an admin.
pub(crate) fn admin(caller: &Caller, action: &'static str) -> Result<(), Status> {
    match caller.role {
        Role::Admin => Ok(()),
        role => Err(ApiError::NotAdmin { action, token: caller.name.clone(), role }.into()),
    }
}

/// Authenticates every request to a client service, recording the caller in the request.
#[derive(Clone)]
pub(crate) struct Authenticate(pub(crate) Access);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.0.within_peer_rate(&request)?;
        let caller = self.0.caller(&request)?;
        self.0.within_token_rate(&caller)?;
        self.0.leading()?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Lets only nodes call a node service.
#[derive(Clone)]
pub(crate) struct NodesOnly(pub(crate) Access, pub(crate) &'static str);

impl tonic::service::Interceptor for NodesOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.0.node(&request, self.1)?;
        Ok(request)
    }
}
