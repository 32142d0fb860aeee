//! `GET /health`: liveness and what an operator needs to know at a glance.

use axum::extract::State;
use axum::Json;
use deploy_protocol::api::HealthResponse;

use crate::state::AppState;

/// Service health: Docker reachability, free space, and where lifecycle events go.
#[utoipa::path(get, path = "/health", operation_id = "get_health", tag = "service",
    responses((status = 200, description = "The receiver is serving; `status` is `degraded` when Docker is unreachable. `events` is where lifecycle events go (`kafka://HOSTS/TOPIC` or `outbox:PATH`), `events_pending` how many wait for Kafka and `events_last_error` why, until a delivery succeeds", body = HealthResponse)))]
pub async fn get(State(state): State<AppState>) -> Json<HealthResponse> {
    let docker_version = state.docker().version().await;
    let mut warnings = crate::warnings(state.config());
    let events = match state.events().destination().await {
        Ok(destination) => Some(destination),
        Err(e) => {
            warnings.push(format!("lifecycle events are not being recorded: {e}"));
            None
        }
    };
    let event_stats = state.events().stats();
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
        events,
        events_pending: event_stats.pending,
        events_last_error: event_stats.last_error,
        warnings,
    })
}
