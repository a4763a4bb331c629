//! Cache eviction: keeps the pull-through cache under a size cap and a maximum age by
//! dropping the least recently pulled cached images; garbage collection then frees their
//! blobs (after its grace period), exactly as for deleted pushed images.
//!
//! An image goes whole: an index with the manifests it lists (unless something else still
//! lists or tags them) and the referrers of what goes. Blobs are never deleted here, so a
//! blob that a kept manifest references stays, whichever image brought it in.
//!
//! One eviction runs at a time across every process sharing the metadata (the `evict` lease):
//! two replicas evicting at once would each free the whole excess, dropping twice what the cap
//! asks.

use tracing::info;

use crate::error::Result;
use crate::meta::now;
use crate::store::Store;

/// How long the eviction lease lasts unless renewed (it is, while the run works).
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(120);

pub use crate::meta::policy::{EvictPolicy, EvictReport};

impl Store {
    /// Evicts cached images per `p`, least recently pulled first; [`crate::Error::Busy`]
    /// while another process evicts.
    pub async fn evict_cache(self: &std::sync::Arc<Self>, p: &EvictPolicy) -> Result<EvictReport> {
        if p.prefixes.is_empty() || (p.max_bytes.is_none() && p.max_age.is_none()) {
            return Ok(EvictReport::default());
        }
        let held = self.hold_lease("evict", LEASE_TTL).await?;
        // Pull times still in memory count.
        let report = match self.flush_access().await {
            Ok(_) => self.meta.evict(p, now()).await,
            Err(e) => Err(e),
        };
        if let Err(e) = held.release().await {
            tracing::debug!(error = %e, "releasing the evict lease failed; it lapses by itself");
        }
        let report = report?;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::{Error, StorageConfig};

    #[tokio::test]
    async fn one_eviction_at_a_time_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StorageConfig::local(dir.path());
        let (a, b) = (
            Arc::new(Store::open(&cfg).await.unwrap()),
            Arc::new(Store::open(&cfg).await.unwrap()),
        );
        let p = EvictPolicy {
            prefixes: vec!["docker.io".into()],
            max_bytes: Some(1),
            max_age: None,
        };
        let held = a
            .hold_lease("evict", Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(b.evict_cache(&p).await, Err(Error::Busy { .. })));
        held.release().await.unwrap();
        b.evict_cache(&p).await.unwrap();
        a.evict_cache(&p).await.unwrap();
    }
}
