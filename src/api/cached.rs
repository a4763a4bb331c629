//! Reads of cached upstream repositories (see [`crate::proxy`]): fill the cache as needed,
//! then answer exactly as for local content.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_storage::{Digest, Reference};

use super::endpoint::Endpoint;
use super::error::{ApiError, ApiResult, Code};
use super::headers::{DIGEST_HEADER, value};
use super::{blobs, listing, manifests};
use crate::proxy::{BlobAnswer, CacheError, Proxy, Target, UpstreamError};
use crate::state::AppState;

fn cache_error(e: CacheError, missing: Code) -> ApiError {
    match e {
        CacheError::Upstream(UpstreamError::NotFound(m)) => ApiError::new(missing, m),
        CacheError::Upstream(UpstreamError::RateLimited {
            retry_after,
            message,
        }) => {
            let e = ApiError::new(
                Code::TooManyRequests,
                format!("not cached, and the upstream rate-limits us: {message}"),
            );
            match retry_after.and_then(|r| HeaderValue::from_str(&r).ok()) {
                Some(v) => e.with_header(header::RETRY_AFTER, v),
                None => e,
            }
        }
        CacheError::Upstream(e @ UpstreamError::Unavailable(_)) => ApiError::new(
            Code::Unavailable,
            format!("not cached, and the upstream cannot be reached: {e}"),
        ),
        CacheError::Upstream(e @ UpstreamError::BadContent(_)) => {
            ApiError::new(Code::Unavailable, e.to_string()).with_status(StatusCode::BAD_GATEWAY)
        }
        CacheError::Storage(m) => {
            tracing::error!(error = %m, "cache storage failure");
            ApiError::new(Code::Unknown, "internal storage error")
        }
    }
}

/// Serves a read endpoint of a cached repository.
pub async fn serve(
    state: &AppState,
    proxy: &Proxy,
    t: &Target,
    ep: &Endpoint<'_>,
    req: Request,
) -> ApiResult {
    let local = t.local.as_str().to_owned();
    match *ep {
        Endpoint::Manifest { reference, .. } => {
            let Ok(r) = reference.parse::<Reference>() else {
                // Not a tag or digest: the local handler gives the usual answer.
                return manifests::get(state, &local, reference, req).await;
            };
            let m = proxy
                .manifest(t, &r)
                .await
                .map_err(|e| cache_error(e, Code::ManifestUnknown))?;
            Ok(manifests::respond(state, &t.local, m, &req))
        }
        Endpoint::Blob { digest, .. } => {
            let d: Digest = digest.parse().map_err(ApiError::from)?;
            let head = req.method() == Method::HEAD;
            match proxy
                .blob(t, &d, head)
                .await
                .map_err(|e| cache_error(e, Code::BlobUnknown))?
            {
                BlobAnswer::Local { size } => {
                    blobs::serve(state, &d, size, req.method(), req.headers()).await
                }
                BlobAnswer::Head { size } => Ok(blob_answer(&d, size, Body::empty())),
                BlobAnswer::Stream { size, body } => {
                    Ok(blob_answer(&d, size, Body::from_stream(body)))
                }
            }
        }
        Endpoint::Tags { name } => {
            let q = req.uri().query().unwrap_or("").to_owned();
            match proxy
                .tags(t, &q)
                .await
                .map_err(|e| cache_error(e, Code::NameUnknown))?
            {
                Some((mut list, link)) => {
                    // The upstream names the repository its way; the client asked by its own.
                    list["name"] = serde_json::Value::String(name.to_owned());
                    let mut resp = (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        list.to_string(),
                    )
                        .into_response();
                    // The next page, in the client's own name for the repository.
                    if let Some(l) = link
                        .map(|l| l.replace(&format!("/v2/{}/", t.remote), &format!("/v2/{name}/")))
                        && let Ok(v) = HeaderValue::from_str(&l)
                    {
                        resp.headers_mut().insert(header::LINK, v);
                    }
                    Ok(resp)
                }
                None => listing::tags(state, &local, req).await,
            }
        }
        Endpoint::Referrers { digest, .. } => {
            let d: Digest = digest.parse().map_err(ApiError::from)?;
            let q = req.uri().query().unwrap_or("").to_owned();
            match proxy.referrers(t, &d, &q).await {
                Some(body) => Ok((
                    StatusCode::OK,
                    [(
                        header::CONTENT_TYPE,
                        "application/vnd.oci.image.index.v1+json",
                    )],
                    body,
                )
                    .into_response()),
                None => listing::referrers(state, &local, digest, req).await,
            }
        }
        _ => Err(ApiError::new(
            Code::Unsupported,
            "cached repositories are read-only",
        )),
    }
}

fn blob_answer(d: &Digest, size: Option<u64>, body: Body) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, value("application/octet-stream"));
    h.insert(DIGEST_HEADER, value(&d.to_string()));
    if let Some(n) = size {
        h.insert(header::CONTENT_LENGTH, value(&n.to_string()));
    }
    resp
}
