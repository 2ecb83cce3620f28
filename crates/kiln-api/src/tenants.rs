//! Tenants: the cache group each one's builds belong to, and its limits, counted as its
//! builds start and end. Over a limit a request is refused (`RESOURCE_EXHAUSTED`), never
//! queued.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use kiln_model::TenantPolicy;

use crate::error::ApiError;

/// Every tenant's policy and what its builds use now.
#[derive(Default)]
pub struct Tenants {
    policies: BTreeMap<String, TenantPolicy>,
    usage: Mutex<HashMap<String, Usage>>,
}

/// What one tenant's builds in progress use.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    builds: usize,
    vertices: usize,
}

impl Tenants {
    /// The policies by tenant; a tenant without one has no limits and its own cache group.
    pub fn new(policies: BTreeMap<String, TenantPolicy>) -> Arc<Tenants> {
        Arc::new(Tenants { policies, usage: Mutex::default() })
    }

    fn policy(&self, tenant: &str) -> &TenantPolicy {
        const UNLIMITED: TenantPolicy = TenantPolicy {
            cache_group: None,
            max_builds: None,
            max_queued_vertices: None,
            max_upload: None,
            max_stored: None,
        };
        self.policies.get(tenant).unwrap_or(&UNLIMITED)
    }

    /// The cache group of `tenant` (`None`: the default group).
    pub(crate) fn cache_group(&self, tenant: &str) -> Option<String> {
        self.policy(tenant).cache_group(tenant)
    }

    /// Checks `bytes` of one build's context, or of one upload, against the tenant's
    /// `max-upload`.
    pub(crate) fn check_upload(&self, tenant: &str, bytes: u64) -> Result<(), ApiError> {
        within(self.policy(tenant).max_upload, bytes, |limit| ApiError::UploadTooLarge {
            tenant: tenant.to_string(),
            limit,
            size: bytes,
        })
    }

    /// The tenant's `max-stored`, if it has one.
    pub(crate) fn max_stored(&self, tenant: &str) -> Option<u64> {
        self.policy(tenant).max_stored
    }

    /// Checks the `bytes` of uploaded contexts the tenant's group would keep against its
    /// `max-stored`.
    pub(crate) fn check_stored(&self, tenant: &str, bytes: u64) -> Result<(), ApiError> {
        within(self.policy(tenant).max_stored, bytes, |limit| ApiError::StoredTooMuch {
            tenant: tenant.to_string(),
            limit,
            size: bytes,
        })
    }

    /// Counts a new build of `tenant`, or refuses it at `max-builds`. The build counts until
    /// the admission is dropped.
    pub(crate) fn admit(self: &Arc<Self>, tenant: &str) -> Result<Admission, ApiError> {
        let limit = self.policy(tenant).max_builds;
        let mut usage = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let used = usage.entry(tenant.to_string()).or_default();
        if let Some(limit) = limit
            && used.builds >= limit
        {
            return Err(ApiError::TooManyBuilds { tenant: tenant.to_string(), limit });
        }
        used.builds += 1;
        Ok(Admission { tenants: Arc::clone(self), tenant: tenant.to_string(), vertices: 0 })
    }
}

/// `bytes` within `limit`, or the error for the limit.
fn within(limit: Option<u64>, bytes: u64, error: impl FnOnce(u64) -> ApiError) -> Result<(), ApiError> {
    match limit {
        Some(limit) if bytes > limit => Err(error(limit)),
        _ => Ok(()),
    }
}

/// A build counted against its tenant's limits, until dropped.
pub(crate) struct Admission {
    tenants: Arc<Tenants>,
    tenant: String,
    vertices: usize,
}

impl Admission {
    /// Counts the build's planned `vertices`, or refuses them at `max-queued-vertices`.
    pub(crate) fn plan(&mut self, vertices: usize) -> Result<(), ApiError> {
        let limit = self.tenants.policy(&self.tenant).max_queued_vertices;
        let mut usage = self.tenants.usage.lock().unwrap_or_else(|e| e.into_inner());
        let used = usage.entry(self.tenant.clone()).or_default();
        let others = used.vertices - self.vertices;
        if let Some(limit) = limit
            && others + vertices > limit
        {
            return Err(ApiError::TooManyVertices {
                tenant: self.tenant.clone(),
                limit,
                queued: others,
                asked: vertices,
            });
        }
        used.vertices = others + vertices;
        self.vertices = vertices;
        Ok(())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut usage = self.tenants.usage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(used) = usage.get_mut(&self.tenant) {
            used.builds = used.builds.saturating_sub(1);
            used.vertices = used.vertices.saturating_sub(self.vertices);
            if used.builds == 0 {
                usage.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_builds_and_vertices_until_they_end() {
        let policy = TenantPolicy { max_builds: Some(2), max_queued_vertices: Some(10), ..TenantPolicy::default() };
        let tenants = Tenants::new(BTreeMap::from([("a".to_string(), policy)]));
        let mut first = tenants.admit("a").unwrap();
        first.plan(6).unwrap();
        let mut second = tenants.admit("a").unwrap();
        assert!(matches!(tenants.admit("a"), Err(ApiError::TooManyBuilds { limit: 2, .. })));
        assert!(matches!(second.plan(5), Err(ApiError::TooManyVertices { queued: 6, asked: 5, .. })));
        second.plan(4).unwrap();
        drop(first);
        second.plan(10).unwrap();
        let _third = tenants.admit("a").unwrap();
        // Another tenant has no limits, and its own cache group.
        let others: Vec<_> = (0..5).map(|_| tenants.admit("b").unwrap()).collect();
        assert_eq!((others.len(), tenants.cache_group("b")), (5, Some("b".to_string())));
        assert_eq!(tenants.cache_group("default"), None);
    }
}
