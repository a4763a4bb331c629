//! Berth: a container registry and pull-through image cache.
//!
//! # Layout
//! - [`api`]: the HTTP API (axum): one route table, a path parser, handlers per resource.
//! - [`config`]: the configuration file and its defaults.
//! - [`jobs`]: background work (pull-time flushes, upload expiry, garbage collection).
//! - [`metrics`]: Prometheus metrics at `/metrics`.
//! - [`cli`]: command-line parsing.
//! - [`state`]: shared handler state.
//! - [`telemetry`]: logging set-up.
//!
//! Persistence and the registry's invariants live in the `berth-storage` crate; this crate
//! only speaks HTTP. [`serve`] takes its listener and shutdown signal from the caller, so
//! tests run the real server on a random port.

pub mod api;
pub mod cli;
pub mod config;
pub mod jobs;
pub mod metrics;
pub mod state;
pub mod telemetry;

use std::future::Future;

pub use state::AppState;

/// The router for `state`.
pub fn app(state: AppState) -> axum::Router {
    api::router(state)
}

/// Serves the registry on `listener` until `shutdown` resolves, with its background jobs;
/// then lets in-flight requests finish, stops the jobs and writes what they hold.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let jobs = jobs::Jobs::start(&state);
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    jobs.stop().await;
    served
}
