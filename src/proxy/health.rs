//! Health of one upstream endpoint: a circuit breaker, so that a failing upstream costs
//! clients nothing.
//!
//! - **Up**: requests go.
//! - **Down** after a timeout, a refused connection, a 5xx or a 429: for a backoff that doubles
//!   with each failure in a row (from [`BACKOFF_MIN`] up to [`BACKOFF_MAX`], ±20 % jitter, at
//!   least the upstream's `Retry-After`), requests fail at once and cached tags are served
//!   stale without waiting. When the backoff has passed, the next request starts one probe in
//!   the background (a `GET /v2/` of the endpoint, see `Upstream`) and still fails at once; the
//!   probe's answer brings the endpoint back up, or starts a longer backoff. No client ever
//!   waits on a down endpoint.
//! - **Credentials refused** (a 401/403 to our login): an operator error, not an outage. No
//!   new login is tried for a backoff from [`REFUSED_MIN`] up to [`REFUSED_MAX`], so a wrong
//!   password does not lock the account at Docker Hub; requests meanwhile get the same error at
//!   once.
//!
//! Every change of state is logged once and counted (`berth_proxy_upstream_state_changes_total`,
//! `berth_proxy_upstream_up`, `berth_proxy_upstream_credentials_refused_total`).
//!
//! The state is per process: each replica learns an upstream's health from its own requests.
//! That is safe (at worst each replica makes its own probe) and needs no coordination.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// First backoff after an outage.
pub const BACKOFF_MIN: Duration = Duration::from_secs(2);
/// Longest backoff after outages in a row.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// First pause after refused credentials.
pub const REFUSED_MIN: Duration = Duration::from_secs(30);
/// Longest pause after refusals in a row.
pub const REFUSED_MAX: Duration = Duration::from_secs(900);

#[derive(Debug, Default)]
struct State {
    failures: u32,
    down_until: Option<Instant>,
    probing: bool,
    last_error: String,
    /// The last failure was a 429: while down, answer as rate-limited.
    rate_limited: bool,
    refusals: u32,
    refused_until: Option<Instant>,
    refusal: String,
}

/// One endpoint's health.
#[derive(Debug)]
pub struct Health {
    upstream: String,
    url: String,
    state: Mutex<State>,
}

/// What a request to the endpoint may do now.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead.
    Go,
    /// The endpoint is down and due for its probe: start it (holding this guard) and fail.
    Probe(ProbeGuard),
    /// Down: fail at once.
    Down {
        /// What failed last.
        last_error: String,
        /// When the next probe may go.
        retry_in: Duration,
        /// Whether it went down rate-limiting us (answer 429, not 503).
        rate_limited: bool,
    },
    /// Our credentials were refused recently: do not log in again yet.
    Refused {
        /// What the upstream said.
        message: String,
        /// When the next login may be tried.
        retry_in: Duration,
    },
}

/// Marks a probe as finished if it is dropped before it reports.
#[derive(Debug)]
pub struct ProbeGuard(Arc<Health>);

impl ProbeGuard {
    /// The health the probe reports to.
    pub fn health(&self) -> &Health {
        &self.0
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.state.lock() {
            s.probing = false;
        }
    }
}

/// How an endpoint stands, for deciding whether to wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Up: worth waiting for.
    Up,
    /// Down, and a probe may go now.
    ProbeDue,
    /// Down (or refusing our credentials), no probe yet.
    Down,
}

fn jittered(d: Duration) -> Duration {
    // ±20 %, from the random bits of a v4 UUID (no extra dependency).
    let r = (uuid::Uuid::new_v4().as_u128() % 401) as f64 / 1000.0; // 0.0..=0.4
    d.mul_f64(0.8 + r)
}

fn backoff(min: Duration, max: Duration, n: u32) -> Duration {
    min.saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(max)
}

impl Health {
    /// The health of endpoint `url` of upstream `upstream`, up to begin with.
    pub fn new(upstream: &str, url: &str) -> Self {
        metrics::gauge!("berth_proxy_upstream_up", "upstream" => upstream.to_owned(), "url" => url.to_owned())
            .set(1.0);
        Self {
            upstream: upstream.to_owned(),
            url: url.to_owned(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request may go now.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut s = self.lock();
        let now = Instant::now();
        if let Some(until) = s.refused_until
            && now < until
        {
            return Admission::Refused {
                message: s.refusal.clone(),
                retry_in: until - now,
            };
        }
        match s.down_until {
            None => Admission::Go,
            Some(until) if now < until || s.probing => Admission::Down {
                last_error: s.last_error.clone(),
                retry_in: until.saturating_duration_since(now),
                rate_limited: s.rate_limited,
            },
            Some(_) => {
                s.probing = true;
                Admission::Probe(ProbeGuard(self.clone()))
            }
        }
    }

    /// How the endpoint stands.
    pub fn availability(&self) -> Availability {
        let s = self.lock();
        let now = Instant::now();
        if s.refused_until.is_some_and(|u| now < u) {
            return Availability::Down;
        }
        match s.down_until {
            None => Availability::Up,
            Some(until) if now >= until && !s.probing => Availability::ProbeDue,
            Some(_) => Availability::Down,
        }
    }

    /// The endpoint's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What failed last (a refusal of our credentials first), if anything has.
    pub fn last_error(&self) -> Option<String> {
        let s = self.lock();
        [&s.refusal, &s.last_error]
            .into_iter()
            .find(|e| !e.is_empty())
            .cloned()
    }

    fn labels(&self) -> [(&'static str, String); 2] {
        [
            ("upstream", self.upstream.clone()),
            ("url", self.url.clone()),
        ]
    }

    /// The endpoint answered (whatever it said, it is up).
    pub fn succeeded(&self) {
        let mut s = self.lock();
        s.probing = false;
        if s.down_until.take().is_some() {
            tracing::info!(upstream = %self.upstream, url = %self.url, after_failures = s.failures, "upstream is up again");
            metrics::counter!("berth_proxy_upstream_state_changes_total", &self.labels())
                .increment(1);
            metrics::gauge!("berth_proxy_upstream_up", &self.labels()).set(1.0);
        }
        s.failures = 0;
    }

    /// Our credentials were accepted.
    pub fn credentials_accepted(&self) {
        let mut s = self.lock();
        if s.refused_until.take().is_some() {
            tracing::info!(upstream = %self.upstream, url = %self.url, "upstream accepts our credentials again");
        }
        s.refusals = 0;
    }

    /// The endpoint failed: down for a backoff (at least `retry_after`); `rate_limited` for a
    /// 429.
    pub fn failed(&self, error: &str, retry_after: Option<Duration>, rate_limited: bool) {
        let mut s = self.lock();
        s.probing = false;
        s.rate_limited = rate_limited;
        s.failures = s.failures.saturating_add(1);
        let wait = jittered(backoff(BACKOFF_MIN, BACKOFF_MAX, s.failures))
            .max(retry_after.unwrap_or_default());
        let was_up = s.down_until.is_none();
        s.down_until = Some(Instant::now() + wait);
        s.last_error = error.to_owned();
        if was_up {
            tracing::warn!(upstream = %self.upstream, url = %self.url, error, retry_in_ms = wait.as_millis() as u64, "upstream is down; serving the cache only");
            metrics::counter!("berth_proxy_upstream_state_changes_total", &self.labels())
                .increment(1);
            metrics::gauge!("berth_proxy_upstream_up", &self.labels()).set(0.0);
        } else {
            tracing::debug!(upstream = %self.upstream, url = %self.url, error, retry_in_ms = wait.as_millis() as u64, "upstream probe failed");
        }
    }

    /// Our credentials were refused: no login for a backoff.
    pub fn refused(&self, message: &str) {
        let mut s = self.lock();
        s.probing = false;
        s.refusals = s.refusals.saturating_add(1);
        let wait = jittered(backoff(REFUSED_MIN, REFUSED_MAX, s.refusals));
        s.refused_until = Some(Instant::now() + wait);
        s.refusal = message.to_owned();
        tracing::error!(upstream = %self.upstream, url = %self.url, message, retry_in_s = wait.as_secs(), "upstream refused our credentials; check [[proxy.upstream]] username and password");
        metrics::counter!(
            "berth_proxy_upstream_credentials_refused_total",
            &self.labels()
        )
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(BACKOFF_MIN, BACKOFF_MAX, 1), BACKOFF_MIN);
        assert_eq!(backoff(BACKOFF_MIN, BACKOFF_MAX, 2), BACKOFF_MIN * 2);
        assert_eq!(backoff(BACKOFF_MIN, BACKOFF_MAX, 40), BACKOFF_MAX);
        for _ in 0..100 {
            let j = jittered(Duration::from_secs(10));
            assert!(
                j >= Duration::from_secs(8) && j <= Duration::from_secs(12),
                "{j:?}"
            );
        }
    }

    #[test]
    fn down_endpoints_fail_fast_and_let_one_probe_through() {
        let h = Arc::new(Health::new("up", "http://x"));
        assert!(matches!(h.admit(), Admission::Go));
        h.failed("timeout", None, false);
        assert!(matches!(h.admit(), Admission::Down { .. }));
        assert_eq!(h.availability(), Availability::Down);
        // Once the backoff has passed, exactly one probe goes.
        h.lock().down_until = Some(Instant::now());
        assert_eq!(h.availability(), Availability::ProbeDue);
        let probe = h.admit();
        assert!(matches!(probe, Admission::Probe(_)));
        assert!(
            matches!(h.admit(), Admission::Down { .. }),
            "a second probe"
        );
        drop(probe); // the prober hung up without an answer: the next one may try
        assert!(matches!(h.admit(), Admission::Probe(_)));
        h.succeeded();
        assert!(matches!(h.admit(), Admission::Go));
        assert_eq!(h.lock().failures, 0);
    }

    #[test]
    fn refused_credentials_pause_logins() {
        let h = Arc::new(Health::new("up", "http://x"));
        h.refused("401 from the token service");
        match h.admit() {
            Admission::Refused { retry_in, .. } => assert!(retry_in >= REFUSED_MIN.mul_f64(0.79)),
            other => panic!("{other:?}"),
        }
        h.credentials_accepted();
        assert!(matches!(h.admit(), Admission::Go));
    }
}
