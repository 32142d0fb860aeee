//! `GET /deployments` and `GET /deployments/{id}`: the deployment journal. Signed like every
//! other call: it tells what runs on this host. `POST /deployments/{id}/rollback` undoes one.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use deploy_protocol::api::{DeploymentList, DeploymentRecord, RollbackResponse};
use deploy_protocol::ErrorBody;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::auth::Signed;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Records returned when no limit is given.
const DEFAULT_LIMIT: usize = 50;
/// Most records one request returns.
const MAX_LIMIT: usize = 1000;

/// Query of `GET /deployments`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// How many records, newest first (default 50, at most 1000).
    limit: Option<usize>,
    /// Only the records carrying this correlation id (exactly), e.g. a rollout's own: those of
    /// its deployments and of their rollbacks.
    correlation_id: Option<String>,
}

/// Recent deployments, newest first; with `correlation_id`, only those carrying it.
#[utoipa::path(get, path = "/deployments", operation_id = "list_deployments", tag = "deployment",
    params(ListParams, crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "Newest first", body = DeploymentList),
        (status = 400, description = "VALIDATION_ERROR: bad limit", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    query: std::result::Result<Query<ListParams>, QueryRejection>,
    Signed(()): Signed<()>,
) -> Result<Json<DeploymentList>> {
    let Query(params) = query.map_err(|e| ReceiverError::Validation(e.body_text()))?;
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let deployments = match params.correlation_id.as_deref() {
        None => state.journal().list(limit)?,
        Some(id) => {
            let mut matching = state.journal().all()?;
            matching.retain(|r| r.correlation_id.as_deref() == Some(id));
            matching.truncate(limit);
            matching
        }
    };
    Ok(Json(DeploymentList { deployments }))
}

/// One deployment's record, with its stages and error.
#[utoipa::path(get, path = "/deployments/{id}", operation_id = "get_deployment", tag = "deployment",
    params(("id" = Uuid, Path, description = "Deployment id"), crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "The record", body = DeploymentRecord),
        (status = 400, description = "VALIDATION_ERROR: not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    id: std::result::Result<Path<Uuid>, PathRejection>,
    Signed(()): Signed<()>,
) -> Result<Json<DeploymentRecord>> {
    let Path(id) = id.map_err(|e| ReceiverError::Validation(e.body_text()))?;
    state.journal().get(id)?.map(Json).ok_or_else(|| {
        ReceiverError::NotFound(format!("no deployment {id} in this receiver's journal"))
    })
}

/// Roll back a deployment: the deployment that preceded it for the same container name runs
/// again (from its image, kept by IMAGE_HISTORY) and must become healthy; when it was the first
/// of its name, its container is removed. Idempotent: asked again, the same outcome with
/// `repeated: true`, nothing touched. The body is empty (signed as such).
#[utoipa::path(post, path = "/deployments/{id}/rollback", operation_id = "rollback_deployment", tag = "deployment",
    params(("id" = Uuid, Path, description = "Deployment id"), crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "RESTORED, REMOVED or NOT_APPLIED (it never took effect)", body = RollbackResponse),
        (status = 400, description = "VALIDATION_ERROR: not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN; POLICY_DENIED: the previous image was not loaded by this receiver from a verified package (and ALLOW_UNVERIFIED_IMAGES is off)", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such deployment, or the previous image is no longer on this host", body = ErrorBody),
        (status = 409, description = "CONFLICT: still in progress, replaced by a later deployment, or the previous deployment was recorded without its spec", body = ErrorBody),
        (status = 422, description = "HEALTH_CHECK_FAILED: the previous release did not become healthy again; the rolled-back deployment runs on (the re-run's record with `error`)", body = DeploymentRecord),
        (status = 500, description = "DEPLOY_FAILED: the record of the re-run with `error`", body = DeploymentRecord),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn rollback(
    State(state): State<AppState>,
    id: std::result::Result<Path<Uuid>, PathRejection>,
    Signed(()): Signed<()>,
) -> Result<Json<RollbackResponse>> {
    let Path(id) = id.map_err(|e| ReceiverError::Validation(e.body_text()))?;
    // The rollback re-runs a deployment: it goes on when the client hangs up.
    let response = crate::deploy::detached(&state.clone(), async move {
        crate::deploy::roll_back(&state, id).await
    })
    .await?;
    Ok(Json(response))
}
