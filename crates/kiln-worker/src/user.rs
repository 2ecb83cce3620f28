//! `USER` and `--chown` names resolved against the step's own `/etc/passwd` and `/etc/group`.
//!
//! Errors are messages naming the user or group; the step that asked wraps them with its
//! vertex into `WorkerError::Failed`.

use std::path::Path;

use kiln_layer::resolve_in_root;

/// Numeric ids for a process or a file owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups, primary first.
    pub additional_gids: Vec<u32>,
}

struct Entry {
    name: String,
    id: u32,
    gid: u32,
    members: Vec<String>,
}

fn read_table(rootfs: &Path, file: &str) -> Vec<Entry> {
    let Ok(path) = resolve_in_root(rootfs, file, true) else { return Vec::new() };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let id = fields.get(2)?.parse().ok()?;
            // passwd: name:x:uid:gid:...; group: name:x:gid:member,member
            let gid = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
            let members = fields.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect());
            Some(Entry { name: fields[0].to_string(), id, gid, members: members.unwrap_or_default() })
        })
        .collect()
}

/// Resolves `user[:group]` (names or numbers) as Docker does: a named user must exist in
/// the image's passwd file; a numeric one need not, and then has group 0.
pub(crate) fn resolve_user(rootfs: &Path, spec: &str) -> Result<ResolvedUser, String> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let passwd = read_table(rootfs, "/etc/passwd");
    let (uid, mut gid, name) = if user.is_empty() {
        (0, 0, Some("root".to_string()))
    } else if let Ok(uid) = user.parse::<u32>() {
        match passwd.iter().find(|e| e.id == uid) {
            Some(entry) => (uid, entry.gid, Some(entry.name.clone())),
            None => (uid, 0, None),
        }
    } else {
        let entry = passwd
            .iter()
            .find(|e| e.name == user)
            .ok_or_else(|| format!("unable to find user {user}: no matching entries in passwd file"))?;
        (entry.id, entry.gid, Some(entry.name.clone()))
    };
    let groups = read_table(rootfs, "/etc/group");
    if let Some(group) = group {
        gid = resolve_group(&groups, group)?;
    }
    let mut additional_gids = vec![gid];
    // Supplementary groups come from /etc/group only when no group is given (`USER app` gets
    // them, `USER app:staff` and `USER 1500:1500` do not), as BuildKit's runc does.
    if let Some(name) = name.filter(|_| group.is_none()) {
        for entry in groups.iter().filter(|g| g.members.contains(&name)) {
            if !additional_gids.contains(&entry.id) {
                additional_gids.push(entry.id);
            }
        }
    }
    Ok(ResolvedUser { uid, gid, additional_gids })
}

/// Resolves owner ids for `--chown=user[:group]`; the group defaults to the user's.
pub(crate) fn resolve_owner(rootfs: &Path, user: &str, group: Option<&str>) -> Result<(u32, u32), String> {
    let resolved = resolve_user(rootfs, user)?;
    let gid = match group {
        Some(group) => resolve_group(&read_table(rootfs, "/etc/group"), group)?,
        None if user.parse::<u32>().is_ok() => resolved.uid,
        None => resolved.gid,
    };
    Ok((resolved.uid, gid))
}

fn resolve_group(groups: &[Entry], group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    groups
        .iter()
        .find(|g| g.name == group)
        .map(|g| g.id)
        .ok_or_else(|| format!("unable to find group {group}: no matching entries in group file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_like_docker() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\napp:x:1001:\nwheel:x:10:app,other\n").unwrap();
        let user = |spec: &str| resolve_user(root.path(), spec);
        assert_eq!(user("").unwrap(), ResolvedUser { uid: 0, gid: 0, additional_gids: vec![0] });
        assert_eq!(user("app").unwrap(), ResolvedUser { uid: 1000, gid: 1001, additional_gids: vec![1001, 10] });
        assert_eq!(user("1000").unwrap().gid, 1001);
        assert_eq!(user("4242").unwrap(), ResolvedUser { uid: 4242, gid: 0, additional_gids: vec![0] });
        // A given group replaces the supplementary ones: only it is in the list.
        assert_eq!(user("app:wheel").unwrap(), ResolvedUser { uid: 1000, gid: 10, additional_gids: vec![10] });
        assert_eq!(user("app:77").unwrap(), ResolvedUser { uid: 1000, gid: 77, additional_gids: vec![77] });
        assert_eq!(user("1000:1001").unwrap().additional_gids, [1001]);
        assert!(user("ghost").unwrap_err().contains("unable to find user ghost"));
        assert!(user("app:ghosts").unwrap_err().contains("unable to find group ghosts"));
        assert_eq!(resolve_owner(root.path(), "app", None).unwrap(), (1000, 1001));
        assert_eq!(resolve_owner(root.path(), "1234", None).unwrap(), (1234, 1234));
        assert_eq!(resolve_owner(root.path(), "app", Some("root")).unwrap(), (1000, 0));
    }
}
