//! Prefetch: images listed per upstream (`prefetch = ["library/alpine:3.20", "org/app:1.*"]`)
//! that the cache keeps warm, so a cluster's critical images survive an upstream outage that
//! starts before their first pull.
//!
//! A run revalidates each listed tag (a tag may hold `*` and `?`: the upstream's tag list is
//! matched), then fetches whatever the cache lacks of the image: an index's platform manifests,
//! configs and layers. Blobs go through the same in-flight fetches as client pulls, so a
//! prefetch and a pull of the same layer cost one upstream GET. Fetched images count as pulled,
//! so eviction keeps them as long as the schedule renews them.
//!
//! The server runs it every `proxy.prefetch_interval` under the `prefetch` lease (one run at a
//! time across processes sharing the metadata); `berth prefetch` runs it once and prints its
//! progress.
//!
//! Read-ahead ([`Proxy::read_ahead`]) is the same warming for one image, started by a client:
//! a manifest GET the cache had to ask the upstream for starts the fetch of the config and
//! layers it names, in the background, [`READ_AHEAD_PARALLEL`] at a time per image and
//! [`READ_AHEAD_PROCESS`] for all images at once. The client asks for them next; each of its
//! blob GETs then joins a fetch already under way, or finds the blob stored, instead of
//! waiting for its own round trip through the cache to the upstream. A HEAD of a manifest (how
//! containerd and kubelets check a tag) reads nothing ahead, nor does an index (the platform
//! manifest the client picks does), nor an upstream marked down. `read_ahead = false` per
//! upstream turns it off, for clients that read manifests without pulling.

use std::time::Duration;

use berth_storage::manifest::{Manifest, RefKind};
use berth_storage::{Digest, Reference, StoredManifest, Tag};
use futures_util::StreamExt as _;

use super::{Availability, BlobAnswer, CacheError, Proxy, Target, upstream_tags};

/// Blobs one read-ahead fetches at once.
pub const READ_AHEAD_PARALLEL: usize = 8;
/// Blobs all read-aheads of a process fetch at once: many images pulled at the same time do
/// not multiply the cache's load on the upstream (clients' own GETs are not counted here).
pub const READ_AHEAD_PROCESS: usize = 32;

/// The lease that keeps prefetch runs to one at a time.
pub const LEASE: &str = "prefetch";
/// How long its lease lasts unless renewed (after every image).
pub const LEASE_TTL: Duration = Duration::from_secs(600);

/// What happened to one listed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefetched {
    /// The upstream.
    pub upstream: String,
    /// `repository:tag` as listed (with a tag pattern resolved).
    pub image: String,
    /// The digest the tag points at, when it resolved.
    pub digest: Option<Digest>,
    /// Manifests fetched (an index and its platform manifests).
    pub manifests: u64,
    /// Blobs fetched from the upstream.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Blobs the cache already held.
    pub cached: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Splits `repository:tag` (a tag defaults to `latest`).
fn split(pattern: &str) -> (&str, &str) {
    match pattern.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (pattern, "latest"),
    }
}

impl Proxy {
    /// Whether any upstream lists images to prefetch.
    pub fn has_prefetch(&self) -> bool {
        self.inner.upstreams.iter().any(|u| !u.prefetch.is_empty())
    }

    /// Runs every upstream's prefetch list once, calling `progress` after each image.
    pub async fn prefetch(&self, mut progress: impl FnMut(&Prefetched)) -> Vec<Prefetched> {
        let mut done = Vec::new();
        for u in self.inner.upstreams.clone() {
            for pattern in &u.prefetch {
                let (repo, tag) = split(pattern);
                let t = match self.target(&u, repo) {
                    Ok(t) => t,
                    Err(e) => {
                        let p = failed(&u.name, pattern, e.to_string());
                        progress(&p);
                        done.push(p);
                        continue;
                    }
                };
                let tags = match self.resolve_tags(&t, tag).await {
                    Ok(tags) => tags,
                    Err(e) => {
                        let p = failed(&u.name, pattern, e.to_string());
                        progress(&p);
                        done.push(p);
                        continue;
                    }
                };
                for tag in tags {
                    let p = self.prefetch_one(&t, &tag).await;
                    progress(&p);
                    done.push(p);
                }
            }
        }
        done
    }

    /// The tags a listed tag stands for: itself, or the upstream's tags its pattern matches.
    async fn resolve_tags(&self, t: &Target, tag: &str) -> Result<Vec<Tag>, CacheError> {
        if !tag.contains(['*', '?', '[']) {
            return Ok(vec![tag.parse()?]);
        }
        let pattern = glob::Pattern::new(tag)
            .map_err(|e| CacheError::Storage(format!("tag pattern {tag:?}: {e}")))?;
        let mut out = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = upstream_tags(t, last.as_deref(), 1000).await?;
            for name in &page.items {
                if pattern.matches(name)
                    && let Ok(tag) = name.parse()
                {
                    out.push(tag);
                }
            }
            match (page.more, page.items.last()) {
                (true, Some(l)) => last = Some(l.clone()),
                _ => return Ok(out),
            }
        }
    }

    async fn prefetch_one(&self, t: &Target, tag: &Tag) -> Prefetched {
        let mut p = Prefetched {
            upstream: t.upstream.name.clone(),
            image: format!("{}:{tag}", t.remote),
            digest: None,
            manifests: 0,
            blobs: 0,
            bytes: 0,
            cached: 0,
            error: None,
        };
        if let Err(e) = self.fill(t, tag, &mut p).await {
            p.error = Some(e.to_string());
        }
        p
    }

    async fn fill(&self, t: &Target, tag: &Tag, p: &mut Prefetched) -> Result<(), CacheError> {
        if t.upstream.availability() == Availability::Down {
            return Err(super::UpstreamError::Unavailable(format!(
                "{} is down; kept what is cached",
                t.upstream.name
            ))
            .into());
        }
        // Revalidate now, whatever the TTL says.
        let key = format!("{}:{tag}", t.local);
        let have = self
            .inner
            .store
            .get_manifest(&t.local, &Reference::Tag(tag.clone()))
            .await
            .ok()
            .map(|m| m.digest);
        self.revalidation(t, tag, key, have.clone()).await?;
        let top = self
            .inner
            .store
            .get_manifest(&t.local, &Reference::Tag(tag.clone()))
            .await?;
        if have.as_ref() != Some(&top.digest) {
            p.manifests += 1;
        }
        p.digest = Some(top.digest.clone());
        let mut pending = vec![top];
        while let Some(m) = pending.pop() {
            self.inner.store.record_manifest_pull(&t.local, &m.digest);
            let parsed = Manifest::parse(m.bytes.clone(), &m.media_type, m.digest.clone())?;
            for r in &parsed.references {
                match r.kind {
                    RefKind::Manifest => {
                        let reference = Reference::Digest(r.digest.clone());
                        let known = self
                            .inner
                            .store
                            .get_manifest(&t.local, &reference)
                            .await
                            .is_ok();
                        let child = self.manifest(t, &reference, false).await?;
                        if !known {
                            p.manifests += 1;
                        }
                        pending.push(child);
                    }
                    RefKind::Blob if r.required => self.warm_blob(t, &r.digest, p).await?,
                    RefKind::Blob => {} // non-distributable layers are not fetched
                }
            }
        }
        Ok(())
    }

    /// Starts fetching the blobs image manifest `m` names that the cache lacks, in the
    /// background (see the module docs).
    pub(super) fn read_ahead(&self, t: &Target, m: &StoredManifest) {
        let Ok(parsed) = Manifest::parse(m.bytes.clone(), &m.media_type, m.digest.clone()) else {
            return;
        };
        let blobs: Vec<Digest> = parsed
            .references
            .into_iter()
            .filter(|r| r.kind == RefKind::Blob && r.required)
            .map(|r| r.digest)
            .collect();
        if !t.upstream.read_ahead
            || blobs.is_empty()
            || t.upstream.availability() == Availability::Down
        {
            return;
        }
        let (cache, t) = (self.clone(), t.clone());
        tokio::spawn(async move {
            futures_util::stream::iter(blobs)
                .for_each_concurrent(READ_AHEAD_PARALLEL, |d| {
                    let (cache, t) = (&cache, &t);
                    async move {
                        let Ok(_place) = cache.inner.read_ahead.clone().acquire_owned().await
                        else {
                            return;
                        };
                        if let Err(e) = cache.fetch_blob(t, &d).await {
                            tracing::debug!(upstream = %t.upstream.name, repo = %t.local, digest = %d, error = %e, "read-ahead of a blob failed; a client's GET fetches it");
                        }
                    }
                })
                .await;
        });
    }

    /// Fetches `d` into the cache unless it is there, without counting a hit or a miss (the
    /// client's own GET counts).
    async fn fetch_blob(&self, t: &Target, d: &Digest) -> Result<(), CacheError> {
        if self.stored_size(t, d).await?.is_some() {
            return Ok(());
        }
        let i = &self.inner;
        if let Some((_, body)) = i.blobs.get(&i.store, &i.relay, &i.spool, t, d).await? {
            drain(d, body.whole()).await?;
        }
        Ok(())
    }

    async fn warm_blob(
        &self,
        t: &Target,
        d: &Digest,
        p: &mut Prefetched,
    ) -> Result<(), CacheError> {
        match self.blob(t, d, false).await? {
            BlobAnswer::Local { .. } => p.cached += 1,
            BlobAnswer::Head { .. } => {}
            BlobAnswer::Stream { body, .. } => {
                p.bytes += drain(d, body.whole()).await?;
                p.blobs += 1;
            }
        }
        Ok(())
    }
}

/// Reads the stream of a cache fill of `d` to its end (the fill stores while it streams and
/// verifies at the end); its length.
async fn drain(d: &Digest, mut body: berth_storage::ByteStream) -> Result<u64, CacheError> {
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        n += chunk
            .map_err(|e| CacheError::Storage(format!("blob {d}: {e}")))?
            .len() as u64;
    }
    Ok(n)
}

fn failed(upstream: &str, image: &str, error: String) -> Prefetched {
    Prefetched {
        upstream: upstream.to_owned(),
        image: image.to_owned(),
        digest: None,
        manifests: 0,
        blobs: 0,
        bytes: 0,
        cached: 0,
        error: Some(error),
    }
}

impl std::fmt::Display for Prefetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.upstream, self.image)?;
        if let Some(d) = &self.digest {
            write!(f, " {d}")?;
        }
        match &self.error {
            Some(e) => write!(f, ": FAILED: {e}"),
            None => write!(
                f,
                ": {} manifests and {} blobs ({} bytes) fetched, {} blobs already cached",
                self.manifests, self.blobs, self.bytes, self.cached
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn listed_images_split_into_repository_and_tag() {
        assert_eq!(split("library/alpine:3.20"), ("library/alpine", "3.20"));
        assert_eq!(split("library/alpine"), ("library/alpine", "latest"));
        assert_eq!(split("org/app:1.*"), ("org/app", "1.*"));
    }
}
