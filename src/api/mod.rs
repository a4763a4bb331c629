//! The HTTP API: one route table, one dispatcher over [`Endpoint`], handlers per resource.
//!
//! Handlers speak HTTP only; every change to what the registry holds goes through
//! [`berth_storage::Store`].

pub mod access;
mod blobs;
mod cached;
pub mod endpoint;
pub mod error;
mod headers;
mod listing;
mod manifests;
mod token;
mod uploads;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

use crate::state::AppState;
use endpoint::Endpoint;
use error::{ApiError, ApiResult, Code};

const API_VERSION: HeaderValue = HeaderValue::from_static("registry/2.0");

/// Builds the router: health endpoints plus the distribution API under `/v2`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::render))
        .route("/auth/token", get(token::get).post(token::post))
        .fallback(dispatch)
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(add_api_version))
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(TraceLayer::new_for_http())
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
        .with_state(state)
}

async fn add_api_version(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert("docker-distribution-api-version", API_VERSION);
    resp
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable").into_response()
        }
    }
}

async fn dispatch(State(state): State<AppState>, mut req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let Some(ep) = Endpoint::parse(&path) else {
        return ApiError::new(Code::NameUnknown, "no such API path")
            .with_status(StatusCode::NOT_FOUND)
            .into_response();
    };
    let ip = access::client_ip(&req, &state.config.auth.trusted_proxies);
    match access::authorize(&state, &ep, req.method(), req.headers(), ip).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
        }
        Err(denied) => {
            drain(req.into_body()).await;
            return denied;
        }
    }
    if let Some(proxy) = state.proxy.clone()
        && let Some(answer) = through_cache(&state, &proxy, &ep, &mut req).await
    {
        return answer;
    }
    let result = route(&state, ep, req).await;
    result.unwrap_or_else(IntoResponse::into_response)
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

/// Sends reads of cached repositories to the cache and refuses writes to them; `None` for
/// local requests.
async fn through_cache(
    state: &AppState,
    proxy: &crate::proxy::Proxy,
    ep: &Endpoint<'_>,
    req: &mut Request,
) -> Option<Response> {
    let method = req.method().clone();
    use crate::proxy::Route;
    let name = match *ep {
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::Tags { name }
        | Endpoint::Referrers { name, .. }
        | Endpoint::Uploads { name }
        | Endpoint::Upload { name, .. } => name,
        Endpoint::Base | Endpoint::Catalog => return None,
    };
    let ns = headers::param(&headers::query(req.uri()), "ns").map(str::to_owned);
    let read = (method == Method::GET || method == Method::HEAD)
        && !matches!(ep, Endpoint::Uploads { .. } | Endpoint::Upload { .. });
    if !read {
        let cached = proxy.is_cache_name(name) || ns.as_deref().is_some_and(|n| proxy.knows_ns(n));
        return cached.then(|| {
            ApiError::new(Code::Unsupported, "cached repositories are read-only").into_response()
        });
    }
    let target = match proxy.route(name, ns.as_deref()).await {
        Route::Local => return None,
        Route::UnknownUpstream(ns) => {
            return Some(
                ApiError::new(
                    Code::NameUnknown,
                    format!("no upstream registry {ns:?} is configured here"),
                )
                .with_status(StatusCode::NOT_FOUND)
                .into_response(),
            );
        }
        Route::Cached(t) => t,
    };
    let owned = std::mem::replace(req, Request::new(Body::empty()));
    let mut resp = cached::serve(state, proxy, &target, ep, owned)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    if let Some(ns) = ns
        && let Ok(v) = HeaderValue::from_str(&ns)
    {
        resp.headers_mut().insert("oci-namespace", v);
    }
    Some(resp)
}

async fn route(state: &AppState, ep: Endpoint<'_>, req: Request) -> ApiResult {
    let method = req.method().clone();
    let unsupported = || {
        Err(ApiError::new(
            Code::Unsupported,
            format!("{method} is not supported on {}", ep.label()),
        ))
    };
    match ep {
        Endpoint::Base => match method {
            Method::GET | Method::HEAD => Ok((
                [(header::CONTENT_TYPE, "application/json")],
                Body::from("{}"),
            )
                .into_response()),
            _ => unsupported(),
        },
        Endpoint::Catalog => match method {
            Method::GET | Method::HEAD => listing::catalog(state, req).await,
            _ => unsupported(),
        },
        Endpoint::Tags { name } => match method {
            Method::GET | Method::HEAD => listing::tags(state, name, req).await,
            _ => unsupported(),
        },
        Endpoint::Referrers { name, digest } => match method {
            Method::GET | Method::HEAD => listing::referrers(state, name, digest, req).await,
            _ => unsupported(),
        },
        Endpoint::Manifest { name, reference } => match method {
            Method::GET | Method::HEAD => manifests::get(state, name, reference, req).await,
            Method::PUT => manifests::put(state, name, reference, req).await,
            Method::DELETE => manifests::delete(state, name, reference).await,
            _ => unsupported(),
        },
        Endpoint::Blob { name, digest } => match method {
            Method::GET | Method::HEAD => blobs::get(state, name, digest, req).await,
            Method::DELETE => blobs::delete(state, name, digest).await,
            _ => unsupported(),
        },
        Endpoint::Uploads { name } => match method {
            Method::POST => uploads::post(state, name, req).await,
            _ => unsupported(),
        },
        Endpoint::Upload { name, id } => match method {
            Method::GET | Method::HEAD => uploads::status(state, name, id).await,
            Method::PATCH => uploads::patch(state, name, id, req).await,
            Method::PUT => uploads::put(state, name, id, req).await,
            Method::DELETE => uploads::cancel(state, name, id).await,
            _ => unsupported(),
        },
    }
}
