//! Housekeeping the server runs in the background: writing pull times in batches and expiring
//! abandoned upload sessions.
//!
//! Manifest pull times feed cache eviction (least recently pulled first); they are kept in memory
//! and written every few seconds so that no GET waits on a database write. What protects content
//! from garbage collection is not kept here: reads of collection candidates are written through
//! (see [`crate::gc`]), as every collector, in any process, must see them.

use std::collections::HashMap;
use std::time::Duration;

use rusqlite::params;
use tracing::info;

use crate::error::Result;
use crate::meta::now;
use crate::names::{Digest, RepoName};
use crate::store::Store;

/// Pulls recorded since the last flush: (repository, digest) → unix time of the latest.
#[derive(Debug, Default)]
pub struct PendingPulls {
    manifests: HashMap<(String, String), i64>,
}

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
        self.db
            .write(move |tx| {
                let mut n = 0;
                let mut m = tx.prepare_cached(
                    "UPDATE manifests SET last_pulled = max(coalesce(last_pulled, 0), ?3)
                     WHERE digest = ?2 AND repo_id = (SELECT id FROM repos WHERE name = ?1)",
                )?;
                for ((repo, digest), t) in &pending.manifests {
                    n += m.execute(params![repo, digest, t])?;
                }
                Ok(n)
            })
            .await
    }

    /// How many upload sessions are open.
    pub async fn uploads_in_progress(&self) -> Result<u64> {
        self.db
            .read(|c| {
                Ok(c.query_row("SELECT count(*) FROM uploads", [], |r| r.get::<_, i64>(0))? as u64)
            })
            .await
    }

    /// Drops upload sessions untouched for `max_age`, with their chunk objects; returns how
    /// many were dropped.
    pub async fn expire_uploads(&self, max_age: Duration) -> Result<usize> {
        let cutoff = now() - i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        self.expire_uploads_before(cutoff).await
    }

    /// Drops upload sessions last touched before `cutoff` (unix seconds).
    pub(crate) async fn expire_uploads_before(&self, cutoff: i64) -> Result<usize> {
        let stale: Vec<String> = self
            .db
            .read(move |c| {
                let mut st = c.prepare("SELECT id FROM uploads WHERE updated_at < ?1")?;
                let ids = st
                    .query_map([cutoff], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(ids)
            })
            .await?;
        for id in &stale {
            self.drop_upload(id).await?;
        }
        if !stale.is_empty() {
            info!(count = stale.len(), "expired stale upload sessions");
        }
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::StreamExt;
    use object_store::memory::InMemory;

    use super::*;
    use crate::meta::Db;
    use crate::store::Chunk;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("m.db")).unwrap();
        (dir, Store::new(Arc::new(InMemory::new()), db))
    }

    fn body(data: &'static [u8]) -> crate::ByteStream {
        futures_util::stream::once(async move { Ok(bytes::Bytes::from_static(data)) }).boxed()
    }

    #[tokio::test]
    async fn stale_uploads_expire_with_their_chunks() {
        let (_d, s) = store().await;
        let repo: RepoName = "a".parse().unwrap();
        let up = s.start_upload(&repo).await.unwrap();
        s.append_upload(
            &repo,
            &up.id,
            Chunk {
                body: body(b"hello"),
                start: None,
                len: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            s.expire_uploads(Duration::from_secs(3600)).await.unwrap(),
            0
        );
        s.db.write(|tx| Ok(tx.execute("UPDATE uploads SET updated_at = updated_at - 10", [])?))
            .await
            .unwrap();
        assert_eq!(s.expire_uploads(Duration::from_secs(5)).await.unwrap(), 1);
        assert!(s.upload_status(&repo, &up.id).await.is_err());
        let left: Vec<_> = s.objects.list(None).collect().await;
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn pulls_are_written_in_batches() {
        let (_d, s) = store().await;
        let repo: RepoName = "a".parse().unwrap();
        let m = bytes::Bytes::from_static(
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
        );
        let out = s
            .put_manifest(
                &repo,
                &"t".parse().unwrap(),
                "application/vnd.oci.image.index.v1+json",
                m,
                &[],
            )
            .await
            .unwrap();
        s.record_manifest_pull(&repo, &out.digest);
        s.record_manifest_pull(&repo, &out.digest);
        assert_eq!(s.flush_access().await.unwrap(), 1);
        assert_eq!(s.flush_access().await.unwrap(), 0);
    }
}
