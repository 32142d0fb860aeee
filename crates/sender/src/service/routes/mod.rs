//! The route table and the OpenAPI document: every route is added through `routes!`, so the
//! router and the document cannot disagree. Handlers extract, call `operations`, and map.

use axum::{middleware, Router};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::service::state::AppState;

mod events;
mod execute;
mod health;
mod jobs;
mod metrics;
mod packages;
mod respond;
mod rollouts;
mod schemas;
mod transfers;

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
        (name = "rollouts", description = "Fleet rollouts: canary, health-gated batches, fleet-wide rollback"),
        (name = "jobs", description = "Asynchronous packaging and transfers"),
        (name = "operations", description = "The operation envelope (`POST /api/v1/execute`) and get_metrics"),
        (name = "service", description = "Health, metrics and docs"),
    )
)]
pub(super) struct ApiDoc;

/// The router with its OpenAPI document, `/openapi.json` and `/docs`.
pub(super) fn router(state: AppState) -> Router {
    let (router, api) = router_and_document(state.clone());
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
        .with_state(state)
}

/// The documented routes and their document, before `/docs` and `/openapi.json` are added.
pub(super) fn router_and_document(state: AppState) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::new()
        .routes(routes!(packages::create, packages::list))
        .routes(routes!(packages::get, packages::delete))
        .routes(routes!(transfers::create))
        .routes(routes!(rollouts::create, rollouts::list))
        .routes(routes!(rollouts::get, rollouts::delete))
        .routes(routes!(rollouts::events))
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
