//! Berth: a container registry and pull-through image cache.
//!
//! # Layout
//! - [`api`]: the HTTP API (axum). [`api::operation`] classifies each request once (the
//!   operation table); handlers render what the registry façade answers; [`api::error`] is the
//!   one error table.
//! - `server`: the accept loop; idle plain connections wait without hyper's buffers.
//! - [`registry`]: the façade handlers call: local storage, and the cache where configured;
//!   decides once per request whether it is local or goes to an upstream.
//! - [`proxy`]: the pull-through cache of upstream registries (health, credentials, prefetch).
//! - [`auth`]: who is calling and what they may do (typed decisions; rules in `berth-auth`).
//! - [`config`]: the configuration file and its defaults.
//! - [`disk`]: a full data disk: the reserve, refusing pushes, recovering.
//! - [`jobs`]: background work (pull-time flushes, upload expiry, garbage collection,
//!   eviction, prefetch).
//! - [`limits`]: bounds on connections, uploads and slow clients.
//! - [`preflight`]: the one validation `check-config` and `serve` share.
//! - [`metrics`]: the Prometheus recorder and `/metrics`.
//! - [`cli`]: command-line parsing.
//! - [`state`]: shared handler state.
//! - [`telemetry`]: logging set-up.
//! - [`tls`]: HTTPS configuration and certificate reloading.
//! - [`ui`]: the web UI at `/ui/`.
//!
//! Persistence and the registry's invariants live in the `berth-storage` crate; this crate
//! only speaks HTTP and to upstreams. [`serve`] takes its listener and shutdown signal from the
//! caller, so tests run the real server on a random port.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod disk;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod preflight;
pub mod proxy;
pub mod registry;
mod server;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod ui;
pub mod wire;

use std::future::Future;

pub use state::AppState;

/// The router for `state`: the API, and the web UI unless `[ui] enabled = false`.
pub fn app(state: AppState) -> axum::Router {
    ui::router(state.clone()).merge(api::router(state))
}

/// How often the TLS files are looked at for rotation.
const TLS_RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How long in-flight requests get to finish on shutdown.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(25);

/// Serves the registry on `listener` until `shutdown` resolves, with its background jobs;
/// then lets in-flight requests finish (for up to [`DRAIN`]), stops the jobs and writes what
/// they hold. Serves HTTPS when `[tls]` names a certificate.
///
/// Every connection passes the connection gate and gets TCP_NODELAY; one whose client takes
/// longer than `limits.header_timeout` to send a request's headers, or idles longer than that
/// between requests, is closed. A plain connection holds no HTTP buffers while it idles (see
/// `server`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    metrics::install();
    let jobs = jobs::Jobs::start(&state);
    let router = app(state.clone());
    let gate = limits::GateAcceptor::new(state.limits.clone(), !state.config.tls.enabled());
    let listener = listener.into_std()?;
    let served = if state.config.tls.enabled() {
        serve_tls(listener, &state, router, gate, shutdown).await
    } else {
        server::run(
            listener,
            router,
            &state.limits,
            wire::ConnAcceptor(gate),
            server::drive_plain,
            shutdown,
        )
        .await
    };
    jobs.stop().await;
    served
}

async fn serve_tls(
    listener: std::net::TcpListener,
    state: &AppState,
    router: axum::Router,
    gate: limits::GateAcceptor,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let tls_section = state.config.tls.clone();
    let server_config = tls::server_config(&tls_section).map_err(std::io::Error::other)?;
    let rustls = axum_server::tls_rustls::RustlsConfig::from_config(server_config);
    // Certificate rotation: rebuild when a file's modification time changes; keep serving the
    // old certificate if the new files do not load.
    let reload = rustls.clone();
    let watcher = tokio::spawn(async move {
        let mut seen = tls::stamp(&tls_section);
        loop {
            tokio::time::sleep(TLS_RELOAD_EVERY).await;
            let now = tls::stamp(&tls_section);
            if now == seen {
                continue;
            }
            match tls::server_config(&tls_section) {
                Ok(c) => {
                    reload.reload_from_config(c);
                    seen = now;
                    tracing::info!("TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate")
                }
            }
        }
    });
    let acceptor =
        wire::ConnAcceptor(axum_server::tls_rustls::RustlsAcceptor::new(rustls).acceptor(gate));
    let served = server::run(
        listener,
        router,
        &state.limits,
        acceptor,
        server::drive_whole,
        shutdown,
    )
    .await;
    watcher.abort();
    served
}
