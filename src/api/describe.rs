//! `GET /v2/<name>/_describe/<reference>` (Berth's own, not in the spec): what a manifest is
//! made of, as a page or a tool shows it, computed from its bytes: its size and media type,
//! the config and layers with their sizes and the total, an index's platforms, its subject.
//! Read through the registry façade like a manifest `GET` (so it works on cached images too).

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use berth_storage::Reference;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult, Code};
use super::headers::repo;
use super::operation::Operation;
use crate::state::AppState;

/// The summary of manifest `reference` of the repository: 200 with JSON, 404
/// `MANIFEST_UNKNOWN`.
pub(super) async fn describe(state: AppState, op: Operation, _req: Request) -> ApiResult {
    repo(op.repository())?;
    let reference: Reference = op
        .arg()
        .parse()
        .map_err(|_| ApiError::new(Code::ManifestUnknown, "manifest unknown"))?;
    let m = state
        .registry
        .manifest(super::at(&op), &reference, false)
        .await
        .map_err(|e| ApiError::missing(e, Code::ManifestUnknown))?;
    let v: Value = serde_json::from_slice(&m.bytes).unwrap_or(Value::Null);
    let size = |d: &Value| d["size"].as_u64().unwrap_or(0);
    let descriptor =
        |d: &Value| json!({ "digest": d["digest"], "mediaType": d["mediaType"], "size": size(d) });
    let layers: Vec<&Value> = v["layers"].as_array().into_iter().flatten().collect();
    let total =
        m.bytes.len() as u64 + size(&v["config"]) + layers.iter().map(|l| size(l)).sum::<u64>();
    let platforms: Vec<Value> = v["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({
                "digest": c["digest"],
                "size": size(c),
                "os": c["platform"]["os"],
                "architecture": c["platform"]["architecture"],
                "variant": c["platform"]["variant"],
            })
        })
        .collect();
    let mut body = json!({
        "digest": m.digest.to_string(),
        "mediaType": m.media_type,
        "size": m.bytes.len(),
        "totalSize": total,
        "layers": layers.iter().map(|l| descriptor(l)).collect::<Vec<_>>(),
        "platforms": platforms,
    });
    for key in ["config", "subject"] {
        if v[key].is_object() {
            body[key] = descriptor(&v[key]);
        }
    }
    if let Some(t) = v["artifactType"].as_str() {
        body["artifactType"] = json!(t);
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}
