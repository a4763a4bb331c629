//! Blob uploads (spec end-4a/4b, end-5, end-6, end-11, end-13, end-14).
//!
//! A session lives in storage; its URL is `/v2/<name>/blobs/uploads/<id>` and carries no state,
//! so a client may resume from any URL it was given and on any replica.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_storage::{Chunk, Digest, RepoName, UploadStatus};

use super::access::{may_mount_anywhere, may_pull};
use super::error::{ApiError, ApiResult, Code};
use super::headers::{
    DIGEST_HEADER, content_length, content_range, param, query, repo, stream, upload_location,
    upload_range, value,
};
use super::operation::Operation;
use crate::auth::Caller;
use crate::registry::At;
use crate::state::AppState;

fn session(repo: &RepoName, s: &UploadStatus, status: StatusCode) -> Response {
    let mut resp = (status, Body::empty()).into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, upload_location(repo, &s.id));
    h.insert(header::RANGE, upload_range(s.size));
    h.insert(header::CONTENT_LENGTH, value("0"));
    h.insert("docker-upload-uuid", value(&s.id));
    resp
}

fn created(repo: &RepoName, digest: &Digest) -> Response {
    let mut resp = (StatusCode::CREATED, Body::empty()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        value(&format!("/v2/{repo}/blobs/{digest}")),
    );
    h.insert(DIGEST_HEADER, value(&digest.to_string()));
    h.insert(header::CONTENT_LENGTH, value("0"));
    resp
}

fn digest_param(q: &[(String, String)]) -> ApiResult<Option<Digest>> {
    param(q, "digest")
        .map(|d| d.parse().map_err(ApiError::from))
        .transpose()
}

/// `POST /v2/<name>/blobs/uploads/`: a new session (202), a whole blob with `?digest=` (201),
/// or a cross-repository mount with `?mount=` (201, or a new session when it cannot mount).
pub(super) async fn post(state: AppState, op: Operation, req: Request) -> ApiResult {
    let repo = repo(op.repository())?;
    let at = super::at(&op);
    let q = query(req.uri());
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Open);
    if let Some(m) = param(&q, "mount") {
        let digest: Digest = m.parse().map_err(ApiError::from)?;
        // A mount the caller may not make (no pull on the source) falls back to a session.
        let from = match param(&q, "from") {
            Some(f) => match f.parse::<RepoName>() {
                Ok(f) if may_pull(&state, &caller, f.as_str()) => Some(Some(f)),
                _ => None, // an invalid or unreadable source cannot lend the blob
            },
            None if state.config.registry.anonymous_mount
                && may_mount_anywhere(&state, &caller) =>
            {
                Some(None)
            }
            None => None,
        };
        if let Some(from) = from {
            let source = from.as_ref().map(|f| At {
                name: f.as_str(),
                ns: None,
            });
            if state.registry.mount(at, &digest, source).await? {
                return Ok(created(&repo, &digest));
            }
        }
        let s = state.registry.start_upload(at).await?;
        return Ok(session(&repo, &s, StatusCode::ACCEPTED));
    }
    if let Some(digest) = digest_param(&q)? {
        let len = content_length(req.headers())?;
        let s = state.registry.start_upload(at).await?;
        let chunk = Chunk {
            len,
            ..Chunk::new(stream(req.into_body()))
        };
        state
            .registry
            .finish_upload(at, &s.id, &digest, Some(chunk))
            .await?;
        return Ok(created(&repo, &digest));
    }
    let s = state.registry.start_upload(at).await?;
    Ok(session(&repo, &s, StatusCode::ACCEPTED))
}

/// `GET /v2/<name>/blobs/uploads/<id>`: 204 with the committed `Range`.
pub(super) async fn status(state: AppState, op: Operation) -> ApiResult {
    let repo = repo(op.repository())?;
    let s = state
        .registry
        .upload_status(super::at(&op), op.arg())
        .await?;
    Ok(session(&repo, &s, StatusCode::NO_CONTENT))
}

/// `PATCH /v2/<name>/blobs/uploads/<id>`: appends a chunk (with `Content-Range`) or a stream.
pub(super) async fn patch(state: AppState, op: Operation, req: Request) -> ApiResult {
    let repo = repo(op.repository())?;
    let (start, len) = chunk_bounds(req.headers())?;
    let chunk = Chunk {
        start,
        len,
        ..Chunk::new(stream(req.into_body()))
    };
    let s = state
        .registry
        .append_upload(super::at(&op), op.arg(), chunk)
        .await?;
    Ok(session(&repo, &s, StatusCode::ACCEPTED))
}

/// `PUT /v2/<name>/blobs/uploads/<id>?digest=`: the last chunk (optional) and the commit.
pub(super) async fn put(state: AppState, op: Operation, req: Request) -> ApiResult {
    let repo = repo(op.repository())?;
    let q = query(req.uri());
    let digest = digest_param(&q)?.ok_or_else(|| {
        ApiError::new(
            Code::DigestInvalid,
            "the digest query parameter is required",
        )
    })?;
    // Trust the body, not a declared length: some clients declare one and send nothing.
    let (start, len) = match content_range(req.headers())? {
        Some(_) => chunk_bounds(req.headers())?,
        None => (None, None),
    };
    let chunk = Chunk {
        start,
        len,
        ..Chunk::new(stream(req.into_body()))
    };
    state
        .registry
        .finish_upload(super::at(&op), op.arg(), &digest, Some(chunk))
        .await?;
    Ok(created(&repo, &digest))
}

/// `DELETE /v2/<name>/blobs/uploads/<id>`: cancels the session (204).
pub(super) async fn cancel(state: AppState, op: Operation) -> ApiResult {
    repo(op.repository())?;
    state
        .registry
        .cancel_upload(super::at(&op), op.arg())
        .await?;
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_LENGTH, "0")]).into_response())
}

/// Where a chunk must start and how long it must be, from `Content-Range` and `Content-Length`.
fn chunk_bounds(h: &axum::http::HeaderMap) -> ApiResult<(Option<u64>, Option<u64>)> {
    let declared = content_length(h)?;
    match content_range(h)? {
        None => Ok((None, declared)),
        Some((a, b)) => {
            let n = b - a + 1;
            if declared.is_some_and(|d| d != n) {
                return Err(ApiError::new(
                    Code::SizeInvalid,
                    format!("Content-Length does not match Content-Range {a}-{b}"),
                ));
            }
            Ok((Some(a), Some(n)))
        }
    }
}
