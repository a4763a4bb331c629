//! Cache eviction: keeps the pull-through cache under a size cap and a maximum age by
//! dropping the least recently pulled cached images; garbage collection then frees their
//! blobs (after its grace period), exactly as for deleted pushed images.
//!
//! An image goes whole: an index with the manifests it lists (unless something else still
//! lists or tags them) and the referrers of what goes. Blobs are never deleted here, so a
//! blob that a kept manifest references stays, whichever image brought it in.

use tracing::info;

use crate::error::Result;
use crate::meta::now;
use crate::store::Store;

pub use crate::meta::policy::{EvictPolicy, EvictReport};

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
