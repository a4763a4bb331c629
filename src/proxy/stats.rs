//! What this process's cache did for each upstream, for the web UI's cache page: hits and
//! misses, bytes fetched from the upstream and bytes served from the cache, and the images
//! pulled most. Per process and since it started (the Prometheus counters carry the same
//! figures for a fleet-wide view); the most-pulled table keeps at most [`TRACKED`] images.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Images whose pulls are counted; past it, new images are not counted until restart.
pub const TRACKED: usize = 10_000;

/// One upstream's counters.
#[derive(Debug, Default)]
pub struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    fetched_bytes: AtomicU64,
    served_bytes: AtomicU64,
    pulls: Mutex<HashMap<String, u64>>,
}

/// A copy of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Requests answered from the cache.
    pub hits: u64,
    /// Requests that went to the upstream.
    pub misses: u64,
    /// Blob bytes fetched from the upstream.
    pub fetched_bytes: u64,
    /// Blob bytes served from the cache.
    pub served_bytes: u64,
    /// The most pulled images (`repository:reference`, pulls), most first.
    pub top: Vec<(String, u64)>,
}

impl Stats {
    /// A request answered from the cache.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that went to the upstream.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Blob bytes fetched from the upstream.
    pub fn fetched(&self, n: u64) {
        self.fetched_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Blob bytes served from the cache.
    pub fn served(&self, n: u64) {
        self.served_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// A manifest pull of `image`.
    pub fn pulled(&self, image: &str) {
        let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pulls.get_mut(image) {
            *n += 1;
        } else if pulls.len() < TRACKED {
            pulls.insert(image.to_owned(), 1);
        }
    }

    /// The counters now, with the `top` most pulled images.
    pub fn snapshot(&self, top: usize) -> Snapshot {
        let mut images: Vec<(String, u64)> = self
            .pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        images.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        images.truncate(top);
        Snapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            served_bytes: self.served_bytes.load(Ordering::Relaxed),
            top: images,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_pulled_come_first_and_the_table_stays_bounded() {
        let s = Stats::default();
        for _ in 0..3 {
            s.pulled("a:1");
        }
        s.pulled("b:1");
        for i in 0..TRACKED + 10 {
            s.pulled(&format!("x{i}:1"));
        }
        s.pulled("a:1");
        s.hit();
        s.miss();
        s.miss();
        s.served(10);
        s.fetched(4);
        let snap = s.snapshot(2);
        assert_eq!(snap.top, [("a:1".to_owned(), 4), ("b:1".to_owned(), 1)]);
        assert_eq!((snap.hits, snap.misses), (1, 2));
        assert_eq!((snap.served_bytes, snap.fetched_bytes), (10, 4));
        assert_eq!(s.pulls.lock().unwrap().len(), TRACKED);
    }
}
