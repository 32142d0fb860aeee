//! `GET /health`: liveness and what an operator needs to know at a glance.

use axum::extract::State;
use axum::Json;
use deploy_protocol::api::HealthResponse;

use crate::state::AppState;

/// Service health.
#[utoipa::path(get, path = "/health", tag = "service",
    responses((status = 200, description = "The receiver is serving", body = HealthResponse)))]
pub async fn get(State(state): State<AppState>) -> Json<HealthResponse> {
    let docker_version = state.docker().version().await;
    Json(HealthResponse {
        status: if docker_version.is_some() {
            "healthy"
        } else {
            "degraded"
        }
        .into(),
        service: "deploy-receiver".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: deploy_protocol::PROTOCOL_VERSION.into(),
        mode: "standalone".into(),
        uptime_secs: state.uptime_secs(),
        free_bytes: state.store().free_bytes(),
        docker_available: docker_version.is_some(),
        docker_version,
        events: None,
        warnings: crate::warnings(state.config()),
    })
}
