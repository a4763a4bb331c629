//! The one way suites push and pull test images over the API.

use std::time::Duration;

use reqwest::StatusCode;

use super::images::Image;
use super::servers::{client, digest};

/// How a test authenticates.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Auth<'a> {
    /// Anonymously.
    None,
    /// Basic credentials.
    Basic(&'a str, &'a str),
    /// A bearer token.
    Bearer(&'a str),
}

/// How a test client pushes an image.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Push<'a> {
    /// Credentials.
    pub auth: Auth<'a>,
    /// HEAD each blob first and skip it when the registry has it (docker, skopeo); otherwise
    /// upload every blob (crane, oras, curl scripts).
    pub head_first: bool,
    /// One `POST ?digest=` per blob; otherwise `POST` then `PUT` (Distribution 2.8 has no
    /// single-POST upload).
    pub monolithic: bool,
    /// Time between the last blob and the manifest, as while another layer uploads.
    pub pause: Duration,
}

impl Default for Push<'_> {
    fn default() -> Self {
        Self {
            auth: Auth::None,
            head_first: false,
            monolithic: false,
            pause: Duration::ZERO,
        }
    }
}

/// How docker and skopeo push: HEAD, upload what is missing, manifest.
pub(crate) const DOCKER: Push<'static> = Push {
    auth: Auth::None,
    head_first: true,
    monolithic: true,
    pause: Duration::ZERO,
};

impl Image {
    /// Pushes to `root` as `repo:reference` (a tag, or the manifest's digest) the way `how`
    /// says; the manifest digest, or the first refusal as text.
    pub(crate) async fn try_push(
        &self,
        root: &str,
        repo: &str,
        reference: &str,
        how: Push<'_>,
    ) -> Result<String, String> {
        let c = client();
        let auth = |r: reqwest::RequestBuilder| match how.auth {
            Auth::Basic(u, p) => r.basic_auth(u, Some(p)),
            Auth::Bearer(t) => r.bearer_auth(t),
            Auth::None => r,
        };
        let fail = |what: String| move |e: reqwest::Error| format!("{what}: {e}");
        for b in &self.blobs {
            let d = digest(b);
            if how.head_first {
                let head = auth(c.head(format!("{root}/v2/{repo}/blobs/{d}")))
                    .send()
                    .await
                    .map_err(fail(format!("HEAD {d}")))?;
                match head.status() {
                    StatusCode::OK => continue, // the registry says it has it
                    StatusCode::NOT_FOUND => {}
                    s => return Err(format!("HEAD {repo} blob {d}: {s}")),
                }
            }
            let r = if how.monolithic {
                auth(c.post(format!("{root}/v2/{repo}/blobs/uploads/?digest={d}")))
                    .body(b.clone())
                    .send()
                    .await
                    .map_err(fail(format!("POST {d}")))?
            } else {
                let r = auth(c.post(format!("{root}/v2/{repo}/blobs/uploads/")))
                    .send()
                    .await
                    .map_err(fail(format!("POST for {d}")))?;
                if r.status() != StatusCode::ACCEPTED {
                    return Err(format!("POST {repo} upload: {}", r.status()));
                }
                let loc = r
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let loc = if loc.starts_with("http") {
                    loc
                } else {
                    format!("{root}{loc}")
                };
                let sep = if loc.contains('?') { '&' } else { '?' };
                auth(c.put(format!("{loc}{sep}digest={d}")))
                    .body(b.clone())
                    .send()
                    .await
                    .map_err(fail(format!("PUT {d}")))?
            };
            if r.status() != StatusCode::CREATED {
                let s = r.status();
                return Err(format!(
                    "upload of {d} to {repo}: {s} {}",
                    r.text().await.unwrap_or_default()
                ));
            }
        }
        tokio::time::sleep(how.pause).await;
        let r = auth(c.put(format!("{root}/v2/{repo}/manifests/{reference}")))
            .header("content-type", self.media_type)
            .body(self.manifest.clone())
            .send()
            .await
            .map_err(fail(format!("PUT manifest {reference}")))?;
        match r.status() {
            StatusCode::CREATED => Ok(self.digest()),
            s => Err(format!(
                "manifest {repo}:{reference}: {s} {}",
                r.text().await.unwrap_or_default()
            )),
        }
    }

    /// Pushes to `root` as `repo:tag` with `creds` (`POST` then `PUT`, as every registry
    /// takes); panics on a refusal.
    pub(crate) async fn push(&self, root: &str, repo: &str, tag: &str, creds: Auth<'_>) {
        let how = Push {
            auth: creds,
            ..Push::default()
        };
        if let Err(e) = self.try_push(root, repo, tag, how).await {
            panic!("{e}");
        }
    }

    /// Pushes to `root` as `repo:tag` the way docker does (HEAD, upload what is missing, the
    /// manifest).
    pub(crate) async fn push_like_docker(
        &self,
        root: &str,
        repo: &str,
        tag: &str,
    ) -> Result<(), String> {
        self.try_push(root, repo, tag, DOCKER).await.map(|_| ())
    }

    /// Pulls `repo:reference` from `root` like a client (the manifest, then every blob), with
    /// `query` after each path (containerd's `?ns=`); checks every digest against this image.
    pub(crate) async fn pull(
        &self,
        root: &str,
        repo: &str,
        reference: &str,
        query: &str,
    ) -> Result<(), String> {
        let c = client();
        let r = c
            .get(format!("{root}/v2/{repo}/manifests/{reference}{query}"))
            .header("accept", self.media_type)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status() != StatusCode::OK {
            return Err(format!(
                "manifest: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ));
        }
        let body = r.bytes().await.map_err(|e| e.to_string())?;
        if digest(&body) != self.digest() {
            return Err("manifest bytes differ from the image's".into());
        }
        for b in &self.blobs {
            let d = digest(b);
            let r = c
                .get(format!("{root}/v2/{repo}/blobs/{d}{query}"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != StatusCode::OK {
                return Err(format!("blob {d}: {}", r.status()));
            }
            let got = r.bytes().await.map_err(|e| e.to_string())?;
            if digest(&got) != d {
                return Err(format!(
                    "blob {d}: got {} bytes hashing to {}",
                    got.len(),
                    digest(&got)
                ));
            }
        }
        Ok(())
    }
}

/// PATCHes `bytes` as the chunk of the upload at `url` that starts at `start`: the `Location`
/// the registry gave for what follows, or why the chunk was not accepted (`PATCH <status>`, or
/// the request's error).
pub(crate) async fn try_send_chunk(
    c: &reqwest::Client,
    url: &str,
    start: usize,
    bytes: &[u8],
) -> Result<String, String> {
    let r = c
        .patch(url)
        .header("content-type", "application/octet-stream")
        .header(
            "content-range",
            format!("{start}-{}", start + bytes.len() - 1),
        )
        .body(bytes.to_vec())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != StatusCode::ACCEPTED {
        return Err(format!("PATCH {}", r.status()));
    }
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "PATCH answered without a Location".to_owned())
}

/// [`try_send_chunk`] that must be accepted; the location for what follows.
pub(crate) async fn send_chunk(
    c: &reqwest::Client,
    url: &str,
    start: usize,
    bytes: &[u8],
) -> String {
    try_send_chunk(c, url, start, bytes)
        .await
        .unwrap_or_else(|e| panic!("chunk at {start} of {url}: {e}"))
}
