//! The web UI: pages at `/ui/` that show what the registry and the cache hold, on the API's
//! port, with the API's users and rights.
//!
//! Pages are rendered on the server from maud templates compiled into the binary; one
//! stylesheet and a few lines of plain JavaScript (copy buttons, delete confirmations) are
//! served from `/ui/static/`. Every page reads a bounded amount: listings are paged in the
//! database (50 rows), an image page reads one manifest, its config and its referrers.
//!
//! Sessions, CSRF and rights: [`session`]. What a page computes from stored bytes: [`view`].

mod pages;
pub mod session;
pub mod view;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::html;

use crate::state::AppState;

const CSS: &str = include_str!("static/berth.css");
const JS: &str = include_str!("static/berth.js");

/// The UI's routes (empty when `[ui] enabled = false`).
pub fn router(state: AppState) -> Router {
    if !state.config.ui.enabled {
        return Router::new();
    }
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::repositories))
        .route("/ui/repo", get(pages::repository))
        .route("/ui/image", get(pages::image))
        .route("/ui/raw", get(pages::raw))
        .route("/ui/compare", get(pages::compare))
        .route("/ui/cache", get(pages::cache))
        .route("/ui/login", get(pages::login_form).post(pages::login))
        .route("/ui/logout", post(pages::logout))
        .route("/ui/delete", post(pages::delete_tag))
        .route(
            "/ui/static/berth.css",
            get(|| async { asset("text/css", CSS) }),
        )
        .route(
            "/ui/static/berth.js",
            get(|| async { asset("text/javascript", JS) }),
        )
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

/// Whether a request for `/` comes from a browser (it asks for HTML): it is sent to the UI.
pub fn wants_html(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Middleware: what every UI answer carries: no framing, no sniffing, scripts and styles
/// from this origin only, pages not cached (they show rights), and the server time spent.
async fn guard(req: Request, next: Next) -> Response {
    let start = std::time::Instant::now();
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    let micros = start.elapsed().as_micros();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "render;dur={}.{:03}",
        micros / 1000,
        micros % 1000
    )) {
        h.insert("server-timing", v);
    }
    resp
}

/// Why a page could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// Nothing there, or nothing this viewer may see (the same answer for both).
    #[error("not found")]
    NotFound,
    /// The viewer may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] berth_storage::Error),
    /// The session key could not be read.
    #[error(transparent)]
    Session(#[from] session::SessionError),
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Storage(berth_storage::Error::NameUnknown(_))
            | Self::Storage(berth_storage::Error::ManifestUnknown(_)) => StatusCode::NOT_FOUND,
            Self::Storage(_) | Self::Session(_) => {
                tracing::warn!(error = %self, "web UI page failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let body = view::layout(
            status.canonical_reason().unwrap_or("Error"),
            None,
            false,
            "",
            html! {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error { (self.to_string()) }
                p { a href="/ui/" { "Repositories" } " · " a href="/ui/login" { "Sign in" } }
            },
        );
        (status, axum::response::Html(body.into_string())).into_response()
    }
}
