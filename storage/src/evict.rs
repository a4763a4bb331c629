//! Cache eviction: keeps the pull-through cache under a size cap and a maximum age by
//! dropping the least recently pulled cached images; garbage collection then frees their
//! blobs (after its grace period), exactly as for deleted pushed images.
//!
//! An image goes whole: an index with the manifests it lists (unless something else still
//! lists or tags them) and the referrers of what goes. Blobs are never deleted here, so a
//! blob that a kept manifest references stays, whichever image brought it in.

use std::time::Duration;

use tracing::info;

use crate::error::Result;
use crate::meta::now;
use crate::store::Store;

/// What to keep.
#[derive(Debug, Clone, Default)]
pub struct EvictPolicy {
    /// Repository prefixes of cached content (`docker.io` for `docker.io/library/alpine`).
    pub prefixes: Vec<String>,
    /// Cap on the bytes of blobs cached manifests reference.
    pub max_bytes: Option<u64>,
    /// Images not pulled for this long go.
    pub max_age: Option<Duration>,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Manifests removed.
    pub manifests: u64,
    /// Bytes the cache referenced before.
    pub bytes_before: u64,
    /// Bytes it references now (freed on disk by the next garbage collection).
    pub bytes_after: u64,
}

impl Store {
    /// Evicts cached images per `p`, least recently pulled first.
    pub async fn evict_cache(&self, p: &EvictPolicy) -> Result<EvictReport> {
        if p.prefixes.is_empty() || (p.max_bytes.is_none() && p.max_age.is_none()) {
            return Ok(EvictReport::default());
        }
        // Pull times still in memory count.
        self.flush_access().await?;
        let report = self.meta.evict(p, now()).await?;
        if report.manifests > 0 {
            info!(
                manifests = report.manifests,
                before = report.bytes_before,
                after = report.bytes_after,
                "cache eviction"
            );
        }
        Ok(report)
    }
}
