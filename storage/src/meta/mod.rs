//! The metadata seam: everything the registry knows besides blob bytes, behind one trait per
//! concern, so that a second database can sit beside SQLite.
//!
//! The metadata is the source of truth for what exists: repositories, tags, manifests and
//! their references, which blobs each repository may serve, upload sessions, garbage
//! collection's review queues, leases. Each statement lives in exactly one backend method;
//! the [`Store`](crate::Store) composes them with the object store and keeps the
//! consistency rules (an object is written before the row that makes it visible, a row is
//! deleted before its object).
//!
//! | trait | concern |
//! |---|---|
//! | [`BlobMeta`] | which repository links which blob; read protection |
//! | [`UploadMeta`] | upload sessions and their committed chunks |
//! | [`ManifestMeta`] | manifests, tags, listings, referrers, pull times |
//! | [`GcMeta`] | garbage collection's mark and sweep, its record, cache eviction |
//! | [`LeaseMeta`] | one holder at a time for cluster-wide work |
//! | [`ClusterMeta`] | what else the processes sharing the metadata agree on |
//! | [`FsckMeta`] | what `berth fsck` reads, and the repairs it may make |
//!
//! Backends: [`sqlite`] (one file, one writer: the zero-configuration default) and
//! [`postgres`] (one database under any number of replicas). Every backend passes the storage
//! suite (`suite.rs`, feature `suite`).
//!
//! Times are unix seconds passed in by the caller (`now`, `t`), so that a backend never reads
//! its own clock for a decision; the review queues' triggers stamp with the database's clock.

pub mod migrate;
pub mod policy;
pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeSet, HashSet};

use futures_util::future::BoxFuture;

use crate::error::Result;
use crate::manifest::Manifest;
use crate::names::{Digest, Reference, Tag};
use policy::{EvictPolicy, EvictReport, GcPolicy, GcReport, GcRun};

/// A metadata call's future.
pub type Fut<'a, T> = BoxFuture<'a, Result<T>>;

/// Deletes blob objects during a sweep: the digests in, how many objects were deleted out.
pub type DeleteObjects = dyn Fn(Vec<Digest>) -> BoxFuture<'static, Result<u64>> + Send + Sync;

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A blob as a repository sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobFacts {
    /// Its size.
    pub size: u64,
    /// Whether it is a collection candidate (queued for review, unreferenced) whose
    /// protection was not refreshed this second: a read must record itself first.
    pub candidate: bool,
}

/// A manifest as stored, with what a read must know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRow {
    /// Its digest.
    pub digest: String,
    /// The media type it was pushed with.
    pub media_type: String,
    /// The exact pushed bytes.
    pub content: Vec<u8>,
    /// Whether the untagged or orphan-referrer policies could delete it and its protection
    /// was not refreshed this second (a read by digest must record itself first).
    pub candidate: bool,
}

/// How a manifest's references are checked when it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refs {
    /// Every required blob and child must be in the repository (a push).
    Check,
    /// Likewise, but blobs the named repository links are linked in (a push to a name whose
    /// cache twin holds them).
    CheckOrBorrow(String),
    /// Not checked (a manifest from an upstream, whose content the cache fetches lazily).
    Trust,
}

/// A page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The entries.
    pub items: Vec<String>,
    /// Whether entries remain after the last one.
    pub more: bool,
}

impl Page {
    /// The first `n` of `items` (which may hold one more, to tell whether more remain).
    pub fn of(mut items: Vec<String>, n: usize) -> Self {
        let more = items.len() > n;
        items.truncate(n);
        Self { items, more }
    }
}

/// A tag with its manifest, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRow {
    /// The tag.
    pub tag: String,
    /// The manifest it points at.
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
    /// The manifest's exact bytes (small: what a page reads sizes and platforms from).
    pub content: Vec<u8>,
    /// When the tag was last pushed (unix seconds).
    pub pushed: i64,
    /// When the manifest was last pulled from this repository, if ever.
    pub last_pulled: Option<i64>,
}

/// One entry of a referrers list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Referrer {
    /// The referrer's digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its artifact type (explicit, or the config media type of an image manifest).
    pub artifact_type: Option<String>,
    /// Its top-level annotations as a JSON object, if any.
    pub annotations: Option<String>,
}

/// What one sweep batch freed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Blobs freed (their objects deleted).
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of them, those an earlier, interrupted run had marked.
    pub resumed: u64,
    /// Objects the object store deleted.
    pub objects: u64,
}

/// Which repository links which blob.
pub trait BlobMeta {
    /// Blob `digest` as repository `repo` sees it; `None` when `repo` does not link it.
    /// `now` decides whether it is a candidate whose read must be recorded.
    fn blob_in_repo(&self, repo: &str, digest: &str, now: i64) -> Fut<'_, Option<BlobFacts>>;

    /// Records at `t` that a client was told `repo` has blob `digest` (a HEAD or GET), so
    /// collection keeps it for the grace period; `false` when `repo` no longer links it.
    fn protect_blob_read(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool>;

    /// Unlinks `digest` from `repo`; `false` when it was not linked.
    fn unlink_blob(&self, repo: &str, digest: &str) -> Fut<'_, bool>;

    /// Links `digest` into `repo` (created if new) from `from` (which must link it), or from
    /// anywhere when `from` is `None`; protects it from `t`. Whether it was linked.
    fn mount_blob(&self, repo: &str, digest: &str, from: Option<&str>, t: i64) -> Fut<'_, bool>;

    /// Links `digest`, held anywhere, into cache repository `repo` when a manifest of `repo`
    /// names it. Whether it is linked now.
    fn link_cached_blob(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool>;
}

/// Upload sessions and their committed chunks.
pub trait UploadMeta {
    /// Opens session `id` in `repo` (creating the repository).
    fn start_upload(&self, repo: &str, id: &str, t: i64) -> Fut<'_, ()>;

    /// The committed size of session `id` of `repo`; `None` when there is no such session.
    fn upload_size(&self, repo: &str, id: &str) -> Fut<'_, Option<u64>>;

    /// Commits a chunk of `len` bytes at offset `at`, stored at `key`: only when the session
    /// still ends at `at` (`false` otherwise: another chunk moved it, or it ended).
    fn commit_chunk(
        &self,
        repo: &str,
        id: &str,
        at: u64,
        len: u64,
        key: &str,
        t: i64,
    ) -> Fut<'_, bool>;

    /// The committed size and the chunk keys, in order; `None` when there is no such session.
    fn upload_parts(&self, repo: &str, id: &str) -> Fut<'_, Option<(u64, Vec<String>)>>;

    /// Records blob `digest` of `size` bytes (if new) before its object is placed: unlinked, so
    /// no client sees it (reads, mounts and cache links all require a blob linked somewhere), and queued for review, so that a crash between placing the object
    /// and [`UploadMeta::commit_blob`] leaves garbage collection a row to free it by, instead
    /// of an object nothing knows.
    fn reserve_blob(&self, digest: &str, size: u64, t: i64) -> Fut<'_, ()>;

    /// Ends session `id` with blob `digest` of `size` bytes: the blob row (if new), the link
    /// into `repo`, its protection from `t`, the session gone, in one transaction.
    fn commit_blob(&self, repo: &str, id: &str, digest: &str, size: u64, t: i64) -> Fut<'_, ()>;

    /// Ends session `id` without a blob; the keys of its chunks.
    fn end_upload(&self, id: &str) -> Fut<'_, Vec<String>>;

    /// How many sessions are open.
    fn count_uploads(&self) -> Fut<'_, u64>;

    /// Sessions untouched since `cutoff`.
    fn uploads_untouched_since(&self, cutoff: i64) -> Fut<'_, Vec<String>>;

    /// Which of `ids` are open sessions.
    fn live_uploads(&self, ids: Vec<String>) -> Fut<'_, HashSet<String>>;
}

/// Manifests, tags, listings, referrers and pull times.
pub trait ManifestMeta {
    /// Stores manifest `m` in `repo` (created if new) and points `tags` at it, checking its
    /// references as `refs` says: [`crate::Error::ManifestBlobUnknown`] names what is missing.
    /// A manifest pushed again is protected from the untagged policy from `t`.
    fn put_manifest<'a>(
        &'a self,
        repo: &'a str,
        m: &'a Manifest,
        tags: &'a [Tag],
        refs: &'a Refs,
        t: i64,
    ) -> Fut<'a, ()>;

    /// A manifest of `repo` by tag or digest; `now` decides whether a read by digest must be
    /// recorded (see [`ManifestRow::candidate`]).
    fn manifest<'a>(
        &'a self,
        repo: &'a str,
        reference: &'a Reference,
        now: i64,
    ) -> Fut<'a, Option<ManifestRow>>;

    /// Records at `t` that a client read manifest `digest` of `repo`; `false` when it is gone.
    fn protect_manifest_read(&self, repo: &str, digest: &str, t: i64) -> Fut<'_, bool>;

    /// Deletes a tag (only the tag) or a manifest by digest (with its tags):
    /// [`crate::Error::NameUnknown`] or [`crate::Error::ManifestUnknown`] when absent.
    fn delete_manifest<'a>(&'a self, repo: &'a str, reference: &'a Reference) -> Fut<'a, ()>;

    /// Tags of `repo` in byte order after `last`, at most `n`
    /// ([`crate::Error::NameUnknown`] for an unknown repository).
    fn tags<'a>(&'a self, repo: &'a str, last: Option<&'a str>, n: usize) -> Fut<'a, Page>;

    /// Repositories holding a manifest whose names contain `needle` (plain text, not a
    /// pattern; empty: all of them, the catalog), in byte order after `last`, at most `n`.
    fn repos<'a>(&'a self, needle: &'a str, last: Option<&'a str>, n: usize) -> Fut<'a, Page>;

    /// Tags of `repo` after `last` in byte order, at most `n`, with their manifests
    /// ([`crate::Error::NameUnknown`] for an unknown repository). Reading them records no pull.
    fn tag_rows<'a>(
        &'a self,
        repo: &'a str,
        last: Option<&'a str>,
        n: usize,
    ) -> Fut<'a, Vec<TagRow>>;

    /// How many tags `repo` has (0 for an unknown repository).
    fn count_tags<'a>(&'a self, repo: &'a str) -> Fut<'a, u64>;

    /// Manifests of `repo` whose subject is `subject`, optionally of one artifact type.
    fn referrers<'a>(
        &'a self,
        repo: &'a str,
        subject: &'a str,
        artifact_type: Option<&'a str>,
    ) -> Fut<'a, Vec<Referrer>>;

    /// Whether anything was ever put in `repo`, and whether `twin` holds a manifest.
    fn route_facts(&self, repo: &str, twin: &str) -> Fut<'_, (bool, bool)>;

    /// Writes pull times: (repository, manifest digest, unix time) each; rows touched.
    fn record_pulls(&self, pulls: Vec<(String, String, i64)>) -> Fut<'_, usize>;
}

/// Garbage collection's data, and cache eviction.
pub trait GcMeta {
    /// The mark phase as of `t`: removes the rows of what `policy` collects, records the
    /// blobs in the pending list under `run`; rolled back when `dry_run`.
    fn mark<'a>(
        &'a self,
        policy: &'a GcPolicy,
        t: i64,
        run: &'a str,
        dry_run: bool,
    ) -> Fut<'a, GcReport>;

    /// Blobs marked and not swept that nothing brought back: (count, bytes).
    fn pending_garbage(&self) -> Fut<'_, (u64, u64)>;

    /// One sweep batch of at most `limit` pending blobs: deletes the objects of those nothing
    /// brought back (through `delete`), serialised with blob commits so that none commits a
    /// row for a digest meanwhile, then forgets the batch. `true` when more may remain.
    fn sweep_batch<'a>(
        &'a self,
        run: &'a str,
        limit: usize,
        delete: std::sync::Arc<DeleteObjects>,
    ) -> Fut<'a, (Swept, bool)>;

    /// Records a finished collection (the newest few are kept).
    fn record_gc_run<'a>(&'a self, run: &'a GcRun) -> Fut<'a, ()>;

    /// The newest finished collection.
    fn last_gc_run(&self) -> Fut<'_, Option<GcRun>>;

    /// Every blob some manifest references.
    fn referenced_blobs(&self) -> Fut<'_, BTreeSet<String>>;

    /// Evicts cached images per `policy` as of `now`, least recently pulled first.
    fn evict<'a>(&'a self, policy: &'a EvictPolicy, now: i64) -> Fut<'a, EvictReport>;
}

/// Leases: one holder at a time.
pub trait LeaseMeta {
    /// Takes lease `name` for `me` until `until` when it is free, lapsed (before `now`), ours,
    /// or held by `steal_from`; otherwise the current holder and when its lease lapses.
    fn take_lease<'a>(
        &'a self,
        name: &'a str,
        me: &'a str,
        until: i64,
        now: i64,
        steal_from: Option<&'a str>,
    ) -> Fut<'a, Option<(String, i64)>>;

    /// Extends `me`'s lease `name` to `until`; `false` when `me` no longer holds it.
    fn renew_lease(&self, name: &str, me: &str, until: i64) -> Fut<'_, bool>;

    /// Drops `me`'s lease `name`, if held.
    fn release_lease(&self, name: &str, me: &str) -> Fut<'_, ()>;
}

/// What else the processes sharing the metadata (the server, command-line runs, replicas)
/// agree on.
pub trait ClusterMeta {
    /// When `key` (a cached tag, a subject's referrers) was last confirmed upstream, by any
    /// process, in unix milliseconds.
    fn confirmed_at(&self, key: &str) -> Fut<'_, Option<i64>>;

    /// Records that `key` was confirmed upstream at `t` (unix milliseconds; a later time never
    /// goes back).
    fn confirm(&self, key: &str, t: i64) -> Fut<'_, ()>;

    /// The secret replicas authenticate each other's relays with: the stored one, or
    /// `candidate` when none was stored yet.
    fn shared_secret(&self, candidate: &str) -> Fut<'_, String>;
}

/// A manifest reference that does not resolve in its repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dangling {
    /// The repository.
    pub repo: String,
    /// The manifest holding the reference.
    pub manifest: String,
    /// What it names.
    pub child: String,
    /// `blob` or `manifest`.
    pub kind: String,
}

/// A manifest in a repository, with the tags pointing at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The repository.
    pub repo: String,
    /// The manifest's digest.
    pub digest: String,
    /// Its tags.
    pub tags: Vec<String>,
}

/// An upload session as recorded: committed size and the recorded chunks (key, size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// The session id.
    pub id: String,
    /// Committed bytes.
    pub size: u64,
    /// Its chunks' objects and sizes (one key repeated for a file written in place).
    pub parts: Vec<(String, u64)>,
}

/// What `berth fsck` reads, and the repairs it may make.
pub trait FsckMeta {
    /// Blob rows (digest, size, visible) after `after` in digest order, at most `n`; visible
    /// when some repository links the blob and no collection has marked it (an unlinked row
    /// is a commit in progress or garbage, and may lack its object).
    fn blob_rows<'a>(
        &'a self,
        after: Option<&'a str>,
        n: usize,
    ) -> Fut<'a, Vec<(String, u64, bool)>>;

    /// Whether a blob row exists.
    fn has_blob<'a>(&'a self, digest: &'a str) -> Fut<'a, bool>;

    /// Whether a collection marked the blob garbage and has not swept its object yet (it was
    /// stopped between the two; the next run frees it).
    fn awaits_sweep<'a>(&'a self, digest: &'a str) -> Fut<'a, bool>;

    /// Manifest references whose target the repository does not hold (at most `limit`).
    fn dangling_references(&self, limit: usize) -> Fut<'_, Vec<Dangling>>;

    /// Manifests that name any of `digests` as a blob.
    fn manifests_using(&self, digests: Vec<String>) -> Fut<'_, Vec<ImageRef>>;

    /// Repair: drops the rows of blobs whose objects are gone or wrong, with every repository
    /// link; returns the digests dropped. Their manifests stay (a re-push of the image uploads
    /// the blob again: clients HEAD it first and now hear 404). A blob uploaded, mounted, linked
    /// or read at or after `untouched_since` is left alone: a push may be placing it again.
    fn drop_blobs(&self, digests: Vec<String>, untouched_since: i64) -> Fut<'_, Vec<String>>;

    /// Repair: records blob objects that have no row as unreferenced blobs (digest, size)
    /// created at `t`, so that garbage collection frees them after its grace period, under the
    /// same protocol as any other blob; returns how many were recorded.
    fn adopt_objects(&self, objects: Vec<(String, u64)>, t: i64) -> Fut<'_, u64>;

    /// Every upload session.
    fn upload_records(&self) -> Fut<'_, Vec<UploadRecord>>;
}

/// A metadata backend: every concern, plus health.
pub trait Metadata:
    BlobMeta
    + UploadMeta
    + ManifestMeta
    + GcMeta
    + LeaseMeta
    + ClusterMeta
    + FsckMeta
    + std::fmt::Debug
    + Send
    + Sync
{
    /// The backend's name, for logs.
    fn backend(&self) -> &'static str;

    /// Checks that the database answers (readiness probes).
    fn ping(&self) -> Fut<'_, ()>;

    /// Tests only: moves every timestamp `secs` into the past, as if that much time passed.
    #[doc(hidden)]
    fn age_for_tests(&self, secs: i64) -> Fut<'_, ()>;
}
