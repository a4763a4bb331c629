//! Upload areas: where an upload session's bytes wait until they are verified and placed.
//!
//! - [`UploadArea::File`] (local disk): the session is one file, `uploads/<id>.data`, that
//!   chunks are written into in place (one writer per session; bytes past the committed size,
//!   left by a write that was never committed, are cut off); it becomes the blob by a hard
//!   link. Single-node: a chunk must reach the node that holds the file.
//! - [`UploadArea::Objects`] (object stores, memory): each committed chunk is an object of its
//!   own, `uploads/<id>.<offset>-<nonce>`, listed in the metadata; several are concatenated at
//!   the end. Any replica may take any chunk.
//!
//! Either way the metadata records each committed chunk, so a session survives a restart.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tracing::warn;

use crate::blob::{self, ByteStream};
use crate::error::Result;
use crate::names::{Digest, Hasher};
use crate::s3::S3Native;

/// Where upload sessions keep their bytes.
#[derive(Debug, Clone)]
pub(crate) enum UploadArea {
    /// One file per session under this directory (local disk).
    File(PathBuf),
    /// One object per committed chunk.
    Objects,
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl UploadArea {
    /// Whether two chunks of one session must be written one at a time (in place).
    pub(crate) fn in_place(&self) -> bool {
        matches!(self, Self::File(_))
    }

    /// Writes a chunk of session `id` starting at `offset`, feeding `hasher`; its key and its
    /// length. A `tap` hears of the bytes as they land in the file (in place only; an object
    /// store's parts cannot be read while they are written).
    pub(crate) async fn write_chunk(
        &self,
        objects: &Arc<dyn ObjectStore>,
        id: &str,
        offset: u64,
        body: ByteStream,
        hasher: Option<&mut Hasher>,
        tap: Option<blob::Tap>,
    ) -> (Path, Result<u64>) {
        match self {
            Self::File(root) => {
                let key = blob::upload_part_key(id, "data");
                let n = blob::append_file(root, &key, offset, body, hasher, tap).await;
                (key, n)
            }
            Self::Objects => {
                let key = blob::upload_part_key(id, &format!("{offset:020}-{}", nonce()));
                let n = blob::write_stream(objects, &key, body, hasher).await;
                (key, n)
            }
        }
    }

    /// Undoes a chunk that will not be committed: its own object, or (in place) the bytes
    /// past the committed size.
    pub(crate) async fn discard_chunk(
        &self,
        objects: &Arc<dyn ObjectStore>,
        key: &Path,
        committed: u64,
    ) {
        match self {
            Self::File(root) if committed > 0 => {
                if let Err(e) = blob::truncate_file(root, key, committed) {
                    warn!(key = %key, error = %e, "cutting back an upload failed");
                }
            }
            _ => delete_quietly(objects, key).await,
        }
    }

    /// The session's bytes as one object, ready to be verified and placed: the file (cut to
    /// the committed `size`), the single chunk, or the chunks concatenated into a new object
    /// (fed to `hasher` on the way, when given). `None` for an empty session; `true` with it
    /// when `hasher` saw the bytes.
    pub(crate) async fn assemble(
        &self,
        objects: &Arc<dyn ObjectStore>,
        id: &str,
        size: u64,
        parts: &[String],
        hasher: Option<&mut Hasher>,
    ) -> Result<(Option<Path>, bool)> {
        match parts {
            [] => Ok((None, false)),
            [first, rest @ ..] if rest.iter().all(|p| p == first) => {
                let key = Path::from(first.as_str());
                if let Self::File(root) = self {
                    blob::truncate_file(root, &key, size)?;
                }
                Ok((Some(key), false))
            }
            many => {
                let assembled = blob::upload_part_key(id, &format!("assembled-{}", nonce()));
                let keys: Vec<Path> = many.iter().map(|p| Path::from(p.as_str())).collect();
                let source = objects.clone();
                let chunks = futures_util::stream::iter(keys)
                    .then(move |k| {
                        let objects = source.clone();
                        async move {
                            blob::read(&objects, &k, None)
                                .await
                                .map_err(std::io::Error::other)
                        }
                    })
                    .try_flatten()
                    .boxed();
                let hashed = hasher.is_some();
                self.write_object(objects, &assembled, chunks, hasher)
                    .await?;
                Ok((Some(assembled), hashed))
            }
        }
    }

    /// Streams `body` into a new object at `key`, feeding `hasher`: straight to a file on local
    /// disk, as a multipart upload on object stores.
    pub(crate) async fn write_object(
        &self,
        objects: &Arc<dyn ObjectStore>,
        key: &Path,
        body: ByteStream,
        hasher: Option<&mut Hasher>,
    ) -> Result<u64> {
        match self {
            Self::File(root) => blob::write_file(root, key, body, hasher).await,
            Self::Objects => blob::write_stream(objects, key, body, hasher).await,
        }
    }
}

/// Puts verified bytes at blob `digest`'s key: a copy of `source` (`size` bytes; a hard link
/// on local disk, a server-side copy on object stores, in parts on S3 past its single-copy
/// limit), or the empty object. Overwriting an existing blob is harmless: same digest, same
/// bytes. With `sync` (the local root, when writes must reach the disk) the blob's file and
/// its name are on the disk before this returns, so before any row makes the blob visible.
pub(crate) async fn place(
    objects: &Arc<dyn ObjectStore>,
    s3: Option<&S3Native>,
    sync: Option<&std::path::Path>,
    source: Option<&Path>,
    digest: &Digest,
    size: u64,
) -> Result<()> {
    let key = blob::blob_key(digest);
    match (source, s3) {
        (None, _) => blob::put_empty(objects, &key).await?,
        (Some(src), Some(s3)) if size > s3.max_copy() => {
            s3.copy_in_parts(src, &key, size).await?;
        }
        (Some(src), _) => objects.copy(src, &key).await?,
    }
    match sync {
        Some(root) => blob::sync_local(root, &key).await,
        None => Ok(()),
    }
}

/// Deletes `key`, logging (not returning) failures: a leftover is only disk space, and garbage
/// collection's sweep of `uploads/` finds it.
pub(crate) async fn delete_quietly(objects: &Arc<dyn ObjectStore>, key: &Path) {
    match objects.delete(key).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => warn!(key = %key, error = %e, "deleting object failed"),
    }
}
