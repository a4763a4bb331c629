//! The pull-through cache: Berth as a mirror of other registries.
//!
//! # Routing
//! A read is served from an upstream when
//! - the request carries containerd's `?ns=<host>` naming a configured upstream,
//! - or the repository name starts with an upstream's prefix (`docker.io/library/alpine`),
//! - or the upstream is the default and the plain name was never pushed here (Docker's
//!   `registry-mirrors`, which sends Hub names as they are).
//!
//! Cached content lives in ordinary repositories named `<prefix>/<upstream name>`, so it is
//! stored, listed, garbage-collected and served like anything pushed; those repositories are
//! read-only to clients.
//!
//! # Behaviour
//! - By digest: local first; a miss fetches once from the upstream, verifies, stores.
//! - By tag: trusted for `tag_ttl`, then revalidated with a HEAD (which Docker Hub does not
//!   count as a pull); the manifest is fetched only when the digest is new. When the upstream
//!   fails (down, 5xx, 429), the cached tag is served up to `max_stale` past its TTL.
//! - Blobs: a miss starts one fetch per digest, detached from the client. It writes the
//!   upstream's bytes to a spool file while the store takes them in (hashing as it goes), and
//!   every client asking meanwhile streams from that file as it grows: the first bytes reach
//!   clients as soon as the upstream sends them, N clients cost one upstream GET, and a
//!   client that disconnects does not stop the cache fill. A digest mismatch stores nothing
//!   and breaks every client's stream.

mod blobs;
pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use berth_storage::{Digest, Reference, RepoName, Store, StoredManifest, Tag};
use bytes::Bytes;
use reqwest::Method;
use tokio::sync::OnceCell;

pub use upstream::{Upstream, UpstreamError};

use crate::config::Config;

/// Largest manifest fetched from an upstream: the same as for a push.
const MANIFEST_LIMIT: usize = berth_storage::MAX_MANIFEST_SIZE;

/// What to answer for a blob.
pub enum BlobAnswer {
    /// In the store (now): serve it like any local blob.
    Local {
        /// Its size.
        size: u64,
    },
    /// A HEAD answered from the upstream (nothing fetched).
    Head {
        /// Its size, when the upstream said.
        size: Option<u64>,
    },
    /// Streamed while it is fetched.
    Stream {
        /// Its size, when the upstream said.
        size: Option<u64>,
        /// The bytes.
        body: berth_storage::ByteStream,
    },
}

/// Why cached content could not be served.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CacheError {
    /// The upstream failed or refused.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Local storage failed.
    #[error("cache storage: {0}")]
    Storage(String),
}

impl From<berth_storage::Error> for CacheError {
    fn from(e: berth_storage::Error) -> Self {
        match e {
            berth_storage::Error::DigestMismatch { expected, computed } => Self::Upstream(
                UpstreamError::BadContent(format!("expected {expected}, got {computed}")),
            ),
            other => Self::Storage(other.to_string()),
        }
    }
}

/// One coalesced manifest fetch.
type Flight = Arc<OnceCell<Result<(), CacheError>>>;

/// Where a request goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// The local cache repository.
    pub local: RepoName,
    /// The repository name at the upstream.
    pub remote: String,
}

/// The routing decision for a request.
#[derive(Debug)]
pub enum Route {
    /// A local repository.
    Local,
    /// Cached from an upstream.
    Cached(Target),
    /// `?ns=` names a registry that is not configured.
    UnknownUpstream(String),
}

/// The pull-through cache.
pub struct Proxy {
    upstreams: Vec<Arc<Upstream>>,
    evict: berth_storage::EvictPolicy,
    store: Arc<Store>,
    spool: PathBuf,
    /// When each cached tag was last confirmed by its upstream.
    confirmed: Mutex<HashMap<String, Instant>>,
    /// Manifest fetches in flight, one per (repository, reference).
    flights: Mutex<HashMap<String, Flight>>,
    /// Blob fetches in flight, one per digest.
    blobs: blobs::Inflight,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// The cache for `config`; `None` without upstreams.
    pub fn from_config(config: &Config, store: Arc<Store>) -> Result<Option<Self>, String> {
        if config.proxy.upstream.is_empty() {
            return Ok(None);
        }
        let upstreams = config
            .proxy
            .upstream
            .iter()
            .map(|u| Upstream::new(u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let spool = config.data.join("proxy-spool");
        // Leftovers of a previous run are useless: their fetches died with it.
        let _ = std::fs::remove_dir_all(&spool);
        std::fs::create_dir_all(&spool).map_err(|e| format!("{}: {e}", spool.display()))?;
        for u in &upstreams {
            tracing::info!(upstream = %u.name, prefix = %u.cache_prefix, default = u.default, "caching upstream");
        }
        let evict = berth_storage::EvictPolicy {
            prefixes: upstreams.iter().map(|u| u.cache_prefix.clone()).collect(),
            max_bytes: config.proxy.max_size.map(|b| b.as_u64()),
            max_age: config.proxy.max_age,
        };
        Ok(Some(Self {
            evict,
            upstreams,
            store,
            spool,
            confirmed: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            blobs: blobs::Inflight::default(),
        }))
    }

    /// Whether `name` lies in a cache namespace (such repositories are read-only).
    pub fn is_cache_name(&self, name: &str) -> bool {
        let first = name.split('/').next().unwrap_or("");
        self.upstreams
            .iter()
            .any(|u| u.cache_prefix == first || u.prefixes.iter().any(|p| p == first))
    }

    /// What eviction keeps.
    pub fn evict_policy(&self) -> &berth_storage::EvictPolicy {
        &self.evict
    }

    /// Whether `ns` names a configured upstream.
    pub fn knows_ns(&self, ns: &str) -> bool {
        self.upstreams.iter().any(|u| u.matches_ns(ns))
    }

    fn target(&self, u: &Arc<Upstream>, name: &str) -> Option<Target> {
        let remote = u.remote_name(name);
        let local = format!("{}/{remote}", u.cache_prefix).parse().ok()?;
        Some(Target {
            upstream: u.clone(),
            local,
            remote,
        })
    }

    /// Decides where a read of repository `name` goes.
    pub async fn route(&self, name: &str, ns: Option<&str>) -> Route {
        if let Some(ns) = ns.filter(|n| !n.is_empty()) {
            return match self.upstreams.iter().find(|u| u.matches_ns(ns)) {
                Some(u) => self.target(u, name).map_or(Route::Local, Route::Cached),
                None => Route::UnknownUpstream(ns.to_owned()),
            };
        }
        if let Some((first, rest)) = name.split_once('/')
            && let Some(u) = self
                .upstreams
                .iter()
                .find(|u| u.prefixes.iter().any(|p| p == first))
        {
            return self.target(u, rest).map_or(Route::Local, Route::Cached);
        }
        if let Some(u) = self.upstreams.iter().find(|u| u.default) {
            let pushed_here = match name.parse::<RepoName>() {
                Ok(r) => self.store.repo_exists(&r).await.unwrap_or(true),
                Err(_) => true,
            };
            if !pushed_here {
                return self.target(u, name).map_or(Route::Local, Route::Cached);
            }
        }
        Route::Local
    }

    /// Runs `fetch` once for `key`, however many callers ask at the same time; the fetch runs
    /// as its own task, so a caller going away does not abandon it.
    async fn once<F>(&self, key: String, fetch: F) -> Result<(), CacheError>
    where
        F: Future<Output = Result<(), CacheError>> + Send + 'static,
    {
        let cell = {
            let mut m = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(key.clone()).or_default().clone()
        };
        let mut led = false;
        let r = cell
            .get_or_init(|| {
                led = true;
                async move {
                    tokio::spawn(fetch)
                        .await
                        .unwrap_or_else(|e| Err(CacheError::Storage(format!("fetch task: {e}"))))
                }
            })
            .await
            .clone();
        if !led {
            metrics::counter!("berth_proxy_coalesced_total", "kind" => "manifest").increment(1);
        }
        let mut m = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if m.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            m.remove(&key);
        }
        r
    }

    fn hit(t: &Target, kind: &'static str) {
        metrics::counter!("berth_proxy_hits_total", "upstream" => t.upstream.name.clone(), "kind" => kind)
            .increment(1);
    }

    fn miss(t: &Target, kind: &'static str) {
        metrics::counter!("berth_proxy_misses_total", "upstream" => t.upstream.name.clone(), "kind" => kind)
            .increment(1);
    }

    /// A manifest by tag or digest, from the cache or the upstream.
    pub async fn manifest(
        &self,
        t: &Target,
        reference: &Reference,
    ) -> Result<StoredManifest, CacheError> {
        let cached = self.store.get_manifest(&t.local, reference).await.ok();
        let key = format!("{}:{reference}", t.local);
        match reference {
            Reference::Digest(d) => {
                if let Some(m) = cached {
                    Self::hit(t, "manifest");
                    return Ok(m);
                }
                Self::miss(t, "manifest");
                let (store, t2, d2) = (self.store.clone(), t.clone(), d.clone());
                self.once(
                    key,
                    async move { fetch_manifest(&store, &t2, &d2, None).await },
                )
                .await?;
                Ok(self.store.get_manifest(&t.local, reference).await?)
            }
            Reference::Tag(tag) => {
                let confirmed = self
                    .confirmed
                    .lock()
                    .ok()
                    .and_then(|c| c.get(&key).copied());
                if let Some(m) = &cached
                    && confirmed.is_some_and(|at| at.elapsed() < t.upstream.tag_ttl)
                {
                    Self::hit(t, "manifest");
                    return Ok(m.clone());
                }
                let (store, t2, tag2) = (self.store.clone(), t.clone(), tag.clone());
                let have = cached.as_ref().map(|m| m.digest.clone());
                let r = self
                    .once(key.clone(), async move {
                        revalidate(&store, &t2, &tag2, have.as_ref()).await
                    })
                    .await;
                match r {
                    Ok(()) => {
                        if let Ok(mut c) = self.confirmed.lock() {
                            c.insert(key, Instant::now());
                        }
                        Ok(self.store.get_manifest(&t.local, reference).await?)
                    }
                    Err(CacheError::Upstream(e)) if e.is_outage() => {
                        let within = |at: Instant| {
                            t.upstream
                                .max_stale
                                .is_none_or(|m| at.elapsed() < t.upstream.tag_ttl + m)
                        };
                        match cached {
                            // Never confirmed in this process (a restart): served, as the
                            // cache is all there is.
                            Some(m) if confirmed.is_none_or(within) => {
                                tracing::warn!(repo = %t.local, tag = %tag, error = %e, "upstream failing; serving the cached tag");
                                metrics::counter!("berth_proxy_stale_total", "upstream" => t.upstream.name.clone()).increment(1);
                                Ok(m)
                            }
                            _ => Err(e.into()),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// A blob: local when cached, else streamed while it is fetched (see the module docs).
    pub async fn blob(
        &self,
        t: &Target,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, CacheError> {
        if let Some(size) = self.stored_size(t, digest).await? {
            Self::hit(t, "blob");
            return Ok(BlobAnswer::Local { size });
        }
        if head {
            let r = t
                .upstream
                .send(Method::HEAD, &t.remote, &format!("blobs/{digest}"), None)
                .await?;
            // The header itself: a HEAD's body length is always 0.
            let size = r
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            return Ok(BlobAnswer::Head { size });
        }
        match self.blobs.get(&self.store, &self.spool, t, digest).await? {
            Some((size, body)) => Ok(BlobAnswer::Stream { size, body }),
            None => Ok(BlobAnswer::Local {
                size: self.store.stat_blob(&t.local, digest).await?,
            }),
        }
    }

    /// The size of `digest` in the cache repository, linking it there first when the registry
    /// holds it elsewhere (blobs are shared by digest); `None` when it is not here at all.
    async fn stored_size(&self, t: &Target, digest: &Digest) -> Result<Option<u64>, CacheError> {
        if let Ok(size) = self.store.stat_blob(&t.local, digest).await {
            return Ok(Some(size));
        }
        if self.store.mount_blob(&t.local, digest, None).await? {
            return Ok(Some(self.store.stat_blob(&t.local, digest).await?));
        }
        Ok(None)
    }

    /// The upstream's tag list (its pagination passed through), or the cached one when the
    /// upstream fails; `None` means "use the local list".
    pub async fn tags(
        &self,
        t: &Target,
        query: &str,
    ) -> Result<Option<(serde_json::Value, Option<String>)>, CacheError> {
        let suffix = if query.is_empty() {
            "tags/list".to_owned()
        } else {
            format!("tags/list?{query}")
        };
        match t.upstream.send(Method::GET, &t.remote, &suffix, None).await {
            Ok(r) => {
                let link = r
                    .headers()
                    .get(reqwest::header::LINK)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = r
                    .bytes()
                    .await
                    .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| UpstreamError::BadContent(format!("tag list: {e}")))?;
                Ok(Some((v, link)))
            }
            Err(e) if e.is_outage() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The upstream's referrers index for `digest`; `None` when it has no referrers API or
    /// fails (the cached referrers are answered then).
    pub async fn referrers(&self, t: &Target, digest: &Digest, query: &str) -> Option<Bytes> {
        let suffix = if query.is_empty() {
            format!("referrers/{digest}")
        } else {
            format!("referrers/{digest}?{query}")
        };
        let r = t
            .upstream
            .send(Method::GET, &t.remote, &suffix, None)
            .await
            .ok()?;
        let ct = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.starts_with("application/vnd.oci.image.index.v1+json") {
            return None;
        }
        r.bytes().await.ok()
    }
}

/// GETs a manifest by digest from the upstream, verifies it, stores it (under `tag` too).
async fn fetch_manifest(
    store: &Store,
    t: &Target,
    digest: &Digest,
    tag: Option<&Tag>,
) -> Result<(), CacheError> {
    let r = t
        .upstream
        .manifest(Method::GET, &t.remote, &digest.to_string())
        .await?;
    let (bytes, ct) = read_manifest(r).await?;
    let got = Digest::of(digest.algorithm(), &bytes);
    if &got != digest {
        return Err(UpstreamError::BadContent(format!(
            "manifest {digest} from {} hashes to {got}",
            t.upstream.name
        ))
        .into());
    }
    let reference = match tag {
        Some(tag) => Reference::Tag(tag.clone()),
        None => Reference::Digest(digest.clone()),
    };
    store
        .put_cached_manifest(&t.local, &reference, &ct, bytes)
        .await?;
    Ok(())
}

async fn read_manifest(r: reqwest::Response) -> Result<(Bytes, String), CacheError> {
    let ct = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if r.content_length()
        .is_some_and(|n| n as usize > MANIFEST_LIMIT)
    {
        return Err(UpstreamError::BadContent("manifest larger than 4 MiB".into()).into());
    }
    let bytes = r
        .bytes()
        .await
        .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
    if bytes.len() > MANIFEST_LIMIT {
        return Err(UpstreamError::BadContent("manifest larger than 4 MiB".into()).into());
    }
    Ok((bytes, ct))
}

/// Asks the upstream what `tag` points at now (HEAD), fetching the manifest only when the
/// digest is not cached yet.
async fn revalidate(
    store: &Store,
    t: &Target,
    tag: &Tag,
    have: Option<&Digest>,
) -> Result<(), CacheError> {
    let head = t
        .upstream
        .manifest(Method::HEAD, &t.remote, &tag.to_string())
        .await?;
    let digest = head
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok());
    let Some(digest) = digest else {
        // No digest on HEAD: GET by tag and trust only what the bytes hash to.
        let r = t
            .upstream
            .manifest(Method::GET, &t.remote, &tag.to_string())
            .await?;
        let (bytes, ct) = read_manifest(r).await?;
        store
            .put_cached_manifest(&t.local, &Reference::Tag(tag.clone()), &ct, bytes)
            .await?;
        return Ok(());
    };
    if have == Some(&digest) {
        return Ok(());
    }
    // Known under another tag or by digest: only the tag moves.
    if let Ok(m) = store
        .get_manifest(&t.local, &Reference::Digest(digest.clone()))
        .await
    {
        store
            .put_cached_manifest(
                &t.local,
                &Reference::Tag(tag.clone()),
                &m.media_type,
                m.bytes,
            )
            .await?;
        return Ok(());
    }
    fetch_manifest(store, t, &digest, Some(tag)).await
}
