//! [`Store`]: the registry operations, each keeping blob objects and metadata consistent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use rusqlite::{OptionalExtension, params};
use tracing::{debug, info, warn};

use crate::backend::StorageConfig;
use crate::blob::{self, ByteStream, blob_key};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::meta::{Db, ensure_repo, now, repo_id};
use crate::names::{Algorithm, Digest, Hasher, Reference, RepoName, Tag};

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_SIZE: usize = 4 * 1024 * 1024;

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

/// One entry of a referrers list.
#[derive(Debug, Clone)]
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

/// A page of a sorted listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The entries.
    pub items: Vec<String>,
    /// Whether entries remain after the last one.
    pub more: bool,
}

/// The registry's storage: blob objects plus metadata.
pub struct Store {
    pub(crate) objects: Arc<dyn ObjectStore>,
    pub(crate) db: Db,
    /// Running SHA-256 state of uploads whose chunks passed through this process, keyed by
    /// session id, with the offset it has hashed up to. Only an optimisation: without it the
    /// chunks are re-read when the upload finishes.
    hashers: Mutex<HashMap<String, (u64, Hasher)>>,
    /// On local disk, chunks of a session are appended to one file: one writer per session.
    appending: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pull times not yet written: reads never wait on a database write (see
    /// [`Store::flush_access`]).
    pub(crate) pulls: Mutex<crate::maintenance::PendingPulls>,
    /// Presigns direct download URLs on object stores that can.
    signer: Option<Arc<dyn object_store::signer::Signer>>,
    signer_prefix: Option<Path>,
    /// Local disk root, for writing uploads straight to files.
    local_root: Option<std::path::PathBuf>,
    /// This process as a lease holder (see `lease`).
    pub(crate) instance: String,
    /// Collections in this process run one at a time (the lease keeps other processes out).
    pub(crate) gc_turn: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("objects", &self.objects.to_string())
            .field("db", &self.db)
            .finish()
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Store {
    /// Opens storage as configured, creating what is missing.
    pub async fn open(config: &StorageConfig) -> Result<Self> {
        let backend = config.backend()?;
        if !matches!(config.blobs, crate::backend::BlobBackend::Memory) {
            check_writable(&backend.objects).await.map_err(|e| {
                Error::Internal(format!(
                    "{} storage is not usable: {e}",
                    config.blobs.name()
                ))
            })?;
        }
        if let Some(parent) = config.database.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let path = config.database.clone();
        let db = tokio::task::spawn_blocking(move || Db::open(&path))
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        let mut store = Self::new(backend.objects, db);
        store.signer = backend.signer;
        store.signer_prefix = backend.signer_prefix;
        store.local_root = backend.local_root;
        Ok(store)
    }

    /// A store over an existing object store and database.
    pub fn new(objects: Arc<dyn ObjectStore>, db: Db) -> Self {
        Self {
            objects,
            db,
            hashers: Mutex::new(HashMap::new()),
            appending: Mutex::new(HashMap::new()),
            pulls: Mutex::new(Default::default()),
            signer: None,
            signer_prefix: None,
            local_root: None,
            instance: crate::lease::instance_id(),
            gc_turn: tokio::sync::Mutex::new(()),
        }
    }

    /// The metadata database (for jobs such as GC).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Checks that metadata and object store both answer.
    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await?;
        match self
            .objects
            .head(&Path::from("berth-readiness-probe"))
            .await
        {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    // ---------------------------------------------------------------- blobs

    /// The size of `digest` if repository `repo` may serve it.
    ///
    /// Telling a client that a blob exists is an acknowledgement: docker and skopeo skip the
    /// upload after a 200 and push a manifest naming it. When the blob is a garbage-collection
    /// candidate (unreferenced and queued for review), the read is recorded in the database
    /// before the answer goes out, so every collector — this process, `berth gc`, another
    /// replica — keeps it for the grace period (see [`crate::gc`]).
    pub async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let (name, d) = (repo.to_string(), digest.to_string());
        let t = now();
        let (size, candidate) = self
            .db
            .read(move |c| {
                c.query_row(
                    "SELECT b.size,
                            CASE WHEN q.queued_at < ?3 THEN NOT EXISTS (SELECT 1 FROM manifest_refs m
                                 WHERE m.child_digest = rb.digest AND m.kind = 'blob') ELSE 0 END
                     FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                     JOIN blobs b ON b.digest = rb.digest
                     LEFT JOIN blob_review q ON q.digest = rb.digest
                     WHERE r.name = ?1 AND rb.digest = ?2",
                    params![name, d, t],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, bool>(1)?)),
                )
                .optional()?
                .ok_or(Error::BlobUnknown(d))
            })
            .await?;
        if candidate {
            let (name, d) = (repo.to_string(), digest.to_string());
            self.db
                .write(move |tx| {
                    // Serialised with GC's mark: either it removed the blob first (404, and the
                    // client uploads it), or it will see this read.
                    if !crate::gc::protect_blob_in(tx, &name, &d, t)? {
                        return Err(Error::BlobUnknown(d));
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(size)
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
        let (name, d) = (repo.to_string(), digest.to_string());
        self.db
            .write(move |tx| {
                let n = tx.execute(
                    "DELETE FROM repo_blobs WHERE digest = ?2
                     AND repo_id = (SELECT id FROM repos WHERE name = ?1)",
                    params![name, d],
                )?;
                if n == 0 {
                    return Err(Error::BlobUnknown(d));
                }
                Ok(())
            })
            .await
    }

    /// Links an existing blob into `repo`: from repository `from` when given (which must hold
    /// it), else from anywhere in the registry. Returns whether the blob was linked.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        let (name, d, from) = (
            repo.to_string(),
            digest.to_string(),
            from.map(|f| f.to_string()),
        );
        self.db
            .write(move |tx| {
                let found = match &from {
                    Some(f) => tx
                        .query_row(
                            "SELECT 1 FROM repo_blobs rb JOIN repos r ON r.id = rb.repo_id
                             WHERE r.name = ?1 AND rb.digest = ?2",
                            params![f, d],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some(),
                    None => tx
                        .query_row("SELECT 1 FROM blobs WHERE digest = ?1", [&d], |_| Ok(()))
                        .optional()?
                        .is_some(),
                };
                if !found {
                    return Ok(false);
                }
                let id = ensure_repo(tx, &name)?;
                link_blob(tx, id, &d)?;
                Ok(true)
            })
            .await
    }

    /// Links blob `digest`, held anywhere in the registry, into cache repository `repo` when a
    /// manifest of `repo` names it: the cache shares bytes by digest, but only for content its
    /// upstream vouches for (so a cache never serves another repository's blob that its
    /// upstream does not have). Whether it is linked now.
    pub async fn link_cached_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        let (name, d) = (repo.to_string(), digest.to_string());
        self.db
            .write(move |tx| {
                let Some(rid) = repo_id(tx, &name)? else {
                    return Ok(false);
                };
                let ok: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = ?2)
                        AND EXISTS (SELECT 1 FROM manifest_refs WHERE repo_id = ?1
                                    AND child_digest = ?2 AND kind = 'blob')",
                    params![rid, d],
                    |r| r.get(0),
                )?;
                if ok {
                    link_blob(tx, rid, &d)?;
                }
                Ok(ok)
            })
            .await
    }

    // ---------------------------------------------------------------- uploads

    /// Opens an upload session in `repo` (creating the repository).
    pub async fn start_upload(&self, repo: &RepoName) -> Result<UploadStatus> {
        let name = repo.to_string();
        let id = new_id();
        let sid = id.clone();
        self.db
            .write(move |tx| {
                let rid = ensure_repo(tx, &name)?;
                let t = now();
                tx.execute(
                    "INSERT INTO uploads (id, repo_id, size, created_at, updated_at)
                     VALUES (?1, ?2, 0, ?3, ?3)",
                    params![sid, rid, t],
                )?;
                Ok(())
            })
            .await?;
        debug!(repo = %repo, upload = %id, "upload started");
        Ok(UploadStatus { id, size: 0 })
    }

    /// The committed size of upload `id` in `repo`.
    pub async fn upload_status(&self, repo: &RepoName, id: &str) -> Result<UploadStatus> {
        let (name, id) = (repo.to_string(), id.to_owned());
        self.db
            .read(move |c| {
                let size = upload_size(c, &name, &id)?;
                Ok(UploadStatus { id, size })
            })
            .await
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
        let Chunk {
            body,
            start,
            len: expected_len,
        } = chunk;
        // On local disk the session is one file written in place: chunks of one session are
        // written one at a time (a second writer waits, then finds the range moved).
        let session_lock = self.local_root.as_ref().map(|_| {
            let mut m = self.appending.lock().unwrap_or_else(|e| e.into_inner());
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
        let (key, written) = match &self.local_root {
            Some(root) => {
                let key = blob::upload_part_key(id, "data");
                let w = blob::append_file(root, &key, current, body, hasher.as_mut()).await;
                (key, w)
            }
            None => {
                let key = blob::upload_part_key(id, &format!("{current:020}-{}", new_id()));
                let w = self.write_object(&key, body, hasher.as_mut()).await;
                (key, w)
            }
        };
        let n = match written {
            Ok(n) => n,
            Err(e) => return Err(e),
        };
        if let Some(want) = expected_len
            && want != n
        {
            self.discard_chunk(&key, current).await;
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
        let (name, sid, k) = (repo.to_string(), id.to_owned(), key.to_string());
        let committed = self
            .db
            .write(move |tx| {
                let rows = tx.execute(
                    "UPDATE uploads SET size = size + ?1, updated_at = ?2
                     WHERE id = ?3 AND size = ?4
                       AND repo_id = (SELECT id FROM repos WHERE name = ?5)",
                    params![n as i64, now(), sid, current as i64, name],
                )?;
                if rows == 0 {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO upload_parts (upload_id, offset, size, key) VALUES (?1, ?2, ?3, ?4)",
                    params![sid, current as i64, n as i64, k],
                )?;
                Ok(true)
            })
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
                self.discard_chunk(&key, current).await;
                let now_at = self.upload_status(repo, id).await?.size;
                Err(Error::RangeInvalid {
                    expected: now_at,
                    got: current,
                })
            }
            Err(e) => {
                self.discard_chunk(&key, current).await;
                Err(e)
            }
        }
    }

    /// Undoes a chunk that will not be committed: its own object, or (appended in place on
    /// local disk) the bytes past the committed size.
    async fn discard_chunk(&self, key: &Path, committed: u64) {
        match &self.local_root {
            Some(root) if blob::upload_of(key).is_some() && key.as_ref().ends_with(".data") => {
                if committed == 0 {
                    self.delete_quietly(key).await;
                } else if let Err(e) = blob::truncate_file(root, key, committed) {
                    warn!(key = %key, error = %e, "cutting back an upload failed");
                }
            }
            _ => self.delete_quietly(key).await,
        }
    }

    /// Finishes upload `id`: appends `body` (if any), verifies the whole content against
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
        let (name, sid) = (repo.to_string(), id.to_owned());
        let (size, parts) = self
            .db
            .read(move |c| {
                let size = upload_size(c, &name, &sid)?;
                let mut st =
                    c.prepare("SELECT key FROM upload_parts WHERE upload_id = ?1 ORDER BY offset")?;
                let parts = st
                    .query_map([&sid], |r| r.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((size, parts))
            })
            .await?;
        let source = match self.commit_blob(id, digest, size, &parts).await {
            Ok(source) => source,
            Err(e) => {
                info!(repo = %repo, upload = %id, error = %e, "upload rejected");
                // A failed commit ends the session, as clients restart from a new POST.
                self.drop_upload(id).await?;
                return Err(e);
            }
        };
        let (name, sid, d) = (repo.to_string(), id.to_owned(), digest.to_string());
        self.db
            .write(move |tx| {
                let rid = ensure_repo(tx, &name)?;
                let t = now();
                tx.execute(
                    "INSERT INTO blobs (digest, size, created_at, last_access) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT (digest) DO NOTHING",
                    params![d, size as i64, t],
                )?;
                link_blob(tx, rid, &d)?;
                tx.execute("DELETE FROM uploads WHERE id = ?1", [&sid])?;
                Ok(())
            })
            .await?;
        // Garbage collection may have swept an identical, unreferenced blob between placing the
        // object and the row above; the row now protects it, so put the bytes back if needed.
        let key = blob_key(digest);
        match self.objects.head(&key).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                warn!(digest = %digest, "blob swept while committing; placing it again");
                self.place(source.as_ref(), &key).await?;
            }
            Err(e) => return Err(e.into()),
        }
        let mut leftovers: Vec<Path> = parts.iter().map(|p| Path::from(p.as_str())).collect();
        leftovers.extend(source.filter(|s| !leftovers.contains(s)));
        self.forget_upload_objects(id, leftovers).await;
        info!(repo = %repo, digest = %digest, size, "blob committed");
        Ok(size)
    }

    /// Cancels upload `id` in `repo`.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        self.upload_status(repo, id).await?;
        self.drop_upload(id).await
    }

    /// Verifies the session's bytes against `digest` and copies them to the blob's key; returns
    /// the object they were copied from (kept until the session ends).
    async fn commit_blob(
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
        let key = blob_key(digest);
        let source = match parts {
            [] => None,
            // One object; appended in place on local disk, possibly with an uncommitted tail.
            [first, rest @ ..] if rest.iter().all(|p| p == first) => {
                let key = Path::from(first.as_str());
                if let Some(root) = &self.local_root {
                    blob::truncate_file(root, &key, size)?;
                }
                Some(key)
            }
            many => {
                // Concatenate the chunks into one object, hashing on the way if needed.
                let assembled = blob::upload_part_key(id, &format!("assembled-{}", new_id()));
                let mut hasher = computed.is_none().then(|| digest.algorithm().hasher());
                let objects = self.objects.clone();
                let keys: Vec<Path> = many.iter().map(|p| Path::from(p.as_str())).collect();
                let chunks = futures_util::stream::iter(keys)
                    .then(move |k| {
                        let objects = objects.clone();
                        async move {
                            blob::read(&objects, &k, None)
                                .await
                                .map_err(std::io::Error::other)
                        }
                    })
                    .try_flatten()
                    .boxed();
                self.write_object(&assembled, chunks, hasher.as_mut())
                    .await?;
                if let Some(h) = hasher {
                    computed = Some(h.finish());
                }
                Some(assembled)
            }
        };
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
            if let (Some(src), [_, _, ..]) = (&source, parts) {
                self.delete_quietly(src).await;
            }
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                computed: computed.to_string(),
            });
        }
        self.place(source.as_ref(), &key).await?;
        debug!(size, digest = %digest, "blob object in place");
        Ok(source)
    }

    /// Streams `body` into a new object at `key`, feeding `hasher`: straight to a file on local
    /// disk, as a multipart upload on object stores.
    async fn write_object(
        &self,
        key: &Path,
        body: ByteStream,
        hasher: Option<&mut Hasher>,
    ) -> Result<u64> {
        match &self.local_root {
            Some(root) => blob::write_file(root, key, body, hasher).await,
            None => blob::write_stream(&self.objects, key, body, hasher).await,
        }
    }

    /// Puts verified bytes at a blob key: a copy of `source` (a hard link on local disk, a
    /// server-side copy on object stores), or the empty object. Overwriting an existing blob is
    /// harmless: same digest, same bytes.
    async fn place(&self, source: Option<&Path>, key: &Path) -> Result<()> {
        match source {
            None => blob::put_empty(&self.objects, key).await,
            Some(src) => Ok(self.objects.copy(src, key).await?),
        }
    }

    pub(crate) async fn drop_upload(&self, id: &str) -> Result<()> {
        let sid = id.to_owned();
        let parts = self
            .db
            .write(move |tx| {
                let parts = {
                    let mut st = tx.prepare("SELECT key FROM upload_parts WHERE upload_id = ?1")?;
                    st.query_map([&sid], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                };
                tx.execute("DELETE FROM uploads WHERE id = ?1", [&sid])?;
                Ok(parts)
            })
            .await?;
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
        if let Ok(mut m) = self.appending.lock() {
            m.remove(id);
        }
        keys.dedup();
        for key in keys {
            self.delete_quietly(&key).await;
        }
    }

    pub(crate) async fn delete_quietly(&self, key: &Path) {
        match self.objects.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => warn!(key = %key, error = %e, "deleting object failed"),
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

    // ---------------------------------------------------------------- manifests

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
    /// verified against `digest` like an upload; nothing is kept on a mismatch.
    pub async fn put_cached_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<u64> {
        let s = self.start_upload(repo).await?;
        self.finish_upload(repo, &s.id, digest, Some(Chunk::new(body)))
            .await
    }

    /// What routing a read of a plain name needs to know, in one query: whether anything was
    /// ever put in `repo` here (an upload started, a blob, a manifest: a push in progress
    /// counts, before its manifest arrives), and whether repository `twin` holds a manifest.
    pub async fn route_facts(&self, repo: &RepoName, twin: &RepoName) -> Result<(bool, bool)> {
        let (name, twin) = (repo.to_string(), twin.to_string());
        self.db
            .read(move |c| {
                Ok(c.query_row(
                    "SELECT EXISTS (SELECT 1 FROM repos WHERE name = ?1),
                            EXISTS (SELECT 1 FROM manifests m JOIN repos r ON r.id = m.repo_id
                                    WHERE r.name = ?2)",
                    params![name, twin],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?)
            })
            .await
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
        let name = repo.to_string();
        let out = PutManifest {
            digest: digest.clone(),
            subject: manifest.subject.clone(),
            tags: tags.clone(),
        };
        self.db
            .write(move |tx| {
                let rid = ensure_repo(tx, &name)?;
                let lender = match &refs {
                    Refs::CheckOrBorrow(l) => repo_id(tx, l)?,
                    _ => None,
                };
                let mut missing = Vec::new();
                for r in manifest
                    .references
                    .iter()
                    .filter(|r| r.required && refs != Refs::Trust)
                {
                    let d = r.digest.to_string();
                    let sql = match r.kind {
                        crate::manifest::RefKind::Blob => {
                            "SELECT 1 FROM repo_blobs WHERE repo_id = ?1 AND digest = ?2"
                        }
                        crate::manifest::RefKind::Manifest => {
                            "SELECT 1 FROM manifests WHERE repo_id = ?1 AND digest = ?2"
                        }
                    };
                    let has = |id: i64| -> Result<bool> {
                        Ok(tx
                            .query_row(sql, params![id, d], |_| Ok(()))
                            .optional()?
                            .is_some())
                    };
                    if has(rid)? {
                        continue;
                    }
                    match lender {
                        Some(l) if r.kind == crate::manifest::RefKind::Blob && has(l)? => {
                            link_blob(tx, rid, &d)?;
                        }
                        _ => missing.push(d),
                    }
                }
                if !missing.is_empty() {
                    return Err(Error::ManifestBlobUnknown(missing));
                }
                let d = manifest.digest.to_string();
                let t = now();
                tx.execute(
                    "INSERT INTO manifest_bodies (digest, content, created_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (digest) DO NOTHING",
                    params![d, manifest.bytes.as_ref(), t],
                )?;
                let inserted = tx.execute(
                    "INSERT INTO manifests (repo_id, digest, media_type, size, subject,
                        artifact_type, annotations, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (repo_id, digest) DO NOTHING",
                    params![
                        rid,
                        d,
                        manifest.media_type,
                        manifest.bytes.len() as i64,
                        manifest.subject.as_ref().map(|s| s.to_string()),
                        manifest.artifact_type,
                        manifest.annotations,
                        t
                    ],
                )?;
                if inserted == 0 {
                    // Pushed again (buildx re-pushes platform manifests before their index).
                    crate::gc::protect_manifest(tx, rid, &d, t)?;
                } else {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO manifest_refs (repo_id, manifest_digest, child_digest, kind)
                         VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    )?;
                    for r in &manifest.references {
                        st.execute(params![rid, d, r.digest.to_string(), r.kind.as_str()])?;
                    }
                }
                let mut st = tx.prepare_cached(
                    "INSERT INTO tags (repo_id, name, digest, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (repo_id, name) DO UPDATE SET digest = excluded.digest,
                        updated_at = excluded.updated_at",
                )?;
                for tag in &tags {
                    st.execute(params![rid, tag.as_str(), d, t])?;
                }
                Ok(())
            })
            .await?;
        info!(repo = %repo, digest = %out.digest, tags = out.tags.len(), "manifest stored");
        Ok(out)
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
        let name = repo.to_string();
        let reference = reference.clone();
        let t = now();
        let (m, candidate) = self
            .db
            .read(move |c| {
                let row = match &reference {
                    Reference::Tag(tag) => c
                        .query_row(
                            "SELECT m.digest, m.media_type, b.content, 0 FROM tags t
                             JOIN repos r ON r.id = t.repo_id
                             JOIN manifests m ON m.repo_id = t.repo_id AND m.digest = t.digest
                             JOIN manifest_bodies b ON b.digest = m.digest
                             WHERE r.name = ?1 AND t.name = ?2",
                            params![name, tag.as_str()],
                            manifest_row,
                        )
                        .optional()?,
                    Reference::Digest(d) => c
                        .query_row(
                            "SELECT m.digest, m.media_type, b.content,
                                CASE WHEN q.queued_at < ?3 THEN NOT (
                                    EXISTS (SELECT 1 FROM tags g WHERE g.repo_id = m.repo_id
                                            AND g.digest = m.digest)
                                    OR EXISTS (SELECT 1 FROM manifest_refs x
                                            WHERE x.repo_id = m.repo_id AND x.child_digest = m.digest
                                            AND x.kind = 'manifest')) ELSE 0 END
                             FROM manifests m
                             JOIN repos r ON r.id = m.repo_id
                             JOIN manifest_bodies b ON b.digest = m.digest
                             LEFT JOIN manifest_review q ON q.repo_id = m.repo_id
                                  AND q.digest = m.digest
                             WHERE r.name = ?1 AND m.digest = ?2",
                            params![name, d.to_string(), t],
                            manifest_row,
                        )
                        .optional()?,
                };
                let (digest, media_type, content, candidate) =
                    row.ok_or_else(|| Error::ManifestUnknown(reference.to_string()))?;
                Ok((
                    StoredManifest {
                        digest: digest.parse()?,
                        media_type,
                        bytes: Bytes::from(content),
                    },
                    candidate,
                ))
            })
            .await?;
        if candidate {
            let (name, d) = (repo.to_string(), m.digest.to_string());
            self.db
                .write(move |tx| {
                    let rid = repo_id(tx, &name)?;
                    let kept = match rid {
                        Some(rid) => crate::gc::protect_manifest(tx, rid, &d, t)?,
                        None => false,
                    };
                    if !kept {
                        return Err(Error::ManifestUnknown(d));
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(m)
    }

    /// Deletes a tag (only the tag) or a manifest by digest (with every tag pointing at it).
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        let name = repo.to_string();
        let r = reference.clone();
        self.db
            .write(move |tx| {
                let reference = r;
                let rid = repo_id(tx, &name)?.ok_or_else(|| Error::NameUnknown(name.clone()))?;
                let n = match &reference {
                    Reference::Tag(t) => tx.execute(
                        "DELETE FROM tags WHERE repo_id = ?1 AND name = ?2",
                        params![rid, t.as_str()],
                    )?,
                    Reference::Digest(d) => tx.execute(
                        "DELETE FROM manifests WHERE repo_id = ?1 AND digest = ?2",
                        params![rid, d.to_string()],
                    )?,
                };
                if n == 0 {
                    return Err(Error::ManifestUnknown(reference.to_string()));
                }
                Ok(())
            })
            .await?;
        info!(repo = %repo, reference = %reference, "manifest deleted");
        Ok(())
    }

    /// Tags of `repo` in byte order, strictly after `last`, at most `n`.
    pub async fn list_tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> Result<Page> {
        let (name, last) = (repo.to_string(), last.unwrap_or("").to_owned());
        self.db
            .read(move |c| {
                let rid = repo_id(c, &name)?.ok_or_else(|| Error::NameUnknown(name.clone()))?;
                let mut st = c.prepare_cached(
                    "SELECT name FROM tags WHERE repo_id = ?1 AND name > ?2 ORDER BY name LIMIT ?3",
                )?;
                let items = st
                    .query_map(params![rid, last, (n as i64).saturating_add(1)], |r| {
                        r.get(0)
                    })?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(page(items, n))
            })
            .await
    }

    /// Repositories holding at least one manifest, in byte order, strictly after `last`.
    pub async fn catalog(&self, last: Option<&str>, n: usize) -> Result<Page> {
        let last = last.unwrap_or("").to_owned();
        self.db
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT name FROM repos r WHERE name > ?1
                     AND EXISTS (SELECT 1 FROM manifests m WHERE m.repo_id = r.id)
                     ORDER BY name LIMIT ?2",
                )?;
                let items = st
                    .query_map(params![last, (n as i64).saturating_add(1)], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<String>>>()?;
                Ok(page(items, n))
            })
            .await
    }

    /// Manifests in `repo` whose subject is `subject`, optionally only of `artifact_type`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>> {
        let (name, s, at) = (
            repo.to_string(),
            subject.to_string(),
            artifact_type.map(str::to_owned),
        );
        self.db
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT m.digest, m.media_type, m.size, m.artifact_type, m.annotations
                     FROM manifests m JOIN repos r ON r.id = m.repo_id
                     WHERE r.name = ?1 AND m.subject = ?2
                       AND (?3 IS NULL OR m.artifact_type = ?3)
                     ORDER BY m.created_at, m.digest",
                )?;
                let rows = st
                    .query_map(params![name, s, at], |r| {
                        Ok(Referrer {
                            digest: r.get(0)?,
                            media_type: r.get(1)?,
                            size: r.get::<_, i64>(2)? as u64,
                            artifact_type: r.get(3)?,
                            annotations: r.get(4)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await
    }
}

/// How a manifest's references are checked when it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refs {
    /// Every required blob and child must be in the repository (a push).
    Check,
    /// Likewise, but blobs found in the named repository are linked in (a push to a name whose
    /// cache twin holds them).
    CheckOrBorrow(String),
    /// Not checked (a manifest from an upstream, whose content the cache fetches lazily).
    Trust,
}

type ManifestRow = (String, String, Vec<u8>, bool);

fn manifest_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ManifestRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn page(mut items: Vec<String>, n: usize) -> Page {
    let more = items.len() > n;
    items.truncate(n);
    Page { items, more }
}

/// Links `digest` into a repository (an upload's commit or a mount): the client is told the blob
/// is there, so it is protected from garbage collection for the grace period even when the
/// link already existed (a re-push into a repository that still links a deleted image's blob).
fn link_blob(tx: &rusqlite::Transaction<'_>, repo_id: i64, digest: &str) -> Result<()> {
    let t = now();
    tx.execute(
        "INSERT INTO repo_blobs (repo_id, digest, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (repo_id, digest) DO UPDATE SET created_at = excluded.created_at",
        params![repo_id, digest, t],
    )?;
    crate::gc::protect_blob(tx, digest, t)?;
    Ok(())
}

fn upload_size(c: &rusqlite::Connection, repo: &str, id: &str) -> Result<u64> {
    c.query_row(
        "SELECT u.size FROM uploads u JOIN repos r ON r.id = u.repo_id
         WHERE u.id = ?1 AND r.name = ?2",
        params![id, repo],
        |r| r.get::<_, i64>(0),
    )
    .optional()?
    .map(|s| s as u64)
    .ok_or_else(|| Error::UploadUnknown(id.to_owned()))
}

/// Writes, reads back and deletes a probe object, so that a misconfigured bucket fails at
/// start-up rather than on the first push.
async fn check_writable(objects: &Arc<dyn ObjectStore>) -> Result<()> {
    let key = Path::from(format!("_berth/probe-{}", new_id()));
    objects
        .put(&key, bytes::Bytes::from_static(b"berth").into())
        .await?;
    objects.get(&key).await?.bytes().await?;
    objects.delete(&key).await?;
    Ok(())
}
