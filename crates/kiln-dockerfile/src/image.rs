//! The image configuration a stage accumulates (OCI image config field names).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// OCI `config.Healthcheck`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", ...]` or `["CMD-SHELL", line]`.
    pub test: Vec<String>,
    /// Nanoseconds between checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<u64>,
    /// Nanoseconds before a check times out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Nanoseconds of start-up grace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_period: Option<u64>,
    /// Nanoseconds between checks during start-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<u64>,
    /// Consecutive failures before unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

/// The runtime configuration part of an OCI image config, as Docker writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// Default user.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub user: String,
    /// Exposed ports as `port/proto`.
    #[serde(skip_serializing_if = "BTreeSet::is_empty", default, with = "set_as_map")]
    pub exposed_ports: BTreeSet<String>,
    /// Environment as `KEY=value`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub env: Vec<String>,
    /// Entrypoint.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default command.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cmd: Option<Vec<String>>,
    /// Volumes.
    #[serde(skip_serializing_if = "BTreeSet::is_empty", default, with = "set_as_map")]
    pub volumes: BTreeSet<String>,
    /// Working directory.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub working_dir: String,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub labels: BTreeMap<String, String>,
    /// Stop signal.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stop_signal: Option<String>,
    /// Health check.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub healthcheck: Option<HealthConfig>,
    /// ONBUILD triggers for images built from this one.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub on_build: Vec<String>,
    /// SHELL for shell-form commands.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub shell: Option<Vec<String>>,
}

impl ImageConfig {
    /// The value of an environment variable.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env.iter().rev().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// Sets an environment variable, replacing an earlier value in place.
    pub fn env_set(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self.env.iter_mut().find(|kv| kv.split_once('=').is_some_and(|(k, _)| k == key)) {
            Some(slot) => *slot = entry,
            None => self.env.push(entry),
        }
    }
}

/// Docker writes port and volume sets as JSON objects with empty values.
mod set_as_map {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize, Default)]
    struct Empty {}

    pub fn serialize<S: Serializer>(set: &BTreeSet<String>, s: S) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<&String, Empty> = set.iter().map(|k| (k, Empty {})).collect();
        map.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<String>, D::Error> {
        let map: BTreeMap<String, serde_json::Value> = BTreeMap::deserialize(d)?;
        Ok(map.into_keys().collect())
    }
}

/// Image metadata a converter may know before building (base image configs).
pub trait ImageMetadata {
    /// The config of `reference` for `platform`, when known. `None` means "unknown": the
    /// conversion proceeds with an empty config, as `kiln plan` does offline.
    fn config(&self, reference: &kiln_types::ImageReference, platform: &kiln_types::Platform) -> Option<ImageConfig>;
}

/// Knows nothing: every base image has an empty config.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoImageMetadata;

impl ImageMetadata for NoImageMetadata {
    fn config(&self, _: &kiln_types::ImageReference, _: &kiln_types::Platform) -> Option<ImageConfig> {
        None
    }
}
