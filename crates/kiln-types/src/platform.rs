//! OCI platforms (`os/arch[/variant]`) with containerd's normalisation rules.

use std::fmt;
use std::str::FromStr;

/// A target platform such as `linux/amd64` or `linux/arm/v7`, always normalised.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture in OCI spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// Architecture variant, e.g. `v7` for 32-bit arm; `None` when not meaningful.
    pub variant: Option<String>,
}

/// Why a platform string could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// Empty components, too many components or characters outside `[a-z0-9_.-]`.
    #[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64")]
    Invalid(String),
}

impl Platform {
    /// Builds a normalised platform from parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        let os = os.to_ascii_lowercase();
        let (architecture, variant) = normalize_arch(architecture, variant);
        Platform { os, architecture, variant }
    }

    /// The platform this program was compiled for, as BuildKit's BUILDPLATFORM.
    pub fn host() -> Platform {
        Platform::new(std::env::consts::OS, std::env::consts::ARCH, None)
    }
}

/// Maps architecture aliases (`x86_64`, `aarch64`, ...) to OCI names and fills default
/// variants, as containerd's `platforms.Normalize` does.
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant.map(str::to_ascii_lowercase).filter(|v| !v.is_empty());
    match arch.as_str() {
        "i386" | "386" => ("386".into(), None),
        "x86_64" | "x86-64" | "amd64" => {
            let v = variant.filter(|v| v != "v1");
            ("amd64".into(), v)
        }
        "aarch64" | "arm64" => {
            let v = variant.filter(|v| v != "v8" && v != "8");
            ("arm64".into(), v)
        }
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => {
            let v = match variant.as_deref() {
                None | Some("7") | Some("v7") => "v7".to_owned(),
                Some("5") | Some("v5") => "v5".to_owned(),
                Some("6") | Some("v6") => "v6".to_owned(),
                Some("8") | Some("v8") => "v8".to_owned(),
                Some(other) => other.to_owned(),
            };
            ("arm".into(), Some(v))
        }
        _ => (arch, variant),
    }
}

fn valid_component(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PlatformError::Invalid(s.to_owned());
        let parts: Vec<&str> = s.trim().split('/').collect();
        if !parts.iter().all(|p| valid_component(p)) {
            return Err(err());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(err()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

serde_as_string!(Platform);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        let p: Platform = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(p.to_string(), expected, "{input}");
    }

    #[test]
    fn normalises_aliases_and_variants() {
        check("linux/amd64", "linux/amd64");
        check("linux/x86_64", "linux/amd64");
        check("Linux/AMD64", "linux/amd64");
        check("linux/aarch64", "linux/arm64");
        check("linux/arm64/v8", "linux/arm64");
        check("linux/arm", "linux/arm/v7");
        check("linux/arm/6", "linux/arm/v6");
        check("linux/riscv64", "linux/riscv64");
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64", "linux//v7"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }
}
