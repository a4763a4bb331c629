//! Online garbage collection: mark from the metadata, sweep the object store.
//!
//! Triggers (see `meta/gc.sql`) queue every digest that may have lost its last reference, so a
//! run examines only those candidates: its cost grows with the garbage, not with the registry.
//! The object store is never listed.
//!
//! # What protects a blob
//! A client that was told a blob exists — a `201` for its upload or mount, a `200` for a HEAD or
//! GET — may push a manifest naming it at any moment within the grace period. Each of those
//! acknowledgements sets the blob's `blob_review.queued_at` to now, in the database, before the
//! answer goes out (an upload or mount in its commit; a read of a blob that is a candidate —
//! queued and unreferenced — is written through, at most once a second per blob). Mark only
//! takes candidates queued before `now - grace`. So every collector, in this process, in
//! `berth gc` or in another replica, sees every acknowledgement: none is held in memory.
//! Manifests that the untagged or orphan-referrer policies could delete are protected the same
//! way through `manifest_review` when they are read by digest or pushed again.
//!
//! # Safety under concurrent pushes
//! - **One run at a time**: a collection holds the `gc` lease (see `lease`), renewed after
//!   every sweep batch; a second run anywhere gets [`Error::Busy`].
//! - **Mark** runs in one write transaction, serialised with every push, mount, tag move,
//!   delete and protecting read. A blob is garbage when no manifest references it and it was
//!   neither linked, queued nor acknowledged within the grace period. Its rows go, and it is
//!   recorded in `gc_pending`.
//! - **Sweep** deletes the objects of pending blobs in batches, each batch inside a write
//!   transaction that first re-checks that no `blobs` row came back. A push of the same content
//!   either commits its row first (the object is kept) or finds the object gone right after its
//!   own commit and puts it back from its upload (see `Store::finish_upload`). A run killed
//!   mid-sweep leaves the rest in `gc_pending`; the next run frees it and reports it.
//! - **Dry run** performs the same mark and rolls it back, so its figures are exact.
//! - Every finished run is recorded in `gc_runs`, so the server's metrics show runs of
//!   `berth gc` too.

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
/// The lease that keeps collections to one at a time across processes.
const LEASE: &str = "gc";
/// How long the lease lasts unless renewed (it is renewed after every sweep batch).
const LEASE_TTL: Duration = Duration::from_secs(120);
/// Finished runs kept in `gc_runs`.
const RUNS_KEPT: i64 = 100;

/// What to collect.
#[derive(Debug, Clone)]
pub struct GcPolicy {
    /// Unreferenced blobs are kept this long after they were last uploaded, mounted, unlinked
    /// or read (the longest a client may take between hearing a blob exists and pushing the
    /// manifest that names it).
    pub grace: Duration,
    /// Delete manifests that no tag, index or subject keeps, once untagged (and not read by
    /// digest) this long.
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
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GcReport {
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Blobs freed: their objects deleted from storage by this run.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
    /// Of `blobs`, those an earlier run had marked and not swept (it was interrupted).
    pub resumed_blobs: u64,
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
        let resumed = match self.resumed_blobs {
            0 => String::new(),
            n => format!("; {n} of them marked by an interrupted run"),
        };
        write!(
            f,
            "{verb}: {} blobs ({} bytes{resumed}), {} manifests, {} manifest bodies ({} bytes), {} upload sessions, {} upload leftovers; {} objects deleted",
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

/// A finished collection, as recorded for every process to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRun {
    /// When it started (unix seconds).
    pub started_at: i64,
    /// When it finished (unix seconds).
    pub finished_at: i64,
    /// How long it took.
    pub duration: Duration,
    /// Who ran it: host, process id, instance.
    pub holder: String,
    /// What it did.
    pub report: GcReport,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// What a sweep freed.
#[derive(Default)]
struct Swept {
    blobs: u64,
    bytes: u64,
    resumed: u64,
    objects: u64,
}

impl Store {
    /// Runs one collection.
    pub async fn gc(&self, policy: &GcPolicy, dry_run: bool) -> Result<GcReport> {
        self.gc_as_of(policy, dry_run, now()).await
    }

    /// Runs one collection as if the clock read `t` (unix seconds): ages are measured from it.
    /// Tests use it to look into the future without waiting.
    ///
    /// One collection runs at a time across every process sharing the metadata: a second one
    /// gets [`Error::Busy`] naming the first.
    pub async fn gc_as_of(&self, policy: &GcPolicy, dry_run: bool, t: i64) -> Result<GcReport> {
        let _turn = self.gc_turn.lock().await;
        self.take_lease(LEASE, LEASE_TTL).await?;
        let started = std::time::Instant::now();
        let started_at = now();
        let result = self.collect(policy, dry_run, t).await;
        if let Err(e) = self.release_lease(LEASE).await {
            tracing::warn!(error = %e, "releasing the gc lease failed");
        }
        let report = result?;
        info!(
            dry_run,
            blobs = report.blobs,
            blob_bytes = report.blob_bytes,
            resumed_blobs = report.resumed_blobs,
            manifests = report.manifests,
            manifest_bodies = report.manifest_bodies,
            objects_deleted = report.objects_deleted,
            uploads = report.uploads,
            "garbage collection finished"
        );
        if !dry_run {
            let run = GcRun {
                started_at,
                finished_at: now(),
                duration: started.elapsed(),
                holder: self.instance.clone(),
                report: report.clone(),
            };
            if let Err(e) = self.record_run(run).await {
                tracing::warn!(error = %e, "recording the gc run failed");
            }
        }
        Ok(report)
    }

    async fn collect(&self, policy: &GcPolicy, dry_run: bool, t: i64) -> Result<GcReport> {
        let p = policy.clone();
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mark_run = run.clone();
        let marked = self
            .db
            .transaction(dry_run, move |tx| mark(tx, &p, t, &mark_run))
            .await?;
        let mut report = GcReport {
            dry_run,
            manifests: marked.manifests,
            manifest_bodies: marked.manifest_bodies,
            manifest_body_bytes: marked.manifest_body_bytes,
            ..GcReport::default()
        };
        if dry_run {
            // What the sweep would free: this mark (rolled back), plus what an interrupted run
            // marked and left.
            let (left, left_bytes) = self
                .db
                .read(|c| {
                    Ok(c.query_row(
                        "SELECT count(*), coalesce(sum(size), 0) FROM gc_pending p
                         WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)",
                        [],
                        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                    )?)
                })
                .await?;
            report.blobs = marked.blobs + left;
            report.blob_bytes = marked.blob_bytes + left_bytes;
            report.resumed_blobs = left;
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
            let swept = self.sweep(&run).await?;
            report.blobs = swept.blobs;
            report.blob_bytes = swept.bytes;
            report.resumed_blobs = swept.resumed;
            report.objects_deleted = swept.objects;
            report.uploads = self
                .expire_uploads_before(t - secs(policy.upload_expiry))
                .await? as u64;
        }
        report.upload_leftovers = self
            .upload_leftovers(t - secs(policy.grace), dry_run)
            .await?;
        Ok(report)
    }

    /// The latest finished collection, whichever process ran it.
    pub async fn last_gc_run(&self) -> Result<Option<GcRun>> {
        self.db
            .read(|c| {
                let row: Option<(i64, i64, i64, String, String)> = c
                    .query_row(
                        "SELECT started_at, finished_at, duration_ms, holder, report
                         FROM gc_runs ORDER BY id DESC LIMIT 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )
                    .optional()?;
                Ok(
                    row.map(|(started_at, finished_at, ms, holder, report)| GcRun {
                        started_at,
                        finished_at,
                        duration: Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
                        holder,
                        report: serde_json::from_str(&report).unwrap_or_default(),
                    }),
                )
            })
            .await
    }

    async fn record_run(&self, run: GcRun) -> Result<()> {
        let report = serde_json::to_string(&run.report)
            .map_err(|e| Error::Internal(format!("gc report: {e}")))?;
        self.db
            .write(move |tx| {
                tx.execute(
                    "INSERT INTO gc_runs (started_at, finished_at, duration_ms, holder, report)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        run.started_at,
                        run.finished_at,
                        i64::try_from(run.duration.as_millis()).unwrap_or(i64::MAX),
                        run.holder,
                        report
                    ],
                )?;
                tx.execute(
                    "DELETE FROM gc_runs WHERE id <= (SELECT max(id) FROM gc_runs) - ?1",
                    [RUNS_KEPT],
                )?;
                Ok(())
            })
            .await
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

    /// Deletes the objects of blobs marked garbage (by this run, `run`, or by an earlier one
    /// that was interrupted), re-checking each batch under the write lock.
    async fn sweep(&self, run: &str) -> Result<Swept> {
        let mut total = Swept::default();
        loop {
            let objects = self.objects.clone();
            let handle = tokio::runtime::Handle::current();
            let run = run.to_owned();
            let (batch, more) = self
                .db
                .write(move |tx| {
                    let mut st = tx.prepare(
                        "SELECT p.digest, p.size, p.run,
                                EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)
                         FROM gc_pending p LIMIT ?1",
                    )?;
                    let rows = st
                        .query_map([SWEEP_BATCH as i64], |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, bool>(3)?,
                            ))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    let mut batch = Swept::default();
                    let mut keys = Vec::new();
                    for (d, size, marked_by, revived) in &rows {
                        if *revived {
                            continue; // pushed again since it was marked: keep the bytes
                        }
                        let Ok(d) = d.parse::<Digest>() else { continue };
                        keys.push(blob_key(&d));
                        batch.blobs += 1;
                        batch.bytes += u64::try_from(*size).unwrap_or(0);
                        if *marked_by != run {
                            batch.resumed += 1;
                        }
                    }
                    // This runs on a blocking thread: wait for the batched delete here, holding
                    // the write lock so no push can commit a row for these digests meanwhile.
                    batch.objects = handle.block_on(async {
                        let paths = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
                        let mut results = objects.delete_stream(paths);
                        let mut deleted = 0;
                        while let Some(r) = results.next().await {
                            match r {
                                Ok(_) => deleted += 1,
                                // Deleted by the interrupted run that marked it.
                                Err(object_store::Error::NotFound { .. }) => {}
                                Err(e) => return Err(Error::from(e)),
                            }
                        }
                        Ok(deleted)
                    })?;
                    let mut del = tx.prepare_cached("DELETE FROM gc_pending WHERE digest = ?1")?;
                    for (d, ..) in &rows {
                        del.execute([d])?;
                    }
                    Ok((batch, rows.len() == SWEEP_BATCH))
                })
                .await?;
            total.blobs += batch.blobs;
            total.bytes += batch.bytes;
            total.resumed += batch.resumed;
            total.objects += batch.objects;
            if !more {
                return Ok(total);
            }
            self.renew_lease(LEASE, LEASE_TTL).await?;
        }
    }
}

/// The mark phase: one pass over the review queues.
fn mark(tx: &Transaction<'_>, p: &GcPolicy, t: i64, run: &str) -> Result<GcReport> {
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
                    "INSERT INTO gc_pending (digest, size, marked_at, run) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (digest) DO NOTHING",
                    params![d, size, t, run],
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

/// Protects blob `digest` from collection for the grace period from `t` (unix seconds): a client
/// was just told it exists (an upload's or mount's 201, a HEAD's or GET's 200).
///
/// The review queue's `queued_at` is the one durable "last acknowledged" time every collector
/// reads, whichever process or replica made the acknowledgement: mark only takes candidates
/// queued before `t - grace`.
pub(crate) fn protect_blob(tx: &Transaction<'_>, digest: &str, t: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO blob_review (digest, queued_at) VALUES (?1, ?2)
         ON CONFLICT (digest) DO UPDATE SET queued_at = max(queued_at, excluded.queued_at)",
        params![digest, t],
    )?;
    Ok(())
}

/// [`protect_blob`] for a read through repository `repo`: `false` (and nothing written) when
/// the repository no longer links the blob, as after a collection that got there first.
pub(crate) fn protect_blob_in(
    tx: &Transaction<'_>,
    repo: &str,
    digest: &str,
    t: i64,
) -> rusqlite::Result<bool> {
    let linked = tx
        .query_row(
            "SELECT 1 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
             WHERE r.name = ?1 AND rb.digest = ?2",
            params![repo, digest],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if linked {
        protect_blob(tx, digest, t)?;
    }
    Ok(linked)
}

/// Protects manifest `digest` of repository `repo` from the untagged and orphan-referrer
/// policies for their periods from `t`, when it is queued for review (an unqueued manifest is
/// kept by a tag or an index); `false` when the manifest is gone.
pub(crate) fn protect_manifest(
    tx: &Transaction<'_>,
    repo: i64,
    digest: &str,
    t: i64,
) -> rusqlite::Result<bool> {
    let exists = tx
        .query_row(
            "SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2",
            params![repo, digest],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if exists {
        tx.execute(
            "UPDATE manifest_review SET queued_at = max(queued_at, ?3)
             WHERE repo_id = ?1 AND digest = ?2",
            params![repo, digest, t],
        )?;
    }
    Ok(exists)
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
