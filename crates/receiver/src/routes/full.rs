//! `POST /deployment/full`: upload, verify, load, deploy and health-check in one streamed request.

use axum::extract::{Request, State};
use axum::Json;
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::ErrorBody;

use crate::deploy;
use crate::error::Result;
use crate::routes::upload::UploadForm;
use crate::spool;
use crate::state::AppState;

/// What `/deployment/full` answers when it fails after the upload began: the deployment's record
/// (with `error`) when the deployment ran, or the error body when it never started (the package
/// was refused). For the OpenAPI document only.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum RecordOrError {
    /// The deployment ran and failed: its record, with `error`.
    Record(Box<DeploymentRecord>),
    /// It never started.
    Error(ErrorBody),
}

/// The whole pipeline: parts `manifest` (with the `deployment` spec) then `package`, streamed and
/// verified like an upload, loaded, deployed, health-checked, and rolled back to the previous
/// container on failure. The body is the deployment record with every stage's duration.
#[utoipa::path(post, path = "/deployment/full", operation_id = "upload_and_deploy", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "SUCCEEDED", body = DeploymentRecord),
        (status = 400, description = "VALIDATION_ERROR: wrong parts, no `deployment` in the manifest, bad spec", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN, or POLICY_DENIED (nothing was changed)", body = ErrorBody),
        (status = 408, description = "TIMEOUT: the client stopped sending", body = ErrorBody),
        (status = 409, description = "CONFLICT: the package id is stored with another checksum", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "CHECKSUM_MISMATCH (error body); LOAD_FAILED or HEALTH_CHECK_FAILED (the record, ROLLED_BACK or FAILED, with `error`)", body = RecordOrError),
        (status = 429, description = "BUSY: too many uploads; see Retry-After", body = ErrorBody),
        (status = 500, description = "DEPLOY_FAILED: Docker refused to create or start the container; the record with `error`", body = RecordOrError),
        (status = 503, description = "DOCKER_UNAVAILABLE: Docker is not reachable (error body), or went away mid-deployment (the record with `error`; IN_PROGRESS while its rollback waits for Docker, which the receiver then finishes by itself: see GET /deployments/{id})", body = RecordOrError),
        (status = 507, description = "INSUFFICIENT_STORAGE", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<DeploymentRecord>> {
    let (parts, body) = request.into_parts();
    let received = spool::receive_multipart(&state, &parts, body, |manifest| {
        deploy::full_spec(&state, manifest).map(|_| ())
    })
    .await;
    match &received {
        Ok(_) => state.metrics().upload("ok"),
        Err(e) => state.metrics().upload(e.code().as_str()),
    }
    // The package is received whole: its deployment goes on if the client hangs up now.
    let received = received?;
    let record = deploy::detached(&state.clone(), async move {
        deploy::deploy_package(&state, received).await
    })
    .await?;
    Ok(Json(record))
}
