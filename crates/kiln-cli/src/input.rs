//! Reading what a build starts from: the Dockerfile, `.dockerignore`, build arguments.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use kiln_dockerfile::ignore::PatternList;

/// The Dockerfile's display name and text (`-` reads standard input).
pub(crate) fn read_dockerfile(context: &Path, file: Option<&Path>) -> anyhow::Result<(String, String)> {
    if file == Some(Path::new("-")) {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the Dockerfile from standard input")?;
        return Ok(("<stdin>".to_owned(), text));
    }
    let path = file.map_or_else(|| context.join("Dockerfile"), Path::to_path_buf);
    let bytes = std::fs::read(&path).with_context(|| format!("reading Dockerfile {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not valid UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to()))?;
    Ok((path.display().to_string(), text))
}

/// The `.dockerignore` text that applies and its patterns: `<Dockerfile>.dockerignore` next
/// to the Dockerfile wins over `CONTEXT/.dockerignore`.
pub(crate) fn read_dockerignore(context: &Path, file: Option<&Path>) -> anyhow::Result<(String, PatternList)> {
    let mut candidates = Vec::new();
    if let Some(f) = file.filter(|f| *f != Path::new("-")) {
        let mut name = f.as_os_str().to_owned();
        name.push(".dockerignore");
        candidates.push(PathBuf::from(name));
    }
    candidates.push(context.join(".dockerignore"));
    for path in candidates {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let patterns =
                    PatternList::parse_ignore_file(&text).with_context(|| format!("in {}", path.display()))?;
                return Ok((text, patterns));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok((String::new(), PatternList::default()))
}

/// `--build-arg` values; `KEY` alone takes the value from the environment.
pub(crate) fn parse_build_args(raw: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut args = BTreeMap::new();
    for item in raw {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match std::env::var(item) {
                Ok(v) => (item.clone(), v),
                Err(_) => continue,
            },
        };
        if key.is_empty() {
            bail!("--build-arg {item:?}: the name is empty");
        }
        args.insert(key, value);
    }
    Ok(args)
}
