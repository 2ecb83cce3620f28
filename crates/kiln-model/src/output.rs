//! `--output` specs, as `docker buildx build` spells them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_types::MediaTypes;

/// Where a build's result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// An image in the worker's store, pushed to a registry with `push=true`.
    Image {
        /// References to tag (and push).
        names: Vec<String>,
        /// Push to the registry.
        push: bool,
        /// OCI or Docker media types (Docker by default, as BuildKit's image exporter).
        media: MediaTypes,
    },
    /// An OCI layout tarball.
    Oci {
        /// The tarball.
        dest: PathBuf,
        /// Names recorded inside.
        names: Vec<String>,
    },
    /// A tarball `docker load` reads.
    Docker {
        /// The tarball.
        dest: PathBuf,
        /// Names recorded inside.
        names: Vec<String>,
    },
    /// The result's files in a directory.
    Local {
        /// The directory.
        dest: PathBuf,
    },
    /// The result's files as a tarball.
    Tar {
        /// The tarball.
        dest: PathBuf,
    },
}

/// An `--output` spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--output {spec:?}: {reason}")]
pub struct OutputSpecError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

impl OutputSpec {
    /// Parses `type=image,name=REF,push=true` and the other forms; a bare path means
    /// `type=local,dest=PATH`, as buildx reads it.
    pub fn parse(spec: &str) -> Result<OutputSpec, OutputSpecError> {
        let error = |reason: String| OutputSpecError { spec: spec.to_string(), reason };
        let mut fields = BTreeMap::new();
        if !spec.contains('=') {
            return Ok(OutputSpec::Local { dest: PathBuf::from(spec) });
        }
        for part in crate::spec_fields(spec).map_err(error)? {
            let (key, value) = part.split_once('=').ok_or_else(|| error(format!("{part:?} is not KEY=VALUE")))?;
            fields.insert(key.trim().to_string(), value.trim().to_string());
        }
        let names = || fields.get("name").filter(|n| !n.is_empty()).cloned().into_iter().collect::<Vec<_>>();
        let flag = |key: &str| -> Result<bool, OutputSpecError> {
            match fields.get(key).map(String::as_str) {
                None | Some("false") => Ok(false),
                Some("true") => Ok(true),
                Some(other) => Err(error(format!("{key}={other} is not true or false"))),
            }
        };
        let dest = || fields.get("dest").map(PathBuf::from).ok_or_else(|| error("this type needs dest=PATH".into()));
        let kind = fields.get("type").map(String::as_str).unwrap_or("local");
        let known: &[&str] = match kind {
            "image" | "registry" => &["type", "name", "push", "oci-mediatypes"],
            "oci" | "docker" => &["type", "name", "dest"],
            "local" | "tar" => &["type", "dest"],
            other => {
                return Err(error(format!("unknown type {other:?} (image, registry, oci, docker, local, tar)")));
            }
        };
        if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(error(format!("unknown option {unknown:?} for type={kind}")));
        }
        Ok(match kind {
            "image" | "registry" => OutputSpec::Image {
                names: names(),
                push: kind == "registry" || flag("push")?,
                media: if flag("oci-mediatypes")? { MediaTypes::Oci } else { MediaTypes::Docker },
            },
            "oci" => OutputSpec::Oci { dest: dest()?, names: names() },
            "docker" => OutputSpec::Docker { dest: dest()?, names: names() },
            "local" => OutputSpec::Local { dest: dest()? },
            _ => OutputSpec::Tar { dest: dest()? },
        })
    }

    /// The file or directory a file output writes (none for an image).
    pub fn dest(&self) -> Option<&Path> {
        match self {
            OutputSpec::Image { .. } => None,
            OutputSpec::Oci { dest, .. }
            | OutputSpec::Docker { dest, .. }
            | OutputSpec::Local { dest }
            | OutputSpec::Tar { dest } => Some(dest),
        }
    }

    /// [`OutputSpec::dest`], to change it (a client makes it absolute).
    pub fn dest_mut(&mut self) -> Option<&mut PathBuf> {
        match self {
            OutputSpec::Image { .. } => None,
            OutputSpec::Oci { dest, .. }
            | OutputSpec::Docker { dest, .. }
            | OutputSpec::Local { dest }
            | OutputSpec::Tar { dest } => Some(dest),
        }
    }
}

/// The spec in buildx's syntax; [`OutputSpec::parse`] reads it back to the same value.
impl std::fmt::Display for OutputSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |names: &[String]| names.iter().map(|n| format!(",name={n}")).collect::<String>();
        match self {
            OutputSpec::Image { names: n, push, media } => {
                write!(f, "type=image{},push={push}", names(n))?;
                if *media == MediaTypes::Oci {
                    f.write_str(",oci-mediatypes=true")?;
                }
                Ok(())
            }
            OutputSpec::Oci { dest, names: n } => write!(f, "type=oci,dest={}{}", dest.display(), names(n)),
            OutputSpec::Docker { dest, names: n } => write!(f, "type=docker,dest={}{}", dest.display(), names(n)),
            OutputSpec::Local { dest } => write!(f, "type=local,dest={}", dest.display()),
            OutputSpec::Tar { dest } => write!(f, "type=tar,dest={}", dest.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_specs_parse_like_buildx_and_print_back() {
        let cases = [
            (
                "type=image,name=127.0.0.1:5000/app:1,push=true",
                OutputSpec::Image { names: vec!["127.0.0.1:5000/app:1".into()], push: true, media: MediaTypes::Docker },
            ),
            (
                "type=registry,name=r/app,oci-mediatypes=true",
                OutputSpec::Image { names: vec!["r/app".into()], push: true, media: MediaTypes::Oci },
            ),
            ("type=image", OutputSpec::Image { names: vec![], push: false, media: MediaTypes::Docker }),
            ("type=oci,dest=out.tar", OutputSpec::Oci { dest: "out.tar".into(), names: vec![] }),
            ("type=docker,dest=d.tar,name=a:1", OutputSpec::Docker { dest: "d.tar".into(), names: vec!["a:1".into()] }),
            ("type=local,dest=out", OutputSpec::Local { dest: "out".into() }),
            ("out-dir", OutputSpec::Local { dest: "out-dir".into() }),
            ("type=tar,dest=f.tar", OutputSpec::Tar { dest: "f.tar".into() }),
        ];
        for (text, spec) in cases {
            assert_eq!(OutputSpec::parse(text).unwrap(), spec, "{text}");
            assert_eq!(OutputSpec::parse(&spec.to_string()).unwrap(), spec, "{spec}");
        }
        for (bad, message) in [
            ("type=local", "needs dest=PATH"),
            ("type=cloud,dest=x", "unknown type"),
            ("type=image,push=maybe", "not true or false"),
            ("type=tar,dest=x,name=y", "unknown option \"name\""),
            ("type=image,,push=true", "is not KEY=VALUE"),
        ] {
            let err = OutputSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains(message) && err.contains(bad), "{bad}: {err}");
        }
    }
}
