//! Berth: a container registry and pull-through image cache.
//!
//! # Layout
//! - [`api`]: the HTTP API (axum). [`api::operation`] classifies each request once (the
//!   operation table); handlers render what the registry façade answers; [`api::error`] is the
//!   one error table.
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
/// Every connection passes the connection gate and gets TCP_NODELAY; hyper closes one whose
/// client takes longer than `limits.header_timeout` to send a request's headers (which also
/// bounds how long a kept-alive connection idles).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    metrics::install();
    let jobs = jobs::Jobs::start(&state);
    let make = app(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        h.graceful_shutdown(Some(DRAIN));
    });
    let gate = limits::GateAcceptor::new(state.limits.clone(), !state.config.tls.enabled());
    let listener = listener.into_std()?;
    let served = if state.config.tls.enabled() {
        serve_tls(listener, &state, make, gate, handle).await
    } else {
        let mut server = axum_server::from_tcp(listener)?
            .acceptor(wire::ConnAcceptor(gate))
            .handle(handle);
        configure(server.http_builder(), &state.limits);
        server.serve(make).await
    };
    jobs.stop().await;
    served
}

/// The HTTP settings both listeners share.
fn configure(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    limits: &limits::Limits,
) {
    builder
        .http1()
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_size);
}

async fn serve_tls(
    listener: std::net::TcpListener,
    state: &AppState,
    make: axum::extract::connect_info::IntoMakeServiceWithConnectInfo<
        axum::Router,
        std::net::SocketAddr,
    >,
    gate: limits::GateAcceptor,
    handle: axum_server::Handle<std::net::SocketAddr>,
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
    let mut server = axum_server::from_tcp_rustls(listener, rustls)?
        .map(|tls| wire::ConnAcceptor(tls.acceptor(gate)))
        .handle(handle);
    configure(server.http_builder(), &state.limits);
    let served = server.serve(make).await;
    watcher.abort();
    served
}
