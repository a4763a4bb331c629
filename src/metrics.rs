//! Prometheus metrics, served at `/metrics`: the recorder, installed once at start-up
//! ([`install`]), and the rendering, which adds what storage recorded (uploads in progress,
//! the latest garbage collection of any process). Requests are counted by the API's own
//! middleware (`api::track`), which reads the operation it classified.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `berth_requests_total` | counter | endpoint (the operation's name), method, status |
//! | `berth_request_duration_seconds` | histogram | endpoint, method |
//! | `berth_bytes_received_total` | counter | |
//! | `berth_bytes_sent_total` | counter | |
//! | `berth_connections_accepted_total`, `berth_connections_refused_total` | counter | (refused: over `limits.max_connections`) |
//! | `berth_uploads_in_progress` | gauge | |
//! | `berth_storage_errors_total` | counter | |
//! | `berth_gc_last_run_timestamp_seconds`, `berth_gc_last_duration_seconds`, `berth_gc_last_removed_blobs`, `berth_gc_last_removed_bytes`, `berth_gc_last_removed_manifests` | gauge | (the latest run of any process sharing the database) |

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls do nothing).
pub fn install() {
    handle();
}

/// The process-wide recorder's handle, installing the recorder on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("berth_request_duration_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
                ],
            )
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let h = recorder.handle();
        // Only the first recorder of a process wins (tests run several servers).
        let _ = metrics::set_global_recorder(recorder);
        h
    })
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Response {
    if let Ok(n) = state.store().uploads_in_progress().await {
        metrics::gauge!("berth_uploads_in_progress").set(n as f64);
    }
    // The latest collection of any process sharing the database (`berth gc`, other replicas).
    if let Ok(Some(run)) = state.store().last_gc_run().await {
        gc_gauges(&run);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle().render(),
    )
        .into_response()
}

fn gc_gauges(run: &berth_storage::GcRun) {
    let r = &run.report;
    metrics::gauge!("berth_gc_last_run_timestamp_seconds").set(run.finished_at as f64);
    metrics::gauge!("berth_gc_last_duration_seconds").set(run.duration.as_secs_f64());
    metrics::gauge!("berth_gc_last_removed_blobs").set(r.blobs as f64);
    metrics::gauge!("berth_gc_last_removed_bytes").set(r.blob_bytes as f64);
    metrics::gauge!("berth_gc_last_removed_manifests").set(r.manifests as f64);
}
