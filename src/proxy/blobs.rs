//! Blob misses: one upstream fetch per digest, written to a file that every waiting client
//! reads as it grows. On a filesystem store that file is the store's own, which takes the
//! bytes in and verifies them; on an object store the bytes go both to a spool file and to
//! the store. Across processes, the fetch takes the digest's lease first; when another replica
//! holds it, this process's spool is filled from that replica's stream instead (see
//! [`super::cluster`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use berth_storage::blob::FillWatch;
use berth_storage::{ByteStream, Digest, Store};
use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::Method;
use tokio::sync::{mpsc, watch};

use super::cluster::{self, Attempt, Relay};
use super::{CacheError, Target, UpstreamError};

/// Most bytes read from the spool per chunk sent to a client.
const READ_CHUNK: usize = 512 * 1024;
/// Most upstream chunks written to the spool at once: a 1 GiB layer arrives in tens of
/// thousands of chunks, and a write (a blocking-thread hop) and a wake-up of every follower
/// per chunk cost more CPU than the bytes did (7 s for 1 GiB). Only chunks already arrived
/// are taken together, so a slow upstream's bytes still go out as they come.
const SPOOL_BATCH: usize = 64;
/// Chunks buffered between the upstream and the store.
const STORE_QUEUE: usize = 8;

#[derive(Clone, Debug, Default)]
struct Progress {
    /// The upstream answered; `size` is its Content-Length.
    started: bool,
    size: Option<u64>,
    /// Bytes in the spool file.
    written: u64,
    /// The bytes matched their digest (the store said so, or the replica relayed from ended
    /// its stream, which it does only then).
    verified: bool,
    /// The fetch ended: stored, or why not.
    done: Option<Result<(), CacheError>>,
}

struct Fetch {
    /// The file the bytes are written to (a spool, or the store's file when it fills in
    /// place), set before the first byte is announced; every client reads it with positioned
    /// reads of its own.
    file: OnceLock<Arc<std::fs::File>>,
    progress: watch::Sender<Progress>,
}

impl Fetch {
    /// Announces that the first `len` bytes are in `file` (a handle to it is kept the first
    /// time; when none can be made, nothing is announced and the fetch must fail).
    fn landed(&self, file: &std::fs::File, len: u64) -> Result<(), CacheError> {
        if self.file.get().is_none() {
            let f = file.try_clone().map_err(|e| {
                CacheError::Storage(format!("no handle on the blob for its readers: {e}"))
            })?;
            let _ = self.file.set(Arc::new(f));
        }
        self.progress.send_modify(|p| p.written = len);
        Ok(())
    }
}

/// A new spool file in `dir`: read and written through one handle, its name removed at once,
/// so that nothing is left behind however the fetch ends.
fn open_spool(dir: &Path) -> Result<std::fs::File, CacheError> {
    let path = dir.join(uuid::Uuid::new_v4().to_string());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| CacheError::Storage(format!("spool: {e}")))?;
    let _ = std::fs::remove_file(&path);
    Ok(file)
}

/// Fetches in flight, by digest.
#[derive(Default)]
pub(super) struct Inflight {
    fetches: Arc<Mutex<HashMap<String, Arc<Fetch>>>>,
}

impl Inflight {
    /// Joins the fetch of `digest`, starting it when none runs: its size (when the upstream
    /// said) and the bytes as they come, or `None` when it turned out to be in the store.
    pub(super) async fn get(
        &self,
        store: &Arc<Store>,
        relay: &Arc<Relay>,
        spool_dir: &Path,
        t: &Target,
        digest: &Digest,
    ) -> Result<Option<(Option<u64>, Follower)>, CacheError> {
        let key = digest.to_string();
        let (fetch, leader) = {
            let mut m = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Fetch {
                        file: OnceLock::new(),
                        progress: watch::channel(Progress::default()).0,
                    });
                    m.insert(key.clone(), f.clone());
                    drop(m);
                    tokio::spawn(run(
                        self.remover(&key),
                        store.clone(),
                        relay.clone(),
                        t.clone(),
                        digest.clone(),
                        f.clone(),
                        spool_dir.to_owned(),
                    ));
                    (f, true)
                }
            }
        };
        let kind = if leader { "miss" } else { "coalesced" };
        metrics::counter!(format!("berth_proxy_blob_{kind}_total"), "upstream" => t.upstream.name.clone())
            .increment(1);
        follow_fetch(fetch).await
    }

    /// Joins the fetch of `digest` if this process runs one (a relay to another replica):
    /// its size when known and the bytes as they come; never starts one.
    pub(super) fn join(&self, digest: &Digest) -> Option<(Option<u64>, Follower)> {
        let fetch = {
            let m = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
            m.get(&digest.to_string())?.clone()
        };
        // The relay answers at once; its body waits for the first bytes like any follower's.
        let p = fetch.progress.borrow().clone();
        Some((p.size, Follower(fetch)))
    }

    fn remover(&self, key: &str) -> impl FnOnce() + Send + 'static {
        let (key, map) = (key.to_owned(), self.fetches.clone());
        move || {
            if let Ok(mut m) = map.lock() {
                m.remove(&key);
            }
        }
    }
}

/// Waits until `fetch` starts sending (or ends), then follows it.
async fn follow_fetch(fetch: Arc<Fetch>) -> Result<Option<(Option<u64>, Follower)>, CacheError> {
    let mut rx = fetch.progress.subscribe();
    let p = rx
        .wait_for(|p| p.started || p.done.is_some())
        .await
        .map_err(|_| CacheError::Storage("fetch vanished".into()))?
        .clone();
    if !p.started {
        return match p.done {
            Some(Err(e)) => Err(e),
            // Finished without bytes: it is in the store (fetched here earlier, or by
            // another replica meanwhile).
            _ => Ok(None),
        };
    }
    drop(rx);
    Ok(Some((p.size, Follower(fetch))))
}

/// A client's place in a running fetch, before it reads: it takes the whole blob, or (when
/// the upstream said the size) a range of it, as the bytes arrive.
pub struct Follower(Arc<Fetch>);

impl Follower {
    /// The whole blob.
    pub fn whole(self) -> ByteStream {
        follow(self.0, 0, None)
    }

    /// Bytes `first..=last` (within the size the upstream said). A range ends, like the whole
    /// blob, only once the bytes are verified: what a client resuming a download or reading a
    /// slice receives complete is never a slice of the wrong bytes.
    pub fn range(self, first: u64, last: u64) -> ByteStream {
        follow(self.0, first, Some(last.saturating_add(1)))
    }
}

/// Streams the fetch's file from `start` to one client as it grows, ending at `end` (exclusive)
/// or, without one, when the fetch ends: each piece is one positioned read on a blocking
/// thread of what was written since the last.
///
/// The bytes go out before the digest is known, so when the body's end is known (the upstream
/// said the size, or a range was asked), its last byte is held back until the bytes are
/// verified: a mismatch then breaks the body one byte short, and a client that trusts
/// Content-Length (curl, a script) never receives a complete body of the wrong bytes. Without
/// a size the body is chunked, and only a fetch that ended well ends it.
fn follow(fetch: Arc<Fetch>, start: u64, end: Option<u64>) -> ByteStream {
    let rx = fetch.progress.subscribe();
    futures_util::stream::unfold(Some((fetch, rx, start)), move |state| async move {
        let (fetch, mut rx, pos) = state?;
        loop {
            let p = rx.borrow_and_update().clone();
            let sendable = match end.or(p.size) {
                Some(last) if !p.verified => p.written.min(last.saturating_sub(1)),
                Some(last) => p.written.min(last),
                None => p.written,
            };
            if pos < sendable {
                let Some(file) = fetch.file.get().cloned() else {
                    let e = std::io::Error::other("blob fetch lost its file");
                    return Some((Err(e), None));
                };
                let n = (sendable - pos).min(READ_CHUNK as u64) as usize;
                return match berth_storage::blob::read_file_at(file, pos, n).await {
                    Ok(b) => Some((Ok(b), Some((fetch, rx, pos + n as u64)))),
                    Err(e) => Some((Err(e), None)),
                };
            }
            if p.verified && end.is_some_and(|e| pos >= e) {
                return None;
            }
            match p.done {
                Some(Ok(())) => return None,
                Some(Err(e)) => return Some((Err(std::io::Error::other(e.to_string())), None)),
                None => {
                    if rx.changed().await.is_err() {
                        let e = std::io::Error::other("blob fetch ended unexpectedly");
                        return Some((Err(e), None));
                    }
                }
            }
        }
    })
    .boxed()
}

/// Appends `chunks` to the spool in one blocking-thread hop.
async fn spool_write(spool: &Arc<std::fs::File>, chunks: Vec<Bytes>) -> Result<(), CacheError> {
    let f = spool.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        chunks.iter().try_for_each(|c| (&*f).write_all(c))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    .map_err(|e| CacheError::Storage(format!("spool: {e}")))
}

/// The chunks of `batch` up to its first error, and that error.
fn split_batch<E>(batch: Vec<Result<Bytes, E>>) -> (Vec<Bytes>, Option<E>) {
    let mut chunks = Vec::with_capacity(batch.len());
    for c in batch {
        match c {
            Ok(c) => chunks.push(c),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

/// The fetch itself: upstream GET, spool + store, verify, then tidy up.
async fn run(
    remove: impl FnOnce(),
    store: Arc<Store>,
    relay: Arc<Relay>,
    t: Target,
    digest: Digest,
    fetch: Arc<Fetch>,
    spool_dir: PathBuf,
) {
    let result = cluster_fill(&store, &relay, &t, &digest, &fetch, &spool_dir).await;
    match &result {
        Ok(()) => {
            tracing::info!(upstream = %t.upstream.name, repo = %t.local, digest = %digest, "blob cached")
        }
        Err(e) => {
            tracing::warn!(upstream = %t.upstream.name, repo = %t.local, digest = %digest, error = %e, "blob fetch failed")
        }
    }
    // Late arrivals now find the blob in the store (or start afresh after a failure); readers
    // already following keep the file open (its name may be gone).
    remove();
    fetch.progress.send_modify(|p| {
        // Stored, or relayed whole from a replica that verified it.
        p.verified |= result.is_ok();
        p.done = Some(result);
    });
}

/// The fetch across processes: with the digest's lease, from the upstream; while another
/// replica holds it, relayed from that replica (or, when it cannot be reached, waited for
/// until the blob is stored or the lease comes free).
async fn cluster_fill(
    store: &Arc<Store>,
    relay: &Relay,
    t: &Target,
    digest: &Digest,
    fetch: &Arc<Fetch>,
    spool_dir: &Path,
) -> Result<(), CacheError> {
    let lease = format!("blob:{digest}");
    let deadline = std::time::Instant::now() + cluster::MAX_WAIT;
    let mut pause = std::time::Duration::from_millis(50);
    let mut relayed = false;
    loop {
        // It may have arrived between the caller's look and now (here or elsewhere).
        if store.link_cached_blob(&t.local, digest).await? {
            return Ok(());
        }
        match cluster::attempt(store, &lease).await? {
            Attempt::Mine(held) => {
                let r = if store.link_cached_blob(&t.local, digest).await? {
                    Ok(())
                } else {
                    fill(store, t, digest, fetch, spool_dir).await
                };
                cluster::release(held).await;
                return r;
            }
            Attempt::Theirs(holder) => {
                if !relayed && let Some(peer) = berth_storage::store::holder_peer(&holder) {
                    relayed = true;
                    if let Some((size, body)) = relay.open(peer, digest).await? {
                        tracing::info!(%peer, digest = %digest, "relaying another replica's fetch");
                        fetch.progress.send_modify(|p| {
                            p.started = true;
                            p.size = size;
                        });
                        return spool_only(body, fetch, spool_dir).await;
                    }
                }
                if std::time::Instant::now() > deadline {
                    return Err(UpstreamError::Unavailable(format!(
                        "{holder} has been fetching {digest} for over {}s",
                        cluster::MAX_WAIT.as_secs()
                    ))
                    .into());
                }
                tokio::time::sleep(pause).await;
                pause = cluster::backoff(pause);
            }
        }
    }
}

/// Copies a relayed stream into the spool for this process's clients; the replica it comes
/// from stores and verifies it.
async fn spool_only(body: ByteStream, fetch: &Fetch, spool_dir: &Path) -> Result<(), CacheError> {
    let spool = Arc::new(open_spool(spool_dir)?);
    let mut body = body.ready_chunks(SPOOL_BATCH);
    let mut written = 0u64;
    while let Some(batch) = body.next().await {
        let (chunks, err) = split_batch(batch);
        written += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        spool_write(&spool, chunks).await?;
        fetch.landed(&spool, written)?;
        if let Some(e) = err {
            return Err(UpstreamError::Unavailable(format!("relayed blob body: {e}")).into());
        }
    }
    Ok(())
}

/// The fetch from the upstream. A filesystem store's file is what clients read; an object
/// store's parts cannot be read while they are written, so there the bytes go to a spool too.
async fn fill(
    store: &Arc<Store>,
    t: &Target,
    digest: &Digest,
    fetch: &Arc<Fetch>,
    spool_dir: &Path,
) -> Result<(), CacheError> {
    let resp = t
        .upstream
        .send(Method::GET, &t.remote, &format!("blobs/{digest}"), None)
        .await?;
    fetch.progress.send_modify(|p| {
        p.started = true;
        p.size = resp.content_length();
    });
    if store.fills_in_place() {
        return fill_in_place(store, t, digest, fetch, resp).await;
    }
    let spool = Arc::new(open_spool(spool_dir)?);
    let mut written = 0u64;
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(STORE_QUEUE);
    let body: ByteStream = tokio_stream_from(rx);
    let (s, local, d) = (store.clone(), t.local.clone(), digest.clone());
    let watch = FillWatch {
        landed: None,
        verified: Some(verified(fetch)),
    };
    let stored = tokio::spawn(async move { s.put_cached_blob(&local, &d, body, watch).await });
    let mut upstream = resp.bytes_stream().ready_chunks(SPOOL_BATCH);
    let mut failure: Option<CacheError> = None;
    'batches: while let Some(batch) = upstream.next().await {
        let (chunks, err) = split_batch(batch);
        let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        metrics::counter!("berth_proxy_upstream_bytes_total", "upstream" => t.upstream.name.clone())
            .increment(n);
        t.upstream.stats.fetched(n);
        if let Err(e) = spool_write(&spool, chunks.clone()).await {
            failure = Some(e);
            break;
        }
        written += n;
        if let Err(e) = fetch.landed(&spool, written) {
            failure = Some(e);
            break;
        }
        for chunk in chunks {
            if tx.send(Ok(chunk)).await.is_err() {
                break 'batches; // the store gave up; its error is reported below
            }
        }
        if let Some(e) = err {
            failure = Some(UpstreamError::Unavailable(format!("blob body: {e}")).into());
            break;
        }
    }
    if let Some(f) = failure {
        let _ = tx.send(Err(std::io::Error::other(f.to_string()))).await;
        drop(tx);
        let _ = stored.await;
        return Err(f);
    }
    drop(tx);
    match stored.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(CacheError::Storage(format!("store task: {e}"))),
    }
}

/// [`fill`] on a filesystem store: the upstream's body goes straight to the store, and clients
/// read the store's file as it lands there, so each byte is written once.
async fn fill_in_place(
    store: &Arc<Store>,
    t: &Target,
    digest: &Digest,
    fetch: &Arc<Fetch>,
    resp: reqwest::Response,
) -> Result<(), CacheError> {
    let bytes = metrics::counter!("berth_proxy_upstream_bytes_total", "upstream" => t.upstream.name.clone());
    let upstream = t.upstream.clone();
    // Why the body broke, when the upstream broke it (the store only sees an I/O error).
    let broke = Arc::new(OnceLock::new());
    let seen = broke.clone();
    let body: ByteStream = resp
        .bytes_stream()
        .map(move |c| match c {
            Ok(c) => {
                bytes.increment(c.len() as u64);
                upstream.stats.fetched(c.len() as u64);
                Ok(c)
            }
            Err(e) => {
                let _ = seen.set(e.to_string());
                Err(std::io::Error::other(e))
            }
        })
        .boxed();
    // Why the readers could not be given the bytes, if they could not.
    let unshared = Arc::new(OnceLock::new());
    let (f, failed) = (fetch.clone(), unshared.clone());
    let tap: berth_storage::blob::Tap = Arc::new(move |file: &std::fs::File, len: u64| {
        if let Err(e) = f.landed(file, len) {
            let _ = failed.set(e);
        }
    });
    let watch = FillWatch {
        landed: Some(tap),
        verified: Some(verified(fetch)),
    };
    let stored = store.put_cached_blob(&t.local, digest, body, watch).await;
    if let Some(e) = broke.get() {
        return Err(UpstreamError::Unavailable(format!("blob body: {e}")).into());
    }
    stored?;
    if let Some(e) = unshared.get() {
        // Stored, but its readers could not be sent it; they retry and find it in the store.
        return Err(e.clone());
    }
    Ok(())
}

/// Tells `fetch`'s readers that its bytes matched their digest.
fn verified(fetch: &Arc<Fetch>) -> Box<dyn FnOnce() + Send> {
    let f = fetch.clone();
    Box::new(move || f.progress.send_modify(|p| p.verified = true))
}

fn tokio_stream_from(mut rx: mpsc::Receiver<std::io::Result<Bytes>>) -> ByteStream {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
