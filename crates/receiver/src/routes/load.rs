//! `POST /deployment/load`: load a stored package into Docker.

use axum::extract::State;
use axum::Json;
use deploy_protocol::api::{LoadRequest, LoadResponse};
use deploy_protocol::ErrorBody;

use crate::auth::Signed;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Load a received package: its archive is decompressed and checked on the way into
/// `docker load` (only the signed `image_tags` may be set; no path traversal, escaping links or
/// devices; referenced layers present; at most MAX_IMAGE_SIZE unpacked). One load runs at a
/// time; others wait their turn.
#[utoipa::path(post, path = "/deployment/load", operation_id = "load_package", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body = LoadRequest,
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "Loaded: image id and the tags set", body = LoadResponse),
        (status = 400, description = "VALIDATION_ERROR: malformed body", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED: signature, key id, timestamp or nonce refused", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: client not in ALLOWED_NETWORKS", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no stored package with this id", body = ErrorBody),
        (status = 422, description = "LOAD_FAILED: archive refused (undeclared tag, traversal, escaping link, device, missing layer, over MAX_IMAGE_SIZE), corrupt, or refused by Docker; nothing was loaded", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR: the package file could not be read", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE: the Docker engine is not reachable", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Signed(request): Signed<LoadRequest>,
) -> Result<Json<LoadResponse>> {
    let id = request.package_id;
    let package = state.store().get(id)?.ok_or_else(|| {
        ReceiverError::NotFound(format!(
            "no stored package {id}: upload it first (/deployment/upload)"
        ))
    })?;
    Ok(Json(crate::load::load_package(&state, &package).await?))
}
