//! Uploaded context blobs belong to the cache group that uploaded them. The blob store is
//! shared (one copy of each file), but a group may use a blob in a build, or hear that the
//! daemon has it, only after sending its bytes itself: knowing a digest is not enough to
//! read another tenant's file.

use std::sync::Arc;

use kiln_kv::{Batch, KvError};
use kiln_model::DEFAULT_TENANT;
use kiln_types::Digest;

use crate::Engine;

/// `GROUP \0 DIGEST` → nothing: the group sent the blob's bytes.
const UPLOADS_TREE: &str = "context-uploads";

fn upload_key(group: Option<&str>, digest: &Digest) -> Vec<u8> {
    format!("{}\0{digest}", group.unwrap_or(DEFAULT_TENANT)).into_bytes()
}

impl Engine {
    /// Records that `group` (`None`: the default group) sent `digests`. Blocking: call it
    /// off the async threads.
    pub fn record_uploads(
        &self,
        group: Option<&str>,
        digests: impl IntoIterator<Item = Digest>,
    ) -> Result<(), KvError> {
        let mut batch = Batch::default();
        for digest in digests {
            batch.put(upload_key(group, &digest), Vec::new());
        }
        self.kv.apply(UPLOADS_TREE, &batch)
    }

    /// Of `digests`, those `group` may not use: not in the store, or not sent by the group.
    pub async fn not_uploaded(&self, group: Option<&str>, digests: Vec<Digest>) -> Result<Vec<Digest>, KvError> {
        let (cas, kv) = (Arc::clone(self.stores.cas()), Arc::clone(&self.kv));
        let group = group.map(str::to_string);
        let lookups = tokio::task::spawn_blocking(move || {
            let mut missing = Vec::new();
            for digest in digests {
                if !cas.contains(&digest) || kv.get(UPLOADS_TREE, &upload_key(group.as_deref(), &digest))?.is_none() {
                    missing.push(digest);
                }
            }
            Ok(missing)
        });
        lookups.await.map_err(|e| KvError::Transaction(format!("looking up uploads: {e}")))?
    }
}
