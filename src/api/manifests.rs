//! Manifests: `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>` (spec end-3, end-7, end-9).

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_storage::{MAX_MANIFEST_SIZE, Reference, StoredManifest, Tag};
use futures_util::StreamExt;

use super::blobs::accepted;
use super::error::{ApiError, ApiResult, Code};
use super::headers::{DIGEST_HEADER, query, repo, text, value};
use super::operation::Operation;
use crate::state::AppState;

/// `GET`/`HEAD` a manifest by tag or digest: the exact stored bytes with their media type.
/// A reference that is neither a tag nor a digest is simply not there (404).
pub(super) async fn get(state: AppState, op: Operation, req: Request) -> ApiResult {
    repo(op.repository())?;
    let reference: Reference = match op.arg().parse() {
        Ok(r) => r,
        Err(berth_storage::Error::DigestInvalid(d)) => {
            return Err(ApiError::new(
                Code::DigestInvalid,
                format!("invalid digest {d:?}"),
            ));
        }
        Err(_) => {
            return Err(ApiError::new(Code::ManifestUnknown, "manifest unknown"));
        }
    };
    let m = state
        .registry
        .manifest(super::at(&op), &reference, !op.is_head())
        .await
        .map_err(|e| ApiError::missing(e, Code::ManifestUnknown))?;
    Ok(respond(m, &op, &req))
}

/// The answer to a `GET`/`HEAD` of manifest `m` (304 for a matching `If-None-Match`).
fn respond(m: StoredManifest, op: &Operation, req: &Request) -> Response {
    let etag = format!("\"{}\"", m.digest);
    if text(req.headers(), &header::IF_NONE_MATCH)
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        resp.headers_mut()
            .insert(DIGEST_HEADER, value(&m.digest.to_string()));
        resp.headers_mut().insert(header::ETAG, value(&etag));
        return resp;
    }
    let len = m.bytes.len();
    let body = if op.is_head() {
        Body::empty()
    } else {
        Body::from(m.bytes)
    };
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, value(&m.media_type));
    h.insert(header::CONTENT_LENGTH, value(&len.to_string()));
    h.insert(DIGEST_HEADER, value(&m.digest.to_string()));
    h.insert(header::ETAG, value(&etag));
    resp
}

/// `PUT` a manifest: 201 with `Location`, `Docker-Content-Digest`, `OCI-Subject` when it has a
/// subject, and `OCI-Tag` for tags given as `?tag=` (push by digest).
pub(super) async fn put(state: AppState, op: Operation, req: Request) -> ApiResult {
    let repo = repo(op.repository())?;
    let reference: Reference = op.arg().parse().map_err(ApiError::from)?;
    let q = query(req.uri());
    let tags = q
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.parse::<Tag>().map_err(ApiError::from))
        .collect::<ApiResult<Vec<_>>>()?;
    if tags.len() > 100 {
        return Err(
            ApiError::new(Code::TagInvalid, "too many tags").with_status(StatusCode::URI_TOO_LONG)
        );
    }
    let content_type = text(req.headers(), &header::CONTENT_TYPE)
        .unwrap_or("")
        .to_owned();
    let bytes = read_limited(req.into_body(), MAX_MANIFEST_SIZE).await?;
    let out = state
        .registry
        .put_manifest(super::at(&op), &reference, &content_type, bytes, &tags)
        .await?;
    let mut resp = (StatusCode::CREATED, Body::empty()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        value(&format!("/v2/{repo}/manifests/{}", out.digest)),
    );
    h.insert(DIGEST_HEADER, value(&out.digest.to_string()));
    h.insert(header::CONTENT_LENGTH, value("0"));
    if let Some(s) = &out.subject {
        h.insert("oci-subject", value(&s.to_string()));
    }
    for t in &tags {
        h.append("oci-tag", value(t.as_str()));
    }
    Ok(resp)
}

fn too_large() -> ApiError {
    ApiError::new(
        Code::ManifestInvalid,
        format!("manifest exceeds the limit of {MAX_MANIFEST_SIZE} bytes"),
    )
    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
}

async fn read_limited(body: Body, limit: usize) -> ApiResult<bytes::Bytes> {
    let mut s = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = s.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(Code::ManifestInvalid, format!("reading body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// `DELETE` a tag (removes only the tag) or a manifest by digest (and its tags): 202.
pub(super) async fn delete(state: AppState, op: Operation) -> ApiResult<Response> {
    repo(op.repository())?;
    let reference: Reference = op.arg().parse().map_err(ApiError::from)?;
    if !state.config.registry.delete_enabled {
        return Err(ApiError::new(Code::Unsupported, "deletes are disabled"));
    }
    state
        .registry
        .delete_manifest(super::at(&op), &reference)
        .await?;
    Ok(accepted())
}
