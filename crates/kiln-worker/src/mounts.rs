//! `RUN --mount`: bind views of other inputs, persistent cache directories, tmpfs, secrets.
//!
//! Errors are messages naming the mount (`--mount target=...`, `cache ID`, the secret);
//! `exec` wraps them with the vertex into `WorkerError::Failed`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_graph::{CacheSharing, Mount, MountKind};
use kiln_layer::{ActiveSnapshot, resolve_in_root};
use kiln_runner_spec::{RunMount, RunMountKind};
use kiln_types::Digest;
use tokio::sync::OwnedMutexGuard;

use crate::fileop::copy_contents;
use crate::{BuildInputs, Snapshot, Worker, blocking, blocking_in_drop, chain};

/// Cache mount directories: `ROOT/<sha256(id)>/<instance>`. Instance 0 is shared and locked
/// mounts' directory; `private` mounts take the first instance nobody holds.
pub(crate) struct CacheMounts {
    root: PathBuf,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Held while a cache directory is created and seeded, so concurrent first uses of a
    /// shared cache create it once.
    creating: tokio::sync::Mutex<()>,
    /// Steps using each directory now, and its recorded uses (garbage collection's view).
    uses: Arc<MountUses>,
}

/// Which cache directories steps use now; uses are recorded in the KV store when they end.
pub(crate) struct MountUses {
    users: Mutex<HashMap<PathBuf, usize>>,
    kv: kiln_kv::SharedKv,
    /// Sizes measured since the directory was last used (a use forgets it).
    sizes: Mutex<HashMap<PathBuf, u64>>,
}

/// Cache mount uses, by directory relative to the cache root.
const MOUNT_USES_TREE: &str = "cache-mount-uses";

/// A recorded use of a cache directory.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct MountUse {
    pub(crate) last_used: u64,
    pub(crate) usage_count: u64,
}

impl MountUses {
    pub(crate) fn new(kv: kiln_kv::SharedKv) -> MountUses {
        MountUses { users: Mutex::default(), kv, sizes: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, usize>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The recorded use of `relative` (`<digest>/<instance>`).
    pub(crate) fn recorded(&self, relative: &str) -> MountUse {
        let bytes = self.kv.get(MOUNT_USES_TREE, relative.as_bytes()).ok().flatten();
        bytes.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Runs `remove` on `dir` unless a step uses it, with new uses held off meanwhile;
    /// returns whether it ran.
    pub(crate) fn remove_unused<E>(
        &self,
        dir: &Path,
        relative: &str,
        remove: impl FnOnce() -> Result<(), E>,
    ) -> Result<bool, E> {
        let users = self.lock();
        if users.contains_key(dir) {
            return Ok(false);
        }
        remove()?;
        let _ = self.kv.delete(MOUNT_USES_TREE, relative.as_bytes());
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).remove(dir);
        drop(users);
        Ok(true)
    }

    pub(crate) fn in_use(&self, dir: &Path) -> bool {
        self.lock().contains_key(dir)
    }

    /// The size measured since the directory was last used, if any.
    pub(crate) fn measured(&self, dir: &Path) -> Option<u64> {
        self.sizes.lock().unwrap_or_else(|p| p.into_inner()).get(dir).copied()
    }

    pub(crate) fn remember_size(&self, dir: &Path, size: u64) {
        if !self.in_use(dir) {
            self.sizes.lock().unwrap_or_else(|p| p.into_inner()).insert(dir.to_path_buf(), size);
        }
    }
}

/// A step's use of a cache directory: it cannot be collected until this drops.
pub(crate) struct MountUser {
    uses: Arc<MountUses>,
    dir: PathBuf,
    relative: String,
}

impl Drop for MountUser {
    fn drop(&mut self) {
        let mut users = self.uses.lock();
        self.uses.sizes.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.dir);
        let mut recorded = self.uses.recorded(&self.relative);
        recorded.last_used = kiln_types::now_ms();
        recorded.usage_count += 1;
        // A lost record only makes the directory look older than it is.
        let _ = self.uses.kv.put(
            MOUNT_USES_TREE,
            self.relative.as_bytes(),
            &serde_json::to_vec(&recorded).expect("serialisable"),
        );
        if let Some(count) = users.get_mut(&self.dir) {
            *count -= 1;
            if *count == 0 {
                users.remove(&self.dir);
            }
        }
    }
}

/// Removes what a collection stopped in the middle of removing left in the cache root.
pub(crate) fn clear_trash(root: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(()) };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".trash-") {
            std::fs::remove_dir_all(entry.path()).map_err(|e| format!("{}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

impl CacheMounts {
    pub(crate) fn new(root: PathBuf, kv: kiln_kv::SharedKv) -> CacheMounts {
        let uses = Arc::new(MountUses::new(kv));
        CacheMounts { root, locks: Mutex::default(), creating: tokio::sync::Mutex::new(()), uses }
    }

    /// The cache root, whose `<digest>/<instance>` directories are the cache mounts.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn uses(&self) -> &Arc<MountUses> {
        &self.uses
    }

    /// Marks `dir` used by a step until the returned guard drops.
    fn use_dir(&self, dir: &Path) -> MountUser {
        *self.uses.lock().entry(dir.to_path_buf()).or_default() += 1;
        let relative = dir.strip_prefix(&self.root).unwrap_or(dir).display().to_string();
        MountUser { uses: Arc::clone(&self.uses), dir: dir.to_path_buf(), relative }
    }

    fn lock_for(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(dir.to_path_buf()).or_default())
    }

    /// The directory for a cache mount of `group` (`None`: the default group, whose
    /// directories are named by the id alone), and the lock that keeps it ours until the
    /// step ends.
    async fn acquire(
        &self,
        group: Option<&str>,
        id: &str,
        sharing: CacheSharing,
    ) -> Result<(PathBuf, Option<OwnedMutexGuard<()>>), String> {
        let key = match group {
            Some(group) => Digest::of(format!("{group}\0{id}").as_bytes()),
            None => Digest::of(id.as_bytes()),
        };
        let base = self.root.join(key.hex());
        match sharing {
            CacheSharing::Shared => Ok((base.join("0"), None)),
            CacheSharing::Locked => {
                let dir = base.join("0");
                let guard = self.lock_for(&dir).lock_owned().await;
                Ok((dir, Some(guard)))
            }
            CacheSharing::Private => {
                for instance in 0.. {
                    let dir = base.join(instance.to_string());
                    if let Ok(guard) = self.lock_for(&dir).try_lock_owned() {
                        return Ok((dir, Some(guard)));
                    }
                }
                unreachable!("the instance search is unbounded")
            }
        }
    }
}

/// Everything a step's mounts hold until the container exits.
#[derive(Default)]
pub(crate) struct PreparedMounts {
    pub(crate) run_mounts: Vec<RunMount>,
    pub(crate) env: Vec<String>,
    views: Vec<ActiveSnapshot>,
    guards: Vec<OwnedMutexGuard<()>>,
    users: Vec<MountUser>,
}

impl Drop for PreparedMounts {
    /// Unmounts the views off the async threads, before the cache locks are released.
    fn drop(&mut self) {
        let views = std::mem::take(&mut self.views);
        if !views.is_empty() {
            blocking_in_drop(move || drop(views));
        }
    }
}

impl Worker {
    /// Prepares the mounts of a RUN step; secrets go to `step_dir`, never into a snapshot.
    pub(crate) async fn prepare_mounts(
        &self,
        mounts: &[Mount],
        inputs: &[Snapshot],
        build: &BuildInputs,
        step_dir: &Path,
    ) -> Result<PreparedMounts, String> {
        let mut prepared = PreparedMounts::default();
        for mount in mounts {
            let target = mount.target.clone();
            match &mount.kind {
                MountKind::Bind { input, source, readwrite } => {
                    let layers = chain(input, inputs)?.to_vec();
                    // A writable bind mount gets its own overlay, thrown away afterwards.
                    let (snapshots, writable, at, source) =
                        (Arc::clone(&self.snapshots), *readwrite, target.clone(), source.clone());
                    let (view, host) = blocking(move || {
                        let view = if writable { snapshots.prepare(&layers) } else { snapshots.view(&layers) }
                            .map_err(|e| format!("--mount target={at}: {e}"))?;
                        let host = resolve_in_root(&view.root(), &source, true).map_err(|e| format!("{source}: {e}"));
                        // Unmounted here, off the async threads, when the source is not there.
                        match host {
                            Ok(host) if host.exists() => Ok((view, host)),
                            Ok(_) => Err(format!("--mount target={at}: {source} not found in the mounted filesystem")),
                            Err(e) => Err(e),
                        }
                    })
                    .await?;
                    prepared.views.push(view);
                    prepared.run_mounts.push(bind(target, host, !readwrite));
                }
                MountKind::Cache { id, sharing, from, source, readonly, mode, uid, gid } => {
                    let (dir, guard) = self.cache_mounts.acquire(build.cache_group.as_deref(), id, *sharing).await?;
                    prepared.users.push(self.cache_mounts.use_dir(&dir));
                    let creating = self.cache_mounts.creating.lock().await;
                    if !dir.exists() {
                        // A new cache starts as a copy of `from` (at `source`) when given.
                        let seed = from.as_ref().map(|input| chain(input, inputs).map(<[_]>::to_vec)).transpose()?;
                        let (snapshots, dir, source, id) =
                            (Arc::clone(&self.snapshots), dir.clone(), source.clone(), id.clone());
                        let (mode, uid, gid) = (*mode, *uid, *gid);
                        blocking(move || {
                            let staging = dir.with_extension("new");
                            let _ = std::fs::remove_dir_all(&staging);
                            std::fs::create_dir_all(&staging).map_err(|e| format!("cache {id}: {e}"))?;
                            if let Some(layers) = seed {
                                let view = snapshots.view(&layers).map_err(|e| format!("cache {id}: {e}"))?;
                                let from = resolve_in_root(&view.root(), &source, true)
                                    .map_err(|e| format!("cache {id}: {e}"))?;
                                copy_contents(&from, &staging).map_err(|e| format!("cache {id} from={source}: {e}"))?;
                            }
                            std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
                                .and_then(|()| std::os::unix::fs::chown(&staging, Some(uid), Some(gid)))
                                .and_then(|()| std::fs::rename(&staging, &dir))
                                .map_err(|e| format!("cache {id}: {e}"))
                        })
                        .await?;
                    }
                    drop(creating);
                    prepared.guards.extend(guard);
                    prepared.run_mounts.push(bind(target, dir, *readonly));
                }
                MountKind::Tmpfs { size } => {
                    prepared.run_mounts.push(RunMount { target, kind: RunMountKind::Tmpfs { size: *size } });
                }
                MountKind::Secret(secret) => {
                    let Some(value) = build.secrets.get(&secret.id) else {
                        if secret.required {
                            return Err(format!("secret {} is required but was not provided", secret.id));
                        }
                        continue;
                    };
                    if let Some(name) = &secret.env {
                        prepared.env.push(format!("{name}={}", String::from_utf8_lossy(value)));
                    }
                    if !target.is_empty() {
                        let dir = step_dir.join("secrets");
                        let file = dir.join(Digest::of(secret.id.as_bytes()).hex());
                        let (written, value, secret) = (file.clone(), value.clone(), secret.clone());
                        blocking(move || {
                            std::fs::create_dir_all(&dir)
                                .and_then(|()| std::fs::write(&written, value))
                                .and_then(|()| {
                                    std::fs::set_permissions(&written, std::fs::Permissions::from_mode(secret.mode))
                                })
                                .and_then(|()| std::os::unix::fs::chown(&written, Some(secret.uid), Some(secret.gid)))
                                .map_err(|e| format!("secret {}: {e}", secret.id))
                        })
                        .await?;
                        prepared.run_mounts.push(bind(target, file, true));
                    }
                }
                MountKind::Ssh(ssh) => {
                    if ssh.required {
                        return Err(format!("ssh mount {}: SSH agent forwarding is not supported yet", ssh.id));
                    }
                }
            }
        }
        Ok(prepared)
    }
}

fn bind(target: String, source: PathBuf, readonly: bool) -> RunMount {
    RunMount { target, kind: RunMountKind::Bind { source, readonly } }
}
