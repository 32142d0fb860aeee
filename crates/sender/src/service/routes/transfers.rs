//! `POST /api/v1/transfers`: send a stored package to receivers (`transfer_package`).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use deploy_protocol::ErrorBody;

use super::respond::{job_response, wants_async, AsyncParams, JobAccepted};
use crate::service::error::{correlation_id, ApiJson, ApiQuery, ApiResult};
use crate::service::jobs::JobKind;
use crate::service::operations::{self, TransferInput, TransferReport};
use crate::service::state::AppState;

/// Stream a stored package to one or more receivers at once (at most MAX_CONCURRENT_TRANSFERS
/// uploads in the service), signed with the shared key. With `deployment` each receiver also
/// loads, runs and health-checks it (`/deployment/full`). Answers each receiver's outcome; when
/// every receiver failed, the first failure is the error. `Prefer: respond-async` (or
/// `?async=true`) answers 202 with a job to follow.
#[utoipa::path(post, path = "/api/v1/transfers", operation_id = "transfer_package", tag = "transfers",
    params(AsyncParams, ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 with a job")),
    request_body = TransferInput,
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "Sent (see each receiver's `success`)", body = TransferReport),
        (status = 202, description = "Job started", body = JobAccepted),
        (status = 400, description = "VALIDATION_ERROR: malformed JSON, no receiver, bad URL, no HMAC secret", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED: bearer token missing or wrong; or the receiver refused the signature", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such package", body = ErrorBody),
        (status = 422, description = "CHECKSUM_MISMATCH: the stored package changed; LOAD_FAILED or HEALTH_CHECK_FAILED from the receiver's deployment", body = ErrorBody),
        (status = 429, description = "BUSY: the receiver is busy", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR or DEPLOY_FAILED", body = ErrorBody),
        (status = 502, description = "REMOTE_UNREACHABLE or TRANSFER_FAILED", body = ErrorBody),
    ))]
pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<AsyncParams>,
    ApiJson(input): ApiJson<TransferInput>,
) -> ApiResult<Response> {
    start(state, input, wants_async(&headers, &params)).await
}

/// Runs `transfer_package` as a job; shared with `/api/v1/execute`.
pub(super) async fn start(
    state: AppState,
    input: TransferInput,
    run_async: bool,
) -> ApiResult<Response> {
    let plan = input.plan(&state).await?;
    let correlation = correlation_id();
    let (id, handle) = state
        .jobs()
        .spawn(JobKind::Transfer, correlation.clone(), |job| {
            operations::transfer(state.clone(), plan, correlation, job)
        });
    job_response(JobKind::Transfer, id, handle, run_async, StatusCode::OK).await
}
