//! `berth-conformance`: a black-box checker of the OCI distribution spec over HTTP.
//!
//! It runs the four workflows of the official OCI conformance suite — pull, push, content
//! discovery, content management — check by check, plus checks real clients depend on and that
//! suite misses (chunk boundaries, digest mismatches, manifest size limits, Docker manifest round
//! trips, pagination, anonymous mounts, ranges, upload cancel, the token flow). It depends on no
//! Berth crate and can be pointed at any registry.
//!
//! # Layout
//! - [`client`]: HTTP with the Docker token dance.
//! - [`fixtures`]: seeded, deterministic content.
//! - [`report`]: per-check lines, the closing summary, JUnit XML.
//! - `workflows/`: one module per workflow, one block per check.

pub mod client;
pub mod fixtures;
pub mod report;
mod workflows;

use bytes::Bytes;
use reqwest::Method;

use client::{Client, Resp};
use fixtures::{Blob, Gen};
pub use report::Report;

/// What to check and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// Registry root, e.g. `http://127.0.0.1:5000`.
    pub root_url: String,
    /// Repository to work in.
    pub namespace: String,
    /// Second repository, for cross-repository mounts.
    pub crossmount_namespace: String,
    /// Credentials, when the registry needs them.
    pub credentials: Option<(String, String)>,
    /// Run the pull workflow.
    pub pull: bool,
    /// Run the push workflow.
    pub push: bool,
    /// Run the content discovery workflow.
    pub discovery: bool,
    /// Run the content management workflow.
    pub management: bool,
    /// Run the extra checks.
    pub extras: bool,
    /// Seed for generated content.
    pub seed: u64,
    /// For a pull-through cache: where the pull workflow puts its content.
    pub upstream: Option<Upstream>,
}

/// The upstream of a pull-through cache under test: the pull workflow pushes its content here
/// and reads it through the cache.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The upstream registry's root URL.
    pub url: String,
    /// The repository there that the cache's namespace mirrors.
    pub namespace: String,
    /// Credentials for pushing there.
    pub credentials: Option<(String, String)>,
}

impl Config {
    /// A configuration running everything against `root_url`.
    pub fn new(root_url: &str, namespace: &str) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            root_url: root_url.to_owned(),
            namespace: namespace.to_owned(),
            crossmount_namespace: format!("{namespace}-crossmount"),
            credentials: None,
            pull: true,
            push: true,
            discovery: true,
            management: true,
            extras: true,
            seed,
            upstream: None,
        }
    }
}

/// Runs the configured workflows and returns the report (lines are printed when `verbose`).
pub async fn run(cfg: Config, verbose: bool) -> Result<Report, String> {
    let client = Client::new(&cfg.root_url, cfg.credentials.clone())?;
    let mut r = Runner {
        fx: Gen::new(cfg.seed),
        client,
        cfg,
        report: Report {
            verbose,
            ..Report::default()
        },
    };
    if r.client.has_creds() {
        r.auth().await;
    }
    if r.cfg.pull {
        r.pull().await;
    }
    if r.cfg.push {
        r.push().await;
    }
    if r.cfg.discovery {
        r.discovery().await;
    }
    if r.cfg.management {
        r.management().await;
    }
    if r.cfg.extras {
        r.extras().await;
    }
    Ok(r.report)
}

/// Shared state of a run and the helpers checks are written with.
pub(crate) struct Runner {
    pub(crate) fx: Gen,
    pub(crate) client: Client,
    pub(crate) cfg: Config,
    pub(crate) report: Report,
}

/// The config media type used for test images.
pub(crate) const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The layer media type used for test images.
pub(crate) const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

impl Runner {
    pub(crate) fn check(&mut self, workflow: &'static str, name: &str, result: Result<(), String>) {
        self.report.record(workflow, name, result);
    }

    pub(crate) async fn send(&self, method: Method, path: &str) -> Result<Resp, String> {
        self.client.req(method, path).send().await
    }

    /// Sends a bodiless request and fails unless the status is one of `want`.
    pub(crate) async fn status(
        &self,
        method: Method,
        path: &str,
        want: &[u16],
    ) -> Result<(), String> {
        self.send(method, path).await?.expect(want).map(|_| ())
    }

    /// Pushes a blob with POST then PUT (the way most clients do); fails unless 201.
    pub(crate) async fn push_blob(&self, repo: &str, blob: &Blob) -> Result<(), String> {
        let loc = self.start_upload(repo).await?;
        let put = self
            .client
            .req(Method::PUT, &with_digest(&loc, &blob.digest))
            .header("content-type", "application/octet-stream")
            .body(blob.data.clone())
            .send()
            .await?;
        put.expect(&[201]).map(|_| ())
    }

    /// Opens an upload session; returns its Location.
    pub(crate) async fn start_upload(&self, repo: &str) -> Result<String, String> {
        let r = self
            .client
            .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .header("content-length", "0")
            .send()
            .await?;
        r.expect(&[202])?;
        location(&r)
    }

    /// PUTs manifest bytes under `reference`.
    pub(crate) async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        m: &Blob,
        media_type: &str,
    ) -> Result<Resp, String> {
        self.client
            .req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
            .header("content-type", media_type)
            .body(m.data.clone())
            .send()
            .await
    }

    /// GETs a URL and compares the body with `want`. Manifest media types are accepted, as
    /// every real client does.
    pub(crate) async fn get_exact(&self, path: &str, want: &Bytes) -> Result<Resp, String> {
        let r = self
            .client
            .req(Method::GET, path)
            .header("accept", fixtures::ACCEPT_ALL)
            .send()
            .await?;
        r.expect(&[200])?;
        if r.body != want {
            return Err(format!(
                "body differs: {} bytes, expected {}",
                r.body.len(),
                want.len()
            ));
        }
        Ok(r)
    }
}

/// The `Location` header of a response (required).
pub(crate) fn location(r: &Resp) -> Result<String, String> {
    match r.header("location") {
        Some(l) if !l.is_empty() => Ok(l.to_owned()),
        _ => Err(format!("no Location header (status {})", r.status.as_u16())),
    }
}

/// Appends `digest=` to an upload URL that may already carry a query.
pub(crate) fn with_digest(loc: &str, digest: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

/// Fails unless header `name` equals `want` (when `required`, it must be present).
pub(crate) fn expect_header(
    r: &Resp,
    name: &str,
    want: &str,
    required: bool,
) -> Result<(), String> {
    match r.header(name) {
        Some(v) if v == want => Ok(()),
        Some(v) => Err(format!("{name}: expected {want:?}, got {v:?}")),
        None if required => Err(format!("{name}: missing, expected {want:?}")),
        None => Ok(()),
    }
}
