//! A small HTTP client for registries: absolute or relative URLs, buffered bodies, and the
//! Docker token dance (401 challenge → token for the named scope → retry) or Basic auth.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName};
use reqwest::{Method, StatusCode};

/// A response, read whole (conformance bodies are small).
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("body is not JSON ({e}): {}", self.snippet()))
    }

    /// A short printable view of the body.
    pub fn snippet(&self) -> String {
        let s = String::from_utf8_lossy(&self.body);
        let s: String = s.chars().take(200).collect();
        s.replace('\n', " ")
    }

    /// Fails unless the status is one of `want`.
    pub fn expect(&self, want: &[u16]) -> Result<&Self, String> {
        if want.contains(&self.status.as_u16()) {
            Ok(self)
        } else {
            let want: Vec<String> = want.iter().map(u16::to_string).collect();
            Err(format!(
                "expected status {}, got {} {}",
                want.join(" or "),
                self.status.as_u16(),
                self.snippet()
            ))
        }
    }

    /// The first OCI error code in the body, if any.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_owned)
    }
}

/// Registry client.
pub struct Client {
    http: reqwest::Client,
    root: String,
    creds: Option<(String, String)>,
    tokens: Mutex<HashMap<String, String>>,
}

/// A request to send.
pub struct Req<'a> {
    method: Method,
    url: String,
    headers: Vec<(HeaderName, String)>,
    body: Option<Bytes>,
    client: &'a Client,
    auth: bool,
}

impl<'a> Req<'a> {
    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            self.headers.push((n, value.into()));
        }
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sends without credentials, even when the client has some.
    pub fn anonymous(mut self) -> Self {
        self.auth = false;
        self
    }

    /// Sends the request, answering an auth challenge once.
    pub async fn send(self) -> Result<Resp, String> {
        let c = self.client;
        let first = c.send_once(&self, None).await?;
        if first.status != StatusCode::UNAUTHORIZED || !self.auth || c.creds.is_none() {
            return Ok(first);
        }
        let Some(challenge) = first.header("www-authenticate").map(str::to_owned) else {
            return Ok(first);
        };
        let auth = c.authorize(&challenge).await?;
        c.send_once(&self, Some(auth)).await
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `Bearer` or `Basic` (lower-cased).
    pub scheme: String,
    /// The parameters (realm, service, scope…).
    pub params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_owned(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(k, v);
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

impl Client {
    /// A client for the registry at `root` (e.g. `http://127.0.0.1:5000`).
    pub fn new(root: &str, creds: Option<(String, String)>) -> Result<Self, String> {
        // HTTPS registries: rustls with the ring provider (idempotent across clients).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            root: root.trim_end_matches('/').to_owned(),
            creds,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// The registry root URL.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Whether credentials were given.
    pub fn has_creds(&self) -> bool {
        self.creds.is_some()
    }

    /// Resolves a path or absolute URL against the root.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            format!("{}{}", self.root, path_or_url)
        }
    }

    /// Starts a request.
    pub fn req(&self, method: Method, path_or_url: &str) -> Req<'_> {
        Req {
            method,
            url: self.url(path_or_url),
            headers: Vec::new(),
            body: None,
            client: self,
            auth: true,
        }
    }

    async fn send_once(&self, r: &Req<'_>, auth: Option<String>) -> Result<Resp, String> {
        let mut b = self.http.request(r.method.clone(), &r.url);
        for (k, v) in &r.headers {
            b = b.header(k, v);
        }
        let auth = match auth {
            Some(a) => Some(a),
            None if r.auth => self.cached_auth(),
            None => None,
        };
        if let Some(a) = auth {
            b = b.header(reqwest::header::AUTHORIZATION, a);
        }
        if let Some(body) = &r.body {
            b = b.body(body.clone());
        }
        let resp = b
            .send()
            .await
            .map_err(|e| format!("{} {}: {e}", r.method, r.url))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        // A body that cannot be read whole (some registries declare a length they do not send
        // on error answers) counts as empty: checks that need the bytes compare them anyway.
        let body = resp.bytes().await.unwrap_or_default();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    fn cached_auth(&self) -> Option<String> {
        // Reuse the most recent token optimistically; a 401 fetches one for the right scope.
        self.tokens.lock().ok()?.get("last").cloned()
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine as _;
        let (u, p) = self.creds.as_ref()?;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        Some(format!("Basic {enc}"))
    }

    /// Answers a challenge: Basic credentials, or a bearer token from the realm.
    pub async fn authorize(&self, challenge: &str) -> Result<String, String> {
        let c = parse_challenge(challenge)
            .ok_or_else(|| format!("unparsable challenge {challenge:?}"))?;
        let auth = match c.scheme.as_str() {
            "basic" => self.basic().ok_or("no credentials")?,
            "bearer" => format!("Bearer {}", self.token(&c).await?),
            other => return Err(format!("unsupported auth scheme {other:?}")),
        };
        if let Ok(mut t) = self.tokens.lock() {
            t.insert("last".into(), auth.clone());
        }
        Ok(auth)
    }

    /// Fetches a token for a Bearer challenge.
    pub async fn token(&self, c: &Challenge) -> Result<String, String> {
        let realm = c.params.get("realm").ok_or("challenge without realm")?;
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = c.params.get("service") {
            q.push(("service", s));
        }
        if let Some(scope) = c.params.get("scope") {
            for s in scope.split(' ') {
                q.push(("scope", s));
            }
        }
        let mut b = self.http.get(realm).query(&q);
        if let Some(basic) = self.basic() {
            b = b.header(reqwest::header::AUTHORIZATION, basic);
        }
        let resp = b.send().await.map_err(|e| format!("token request: {e}"))?;
        let status = resp.status();
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("token response: {e}"))?;
        if !status.is_success() {
            return Err(format!("token endpoint answered {status}: {v}"));
        }
        v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("token response without token: {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://a/token",service="reg",scope="repository:x/y:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://a/token");
        assert_eq!(c.params["scope"], "repository:x/y:pull,push");
        let c = parse_challenge(r#"Basic realm="Registry""#).unwrap();
        assert_eq!(c.scheme, "basic");
    }
}
