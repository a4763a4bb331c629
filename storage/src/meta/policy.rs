//! What garbage collection and cache eviction ask of the metadata, and what they get back:
//! policies, reports, the record of a run. Re-exported by [`crate::gc`] and [`crate::evict`].

use std::time::Duration;

/// Finished runs kept in the metadata's record.
pub(crate) const RUNS_KEPT: i64 = 100;

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
    /// Multipart uploads a crash left open in the object store (S3), aborted.
    pub multipart_aborted: u64,
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
        )?;
        if self.multipart_aborted > 0 {
            write!(
                f,
                "; {} open multipart uploads aborted",
                self.multipart_aborted
            )?;
        }
        Ok(())
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
