//! `GET /health`: liveness and what an operator needs to know at a glance.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::service::state::AppState;

/// The sender's health.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SenderHealth {
    /// `healthy`, or `degraded` when Docker is unreachable (packaging fails then).
    pub status: String,
    /// `deploy-sender`.
    pub service: String,
    /// Crate version.
    pub version: String,
    /// Protocol version spoken to receivers.
    pub protocol_version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Whether the Docker engine answered.
    pub docker_available: bool,
    /// The engine's version, when reachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_version: Option<String>,
    /// The package directory.
    pub package_dir: String,
    /// Free bytes in it.
    pub free_bytes: u64,
    /// Where lifecycle events go: `kafka://HOSTS/TOPIC` or `outbox:PATH`.
    pub events: String,
    /// Events recorded and not yet taken by Kafka.
    pub events_pending: u64,
    /// The latest Kafka delivery error, until a delivery succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_last_error: Option<String>,
    /// DEFAULT_RECEIVER_URL, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_receiver: Option<String>,
}

/// Service health (never needs the bearer token).
#[utoipa::path(get, path = "/health", operation_id = "get_health", tag = "service",
    responses((status = 200, description = "The sender is serving", body = SenderHealth)))]
pub(super) async fn get(State(state): State<AppState>) -> Json<SenderHealth> {
    let docker_version = state.docker_version().await;
    let stats = state.events().sink().stats();
    Json(SenderHealth {
        status: if docker_version.is_some() {
            "healthy"
        } else {
            "degraded"
        }
        .into(),
        service: "deploy-sender".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol_version: deploy_protocol::PROTOCOL_VERSION.into(),
        uptime_secs: state.uptime_secs(),
        docker_available: docker_version.is_some(),
        docker_version,
        package_dir: state.store().dir().display().to_string(),
        free_bytes: state.free_bytes(),
        events: state.events().sink().destination(),
        events_pending: stats.pending,
        events_last_error: stats.last_error,
        default_receiver: state.config().receiver.url().map(str::to_owned),
    })
}
