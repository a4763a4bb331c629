//! The registry façade: what handlers call to read and change the registry.
//!
//! It answers from local storage and, where upstreams are configured, from the pull-through
//! cache ([`crate::proxy`]), which answers the same calls: data in, data out (stored manifests,
//! blob sizes and byte streams, pages of tags). Handlers render every answer; nothing here
//! knows HTTP, and no layer calls back up.
//!
//! # Local or upstream: the one rule
//! Decided once per call, from the repository name as the client sent it, containerd's `?ns=`,
//! and what the call is:
//! 1. `?ns=<registry>` naming a configured upstream, or a name starting with an upstream's
//!    prefix (`docker.io/library/alpine`): that upstream's cache, read-only (writes get
//!    `UNSUPPORTED`). An `ns` naming no configured upstream is refused, never dialled.
//! 2. Every write (uploads, manifest pushes, deletes, mounts) is local.
//! 3. A plain name with a default upstream (Docker's `registry-mirrors`): local once anything
//!    was ever pushed to it here (an upload started, a blob, a tag). Otherwise
//!    - manifests, tag lists and referrers come from the upstream's cache;
//!    - a blob `GET` comes from the cache only when the cache holds a manifest of that name
//!      (a pull reads the manifest first); otherwise it is a push's, and local;
//!    - a blob `HEAD` is answered from what the cache holds of that name, never from the
//!      upstream: pulls fetch blobs with `GET`, pushes ask with `HEAD` whether to upload.
//!
//!    So nothing a push does reaches an upstream, a local push never depends on an upstream
//!    being up, and nothing is linked into a cache namespace on behalf of a local name. A
//!    manifest pushed to a plain name may name blobs that only its cache twin holds (the
//!    client's `HEAD` saw them there): they are linked into the local repository, as a mount
//!    from a repository the client can read under the same name.
//! 4. Without upstreams everything is local.

use std::sync::Arc;

use berth_storage::{
    BlobRead, Digest, Page, PutManifest, Reference, Referrer, RepoName, Store, StoredManifest, Tag,
    UploadStatus,
};

use crate::proxy::{BlobAnswer, CacheError, Proxy, Target};

/// Errors of the façade: the storage's, the cache's, and the routing rule's own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Local storage refused or failed.
    #[error(transparent)]
    Storage(#[from] berth_storage::Error),
    /// The cache could not answer.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A write to a cache of an upstream registry.
    #[error("{0} is a cache of an upstream registry and is read-only")]
    ReadOnly(String),
    /// `?ns=` names a registry that is not configured.
    #[error("no upstream registry {0:?} is configured here")]
    UnknownUpstream(String),
}

/// Shorthand for results of the façade.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A repository as the client addressed it: the name in the path, and containerd's `?ns=`.
#[derive(Debug, Clone, Copy)]
pub struct At<'a> {
    /// The repository name as sent.
    pub name: &'a str,
    /// The upstream registry the client means, if it said.
    pub ns: Option<&'a str>,
}

/// What a call does, for the routing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Write,
    Manifest,
    BlobHead,
    BlobGet,
    Listing,
}

/// Where a call goes.
enum Source {
    Local(RepoName),
    /// The cache of an upstream: fill from the upstream as needed.
    Cache(Target),
    /// What the cache holds of a name, without asking the upstream.
    CacheHeld(Target),
}

/// A blob about to be served.
pub enum Blob {
    /// In storage: serve (or redirect to) it like any stored blob.
    Stored {
        /// Its size.
        size: u64,
    },
    /// Known only from the upstream's answer to a `HEAD`.
    Upstream {
        /// Its size, when the upstream said.
        size: Option<u64>,
    },
    /// Streamed as it arrives from the upstream (and is stored).
    Streaming {
        /// Its size, when the upstream said.
        size: Option<u64>,
        /// The fetch, to read whole or a range of.
        body: crate::proxy::Follower,
    },
}

/// The façade.
#[derive(Debug, Clone)]
pub struct Registry {
    store: Arc<Store>,
    proxy: Option<Arc<Proxy>>,
}

impl Registry {
    /// A registry over `store`, with the cache `proxy` when upstreams are configured.
    pub fn new(store: Arc<Store>, proxy: Option<Arc<Proxy>>) -> Self {
        Self { store, proxy }
    }

    /// Local storage, for what is never routed (the catalog, health, background jobs).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The pull-through cache, when upstreams are configured.
    pub fn proxy(&self) -> Option<&Arc<Proxy>> {
        self.proxy.as_ref()
    }

    /// The routing rule (see the module docs).
    async fn source(&self, at: At<'_>, call: Call) -> Result<Source> {
        let local = || at.name.parse::<RepoName>().map(Source::Local);
        let Some(proxy) = &self.proxy else {
            return Ok(local()?);
        };
        if let Some(ns) = at.ns {
            let Some(u) = proxy.upstream_for_ns(ns) else {
                return Err(Error::UnknownUpstream(ns.to_owned()));
            };
            if call == Call::Write {
                return Err(Error::ReadOnly(at.name.to_owned()));
            }
            return Ok(Source::Cache(proxy.target(u, at.name)?));
        }
        if let Some((u, rest)) = proxy.upstream_for_prefix(at.name) {
            if call == Call::Write {
                return Err(Error::ReadOnly(at.name.to_owned()));
            }
            return Ok(Source::Cache(proxy.target(u, rest)?));
        }
        if call == Call::Write && proxy.is_cache_name(at.name) {
            return Err(Error::ReadOnly(at.name.to_owned()));
        }
        let repo: RepoName = at.name.parse()?;
        let Some(u) = proxy.default_upstream() else {
            return Ok(Source::Local(repo));
        };
        if call == Call::Write {
            return Ok(Source::Local(repo));
        }
        let twin = proxy.target(u, at.name)?;
        let (pushed_here, cached) = self.store.route_facts(&repo, &twin.local).await?;
        Ok(match call {
            _ if pushed_here => Source::Local(repo),
            Call::Manifest | Call::Listing => Source::Cache(twin),
            Call::BlobGet if cached => Source::Cache(twin),
            Call::BlobHead if cached => Source::CacheHeld(twin),
            _ => Source::Local(repo),
        })
    }

    fn local(&self, s: Source) -> Result<RepoName> {
        match s {
            Source::Local(r) => Ok(r),
            Source::Cache(t) | Source::CacheHeld(t) => Ok(t.local),
        }
    }

    async fn writable(&self, at: At<'_>) -> Result<RepoName> {
        let s = self.source(at, Call::Write).await?;
        self.local(s)
    }

    /// The cache twin of a plain local name (its repository under the default upstream's
    /// cache prefix), if a default upstream is configured.
    fn twin(&self, repo: &RepoName) -> Option<RepoName> {
        let proxy = self.proxy.as_ref()?;
        let u = proxy.default_upstream()?;
        proxy.target(u, repo.as_str()).ok().map(|t| t.local)
    }

    // ------------------------------------------------------------------ reads

    /// A manifest by tag or digest. The pull is recorded (in memory, written in batches) for
    /// eviction, against the repository that answered. `get` for a client's GET (a cache then
    /// reads the image's blobs ahead when it had to fetch the manifest).
    pub async fn manifest(
        &self,
        at: At<'_>,
        reference: &Reference,
        get: bool,
    ) -> Result<StoredManifest> {
        let s = self.source(at, Call::Manifest).await?;
        let (m, repo) = match (s, &self.proxy) {
            (Source::Cache(t), Some(p)) => {
                let m = p.manifest(&t, reference, get).await?;
                // Images by tag: a client then reads children and layers by digest.
                if let Reference::Tag(tag) = reference {
                    t.upstream.stats.pulled(&format!("{}:{tag}", t.local));
                }
                (m, t.local)
            }
            (s, _) => {
                let repo = self.local(s)?;
                (self.store.get_manifest(&repo, reference).await?, repo)
            }
        };
        self.store.record_manifest_pull(&repo, &m.digest);
        Ok(m)
    }

    /// A blob's size and where its bytes come from; `head` for a `HEAD`.
    pub async fn blob(&self, at: At<'_>, digest: &Digest, head: bool) -> Result<Blob> {
        let call = if head { Call::BlobHead } else { Call::BlobGet };
        match (self.source(at, call).await?, &self.proxy) {
            (Source::Cache(t), Some(p)) => Ok(match p.blob(&t, digest, head).await? {
                BlobAnswer::Local { size } => Blob::Stored { size },
                BlobAnswer::Head { size } => Blob::Upstream { size },
                BlobAnswer::Stream { size, body } => Blob::Streaming { size, body },
            }),
            (s, _) => {
                let repo = self.local(s)?;
                Ok(Blob::Stored {
                    size: self.store.stat_blob(&repo, digest).await?,
                })
            }
        }
    }

    /// The bytes of this replica's upstream fetch of `digest`, for the replica that asked
    /// (see [`crate::proxy`]'s cluster module); `None` when no fetch of it runs here or the
    /// proof is wrong.
    pub async fn relay(&self, digest: &Digest, proof: &str) -> Result<Option<Blob>> {
        let Some(p) = &self.proxy else {
            return Ok(None);
        };
        Ok(p.relay(digest, proof)
            .await?
            .map(|(size, body)| Blob::Streaming { size, body }))
    }

    /// Reads a stored blob of `size` bytes (whole, or the inclusive `range`).
    pub async fn read_blob(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<(u64, u64)>,
    ) -> Result<BlobRead> {
        Ok(self.store.read_blob(digest, size, range).await?)
    }

    /// A presigned URL for a stored blob, when the object store can make one.
    pub async fn blob_url(
        &self,
        digest: &Digest,
        expires: std::time::Duration,
    ) -> Result<Option<String>> {
        Ok(self.store.blob_url(digest, expires).await?)
    }

    /// A page of tags: from the upstream for cached repositories (the cached list when it
    /// fails), else local.
    pub async fn tags(&self, at: At<'_>, last: Option<&str>, n: usize) -> Result<Page> {
        match (self.source(at, Call::Listing).await?, &self.proxy) {
            (Source::Cache(t), Some(p)) => match p.tags(&t, last, n).await? {
                Some(page) => Ok(page),
                None => Ok(self.store.list_tags(&t.local, last, n).await?),
            },
            (s, _) => Ok(self.store.list_tags(&self.local(s)?, last, n).await?),
        }
    }

    /// Referrers of `subject`; for cached repositories, the upstream's are cached first.
    pub async fn referrers(
        &self,
        at: At<'_>,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let s = self.source(at, Call::Listing).await?;
        if let (Source::Cache(t), Some(p)) = (&s, &self.proxy) {
            p.cache_referrers(t, subject).await;
        }
        let repo = self.local(s)?;
        Ok(self.store.referrers(&repo, subject, artifact_type).await?)
    }

    /// Repositories holding at least one manifest (local and cached), in byte order.
    pub async fn catalog(&self, last: Option<&str>, n: usize) -> Result<Page> {
        Ok(self.store.catalog(last, n).await?)
    }

    // ------------------------------------------------------------------ writes

    /// Pushes a manifest. Blobs it names that the repository does not link but its cache twin
    /// does are linked first (see the module docs).
    pub async fn put_manifest(
        &self,
        at: At<'_>,
        reference: &Reference,
        content_type: &str,
        bytes: bytes::Bytes,
        extra_tags: &[Tag],
    ) -> Result<PutManifest> {
        let repo = self.writable(at).await?;
        let lender = self.twin(&repo);
        Ok(self
            .store
            .put_manifest_lent(
                &repo,
                reference,
                content_type,
                bytes,
                extra_tags,
                lender.as_ref(),
            )
            .await?)
    }

    /// Deletes a tag or a manifest.
    pub async fn delete_manifest(&self, at: At<'_>, reference: &Reference) -> Result<()> {
        let repo = self.writable(at).await?;
        Ok(self.store.delete_manifest(&repo, reference).await?)
    }

    /// Unlinks a blob from a repository.
    pub async fn delete_blob(&self, at: At<'_>, digest: &Digest) -> Result<()> {
        let repo = self.writable(at).await?;
        Ok(self.store.delete_blob(&repo, digest).await?)
    }

    /// Mounts `digest` into `at` from `from` (resolved by the same rule as a read of it, so a
    /// plain name served from the cache lends what the cache holds), or from anywhere when
    /// `from` is `None`. Never contacts an upstream. Whether the blob was mounted.
    pub async fn mount(&self, at: At<'_>, digest: &Digest, from: Option<At<'_>>) -> Result<bool> {
        let repo = self.writable(at).await?;
        let from = match from {
            Some(f) => {
                let s = self.source(f, Call::BlobGet).await?;
                Some(self.local(s)?)
            }
            None => None,
        };
        Ok(self.store.mount_blob(&repo, digest, from.as_ref()).await?)
    }

    /// Opens an upload session.
    pub async fn start_upload(&self, at: At<'_>) -> Result<UploadStatus> {
        let repo = self.writable(at).await?;
        Ok(self.store.start_upload(&repo).await?)
    }

    /// An upload session's committed size.
    pub async fn upload_status(&self, at: At<'_>, id: &str) -> Result<UploadStatus> {
        let repo = self.writable(at).await?;
        Ok(self.store.upload_status(&repo, id).await?)
    }

    /// Appends a chunk to an upload session.
    pub async fn append_upload(
        &self,
        at: At<'_>,
        id: &str,
        chunk: berth_storage::Chunk,
    ) -> Result<UploadStatus> {
        let repo = self.writable(at).await?;
        Ok(self.store.append_upload(&repo, id, chunk).await?)
    }

    /// Finishes an upload session (with a last chunk, if any).
    pub async fn finish_upload(
        &self,
        at: At<'_>,
        id: &str,
        digest: &Digest,
        last: Option<berth_storage::Chunk>,
    ) -> Result<u64> {
        let repo = self.writable(at).await?;
        Ok(self.store.finish_upload(&repo, id, digest, last).await?)
    }

    /// Cancels an upload session.
    pub async fn cancel_upload(&self, at: At<'_>, id: &str) -> Result<()> {
        let repo = self.writable(at).await?;
        Ok(self.store.cancel_upload(&repo, id).await?)
    }
}
