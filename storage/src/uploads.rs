//! Upload sessions: start, append chunks, finish (verify, place, make visible), cancel, expire.
//!
//! A session's bytes live in an upload area (`area.rs`); its committed size and chunk
//! list live in the metadata, so a session survives restarts (and, with object parts, may
//! continue on another replica). Bytes are hashed while they stream; a blob becomes visible
//! only once its digest matched, and its object is in place before its row.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::ObjectStoreExt;
use object_store::path::Path;
use tracing::{debug, info, warn};

use crate::area;
use crate::blob::{self, ByteStream, FillWatch};
use crate::error::{Error, Result};
use crate::meta::now;
use crate::names::{Algorithm, Digest, Hasher, RepoName};
use crate::store::{Store, new_id};

/// The state of an upload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadStatus {
    /// Session id.
    pub id: String,
    /// Bytes committed so far.
    pub size: u64,
}

/// A chunk of an upload: its bytes, and what the client declared about them.
pub struct Chunk {
    /// The bytes.
    pub body: ByteStream,
    /// Where the chunk must start (`Content-Range`); `None`: at the current end.
    pub start: Option<u64>,
    /// How many bytes it must have (`Content-Length`); `None`: whatever arrives.
    pub len: Option<u64>,
}

impl Chunk {
    /// A chunk appended at the current end, of any length.
    pub fn new(body: ByteStream) -> Self {
        Self {
            body,
            start: None,
            len: None,
        }
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl Store {
    /// Opens an upload session in `repo` (creating the repository).
    pub async fn start_upload(&self, repo: &RepoName) -> Result<UploadStatus> {
        let id = new_id();
        self.meta.start_upload(repo.as_str(), &id, now()).await?;
        debug!(repo = %repo, upload = %id, "upload started");
        Ok(UploadStatus { id, size: 0 })
    }

    /// The committed size of upload `id` in `repo`.
    pub async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadStatus> {
        let size = self
            .meta
            .upload_size(repo.as_str(), id)
            .await?
            .ok_or_else(|| Error::UploadUnknown(id.to_owned()))?;
        Ok(UploadStatus {
            id: id.to_owned(),
            size,
        })
    }

    /// Appends `chunk` to upload `id`. When it names a start, the chunk must begin at the
    /// current end of the upload; when it names a length, the body must have exactly that
    /// length.
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &str,
        chunk: Chunk,
    ) -> Result<UploadStatus> {
        let Chunk { body, start, len } = chunk;
        // An in-place area takes chunks of one session one at a time (a second writer waits,
        // then finds the range moved).
        let session_lock = self.area.in_place().then(|| {
            let mut m = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(id.to_owned()).or_default().clone()
        });
        let _guard = match &session_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        let current = self.upload_status(repo, id).await?.size;
        if let Some(s) = start
            && s != current
        {
            return Err(Error::RangeInvalid {
                expected: current,
                got: s,
            });
        }
        let mut hasher = self.take_hasher(id, current);
        let (key, written) = self
            .area
            .write_chunk(&self.objects, id, current, body, hasher.as_mut(), None)
            .await;
        let n = written?;
        if let Some(want) = len
            && want != n
        {
            self.area.discard_chunk(&self.objects, &key, current).await;
            return Err(Error::SizeInvalid(format!(
                "body has {n} bytes, {want} were declared"
            )));
        }
        if n == 0 {
            self.put_hasher(id, current, hasher);
            return Ok(UploadStatus {
                id: id.to_owned(),
                size: current,
            });
        }
        let committed = self
            .meta
            .commit_chunk(repo.as_str(), id, current, n, key.as_ref(), now())
            .await;
        match committed {
            Ok(true) => {
                self.put_hasher(id, current + n, hasher);
                Ok(UploadStatus {
                    id: id.to_owned(),
                    size: current + n,
                })
            }
            Ok(false) => {
                // Another request moved the session (or it was cancelled) while we wrote.
                self.area.discard_chunk(&self.objects, &key, current).await;
                let now_at = self.upload_status(repo, id).await?.size;
                Err(Error::RangeInvalid {
                    expected: now_at,
                    got: current,
                })
            }
            Err(e) => {
                self.area.discard_chunk(&self.objects, &key, current).await;
                Err(e)
            }
        }
    }

    /// Finishes upload `id`: appends `last` (if any), verifies the whole content against
    /// `digest`, and makes the blob visible in `repo`. On a digest mismatch the session is
    /// dropped and nothing becomes visible.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last: Option<Chunk>,
    ) -> Result<u64> {
        if let Some(chunk) = last {
            self.append_upload(repo, id, chunk).await?;
        }
        let (size, parts) = self
            .meta
            .upload_parts(repo.as_str(), id)
            .await?
            .ok_or_else(|| Error::UploadUnknown(id.to_owned()))?;
        let source = match self.commit_object(id, digest, size, &parts).await {
            Ok(source) => source,
            Err(e) => {
                info!(repo = %repo, upload = %id, error = %e, "upload rejected");
                // A failed commit ends the session, as clients restart from a new POST.
                self.drop_upload(id).await?;
                return Err(e);
            }
        };
        self.commit_placed(repo, id, digest, size, source.as_ref())
            .await?;
        let mut leftovers: Vec<Path> = parts.iter().map(|p| Path::from(p.as_str())).collect();
        leftovers.extend(source.filter(|s| !leftovers.contains(s)));
        self.forget_upload_objects(id, leftovers).await;
        info!(repo = %repo, digest = %digest, size, "blob committed");
        Ok(size)
    }

    /// Links the placed blob `digest` into `repo` (ending session `id`, if there is one).
    /// Garbage collection may have swept an identical, unreferenced blob between placing the
    /// object and this commit; the row now protects it, so the bytes are put back if needed.
    async fn commit_placed(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        size: u64,
        source: Option<&Path>,
    ) -> Result<()> {
        self.meta
            .commit_blob(repo.as_str(), id, &digest.to_string(), size, now())
            .await?;
        match self.objects.head(&blob::blob_key(digest)).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => {
                warn!(digest = %digest, "blob swept while committing; placing it again");
                self.place_blob(source, digest, size).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a blob from an upstream in one pass, without an upload session: nothing needs
    /// resuming (a failed fill is fetched again), so the bytes go to a temporary object while
    /// they are hashed, and two metadata writes (reserve, commit) make them visible, where a
    /// session takes five. The temporary object lives under `uploads/` with no session row: a
    /// crash leaves it to garbage collection's sweep of chunk objects no session owns.
    pub(crate) async fn put_blob_once(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
        watch: FillWatch,
    ) -> Result<u64> {
        let id = new_id();
        let FillWatch { landed, verified } = watch;
        // What the bytes hash to, set once they have all been hashed; a match is told at once.
        let computed: Arc<OnceLock<Digest>> = Arc::default();
        let conclude = {
            let (want, slot) = (digest.clone(), computed.clone());
            move |d: Digest| {
                if d == want
                    && let Some(verified) = verified
                {
                    verified();
                }
                let _ = slot.set(d);
            }
        };
        let mut hasher = digest.algorithm().hasher();
        let (key, written) = if self.area.in_place() {
            // Local disk hashes beside the writes; the last is hashed when the write returns.
            let (key, written) = self
                .area
                .write_chunk(&self.objects, &id, 0, body, Some(&mut hasher), landed)
                .await;
            if written.is_ok() {
                conclude(hasher.finish());
            }
            (key, written)
        } else {
            // An object store's write returns once its last part is sent and the upload is
            // complete; the hash is known earlier, when the body ends.
            let body = blob::hashed(body, hasher, conclude);
            self.area
                .write_chunk(&self.objects, &id, 0, body, None, None)
                .await
        };
        let outcome = async {
            let size = written?;
            let computed = computed
                .get()
                .cloned()
                .ok_or_else(|| Error::Body("the body ended without being hashed".into()))?;
            if &computed != digest {
                return Err(Error::DigestMismatch {
                    expected: digest.to_string(),
                    computed: computed.to_string(),
                });
            }
            let source = (size > 0).then_some(&key);
            self.reserve_and_place(digest, size, source).await?;
            self.commit_placed(repo, &id, digest, size, source).await?;
            Ok(size)
        }
        .await;
        self.delete_quietly(&key).await;
        match &outcome {
            Ok(size) => info!(repo = %repo, digest = %digest, size, "blob committed"),
            Err(e) => info!(repo = %repo, digest = %digest, error = %e, "blob rejected"),
        }
        outcome
    }

    /// Cancels upload `id` in `repo`.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        self.upload_status(repo, id).await?;
        self.drop_upload(id).await
    }

    /// How many upload sessions are open.
    pub async fn uploads_in_progress(&self) -> Result<u64> {
        self.meta.count_uploads().await
    }

    /// Drops upload sessions untouched for `max_age`, with their chunk objects; returns how
    /// many were dropped.
    pub async fn expire_uploads(&self, max_age: Duration) -> Result<usize> {
        let cutoff = now() - i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        self.expire_uploads_before(cutoff).await
    }

    /// Drops upload sessions last touched before `cutoff` (unix seconds).
    pub(crate) async fn expire_uploads_before(&self, cutoff: i64) -> Result<usize> {
        let stale = self.meta.uploads_untouched_since(cutoff).await?;
        for id in &stale {
            self.drop_upload(id).await?;
        }
        if !stale.is_empty() {
            info!(count = stale.len(), "expired stale upload sessions");
        }
        Ok(stale.len())
    }

    /// Verifies the session's bytes against `digest` and places them at the blob's key;
    /// returns the object they were placed from (kept until the session ends).
    async fn commit_object(
        &self,
        id: &str,
        digest: &Digest,
        size: u64,
        parts: &[String],
    ) -> Result<Option<Path>> {
        let mut computed = match (digest.algorithm(), self.take_hasher(id, size)) {
            (Algorithm::Sha256, Some(h)) => Some(h.finish()),
            _ => None,
        };
        // Chunks that are concatenated are hashed on the way when no running hash covers them.
        let mut hasher = computed.is_none().then(|| digest.algorithm().hasher());
        let (source, hashed) = self
            .area
            .assemble(&self.objects, id, size, parts, hasher.as_mut())
            .await?;
        if let (Some(h), true) = (hasher, hashed) {
            computed = Some(h.finish());
        }
        let computed = match computed {
            Some(c) => c,
            None => {
                let mut h = digest.algorithm().hasher();
                if let Some(src) = &source {
                    blob::hash_object(&self.objects, src, &mut h).await?;
                }
                h.finish()
            }
        };
        if &computed != digest {
            if let (Some(src), [_, _, ..]) = (&source, parts)
                && !self.area.in_place()
            {
                self.delete_quietly(src).await;
            }
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                computed: computed.to_string(),
            });
        }
        self.reserve_and_place(digest, size, source.as_ref())
            .await?;
        Ok(source)
    }

    /// Puts verified bytes (`source`; none for an empty blob) at blob `digest`'s key, after a
    /// row for it: unlinked and invisible, so that a crash before the commit leaves collection
    /// something to free the object by.
    async fn reserve_and_place(
        &self,
        digest: &Digest,
        size: u64,
        source: Option<&Path>,
    ) -> Result<()> {
        self.meta
            .reserve_blob(&digest.to_string(), size, now())
            .await?;
        self.place_blob(source, digest, size).await?;
        debug!(size, digest = %digest, "blob object in place");
        Ok(())
    }

    /// [`area::place`] with this store's object store, S3 requests and sync root.
    async fn place_blob(&self, source: Option<&Path>, digest: &Digest, size: u64) -> Result<()> {
        let (s3, sync) = (self.s3.as_deref(), self.sync_root.as_deref());
        area::place(&self.objects, s3, sync, source, digest, size).await
    }

    pub(crate) async fn drop_upload(&self, id: &str) -> Result<()> {
        let parts = self.meta.end_upload(id).await?;
        let keys = parts.iter().map(|p| Path::from(p.as_str())).collect();
        self.forget_upload_objects(id, keys).await;
        Ok(())
    }

    /// Removes an ended session's chunk objects (best effort: a leftover is only disk space,
    /// and garbage collection's sweep of `uploads/` finds it).
    async fn forget_upload_objects(&self, id: &str, mut keys: Vec<Path>) {
        if let Ok(mut m) = self.hashers.lock() {
            m.remove(id);
        }
        if let Ok(mut m) = self.writing.lock() {
            m.remove(id);
        }
        keys.dedup();
        for key in keys {
            self.delete_quietly(&key).await;
        }
    }

    fn take_hasher(&self, id: &str, offset: u64) -> Option<Hasher> {
        let mut m = self.hashers.lock().ok()?;
        match m.remove(id) {
            Some((at, h)) if at == offset => Some(h),
            _ if offset == 0 => Some(Algorithm::Sha256.hasher()),
            _ => None,
        }
    }

    fn put_hasher(&self, id: &str, offset: u64, hasher: Option<Hasher>) {
        if let (Some(h), Ok(mut m)) = (hasher, self.hashers.lock()) {
            m.insert(id.to_owned(), (offset, h));
        }
    }
}
