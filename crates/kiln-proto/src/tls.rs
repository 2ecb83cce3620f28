//! TLS on Kiln's connections: mutual TLS between nodes (a coordinator and its workers, workers
//! and their peers), server-authenticated TLS for clients. Certificates come from PEM files
//! (`kilnd certs` writes a development set); a node is known by the name its certificate is
//! valid for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate or key file that cannot be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// The TLS material of one end: the CA that signs the cluster's certificates and, for a node,
/// its own certificate and key.
#[derive(Clone)]
pub struct NodeTls {
    ca: Certificate,
    identity: Option<Identity>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("identity", &self.identity.is_some()).finish_non_exhaustive()
    }
}

/// Reads a file of PEM certificates, checking it holds at least one.
fn certificates(path: &Path) -> Result<Vec<u8>, TlsError> {
    let error = |reason: String| TlsError { path: path.to_path_buf(), reason };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let parsed: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match parsed {
        Ok(certificates) if certificates.is_empty() => Err(error("no PEM certificate in it".into())),
        Ok(_) => Ok(pem),
        Err(e) => Err(error(format!("not PEM certificates: {e}"))),
    }
}

impl NodeTls {
    /// The CA certificate `ca` and, for a node, its certificate chain and private key; each
    /// file is checked to hold what it should.
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<NodeTls, TlsError> {
        let ca = Certificate::from_pem(certificates(ca)?);
        let identity = match identity {
            None => None,
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key_error = |reason: String| TlsError { path: key.to_path_buf(), reason };
                let key_pem = std::fs::read(key).map_err(|e| key_error(e.to_string()))?;
                PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| key_error(format!("not a PEM private key: {e}")))?;
                Some(Identity::from_pem(chain, key_pem))
            }
        };
        Ok(NodeTls { ca, identity })
    }

    /// Whether this end has a certificate of its own (a node; a client has only the CA).
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// A listener's configuration (`None` without a certificate of its own): its own
    /// certificate, and clients' certificates checked against the CA. With
    /// `anonymous_clients`, a client may present none (build clients authenticate with
    /// tokens instead); a certificate presented is still checked.
    pub fn server(&self, anonymous_clients: bool) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        Some(
            ServerTlsConfig::new()
                .identity(identity)
                .client_ca_root(self.ca.clone())
                .client_auth_optional(anonymous_clients)
                .timeout(HANDSHAKE_TIMEOUT),
        )
    }

    /// A connection's configuration: the server checked against the CA (its certificate
    /// valid for the host dialled), this end's certificate presented when it has one.
    pub fn client(&self) -> ClientTlsConfig {
        let config = ClientTlsConfig::new().ca_certificate(self.ca.clone()).timeout(HANDSHAKE_TIMEOUT);
        match &self.identity {
            Some(identity) => config.identity(identity.clone()),
            None => config,
        }
    }
}

/// Whether a peer's certificate (its chain, leaf first, as the server received and checked
/// it against the CA) is valid for `name`: the name a node claims must be one its
/// certificate was issued for.
pub fn certificate_names(chain: &[CertificateDer<'_>], name: &str) -> bool {
    let Some(leaf) = chain.first() else { return false };
    let Ok(certificate) = webpki::EndEntityCert::try_from(leaf) else { return false };
    let Ok(name) = ServerName::try_from(name) else { return false };
    certificate.verify_is_valid_for_subject_name(&name).is_ok()
}
