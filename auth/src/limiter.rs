//! Failed-login limiting per client address.
//!
//! After `max` failures within `window`, further attempts from that address are refused until
//! the window has passed since the first failure; a success clears the count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; beyond it, expired entries are dropped first.
const TRACKED_MAX: usize = 65_536;

/// Counts failed logins per address.
#[derive(Debug)]
pub struct LoginLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginLimiter {
    /// At most `max` failures per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when `ip` must wait before trying again.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Ok(f) = self.failures.lock() else {
            return Ok(());
        };
        match f.get(&ip) {
            Some(&(n, since)) if n >= self.max && since.elapsed() < self.window => {
                Err(self.window - since.elapsed())
            }
            _ => Ok(()),
        }
    }

    /// Records a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let Ok(mut f) = self.failures.lock() else {
            return;
        };
        if f.len() >= TRACKED_MAX {
            let window = self.window;
            f.retain(|_, (_, since)| since.elapsed() < window);
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= self.window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        if e.0 == self.max {
            tracing::warn!(client = %ip, failures = e.0, "too many failed logins; client blocked for a while");
        }
    }

    /// Records a successful login from `ip`.
    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_max_failures_until_the_window_passes() {
        let l = LoginLimiter::new(3, Duration::from_millis(200));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
            l.failed(a);
        }
        assert!(l.check(a).is_err());
        assert!(l.check(b).is_ok(), "other addresses are not affected");
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.check(a).is_ok());
        l.failed(b);
        l.succeeded(b);
        l.failed(b);
        l.failed(b);
        assert!(l.check(b).is_ok(), "a success clears the count");
    }
}
