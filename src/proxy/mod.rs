//! The pull-through cache: Berth as a mirror of other registries.
//!
//! Which requests come here is decided once, by the registry façade (see [`crate::registry`]).
//!
//! Cached content lives in ordinary repositories named `<prefix>/<upstream name>`, so it is
//! stored, listed, garbage-collected and served like anything pushed; those repositories are
//! read-only to clients.
//!
//! # Behaviour
//! - By digest: local first; a miss fetches once from the upstream, verifies, stores.
//! - By tag: trusted for `tag_ttl`, then revalidated with a HEAD (which Docker Hub does not
//!   count as a pull); the manifest is fetched only when the digest is new. When the upstream
//!   fails (down, 5xx, 429, our credentials refused), the cached tag is served up to
//!   `max_stale` past its TTL; while it is marked down (see [`health`]) without waiting for it.
//! - Referrers (signatures, SBOMs) of cached content are fetched from the upstream's referrers
//!   API, or its `sha256-<hex>` tag, and cached like manifests.
//! - Prefetch ([`prefetch`]) keeps listed images warm on a schedule.
//! - Blobs: a miss starts one fetch per digest, detached from the client. The store takes
//!   the upstream's bytes in (hashing as it goes) and every client asking meanwhile streams
//!   them from a file as it grows (the store's own on local disk, a spool beside an object
//!   store): the first bytes reach clients as soon as the upstream sends them, N clients cost
//!   one upstream GET, and a client that disconnects does not stop the cache fill. The last
//!   byte waits for the digest to match, so a mismatch stores nothing and breaks every
//!   client's stream short of its Content-Length: no client gets the wrong bytes whole.

mod blobs;
mod cluster;
pub mod health;
pub mod prefetch;
pub mod stats;
pub mod upstream;

pub use blobs::Follower;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use berth_storage::{Digest, Page, Reference, RepoName, Store, StoredManifest, Tag};
use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use reqwest::Method;

pub use cluster::{RELAY_HEADER, RELAY_PATH};
pub use health::Availability;
pub use upstream::{Upstream, UpstreamError};

use crate::config::Config;

/// The first path components that name cache repositories under `config`'s upstreams: what
/// [`Proxy::is_cache_name`] answers from, for tools that build no proxy (`berth fsck`).
pub fn cache_namespaces(config: &Config) -> Vec<String> {
    config
        .proxy
        .upstream
        .iter()
        .flat_map(|u| {
            let (mut names, cache_prefix) = upstream::path_prefixes(u);
            names.push(cache_prefix);
            names
        })
        .collect()
}

/// A repository name's first component (its namespace).
pub fn first_component(name: &str) -> &str {
    name.split('/').next().unwrap_or("")
}

/// Largest manifest fetched from an upstream: the same as for a push.
const MANIFEST_LIMIT: usize = berth_storage::MAX_MANIFEST_SIZE;

/// Largest page of an upstream's tag list: some registries ignore `n` and send every tag at
/// once (tens of thousands of tags are well under this).
const TAG_LIST_LIMIT: usize = 16 << 20;

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
        /// The fetch, to read whole or a range of.
        body: Follower,
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

/// One coalesced upstream fetch: every caller awaits the same detached task.
type Flight = Shared<BoxFuture<'static, Result<(), CacheError>>>;

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

/// The pull-through cache (a handle: clones share it).
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstreams: Vec<Arc<Upstream>>,
    evict: berth_storage::EvictPolicy,
    store: Arc<Store>,
    spool: PathBuf,
    /// When each cached tag (and each subject's referrers) was last confirmed upstream, in
    /// unix milliseconds, as far as this process knows; the metadata has the cluster's word.
    confirmed: Mutex<HashMap<String, i64>>,
    /// Manifest and referrer fetches in flight, one per key.
    flights: Mutex<HashMap<String, Flight>>,
    /// Blob fetches in flight, one per digest.
    blobs: blobs::Inflight,
    /// Streams from the replica fetching a blob.
    relay: Arc<cluster::Relay>,
    /// This process's latest eviction: when (unix seconds) and what it found.
    evicted: Mutex<Option<(i64, berth_storage::EvictReport)>>,
    /// Places for read-ahead blob fetches, shared by every image being read ahead.
    read_ahead: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.inner.upstreams)
            .finish_non_exhaustive()
    }
}

/// Where the cache spools blobs while it fetches them.
#[derive(Debug, Clone)]
pub enum Spool {
    /// The server's: `<data>/proxy-spool`, emptied at start (its fetches died with the last
    /// run).
    Server,
    /// A directory of its own (a command-line run beside a live server).
    At(PathBuf),
}

impl Proxy {
    /// The cache for `config`; `None` without upstreams.
    pub fn from_config(
        config: &Config,
        store: Arc<Store>,
        spool: Spool,
    ) -> Result<Option<Self>, String> {
        if config.proxy.upstream.is_empty() {
            return Ok(None);
        }
        let upstreams = config
            .proxy
            .upstream
            .iter()
            .map(|u| Upstream::new(u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let spool = match spool {
            Spool::Server => {
                let dir = config.data.join("proxy-spool");
                let _ = std::fs::remove_dir_all(&dir);
                dir
            }
            Spool::At(dir) => dir,
        };
        std::fs::create_dir_all(&spool).map_err(|e| format!("{}: {e}", spool.display()))?;
        for u in &upstreams {
            let urls: Vec<&str> = u.urls().collect();
            tracing::info!(upstream = %u.name, prefix = %u.cache_prefix, default = u.default, ?urls, "caching upstream");
        }
        let evict = berth_storage::EvictPolicy {
            prefixes: upstreams.iter().map(|u| u.cache_prefix.clone()).collect(),
            max_bytes: config.proxy.max_size.map(|b| b.as_u64()),
            max_age: config.proxy.max_age,
        };
        Ok(Some(Self {
            inner: Arc::new(Inner {
                evict,
                upstreams,
                spool,
                confirmed: Mutex::new(HashMap::new()),
                flights: Mutex::new(HashMap::new()),
                blobs: blobs::Inflight::default(),
                relay: Arc::new(cluster::Relay::new(
                    store.clone(),
                    cluster::relay_read_timeout(&config.proxy.upstream),
                )?),
                evicted: Mutex::new(None),
                read_ahead: Arc::new(tokio::sync::Semaphore::new(prefetch::READ_AHEAD_PROCESS)),
                store,
            }),
        }))
    }

    /// The configured upstreams.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.inner.upstreams
    }

    /// Whether `name` lies in a cache namespace (such repositories are read-only).
    pub fn is_cache_name(&self, name: &str) -> bool {
        let first = first_component(name);
        self.inner
            .upstreams
            .iter()
            .any(|u| u.cache_prefix == first || u.prefixes.iter().any(|p| p == first))
    }

    /// What eviction keeps.
    pub fn evict_policy(&self) -> &berth_storage::EvictPolicy {
        &self.inner.evict
    }

    /// Records what an eviction in this process found.
    pub fn evicted(&self, report: berth_storage::EvictReport) {
        *self.inner.evicted.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((berth_storage::meta::now(), report));
    }

    /// This process's latest eviction, if one ran: when and what it found.
    pub fn last_eviction(&self) -> Option<(i64, berth_storage::EvictReport)> {
        self.inner
            .evicted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The upstream `ns` (containerd's `?ns=`) names, if configured.
    pub fn upstream_for_ns(&self, ns: &str) -> Option<&Arc<Upstream>> {
        self.inner.upstreams.iter().find(|u| u.matches_ns(ns))
    }

    /// The upstream whose prefix `name` starts with, and the rest of the name.
    pub fn upstream_for_prefix<'n>(&self, name: &'n str) -> Option<(&Arc<Upstream>, &'n str)> {
        let (first, rest) = name.split_once('/')?;
        let u = self
            .inner
            .upstreams
            .iter()
            .find(|u| u.prefixes.iter().any(|p| p == first))?;
        Some((u, rest))
    }

    /// The upstream plain names come from, if one is the default.
    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.inner.upstreams.iter().find(|u| u.default)
    }

    /// Where upstream `u`'s repository `name` (as the client named it) is cached.
    pub fn target(&self, u: &Arc<Upstream>, name: &str) -> Result<Target, berth_storage::Error> {
        let remote = u.remote_name(name);
        let local = format!("{}/{remote}", u.cache_prefix).parse()?;
        Ok(Target {
            upstream: u.clone(),
            local,
            remote,
        })
    }

    fn hit(t: &Target, kind: &'static str) {
        t.upstream.stats.hit();
        metrics::counter!("berth_proxy_hits_total", "upstream" => t.upstream.name.clone(), "kind" => kind)
            .increment(1);
    }

    fn miss(t: &Target, kind: &'static str) {
        t.upstream.stats.miss();
        metrics::counter!("berth_proxy_misses_total", "upstream" => t.upstream.name.clone(), "kind" => kind)
            .increment(1);
    }

    /// A manifest by tag or digest, from the cache or the upstream.
    ///
    /// By digest, a cached manifest never touches the upstream. By tag, a cached answer is
    /// trusted for `tag_ttl` after any process confirmed it, then revalidated (by one process
    /// at a time, see [`cluster`]); while the upstream is down it is served at once (up to
    /// `max_stale` past its TTL), and when a probe is due the revalidation runs in the
    /// background while the client gets the cached answer.
    ///
    /// With `read_ahead` (a client's GET) a manifest the upstream had to supply starts the
    /// fetch of the blobs it names (see [`Proxy::read_ahead`]).
    pub async fn manifest(
        &self,
        t: &Target,
        reference: &Reference,
        read_ahead: bool,
    ) -> Result<StoredManifest, CacheError> {
        let store = &self.inner.store;
        let cached = store.get_manifest(&t.local, reference).await.ok();
        let key = format!("{}:{reference}", t.local);
        let tag = match reference {
            Reference::Digest(d) => {
                if let Some(m) = cached {
                    Self::hit(t, "manifest");
                    return Ok(m);
                }
                Self::miss(t, "manifest");
                let (s2, t2, d2) = (store.clone(), t.clone(), d.clone());
                self.inner
                    .once(key.clone(), async move {
                        let have = || async {
                            let r = Reference::Digest(d2.clone());
                            Ok(s2.get_manifest(&t2.local, &r).await.is_ok())
                        };
                        match cluster::turn(&s2, &format!("manifest:{key}"), have).await? {
                            cluster::Turn::Done => Ok(()),
                            cluster::Turn::Mine(held) => {
                                let r = fetch_manifest(&s2, &t2, &d2, None).await;
                                cluster::release(held).await;
                                r
                            }
                        }
                    })
                    .await?;
                let m = store.get_manifest(&t.local, reference).await?;
                if read_ahead {
                    self.read_ahead(t, &m);
                }
                return Ok(m);
            }
            Reference::Tag(tag) => tag,
        };
        let ttl = millis(t.upstream.tag_ttl);
        let mut confirmed = self.inner.confirmed_at(&key);
        if cached.is_some() && !fresh(confirmed, ttl) {
            // Another process may have confirmed it since.
            confirmed = self.inner.cluster_confirmed_at(&key).await.max(confirmed);
        }
        // Never confirmed anywhere: served, as the cache is all there is.
        let within_max_stale = confirmed.is_none_or(|at| {
            t.upstream
                .max_stale
                .is_none_or(|max| now_ms() - at < ttl.saturating_add(millis(max)))
        });
        if let Some(m) = &cached {
            if fresh(confirmed, ttl) {
                Self::hit(t, "manifest");
                return Ok(m.clone());
            }
            if t.upstream.availability() != Availability::Up && within_max_stale {
                // A probe runs in the background when one is due; nobody waits for it.
                t.upstream.probe_if_due();
                Self::hit(t, "manifest");
                return Ok(Self::stale(t, tag, m.clone(), "upstream is down"));
            }
        }
        // Asked of the upstream (a revalidation that finds the tag unchanged counts too: the
        // client waited for the upstream).
        Self::miss(t, "manifest");
        let have = cached.as_ref().map(|m| m.digest.clone());
        match self.revalidation(t, tag, key, have.clone()).await {
            Ok(()) => {
                let m = store.get_manifest(&t.local, reference).await?;
                if read_ahead && have.as_ref() != Some(&m.digest) {
                    self.read_ahead(t, &m);
                }
                Ok(m)
            }
            Err(CacheError::Upstream(e)) if e.cache_may_answer() && within_max_stale => {
                match cached {
                    Some(m) => Ok(Self::stale(t, tag, m, &e.to_string())),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The coalesced revalidation of a tag, once per TTL across processes; it records the
    /// confirmation itself, so that it counts even when nobody waits for it.
    fn revalidation(&self, t: &Target, tag: &Tag, key: String, have: Option<Digest>) -> Flight {
        let (inner, t2, tag2, k) = (self.inner.clone(), t.clone(), tag.clone(), key.clone());
        self.inner.once(key, async move {
            let ttl = millis(t2.upstream.tag_ttl);
            let done = || async { Ok(fresh(inner.cluster_confirmed_at(&k).await, ttl)) };
            match cluster::turn(&inner.store, &format!("tag:{k}"), done).await? {
                cluster::Turn::Done => Ok(()),
                cluster::Turn::Mine(held) => {
                    let r = revalidate(&inner.store, &t2, &tag2, have.as_ref()).await;
                    if r.is_ok() {
                        inner.confirm(&k).await;
                    }
                    cluster::release(held).await;
                    r
                }
            }
        })
    }

    /// A cached tag served while the upstream cannot confirm it (within `max_stale`).
    fn stale(t: &Target, tag: &Tag, m: StoredManifest, why: &str) -> StoredManifest {
        tracing::debug!(repo = %t.local, tag = %tag, why, "serving the cached tag");
        metrics::counter!("berth_proxy_stale_total", "upstream" => t.upstream.name.clone())
            .increment(1);
        m
    }

    /// A blob: local when cached, else streamed while it is fetched (see the module docs).
    pub async fn blob(
        &self,
        t: &Target,
        digest: &Digest,
        head: bool,
    ) -> Result<BlobAnswer, CacheError> {
        let store = &self.inner.store;
        if let Some(size) = self.stored_size(t, digest).await? {
            Self::hit(t, "blob");
            if !head {
                t.upstream.stats.served(size);
            }
            return Ok(BlobAnswer::Local { size });
        }
        Self::miss(t, "blob");
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
        match self
            .inner
            .blobs
            .get(store, &self.inner.relay, &self.inner.spool, t, digest)
            .await?
        {
            Some((size, body)) => Ok(BlobAnswer::Stream { size, body }),
            None => Ok(BlobAnswer::Local {
                size: store.stat_blob(&t.local, digest).await?,
            }),
        }
    }

    /// The size of `digest` in the cache repository, linking it there first when the registry
    /// holds it elsewhere and a cached manifest names it; `None` when it is not here.
    async fn stored_size(&self, t: &Target, digest: &Digest) -> Result<Option<u64>, CacheError> {
        let store = &self.inner.store;
        if let Ok(size) = store.stat_blob(&t.local, digest).await {
            return Ok(Some(size));
        }
        if store.link_cached_blob(&t.local, digest).await? {
            return Ok(Some(store.stat_blob(&t.local, digest).await?));
        }
        Ok(None)
    }

    /// A page of the upstream's tags (`n` after `last`), or `None` when the upstream fails:
    /// the cached list answers then.
    pub async fn tags(
        &self,
        t: &Target,
        last: Option<&str>,
        n: usize,
    ) -> Result<Option<Page>, CacheError> {
        if t.upstream.availability() == Availability::Down {
            return Ok(None);
        }
        match upstream_tags(t, last, n).await {
            Ok(page) => Ok(Some(page)),
            Err(e) if e.cache_may_answer() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Brings the upstream's referrers of `subject` into the cache (signatures, SBOMs,
    /// attestations), at most once per `tag_ttl` across processes; best effort: what is cached
    /// answers when the upstream cannot.
    pub async fn cache_referrers(&self, t: &Target, subject: &Digest) {
        let key = format!("{}@referrers:{subject}", t.local);
        let ttl = millis(t.upstream.tag_ttl);
        if fresh(self.inner.confirmed_at(&key), ttl)
            || t.upstream.availability() == Availability::Down
        {
            return;
        }
        let (inner, t2, s2, k) = (self.inner.clone(), t.clone(), subject.clone(), key.clone());
        let r = self
            .inner
            .once(key, async move {
                let done = || async { Ok(fresh(inner.cluster_confirmed_at(&k).await, ttl)) };
                match cluster::turn(&inner.store, &format!("referrers:{k}"), done).await? {
                    cluster::Turn::Done => Ok(()),
                    cluster::Turn::Mine(held) => {
                        let r = fetch_referrers(&inner.store, &t2, &s2).await;
                        if r.is_ok() {
                            inner.confirm(&k).await;
                        }
                        cluster::release(held).await;
                        r
                    }
                }
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(repo = %t.local, subject = %subject, error = %e, "upstream referrers not cached");
        }
    }

    /// A blob another replica asked for (see [`cluster`]): its size when known and the bytes
    /// of this process's fetch of it, as they come; `None` when no fetch of it runs here (it
    /// ended: the asker finds it in the store), or when `proof` does not show the request comes
    /// from a replica.
    pub async fn relay(
        &self,
        digest: &Digest,
        proof: &str,
    ) -> Result<Option<(Option<u64>, Follower)>, CacheError> {
        if !self.inner.relay.verify(digest, proof).await? {
            tracing::warn!(digest = %digest, "a relay request without a valid proof");
            return Ok(None);
        }
        Ok(self.inner.blobs.join(digest))
    }
}

/// Now, in unix milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether a confirmation at `at` (unix ms) is younger than `ttl` ms.
fn fresh(at: Option<i64>, ttl: i64) -> bool {
    at.is_some_and(|at| now_ms().saturating_sub(at) < ttl)
}

impl Inner {
    /// When this process last saw `key` confirmed.
    fn confirmed_at(&self, key: &str) -> Option<i64> {
        self.confirmed.lock().ok().and_then(|c| c.get(key).copied())
    }

    /// When any process last confirmed `key` (remembered here too); a metadata failure counts
    /// as never, so the upstream is asked.
    async fn cluster_confirmed_at(&self, key: &str) -> Option<i64> {
        let at = match self.store.meta().confirmed_at(key).await {
            Ok(at) => at,
            Err(e) => {
                tracing::warn!(key, error = %e, "reading a cache confirmation failed");
                None
            }
        };
        if let (Some(at), Ok(mut c)) = (at, self.confirmed.lock()) {
            let e = c.entry(key.to_owned()).or_insert(at);
            *e = (*e).max(at);
        }
        at
    }

    /// Records that `key` was confirmed upstream now, here and for every process.
    async fn confirm(&self, key: &str) {
        let at = now_ms();
        if let Ok(mut c) = self.confirmed.lock() {
            c.insert(key.to_owned(), at);
        }
        if let Err(e) = self.store.meta().confirm(key, at).await {
            tracing::warn!(key, error = %e, "recording a cache confirmation failed");
        }
    }

    /// Runs `fetch` once for `key`, however many callers ask meanwhile, as a task of its own:
    /// a caller going away (or never waiting) does not abandon it.
    fn once<F>(self: &Arc<Self>, key: String, fetch: F) -> Flight
    where
        F: Future<Output = Result<(), CacheError>> + Send + 'static,
    {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = flights.get(&key) {
            metrics::counter!("berth_proxy_coalesced_total", "kind" => "manifest").increment(1);
            return f.clone();
        }
        let (inner, k) = (self.clone(), key.clone());
        let task = tokio::spawn(async move {
            let r = fetch.await;
            // Under the lock: a caller now starts a new fetch rather than join this one.
            inner
                .flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&k);
            r
        });
        let flight = async move {
            task.await
                .unwrap_or_else(|e| Err(CacheError::Storage(format!("fetch task: {e}"))))
        }
        .boxed()
        .shared();
        flights.insert(key, flight.clone());
        flight
    }
}

/// One page of the upstream's tag list, its `Link` turned into "more after the last".
async fn upstream_tags(t: &Target, last: Option<&str>, n: usize) -> Result<Page, UpstreamError> {
    let query = {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("n", &n.to_string());
        if let Some(l) = last {
            q.append_pair("last", l);
        }
        q.finish()
    };
    let r = t
        .upstream
        .send(Method::GET, &t.remote, &format!("tags/list?{query}"), None)
        .await?;
    let more = r.headers().contains_key(reqwest::header::LINK);
    let body = t.upstream.read_whole(r, TAG_LIST_LIMIT, "tag list").await?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| UpstreamError::BadContent(format!("tag list: {e}")))?;
    let mut items: Vec<String> = v["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // Registries that ignore `n` send everything: page it here.
    let more = more || items.len() > n;
    items.truncate(n);
    Ok(Page { items, more })
}

/// Fetches the upstream's referrers of `subject` (its referrers API, else the `sha256-<hex>`
/// tag schema) and caches each referrer manifest; they then show in the local referrers list.
async fn fetch_referrers(store: &Store, t: &Target, subject: &Digest) -> Result<(), CacheError> {
    let via_api = t
        .upstream
        .send(
            Method::GET,
            &t.remote,
            &format!("referrers/{subject}"),
            Some("application/vnd.oci.image.index.v1+json"),
        )
        .await;
    let index = match via_api {
        Ok(r)
            if r.headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/vnd.oci.image.index.v1+json")) =>
        {
            read_manifest(&t.upstream, r).await?.0
        }
        Ok(_) | Err(UpstreamError::NotFound(_)) => {
            let fallback = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
            match t.upstream.manifest(Method::GET, &t.remote, &fallback).await {
                Ok(r) => read_manifest(&t.upstream, r).await?.0,
                Err(UpstreamError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let v: serde_json::Value = serde_json::from_slice(&index)
        .map_err(|e| UpstreamError::BadContent(format!("referrers index: {e}")))?;
    let digests = v["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["digest"].as_str()?.parse::<Digest>().ok());
    for d in digests {
        if store
            .get_manifest(&t.local, &Reference::Digest(d.clone()))
            .await
            .is_err()
        {
            fetch_manifest(store, t, &d, None).await?;
        }
    }
    Ok(())
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
    let (bytes, ct) = read_manifest(&t.upstream, r).await?;
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

async fn read_manifest(
    up: &upstream::Upstream,
    r: reqwest::Response,
) -> Result<(Bytes, String), CacheError> {
    let ct = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = up.read_whole(r, MANIFEST_LIMIT, "manifest").await?;
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
        let (bytes, ct) = read_manifest(&t.upstream, r).await?;
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
