//! The build history's entries ([`BuildEntry`]), kept in the coordinator's store: through the
//! replicated log on a replicated coordinator, so that every member knows every build, a new
//! leader takes back the builds whose clients reattach, and the history survives the loss of
//! any member.

use std::sync::Arc;

use kiln_kv::SharedKv;
use kiln_model::BuildEntry;
use kiln_raft::ReplicatedKv;

use crate::error::ApiError;

/// The tree holding the entries, by build id.
pub const BUILDS_TREE: &str = "builds";

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

    /// Records `entry`. A replicated book resolves once the entry is committed: a build
    /// starts only once its submission is in the log. A local one writes it at once.
    pub async fn record(&self, entry: &BuildEntry) -> Result<(), ApiError> {
        let value = serde_json::to_vec(entry).map_err(|e| ApiError::History(format!("build {}: {e}", entry.id)))?;
        match self {
            BuildBook::Local(kv) => {
                kv.put(BUILDS_TREE, entry.id.as_bytes(), &value).map_err(|e| ApiError::History(e.to_string()))
            }
            BuildBook::Replicated(kv) => {
                let mut batch = kiln_kv::Batch::default();
                batch.put(entry.id.as_bytes(), value);
                kv.write_durably(BUILDS_TREE, batch).await.map(|_| ()).map_err(ApiError::Replication)
            }
        }
    }

    /// Records build `id` as running before it starts: a new entry, or the recorded
    /// one of a build whose client reattaches (`attempt` > 0) after losing the coordinator that
    /// ran it. A new build under a recorded id, or one of another tenant, is refused.
    pub(crate) async fn begin(
        &self,
        request: &kiln_model::BuildRequest,
        tenant: &str,
        id: &str,
    ) -> Result<kiln_model::BuildEntry, ApiError> {
        let recorded = self.get(id)?;
        let entry = match recorded {
            Some(recorded) if request.attempt == 0 || recorded.tenant != tenant => {
                return Err(ApiError::BuildExists(id.to_string()));
            }
            Some(recorded) => {
                tracing::info!(
                    submissions = recorded.submissions + 1,
                    "reattached: the build was {} when its coordinator was lost",
                    recorded.status
                );
                kiln_model::BuildEntry {
                    status: "running".into(),
                    completed: None,
                    submissions: recorded.submissions + 1,
                    counts: Default::default(),
                    error: None,
                    ..recorded
                }
            }
            None => kiln_model::BuildEntry {
                id: id.to_string(),
                status: "running".into(),
                started: kiln_types::now_ms(),
                completed: None,
                target: request.target.clone(),
                platforms: request.platforms.iter().map(|p| p.to_string()).collect(),
                tenant: tenant.to_string(),
                submissions: request.attempt + 1,
                counts: Default::default(),
                error: None,
            },
        };
        self.record(&entry).await?;
        Ok(entry)
    }

    /// Records how a build ended; a failure to is logged (the build's result stands).
    pub(crate) async fn record_end(&self, entry: kiln_model::BuildEntry) {
        if let Err(error) = self.record(&entry).await {
            tracing::warn!("recording the end of build {}: {error}", entry.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(attempt: u32) -> kiln_model::BuildRequest {
        kiln_model::BuildRequest { attempt, target: Some("app".into()), ..Default::default() }
    }

    #[tokio::test]
    async fn builds_begin_once_and_are_reattached_only_by_their_tenant() {
        let book = BuildBook::Local(Arc::new(kiln_kv::MemoryKv::new()));
        let first = book.begin(&request(0), "team-a", "b1").await.unwrap();
        assert_eq!((first.status.as_str(), first.submissions, first.target.as_deref()), ("running", 1, Some("app")));
        // The same id as a new build: refused, naming it.
        let error = book.begin(&request(0), "team-a", "b1").await.unwrap_err();
        assert!(matches!(error, ApiError::BuildExists(_)) && error.to_string().contains("build b1"), "{error}");
        // Another tenant cannot take it over.
        assert!(matches!(book.begin(&request(1), "team-b", "b1").await, Err(ApiError::BuildExists(_))));
        // Its client reattaching: the same build, submitted once more.
        book.record_end(first.ended("failed", Some("lost".into()), &[])).await;
        let again = book.begin(&request(1), "team-a", "b1").await.unwrap();
        assert_eq!((again.started, again.submissions, again.status.as_str()), (first.started, 2, "running"));
        assert_eq!((again.completed, again.error), (None, None));
        // A reattachment whose first submission never reached the log starts a new entry.
        let unknown = book.begin(&request(2), "team-a", "b2").await.unwrap();
        assert_eq!(unknown.submissions, 3);
        let listed: Vec<String> = book.list(Some("team-a")).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(listed, ["b1", "b2"]);
        assert!(book.list(Some("team-b")).unwrap().is_empty());
    }
}
