//! Online garbage collection: mark from the metadata, sweep the object store.
//!
//! Triggers (see `meta/gc.sql`) queue every digest that may have lost its last reference, so a
//! run examines only those candidates: its cost grows with the garbage, not with the registry.
//! The object store is never listed.
//!
//! # Safety under concurrent pushes
//! - **Mark** runs in one write transaction, serialised with every push, mount, tag move and
//!   delete. A blob is garbage when no manifest references it and it was neither linked, queued
//!   nor read within the grace period (a push in progress uploads blobs before its manifest).
//!   Its rows go, and it is recorded in `gc_pending`.
//! - **Sweep** deletes the objects of pending blobs in batches, each batch inside a write
//!   transaction that first re-checks that no `blobs` row came back. A push of the same content
//!   either commits its row first (the object is kept) or finds the object gone right after its
//!   own commit and puts it back from its upload (see `Store::finish_upload`).
//! - **Dry run** performs the same mark and rolls it back, so its figures are exact.

use std::time::Duration;

use futures_util::StreamExt;
use rusqlite::{OptionalExtension, Transaction, params};
use tracing::info;

use crate::blob::blob_key;
use crate::error::{Error, Result};
use crate::meta::now;
use crate::names::Digest;
use crate::store::Store;

/// Objects deleted per sweep transaction.
const SWEEP_BATCH: usize = 500;

/// What to collect.
#[derive(Debug, Clone)]
pub struct GcPolicy {
    /// Unreferenced blobs younger than this (since upload, unlink or last read) are kept.
    pub grace: Duration,
    /// Delete manifests that no tag, index or subject keeps, once untagged this long.
    pub untagged_after: Option<Duration>,
    /// Delete referrers (signatures, SBOMs…) whose subject no longer exists.
    pub orphan_referrers: bool,
    /// Drop upload sessions untouched this long.
    pub upload_expiry: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            untagged_after: None,
            orphan_referrers: false,
            upload_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a run removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Blobs removed.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Manifests removed from repositories (untagged or orphaned referrers).
    pub manifests: u64,
    /// Manifest bodies no repository uses any more.
    pub manifest_bodies: u64,
    /// Their bytes.
    pub manifest_body_bytes: u64,
    /// Blob objects deleted from the object store by the sweep.
    pub objects_deleted: u64,
    /// Upload sessions dropped.
    pub uploads: u64,
    /// Upload chunk objects that belonged to no session (left by crashes) and were deleted.
    pub upload_leftovers: u64,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        write!(
            f,
            "{verb}: {} blobs ({} bytes), {} manifests, {} manifest bodies ({} bytes), {} upload sessions, {} upload leftovers; {} objects deleted",
            self.blobs,
            self.blob_bytes,
            self.manifests,
            self.manifest_bodies,
            self.manifest_body_bytes,
            self.uploads,
            self.upload_leftovers,
            self.objects_deleted
        )
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Store {
    /// Runs one collection.
    pub async fn gc(&self, policy: &GcPolicy, dry_run: bool) -> Result<GcReport> {
        self.gc_as_of(policy, dry_run, now()).await
    }

    /// Runs one collection as if the clock read `t` (unix seconds): ages are measured from it.
    /// Tests use it to look into the future without waiting.
    pub async fn gc_as_of(&self, policy: &GcPolicy, dry_run: bool, t: i64) -> Result<GcReport> {
        // Reads recorded in memory count as uses.
        self.flush_access().await?;
        let p = policy.clone();
        let mut report = self
            .db
            .transaction(dry_run, move |tx| mark(tx, &p, t))
            .await?;
        report.dry_run = dry_run;
        if dry_run {
            let cutoff = t - secs(policy.upload_expiry);
            report.uploads = self
                .db
                .read(move |c| {
                    Ok(c.query_row(
                        "SELECT count(*) FROM uploads WHERE updated_at < ?1",
                        [cutoff],
                        |r| r.get::<_, i64>(0),
                    )? as u64)
                })
                .await?;
        } else {
            report.objects_deleted = self.sweep().await?;
            report.uploads = self
                .expire_uploads_before(t - secs(policy.upload_expiry))
                .await? as u64;
        }
        report.upload_leftovers = self
            .upload_leftovers(t - secs(policy.grace), dry_run)
            .await?;
        info!(
            dry_run,
            blobs = report.blobs,
            blob_bytes = report.blob_bytes,
            manifests = report.manifests,
            manifest_bodies = report.manifest_bodies,
            objects_deleted = report.objects_deleted,
            uploads = report.uploads,
            "garbage collection finished"
        );
        Ok(report)
    }

    /// Deletes (or counts) objects under `uploads/` that belong to no open session and were last
    /// written before `cutoff`: chunks of sessions that ended in a crash.
    async fn upload_leftovers(&self, cutoff: i64, dry_run: bool) -> Result<u64> {
        let prefix = object_store::path::Path::from(crate::blob::UPLOADS);
        let mut list = self.objects.list(Some(&prefix));
        let mut old = Vec::new();
        while let Some(meta) = list.next().await {
            let meta = meta?;
            if meta.last_modified.timestamp() < cutoff {
                old.push(meta.location);
            }
        }
        let ids: Vec<String> = old
            .iter()
            .filter_map(|k| crate::blob::upload_of(k).map(str::to_owned))
            .collect();
        let live: std::collections::HashSet<String> = self
            .db
            .read(move |c| {
                let mut st = c.prepare_cached("SELECT 1 FROM uploads WHERE id = ?1")?;
                let mut live = std::collections::HashSet::new();
                for id in ids {
                    if st.exists([&id])? {
                        live.insert(id);
                    }
                }
                Ok(live)
            })
            .await?;
        let mut n = 0;
        for key in old {
            if crate::blob::upload_of(&key).is_some_and(|id| live.contains(id)) {
                continue;
            }
            if !dry_run {
                self.delete_quietly(&key).await;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Deletes the objects of blobs marked garbage, re-checking each batch under the write lock.
    async fn sweep(&self) -> Result<u64> {
        let mut total = 0;
        loop {
            let objects = self.objects.clone();
            let handle = tokio::runtime::Handle::current();
            let (deleted, more) = self
                .db
                .write(move |tx| {
                    let mut st = tx.prepare(
                        "SELECT p.digest, EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)
                         FROM gc_pending p LIMIT ?1",
                    )?;
                    let rows = st
                        .query_map([SWEEP_BATCH as i64], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    let keys: Vec<_> = rows
                        .iter()
                        .filter(|(_, revived)| !revived)
                        .filter_map(|(d, _)| d.parse::<Digest>().ok())
                        .map(|d| blob_key(&d))
                        .collect();
                    let n = keys.len() as u64;
                    // This runs on a blocking thread: wait for the batched delete here, holding
                    // the write lock so no push can commit a row for these digests meanwhile.
                    handle.block_on(async {
                        let paths = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
                        let mut results = objects.delete_stream(paths);
                        while let Some(r) = results.next().await {
                            match r {
                                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                                Err(e) => return Err(Error::from(e)),
                            }
                        }
                        Ok(())
                    })?;
                    let mut del = tx.prepare_cached("DELETE FROM gc_pending WHERE digest = ?1")?;
                    for (d, _) in &rows {
                        del.execute([d])?;
                    }
                    Ok((n, rows.len() == SWEEP_BATCH))
                })
                .await?;
            total += deleted;
            if !more {
                return Ok(total);
            }
        }
    }
}

/// The mark phase: one pass over the review queues.
fn mark(tx: &Transaction<'_>, p: &GcPolicy, t: i64) -> Result<GcReport> {
    let mut r = GcReport::default();
    let grace_cutoff = t - secs(p.grace);

    // Manifests that may have become unreachable.
    let untagged_cutoff = p.untagged_after.map(|a| t - secs(a));
    let candidates: Vec<(i64, String, i64)> = {
        let mut st = tx.prepare("SELECT repo_id, digest, queued_at FROM manifest_review")?;
        st.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (repo, digest, queued) in candidates {
        let subject: Option<Option<String>> = tx
            .query_row(
                "SELECT subject FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                params![repo, digest],
                |row| row.get(0),
            )
            .optional()?;
        let Some(subject) = subject else {
            forget_manifest(tx, repo, &digest)?;
            continue;
        };
        if kept_by_tag_or_index(tx, repo, &digest)? {
            forget_manifest(tx, repo, &digest)?;
            continue;
        }
        let delete = match subject {
            Some(s) => {
                let subject_exists: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2)",
                    params![repo, s],
                    |row| row.get(0),
                )?;
                if subject_exists {
                    // A live referrer (signature, SBOM): referrers are untagged by nature.
                    forget_manifest(tx, repo, &digest)?;
                    continue;
                }
                p.orphan_referrers && queued < grace_cutoff
            }
            None => untagged_cutoff.is_some_and(|c| queued < c),
        };
        if delete {
            tx.execute(
                "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                params![repo, digest],
            )?;
            forget_manifest(tx, repo, &digest)?;
            r.manifests += 1;
        }
        // Otherwise it stays queued until it is old enough or the policy changes.
    }

    // Manifest bodies: database only, so no grace is needed (a concurrent push re-inserts).
    let bodies: Vec<String> = {
        let mut st = tx.prepare("SELECT digest FROM body_review")?;
        st.query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for d in bodies {
        let bytes: Option<i64> = tx
            .query_row(
                "SELECT length(content) FROM manifest_bodies b WHERE digest = ?1
                 AND NOT EXISTS (SELECT 1 FROM manifests m WHERE m.digest = b.digest)",
                [&d],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(bytes) = bytes {
            tx.execute("DELETE FROM manifest_bodies WHERE digest = ?1", [&d])?;
            r.manifest_bodies += 1;
            r.manifest_body_bytes += bytes as u64;
        }
        tx.execute("DELETE FROM body_review WHERE digest = ?1", [&d])?;
    }

    // Blobs: unreferenced, and not queued, linked or read within the grace period.
    let blobs: Vec<String> = {
        let mut st = tx.prepare("SELECT digest FROM blob_review WHERE queued_at < ?1")?;
        st.query_map([grace_cutoff], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for d in blobs {
        let referenced: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM manifest_refs WHERE child_digest = ?1 AND kind = 'blob')",
            [&d],
            |row| row.get(0),
        )?;
        let info: Option<(i64, i64, i64)> = tx
            .query_row(
                "SELECT size, max(created_at, last_access),
                        coalesce((SELECT max(created_at) FROM repo_blobs WHERE digest = ?1), 0)
                 FROM blobs WHERE digest = ?1",
                [&d],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        match info {
            Some((size, used, linked)) if !referenced => {
                if used.max(linked) >= grace_cutoff {
                    continue; // recently used: look again next time
                }
                tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", [&d])?;
                tx.execute("DELETE FROM blobs WHERE digest = ?1", [&d])?;
                tx.execute(
                    "INSERT INTO gc_pending (digest, size, marked_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (digest) DO NOTHING",
                    params![d, size, t],
                )?;
                r.blobs += 1;
                r.blob_bytes += size as u64;
            }
            _ => {}
        }
        tx.execute("DELETE FROM blob_review WHERE digest = ?1", [&d])?;
    }
    Ok(r)
}

/// Whether a tag or an index in the same repository keeps the manifest `digest`.
pub(crate) fn kept_by_tag_or_index(
    tx: &Transaction<'_>,
    repo: i64,
    digest: &str,
) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM tags WHERE repo_id = ?1 AND digest = ?2)
             OR EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = ?1 AND child_digest = ?2
                        AND kind = 'manifest')",
        params![repo, digest],
        |row| row.get(0),
    )
}

fn forget_manifest(tx: &Transaction<'_>, repo: i64, digest: &str) -> Result<()> {
    tx.execute(
        "DELETE FROM manifest_review WHERE repo_id = ?1 AND digest = ?2",
        params![repo, digest],
    )?;
    Ok(())
}

#[cfg(test)]
#[path = "gc_tests.rs"]
mod tests;
