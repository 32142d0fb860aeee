//! `/api/v1/packages`: build and store packages (`package_container`), list, show, delete.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use deploy_protocol::ErrorBody;
use uuid::Uuid;

use super::respond::{job_response, wants_async, AsyncParams, JobAccepted};
use super::schemas;
use crate::pipeline::PackageInfo;
use crate::service::error::{correlation_id, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::service::jobs::JobKind;
use crate::service::operations::{self, PackageInput, PackageOutput};
use crate::service::state::AppState;

/// Build an image from a Dockerfile and context (or take an existing image), then export,
/// compress, hash and store it. Waits until done, or with `Prefer: respond-async` (or
/// `?async=true`) answers 202 with a job to follow.
#[utoipa::path(post, path = "/api/v1/packages", operation_id = "package_container", tag = "packages",
    params(AsyncParams, ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 with a job")),
    request_body = schemas::PackageRequest,
    security((), ("api_token" = [])),
    responses(
        (status = 201, description = "Package stored", body = PackageOutput),
        (status = 202, description = "Job started", body = JobAccepted),
        (status = 400, description = "VALIDATION_ERROR: malformed JSON, bad tag, paths, levels", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED: bearer token missing or wrong", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such image", body = ErrorBody),
        (status = 409, description = "CONFLICT: the package id exists", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "BUILD_FAILED (with the build log's tail), or CHECKSUM_MISMATCH on verification", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<AsyncParams>,
    ApiJson(input): ApiJson<PackageInput>,
) -> ApiResult<Response> {
    start(state, input, wants_async(&headers, &params)).await
}

/// Runs `package_container` as a job; shared with `/api/v1/execute`.
pub(super) async fn start(
    state: AppState,
    input: PackageInput,
    run_async: bool,
) -> ApiResult<Response> {
    let config = state.config();
    let plan = input.plan(config.zstd_workers, config.store.max_package_size)?;
    let correlation = correlation_id();
    let (id, handle) = state
        .jobs()
        .spawn(JobKind::Package, correlation.clone(), |job| {
            operations::package(state.clone(), plan, correlation, job)
        });
    job_response(JobKind::Package, id, handle, run_async, StatusCode::CREATED).await
}

/// Stored packages, newest first.
#[utoipa::path(get, path = "/api/v1/packages", operation_id = "list_packages", tag = "packages",
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "Stored packages", body = Vec<PackageInfo>),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR: the package directory cannot be read", body = ErrorBody),
    ))]
pub(super) async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<PackageInfo>>> {
    Ok(Json(state.store().list().await?))
}

/// One stored package.
#[utoipa::path(get, path = "/api/v1/packages/{id}", operation_id = "get_package", tag = "packages",
    params(("id" = Uuid, Path, description = "Package id")),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "The package", body = PackageInfo),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub(super) async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<PackageInfo>> {
    Ok(Json(state.store().get(id).await?))
}

/// Delete a stored package and its metadata.
#[utoipa::path(delete, path = "/api/v1/packages/{id}", operation_id = "delete_package", tag = "packages",
    params(("id" = Uuid, Path, description = "Package id")),
    security((), ("api_token" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT: a transfer, deployment or rollout is sending the package; nothing was deleted", body = ErrorBody),
    ))]
pub(super) async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    state.store().delete(id).await?;
    tracing::info!(package_id = %id, "package deleted");
    Ok(StatusCode::NO_CONTENT)
}
