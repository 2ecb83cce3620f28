//! The build history's entries ([`BuildEntry`]), kept in the coordinator's store: through the
//! replicated log on a replicated coordinator, so that every member knows every build, a new
//! leader takes back the builds whose clients reattach, and the history survives the loss of
//! any member.

use std::sync::Arc;

use kiln_kv::SharedKv;
use kiln_model::BuildEntry;
use kiln_raft::ReplicatedKv;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// The tree holding the entries, by build id.
pub const BUILDS_TREE: &str = "builds";

/// The most entries the history keeps by default, about: every [`PRUNE_EVERY`] builds a
/// daemon ends, the ended entries that started first go beyond it. An entry is small (at most
/// about 80 KiB, usually a few), and the history is part of a replicated coordinator's
/// snapshots.
pub const MAX_ENTRIES: usize = 1000;

/// What the history keeps (`history-max-builds`, `history-max-age`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The most entries: past it, the oldest ended ones go.
    pub max_builds: usize,
    /// How long an ended build is kept, from its start.
    pub max_age: Option<std::time::Duration>,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention { max_builds: MAX_ENTRIES, max_age: None }
    }
}

/// How many builds end between two looks at the history's size.
const PRUNE_EVERY: u64 = 50;

/// The builds running on this daemon, by id: one run per id at a time, and the journal of
/// every build it runs. A daemon's control services (its unix socket's and its TCP
/// listener's) share one.
#[derive(Clone)]
pub struct Runs {
    running: Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, CancellationToken)>>>,
    /// Builds ended here, counted for pruning the history.
    ended: Arc<std::sync::atomic::AtomicU64>,
    /// Builds submitted here and not begun yet (a new leader taking over).
    waiting: Arc<std::sync::atomic::AtomicU64>,
    /// The builds' records and logs.
    journal: Arc<crate::journal::Journal>,
    /// What the history keeps.
    retention: Retention,
}

/// A build counted among [`Runs::counts`]'s waiting ones while it lives.
pub(crate) struct Waiting(Arc<std::sync::atomic::AtomicU64>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A build's claim on its id while it runs here; dropping it lets the id go.
pub(crate) struct Run {
    runs: Runs,
    id: String,
    generation: u64,
    replaced: CancellationToken,
}

impl Runs {
    /// The builds of a daemon whose journals are kept in `kv`.
    pub fn new(kv: SharedKv) -> Runs {
        Runs {
            running: Arc::default(),
            ended: Arc::default(),
            waiting: Arc::default(),
            journal: Arc::new(crate::journal::Journal::new(kv)),
            retention: Retention::default(),
        }
    }

    /// What the history keeps.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Keeps the history within `retention`.
    pub fn with_retention(mut self, retention: Retention) -> Runs {
        self.retention = retention;
        self
    }

    /// The journal of the builds run here.
    pub fn journal(&self) -> &Arc<crate::journal::Journal> {
        &self.journal
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u64, CancellationToken)>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds running here, and builds submitted and waiting to begin.
    pub fn counts(&self) -> (u64, u64) {
        (self.lock().len() as u64, self.waiting.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Counts a submitted build as waiting until the guard drops.
    pub(crate) fn wait(&self) -> Waiting {
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(Arc::clone(&self.waiting))
    }

    /// Claims `id` for a run. A new build (`attempt` 0) under an id running here is refused;
    /// a reattachment replaces the run it reattaches to (its client left it), which ends
    /// without recording anything.
    pub(crate) fn claim(&self, id: &str, attempt: u32) -> Result<Run, ApiError> {
        let mut runs = self.lock();
        let generation = match runs.get(id) {
            Some(_) if attempt == 0 => return Err(ApiError::BuildExists(id.to_string())),
            Some((generation, old)) => {
                old.cancel();
                generation + 1
            }
            None => 0,
        };
        let replaced = CancellationToken::new();
        runs.insert(id.to_string(), (generation, replaced.clone()));
        Ok(Run { runs: self.clone(), id: id.to_string(), generation, replaced })
    }
}

impl Run {
    /// Resolves once a reattachment replaced this run.
    pub(crate) async fn replaced(&self) {
        self.replaced.cancelled().await
    }

    /// Whether this run is still the one its id names here.
    fn current(&self) -> bool {
        self.runs.lock().get(&self.id).is_some_and(|(generation, _)| *generation == self.generation)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let mut runs = self.runs.lock();
        if runs.get(&self.id).is_some_and(|(generation, _)| *generation == self.generation) {
            runs.remove(&self.id);
        }
    }
}

/// Counts a build that ended, and its vertices, in the metrics.
fn count_end(entry: &BuildEntry) {
    use kiln_telemetry::{BuildStatus, Outcome, metrics};
    let metrics = metrics();
    metrics.build_ended(match entry.status.as_str() {
        "succeeded" => BuildStatus::Succeeded,
        "cancelled" => BuildStatus::Cancelled,
        _ => BuildStatus::Failed,
    });
    let counts = &entry.counts;
    let outcomes = [
        (Outcome::Executed, counts.executed),
        (Outcome::Cached, counts.cached),
        (Outcome::Deduplicated, counts.deduplicated),
        (Outcome::Failed, counts.failed),
    ];
    for (outcome, count) in outcomes {
        metrics.vertices_ended(outcome, count);
    }
}

/// Where builds are recorded.
#[derive(Clone)]
pub enum BuildBook {
    /// A single daemon's store.
    Local(SharedKv),
    /// A replicated coordinator's store, written through the log.
    Replicated(Arc<ReplicatedKv>),
}

impl BuildBook {
    fn kv(&self) -> &dyn kiln_kv::Kv {
        match self {
            BuildBook::Local(kv) => kv.as_ref(),
            BuildBook::Replicated(kv) => kv.as_ref(),
        }
    }

    /// The entry of build `id`, if it has one.
    pub fn get(&self, id: &str) -> Result<Option<BuildEntry>, ApiError> {
        let Some(bytes) = self.kv().get(BUILDS_TREE, id.as_bytes()).map_err(|e| ApiError::History(e.to_string()))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| ApiError::History(format!("build {id}: {e}")))
    }

    /// Every entry (of `tenant`'s builds, when given), oldest first. An unreadable entry is
    /// skipped with a warning: it hides no other.
    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<BuildEntry>, ApiError> {
        let pairs = self.kv().scan_prefix(BUILDS_TREE, b"").map_err(|e| ApiError::History(e.to_string()))?;
        let mut entries: Vec<BuildEntry> = pairs
            .into_iter()
            .filter_map(|(key, value)| match serde_json::from_slice::<BuildEntry>(&value) {
                Ok(entry) => Some(entry),
                Err(error) => {
                    tracing::warn!("build {}: an unreadable history entry: {error}", String::from_utf8_lossy(&key));
                    None
                }
            })
            .filter(|entry| tenant.is_none_or(|t| entry.tenant == t))
            .collect();
        entries.sort_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(&b.id)));
        Ok(entries)
    }

    /// Writes `entry` now (a local book) or queues it for the log (a replicated one); the
    /// future resolves once a replicated write is committed.
    fn queue(&self, entry: &BuildEntry) -> Result<impl Future<Output = Result<(), ApiError>> + use<>, ApiError> {
        let value = serde_json::to_vec(entry).map_err(|e| ApiError::History(format!("build {}: {e}", entry.id)))?;
        let committed = match self {
            BuildBook::Local(kv) => {
                kv.put(BUILDS_TREE, entry.id.as_bytes(), &value).map_err(|e| ApiError::History(e.to_string()))?;
                None
            }
            BuildBook::Replicated(kv) => {
                let mut batch = kiln_kv::Batch::default();
                batch.put(entry.id.as_bytes(), value);
                Some(kv.write_durably(BUILDS_TREE, batch))
            }
        };
        Ok(async move {
            match committed {
                Some(committed) => committed.await.map(|_| ()).map_err(ApiError::Replication),
                None => Ok(()),
            }
        })
    }

    /// Records `entry`. A replicated book resolves once the entry is committed: a build
    /// starts only once its submission is in the log. A local one writes it at once, and
    /// syncs it to disk first when `sync` is set (a daemon that dies next still has it).
    pub async fn record(&self, entry: &BuildEntry, sync: bool) -> Result<(), ApiError> {
        self.queue(entry)?.await?;
        if let (BuildBook::Local(kv), true) = (self, sync) {
            let kv = Arc::clone(kv);
            let flushed = tokio::task::spawn_blocking(move || kv.flush()).await.map_err(ApiError::from)?;
            flushed.map_err(|e| ApiError::History(e.to_string()))?;
        }
        Ok(())
    }

    /// The entry build `id` starts with, not written yet: a new one, or the recorded one of a
    /// build whose client reattaches (`attempt` > 0) after losing the coordinator that ran
    /// it. A new build under a recorded id, a reattachment by another tenant or with another
    /// request, is refused.
    pub(crate) fn admit(
        &self,
        request: &kiln_model::BuildRequest,
        caller: &kiln_model::Caller,
        id: &str,
    ) -> Result<BuildEntry, ApiError> {
        let summary = kiln_model::RequestSummary::of(request, &caller.name);
        let target = request.target.clone();
        let platforms: Vec<String> = request.platforms.iter().map(|p| p.to_string()).collect();
        let entry = match self.get(id)? {
            Some(recorded) if request.attempt == 0 || recorded.tenant != caller.tenant => {
                return Err(ApiError::BuildExists(id.to_string()));
            }
            Some(recorded)
                if !recorded.request.same_build(&summary)
                    || recorded.target != target
                    || recorded.platforms != platforms =>
            {
                return Err(ApiError::NotTheSameBuild(id.to_string()));
            }
            Some(recorded) => {
                tracing::info!(
                    submissions = recorded.submissions + 1,
                    "reattached: the build was {} when its coordinator was lost",
                    recorded.status
                );
                BuildEntry {
                    status: "running".into(),
                    completed: None,
                    submissions: recorded.submissions + 1,
                    counts: Default::default(),
                    error: None,
                    ..recorded
                }
            }
            None => BuildEntry {
                id: id.to_string(),
                status: "running".into(),
                started: kiln_types::now_ms(),
                completed: None,
                target,
                platforms,
                tenant: caller.tenant.clone(),
                submissions: request.attempt + 1,
                counts: Default::default(),
                error: None,
                request: summary,
            },
        };
        Ok(entry)
    }

    /// Ends the entries left `running` that do not run here (`why` is their error): the builds
    /// of a daemon that stopped, or of a lost leader whose clients did not reattach. Each is
    /// checked and written under the lock of `runs`, so a build that starts, ends or
    /// reattaches meanwhile is not overwritten.
    pub(crate) async fn settle(&self, runs: &Runs, why: &str) {
        let book = self.clone();
        let entries = match tokio::task::spawn_blocking(move || book.list(None)).await {
            Ok(Ok(entries)) => entries,
            Ok(Err(error)) => return tracing::warn!("settling abandoned builds: {error}"),
            Err(error) => return tracing::warn!("settling abandoned builds: {error}"),
        };
        for listed in entries.into_iter().filter(|e| e.status == "running") {
            let queued = {
                let running = runs.lock();
                match self.get(&listed.id) {
                    Ok(Some(now)) if !running.contains_key(&now.id) && now.status == "running" => {
                        self.queue(&now.ended("failed", Some(why.to_string()), &[]))
                    }
                    Ok(_) => continue,
                    Err(error) => Err(error),
                }
            };
            match queued {
                Ok(committed) => match committed.await {
                    Ok(()) => tracing::info!("build {}: {why}", listed.id),
                    Err(error) => return tracing::warn!("settling build {}: {error}", listed.id),
                },
                Err(error) => return tracing::warn!("settling build {}: {error}", listed.id),
            }
        }
    }

    /// Records how `run` ended, unless a reattachment replaced it; a failure to is logged
    /// (the build's result stands). Every [`PRUNE_EVERY`] ends, the history is pruned in the
    /// background.
    pub(crate) async fn record_end(&self, run: &Run, entry: BuildEntry) {
        if !run.current() {
            return;
        }
        count_end(&entry);
        if let Err(error) = self.record(&entry, false).await {
            tracing::warn!("recording the end of build {}: {error}", entry.id);
        }
        if run.runs.ended.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            let (book, runs) = (self.clone(), run.runs.clone());
            let retention = runs.retention;
            tokio::spawn(async move { book.prune(&runs, retention).await });
        }
    }

    /// Removes build `id`'s entry (through the log on a replicated book).
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        match self {
            BuildBook::Local(kv) => {
                let (kv, owned) = (Arc::clone(kv), id.to_string());
                tokio::task::spawn_blocking(move || kv.delete(BUILDS_TREE, owned.as_bytes()))
                    .await?
                    .map_err(|e| ApiError::History(format!("build {id}: {e}")))
            }
            BuildBook::Replicated(kv) => {
                let mut batch = kiln_kv::Batch::default();
                batch.delete(id.as_bytes());
                kv.write_durably(BUILDS_TREE, batch).await.map(|_| ()).map_err(ApiError::Replication)
            }
        }
    }

    /// Removes the entries (and journals) of builds that ended: the oldest beyond
    /// `retention.max_builds`, and those older than `retention.max_age`. An entry is checked
    /// again under the lock of `runs` before it goes: one reattached meanwhile stays.
    pub(crate) async fn prune(&self, runs: &Runs, retention: Retention) {
        let (book, runs) = (self.clone(), runs.clone());
        let pruned = tokio::task::spawn_blocking(move || {
            let entries = book.list(None)?;
            let ended: Vec<&BuildEntry> = entries.iter().filter(|e| e.status != "running").collect();
            let over = entries.len().saturating_sub(retention.max_builds).min(ended.len());
            let now = kiln_types::now_ms();
            let too_old = |e: &&&BuildEntry| {
                retention.max_age.is_some_and(|age| now.saturating_sub(e.started) > age.as_millis() as u64)
            };
            let expired = ended[over..].iter().filter(too_old);
            let mut pruned = Vec::new();
            for entry in ended[..over].iter().chain(expired) {
                let running = runs.lock();
                let still_ended = book.get(&entry.id)?.is_some_and(|now| now.status != "running");
                if still_ended && !running.contains_key(&entry.id) {
                    book.kv().delete(BUILDS_TREE, entry.id.as_bytes()).map_err(|e| ApiError::History(e.to_string()))?;
                    pruned.push(entry);
                }
            }
            // Their journals go once the lock of `runs` is released.
            for entry in &pruned {
                runs.journal.remove(&entry.id, &entry.tenant)?;
            }
            Ok::<_, ApiError>(pruned.len())
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(pruned)) => tracing::info!("the build history dropped its {pruned} oldest entries"),
            Ok(Err(error)) => tracing::warn!("pruning the build history: {error}"),
            Err(error) => tracing::warn!("pruning the build history: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(attempt: u32) -> kiln_model::BuildRequest {
        kiln_model::BuildRequest {
            attempt,
            target: Some("app".into()),
            dockerfile: "FROM scratch\n".into(),
            ..Default::default()
        }
    }

    /// Admits and records, as a build does.
    async fn begin(
        book: &BuildBook,
        request: &kiln_model::BuildRequest,
        caller: &kiln_model::Caller,
        id: &str,
    ) -> Result<BuildEntry, ApiError> {
        let entry = book.admit(request, caller, id)?;
        book.record(&entry, true).await?;
        Ok(entry)
    }

    fn runs() -> Runs {
        Runs::new(Arc::new(kiln_kv::MemoryKv::new()))
    }

    fn caller(tenant: &str) -> kiln_model::Caller {
        kiln_model::Caller { name: format!("ci-{tenant}"), tenant: tenant.into(), role: kiln_model::Role::Build }
    }

    #[tokio::test]
    async fn builds_begin_once_and_are_reattached_only_by_their_tenant() {
        let book = BuildBook::Local(Arc::new(kiln_kv::MemoryKv::new()));
        let first = begin(&book, &request(0), &caller("team-a"), "b1").await.unwrap();
        assert_eq!((first.status.as_str(), first.submissions, first.target.as_deref()), ("running", 1, Some("app")));
        // The same id as a new build: refused, naming it.
        let error = begin(&book, &request(0), &caller("team-a"), "b1").await.unwrap_err();
        assert!(matches!(error, ApiError::BuildExists(_)) && error.to_string().contains("build b1"), "{error}");
        // Another tenant cannot take it over.
        assert!(matches!(begin(&book, &request(1), &caller("team-b"), "b1").await, Err(ApiError::BuildExists(_))));
        // Its client reattaching: the same build, submitted once more.
        let run = runs().claim("b1", 0).unwrap();
        book.record_end(&run, first.ended("failed", Some("lost".into()), &[])).await;
        let again = begin(&book, &request(1), &caller("team-a"), "b1").await.unwrap();
        assert_eq!((again.started, again.submissions, again.status.as_str()), (first.started, 2, "running"));
        assert_eq!((again.completed, again.error), (None, None));
        // A reattachment must ask for the same build.
        let other = kiln_model::BuildRequest { dockerfile: "FROM other\n".into(), ..request(1) };
        let error = begin(&book, &other, &caller("team-a"), "b1").await.unwrap_err();
        assert!(matches!(error, ApiError::NotTheSameBuild(_)) && error.to_string().contains("build b1"), "{error}");
        assert_eq!(again.request.dockerfile, "FROM scratch\n");
        // A reattachment whose first submission never reached the log starts a new entry.
        let unknown = begin(&book, &request(2), &caller("team-a"), "b2").await.unwrap();
        assert_eq!(unknown.submissions, 3);
        let listed: Vec<String> = book.list(Some("team-a")).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(listed, ["b1", "b2"]);
        assert!(book.list(Some("team-b")).unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_run_per_id_and_a_reattachment_replaces_the_run_it_reattaches_to() {
        let runs = runs();
        let first = runs.claim("b1", 0).unwrap();
        assert!(matches!(runs.claim("b1", 0), Err(ApiError::BuildExists(_))));
        let second = runs.claim("b1", 1).unwrap();
        first.replaced().await;
        assert!(!first.current() && second.current());
        // The replaced run's end is not recorded over the new run's entry.
        let book = BuildBook::Local(Arc::new(kiln_kv::MemoryKv::new()));
        let entry = begin(&book, &request(1), &caller("team-a"), "b1").await.unwrap();
        book.record_end(&first, entry.ended("cancelled", None, &[])).await;
        assert_eq!(book.get("b1").unwrap().unwrap().status, "running");
        drop(first);
        assert!(second.current(), "the replaced run leaves the id to the new one");
        drop(second);
        runs.claim("b1", 0).unwrap();
    }

    #[tokio::test]
    async fn pruning_drops_the_oldest_ended_entries_and_keeps_running_ones() {
        let book = BuildBook::Local(Arc::new(kiln_kv::MemoryKv::new()));
        for n in 0..5u64 {
            let entry = begin(&book, &request(0), &caller("team-a"), &format!("b{n}")).await.unwrap();
            let entry = BuildEntry { started: n, ..entry };
            let entry = if n == 0 { entry } else { entry.ended("succeeded", None, &[]) };
            book.record(&entry, false).await.unwrap();
        }
        book.prune(&runs(), Retention { max_builds: 3, max_age: None }).await;
        let left: Vec<String> = book.list(None).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(left, ["b0", "b3", "b4"], "the running b0 stays; b1 and b2 go");
        // By age: b3 started at 3 ms, long ago; b4 now.
        let recent = BuildEntry { started: kiln_types::now_ms(), ..book.get("b4").unwrap().unwrap() };
        book.record(&recent, false).await.unwrap();
        book.prune(&runs(), Retention { max_builds: 3, max_age: Some(std::time::Duration::from_secs(3600)) }).await;
        let left: Vec<String> = book.list(None).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(left, ["b0", "b4"], "b3 is older than an hour; the running b0 stays");
    }
}
