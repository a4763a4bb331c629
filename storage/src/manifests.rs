//! Manifests and what lists them: push, fetch, delete, tags, the catalog, referrers.

use bytes::Bytes;
use tracing::info;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::meta::{Page, Referrer, Refs, now};
use crate::names::{Digest, Reference, RepoName, Tag};
use crate::store::Store;

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

/// A manifest as stored.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    /// Its digest.
    pub digest: Digest,
    /// The media type it was pushed with.
    pub media_type: String,
    /// The exact pushed bytes.
    pub bytes: Bytes,
}

/// What a manifest push did.
#[derive(Debug, Clone)]
pub struct PutManifest {
    /// Digest of the stored manifest.
    pub digest: Digest,
    /// Its subject, if it has one.
    pub subject: Option<Digest>,
    /// Tags now pointing at it (from this push).
    pub tags: Vec<Tag>,
}

impl Store {
    /// Stores a manifest pushed to `reference` (a tag, or the digest it must hash to) with
    /// `content_type`, and points `reference` (if a tag) and `extra_tags` at it.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        extra_tags: &[Tag],
    ) -> Result<PutManifest> {
        self.put_manifest_lent(repo, reference, content_type, bytes, extra_tags, None)
            .await
    }

    /// [`Store::put_manifest`], where blobs the manifest names that `repo` does not link but
    /// `lender` does are linked into `repo` first (a mount from `lender`, in the same
    /// transaction).
    pub async fn put_manifest_lent(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        extra_tags: &[Tag],
        lender: Option<&RepoName>,
    ) -> Result<PutManifest> {
        let refs = match lender {
            Some(l) => Refs::CheckOrBorrow(l.to_string()),
            None => Refs::Check,
        };
        self.store_manifest(repo, reference, content_type, bytes, extra_tags, refs)
            .await
    }

    /// Stores a manifest fetched from an upstream registry into a cache repository. Unlike a
    /// push, the blobs and children it names need not be here yet: the cache fetches them when
    /// a client asks. The digest is still checked against `reference`.
    pub async fn put_cached_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<PutManifest> {
        self.store_manifest(repo, reference, content_type, bytes, &[], Refs::Trust)
            .await
    }

    /// Stores a blob fetched from an upstream registry into `repo`: streamed, hashed and
    /// verified against `digest` like an upload; nothing is kept on a mismatch. When the store
    /// [fills in place](Self::fills_in_place), `watch.landed` hears of the bytes as they land
    /// in the file, so that clients can be sent them from there while the fetch runs;
    /// `watch.verified` hears that they matched, as soon as that is known.
    pub async fn put_cached_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: crate::ByteStream,
        watch: crate::blob::FillWatch,
    ) -> Result<u64> {
        self.put_blob_once(repo, digest, body, watch).await
    }

    /// Whether [`put_cached_blob`](Self::put_cached_blob) writes a local file a tap can read
    /// while it grows (a filesystem store), rather than parts of an object in an object store.
    pub fn fills_in_place(&self) -> bool {
        self.area.in_place()
    }

    /// What routing a read of a plain name needs to know, in one query: whether anything was
    /// ever put in `repo` here (an upload started, a blob, a manifest: a push in progress
    /// counts, before its manifest arrives), and whether repository `twin` holds a manifest.
    pub async fn route_facts(&self, repo: &RepoName, twin: &RepoName) -> Result<(bool, bool)> {
        self.meta.route_facts(repo.as_str(), twin.as_str()).await
    }

    async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        extra_tags: &[Tag],
        refs: Refs,
    ) -> Result<PutManifest> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(Error::ManifestTooLarge {
                size: bytes.len(),
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let digest = match reference {
            Reference::Digest(d) => {
                let computed = Digest::of(d.algorithm(), &bytes);
                if &computed != d {
                    return Err(Error::DigestMismatch {
                        expected: d.to_string(),
                        computed: computed.to_string(),
                    });
                }
                computed
            }
            Reference::Tag(_) => Digest::sha256(&bytes),
        };
        let manifest = Manifest::parse(bytes, content_type, digest.clone())?;
        let mut tags: Vec<Tag> = extra_tags.to_vec();
        if let Reference::Tag(t) = reference
            && !tags.contains(t)
        {
            tags.insert(0, t.clone());
        }
        self.meta
            .put_manifest(repo.as_str(), &manifest, &tags, &refs, now())
            .await?;
        info!(repo = %repo, digest = %digest, tags = tags.len(), "manifest stored");
        Ok(PutManifest {
            digest,
            subject: manifest.subject,
            tags,
        })
    }

    /// Fetches a manifest by tag or digest.
    ///
    /// A manifest read by digest that garbage collection could delete (untagged, listed by no
    /// index, and queued for review) is recorded as read before it is returned, like a blob in
    /// [`Store::stat_blob`]: a client that hears it exists may push an index naming it next.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest> {
        let t = now();
        let row = self
            .meta
            .manifest(repo.as_str(), reference, t)
            .await?
            .ok_or_else(|| Error::ManifestUnknown(reference.to_string()))?;
        if row.candidate
            && !self
                .meta
                .protect_manifest_read(repo.as_str(), &row.digest, t)
                .await?
        {
            return Err(Error::ManifestUnknown(reference.to_string()));
        }
        Ok(StoredManifest {
            digest: row.digest.parse()?,
            media_type: row.media_type,
            bytes: Bytes::from(row.content),
        })
    }

    /// Deletes a tag (only the tag) or a manifest by digest (with every tag pointing at it).
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        self.meta.delete_manifest(repo.as_str(), reference).await?;
        info!(repo = %repo, reference = %reference, "manifest deleted");
        Ok(())
    }

    /// Tags of `repo` in byte order, strictly after `last`, at most `n`.
    pub async fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Page> {
        self.meta.tags(repo.as_str(), last, n).await
    }

    /// Repositories holding at least one manifest, in byte order, strictly after `last`.
    pub async fn catalog(&self, last: Option<&str>, n: usize) -> Result<Page> {
        self.meta.repos("", last, n).await
    }

    /// Manifests in `repo` whose subject is `subject`, optionally only of `artifact_type`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        self.meta
            .referrers(repo.as_str(), &subject.to_string(), artifact_type)
            .await
    }
}
