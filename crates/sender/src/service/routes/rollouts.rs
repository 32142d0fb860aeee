//! `/api/v1/rollouts`: fleet rollouts of a stored package (canary, batches, rollback), followed as
//! server-sent events and stopped with `DELETE`.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use deploy_protocol::ErrorBody;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;
use uuid::Uuid;

use crate::pipeline::rollout::RolloutStatus;
use crate::service::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use crate::service::operations::{self, RolloutInput, RolloutView};
use crate::service::state::AppState;

/// Start a rollout: the package goes to the canary hosts first, which must all be healthy, then
/// to the rest batch by batch, each batch health-gated; when more hosts fail than `max_failures`
/// (or a canary fails), the rollout stops and every host it moved is rolled back at once. Answers
/// 202 at once with the planned rollout; follow it at `/api/v1/rollouts/{id}` or its `/events`.
#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", operation_id = "create_rollout",
    request_body = RolloutInput,
    security((), ("api_token" = [])),
    responses(
        (status = 202, description = "Started: every host PENDING in its planned phase", body = RolloutView),
        (status = 400, description = "VALIDATION_ERROR: malformed JSON, no receivers, impossible canary, bad batch, bad URL or spec, no HMAC secret", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED: bearer token missing or wrong", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such package", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    ApiJson(input): ApiJson<RolloutInput>,
) -> ApiResult<(StatusCode, Json<RolloutView>)> {
    let view = operations::start_rollout(&state, input).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Rollouts listed when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;

/// The most rollouts one `GET /api/v1/rollouts` lists (the service keeps at most 1000 records).
const MAX_LIMIT: usize = 1000;

/// `GET /api/v1/rollouts` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListParams {
    /// How many rollouts, newest first (default 100, at most 1000).
    #[param(minimum = 0, maximum = 1000)]
    pub limit: Option<usize>,
    /// Only rollouts in this state (`INTERRUPTED`: those the service was running when it stopped).
    pub status: Option<RolloutStatus>,
}

/// Rollouts, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct RolloutList {
    /// Newest first.
    pub rollouts: Vec<RolloutView>,
}

/// The rollouts of this service, those of its earlier runs included, newest first.
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", operation_id = "list_rollouts",
    params(ListParams),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "Rollouts, newest first", body = RolloutList),
        (status = 400, description = "VALIDATION_ERROR: bad limit or status", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ))]
pub(super) async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<RolloutList>> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > MAX_LIMIT {
        return Err(ApiError::validation(format!(
            "limit {limit} is over {MAX_LIMIT}"
        )));
    }
    Ok(Json(RolloutList {
        rollouts: state.rollouts().list(params.status, limit),
    }))
}

/// A rollout: each host's phase, outcome, versions before and after, error, bytes and durations,
/// and where the fleet stands. Rollouts of earlier runs of the service are kept (the state
/// directory's `rollouts/`); one it was running when it stopped is INTERRUPTED.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts", operation_id = "get_rollout",
    params(("id" = Uuid, Path, description = "Rollout id")),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "The rollout", body = RolloutView),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<RolloutView>> {
    let view = state.rollouts().watch(id)?.borrow().clone();
    Ok(Json(view))
}

/// Stop a rollout: no further host is started, hosts being deployed to finish, and every host it
/// moved is rolled back (unless it was started with `rollback: false`). Answers 202; the rollout
/// ends ABORTED (or FAILED when a rollback failed). An INTERRUPTED rollout (the service stopped
/// while it ran) is undone: each host it left IN_PROGRESS is looked up in its receiver's journal
/// (a deployment still under way there is waited for), and every host on the new release is
/// rolled back (with `rollback: false`, only looked up); it turns RUNNING, then ends ABORTED (or
/// FAILED).
#[utoipa::path(delete, path = "/api/v1/rollouts/{id}", tag = "rollouts", operation_id = "abort_rollout",
    params(("id" = Uuid, Path, description = "Rollout id")),
    security((), ("api_token" = [])),
    responses(
        (status = 202, description = "Stopping", body = RolloutView),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
        (status = 409, description = "CONFLICT: it has already finished (or been undone)", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<(StatusCode, Json<RolloutView>)> {
    let view = state.rollouts().abort(&state, id)?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Follow a rollout as server-sent events: a `rollout` event (the `RolloutView`) at once and at
/// every change of a host or step, then one `finished` event, after which the stream ends.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/events", tag = "rollouts", operation_id = "rollout_events",
    params(("id" = Uuid, Path, description = "Rollout id")),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "`text/event-stream` of `rollout` (RolloutView) and a final `finished` (RolloutView)", content_type = "text/event-stream", body = super::schemas::RolloutEvent),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let updates = state.rollouts().watch(id)?;
    let stream = futures::stream::unfold(
        (updates, true, false),
        |(mut rx, first, ended)| async move {
            if ended || (!first && rx.changed().await.is_err()) {
                return None;
            }
            let view = rx.borrow_and_update().clone();
            let ended = view.report.status != RolloutStatus::Running;
            Some((view, (rx, false, ended)))
        },
    );
    let stream = stream.map(|view| {
        let name = if view.report.status == RolloutStatus::Running {
            "rollout"
        } else {
            "finished"
        };
        Ok(Event::default()
            .event(name)
            .json_data(&view)
            .unwrap_or_else(|e| Event::default().event("error").data(e.to_string())))
    });
    // A stopping service ends its open streams, which would otherwise hold its stop open.
    let stream = stream.take_until(state.stopping().clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
