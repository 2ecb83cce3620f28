//! `kilnd certs`: a development CA and node certificates (rcgen), for tests, the demo and
//! first installs. Each node certificate is valid for the node's name (its identity: a
//! worker's name is its certificate's) and for every host it is reached at, for both ends of
//! a connection (server and client authentication).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The subject of the CA `kilnd certs` creates: with the same key it is the same issuer, so
/// a later run signs new node certificates with an existing CA.
const CA_NAME: &str = "Kiln development CA";

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// Writes `content` to `path`, readable by its owner only when `private`.
fn write(path: &Path, content: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(content.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Writes `ca.pem` (and `ca-key.pem`) unless `out` has them, then `NAME.pem` and
/// `NAME-key.pem` for each name, valid for the name and every host. Returns the files
/// written.
pub fn generate(out: &Path, names: &[String], hosts: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (ca_cert, ca_key) = (out.join("ca.pem"), out.join("ca-key.pem"));
    let mut written = Vec::new();
    let ca_key_pair = if ca_cert.exists() && ca_key.exists() {
        let pem = std::fs::read_to_string(&ca_key).with_context(|| format!("reading {}", ca_key.display()))?;
        KeyPair::from_pem(&pem).with_context(|| format!("{}: not a private key", ca_key.display()))?
    } else {
        let key = KeyPair::generate().context("generating the CA's key")?;
        let certificate = ca_params().self_signed(&key).context("signing the CA's certificate")?;
        write(&ca_key, &key.serialize_pem(), true)?;
        write(&ca_cert, &certificate.pem(), false)?;
        written.extend([ca_cert, ca_key]);
        key
    };
    let issuer = Issuer::new(ca_params(), &ca_key_pair);
    for name in names {
        if name.is_empty() || name.contains(['/', ',']) || name.chars().any(char::is_whitespace) {
            anyhow::bail!("--names: {name:?} cannot name a file and a certificate");
        }
        let subjects: Vec<String> = std::iter::once(name.clone()).chain(hosts.iter().cloned()).collect();
        let mut params = CertificateParams::new(subjects)
            .with_context(|| format!("{name}: a name or host is not a DNS name or an IP address"))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().with_context(|| format!("generating {name}'s key"))?;
        let certificate = params.signed_by(&key, &issuer).with_context(|| format!("signing {name}'s certificate"))?;
        let (cert_path, key_path) = (out.join(format!("{name}.pem")), out.join(format!("{name}-key.pem")));
        write(&key_path, &key.serialize_pem(), true)?;
        write(&cert_path, &certificate.pem(), false)?;
        written.extend([cert_path, key_path]);
    }
    Ok(written)
}
