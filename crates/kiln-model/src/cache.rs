//! `--cache-from` and `--cache-to` specs, as `docker buildx build` spells them.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Which flag a spec was given to: it decides whether a local cache names `src` or `dest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDirection {
    /// `--cache-from`: import.
    From,
    /// `--cache-to`: export.
    To,
}

impl CacheDirection {
    fn flag(self) -> &'static str {
        match self {
            CacheDirection::From => "--cache-from",
            CacheDirection::To => "--cache-to",
        }
    }
}

/// Where a cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// A manifest in a registry.
    Registry {
        /// The reference the cache manifest is tagged as.
        reference: String,
    },
    /// Objects in an S3 bucket: `PREFIX/blobs/sha256/HEX` and `PREFIX/manifests/NAME`.
    S3 {
        /// The bucket.
        bucket: String,
        /// Its region.
        region: String,
        /// Another endpoint than AWS's (an S3-compatible server).
        endpoint_url: Option<String>,
        /// Key prefix of every object (empty, or ending with `/`).
        prefix: String,
        /// The manifest's name.
        name: String,
        /// Address buckets as `ENDPOINT/BUCKET` rather than `BUCKET.ENDPOINT`.
        use_path_style: bool,
    },
    /// A directory laid out as the S3 cache is (`DIR/blobs/sha256/HEX`, `DIR/manifests/NAME`).
    Local {
        /// The directory.
        dir: PathBuf,
        /// The manifest's name.
        name: String,
    },
}

/// Which vertices an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// The vertices whose results are layers of an exported result (buildx's default).
    #[default]
    Min,
    /// Every vertex of the build, intermediate stages included.
    Max,
}

/// How exported layers are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheCompression {
    /// gzip (what every registry client reads).
    #[default]
    Gzip,
    /// zstd.
    Zstd,
}

/// One `--cache-from` or `--cache-to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSpec {
    /// Which flag it was given to.
    pub direction: CacheDirection,
    /// Where the cache lives.
    pub location: CacheLocation,
    /// What an export writes.
    pub mode: CacheMode,
    /// How an export compresses layers.
    pub compression: CacheCompression,
    /// A failed export is a warning, not a failed build.
    pub ignore_error: bool,
}

/// A cache spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {spec:?}: {reason}")]
pub struct CacheSpecError {
    /// The flag (`--cache-from` or `--cache-to`).
    pub flag: &'static str,
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The name of the manifest when a spec names none (buildx's is `buildkit`).
pub const DEFAULT_CACHE_NAME: &str = "kiln";

impl CacheSpec {
    /// Parses `type=registry,ref=REF`, `type=s3,bucket=B,region=R[,…]` or
    /// `type=local,src=DIR` (`dest=DIR` for `--cache-to`), with `mode`, `compression` and
    /// `ignore-error`. A spec without `=` is a registry reference, as buildx reads it.
    pub fn parse(spec: &str, direction: CacheDirection) -> Result<CacheSpec, CacheSpecError> {
        let error = |reason: String| CacheSpecError { flag: direction.flag(), spec: spec.to_string(), reason };
        let mut fields = BTreeMap::new();
        if !spec.contains('=') {
            fields.insert("type", spec.is_empty().then(String::new).unwrap_or_else(|| "registry".into()));
            fields.insert("ref", spec.to_string());
        } else {
            for part in crate::spec_fields(spec).map_err(error)? {
                let (key, value) = part.split_once('=').ok_or_else(|| error(format!("{part:?} is not KEY=VALUE")))?;
                let key = key.trim();
                let known = [
                    "type",
                    "ref",
                    "bucket",
                    "region",
                    "endpoint_url",
                    "prefix",
                    "name",
                    "use_path_style",
                    "src",
                    "dest",
                    "mode",
                    "compression",
                    "ignore-error",
                ];
                let Some(key) = known.into_iter().find(|k| *k == key) else {
                    return Err(error(format!("unknown option {key:?}")));
                };
                if fields.insert(key, value.trim().to_string()).is_some() {
                    return Err(error(format!("{key} is given twice")));
                }
            }
        }
        let mut take = |key: &str| fields.remove(key).filter(|v| !v.is_empty());
        let kind = take("type").ok_or_else(|| error("it needs type=registry, type=s3 or type=local".into()))?;
        let flag = |value: Option<String>, key: &str| match value.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(error(format!("{key}={other} is not true or false"))),
        };
        let mode = match take("mode").as_deref() {
            None | Some("min") => CacheMode::Min,
            Some("max") => CacheMode::Max,
            Some(other) => return Err(error(format!("mode={other} is not min or max"))),
        };
        let compression = match take("compression").as_deref() {
            None | Some("gzip") => CacheCompression::Gzip,
            Some("zstd") => CacheCompression::Zstd,
            Some(other) => return Err(error(format!("compression={other} is not gzip or zstd"))),
        };
        let ignore_error = flag(take("ignore-error"), "ignore-error")?;
        let name = take("name");
        let location = match kind.as_str() {
            "registry" => {
                if name.is_some() {
                    return Err(error(
                        "option \"name\" does not apply to type=registry (the ref names the cache)".into(),
                    ));
                }
                let reference = take("ref").ok_or_else(|| error("type=registry needs ref=REF".into()))?;
                CacheLocation::Registry { reference }
            }
            "s3" => {
                let bucket = take("bucket").ok_or_else(|| error("type=s3 needs bucket=BUCKET".into()))?;
                let region = take("region").ok_or_else(|| error("type=s3 needs region=REGION".into()))?;
                let mut prefix = take("prefix").unwrap_or_default();
                if !prefix.is_empty() && !prefix.ends_with('/') {
                    prefix.push('/');
                }
                let use_path_style = flag(take("use_path_style"), "use_path_style")?;
                let endpoint_url = take("endpoint_url");
                let name = name.clone().unwrap_or_else(|| DEFAULT_CACHE_NAME.into());
                CacheLocation::S3 { bucket, region, endpoint_url, prefix, name, use_path_style }
            }
            "local" => {
                let (wanted, other) = match direction {
                    CacheDirection::From => ("src", "dest"),
                    CacheDirection::To => ("dest", "src"),
                };
                if take(other).is_some() {
                    return Err(error(format!("type=local takes {wanted}=DIR with {}, not {other}", direction.flag())));
                }
                let dir = take(wanted).ok_or_else(|| error(format!("type=local needs {wanted}=DIR")))?;
                CacheLocation::Local {
                    dir: PathBuf::from(dir),
                    name: name.clone().unwrap_or_else(|| DEFAULT_CACHE_NAME.into()),
                }
            }
            other => return Err(error(format!("unknown type {other:?} (registry, s3, local)"))),
        };
        if let Some(name) = &name
            && (name.contains('/') || name == "." || name == "..")
        {
            return Err(error(format!("name={name} must be one path component")));
        }
        if let Some(unused) = fields.keys().next() {
            return Err(error(format!("option {unused:?} does not apply to type={kind}")));
        }
        Ok(CacheSpec { direction, location, mode, compression, ignore_error })
    }

    /// Where a hit from this cache came from, as a record's `cache_source` says it:
    /// `registry:REF`, `s3:BUCKET/NAME` or `local:DIR`.
    pub fn source(&self) -> String {
        match &self.location {
            CacheLocation::Registry { reference } => format!("registry:{reference}"),
            CacheLocation::S3 { bucket, prefix, name, .. } => format!("s3:{bucket}/{prefix}{name}"),
            CacheLocation::Local { dir, .. } => format!("local:{}", dir.display()),
        }
    }
}

/// The spec in buildx's syntax; [`CacheSpec::parse`] with the same direction reads it back.
impl std::fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.location {
            CacheLocation::Registry { reference } => write!(f, "type=registry,ref={reference}")?,
            CacheLocation::S3 { bucket, region, endpoint_url, prefix, name, use_path_style } => {
                write!(f, "type=s3,bucket={bucket},region={region},name={name}")?;
                if let Some(url) = endpoint_url {
                    write!(f, ",endpoint_url={url}")?;
                }
                if !prefix.is_empty() {
                    write!(f, ",prefix={prefix}")?;
                }
                if *use_path_style {
                    f.write_str(",use_path_style=true")?;
                }
            }
            CacheLocation::Local { dir, name } => {
                let key = if self.direction == CacheDirection::From { "src" } else { "dest" };
                write!(f, "type=local,{key}={},name={name}", dir.display())?;
            }
        }
        if self.mode == CacheMode::Max {
            f.write_str(",mode=max")?;
        }
        if self.compression == CacheCompression::Zstd {
            f.write_str(",compression=zstd")?;
        }
        if self.ignore_error {
            f.write_str(",ignore-error=true")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_specs_parse_like_buildx_and_print_back() {
        use CacheDirection::{From, To};
        let s3 = |endpoint_url: Option<&str>, prefix: &str, name: &str, use_path_style| CacheLocation::S3 {
            bucket: "b".into(),
            region: "us-east-1".into(),
            endpoint_url: endpoint_url.map(String::from),
            prefix: prefix.into(),
            name: name.into(),
            use_path_style,
        };
        let cases = [
            (
                "type=registry,ref=r:5000/app:cache",
                From,
                CacheLocation::Registry { reference: "r:5000/app:cache".into() },
            ),
            ("r:5000/app:cache", From, CacheLocation::Registry { reference: "r:5000/app:cache".into() }),
            ("type=s3,bucket=b,region=us-east-1", To, s3(None, "", "kiln", false)),
            (
                "type=s3,bucket=b,region=us-east-1,endpoint_url=http://127.0.0.1:9000,prefix=ci,name=app,use_path_style=true",
                To,
                s3(Some("http://127.0.0.1:9000"), "ci/", "app", true),
            ),
            ("type=local,src=/c", From, CacheLocation::Local { dir: "/c".into(), name: "kiln".into() }),
            ("type=local,dest=/c,name=x", To, CacheLocation::Local { dir: "/c".into(), name: "x".into() }),
        ];
        for (text, direction, location) in cases {
            let spec = CacheSpec::parse(text, direction).unwrap();
            assert_eq!(spec.location, location, "{text}");
            assert_eq!((spec.mode, spec.compression, spec.ignore_error), Default::default(), "{text}");
            assert_eq!(CacheSpec::parse(&spec.to_string(), direction).unwrap(), spec, "{spec}");
        }
        let full = CacheSpec::parse("type=registry,ref=r/c,mode=max,compression=zstd,ignore-error=true", To).unwrap();
        assert_eq!((full.mode, full.compression, full.ignore_error), (CacheMode::Max, CacheCompression::Zstd, true));
        assert_eq!(CacheSpec::parse(&full.to_string(), To).unwrap(), full);
        assert_eq!(full.source(), "registry:r/c");
        assert_eq!(CacheSpec::parse("type=s3,bucket=b,region=r,prefix=p", From).unwrap().source(), "s3:b/p/kiln");
        for (bad, direction, message) in [
            ("type=registry", From, "needs ref=REF"),
            ("type=s3,bucket=b", To, "needs region"),
            ("type=local,dest=/c", From, "takes src=DIR"),
            ("type=local,src=/c", To, "takes dest=DIR"),
            ("type=gha", From, "unknown type"),
            ("type=registry,ref=r,mode=all", To, "mode=all"),
            ("type=registry,ref=r,compression=xz", To, "compression=xz"),
            ("type=registry,ref=r,bucket=b", To, "does not apply"),
            ("type=registry,ref=r,colour=red", To, "unknown option"),
            ("type=local,dest=/c,name=a/b", To, "one path component"),
            ("type=registry,ref=a,ref=b", To, "given twice"),
            ("type=registry,ref=a,name=b", To, "does not apply"),
        ] {
            let err = CacheSpec::parse(bad, direction).unwrap_err().to_string();
            assert!(err.contains(message) && err.contains(bad), "{bad}: {err}");
        }
    }
}
