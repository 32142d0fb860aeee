//! How a route answers a long operation: at once, or as a job (`Prefer: respond-async` or
//! `?async=true`) with a status URL and a progress stream.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::service::error::ApiResult;
use crate::service::jobs::{JobKind, JobState};
use crate::SenderError;

/// `?async=true`: answer 202 with a job instead of waiting (like `Prefer: respond-async`).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct AsyncParams {
    /// Run as a job and answer 202 at once.
    #[serde(rename = "async", default)]
    #[param(rename = "async")]
    pub run_async: Option<bool>,
}

/// Whether the caller asked for a job: `Prefer: respond-async` or `?async=true`.
pub(super) fn wants_async(headers: &HeaderMap, params: &AsyncParams) -> bool {
    params.run_async.unwrap_or(false)
        || headers.get_all("prefer").iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split([',', ';'])
                    .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
            })
        })
}

/// The 202 answer for a job started in the background.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct JobAccepted {
    /// Job id.
    pub job_id: Uuid,
    /// What it does.
    pub kind: JobKind,
    /// `running`.
    pub state: JobState,
    /// Where to read its state and result.
    pub status_url: String,
    /// Where to follow its progress as server-sent events.
    pub events_url: String,
}

/// Answers 202 for a background job, or waits for it and answers `status` with its result.
pub(super) async fn job_response<T: Serialize>(
    kind: JobKind,
    id: Uuid,
    handle: JoinHandle<Result<T, SenderError>>,
    run_async: bool,
    status: StatusCode,
) -> ApiResult<Response> {
    if run_async {
        let status_url = format!("/api/v1/jobs/{id}");
        let accepted = JobAccepted {
            job_id: id,
            kind,
            state: JobState::Running,
            events_url: format!("{status_url}/events"),
            status_url: status_url.clone(),
        };
        let mut response = (StatusCode::ACCEPTED, Json(accepted)).into_response();
        if let Ok(location) = HeaderValue::from_str(&status_url) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return Ok(response);
    }
    let result = handle
        .await
        .map_err(|e| SenderError::Internal(format!("job {id} failed: {e}")))??;
    Ok((status, Json(result)).into_response())
}
