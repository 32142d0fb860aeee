//! The route table and the OpenAPI document: every route is added through `routes!`, so the
//! router and the document cannot disagree. Handlers extract, call `operations`, and map.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{middleware, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;
use uuid::Uuid;

use crate::service::error::ApiResult;
use crate::service::jobs::{JobKind, JobState};
use crate::service::state::AppState;
use crate::SenderError;

pub mod events;
pub mod execute;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod packages;
pub mod transfers;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description =
            Some("Required on every /api call when the service has SENDER_API_TOKEN set".into());
        components.add_security_scheme("api_token", SecurityScheme::Http(scheme));
    }
}

/// The sender's OpenAPI document (paths are added by the router).
#[derive(OpenApi)]
#[openapi(
    info(title = "deploy-sender", description = "Builds and packages Docker images and streams them to deploy-receiver, without a registry. Long operations run as jobs (`Prefer: respond-async`) with server-sent progress."),
    modifiers(&BearerScheme),
    components(schemas(deploy_protocol::ErrorBody, deploy_protocol::ErrorCode)),
    tags(
        (name = "packages", description = "Build and store packages (package_container)"),
        (name = "transfers", description = "Send packages to receivers, optionally deploying them (transfer_package)"),
        (name = "events", description = "Lifecycle events (publish_transfer_event) and the outbox"),
        (name = "jobs", description = "Asynchronous packaging and transfers"),
        (name = "operations", description = "The seed's operation envelope and get_metrics"),
        (name = "service", description = "Health, metrics and docs"),
    )
)]
pub struct ApiDoc;

/// The router with its OpenAPI document, `/openapi.json` and `/docs`.
pub fn router(state: AppState) -> Router {
    let (router, api) = router_and_document(state.clone());
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
        .with_state(state)
}

/// The documented routes and their document, before `/docs` and `/openapi.json` are added.
pub fn router_and_document(state: AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .routes(routes!(packages::create, packages::list))
        .routes(routes!(packages::get, packages::delete))
        .routes(routes!(transfers::create))
        .routes(routes!(events::create, events::list))
        .routes(routes!(jobs::get))
        .routes(routes!(jobs::events))
        .routes(routes!(metrics::summary))
        .routes(routes!(execute::create))
        .route_layer(middleware::from_fn_with_state(
            state,
            crate::service::middleware::require_token,
        ));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::get))
        .routes(routes!(metrics::prometheus))
        .merge(api)
        .split_for_parts()
}

/// `?async=true`: answer 202 with a job instead of waiting (like `Prefer: respond-async`).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AsyncParams {
    /// Run as a job and answer 202 at once.
    #[serde(rename = "async", default)]
    #[param(rename = "async")]
    pub run_async: Option<bool>,
}

/// Whether the caller asked for a job: `Prefer: respond-async` or `?async=true`.
pub fn wants_async(headers: &HeaderMap, params: &AsyncParams) -> bool {
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
pub struct JobAccepted {
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
pub async fn job_response<T: Serialize>(
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
