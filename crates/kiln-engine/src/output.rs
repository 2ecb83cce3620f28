//! `--output` specs, as `docker buildx build` spells them.

use std::path::PathBuf;

use kiln_registry::MediaTypes;

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

impl OutputSpec {
    /// Parses `type=image,name=REF,push=true` and the other forms; a bare path means
    /// `type=local,dest=PATH`, as buildx reads it.
    pub fn parse(spec: &str) -> Result<OutputSpec, String> {
        let mut fields = std::collections::BTreeMap::new();
        if !spec.contains('=') {
            return Ok(OutputSpec::Local { dest: PathBuf::from(spec) });
        }
        for part in spec.split(',') {
            let (key, value) =
                part.split_once('=').ok_or_else(|| format!("--output {spec:?}: {part:?} is not KEY=VALUE"))?;
            fields.insert(key.trim().to_string(), value.trim().to_string());
        }
        let names = || fields.get("name").filter(|n| !n.is_empty()).cloned().into_iter().collect::<Vec<_>>();
        let flag = |key: &str| -> Result<bool, String> {
            match fields.get(key).map(String::as_str) {
                None | Some("false") => Ok(false),
                Some("true") => Ok(true),
                Some(other) => Err(format!("--output {spec:?}: {key}={other} is not true or false")),
            }
        };
        let dest = || {
            fields.get("dest").map(PathBuf::from).ok_or_else(|| format!("--output {spec:?}: this type needs dest=PATH"))
        };
        let kind = fields.get("type").map(String::as_str).unwrap_or("local");
        let known: &[&str] = match kind {
            "image" | "registry" => &["type", "name", "push", "oci-mediatypes"],
            "oci" | "docker" => &["type", "name", "dest"],
            "local" | "tar" => &["type", "dest"],
            other => {
                return Err(format!(
                    "--output {spec:?}: unknown type {other:?} (image, registry, oci, docker, local, tar)"
                ));
            }
        };
        if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("--output {spec:?}: unknown option {unknown:?} for type={kind}"));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_specs_parse_like_buildx() {
        assert_eq!(
            OutputSpec::parse("type=image,name=127.0.0.1:5000/app:1,push=true").unwrap(),
            OutputSpec::Image { names: vec!["127.0.0.1:5000/app:1".into()], push: true, media: MediaTypes::Docker }
        );
        assert_eq!(
            OutputSpec::parse("type=registry,name=r/app,oci-mediatypes=true").unwrap(),
            OutputSpec::Image { names: vec!["r/app".into()], push: true, media: MediaTypes::Oci }
        );
        assert_eq!(
            OutputSpec::parse("type=oci,dest=out.tar").unwrap(),
            OutputSpec::Oci { dest: "out.tar".into(), names: vec![] }
        );
        assert_eq!(OutputSpec::parse("type=local,dest=out").unwrap(), OutputSpec::Local { dest: "out".into() });
        assert_eq!(OutputSpec::parse("out-dir").unwrap(), OutputSpec::Local { dest: "out-dir".into() });
        assert_eq!(OutputSpec::parse("type=tar,dest=f.tar").unwrap(), OutputSpec::Tar { dest: "f.tar".into() });
        for (bad, message) in [
            ("type=local", "needs dest=PATH"),
            ("type=cloud,dest=x", "unknown type"),
            ("type=image,push=maybe", "not true or false"),
            ("type=tar,dest=x,name=y", "unknown option \"name\""),
            ("type=image,,push=true", "is not KEY=VALUE"),
        ] {
            let err = OutputSpec::parse(bad).unwrap_err();
            assert!(err.contains(message), "{bad}: {err}");
        }
    }
}
