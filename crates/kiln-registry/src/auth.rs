//! Registry credentials from Docker's `config.json` (`auths`), as `docker login` writes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// A Docker config whose credentials cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's content is wrong.
    #[error("{}: {source}", path.display())]
    In {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: Box<CredentialsError>,
    },
    /// Not JSON of a Docker config's shape.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// An `auths.KEY.auth` value that is not `base64(user:password)`.
    #[error("auths.{key}.auth {problem}")]
    Auth {
        /// The registry key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Credentials per registry host.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_host: BTreeMap<String, (String, String)>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    /// `$DOCKER_CONFIG/config.json`, or `~/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
    }

    /// Reads a Docker config file; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::default()),
            Err(source) => return Err(CredentialsError::Read { path: path.to_path_buf(), source }),
        };
        Credentials::parse(&text)
            .map_err(|source| CredentialsError::In { path: path.to_path_buf(), source: Box::new(source) })
    }

    /// Parses the `auths` section of a Docker config.
    pub fn parse(text: &[u8]) -> Result<Credentials, CredentialsError> {
        let config: DockerConfig = serde_json::from_slice(text)?;
        let mut by_host = BTreeMap::new();
        for (key, entry) in config.auths {
            let pair = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|e| {
                        CredentialsError::Auth { key: key.clone(), problem: format!("is not base64: {e}") }
                    })?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| CredentialsError::Auth { key: key.clone(), problem: "is not UTF-8".into() })?;
                    let (user, pass) = decoded
                        .split_once(':')
                        .ok_or_else(|| CredentialsError::Auth { key: key.clone(), problem: "has no `:`".into() })?;
                    (user.to_string(), pass.to_string())
                }
                (_, Some(user), Some(pass)) => (user, pass),
                _ => continue,
            };
            by_host.insert(normalize_host(&key), pair);
        }
        Ok(Credentials { by_host })
    }

    /// The credentials for a registry host (`docker.io` matches Docker Hub's legacy key).
    pub fn for_registry(&self, registry: &str) -> RegistryAuth {
        let host = normalize_host(registry);
        match self.by_host.get(&host) {
            Some((user, pass)) => RegistryAuth::Basic(user.clone(), pass.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://host:5000/path` → `host:5000`.
fn normalize_host(key: &str) -> String {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auths_are_read_and_matched_by_host() {
        let config = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
            "127.0.0.1:5000": {"auth": "dXNlcjpwYTpzcw=="},
            "http://other.example:8080/v2/": {"username": "u", "password": "p"},
            "empty.example": {}
        }, "credsStore": "desktop"}"#;
        let creds = Credentials::parse(config).unwrap();
        let basic = |registry: &str| match creds.for_registry(registry) {
            RegistryAuth::Basic(user, pass) => Some((user, pass)),
            _ => None,
        };
        let pair = |u: &str, p: &str| Some((u.to_string(), p.to_string()));
        assert_eq!(basic("docker.io"), pair("hub", "secret"));
        assert_eq!(basic("127.0.0.1:5000"), pair("user", "pa:ss"));
        assert_eq!(basic("other.example:8080"), pair("u", "p"));
        assert!(matches!(creds.for_registry("empty.example"), RegistryAuth::Anonymous));
        assert!(matches!(creds.for_registry("unknown.example"), RegistryAuth::Anonymous));
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let err = Credentials::parse(br#"{"auths": {"r.example": {"auth": "%%%"}}}"#).unwrap_err().to_string();
        assert!(err.contains("auths.r.example.auth is not base64"), "{err}");
        assert!(Credentials::load(Path::new("/nonexistent/config.json")).unwrap().by_host.is_empty());
    }
}
