//! Blob reads and deletes: `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>` (spec end-2, end-10).

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_storage::Digest;

use super::error::{ApiError, ApiResult, Code};
use super::headers::{DIGEST_HEADER, byte_range, repo, value};
use super::operation::Operation;
use crate::registry::Blob;
use crate::state::AppState;

fn digest(s: &str) -> ApiResult<Digest> {
    s.parse().map_err(ApiError::from)
}

/// `GET`/`HEAD` a blob: 200 with the bytes, 206 for a satisfiable `Range`, 416 otherwise,
/// 404 `BLOB_UNKNOWN` when the repository does not hold it; 307 to the object store when it
/// presigns.
pub(super) async fn get(state: AppState, op: Operation, req: Request) -> ApiResult {
    repo(op.repository())?;
    let digest = digest(op.arg())?;
    let head = op.is_head();
    let blob = state
        .registry
        .blob(super::at(&op), &digest, head)
        .await
        .map_err(|e| ApiError::missing(e, Code::BlobUnknown))?;
    match blob {
        Blob::Stored { size } => serve(&state, &digest, size, head, req.headers()).await,
        Blob::Upstream { size } => Ok(from_upstream(&digest, size, Body::empty())),
        Blob::Streaming { size, body } => streaming(&digest, size, body, req.headers()),
    }
}

/// The answer for a blob streamed while the cache fetches it: whole, or (when the upstream
/// said the size) the range asked for, so a client resuming a download through a cold cache
/// gets the rest rather than the whole blob again.
fn streaming(
    digest: &Digest,
    size: Option<u64>,
    body: crate::proxy::Follower,
    headers: &HeaderMap,
) -> ApiResult {
    let Some(size) = size else {
        return Ok(from_upstream(digest, None, Body::from_stream(body.whole())));
    };
    match byte_range(headers, size) {
        Err(()) => Err(unsatisfiable(size)),
        Ok(None) => Ok(from_upstream(
            digest,
            Some(size),
            Body::from_stream(body.whole()),
        )),
        Ok(Some((a, b))) => {
            let mut resp =
                from_upstream(digest, Some(b - a + 1), Body::from_stream(body.range(a, b)));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                value(&format!("bytes {a}-{b}/{size}")),
            );
            Ok(resp)
        }
    }
}

/// `416` for a range outside a blob of `size` bytes.
fn unsatisfiable(size: u64) -> ApiError {
    ApiError::new(Code::RangeInvalid, "requested range not satisfiable")
        .with_header(header::CONTENT_RANGE, value(&format!("bytes */{size}")))
}

/// `GET /_berth/relay/<digest>`: another replica streams this one's upstream fetch of the blob
/// instead of fetching it again (see [`crate::proxy`]). Answered only to a request proving it
/// comes from a replica; 404 when no fetch of it runs here.
pub(super) async fn relay(
    axum::extract::State(state): axum::extract::State<AppState>,
    axum::extract::Path(d): axum::extract::Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let digest = digest(&d)?;
    let proof = headers
        .get(crate::proxy::RELAY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match state.registry.relay(&digest, proof).await? {
        Some(Blob::Streaming { size, body }) => Ok(from_upstream(
            &digest,
            size,
            Body::from_stream(body.whole()),
        )),
        _ => Err(
            ApiError::new(Code::BlobUnknown, "no fetch of this blob runs here")
                .with_status(StatusCode::NOT_FOUND),
        ),
    }
}

/// The answer for a stored blob of `size` bytes.
async fn serve(
    state: &AppState,
    digest: &Digest,
    size: u64,
    head: bool,
    headers: &HeaderMap,
) -> ApiResult {
    let Ok(range) = byte_range(headers, size) else {
        return Err(unsatisfiable(size));
    };
    let (status, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, b - a + 1),
        None => (StatusCode::OK, size),
    };
    // Ranged reads are served here: not every object store takes every range form (Azure has
    // no suffix ranges), and they are resumptions, not bulk downloads.
    if !head
        && range.is_none()
        && state.config.storage.redirects()
        && let Some(url) = state
            .registry
            .blob_url(digest, state.config.storage.redirect_ttl())
            .await?
    {
        let mut resp = (StatusCode::TEMPORARY_REDIRECT, Body::empty()).into_response();
        let h = resp.headers_mut();
        h.insert(header::LOCATION, value(&url));
        h.insert(DIGEST_HEADER, value(&digest.to_string()));
        h.insert(header::CONTENT_LENGTH, value("0"));
        return Ok(resp);
    }
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(state.registry.read_blob(digest, size, range).await?.body)
    };
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, value("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, value(&len.to_string()));
    h.insert(DIGEST_HEADER, value(&digest.to_string()));
    h.insert(header::ETAG, value(&format!("\"{digest}\"")));
    h.insert(header::ACCEPT_RANGES, value("bytes"));
    h.insert(header::CACHE_CONTROL, value("max-age=31536000"));
    if let Some((a, b)) = range {
        h.insert(
            header::CONTENT_RANGE,
            value(&format!("bytes {a}-{b}/{size}")),
        );
    }
    Ok(resp)
}

/// A blob the upstream answers for (a `HEAD`, or bytes streamed as they are cached).
fn from_upstream(d: &Digest, size: Option<u64>, body: Body) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, value("application/octet-stream"));
    h.insert(DIGEST_HEADER, value(&d.to_string()));
    if let Some(n) = size {
        h.insert(header::CONTENT_LENGTH, value(&n.to_string()));
        h.insert(header::ACCEPT_RANGES, value("bytes"));
    }
    resp
}

/// `DELETE` a blob from a repository: 202, or 404 `BLOB_UNKNOWN`.
pub(super) async fn delete(state: AppState, op: Operation) -> ApiResult {
    repo(op.repository())?;
    let digest = digest(op.arg())?;
    if !state.config.registry.delete_enabled {
        return Err(ApiError::new(Code::Unsupported, "deletes are disabled"));
    }
    state.registry.delete_blob(super::at(&op), &digest).await?;
    Ok(accepted())
}

/// An empty 202.
pub(super) fn accepted() -> Response {
    (StatusCode::ACCEPTED, [(header::CONTENT_LENGTH, "0")]).into_response()
}
