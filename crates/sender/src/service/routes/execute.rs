//! `POST /api/v1/execute`: the operation envelope (`{"operation", "input"}`), dispatched to the resource handlers
//! (same answers, same errors).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use deploy_protocol::ErrorBody;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::respond::{wants_async, AsyncParams, JobAccepted};
use super::{packages, schemas, transfers};
use crate::service::error::{correlation_id, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::service::metrics::MetricsSummary;
use crate::service::operations::{self, EventInput, PublishedEvent};
use crate::service::state::AppState;

/// The operations the envelope can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Operation {
    /// `POST /api/v1/packages`.
    PackageContainer,
    /// `POST /api/v1/transfers`.
    TransferPackage,
    /// `POST /api/v1/events`.
    PublishTransferEvent,
    /// `GET /api/v1/metrics`.
    GetMetrics,
}

/// `{"operation": ..., "input": {...}, "correlation_id": ...}`.
/// Documented as [`super::schemas::ExecuteRequest`] (one shape per operation).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecuteRequest {
    /// Which operation.
    pub operation: Operation,
    /// The operation's input: `PackageInput`, `TransferInput` or `EventInput`; none for
    /// `get_metrics`.
    #[serde(default)]
    pub input: serde_json::Value,
    /// Correlation id of the operation (default: `X-Correlation-Id`, or a new one).
    #[serde(default)]
    pub correlation_id: Option<String>,
}

/// Run one operation by name. The answer is the operation's own endpoint's answer:
/// `package_container` as `POST /api/v1/packages` (201, or 202 with `Prefer: respond-async`),
/// `transfer_package` as `POST /api/v1/transfers`, `publish_transfer_event` as
/// `POST /api/v1/events`, `get_metrics` as `GET /api/v1/metrics`.
#[utoipa::path(post, path = "/api/v1/execute", operation_id = "execute_operation", tag = "operations",
    params(AsyncParams, ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 with a job (packaging and transfers)")),
    request_body = schemas::ExecuteRequest,
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "transfer_package: its `TransferReport`; get_metrics: its `MetricsSummary`", body = schemas::ExecuteOk),
        (status = 201, description = "package_container: its `PackageOutput`; publish_transfer_event: its `PublishedEvent`", body = schemas::ExecuteCreated),
        (status = 202, description = "Job started", body = JobAccepted),
        (status = 400, description = "VALIDATION_ERROR: malformed envelope or input, unknown operation", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "BUILD_FAILED, CHECKSUM_MISMATCH, LOAD_FAILED, HEALTH_CHECK_FAILED", body = ErrorBody),
        (status = 500, description = "INTERNAL_ERROR or DEPLOY_FAILED", body = ErrorBody),
        (status = 502, description = "REMOTE_UNREACHABLE or TRANSFER_FAILED", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE or KAFKA_PUBLISH_FAILED", body = ErrorBody),
    ))]
pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<AsyncParams>,
    ApiJson(envelope): ApiJson<ExecuteRequest>,
) -> ApiResult<Response> {
    let run_async = wants_async(&headers, &params);
    let correlation = match envelope.correlation_id {
        Some(id) if deploy_protocol::envelope::is_valid_correlation_id(&id) => id,
        Some(_) => {
            return Err(ApiError::validation(
                "correlation_id must be 1 to 128 visible ASCII characters",
            ))
        }
        None => correlation_id().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    let operation = envelope.operation;
    let input = envelope.input;
    let mut response = deploy_http::with_correlation_id(correlation.clone(), async move {
        dispatch(state, operation, input, run_async)
            .await
            .unwrap_or_else(IntoResponse::into_response)
    })
    .await;
    if let Ok(value) = correlation.parse() {
        response
            .headers_mut()
            .insert(deploy_protocol::envelope::HEADER_CORRELATION_ID, value);
    }
    Ok(response)
}

async fn dispatch(
    state: AppState,
    operation: Operation,
    input: serde_json::Value,
    run_async: bool,
) -> ApiResult<Response> {
    match operation {
        Operation::PackageContainer => packages::start(state, parse(input)?, run_async).await,
        Operation::TransferPackage => transfers::start(state, parse(input)?, run_async).await,
        Operation::PublishTransferEvent => {
            let input: EventInput = parse(input)?;
            let published: PublishedEvent =
                operations::publish(&state, input, correlation_id()).await?;
            Ok((StatusCode::CREATED, Json(published)).into_response())
        }
        Operation::GetMetrics => {
            let summary: MetricsSummary = super::metrics::current(&state);
            Ok(Json(summary).into_response())
        }
    }
}

fn parse<T: DeserializeOwned>(input: serde_json::Value) -> ApiResult<T> {
    let input = if input.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        input
    };
    serde_json::from_value(input).map_err(|e| ApiError::validation(format!("invalid input: {e}")))
}
