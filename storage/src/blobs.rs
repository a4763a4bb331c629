//! Blobs as repositories see them: size checks, reads, presigned URLs, unlinking, mounts.

use futures_util::StreamExt;
use object_store::path::Path;

use crate::blob::{self, ByteStream, blob_key};
use crate::error::{Error, Result};
use crate::meta::now;
use crate::names::{Digest, RepoName};
use crate::store::Store;

/// A blob being read.
pub struct BlobRead {
    /// Size of the whole blob.
    pub size: u64,
    /// The inclusive byte range being returned, when a range was asked for.
    pub range: Option<(u64, u64)>,
    /// The bytes (of the range, if any).
    pub body: ByteStream,
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRead")
            .field("size", &self.size)
            .field("range", &self.range)
            .finish()
    }
}

impl Store {
    /// The size of `digest` if repository `repo` may serve it.
    ///
    /// Telling a client that a blob exists is an acknowledgement: docker and skopeo skip the
    /// upload after a 200 and push a manifest naming it. When the blob is a garbage-collection
    /// candidate (unreferenced and queued for review), the read is recorded in the metadata
    /// before the answer goes out, so every collector — this process, `berth gc`, another
    /// replica — keeps it for the grace period (see [`crate::gc`]).
    pub async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let (name, d) = (repo.as_str(), digest.to_string());
        let t = now();
        let facts = self
            .meta
            .blob_in_repo(name, &d, t)
            .await?
            .ok_or_else(|| Error::BlobUnknown(d.clone()))?;
        if facts.candidate && !self.meta.protect_blob_read(name, &d, t).await? {
            // A collection got there first: the client uploads it again.
            return Err(Error::BlobUnknown(d));
        }
        Ok(facts.size)
    }

    /// Reads blob `digest` of `size` bytes; `range` is an inclusive byte range already checked
    /// against the size. The caller has checked with [`Store::stat_blob`] that the repository
    /// may serve it.
    pub async fn read_blob(
        &self,
        digest: &Digest,
        size: u64,
        range: Option<(u64, u64)>,
    ) -> Result<BlobRead> {
        let body = match (size, range) {
            (0, _) => futures_util::stream::empty().boxed(),
            _ => blob::read(&self.objects, &blob_key(digest), range).await?,
        };
        Ok(BlobRead { size, range, body })
    }

    /// A presigned URL from which a client may download blob `digest` directly, valid for
    /// `expires`; `None` when the backend cannot presign (local disk, memory).
    pub async fn blob_url(
        &self,
        digest: &Digest,
        expires: std::time::Duration,
    ) -> Result<Option<String>> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let key = blob_key(digest);
        let key = match &self.signer_prefix {
            Some(p) => Path::from(format!("{p}/{key}")),
            None => key,
        };
        let url = signer
            .signed_url(object_store::signer::Method::GET, &key, expires)
            .await?;
        Ok(Some(url.to_string()))
    }

    /// Unlinks `digest` from `repo`. The bytes stay until garbage collection finds them unused.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let d = digest.to_string();
        if !self.meta.unlink_blob(repo.as_str(), &d).await? {
            return Err(Error::BlobUnknown(d));
        }
        Ok(())
    }

    /// Links an existing blob into `repo`: from repository `from` when given (which must hold
    /// it), else from anywhere in the registry. Returns whether the blob was linked; a linked
    /// blob is protected from collection for the grace period (the client was told it is
    /// there).
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        self.meta
            .mount_blob(
                repo.as_str(),
                &digest.to_string(),
                from.map(RepoName::as_str),
                now(),
            )
            .await
    }

    /// Links blob `digest`, held anywhere in the registry, into cache repository `repo` when a
    /// manifest of `repo` names it: the cache shares bytes by digest, but only for content its
    /// upstream vouches for (so a cache never serves another repository's blob that its
    /// upstream does not have). Whether it is linked now.
    pub async fn link_cached_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.meta
            .link_cached_blob(repo.as_str(), &digest.to_string(), now())
            .await
    }
}
