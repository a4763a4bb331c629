//! One upstream registry: its endpoints, credentials, and the Docker token dance.
//!
//! An upstream has one or more endpoints (`urls`: a mirror of Docker Hub, then Hub itself),
//! tried in order; each has its own [`Health`], so a down endpoint is skipped at once until its
//! backoff passes (see [`super::health`]). Requests go out with a cached token for their scope;
//! a `401` is answered by following the endpoint's challenge (a Bearer token from its realm, or
//! Basic credentials) and retrying once. Tokens are cached per endpoint and scope until
//! shortly before they expire. Only the credentials configured for the upstream are ever sent
//! there, never a client's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_auth::Challenge;
use reqwest::{Method, Response, StatusCode, header};

use super::health::{Admission, Availability, Health, ProbeGuard};
use crate::config::UpstreamSection;

/// The `Accept` header for manifests: every type a registry may hold, so nothing is converted.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.oci.artifact.manifest.v1+json";

/// Largest token answer read from a token service: a JWT is a few KiB.
const TOKEN_ANSWER_LIMIT: usize = 1 << 20;

/// Reads a whole upstream answer that is held in memory (a manifest, a tag list, a token),
/// refusing it as soon as it passes `limit` bytes, whatever its `Content-Length` said or
/// whether it had one: an upstream streaming without end must cost a bounded buffer, not the
/// process. `what` names it in the error.
async fn read_capped(
    mut r: Response,
    limit: usize,
    what: &str,
) -> Result<bytes::Bytes, UpstreamError> {
    let too_big = || UpstreamError::BadContent(format!("{what} larger than {limit} bytes"));
    if r.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| UpstreamError::Unavailable(format!("reading {what}: {e}")))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(too_big());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Why an upstream request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream does not have it (or will not show it to us).
    #[error("{0}")]
    NotFound(String),
    /// The upstream rate-limits us.
    #[error("upstream rate limit: {message}")]
    RateLimited {
        /// Seconds to wait, when the upstream said.
        retry_after: Option<String>,
        /// What it said.
        message: String,
    },
    /// The upstream is down, unreachable, slow or answering errors.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// What the upstream sent does not match what was asked for.
    #[error("upstream sent bad content: {0}")]
    BadContent(String),
    /// The upstream refused the credentials configured for it (or wants some and none are
    /// configured): the operator must fix `[[proxy.upstream]]`.
    #[error("{0}")]
    CredentialsRefused(String),
}

impl UpstreamError {
    /// Whether the upstream failed (rather than said no): the endpoint counts as down.
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Unavailable(_))
    }

    /// Whether cached content may stand in for the upstream's answer: it failed, or it will
    /// not let us in; either way clients are better served by what the cache holds.
    pub fn cache_may_answer(&self) -> bool {
        self.is_outage() || matches!(self, Self::CredentialsRefused(_))
    }
}

/// One URL of an upstream, with its health.
#[derive(Debug)]
struct Endpoint {
    base: String,
    health: Arc<Health>,
}

/// A configured upstream registry.
#[derive(Debug)]
pub struct Upstream {
    /// Host name clients use for it (`docker.io`).
    pub name: String,
    /// Path prefixes selecting it (its name when that is a valid component, plus aliases).
    pub prefixes: Vec<String>,
    /// Local repositories caching it live under `<prefix>/`.
    pub cache_prefix: String,
    /// Plain names come from here.
    pub default: bool,
    /// Tag freshness.
    pub tag_ttl: Duration,
    /// How long past the TTL a tag may be served while the upstream fails.
    pub max_stale: Option<Duration>,
    /// Images kept warm (`repository:tag`, the tag may hold `*` and `?`).
    pub prefetch: Vec<String>,
    /// Whether a manifest GET the cache had to fetch starts fetching the image's blobs.
    pub read_ahead: bool,
    /// What this process's cache did for it (the web UI's cache page).
    pub stats: super::stats::Stats,
    endpoints: Vec<Endpoint>,
    hub: bool,
    credentials: Option<(String, String)>,
    client: reqwest::Client,
    /// How long an answer may keep us waiting: for each read, and for the whole of an answer
    /// held in memory.
    timeout: Duration,
    /// (endpoint, scope) → token and when to stop using it.
    tokens: Mutex<HashMap<(usize, String), (String, Instant)>>,
}

fn normalize_host(h: &str) -> String {
    let lower = h.trim().to_ascii_lowercase();
    let h = lower.strip_suffix(":443").unwrap_or(&lower);
    match h {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => h.to_owned(),
    }
}

/// The path prefixes that select upstream `cfg` (its name when that is a valid path
/// component, plus its aliases) and the prefix its cached repositories live under.
pub fn path_prefixes(cfg: &UpstreamSection) -> (Vec<String>, String) {
    let name = normalize_host(&cfg.name);
    let valid_component = name.parse::<berth_storage::RepoName>().is_ok() && !name.contains('/');
    let mut prefixes: Vec<String> = Vec::new();
    if valid_component {
        prefixes.push(name.clone());
    }
    prefixes.extend(cfg.aliases.iter().cloned());
    let cache_prefix = prefixes
        .first()
        .cloned()
        .unwrap_or_else(|| name.replace(':', "-"));
    (prefixes, cache_prefix)
}

impl Upstream {
    /// Reads a whole answer of this upstream into memory: up to `limit` bytes (see
    /// [`read_capped`]) and within the upstream's `timeout` for the whole body, not only for
    /// each read. An upstream that trickles a byte at a time never trips a read timeout, and
    /// would hold every client of a tag (and the cached copy that could answer them) for as
    /// long as it pleased; past the deadline it counts as unavailable, so the cache answers.
    ///
    /// The endpoint that trickled is marked down like one that timed out, so the clients that
    /// come while it backs off get the cache at once.
    pub async fn read_whole(
        &self,
        r: Response,
        limit: usize,
        what: &str,
    ) -> Result<bytes::Bytes, UpstreamError> {
        let url = r.url().to_string();
        if let Some(read) = self.read_in_time(r, limit, what).await {
            return read;
        }
        let e = self.not_in_time(what);
        if let Some(ep) = self.endpoints.iter().find(|ep| url.starts_with(&ep.base)) {
            ep.health.failed(&e.to_string(), None, false);
        }
        Err(e)
    }

    /// [`read_capped`] within the upstream's `timeout` for the whole body; `None` when the
    /// time ran out. Marks nothing down: [`Self::read_whole`] does for answers read after the
    /// request succeeded, and a token answer, read inside [`Self::send_to`], fails the request,
    /// which its caller counts against the endpoint (marking it here too would count one
    /// failure twice and double the backoff).
    async fn read_in_time(
        &self,
        r: Response,
        limit: usize,
        what: &str,
    ) -> Option<Result<bytes::Bytes, UpstreamError>> {
        tokio::time::timeout(self.timeout, read_capped(r, limit, what))
            .await
            .ok()
    }

    fn not_in_time(&self, what: &str) -> UpstreamError {
        UpstreamError::Unavailable(format!(
            "{}: {what} not read whole within {:?}",
            self.name, self.timeout
        ))
    }

    /// Builds the upstream from its configuration.
    pub fn new(cfg: &UpstreamSection) -> Result<Self, String> {
        let name = normalize_host(&cfg.name);
        let hub = name == "docker.io";
        let mut urls: Vec<String> = cfg.urls.clone();
        if let Some(u) = &cfg.url {
            urls.insert(0, u.clone());
        }
        if urls.is_empty() {
            urls.push(if hub {
                "https://registry-1.docker.io".to_owned()
            } else {
                format!("https://{name}")
            });
        }
        let endpoints = urls
            .iter()
            .map(|u| {
                let base = u.trim_end_matches('/').to_owned();
                Endpoint {
                    health: Arc::new(Health::new(&name, &base)),
                    base,
                }
            })
            .collect();
        let password = match &cfg.password_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("{}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => cfg.password.clone(),
        };
        let credentials = cfg
            .username
            .clone()
            .map(|u| (u, password.unwrap_or_default()));
        let (prefixes, cache_prefix) = path_prefixes(cfg);
        crate::tls::install_crypto();
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            .read_timeout(cfg.timeout)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            name,
            prefixes,
            cache_prefix,
            default: cfg.default,
            tag_ttl: cfg.tag_ttl,
            max_stale: cfg.max_stale,
            prefetch: cfg.prefetch.clone(),
            read_ahead: cfg.read_ahead,
            stats: super::stats::Stats::default(),
            endpoints,
            hub,
            credentials,
            client,
            timeout: cfg.timeout,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `ns` (a containerd `?ns=` value) names this upstream.
    pub fn matches_ns(&self, ns: &str) -> bool {
        normalize_host(ns) == self.name
    }

    /// The upstream's name for a repository: Docker Hub keeps official images under
    /// `library/`.
    pub fn remote_name(&self, repo: &str) -> String {
        if self.hub && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_owned()
        }
    }

    /// Its endpoints' health, in the order they are tried.
    pub fn health(&self) -> impl Iterator<Item = &Health> {
        self.endpoints.iter().map(|e| &*e.health)
    }

    /// The URLs of its endpoints, in the order they are tried.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|e| e.base.as_str())
    }

    /// The best any endpoint can offer now (see [`Availability`]).
    pub fn availability(&self) -> Availability {
        let all = self.endpoints.iter().map(|e| e.health.availability());
        all.fold(Availability::Down, |best, a| match (best, a) {
            (Availability::Up, _) | (_, Availability::Up) => Availability::Up,
            (Availability::ProbeDue, _) | (_, Availability::ProbeDue) => Availability::ProbeDue,
            _ => Availability::Down,
        })
    }

    fn cached_token(&self, ep: usize, scope: &str) -> Option<String> {
        let t = self.tokens.lock().ok()?;
        t.get(&(ep, scope.to_owned()))
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(tok, _)| tok.clone())
    }

    fn refusal(&self, what: &str, status: StatusCode) -> UpstreamError {
        UpstreamError::CredentialsRefused(match &self.credentials {
            Some((user, _)) => format!(
                "upstream {} refused the credentials configured for it (user {user:?}): {what} answered {status}; fix username/password in its [[proxy.upstream]] section",
                self.name
            ),
            None => format!(
                "upstream {} wants credentials and none are configured: {what} answered {status}; set username/password in its [[proxy.upstream]] section",
                self.name
            ),
        })
    }

    async fn fetch_token(
        &self,
        ep: usize,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        let mut req = self
            .client
            .get(realm)
            .query(&[("service", service), ("scope", scope)]);
        if let Some((u, p)) = &self.credentials {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| UpstreamError::Unavailable(format!("token from {realm}: {e}")))?;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::RateLimited {
                retry_after: retry_after(&resp),
                message: format!("token endpoint {realm}"),
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(self.refusal(&format!("its token service {realm}"), status));
        }
        if !status.is_success() {
            return Err(UpstreamError::Unavailable(format!(
                "token service {realm} answered {status}"
            )));
        }
        let body = match self
            .read_in_time(resp, TOKEN_ANSWER_LIMIT, "token answer")
            .await
        {
            Some(read) => read?,
            None => return Err(self.not_in_time("token answer")),
        };
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| UpstreamError::Unavailable(format!("token answer: {e}")))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| UpstreamError::Unavailable("token answer without a token".into()))?
            .to_owned();
        let lifetime = v["expires_in"].as_u64().unwrap_or(60).max(60);
        // Renew a little early, so a token never expires on the way.
        let until = Instant::now() + Duration::from_secs(lifetime - lifetime / 10);
        if let Ok(mut t) = self.tokens.lock() {
            t.insert((ep, scope.to_owned()), (token.clone(), until));
        }
        Ok(token)
    }

    /// Sends `method` to `/v2/<remote>/<suffix>` (suffix may carry a query), trying the
    /// endpoints in order (skipping those that are down) and authenticating as each asks.
    /// Success statuses come back as the response; others as errors. Every answer and failure
    /// updates the endpoint's health.
    pub async fn send(
        &self,
        method: Method,
        remote: &str,
        suffix: &str,
        accept: Option<&str>,
    ) -> Result<Response, UpstreamError> {
        let mut last: Option<UpstreamError> = None;
        for (i, ep) in self.endpoints.iter().enumerate() {
            match ep.health.admit() {
                Admission::Go => {}
                Admission::Probe(guard) => {
                    self.start_probe(&ep.base, guard);
                    last = Some(UpstreamError::Unavailable(format!(
                        "{} ({}) is down; checking whether it is back",
                        self.name, ep.base
                    )));
                    continue;
                }
                Admission::Down {
                    last_error,
                    retry_in,
                    rate_limited,
                } => {
                    let secs = retry_in.as_secs() + 1;
                    last = Some(if rate_limited {
                        UpstreamError::RateLimited {
                            retry_after: Some(secs.to_string()),
                            message: format!("{} ({}): {last_error}", self.name, ep.base),
                        }
                    } else {
                        UpstreamError::Unavailable(format!(
                            "{} ({}) is down after: {last_error}; next try in {secs} s",
                            self.name, ep.base
                        ))
                    });
                    continue;
                }
                Admission::Refused { message, retry_in } => {
                    last = Some(UpstreamError::CredentialsRefused(format!(
                        "{message} (no new login for {} s)",
                        retry_in.as_secs() + 1
                    )));
                    continue;
                }
            }
            match self.send_to(i, ep, &method, remote, suffix, accept).await {
                Ok(resp) => {
                    ep.health.succeeded();
                    return Ok(resp);
                }
                Err(e @ (UpstreamError::Unavailable(_) | UpstreamError::RateLimited { .. })) => {
                    let (wait, limited) = match &e {
                        UpstreamError::RateLimited { retry_after, .. } => (
                            retry_after
                                .as_deref()
                                .and_then(|r| r.trim().parse().ok())
                                .map(Duration::from_secs),
                            true,
                        ),
                        _ => (None, false),
                    };
                    ep.health.failed(&e.to_string(), wait, limited);
                    last = Some(e);
                }
                Err(e @ UpstreamError::CredentialsRefused(_)) => {
                    ep.health.refused(&e.to_string());
                    last = Some(e);
                }
                Err(e) => {
                    ep.health.succeeded();
                    return Err(e);
                }
            }
        }
        Err(last
            .unwrap_or_else(|| UpstreamError::Unavailable(format!("{}: no endpoints", self.name))))
    }

    /// Starts the probes that are due (see [`super::health`]), without waiting for them.
    pub fn probe_if_due(&self) {
        for ep in &self.endpoints {
            if ep.health.availability() == Availability::ProbeDue
                && let Admission::Probe(guard) = ep.health.admit()
            {
                self.start_probe(&ep.base, guard);
            }
        }
    }

    /// A `GET /v2/` of a down endpoint, in the background: any HTTP answer (a 401 included)
    /// means it is back.
    fn start_probe(&self, base: &str, guard: ProbeGuard) {
        let (client, url) = (self.client.clone(), format!("{base}/v2/"));
        tokio::spawn(async move {
            match client.get(&url).send().await {
                Ok(r) if !r.status().is_server_error() => guard.health().succeeded(),
                Ok(r) => {
                    guard
                        .health()
                        .failed(&format!("probe {url}: {}", r.status()), None, false)
                }
                Err(e) => guard
                    .health()
                    .failed(&format!("probe {url}: {e}"), None, false),
            }
        });
    }

    async fn send_to(
        &self,
        i: usize,
        ep: &Endpoint,
        method: &Method,
        remote: &str,
        suffix: &str,
        accept: Option<&str>,
    ) -> Result<Response, UpstreamError> {
        let url = format!("{}/v2/{remote}/{suffix}", ep.base);
        let scope = format!("repository:{remote}:pull");
        let build = |auth: Option<&Auth>| {
            let mut req = self.client.request(method.clone(), &url);
            if let Some(a) = accept {
                req = req.header(header::ACCEPT, a);
            }
            match auth {
                Some(Auth::Bearer(t)) => req.bearer_auth(t),
                Some(Auth::Basic(u, p)) => req.basic_auth(u, Some(p)),
                None => req,
            }
        };
        let first = self.cached_token(i, &scope).map(Auth::Bearer);
        let mut resp = self.go(build(first.as_ref())).await?;
        let mut sent: Option<Auth> = first;
        if resp.status() == StatusCode::UNAUTHORIZED {
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse);
            let auth = match challenge {
                Some(Challenge::Bearer { realm, service, .. }) => Some(Auth::Bearer(
                    self.fetch_token(i, &realm, &service, &scope).await?,
                )),
                Some(Challenge::Basic { .. }) => {
                    self.credentials.clone().map(|(u, p)| Auth::Basic(u, p))
                }
                None => None,
            };
            if auth.is_some() {
                resp = self.go(build(auth.as_ref())).await?;
                sent = auth;
            }
        }
        self.record_rate_limit(&resp);
        let status = resp.status();
        if status.is_success() {
            if sent.is_some() {
                ep.health.credentials_accepted();
            }
            return Ok(resp);
        }
        let what = format!("{method} {remote}/{suffix} at {}", self.name);
        Err(match status {
            StatusCode::NOT_FOUND => UpstreamError::NotFound(format!("{what}: not found")),
            // Basic credentials the registry itself refused.
            StatusCode::UNAUTHORIZED if matches!(sent, Some(Auth::Basic(..))) => {
                self.refusal(&format!("{} (Basic)", ep.base), status)
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                // With a token it granted us: the repository is private or absent (Docker Hub
                // answers 401 for both).
                UpstreamError::NotFound(format!("{what}: not readable with our credentials"))
            }
            StatusCode::TOO_MANY_REQUESTS => {
                metrics::counter!("berth_proxy_upstream_rate_limited_total", "upstream" => self.name.clone())
                    .increment(1);
                UpstreamError::RateLimited {
                    retry_after: retry_after(&resp),
                    message: what,
                }
            }
            s => UpstreamError::Unavailable(format!("{what}: {s}")),
        })
    }

    /// `method` on `manifests/<reference>`, accepting every manifest type.
    pub async fn manifest(
        &self,
        method: Method,
        remote: &str,
        reference: &str,
    ) -> Result<Response, UpstreamError> {
        self.send(
            method,
            remote,
            &format!("manifests/{reference}"),
            Some(MANIFEST_ACCEPT),
        )
        .await
    }

    async fn go(&self, req: reqwest::RequestBuilder) -> Result<Response, UpstreamError> {
        req.send().await.map_err(|e| {
            metrics::counter!("berth_proxy_upstream_errors_total", "upstream" => self.name.clone())
                .increment(1);
            UpstreamError::Unavailable(format!("{}: {e}", self.name))
        })
    }

    /// Docker Hub's `ratelimit-remaining: 76;w=21600` as a gauge.
    fn record_rate_limit(&self, resp: &Response) {
        if let Some(n) = resp
            .headers()
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .and_then(|n| n.trim().parse::<f64>().ok())
        {
            metrics::gauge!("berth_proxy_upstream_ratelimit_remaining", "upstream" => self.name.clone())
                .set(n);
        }
    }
}

enum Auth {
    Bearer(String),
    Basic(String, String),
}

fn retry_after(resp: &Response) -> Option<String> {
    resp.headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(name: &str, aliases: &[&str]) -> Upstream {
        Upstream::new(&UpstreamSection {
            name: name.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            ..UpstreamSection::default()
        })
        .unwrap()
    }

    #[test]
    fn docker_hub_quirks() {
        let hub = up("docker.io", &[]);
        assert_eq!(
            hub.urls().collect::<Vec<_>>(),
            ["https://registry-1.docker.io"]
        );
        assert_eq!(hub.remote_name("alpine"), "library/alpine");
        assert_eq!(hub.remote_name("library/alpine"), "library/alpine");
        assert_eq!(hub.remote_name("bitnami/redis"), "bitnami/redis");
        for ns in [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "DOCKER.IO:443",
        ] {
            assert!(hub.matches_ns(ns), "{ns}");
        }
        assert!(!hub.matches_ns("ghcr.io"));
        let ghcr = up("ghcr.io", &[]);
        assert_eq!(ghcr.remote_name("alpine"), "alpine");
        assert_eq!(ghcr.urls().collect::<Vec<_>>(), ["https://ghcr.io"]);
    }

    #[test]
    fn names_with_ports_need_an_alias_for_paths() {
        let u = up("127.0.0.1:5001", &["local-5001"]);
        assert_eq!(u.prefixes, ["local-5001"]);
        assert_eq!(u.cache_prefix, "local-5001");
        assert!(u.matches_ns("127.0.0.1:5001"));
        let bare = up("reg.example:5000", &[]);
        assert!(bare.prefixes.is_empty());
        assert_eq!(bare.cache_prefix, "reg.example-5000");
    }

    #[test]
    fn tools_without_a_proxy_know_the_cache_namespaces() {
        let mut config = crate::config::Config::default();
        for (name, aliases) in [("docker.io", vec!["hub"]), ("reg.example:5000", vec![])] {
            config.proxy.upstream.push(UpstreamSection {
                name: name.into(),
                aliases: aliases.into_iter().map(str::to_owned).collect(),
                ..UpstreamSection::default()
            });
        }
        let names = crate::proxy::cache_namespaces(&config);
        for ns in ["docker.io", "hub", "reg.example-5000"] {
            assert!(names.iter().any(|n| n == ns), "{ns} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n == "team"));
    }
}
