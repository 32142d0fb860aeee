//! `POST /deployment/health-check`: wait for a container to be healthy.

use axum::extract::State;
use axum::Json;
use deploy_protocol::api::{HealthCheckRequest, HealthCheckResponse};
use deploy_protocol::ErrorBody;

use crate::auth::Signed;
use crate::deploy::health;
use crate::error::Result;
use crate::state::AppState;

/// Wait until the named container is healthy (its Docker HEALTHCHECK, an HTTP probe of a
/// published port, or running through the settle period), or the deadline passes.
#[utoipa::path(post, path = "/deployment/health-check", operation_id = "check_container_health", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body = HealthCheckRequest,
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "Healthy", body = HealthCheckResponse),
        (status = 400, description = "VALIDATION_ERROR", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such container", body = ErrorBody),
        (status = 422, description = "HEALTH_CHECK_FAILED: not healthy in time; the message has the last output", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Signed(request): Signed<HealthCheckRequest>,
) -> Result<Json<HealthCheckResponse>> {
    Ok(Json(health::check(&state, request).await?))
}
