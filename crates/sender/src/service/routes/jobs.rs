//! `/api/v1/jobs/{id}`: a background job's state and result, and its progress as server-sent
//! events.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use deploy_protocol::ErrorBody;
use futures::{Stream, StreamExt};
use uuid::Uuid;

use crate::service::error::{ApiPath, ApiResult};
use crate::service::jobs::{JobState, JobView};
use crate::service::state::AppState;
use crate::SenderError;

fn find(state: &AppState, id: Uuid) -> Result<tokio::sync::watch::Receiver<JobView>, SenderError> {
    state.jobs().get(id).ok_or_else(|| {
        SenderError::NotFound(format!(
            "no job {id}: it never existed, or finished long ago and was forgotten (SENDER_JOB_HISTORY)"
        ))
    })
}

/// A job's state, latest progress, and result or error.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", operation_id = "get_job", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub(super) async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<JobView>> {
    let view = find(&state, id)?.borrow().clone();
    Ok(Json(view))
}

/// Follow a job as server-sent events: `progress` events (`JobProgress`: stage, bytes done and
/// total, rate) while it runs, then one `finished` event (the `JobView` with result or error),
/// after which the stream ends. A finished job answers its `finished` event at once.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", operation_id = "stream_job_events", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    security((), ("api_token" = [])),
    responses(
        (status = 200, description = "`text/event-stream` of `progress` (JobProgress) and a final `finished` (JobView)", content_type = "text/event-stream", body = super::schemas::JobEvent),
        (status = 400, description = "VALIDATION_ERROR: the id is not a UUID", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND", body = ErrorBody),
    ))]
pub(super) async fn events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let updates = find(&state, id)?;
    // The current view first, then each change, up to and including the first finished view.
    let stream = futures::stream::unfold(
        (updates, true, false),
        |(mut rx, first, ended)| async move {
            if ended || (!first && rx.changed().await.is_err()) {
                return None;
            }
            let view = rx.borrow_and_update().clone();
            let ended = view.state != JobState::Running;
            Some((view, (rx, false, ended)))
        },
    );
    let stream = stream.map(|view| Ok(to_event(&view)));
    // A stopping service ends its open streams, which would otherwise hold its stop open.
    let stream = stream.take_until(state.stopping().clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn to_event(view: &JobView) -> Event {
    let event = match (view.state, &view.progress) {
        (JobState::Running, Some(progress)) => {
            Event::default().event("progress").json_data(progress)
        }
        (JobState::Running, None) => Event::default().event("state").json_data(view),
        _ => Event::default().event("finished").json_data(view),
    };
    event.unwrap_or_else(|e| Event::default().event("error").data(e.to_string()))
}
