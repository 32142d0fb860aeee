//! `POST /deployment/deploy`: run a container from an image already loaded on this host.

use axum::extract::State;
use axum::Json;
use deploy_protocol::api::{DeployRequest, DeploymentRecord};
use deploy_protocol::ErrorBody;

use crate::auth::Signed;
use crate::deploy;
use crate::error::Result;
use crate::state::AppState;

/// Deploy a container: the container of the same name is replaced; the new one must become
/// healthy, or the previous one is restored. One deployment per container name at a time.
#[utoipa::path(post, path = "/deployment/deploy", operation_id = "deploy_container", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body = DeployRequest,
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "SUCCEEDED: the new container runs and is healthy", body = DeploymentRecord),
        (status = 400, description = "VALIDATION_ERROR: bad spec, no image, or `docker` check on an image without HEALTHCHECK", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN, or POLICY_DENIED: the spec asks for privileged, binds, host network, cap_add or devices and this receiver does not allow it", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: the image is not loaded", body = ErrorBody),
        (status = 422, description = "HEALTH_CHECK_FAILED: the record (status ROLLED_BACK or FAILED) with `error`", body = DeploymentRecord),
        (status = 500, description = "DEPLOY_FAILED: Docker refused to create or start the container; the record with `error`", body = DeploymentRecord),
        (status = 503, description = "DOCKER_UNAVAILABLE: Docker is not reachable (error body), or went away mid-deployment (the record with `error`; IN_PROGRESS while its rollback waits for Docker, which the receiver then finishes by itself: see GET /deployments/{id})", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Signed(request): Signed<DeployRequest>,
) -> Result<Json<DeploymentRecord>> {
    Ok(Json(deploy::deploy(&state, request).await?))
}
