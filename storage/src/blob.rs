//! Blob bytes over `object_store`, content-addressed.
//!
//! # Key layout
//! ```text
//! blobs/<algorithm>/<first two hex>/<hex>     a verified blob; written once, never modified
//! uploads/<session-id>.<offset>-<nonce>       one committed chunk of an upload session
//! uploads/<session-id>.assembled-<nonce>      the chunks concatenated, while a session finishes
//! uploads/<session-id>.data                   local disk: the whole session, appended in place
//! ```
//! A blob object is written only after its digest was verified, and always before the metadata
//! row that makes it visible; it is removed only after the metadata says nothing needs it.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, WriteMultipart,
};

use crate::error::{Error, Result};
use crate::names::{Digest, Hasher};

/// A stream of bytes: request bodies going in, blob contents coming out.
pub type ByteStream = BoxStream<'static, std::io::Result<Bytes>>;

/// Size of the buffers handed to the object store while writing (also S3's minimum part size).
const WRITE_CHUNK: usize = 5 * 1024 * 1024;
/// Size of the reads from local files when serving blobs (a 1 GiB pull from the page cache
/// measured 1.8 GB/s with 256 KiB reads, 2.3 with 512 KiB, 2.4 with 1 MiB).
const READ_CHUNK: usize = 512 * 1024;
/// Reads of a served local file in flight while the piece before them is being sent.
const READS_AHEAD: usize = 2;
/// Parts being written while the next one fills: enough to overlap receiving, hashing and
/// writing, few enough to keep memory at a few parts per upload.
const WRITES_IN_FLIGHT: usize = 2;

/// The object key of a blob.
pub fn blob_key(digest: &Digest) -> Path {
    let hex = digest.hex();
    Path::from(format!(
        "blobs/{}/{}/{}",
        digest.algorithm().as_str(),
        &hex[..2],
        hex
    ))
}

/// Where upload chunks live: one flat directory, so that no per-session directory has to be
/// created and removed (which races on local disk).
pub const UPLOADS: &str = "uploads";

/// The key of a piece (`what`) of upload session `id`.
pub fn upload_part_key(id: &str, what: &str) -> Path {
    Path::from(format!("{UPLOADS}/{id}.{what}"))
}

/// The session id an upload object belongs to.
pub fn upload_of(key: &Path) -> Option<&str> {
    key.filename()?.split('.').next()
}

/// Writes `body` to `key` as a multipart upload, feeding `hasher` on the way; returns the byte
/// count. Creates no object when the body is empty. On error nothing is left at `key`.
pub(crate) async fn write_stream(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    mut body: ByteStream,
    mut hasher: Option<&mut Hasher>,
) -> Result<u64> {
    let mut writer: Option<WriteMultipart> = None;
    let mut n = 0u64;
    loop {
        let chunk = match body.next().await {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                if let Some(w) = writer {
                    let _ = w.abort().await;
                }
                return Err(Error::Body(e.to_string()));
            }
        };
        if chunk.is_empty() {
            continue;
        }
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&chunk);
        }
        n += chunk.len() as u64;
        let w = match writer.as_mut() {
            Some(w) => w,
            None => {
                let up = store.put_multipart(key).await?;
                writer.insert(WriteMultipart::new_with_chunk_size(up, WRITE_CHUNK))
            }
        };
        if let Err(e) = w.wait_for_capacity(WRITES_IN_FLIGHT).await {
            if let Some(w) = writer {
                let _ = w.abort().await;
            }
            return Err(e.into());
        }
        w.put(chunk);
    }
    if let Some(w) = writer {
        w.finish().await?;
    }
    Ok(n)
}

/// Bytes gathered before each write to a local file.
const FILE_BATCH: usize = 1024 * 1024;

/// Told of each new length of a local file while a body is written into it, with the file
/// (open for reading too), so that others can read the bytes as they land: the pull-through
/// cache's clients follow an upstream blob this way while the store takes it in. It is called
/// on the blocking thread that wrote the bytes, as soon as they are in the file.
pub type Tap = Arc<dyn Fn(&std::fs::File, u64) + Send + Sync>;

/// What those who read a cache fill while it is written are told (see
/// [`Store::put_cached_blob`](crate::Store::put_cached_blob)).
#[derive(Default)]
pub struct FillWatch {
    /// On a store that [fills in place](crate::Store::fills_in_place): each new length of the
    /// file the bytes land in.
    pub landed: Option<Tap>,
    /// Called once all the bytes are in and match their digest, before they are synced and
    /// committed; never called when they do not match. Readers that were given the bytes as
    /// they came can be given the end of them from then on.
    pub verified: Option<Box<dyn FnOnce() + Send>>,
}

/// `body` as it is, hashed by `hasher` on the way: when it ends (not when it fails), `at_end`
/// is given the digest of all of it.
pub(crate) fn hashed(
    body: ByteStream,
    hasher: Hasher,
    at_end: impl FnOnce(Digest) + Send + 'static,
) -> ByteStream {
    futures_util::stream::unfold(
        (body, Some((hasher, at_end))),
        |(mut body, mut end)| async move {
            match body.next().await {
                Some(Ok(c)) => {
                    if let Some((h, _)) = end.as_mut() {
                        h.update(&c);
                    }
                    Some((Ok(c), (body, end)))
                }
                // A failed body has no digest; the failure ends it.
                Some(Err(e)) => Some((Err(e), (body, None))),
                None => {
                    if let Some((h, at_end)) = end.take() {
                        at_end(h.finish());
                    }
                    None
                }
            }
        },
    )
    .boxed()
}

/// Local-disk fast path of [`write_stream`]: batches of the body's buffers are hashed and
/// written to a temporary file on a blocking thread, without copying, while the next batch is
/// received (two cores work: one on the socket, one on hashing and the file); the file is
/// renamed to `key` (under `root`) when complete. Creates nothing when the body is empty.
pub(crate) async fn write_file(
    root: &std::path::Path,
    key: &Path,
    body: ByteStream,
    hasher: Option<&mut Hasher>,
) -> Result<u64> {
    write_local(root, key, None, body, hasher, None).await
}

/// Local-disk upload sessions append in place: `body` is written into the file at `key` from
/// `offset` on (anything past `offset`, left by a write that was never committed, is cut off
/// first), so a chunked upload is one file and its commit a hard link, not a copy.
pub(crate) async fn append_file(
    root: &std::path::Path,
    key: &Path,
    offset: u64,
    body: ByteStream,
    hasher: Option<&mut Hasher>,
    tap: Option<Tap>,
) -> Result<u64> {
    write_local(root, key, Some(offset), body, hasher, tap).await
}

/// Cuts the local file at `key` to `size` bytes (dropping what no commit covers).
pub(crate) fn truncate_file(root: &std::path::Path, key: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(key.as_ref()))?;
    f.set_len(size)?;
    Ok(())
}

/// Batches at least this large are hashed on one blocking thread while another writes them;
/// smaller ones are hashed and written by one job (a second thread would cost more than it saves).
const HASH_APART: usize = 256 * 1024;

/// One blocking job over a batch: it writes the batch to the file, hashes it, or both, and hands
/// back what it was given of the two.
type Batch = tokio::task::JoinHandle<std::io::Result<(Option<Sink>, Option<Hasher>)>>;

/// Bytes written to a local file between two requests that the kernel start writing them back.
const WRITEBACK_STEP: u64 = 8 * 1024 * 1024;

/// The local file a body is written to, with where its end is and how much of it the kernel has
/// been asked to start writing back.
///
/// A blob is synced before its push is acknowledged. Left alone, the kernel would start writing
/// a large body back only when that sync comes (or when dirty pages pass the system's
/// threshold, gigabytes on a large machine), so the disk would sit idle while the body arrives
/// and the client would then wait for all of it to be written. Asking for write-back every
/// [`WRITEBACK_STEP`] bytes lets the disk work while the body is still arriving, and the final
/// sync finds little left. (The request is `posix_fadvise(DONTNEED)` on the range just written:
/// on Linux it starts write-back of the dirty pages there and drops none of them, since pages
/// under write-back are kept. `sync_file_range` would say it more plainly but has no safe
/// binding; this crate has no `unsafe`.)
struct Sink {
    file: std::fs::File,
    end: u64,
    kicked: u64,
}

impl Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        self.file.write_all(buf)?;
        self.end += buf.len() as u64;
        Ok(())
    }

    /// Asks the kernel to start writing back what was written since the last request, once
    /// that is `at_least` bytes or more. Only advice: a kernel that ignores it loses speed,
    /// not data (the sync before the acknowledgement stays), so its result is not an error.
    fn kick_writeback(&mut self, at_least: u64) {
        if let Some(len) = std::num::NonZeroU64::new(self.end - self.kicked) {
            if len.get() >= at_least {
                let _ = rustix::fs::fadvise(
                    &self.file,
                    self.kicked,
                    Some(len),
                    rustix::fs::Advice::DontNeed,
                );
                self.kicked = self.end;
            }
        }
    }
}

/// [`write_file`] (`append_at` = `None`: a new file, renamed into place when complete) and
/// [`append_file`] (`Some(offset)`: written into the file at `key` itself).
///
/// Three things run at once on a large body: the socket is read (on the runtime) into the next
/// batch while the previous batch is written by one blocking job and hashed by another. SHA-256
/// is the slowest of them, so it gets a thread to itself.
///
/// With a `tap`, a batch is also written before it is full: when the body has nothing more at
/// hand and no job runs (waiting, if jobs run, for whichever comes first: more of the body or
/// the jobs' end). The write job tells the tap of each batch once it is in the file. Readers
/// of a slow or stalled upstream get its bytes as they come; a fast one still fills batches.
async fn write_local(
    root: &std::path::Path,
    key: &Path,
    append_at: Option<u64>,
    mut body: ByteStream,
    hasher: Option<&mut Hasher>,
    tap: Option<Tap>,
) -> Result<u64> {
    let dest = root.join(key.as_ref());
    let tmp = match append_at {
        Some(_) => dest.clone(),
        None => dest.with_file_name(format!(
            "{}.tmp-{}",
            dest.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("upload"),
            uuid::Uuid::new_v4().simple()
        )),
    };
    // The file and the hasher travel with the jobs; each is handed back when its job ends.
    let mut file: Option<Sink> = None;
    let mut h: Option<Hasher> = hasher.as_ref().map(|h| (*h).clone());
    let mut pending: Vec<Batch> = Vec::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut n = 0u64;
    let mut peeked = None;
    let running = Arc::new(Running::default());
    let result: Result<()> = async {
        loop {
            // `None`: the jobs ahead of a waiting batch ended before more of the body came.
            let next = match peeked.take() {
                Some(next) => Some(next),
                None if tap.is_some() && !batch.is_empty() => tokio::select! {
                    next = body.next() => Some(next),
                    () = running.idle() => None,
                },
                None => Some(body.next().await),
            };
            let mut last = false;
            if let Some(next) = next {
                let chunk = match next {
                    None => None,
                    Some(Ok(c)) => Some(c),
                    Some(Err(e)) => return Err(Error::Body(e.to_string())),
                };
                if let Some(c) = &chunk {
                    n += c.len() as u64;
                    batch_len += c.len();
                }
                last = chunk.is_none();
                batch.extend(chunk.filter(|c| !c.is_empty()));
                if batch_len < FILE_BATCH
                    && !last
                    && (tap.is_none() || running.busy() || more_at_hand(&mut body, &mut peeked))
                {
                    continue;
                }
            }
            if batch.is_empty() {
                if last {
                    break;
                }
                continue;
            }
            join_batches(&mut pending, &mut file, &mut h).await?;
            let bufs = Arc::new(std::mem::take(&mut batch));
            let apart = batch_len >= HASH_APART;
            batch_len = 0;
            if apart {
                if let Some(hash) = h.take() {
                    let bufs = bufs.clone();
                    pending.push(running.spawn(move || feed(&bufs, None, Some(hash))));
                }
            }
            let (f, tmp, tap) = (file.take(), tmp.clone(), tap.clone());
            let hash = if apart { None } else { h.take() };
            // Write-back is asked for every WRITEBACK_STEP bytes. A chunk's commit may come
            // much later, so its last bytes start for the disk now too, however few (clients
            // that send chunks of a few MiB would otherwise never ask). A whole blob is synced
            // as soon as it is written, so its tail is left to that sync.
            let kick_at = if last && append_at.is_some() {
                1
            } else {
                WRITEBACK_STEP
            };
            pending.push(running.spawn(move || {
                let f = match f {
                    Some(f) => f,
                    None => open_local(&tmp, append_at)?,
                };
                let (mut f, hash) = feed(&bufs, Some(f), hash)?;
                if let Some(f) = f.as_mut() {
                    if let Some(tap) = &tap {
                        tap(&f.file, f.end);
                    }
                    f.kick_writeback(kick_at);
                }
                Ok((f, hash))
            }));
            if last {
                break;
            }
        }
        join_batches(&mut pending, &mut file, &mut h).await
    }
    .await;
    // A failed batch may leave its partner running: it must end before the file is removed.
    for job in pending {
        let _ = job.await;
    }
    let file = match (result, file) {
        (Ok(()), Some(f)) => f,
        (Ok(()), None) => return Ok(0), // empty body: nothing written
        (Err(e), _) => {
            // An append leaves the file as it was: the next one cuts it back anyway.
            if append_at.is_none() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            return Err(e);
        }
    };
    drop(file);
    if append_at.is_none() {
        if let Err(e) = tokio::fs::rename(&tmp, &dest).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
    }
    if let (Some(out), Some(h)) = (hasher, h) {
        *out = h;
    }
    Ok(n)
}

/// The jobs of one body that are running, and a wake-up whenever one ends: with a tap, a
/// batch that waits only for the jobs ahead of it is written as soon as they end.
#[derive(Default)]
struct Running {
    count: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

impl Running {
    /// Runs `job` on a blocking thread, counted until it returns (or panics).
    fn spawn(
        self: &Arc<Self>,
        job: impl FnOnce() -> std::io::Result<(Option<Sink>, Option<Hasher>)> + Send + 'static,
    ) -> Batch {
        struct Ends(Arc<Running>);
        impl Drop for Ends {
            fn drop(&mut self) {
                self.0
                    .count
                    .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                self.0.ended.notify_waiters();
            }
        }
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let ends = Ends(self.clone());
        tokio::task::spawn_blocking(move || {
            let _ends = ends;
            job()
        })
    }

    fn busy(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Returns once no job runs.
    async fn idle(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read, so an end between the two still wakes it.
            ended.as_mut().enable();
            if !self.busy() {
                return;
            }
            ended.await;
        }
    }
}

/// Whether `body` has its next item at hand (then kept in `peeked`) rather than still coming.
fn more_at_hand(
    body: &mut ByteStream,
    peeked: &mut Option<Option<std::io::Result<Bytes>>>,
) -> bool {
    use futures_util::FutureExt as _;
    if peeked.is_some() {
        return true;
    }
    match body.next().now_or_never() {
        Some(next) => {
            *peeked = Some(next);
            true
        }
        None => false,
    }
}

/// Waits for the previous batch's jobs and takes back the file and the hasher they carried.
async fn join_batches(
    pending: &mut Vec<Batch>,
    file: &mut Option<Sink>,
    hasher: &mut Option<Hasher>,
) -> Result<()> {
    for job in pending.drain(..) {
        let (f, h) = job.await.map_err(|e| Error::Internal(e.to_string()))??;
        if f.is_some() {
            *file = f;
        }
        if h.is_some() {
            *hasher = h;
        }
    }
    Ok(())
}

/// Opens the local file a body is written to: new, or (appending) cut to `offset` and
/// positioned there.
fn open_local(path: &std::path::Path, append_at: Option<u64>) -> std::io::Result<Sink> {
    use std::io::Seek as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Readable too, for a tap's readers.
    let file = match append_at {
        None => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?,
        Some(offset) => {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            f.set_len(offset)?;
            f.seek(std::io::SeekFrom::Start(offset))?;
            f
        }
    };
    let end = append_at.unwrap_or(0);
    Ok(Sink {
        file,
        end,
        kicked: end,
    })
}

/// Hashes `bufs` into `hasher` and writes them to `file`, each when given.
fn feed(
    bufs: &[Bytes],
    mut file: Option<Sink>,
    mut hasher: Option<Hasher>,
) -> std::io::Result<(Option<Sink>, Option<Hasher>)> {
    for b in bufs {
        if let Some(h) = hasher.as_mut() {
            h.update(b);
        }
        if let Some(f) = file.as_mut() {
            f.write(b)?;
        }
    }
    Ok((file, hasher))
}

/// Directories whose own name this process has synced into their parent: a blob's directory
/// (`blobs/sha256/ab/`) gets a new entry with each blob and is synced every time, but its
/// parents change only when it is new, so they are synced once per directory and process.
static DURABLE_DIRS: std::sync::Mutex<Option<std::collections::HashSet<std::path::PathBuf>>> =
    std::sync::Mutex::new(None);

/// Makes the local file at `key` (under `root`) durable, with its name: its bytes, its
/// directory, and the directories above up to `root` (a new `blobs/sha256/ab/` is itself a new
/// name in `blobs/sha256/`). Without this a power loss could keep the metadata row and lose the
/// bytes.
pub(crate) async fn sync_local(root: &std::path::Path, key: &Path) -> Result<()> {
    let root = root.to_owned();
    let path = root.join(key.as_ref());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::File::open(&path)?.sync_all()?;
        let durable = |d: &std::path::Path, mark: bool| {
            let mut known = DURABLE_DIRS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let known = known.get_or_insert_default();
            if mark {
                known.insert(d.to_owned())
            } else {
                known.contains(d)
            }
        };
        let mut dir = path.parent();
        let mut child: Option<&std::path::Path> = None;
        while let Some(d) = dir.filter(|d| d.starts_with(&root)) {
            std::fs::File::open(d)?.sync_all()?;
            // `d`'s entries are on the disk now, the name of the directory below among them.
            if let Some(c) = child {
                durable(c, true);
            }
            if d == root || durable(d, false) {
                break;
            }
            child = Some(d);
            dir = d.parent();
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))??;
    Ok(())
}

/// Writes an empty object at `key` unless one exists.
pub(crate) async fn put_empty(store: &Arc<dyn ObjectStore>, key: &Path) -> Result<()> {
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store.put_opts(key, PutPayload::new(), opts).await {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads `key` (whole, or the inclusive byte range `range`) as a stream of large chunks.
pub(crate) async fn read(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    range: Option<(u64, u64)>,
) -> Result<ByteStream> {
    let opts = GetOptions {
        range: range.map(|(a, b)| GetRange::Bounded(a..b + 1)),
        ..Default::default()
    };
    let got = store.get_opts(key, opts).await?;
    let r = got.range.clone();
    match got.payload {
        GetResultPayload::File(file, _) => Ok(file_stream(Arc::new(file), r.start, r.end)),
        GetResultPayload::Stream(s) => Ok(s.map(|r| r.map_err(std::io::Error::other)).boxed()),
    }
}

/// Reads bytes `start..end` of `file` in pieces of [`READ_CHUNK`], each by one positioned read
/// on a blocking thread, straight into the buffer that is sent, with the next pieces already
/// being read while this one goes out. (`tokio::fs::File` would read through a buffer of its
/// own, copying every byte once more, and only when asked for the next piece.) A file shorter
/// than its blob's size ends the stream with an error, not with a short body.
fn file_stream(file: Arc<std::fs::File>, start: u64, end: u64) -> ByteStream {
    futures_util::stream::iter((start..end).step_by(READ_CHUNK))
        .map(move |at| {
            let len = (end - at).min(READ_CHUNK as u64) as usize;
            read_file_at(file.clone(), at, len)
        })
        .buffered(READS_AHEAD)
        .boxed()
}

/// Bytes `at..at + len` of `file`, by one positioned read on a blocking thread straight into
/// the buffer returned; an error when the file ends before them. The buffer is not zeroed
/// first: the read fills its spare capacity, which saves a memset of every byte served.
pub async fn read_file_at(file: Arc<std::fs::File>, at: u64, len: usize) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let from = at + buf.len() as u64;
            match rustix::io::pread(&*file, rustix::buffer::spare_capacity(&mut buf), from) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The capacity may exceed `len`, and one read may have filled past it.
        buf.truncate(len);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Feeds the whole object at `key` to `hasher`.
pub(crate) async fn hash_object(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    hasher: &mut Hasher,
) -> Result<()> {
    let mut s = read(store, key, None).await?;
    while let Some(chunk) = s.next().await {
        hasher.update(&chunk?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn served(
        file: &Arc<std::fs::File>,
        start: usize,
        end: usize,
    ) -> Vec<std::io::Result<Bytes>> {
        file_stream(file.clone(), start as u64, end as u64)
            .collect()
            .await
    }

    /// Any range of a local file comes back whole and in order, across piece boundaries; a file
    /// shorter than the range asked for ends the stream with an error.
    #[tokio::test]
    async fn a_served_file_comes_back_whole_in_any_range_and_a_short_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..READ_CHUNK * 2 + 12_345)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let n = data.len();
        for (a, b) in [
            (0, n),
            (1, READ_CHUNK + 1),
            (READ_CHUNK - 3, 2 * READ_CHUNK + 5),
            (7, 7),
        ] {
            let got: Vec<u8> = served(&file, a, b)
                .await
                .into_iter()
                .flat_map(|c| c.unwrap())
                .collect();
            assert!(got == data[a..b], "range {a}..{b} came back wrong");
        }
        let short = served(&file, 0, n + 10).await;
        assert!(
            short.last().is_some_and(|c| c.is_err()),
            "a short file went unnoticed"
        );
    }
}
