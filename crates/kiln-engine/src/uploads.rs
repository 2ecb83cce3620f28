//! Uploaded context blobs belong to the cache group that uploaded them. The blob store is
//! shared (one copy of each file), but a group may use a blob in a build, or hear that the
//! daemon has it, only after sending its bytes itself: knowing a digest is not enough to
//! read another tenant's file.

use std::sync::Arc;

use kiln_kv::{Batch, KvError};
use kiln_model::DEFAULT_TENANT;
use kiln_types::Digest;

use crate::Engine;

/// `GROUP \0 DIGEST` → the blob's size (8 bytes, little-endian): the group sent its bytes.
const UPLOADS_TREE: &str = "context-uploads";

fn upload_key(group: Option<&str>, digest: &Digest) -> Vec<u8> {
    let mut key = upload_prefix(group);
    key.extend_from_slice(digest.to_string().as_bytes());
    key
}

fn upload_prefix(group: Option<&str>) -> Vec<u8> {
    format!("{}\0", group.unwrap_or(DEFAULT_TENANT)).into_bytes()
}

impl Engine {
    /// Records that `group` (`None`: the default group) sent the blobs `(digest, size)`.
    /// Blocking: call it off the async threads.
    pub fn record_uploads(
        &self,
        group: Option<&str>,
        blobs: impl IntoIterator<Item = (Digest, u64)>,
    ) -> Result<(), KvError> {
        let mut batch = Batch::default();
        for (digest, size) in blobs {
            batch.put(upload_key(group, &digest), size.to_le_bytes().to_vec());
        }
        self.kv.apply(UPLOADS_TREE, &batch)
    }

    /// The bytes of the blobs `group` sent that the store still holds.
    pub async fn uploaded_bytes(&self, group: Option<&str>) -> Result<u64, KvError> {
        let (cas, kv) = (Arc::clone(self.stores.cas()), Arc::clone(&self.kv));
        let prefix = upload_prefix(group);
        let sum = tokio::task::spawn_blocking(move || {
            let mut total = 0u64;
            for (key, value) in kv.scan_prefix(UPLOADS_TREE, &prefix)? {
                let digest = std::str::from_utf8(&key[prefix.len()..]).ok().and_then(|d| d.parse::<Digest>().ok());
                let size = value.try_into().map(u64::from_le_bytes).unwrap_or(0);
                if digest.is_some_and(|digest| cas.contains(&digest)) {
                    total += size;
                }
            }
            Ok(total)
        });
        sum.await.map_err(|e| KvError::Transaction(format!("summing uploads: {e}")))?
    }

    /// Of `digests`, those `group` may not use: not in the store, or not sent by the group.
    pub async fn not_uploaded(&self, group: Option<&str>, digests: Vec<Digest>) -> Result<Vec<Digest>, KvError> {
        let (cas, kv) = (Arc::clone(self.stores.cas()), Arc::clone(&self.kv));
        let group = group.map(str::to_string);
        let lookups = tokio::task::spawn_blocking(move || {
            let mut missing = Vec::new();
            for digest in digests {
                // Ownership first: whether another group stored the blob stays unobservable.
                if kv.get(UPLOADS_TREE, &upload_key(group.as_deref(), &digest))?.is_none() || !cas.contains(&digest) {
                    missing.push(digest);
                }
            }
            Ok(missing)
        });
        lookups.await.map_err(|e| KvError::Transaction(format!("looking up uploads: {e}")))?
    }
}
