//! Background jobs: pull-time flushes, upload expiry, scheduled garbage collection, cache
//! eviction and prefetch.
//!
//! Background jobs. Each is a `run_once` plus a loop on an interval, spawned on one
//! [`TaskTracker`] and stopped through one [`CancellationToken`], so shutdown waits for them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::state::AppState;

/// How often recorded pull times are written.
const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// How often queued metric samples are folded into histograms.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How often the pull-through cache is held to its size cap and maximum age.
const EVICT_EVERY: Duration = Duration::from_secs(5 * 60);
/// How often the data directory's free space is looked at (reserve back, pushes accepted).
const DISK_EVERY: Duration = Duration::from_secs(2);
/// How often stale upload sessions are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(15 * 60);

/// The running jobs.
pub struct Jobs {
    cancel: CancellationToken,
    tracker: TaskTracker,
    state: AppState,
}

impl Jobs {
    /// Starts every job.
    pub fn start(state: &AppState) -> Self {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let s = state.clone();
        tracker.spawn(every(FLUSH_EVERY, cancel.clone(), move || {
            let s = s.clone();
            async move {
                if let Err(e) = s.store().flush_access().await {
                    warn!(error = %e, "writing pull times failed");
                }
            }
        }));
        let disk = state.disk.clone();
        tracker.spawn(every(DISK_EVERY, cancel.clone(), move || {
            let disk = disk.clone();
            async move {
                let _ = tokio::task::spawn_blocking(move || disk.recheck()).await;
            }
        }));
        let s = state.clone();
        tracker.spawn(every(EXPIRE_EVERY, cancel.clone(), move || {
            let s = s.clone();
            async move {
                if let Err(e) = s
                    .store()
                    .expire_uploads(s.config.registry.upload_expiry)
                    .await
                {
                    warn!(error = %e, "expiring upload sessions failed");
                }
            }
        }));
        // The Prometheus recorder queues histogram samples until they are folded into their
        // buckets: without this, memory would grow with every request between scrapes.
        tracker.spawn(every(UPKEEP_EVERY, cancel.clone(), || async {
            crate::metrics::handle().run_upkeep();
        }));
        let gc_every = state.config.gc.interval;
        if !gc_every.is_zero() {
            let s = state.clone();
            tracker.spawn(every(gc_every, cancel.clone(), move || {
                let s = s.clone();
                async move {
                    // The run is recorded in the database, where `/metrics` reads it.
                    match s.store().gc(&s.config.gc_policy(), false).await {
                        Ok(_) => {}
                        Err(berth_storage::Error::Busy { holder, .. }) => {
                            tracing::info!(%holder, "scheduled garbage collection skipped: another one is running")
                        }
                        Err(e) => warn!(error = %e, "garbage collection failed"),
                    }
                }
            }));
        }
        if let Some(proxy) = state.registry.proxy().cloned()
            && (proxy.evict_policy().max_bytes.is_some() || proxy.evict_policy().max_age.is_some())
        {
            let s = state.clone();
            tracker.spawn(every(EVICT_EVERY, cancel.clone(), move || {
                let (s, p) = (s.clone(), proxy.clone());
                async move {
                    match s.store().evict_cache(p.evict_policy()).await {
                        Ok(r) => {
                            metrics::gauge!("berth_proxy_cache_bytes").set(r.bytes_after as f64);
                            p.evicted(r);
                        }
                        Err(berth_storage::Error::Busy { holder, .. }) => {
                            tracing::debug!(%holder, "cache eviction skipped: another process is evicting")
                        }
                        Err(e) => warn!(error = %e, "cache eviction failed"),
                    }
                }
            }));
        }
        if let Some(proxy) = state.registry.proxy().cloned()
            && proxy.has_prefetch()
        {
            let s = state.clone();
            tracker.spawn(every(
                state.config.proxy.prefetch_interval,
                cancel.clone(),
                move || {
                    let (s, p) = (s.clone(), proxy.clone());
                    async move { prefetch_once(&s, &p).await }
                },
            ));
        }
        tracker.close();
        Self {
            cancel,
            tracker,
            state: state.clone(),
        }
    }

    /// Stops the jobs, waits for them, and writes pending pull times.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.wait().await;
        if let Err(e) = self.state.store().flush_access().await {
            warn!(error = %e, "writing pull times at shutdown failed");
        }
    }
}

/// One scheduled prefetch run, under the cluster-wide `prefetch` lease.
async fn prefetch_once(state: &AppState, proxy: &crate::proxy::Proxy) {
    use crate::proxy::prefetch::{LEASE, LEASE_TTL};
    let held = match state.store().hold_lease(LEASE, LEASE_TTL).await {
        Ok(h) => h,
        Err(berth_storage::Error::Busy { holder, .. }) => {
            tracing::info!(%holder, "scheduled prefetch skipped: another one is running");
            return;
        }
        Err(e) => {
            warn!(error = %e, "prefetch lease");
            return;
        }
    };
    let done = proxy
        .prefetch(|p| match &p.error {
            None => tracing::info!(upstream = %p.upstream, image = %p.image, manifests = p.manifests, blobs = p.blobs, bytes = p.bytes, cached = p.cached, "prefetched"),
            Some(e) => warn!(upstream = %p.upstream, image = %p.image, error = %e, "prefetch failed"),
        })
        .await;
    metrics::gauge!("berth_proxy_prefetch_failed_images")
        .set(done.iter().filter(|p| p.error.is_some()).count() as f64);
    if let Err(e) = held.release().await {
        warn!(error = %e, "releasing the prefetch lease");
    }
}

async fn every<F, Fut>(period: Duration, cancel: CancellationToken, mut run_once: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => run_once().await,
        }
    }
}
