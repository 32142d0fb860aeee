//! `/api/v1/events`: publish a lifecycle event (`publish_transfer_event`) and read the outbox.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use deploy_events::LifecycleEvent;
use deploy_protocol::ErrorBody;
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use crate::service::error::{correlation_id, ApiError, ApiJson, ApiQuery, ApiResult};
use crate::service::operations::{self, EventInput, PublishedEvent};
use crate::service::state::AppState;

/// Events listed when no `limit` is given.
const DEFAULT_LIMIT: usize = 100;

/// The most events one `GET /api/v1/events` lists.
const MAX_LIMIT: usize = 10_000;

/// Record a lifecycle event. It is durable when this answers; delivery to Kafka follows in the
/// background (and survives restarts), so a Kafka outage never fails this call.
#[utoipa::path(post, path = "/api/v1/events", operation_id = "publish_transfer_event", tag = "events",
    request_body = EventInput,
    security((), ("api_token" = [])),
    responses(
        (status = 201, description = "Recorded", body = PublishedEvent),
        (status = 400, description = "VALIDATION_ERROR: malformed JSON or unknown event type", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 503, description = "KAFKA_PUBLISH_FAILED: the event could not even be recorded in the outbox", body = ErrorBody),
    ))]
pub(super) async fn create(
    State(state): State<AppState>,
    ApiJson(input): ApiJson<EventInput>,
) -> ApiResult<(StatusCode, Json<PublishedEvent>)> {
    let published = operations::publish(&state, input, correlation_id()).await?;
    Ok((StatusCode::CREATED, Json(published)))
}

/// `GET /api/v1/events` parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListParams {
    /// How many events, newest first (default 100, at most 10000).
    #[param(minimum = 0, maximum = 10000)]
    pub limit: Option<usize>,
}

/// The outbox, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct EventList {
    /// Where events go: `kafka://HOSTS/TOPIC` or `outbox:PATH`.
    pub destination: String,
    /// Events, newest first.
    pub events: Vec<LifecycleEvent>,
}

/// Recent lifecycle events from the outbox, newest first.
#[utoipa::path(get, path = "/api/v1/events", operation_id = "list_events", tag = "events",
    params(ListParams),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "Events, newest first", body = EventList),
        (status = 400, description = "VALIDATION_ERROR: bad limit", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ))]
pub(super) async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<EventList>> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit > MAX_LIMIT {
        return Err(ApiError::validation(format!(
            "limit {limit} is over {MAX_LIMIT}"
        )));
    }
    let sink = state.events().sink();
    Ok(Json(EventList {
        destination: sink.destination(),
        events: sink.list(limit),
    }))
}
