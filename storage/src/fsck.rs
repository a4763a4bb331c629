//! `berth fsck`: is the registry whole?
//!
//! Checks, against a running server as well as a stopped one:
//! - every blob the metadata knows has its object, of the recorded size (and, when asked,
//!   the right digest: the object is streamed through the hash);
//! - no blob object lacks its row (such an object is outside garbage collection's knowledge);
//! - every manifest reference resolves in its repository (pull-through caches excepted: they
//!   fetch what a manifest names on demand), optional blobs (foreign layers) excepted;
//! - every upload session's recorded chunks exist.
//!
//! Repairs (`repair`) are the safe ones, each taking the same care as a push or a collection:
//! rows of blobs whose objects are missing, short or corrupt are dropped (clients HEAD before
//! they upload, hear 404 and upload them again) unless a push touched them since the check
//! began; blob objects without rows are recorded as unreferenced blobs, so the next collection
//! frees them after its grace period under its own protocol; sessions whose chunks are gone
//! are ended. Objects younger than `grace` are left alone: a commit in progress writes its
//! object before its row.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::blob::{self, UPLOADS};
use crate::error::Result;
use crate::manifest::Manifest;
use crate::meta::{Dangling, ImageRef, now};
use crate::names::{Digest, Reference};
use crate::store::Store;

/// Blob rows read per metadata page.
const PAGE: usize = 1000;
/// Dangling references reported at most.
const DANGLING_LIMIT: usize = 10_000;
/// Blobs hashed at once with `verify_digests`.
const VERIFY_PARALLEL: usize = 4;

/// Told how far digest verification is.
pub type OnProgress = Box<dyn Fn(&FsckProgress) + Send + Sync>;

/// How `fsck` runs.
pub struct FsckOptions {
    /// Stream every blob through its hash.
    pub verify_digests: bool,
    /// Make the safe repairs.
    pub repair: bool,
    /// Objects younger than this are not called orphans (a commit in progress).
    pub grace: Duration,
    /// Repositories that are pull-through caches (their manifests may name what is not
    /// fetched yet).
    pub is_cache: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// Called now and then while digests are verified.
    pub progress: Option<OnProgress>,
}

impl std::fmt::Debug for FsckOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsckOptions")
            .field("verify_digests", &self.verify_digests)
            .field("repair", &self.repair)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// How far digest verification is.
#[derive(Debug, Clone, Copy)]
pub struct FsckProgress {
    /// Blobs hashed.
    pub blobs: u64,
    /// Of how many.
    pub blobs_total: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// Of how many.
    pub bytes_total: u64,
    /// Since verification began.
    pub elapsed: Duration,
}

/// A blob whose object does not match its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobProblem {
    /// No object.
    Missing,
    /// The object's size differs from the recorded one.
    WrongSize {
        /// Recorded.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// The object's bytes hash to another digest.
    Corrupt {
        /// What they hash to.
        computed: String,
    },
    /// The object could not be read.
    Unreadable(String),
}

/// What `fsck` found and did.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Blob rows checked.
    pub blobs: u64,
    /// Their recorded bytes.
    pub blob_bytes: u64,
    /// Blobs whose digest was verified.
    pub verified: u64,
    /// Bytes hashed.
    pub verified_bytes: u64,
    /// How long verification took.
    pub verify_time: Duration,
    /// Blobs whose object is missing, short or corrupt.
    pub bad_blobs: Vec<(String, BlobProblem)>,
    /// Manifests that name a bad blob (to push again).
    pub broken_images: Vec<ImageRef>,
    /// Blob objects without a row, older than the grace period (digest, size).
    pub orphans: Vec<(String, u64)>,
    /// Manifest references that do not resolve.
    pub dangling: Vec<Dangling>,
    /// Upload sessions checked.
    pub uploads: u64,
    /// Sessions whose recorded chunks are missing or short (id, what).
    pub broken_uploads: Vec<(String, String)>,
    /// Upload objects of no session, older than the grace period (garbage collection removes
    /// them; not a problem).
    pub stale_upload_objects: u64,
    /// Blob objects a collection marked garbage and was stopped before deleting (the next run
    /// frees them; not a problem).
    pub awaiting_sweep: u64,
    /// What `repair` did.
    pub repairs: Vec<String>,
    /// Problems found and not repaired (all of them without `repair`).
    pub unrepaired: usize,
}

impl FsckReport {
    /// Whether nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.bad_blobs.is_empty()
            && self.orphans.is_empty()
            && self.dangling.is_empty()
            && self.broken_uploads.is_empty()
    }
}

impl std::fmt::Display for FsckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "checked {} blobs ({} bytes), {} upload sessions",
            self.blobs, self.blob_bytes, self.uploads
        )?;
        if self.verified > 0 {
            let secs = self.verify_time.as_secs_f64().max(1e-3);
            writeln!(
                f,
                "verified {} digests ({} bytes) in {:.1} s, {:.0} MiB/s",
                self.verified,
                self.verified_bytes,
                secs,
                self.verified_bytes as f64 / secs / (1024.0 * 1024.0)
            )?;
        }
        for (d, p) in &self.bad_blobs {
            let what = match p {
                BlobProblem::Missing => "object missing".to_owned(),
                BlobProblem::WrongSize { expected, found } => {
                    format!("object has {found} bytes, recorded {expected}")
                }
                BlobProblem::Corrupt { computed } => format!("content hashes to {computed}"),
                BlobProblem::Unreadable(e) => format!("unreadable: {e}"),
            };
            writeln!(f, "bad blob {d}: {what}")?;
        }
        for i in &self.broken_images {
            writeln!(
                f,
                "broken image {}@{} (tags: {}): push it again",
                i.repo,
                i.digest,
                if i.tags.is_empty() {
                    "none".to_owned()
                } else {
                    i.tags.join(", ")
                }
            )?;
        }
        for (d, size) in &self.orphans {
            writeln!(f, "orphan object {d} ({size} bytes): no blob row")?;
        }
        for x in &self.dangling {
            writeln!(
                f,
                "dangling reference {}@{} -> {} {}",
                x.repo, x.manifest, x.kind, x.child
            )?;
        }
        for (id, what) in &self.broken_uploads {
            writeln!(f, "broken upload session {id}: {what}")?;
        }
        if self.awaiting_sweep > 0 {
            writeln!(
                f,
                "{} blob objects marked garbage by an interrupted collection (the next one frees them)",
                self.awaiting_sweep
            )?;
        }
        if self.stale_upload_objects > 0 {
            writeln!(
                f,
                "{} upload objects of ended sessions (garbage collection removes them)",
                self.stale_upload_objects
            )?;
        }
        for r in &self.repairs {
            writeln!(f, "repaired: {r}")?;
        }
        let problems = self.bad_blobs.len()
            + self.orphans.len()
            + self.dangling.len()
            + self.broken_uploads.len();
        match (problems, self.unrepaired) {
            (0, _) => write!(f, "clean"),
            (p, u) if u < p => write!(f, "{p} problems, {} repaired, {u} left", p - u),
            (p, _) => write!(f, "{p} problems"),
        }
    }
}

/// The digest a blob object's key names (`blobs/<alg>/<xx>/<hex>`).
fn digest_of_key(key: &Path) -> Option<String> {
    let parts: Vec<&str> = key.as_ref().split('/').collect();
    match parts.as_slice() {
        ["blobs", alg, _, hex] => Some(format!("{alg}:{hex}")),
        _ => None,
    }
}

/// How long ago an object was last written.
fn age(meta: &object_store::ObjectMeta) -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::from(meta.last_modified))
        .unwrap_or_default()
}

impl Store {
    /// Checks the registry (see the module documentation); repairs what is safe when asked.
    pub async fn fsck(&self, opts: &FsckOptions) -> Result<FsckReport> {
        let started = now();
        let mut report = FsckReport::default();

        // Blob objects, by digest: size and age.
        let mut objects: HashMap<String, (u64, Duration)> = HashMap::new();
        let mut listing = self.objects.list(Some(&Path::from("blobs")));
        while let Some(meta) = listing.try_next().await? {
            if let Some(d) = digest_of_key(&meta.location) {
                objects.insert(d, (meta.size, age(&meta)));
            }
        }

        // Rows against objects.
        let mut to_verify: Vec<(String, u64)> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.meta.blob_rows(after.as_deref(), PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (d, size, visible) in page {
                report.blobs += 1;
                report.blob_bytes += size;
                let found = match objects.remove(&d) {
                    Some((n, _)) => Some(n),
                    // Listed before it was written? Look again.
                    None => self.object_size(&d).await?,
                };
                match found {
                    // Unlinked: a commit placing it, or garbage a collection frees.
                    None if !visible => {}
                    None => report.bad_blobs.push((d, BlobProblem::Missing)),
                    Some(n) if n != size => report.bad_blobs.push((
                        d,
                        BlobProblem::WrongSize {
                            expected: size,
                            found: n,
                        },
                    )),
                    Some(_) => to_verify.push((d, size)),
                }
            }
        }

        if opts.verify_digests {
            self.verify(&to_verify, opts, &mut report).await;
        }

        // Objects without rows, old enough not to be a commit in progress.
        for (d, (size, age)) in objects {
            if age < opts.grace || self.meta.has_blob(&d).await? {
                continue;
            }
            if self.meta.awaits_sweep(&d).await? {
                report.awaiting_sweep += 1;
                continue;
            }
            report.orphans.push((d, size));
        }
        report.orphans.sort();

        self.check_references(opts, &mut report).await?;
        self.check_uploads(opts, &mut report).await?;

        if !report.bad_blobs.is_empty() {
            let bad = report.bad_blobs.iter().map(|(d, _)| d.clone()).collect();
            report.broken_images = self.meta.manifests_using(bad).await?;
        }
        report.unrepaired = report.bad_blobs.len()
            + report.orphans.len()
            + report.dangling.len()
            + report.broken_uploads.len();
        if opts.repair {
            self.repair(started, &mut report).await?;
        }
        Ok(report)
    }

    /// The size of a blob's object, if it exists.
    async fn object_size(&self, digest: &str) -> Result<Option<u64>> {
        let Ok(d) = digest.parse::<Digest>() else {
            return Ok(None);
        };
        match self.objects.head(&blob::blob_key(&d)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn verify(&self, blobs: &[(String, u64)], opts: &FsckOptions, report: &mut FsckReport) {
        let start = Instant::now();
        let bytes_total: u64 = blobs.iter().map(|(_, s)| s).sum();
        let blobs_total = blobs.len() as u64;
        let objects = self.objects.clone();
        let mut results = futures_util::stream::iter(blobs.iter().cloned())
            .map(|(d, size)| {
                let objects = objects.clone();
                async move { (hash_blob(&objects, &d).await, d, size) }
            })
            .buffer_unordered(VERIFY_PARALLEL);
        let mut last_progress = Instant::now();
        while let Some((result, d, size)) = results.next().await {
            report.verified += 1;
            report.verified_bytes += size;
            match result {
                Ok(computed) if computed == d => {}
                Ok(computed) => report
                    .bad_blobs
                    .push((d, BlobProblem::Corrupt { computed })),
                Err(e) => report
                    .bad_blobs
                    .push((d, BlobProblem::Unreadable(e.to_string()))),
            }
            if let Some(p) = &opts.progress
                && (last_progress.elapsed() >= Duration::from_secs(1)
                    || report.verified == blobs_total)
            {
                last_progress = Instant::now();
                p(&FsckProgress {
                    blobs: report.verified,
                    blobs_total,
                    bytes: report.verified_bytes,
                    bytes_total,
                    elapsed: start.elapsed(),
                });
            }
        }
        report.verify_time = start.elapsed();
    }

    async fn check_references(&self, opts: &FsckOptions, report: &mut FsckReport) -> Result<()> {
        let now = now();
        for x in self.meta.dangling_references(DANGLING_LIMIT).await? {
            if (opts.is_cache)(&x.repo) {
                continue;
            }
            // Optional blobs (foreign layers) may be absent by design.
            if x.kind == "blob" && !self.required_by(&x, now).await? {
                continue;
            }
            report.dangling.push(x);
        }
        Ok(())
    }

    /// Whether the manifest of `x` requires its child (a foreign layer does not).
    async fn required_by(&self, x: &Dangling, now: i64) -> Result<bool> {
        let Ok(digest) = x.manifest.parse::<Digest>() else {
            return Ok(true);
        };
        let Some(row) = self
            .meta
            .manifest(&x.repo, &Reference::Digest(digest.clone()), now)
            .await?
        else {
            return Ok(false); // deleted meanwhile: its references went with it
        };
        let parsed = Manifest::parse(row.content.into(), &row.media_type, digest)?;
        Ok(parsed
            .references
            .iter()
            .any(|r| r.digest.to_string() == x.child && r.required))
    }

    async fn check_uploads(&self, opts: &FsckOptions, report: &mut FsckReport) -> Result<()> {
        let sessions = self.meta.upload_records().await?;
        report.uploads = sessions.len() as u64;
        let mut objects: HashMap<String, (u64, Duration)> = HashMap::new();
        let mut listing = self.objects.list(Some(&Path::from(UPLOADS)));
        while let Some(meta) = listing.try_next().await? {
            objects.insert(meta.location.to_string(), (meta.size, age(&meta)));
        }
        let live: std::collections::HashSet<&str> =
            sessions.iter().map(|s| s.id.as_str()).collect();
        for s in &sessions {
            let mut keys: Vec<&(String, u64)> = s.parts.iter().collect();
            keys.dedup_by(|a, b| a.0 == b.0);
            for (key, size) in keys {
                let found = match objects.get(key.as_str()) {
                    Some((n, _)) => Some(*n),
                    None => match self.objects.head(&Path::from(key.as_str())).await {
                        Ok(m) => Some(m.size),
                        Err(object_store::Error::NotFound { .. }) => None,
                        Err(e) => return Err(e.into()),
                    },
                };
                // A file written in place (`<id>.data`) holds the whole session (and may run
                // past it); an object part holds its own chunk.
                let needed = if key.ends_with(".data") {
                    s.size
                } else {
                    *size
                };
                match found {
                    None if self.upload_still_open(&s.id).await? => report
                        .broken_uploads
                        .push((s.id.clone(), format!("chunk {key} is missing"))),
                    Some(n) if n < needed => report.broken_uploads.push((
                        s.id.clone(),
                        format!("chunk {key} has {n} bytes, needs {needed}"),
                    )),
                    _ => {}
                }
            }
        }
        report.stale_upload_objects = objects
            .iter()
            .filter(|(k, (_, age))| {
                *age >= opts.grace
                    && blob::upload_of(&Path::from(k.as_str())).is_some_and(|id| !live.contains(id))
            })
            .count() as u64;
        Ok(())
    }

    /// Whether session `id` still exists (it may have been committed while it was checked).
    async fn upload_still_open(&self, id: &str) -> Result<bool> {
        Ok(self
            .meta
            .live_uploads(vec![id.to_owned()])
            .await?
            .contains(id))
    }

    async fn repair(&self, started: i64, report: &mut FsckReport) -> Result<()> {
        if !report.bad_blobs.is_empty() {
            let bad: Vec<String> = report.bad_blobs.iter().map(|(d, _)| d.clone()).collect();
            let dropped = self.meta.drop_blobs(bad.clone(), started).await?;
            report.unrepaired -= dropped.len();
            for d in &dropped {
                report.repairs.push(format!(
                    "dropped the row of bad blob {d}: it reads as absent and is uploaded again by \
                     the next push of an image that uses it"
                ));
            }
            for d in bad.iter().filter(|d| !dropped.contains(d)) {
                report.repairs.push(format!(
                    "left blob {d}: a push touched it while fsck ran (run fsck again)"
                ));
            }
        }
        if !report.orphans.is_empty() {
            let n = self
                .meta
                .adopt_objects(report.orphans.clone(), now())
                .await?;
            report.unrepaired -= report.orphans.len();
            report.repairs.push(format!(
                "recorded {n} orphan objects as unreferenced blobs: garbage collection frees \
                 them after its grace period"
            ));
        }
        for (id, _) in &report.broken_uploads {
            self.drop_upload(id).await?;
            report.unrepaired -= 1;
            report.repairs.push(format!(
                "ended upload session {id}: its client starts that blob again"
            ));
        }
        Ok(())
    }
}

/// The digest of a blob object's bytes, in the algorithm `digest` names.
async fn hash_blob(objects: &Arc<dyn ObjectStore>, digest: &str) -> Result<String> {
    let d: Digest = digest.parse()?;
    let mut h = d.algorithm().hasher();
    blob::hash_object(objects, &blob::blob_key(&d), &mut h).await?;
    Ok(h.finish().to_string())
}
