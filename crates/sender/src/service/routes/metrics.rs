//! `GET /metrics` (Prometheus text) and `GET /api/v1/metrics` (the `get_metrics` JSON).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use deploy_protocol::ErrorBody;

use crate::service::metrics::MetricsSummary;
use crate::service::state::AppState;

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", operation_id = "get_prometheus_metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain; version=0.0.4", body = String)))]
pub(super) async fn prometheus(State(state): State<AppState>) -> impl IntoResponse {
    let events = state.events();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state
            .metrics()
            .render(&events.sink().stats(), events.record_failures()),
    )
}

/// Counts of builds, transfers, bytes and events since start (`get_metrics`).
#[utoipa::path(get, path = "/api/v1/metrics", operation_id = "get_metrics", tag = "operations",
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "Counts since start", body = MetricsSummary),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ))]
pub(super) async fn summary(State(state): State<AppState>) -> Json<MetricsSummary> {
    Json(current(&state))
}

/// The summary now; shared with `/api/v1/execute`.
pub(super) fn current(state: &AppState) -> MetricsSummary {
    let events = state.events();
    state
        .metrics()
        .summary(&events.sink().stats(), events.record_failures())
}
