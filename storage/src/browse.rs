//! What a person browsing the registry reads: repositories found by part of their name, tags
//! with their manifests, and a manifest or a small blob looked at without counting as a pull
//! and without protecting it from garbage collection (a page view is not a client's use).

use futures_util::TryStreamExt as _;

use crate::StoredManifest;
use crate::error::{Error, Result};
use crate::meta::{Page, TagRow, now};
use crate::names::{Digest, Reference, RepoName};
use crate::store::Store;

impl Store {
    /// Repositories holding a manifest whose names contain `needle` (plain text), after
    /// `last`, at most `n`.
    pub async fn find_repos(&self, needle: &str, last: Option<&str>, n: usize) -> Result<Page> {
        self.meta.repos(needle, last, n).await
    }

    /// Tags of `repo` after `last`, at most `n`, with their manifests.
    pub async fn tag_rows(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> Result<Vec<TagRow>> {
        self.meta.tag_rows(repo.as_str(), last, n).await
    }

    /// How many tags `repo` has.
    pub async fn count_tags(&self, repo: &RepoName) -> Result<u64> {
        self.meta.count_tags(repo.as_str()).await
    }

    /// Manifest `reference` of `repo`, as stored; records no pull.
    pub async fn peek_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest> {
        let row = self
            .meta
            .manifest(repo.as_str(), reference, now())
            .await?
            .ok_or_else(|| Error::ManifestUnknown(reference.to_string()))?;
        Ok(StoredManifest {
            digest: row.digest.parse()?,
            media_type: row.media_type,
            bytes: bytes::Bytes::from(row.content),
        })
    }

    /// The bytes of blob `digest` of `repo` when the repository holds it and it is at most
    /// `max` bytes (an image config); `None` otherwise.
    pub async fn peek_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<Vec<u8>>> {
        let Some(facts) = self
            .meta
            .blob_in_repo(repo.as_str(), &digest.to_string(), now())
            .await?
        else {
            return Ok(None);
        };
        if facts.size > max {
            return Ok(None);
        }
        let read = self.read_blob(digest, facts.size, None).await?;
        let chunks: Vec<bytes::Bytes> = read.body.try_collect().await?;
        Ok(Some(chunks.concat()))
    }
}
