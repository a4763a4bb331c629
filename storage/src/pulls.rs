//! Pull times: kept in memory as manifests are served, written in batches (every few seconds,
//! and at shutdown), so that no GET waits on a database write. They feed cache eviction
//! (least recently pulled first).
//!
//! What protects content from garbage collection is not kept here: reads of collection
//! candidates are written through (see [`crate::gc`]), as every collector, in any process,
//! must see them.

use crate::error::Result;
use crate::meta::now;
use crate::names::{Digest, RepoName};
use crate::store::Store;

impl Store {
    /// Notes that `repo` served manifest `digest` (in memory only).
    pub fn record_manifest_pull(&self, repo: &RepoName, digest: &Digest) {
        if let Ok(mut p) = self.pulls.lock() {
            p.manifests
                .insert((repo.to_string(), digest.to_string()), now());
        }
    }

    /// Writes recorded pull times in one transaction; returns how many rows were touched.
    pub async fn flush_access(&self) -> Result<usize> {
        let pending = match self.pulls.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return Ok(0),
        };
        if pending.manifests.is_empty() {
            return Ok(0);
        }
        let pulls = pending
            .manifests
            .into_iter()
            .map(|((repo, digest), t)| (repo, digest, t))
            .collect();
        self.meta.record_pulls(pulls).await
    }
}
