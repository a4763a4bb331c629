//! The HTTP API: one route table ([`operation::ROUTES`]), one dispatcher, handlers per
//! resource.
//!
//! A request is classified once ([`operation::classify_request`]); authorization, metrics and
//! handlers read the [`Operation`] from its extensions. Handlers speak HTTP only: they call the
//! registry façade ([`crate::registry`]) and render its answers; no SQL, no object store, no
//! upstream here. Failures become OCI errors in [`error`], and are logged once, by
//! [`error::log_failures`].

pub mod access;
mod blobs;
mod describe;
pub mod error;
mod headers;
mod listing;
mod manifests;
pub mod operation;
mod token;
mod uploads;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::time::Instant;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::state::AppState;
use error::{ApiError, ApiResult, Code};
use operation::{Classified, Operation};

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

/// Builds the router: health endpoints, metrics and the token service, then the distribution
/// API under `/v2` through the operation table.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::render))
        .route("/auth/token", get(token::get).post(token::post))
        .route(
            &format!("{}{{digest}}", crate::proxy::RELAY_PATH),
            get(blobs::relay),
        )
        .fallback(dispatch)
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            bound_body,
        ))
        .layer(axum::middleware::map_response(add_api_version))
        .layer(axum::middleware::from_fn(error::log_failures))
        .layer(axum::middleware::from_fn(track))
        .layer(axum::middleware::from_fn(operation::classify_request))
        .layer(TraceLayer::new_for_http())
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
        .with_state(state)
}

/// Middleware: a request body fails once its client sends nothing for `limits.body_timeout`,
/// so a client that stops in the middle of an upload releases its connection and upload file.
async fn bound_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    use axum::http::Method;
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return next.run(req).await;
    }
    let limit = state.limits.body_timeout;
    let req = req.map(|b| Body::new(crate::limits::IdleTimeoutBody::new(b, limit)));
    next.run(req).await
}

/// Middleware: counts and times every request, by endpoint.
async fn track(req: Request, next: Next) -> Response {
    let label = req
        .extensions()
        .get::<Classified>()
        .map_or("other", Classified::label);
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("berth_request_duration_seconds", "endpoint" => label, "method" => method.clone())
        .record(start.elapsed().as_secs_f64());
    metrics::counter!("berth_requests_total", "endpoint" => label, "method" => method, "status" => status)
        .increment(1);
    if let Some(n) = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        metrics::counter!("berth_bytes_sent_total").increment(n);
    }
    resp
}

async fn add_api_version(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    resp
}

/// Ready while storage answers. A full disk stays ready (200): pulls, deletes and garbage
/// collection still work and are what frees space, so taking the server out of rotation would
/// only stop pulls; the body and `berth_storage_full` say pushes are refused.
async fn readyz(State(state): State<AppState>) -> Response {
    match state.store().ping().await {
        Ok(()) if state.disk.is_full() => {
            "ready; storage full: pushes are refused until space is freed".into_response()
        }
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

/// `GET /v2/`: the API version check (authorization already decided who may ask).
async fn ping() -> ApiResult {
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from("{}"),
    )
        .into_response())
}

async fn dispatch(State(state): State<AppState>, mut req: Request) -> Response {
    let classified = req
        .extensions_mut()
        .remove::<Classified>()
        .unwrap_or_else(|| operation::classify(req.method(), req.uri()));
    let op = match classified {
        Classified::Operation(op) => op,
        Classified::Unsupported { shape, method } => {
            return ApiError::new(
                Code::Unsupported,
                format!("{method} is not supported on {shape:?}"),
            )
            .into_response();
        }
        Classified::NotFound | Classified::Other(_) => {
            // A browser asking for the root is sent to the web UI.
            if state.config.ui.enabled
                && req.uri().path() == "/"
                && req.method() == axum::http::Method::GET
                && crate::ui::wants_html(req.headers())
            {
                return axum::response::Redirect::to("/ui/").into_response();
            }
            return ApiError::new(Code::NameUnknown, "no such API path")
                .with_status(StatusCode::NOT_FOUND)
                .into_response();
        }
    };
    // A name outside the grammar is refused before authorization: no token could ever grant
    // a scope on it, and its validity reveals nothing.
    if !op.repository().is_empty()
        && let Err(e) = op.repository().parse::<berth_storage::RepoName>()
    {
        drain(req.into_body()).await;
        return ApiError::from(e).into_response();
    }
    let ip = crate::auth::client_ip(&req, &state.config.auth.trusted_proxies);
    match access::authorize(&state, &op, req.headers(), ip).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
        }
        Err(denied) => {
            drain(req.into_body()).await;
            return denied;
        }
    }
    // Bodies written to storage are bounded per process (memory, upload files); the place is
    // held until the answer is made. On a full disk they are refused before any byte is read.
    let _upload = if matches!(
        op.route.name,
        "start_upload" | "patch_upload" | "put_upload" | "put_manifest"
    ) {
        if state.disk.is_full() {
            drain(req.into_body()).await;
            return ApiError::storage_full(None).into_response();
        }
        match state.limits.upload() {
            Some(permit) => Some(permit),
            None => {
                metrics::counter!("berth_uploads_refused_total").increment(1);
                drain(req.into_body()).await;
                return ApiError::new(
                    Code::TooManyRequests,
                    "too many uploads in progress on this server; retry shortly",
                )
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
                .into_response();
            }
        }
    } else {
        None
    };
    let ns = op.ns.clone();
    let disk = state.disk.clone();
    let mut resp = (op.route.handler)(state, op, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if resp.extensions().get::<error::StorageFull>().is_some() {
        disk.on_full();
    }
    // containerd's ns, echoed when it chose the upstream.
    if let Some(ns) = ns
        && let Ok(v) = HeaderValue::from_str(&ns)
    {
        resp.headers_mut().insert("oci-namespace", v);
    }
    resp
}

/// Request bytes read and dropped before a refusal goes out.
const DRAIN_LIMIT: usize = 8 * 1024 * 1024;
/// How long a refused request's body is read at most.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads (and drops) a refused request's body, up to a bound: a client still sending an upload
/// when the 401 comes would otherwise see its connection reset instead of the challenge
/// (TLS clients in particular report only "EOF").
async fn drain(body: Body) {
    use futures_util::StreamExt as _;
    let mut s = body.into_data_stream();
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut n = 0;
        while let Some(Ok(chunk)) = s.next().await {
            n += chunk.len();
            if n > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// The repository `op` names, as the registry façade takes it.
fn at(op: &Operation) -> crate::registry::At<'_> {
    crate::registry::At {
        name: op.repository(),
        ns: op.ns.as_deref(),
    }
}
