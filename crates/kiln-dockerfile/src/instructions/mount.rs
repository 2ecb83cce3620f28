//! `RUN --mount=...` specifications: CSV fields of `key=value`, BuildKit's defaults and checks.
//!
//! Errors are messages naming the field and the spec; the RUN instruction wraps them into
//! its [`super::InstructionError`] with the file and line.

use kiln_graph::CacheSharing;

/// The kind of a `RUN --mount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// Bind a path from the context, a stage or an image (read-only unless `rw`).
    Bind,
    /// A persistent cache directory.
    Cache,
    /// An empty tmpfs.
    Tmpfs,
    /// A secret file or environment variable.
    Secret,
    /// An ssh agent socket.
    Ssh,
}

/// One parsed `--mount`, values already expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMount {
    /// Mount type.
    pub kind: MountType,
    /// Stage, image or named context to take the source from (`from=`).
    pub from: Option<String>,
    /// Path inside `from` (or the context).
    pub source: Option<String>,
    /// Mount point; filled with BuildKit's defaults for secret and ssh.
    pub target: Option<String>,
    /// Mounted read-only.
    pub readonly: bool,
    /// Cache, secret or ssh id (defaults applied).
    pub id: Option<String>,
    /// Cache sharing mode.
    pub sharing: CacheSharing,
    /// Secret/ssh must be provided.
    pub required: bool,
    /// File or directory mode.
    pub mode: Option<u32>,
    /// Owner uid.
    pub uid: Option<u32>,
    /// Owner gid.
    pub gid: Option<u32>,
    /// Secret exposed as this environment variable.
    pub env: Option<String>,
    /// tmpfs size in bytes.
    pub size: Option<u64>,
}

/// Splits one CSV record as Go's `encoding/csv` does with default settings.
fn csv_fields(value: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = value.chars().peekable();
    let mut at_field_start = true;
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                    if !matches!(chars.peek(), None | Some(',')) {
                        return Err(format!("extraneous or missing \" in quoted-field of {value:?}"));
                    }
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            ',' => {
                fields.push(std::mem::take(&mut field));
                at_field_start = true;
                continue;
            }
            '"' if at_field_start => quoted = true,
            '"' => return Err(format!("bare \" in non-quoted field of {value:?}")),
            c => field.push(c),
        }
        at_field_start = false;
    }
    if quoted {
        return Err(format!("extraneous or missing \" in quoted-field of {value:?}"));
    }
    fields.push(field);
    Ok(fields)
}

fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(format!("invalid value for {key}: {other}")),
    }
}

fn parse_u32(key: &str, value: &str, radix: u32) -> Result<u32, String> {
    u32::from_str_radix(value, radix).map_err(|_| format!("invalid value for {key}: {value}"))
}

/// Parses sizes like `64m`, `1g`, `512` (bytes, binary units as Docker's RAMInBytes).
fn parse_size(value: &str) -> Result<u64, String> {
    let lower = value.trim().to_ascii_lowercase();
    let trimmed = lower.strip_suffix('b').unwrap_or(&lower);
    let (digits, multiplier) = match trimmed.chars().last() {
        Some('k') => (&trimmed[..trimmed.len() - 1], 1u64 << 10),
        Some('m') => (&trimmed[..trimmed.len() - 1], 1 << 20),
        Some('g') => (&trimmed[..trimmed.len() - 1], 1 << 30),
        Some('t') => (&trimmed[..trimmed.len() - 1], 1 << 40),
        _ => (trimmed, 1),
    };
    let n: f64 = digits.parse().map_err(|_| format!("invalid size: {value}"))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(format!("invalid size: {value}"));
    }
    Ok((n * multiplier as f64) as u64)
}

fn empty_mount() -> RunMount {
    RunMount {
        kind: MountType::Bind,
        from: None,
        source: None,
        target: None,
        readonly: false,
        id: None,
        sharing: CacheSharing::Shared,
        required: false,
        mode: None,
        uid: None,
        gid: None,
        env: None,
        size: None,
    }
}

/// Parses one `--mount` value; `expand` expands variables in option values.
pub fn parse_mount(spec: &str, expand: &mut dyn FnMut(&str) -> Result<String, String>) -> Result<RunMount, String> {
    let mut mount = empty_mount();
    let mut readonly: Option<bool> = None;
    for field in csv_fields(spec)? {
        let (key, value) = match field.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_owned())),
            None => (field.trim().to_ascii_lowercase(), None),
        };
        let value = match value {
            Some(v) if key != "type" => Some(expand(&v)?),
            other => other,
        };
        apply_field(&mut mount, &mut readonly, &key, value.as_deref(), spec)?;
    }
    finish_mount(mount, readonly, spec)
}

fn apply_field(
    mount: &mut RunMount,
    readonly: &mut Option<bool>,
    key: &str,
    value: Option<&str>,
    spec: &str,
) -> Result<(), String> {
    let required = |v: Option<&str>| {
        v.map(str::to_owned).ok_or_else(|| format!("invalid field '{key}' must be a key=value pair in {spec:?}"))
    };
    match key {
        "type" => mount.kind = parse_type(&required(value)?)?,
        "from" => mount.from = Some(required(value)?),
        "source" | "src" => mount.source = Some(required(value)?),
        "target" | "dst" | "destination" => mount.target = Some(required(value)?),
        "readonly" | "ro" => *readonly = Some(parse_bool(key, value)?),
        "readwrite" | "rw" => *readonly = Some(!parse_bool(key, value)?),
        "id" => mount.id = Some(required(value)?),
        "sharing" => mount.sharing = parse_sharing(&required(value)?)?,
        "required" => mount.required = parse_bool(key, value)?,
        "mode" => mount.mode = Some(parse_u32(key, &required(value)?, 8)?),
        "uid" => mount.uid = Some(parse_u32(key, &required(value)?, 10)?),
        "gid" => mount.gid = Some(parse_u32(key, &required(value)?, 10)?),
        "env" => mount.env = Some(required(value)?),
        "size" => mount.size = Some(parse_size(&required(value)?)?),
        _ => return Err(format!("unexpected key '{key}' in '{spec}'")),
    }
    Ok(())
}

fn parse_type(value: &str) -> Result<MountType, String> {
    match value.to_ascii_lowercase().as_str() {
        "bind" => Ok(MountType::Bind),
        "cache" => Ok(MountType::Cache),
        "tmpfs" => Ok(MountType::Tmpfs),
        "secret" => Ok(MountType::Secret),
        "ssh" => Ok(MountType::Ssh),
        other => Err(format!("unsupported mount type {other:?} (expected bind, cache, tmpfs, secret or ssh)")),
    }
}

fn parse_sharing(value: &str) -> Result<CacheSharing, String> {
    match value.to_ascii_lowercase().as_str() {
        "shared" => Ok(CacheSharing::Shared),
        "private" => Ok(CacheSharing::Private),
        "locked" => Ok(CacheSharing::Locked),
        other => Err(format!("unsupported sharing value {other:?} (expected shared, private or locked)")),
    }
}

/// Go's `path.Clean`: `.` for nothing, `..` kept where it cannot be resolved in a relative
/// path, dropped at the root of an absolute one.
fn go_clean(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            ".." if absolute => {}
            p => parts.push(p),
        }
    }
    match (absolute, parts.is_empty()) {
        (true, _) => format!("/{}", parts.join("/")),
        (false, true) => ".".to_owned(),
        (false, false) => parts.join("/"),
    }
}

fn finish_mount(mut mount: RunMount, readonly: Option<bool>, spec: &str) -> Result<RunMount, String> {
    mount.readonly = readonly.unwrap_or(mount.kind == MountType::Bind);
    match mount.kind {
        MountType::Secret => {
            if mount.id.is_none() {
                let base = mount.target.as_deref().map(|t| t.rsplit('/').next().unwrap_or(t).to_owned());
                mount.id = base.filter(|b| !b.is_empty()).or_else(|| mount.env.clone());
            }
            let Some(id) = mount.id.clone() else {
                return Err(format!("secret mount {spec:?} needs an id or a target"));
            };
            if mount.target.is_none() && mount.env.is_none() {
                mount.target = Some(format!("/run/secrets/{id}"));
            }
        }
        MountType::Ssh => {
            mount.id.get_or_insert_with(|| "default".to_owned());
        }
        // BuildKit names the cache after the target as written, cleaned (`path.Clean`): a
        // cache without a target is the cache ".", whatever the working directory.
        MountType::Cache if mount.id.is_none() => mount.id = Some(go_clean(mount.target.as_deref().unwrap_or(""))),
        _ => {}
    }
    let takes_from = matches!(mount.kind, MountType::Bind | MountType::Cache);
    if mount.from.is_some() && !takes_from {
        return Err(format!("'from' is not supported for this mount type in {spec:?}"));
    }
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<RunMount, String> {
        parse_mount(spec, &mut |v| Ok(v.replace("$T", "/cache")))
    }

    #[test]
    fn bind_defaults_to_read_only() {
        let m = parse("target=/src,from=build,source=/out").unwrap();
        assert_eq!(m.kind, MountType::Bind);
        assert!(m.readonly);
        assert_eq!(m.from.as_deref(), Some("build"));
        assert!(!parse("type=bind,target=/x,rw").unwrap().readonly);
    }

    #[test]
    fn cache_id_defaults_to_target_and_values_expand() {
        let m = parse("type=cache,target=$T,sharing=locked,mode=0700,uid=1000").unwrap();
        assert_eq!(m.id.as_deref(), Some("/cache"));
        assert_eq!(m.sharing, CacheSharing::Locked);
        assert_eq!(m.mode, Some(0o700));
        assert_eq!(m.uid, Some(1000));
        assert!(!m.readonly);
    }

    #[test]
    fn secret_and_ssh_defaults() {
        let m = parse("type=secret,id=tok").unwrap();
        assert_eq!(m.target.as_deref(), Some("/run/secrets/tok"));
        let m = parse("type=secret,id=tok,env=TOKEN").unwrap();
        assert_eq!(m.target, None);
        assert_eq!(m.env.as_deref(), Some("TOKEN"));
        assert_eq!(parse("type=secret,target=/etc/pw").unwrap().id.as_deref(), Some("pw"));
        assert_eq!(parse("type=ssh").unwrap().id.as_deref(), Some("default"));
        assert_eq!(parse("type=tmpfs,target=/t,size=64m").unwrap().size, Some(64 << 20));
    }

    #[test]
    fn a_target_may_be_left_out_and_cache_ids_are_cleaned_as_go_does() {
        assert_eq!(parse("type=cache").unwrap().id.as_deref(), Some("."));
        assert_eq!(parse("type=cache,target=a/./b/").unwrap().id.as_deref(), Some("a/b"));
        assert_eq!(parse("type=cache,target=/x/../y").unwrap().id.as_deref(), Some("/y"));
        assert_eq!(parse("type=cache,target=../up").unwrap().id.as_deref(), Some("../up"));
        assert_eq!(parse("from=bins").unwrap().target, None);
    }

    #[test]
    fn quoted_csv_fields() {
        let m = parse("type=bind,\"source=a,b\",target=/x").unwrap();
        assert_eq!(m.source.as_deref(), Some("a,b"));
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "type=nfs,target=/x",
            "type=cache,target=/x,sharing=sometimes",
            "type=secret",
            "target=/x,color=red",
            "type=tmpfs,target=/t,from=build",
            "type=bind,target=/x,mode=9z",
            "type=bind,ta\"rget=/x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
