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

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tracing::{info, warn};

use crate::s3::OpenMultipart;

use crate::blob::blob_key;
use crate::error::{Error, Result};
use crate::meta::{DeleteObjects, now};
use crate::names::Digest;
use crate::store::Store;

/// Objects deleted per sweep transaction.
const SWEEP_BATCH: usize = 500;
/// The lease that keeps collections to one at a time across processes.
const LEASE: &str = "gc";
/// How long the lease lasts unless renewed (it is renewed after every sweep batch).
const LEASE_TTL: Duration = Duration::from_secs(120);
pub use crate::meta::policy::{GcPolicy, GcReport, GcRun};

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
        let run = uuid::Uuid::new_v4().simple().to_string();
        let marked = self.meta.mark(policy, t, &run, dry_run).await?;
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
            let (left, left_bytes) = self.meta.pending_garbage().await?;
            report.blobs = marked.blobs + left;
            report.blob_bytes = marked.blob_bytes + left_bytes;
            report.resumed_blobs = left;
            let cutoff = t - secs(policy.upload_expiry);
            report.uploads = self.meta.uploads_untouched_since(cutoff).await?.len() as u64;
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
        report.multipart_aborted = self
            .open_multiparts(
                t - secs(policy.grace),
                t - secs(policy.upload_expiry.max(policy.grace)),
                dry_run,
            )
            .await;
        Ok(report)
    }

    /// Aborts (or counts) multipart uploads that S3 holds open and a crash left: unlisted as
    /// objects, but billed. Under `uploads/`: those started before `cutoff` whose session
    /// ended. Elsewhere (a blob being copied in parts): those started before `stale`, the
    /// upload expiry, far longer than any copy takes. A store that cannot list them is logged,
    /// not fatal: the rest of the collection stands, and a lifecycle rule on the bucket does
    /// the same job.
    async fn open_multiparts(&self, cutoff: i64, stale: i64, dry_run: bool) -> u64 {
        let Some(s3) = &self.s3 else { return 0 };
        let open = match s3.open_multiparts().await {
            Ok(open) => open,
            Err(e) => {
                warn!(error = %e, "listing open multipart uploads failed; none aborted");
                return 0;
            }
        };
        let ids: Vec<String> = open
            .iter()
            .filter(|u| is_upload(&u.key))
            .filter_map(|u| crate::blob::upload_of(&u.key).map(str::to_owned))
            .collect();
        let live = match self.meta.live_uploads(ids).await {
            Ok(live) => live,
            Err(e) => {
                warn!(error = %e, "checking sessions of open multipart uploads failed");
                return 0;
            }
        };
        let old = crash_left(open, cutoff, stale, |id| live.contains(id));
        let mut n = 0;
        for u in old {
            if !dry_run {
                if let Err(e) = s3.abort(&u).await {
                    warn!(key = %u.key, error = %e, "aborting an open multipart upload failed");
                    continue;
                }
            }
            n += 1;
        }
        if n > 0 {
            info!(count = n, dry_run, "open multipart uploads left by crashes");
        }
        n
    }

    /// The latest finished collection, whichever process ran it.
    pub async fn last_gc_run(&self) -> Result<Option<GcRun>> {
        self.meta.last_gc_run().await
    }

    async fn record_run(&self, run: GcRun) -> Result<()> {
        self.meta.record_gc_run(&run).await
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
        let live = self.meta.live_uploads(ids).await?;
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
    /// that was interrupted), batch by batch, each serialised with blob commits by the
    /// metadata backend; renews the lease between batches.
    async fn sweep(&self, run: &str) -> Result<crate::meta::Swept> {
        let objects = self.objects.clone();
        let delete: Arc<DeleteObjects> = Arc::new(move |digests: Vec<Digest>| {
            let objects = objects.clone();
            Box::pin(async move {
                let keys: Vec<_> = digests.iter().map(blob_key).collect();
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
            })
        });
        let mut total = crate::meta::Swept::default();
        loop {
            let (batch, more) = self
                .meta
                .sweep_batch(run, SWEEP_BATCH, delete.clone())
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

fn is_upload(key: &object_store::path::Path) -> bool {
    key.parts()
        .next()
        .is_some_and(|p| p.as_ref() == crate::blob::UPLOADS)
}

/// Of the multipart uploads S3 holds open, those a crash left: under `uploads/`, started before
/// `cutoff` for a session that is no longer `live`; elsewhere (a blob copied in parts), started
/// before `stale`.
fn crash_left(
    open: Vec<OpenMultipart>,
    cutoff: i64,
    stale: i64,
    live: impl Fn(&str) -> bool,
) -> Vec<OpenMultipart> {
    open.into_iter()
        .filter(|u| {
            if is_upload(&u.key) {
                u.initiated < cutoff && !crate::blob::upload_of(&u.key).is_some_and(&live)
            } else {
                u.initiated < stale
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(key: &str, initiated: i64) -> OpenMultipart {
        OpenMultipart {
            key: object_store::path::Path::from(key),
            id: key.to_owned(),
            initiated,
        }
    }

    #[test]
    fn only_what_crashes_left_is_aborted() {
        let found = vec![
            open("uploads/ended.0-a", 10),
            open("uploads/ended.0-young", 100),
            open("uploads/live.0-b", 10),
            open("blobs/sha256/ab/old", 10),
            open("blobs/sha256/ab/copying", 60),
        ];
        let keys: Vec<String> = crash_left(found, 50, 20, |id| id == "live")
            .into_iter()
            .map(|u| u.key.to_string())
            .collect();
        assert_eq!(keys, ["uploads/ended.0-a", "blobs/sha256/ab/old"]);
    }
}
