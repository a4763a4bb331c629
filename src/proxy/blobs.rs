//! Blob misses: one upstream fetch per digest, spooled to a file that every waiting client
//! reads as it grows, while the store takes the same bytes in and verifies them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_storage::{ByteStream, Digest, Store};
use bytes::Bytes;
use futures_util::StreamExt as _;
use reqwest::Method;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};

use super::{CacheError, Target, UpstreamError};

/// Bytes read from the spool per chunk sent to a client.
const READ_CHUNK: usize = 256 * 1024;
/// Chunks buffered between the upstream and the store.
const STORE_QUEUE: usize = 8;

#[derive(Clone, Debug, Default)]
struct Progress {
    /// The upstream answered; `size` is its Content-Length.
    started: bool,
    size: Option<u64>,
    /// Bytes in the spool file.
    written: u64,
    /// The fetch ended: stored, or why not.
    done: Option<Result<(), CacheError>>,
}

struct Fetch {
    spool: PathBuf,
    progress: watch::Sender<Progress>,
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
        spool_dir: &Path,
        t: &Target,
        digest: &Digest,
    ) -> Result<Option<(Option<u64>, ByteStream)>, CacheError> {
        let key = digest.to_string();
        // Joiners open the spool under the lock, so the fetch cannot remove it under them.
        let (fetch, file, leader) = {
            let mut m = self.fetches.lock().unwrap_or_else(|e| e.into_inner());
            match m.get(&key) {
                Some(f) => {
                    let file = std::fs::File::open(&f.spool)
                        .map_err(|e| CacheError::Storage(format!("spool: {e}")))?;
                    (f.clone(), file, false)
                }
                None => {
                    let spool = spool_dir.join(uuid::Uuid::new_v4().to_string());
                    let w = std::fs::File::create(&spool)
                        .map_err(|e| CacheError::Storage(format!("spool: {e}")))?;
                    let file = std::fs::File::open(&spool)
                        .map_err(|e| CacheError::Storage(format!("spool: {e}")))?;
                    let f = Arc::new(Fetch {
                        spool,
                        progress: watch::channel(Progress::default()).0,
                    });
                    m.insert(key.clone(), f.clone());
                    drop(m);
                    tokio::spawn(run(
                        self.remover(&key),
                        store.clone(),
                        t.clone(),
                        digest.clone(),
                        f.clone(),
                        tokio::fs::File::from_std(w),
                    ));
                    (f, file, true)
                }
            }
        };
        let kind = if leader { "miss" } else { "coalesced" };
        metrics::counter!(format!("berth_proxy_blob_{kind}_total"), "upstream" => t.upstream.name.clone())
            .increment(1);
        let mut rx = fetch.progress.subscribe();
        let p = rx
            .wait_for(|p| p.started || p.done.is_some())
            .await
            .map_err(|_| CacheError::Storage("fetch vanished".into()))?
            .clone();
        if !p.started {
            return match p.done {
                Some(Err(e)) => Err(e),
                // Finished without bytes: it was in the store already.
                _ => Ok(None),
            };
        }
        Ok(Some((p.size, follow(tokio::fs::File::from_std(file), rx))))
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

/// Streams the spool file to one client as it grows, ending when the fetch ends.
fn follow(file: tokio::fs::File, rx: watch::Receiver<Progress>) -> ByteStream {
    futures_util::stream::unfold(Some((file, rx, 0u64)), |state| async move {
        let (mut file, mut rx, pos) = state?;
        loop {
            let p = rx.borrow_and_update().clone();
            if pos < p.written {
                let n = (p.written - pos).min(READ_CHUNK as u64) as usize;
                let mut buf = vec![0u8; n];
                if let Err(e) = file.seek(std::io::SeekFrom::Start(pos)).await {
                    return Some((Err(e), None));
                }
                return match file.read_exact(&mut buf).await {
                    Ok(_) => Some((Ok(Bytes::from(buf)), Some((file, rx, pos + n as u64)))),
                    Err(e) => Some((Err(e), None)),
                };
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

/// The fetch itself: upstream GET, spool + store, verify, then tidy up.
async fn run(
    remove: impl FnOnce(),
    store: Arc<Store>,
    t: Target,
    digest: Digest,
    fetch: Arc<Fetch>,
    spool: tokio::fs::File,
) {
    let result = fill(&store, &t, &digest, &fetch, spool).await;
    match &result {
        Ok(()) => {
            tracing::info!(upstream = %t.upstream.name, repo = %t.local, digest = %digest, "blob cached")
        }
        Err(e) => {
            tracing::warn!(upstream = %t.upstream.name, repo = %t.local, digest = %digest, error = %e, "blob fetch failed")
        }
    }
    // Late arrivals now find the blob in the store (or start afresh after a failure); readers
    // already following keep their open spool file.
    remove();
    fetch.progress.send_modify(|p| p.done = Some(result));
    let _ = tokio::fs::remove_file(&fetch.spool).await;
}

async fn fill(
    store: &Arc<Store>,
    t: &Target,
    digest: &Digest,
    fetch: &Fetch,
    mut spool: tokio::fs::File,
) -> Result<(), CacheError> {
    // It may have arrived between the caller's look and this fetch.
    if store.link_cached_blob(&t.local, digest).await? {
        return Ok(());
    }
    let resp = t
        .upstream
        .send(Method::GET, &t.remote, &format!("blobs/{digest}"), None)
        .await?;
    fetch.progress.send_modify(|p| {
        p.started = true;
        p.size = resp.content_length();
    });
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(STORE_QUEUE);
    let body: ByteStream = tokio_stream_from(rx);
    let (s, local, d) = (store.clone(), t.local.clone(), digest.clone());
    let stored = tokio::spawn(async move { s.put_cached_blob(&local, &d, body).await });
    let mut upstream = resp.bytes_stream();
    let mut failure: Option<CacheError> = None;
    while let Some(chunk) = upstream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(UpstreamError::Unavailable(format!("blob body: {e}")).into());
                break;
            }
        };
        metrics::counter!("berth_proxy_upstream_bytes_total", "upstream" => t.upstream.name.clone())
            .increment(chunk.len() as u64);
        if let Err(e) = spool.write_all(&chunk).await {
            failure = Some(CacheError::Storage(format!("spool: {e}")));
            break;
        }
        if let Err(e) = spool.flush().await {
            failure = Some(CacheError::Storage(format!("spool: {e}")));
            break;
        }
        let n = chunk.len() as u64;
        fetch.progress.send_modify(|p| p.written += n);
        if tx.send(Ok(chunk)).await.is_err() {
            break; // the store gave up; its error is reported below
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

fn tokio_stream_from(mut rx: mpsc::Receiver<std::io::Result<Bytes>>) -> ByteStream {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
