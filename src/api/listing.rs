//! Listings: tags (end-8), the catalog (Docker) and referrers (end-12).

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_storage::{Digest, Page};
use serde_json::json;

use super::error::{ApiError, ApiResult, Code};
use super::headers::{param, query, repo, value};
use super::operation::Operation;
use crate::auth::Caller;
use crate::state::AppState;

/// Largest page served; a larger `n` is clamped and answered with a `Link` to the next page.
const MAX_PAGE: usize = 10_000;
/// Catalog page size when the client gives no `n`.
const DEFAULT_CATALOG_PAGE: usize = 1_000;

fn page_size(q: &[(String, String)], default: usize) -> ApiResult<usize> {
    match param(q, "n") {
        None | Some("") => Ok(default),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(MAX_PAGE))
            .map_err(|_| ApiError::new(Code::PaginationNumberInvalid, format!("invalid n {n:?}"))),
    }
}

fn json_page(body: serde_json::Value, page: &Page, base: &str, n: usize) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if page.more
        && let Some(last) = page.items.last()
    {
        let enc: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
        resp.headers_mut().insert(
            header::LINK,
            value(&format!("<{base}?last={enc}&n={n}>; rel=\"next\"")),
        );
    }
    resp
}

/// `GET /v2/<name>/tags/list[?n=&last=]`.
///
/// For a cached repository the page comes from the upstream (the cached tags when it fails),
/// under the name the client used.
pub(super) async fn tags(state: AppState, op: Operation, req: Request) -> ApiResult {
    let repo = repo(op.repository())?;
    let q = query(req.uri());
    let n = page_size(&q, MAX_PAGE)?;
    let page = state
        .registry
        .tags(super::at(&op), param(&q, "last"), n)
        .await
        .map_err(|e| ApiError::missing(e, Code::NameUnknown))?;
    let body = json!({ "name": repo.as_str(), "tags": page.items });
    Ok(json_page(body, &page, &format!("/v2/{repo}/tags/list"), n))
}

/// `GET /v2/_catalog[?n=&last=]`.
///
/// With access control on, only repositories the caller may pull are listed; pages are
/// filled from further storage pages so `n` still means `n`.
pub(super) async fn catalog(state: AppState, _op: Operation, req: Request) -> ApiResult {
    let q = query(req.uri());
    let n = page_size(&q, DEFAULT_CATALOG_PAGE)?;
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Open);
    let page = match state.auth.as_deref() {
        None => state.registry.catalog(param(&q, "last"), n).await?,
        Some(auth) => {
            let mut items = Vec::new();
            let mut last = param(&q, "last").map(str::to_owned);
            let more = loop {
                let p = state.registry.catalog(last.as_deref(), n).await?;
                last = p.items.last().cloned();
                let mut rest = p.items.into_iter();
                for name in rest.by_ref() {
                    if auth.may_list(&caller, &name) {
                        items.push(name);
                        if items.len() == n {
                            break;
                        }
                    }
                }
                if items.len() == n {
                    break rest.len() > 0 || p.more;
                }
                if !p.more {
                    break false;
                }
            };
            Page { items, more }
        }
    };
    let body = json!({ "repositories": page.items });
    Ok(json_page(body, &page, "/v2/_catalog", n))
}

/// `GET /v2/<name>/referrers/<digest>[?artifactType=]`: always an OCI index, possibly empty.
///
/// For a cached repository, the upstream's referrers are cached first (see
/// [`crate::proxy`]).
pub(super) async fn referrers(state: AppState, op: Operation, req: Request) -> ApiResult {
    repo(op.repository())?;
    let digest: Digest = op.arg().parse().map_err(ApiError::from)?;
    let q = query(req.uri());
    let filter = param(&q, "artifactType").filter(|t| !t.is_empty());
    let list = state
        .registry
        .referrers(super::at(&op), &digest, filter)
        .await?;
    let manifests: Vec<_> = list
        .into_iter()
        .map(|r| {
            let mut d = json!({ "mediaType": r.media_type, "digest": r.digest, "size": r.size });
            if let Some(t) = r.artifact_type {
                d["artifactType"] = json!(t);
            }
            if let Some(a) = r
                .annotations
                .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok())
            {
                d["annotations"] = a;
            }
            d
        })
        .collect();
    let body = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let mut resp = (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/vnd.oci.image.index.v1+json",
        )],
        body.to_string(),
    )
        .into_response();
    if filter.is_some() {
        resp.headers_mut()
            .insert("oci-filters-applied", value("artifactType"));
    }
    Ok(resp)
}
