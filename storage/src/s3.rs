//! What object_store does not do for us on S3, over the same credentials and signer:
//!
//! - copying an object larger than one CopyObject may carry (5 GiB on AWS): a multipart upload
//!   whose parts are copied server-side by range (UploadPartCopy), several at a time;
//! - finding the multipart uploads a crash left open (ListMultipartUploads), so garbage
//!   collection can abort them: their parts are billed but never listed as objects.
//!
//! Requests are signed with object_store's SigV4 signer ([`AwsAuthorizer`]) and the store's own
//! credential provider, so whatever object_store resolves (keys, environment, instance roles,
//! web identity) is used here too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::HttpRequestBody;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// The largest object AWS copies in one request.
pub const MAX_COPY: u64 = 5 * 1024 * 1024 * 1024;
/// The smallest part S3 accepts (all but the last).
const MIN_PART: u64 = 5 * 1024 * 1024;
/// Parts copied per request when the limit allows: small enough that several run at once.
const PREFERRED_PART: u64 = 1024 * 1024 * 1024;
/// S3's most parts per upload.
const MAX_PARTS: u64 = 10_000;
/// Part copies in flight at once.
const COPIES_IN_FLIGHT: usize = 4;
/// Tries per request (server errors and dropped connections are retried).
const TRIES: u32 = 5;

/// How object_store encodes keys in URLs: everything but alphanumerics and `-._~/`.
const KEY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Signed S3 requests beyond object_store's API, for one bucket (and key prefix).
#[derive(Debug)]
pub struct S3Native {
    store: Arc<AmazonS3>,
    http: reqwest::Client,
    /// The bucket's URL, without a trailing slash (`http://host/bucket` or `https://bucket.host`).
    bucket_url: String,
    bucket: String,
    region: String,
    prefix: Option<Path>,
    max_copy: u64,
}

/// A multipart upload the bucket holds open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenMultipart {
    /// Its key, relative to the configured prefix.
    pub key: Path,
    /// S3's id of the upload.
    pub id: String,
    /// When it was started (unix seconds).
    pub initiated: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CopyPartResult {
    #[serde(rename = "ETag")]
    e_tag: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListMultipartUploadsResult {
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadEntry>,
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadEntry {
    key: String,
    upload_id: String,
    initiated: String,
}

fn s3_err(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Internal(format!("s3 {what}: {detail}"))
}

/// The size of each part when copying `size` bytes with at most `max_copy` per request.
pub fn part_size(size: u64, max_copy: u64) -> u64 {
    max_copy
        .clamp(MIN_PART, MAX_COPY)
        .min(PREFERRED_PART)
        .max(size.div_ceil(MAX_PARTS))
}

impl S3Native {
    /// For the store `builder` builds (already built as `store`), copying objects over
    /// `max_copy` bytes in parts.
    pub fn new(
        builder: &AmazonS3Builder,
        store: Arc<AmazonS3>,
        prefix: Option<Path>,
        max_copy: u64,
    ) -> Result<Self> {
        let get = |k| builder.get_config_value(&k).filter(|v| !v.is_empty());
        let bucket = get(AmazonS3ConfigKey::Bucket).unwrap_or_default();
        let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = get(AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint =
            get(AmazonS3ConfigKey::S3Endpoint).or_else(|| get(AmazonS3ConfigKey::Endpoint));
        // The same rule as object_store's builder: an endpoint given for virtual-hosted
        // requests already names the bucket.
        let bucket_url = match (endpoint, virtual_hosted) {
            (Some(e), true) => e.trim_end_matches('/').to_owned(),
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A part copy of 1 GiB is one request that answers when done.
            .timeout(Duration::from_secs(15 * 60))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| s3_err("client", e))?;
        Ok(Self {
            store,
            http,
            bucket_url,
            bucket,
            region,
            prefix,
            max_copy,
        })
    }

    /// Objects larger than this are copied in parts.
    pub fn max_copy(&self) -> u64 {
        self.max_copy
    }

    /// `key` with the configured prefix in front: the name the bucket knows it by.
    fn full(&self, key: &Path) -> Path {
        match &self.prefix {
            Some(p) => p.parts().chain(key.parts()).collect(),
            None => key.clone(),
        }
    }

    fn url(&self, full_key: &Path) -> String {
        format!(
            "{}/{}",
            self.bucket_url,
            utf8_percent_encode(full_key.as_ref(), KEY_ENCODE)
        )
    }

    /// Sends a signed request with an empty body, retrying server errors and dropped
    /// connections; the response body of a success.
    async fn send(
        &self,
        what: &str,
        method: reqwest::Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<Bytes> {
        let mut wait = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            tries += 1;
            let outcome = self
                .send_once(method.clone(), url, headers, body.clone())
                .await;
            match outcome {
                Ok((status, body)) if status.is_success() => {
                    // A copy may fail after its 200 was sent: the error is then the body.
                    if contains(&body, b"<Error>") {
                        if tries < TRIES {
                            debug!(what, "s3 answered 200 with an error body; retrying");
                            tokio::time::sleep(wait).await;
                            wait *= 2;
                            continue;
                        }
                        return Err(s3_err(what, String::from_utf8_lossy(&body)));
                    }
                    return Ok(body);
                }
                Ok((status, body))
                    if tries < TRIES
                        && (status.is_server_error()
                            || status == reqwest::StatusCode::TOO_MANY_REQUESTS) =>
                {
                    debug!(what, %status, body = %String::from_utf8_lossy(&body), "s3 request failed; retrying");
                }
                Ok((status, body)) => {
                    return Err(s3_err(
                        what,
                        format!("{status}: {}", String::from_utf8_lossy(&body)),
                    ));
                }
                Err(e) if tries < TRIES => debug!(what, error = %e, "s3 request failed; retrying"),
                Err(e) => return Err(e),
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }

    async fn send_once(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Result<(reqwest::StatusCode, Bytes)> {
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| s3_err("credentials", e))?;
        let mut req = http::Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let mut req = req
            .body(HttpRequestBody::from(body.clone()))
            .map_err(|e| s3_err("request", e))?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut req, None)
            .map_err(|e| s3_err("signing", e))?;
        let mut out = self.http.request(method, url).body(body);
        for (k, v) in req.headers() {
            out = out.header(k, v);
        }
        let resp = out.send().await.map_err(|e| s3_err("request", e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| s3_err("response", e))?;
        Ok((status, body))
    }

    /// Copies `from` (of `size` bytes) to `to` as a multipart upload of server-side part
    /// copies; on failure the upload is aborted and nothing is left at `to`.
    pub async fn copy_in_parts(&self, from: &Path, to: &Path, size: u64) -> Result<()> {
        let (from, to) = (self.full(from), self.full(to));
        let part = part_size(size, self.max_copy);
        let started = std::time::Instant::now();
        let id = self.store.create_multipart(&to).await?;
        let ranges: Vec<(usize, u64, u64)> = (0..size.div_ceil(part))
            .map(|i| {
                let start = i * part;
                (i as usize, start, (start + part).min(size) - 1)
            })
            .collect();
        let count = ranges.len();
        let copied: Result<Vec<PartId>> = futures_util::stream::iter(ranges)
            .map(|(i, first, last)| self.copy_part(&from, &to, &id, i, first, last))
            .buffered(COPIES_IN_FLIGHT)
            .try_collect()
            .await;
        let done = match copied {
            Ok(parts) => self.complete(&to, &id, &parts, size).await,
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            if let Err(abort) = self.store.abort_multipart(&to, &id).await {
                warn!(key = %to, error = %abort, "aborting a failed part copy failed; garbage collection retries it");
            }
            return Err(e);
        }
        info!(from = %from, to = %to, size, parts = count, ms = started.elapsed().as_millis() as u64, "copied in parts");
        Ok(())
    }

    /// CompleteMultipartUpload of a copy in parts, through this client: a store joins the
    /// parts before it answers, which takes S3 minutes for a large object (it sends blanks
    /// meanwhile) and some S3-compatible servers as long in silence (s3s-fs: over 30 s for
    /// 6 GiB), longer than the object-store client's 30 s allowance for silence; here only the
    /// request's 15 minutes bound it. A retry that finds the upload gone (the first try joined
    /// the parts, but its answer was lost) counts as done when the object has the size.
    async fn complete(&self, to: &Path, id: &str, parts: &[PartId], size: u64) -> Result<()> {
        let mut url = reqwest::Url::parse(&self.url(to)).map_err(|e| s3_err("url", e))?;
        url.query_pairs_mut().append_pair("uploadId", id);
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, p) in parts.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                quick_xml::escape::escape(p.content_id.as_str())
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let sent = self
            .send(
                "complete part copies",
                reqwest::Method::POST,
                url.as_str(),
                &[("content-type", "application/xml".to_owned())],
                Bytes::from(xml),
            )
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) => match object_store::ObjectStoreExt::head(self.store.as_ref(), to).await {
                Ok(meta) if meta.size == size => {
                    debug!(key = %to, "completing part copies answered an error after joining them");
                    Ok(())
                }
                _ => Err(e),
            },
        }
    }

    async fn copy_part(
        &self,
        from: &Path,
        to: &Path,
        id: &str,
        index: usize,
        first: u64,
        last: u64,
    ) -> Result<PartId> {
        let mut url = reqwest::Url::parse(&self.url(to)).map_err(|e| s3_err("url", e))?;
        url.query_pairs_mut()
            .append_pair("partNumber", &(index + 1).to_string())
            .append_pair("uploadId", id);
        let source = format!(
            "{}/{}",
            self.bucket,
            utf8_percent_encode(from.as_ref(), KEY_ENCODE)
        );
        let headers = [
            ("x-amz-copy-source", source),
            ("x-amz-copy-source-range", format!("bytes={first}-{last}")),
        ];
        let body = self
            .send(
                "part copy",
                reqwest::Method::PUT,
                url.as_str(),
                &headers,
                Bytes::new(),
            )
            .await?;
        let result: CopyPartResult =
            quick_xml::de::from_reader(body.as_ref()).map_err(|e| s3_err("part copy answer", e))?;
        Ok(PartId {
            content_id: result.e_tag,
        })
    }

    /// The multipart uploads open under the configured prefix, page by page.
    pub async fn open_multiparts(&self) -> Result<Vec<OpenMultipart>> {
        let prefix = match &self.prefix {
            Some(p) => format!("{p}/"),
            None => String::new(),
        };
        let mut markers: Option<(String, String)> = None;
        let mut out = Vec::new();
        loop {
            let mut url = reqwest::Url::parse(&format!("{}/", self.bucket_url))
                .map_err(|e| s3_err("url", e))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("uploads", "").append_pair("prefix", &prefix);
                if let Some((key, id)) = &markers {
                    q.append_pair("key-marker", key)
                        .append_pair("upload-id-marker", id);
                }
            }
            let body = self
                .send(
                    "listing multipart uploads",
                    reqwest::Method::GET,
                    url.as_str(),
                    &[],
                    Bytes::new(),
                )
                .await?;
            let page: ListMultipartUploadsResult = quick_xml::de::from_reader(body.as_ref())
                .map_err(|e| s3_err("multipart upload list", e))?;
            for u in page.uploads {
                let key = Path::from(u.key.as_str());
                let Some(relative) = self.relative(&key) else {
                    continue;
                };
                let initiated = humantime::parse_rfc3339_weak(&u.initiated)
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                out.push(OpenMultipart {
                    key: relative,
                    id: u.upload_id,
                    initiated,
                });
            }
            match (
                page.is_truncated,
                page.next_key_marker,
                page.next_upload_id_marker,
            ) {
                (true, Some(k), Some(i)) => markers = Some((k, i)),
                _ => return Ok(out),
            }
        }
    }

    fn relative(&self, key: &Path) -> Option<Path> {
        match &self.prefix {
            Some(p) => key.prefix_match(p).map(|parts| parts.collect()),
            None => Some(key.clone()),
        }
    }

    /// Aborts an open multipart upload; its parts are freed.
    pub async fn abort(&self, upload: &OpenMultipart) -> Result<()> {
        Ok(self
            .store
            .abort_multipart(&self.full(&upload.key), &upload.id)
            .await?)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;
    const MIB: u64 = 1024 * 1024;

    #[test]
    fn parts_respect_the_limits() {
        // A 6 GiB layer under AWS's limit: 1 GiB parts, several in flight.
        assert_eq!(part_size(6 * GIB, MAX_COPY), GIB);
        // A lower limit is obeyed, but never below S3's smallest part.
        assert_eq!(part_size(100 * MIB, 16 * MIB), 16 * MIB);
        assert_eq!(part_size(100 * MIB, MIB), 5 * MIB);
        // At S3's largest object, parts grow to stay within 10,000.
        let huge = 5 * 1024 * GIB;
        let p = part_size(huge, 100 * MIB);
        assert!(huge.div_ceil(p) <= MAX_PARTS, "{p}");
    }
}
