//! The route table and the OpenAPI document: every route is added through `routes!`, so the
//! router and the document cannot disagree.

use axum::middleware;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::auth;
use crate::state::AppState;

pub mod deploy;
pub mod deployments;
pub mod full;
pub mod health;
pub mod health_check;
pub mod load;
pub mod metrics;
pub mod receive;
pub mod upload;

/// The signature headers every `/deployment` request carries (see docs/PROTOCOL.md).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documentation only: the envelope is read by `auth`
pub struct SignatureHeaderParams {
    /// Id of the shared key.
    #[param(rename = "X-Deploy-Key-Id", example = "default")]
    key_id: String,
    /// Unix time in seconds; refused beyond HMAC_MAX_SKEW_SECS from the receiver's clock.
    #[param(rename = "X-Deploy-Timestamp", example = 1761393600)]
    timestamp: i64,
    /// 16 to 64 characters of `[A-Za-z0-9_-]`, never reused.
    #[param(rename = "X-Deploy-Nonce", example = "0123456789abcdefABCDEF_-")]
    nonce: String,
    /// Lowercase hex HMAC-SHA256 of the canonical string.
    #[param(rename = "X-Deploy-Signature")]
    signature: String,
    /// Optional; echoed in responses, logs and events.
    #[param(rename = "X-Correlation-Id")]
    correlation_id: Option<String>,
}

struct HmacScheme;

impl Modify for HmacScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "deploy_hmac",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Deploy-Signature",
                "HMAC-SHA256 envelope: X-Deploy-Key-Id, X-Deploy-Timestamp, X-Deploy-Nonce, X-Deploy-Signature (docs/PROTOCOL.md)",
            ))),
        );
    }
}

/// The receiver's OpenAPI document (paths are added by the router).
#[derive(OpenApi)]
#[openapi(
    info(title = "deploy-receiver", description = "Receives signed, streamed deployment packages and runs them on this host's Docker engine. Wire protocol v1: docs/PROTOCOL.md."),
    modifiers(&HmacScheme),
    components(schemas(deploy_protocol::ErrorBody, deploy_protocol::ErrorCode, deploy_protocol::PackageManifest)),
    tags((name = "deployment", description = "Signed deployment operations"), (name = "service", description = "Health, metrics and docs"))
)]
pub struct ApiDoc;

/// Builds the router with its OpenAPI document, `/openapi.json` and `/docs`.
pub fn router(state: AppState) -> Router {
    let signed = OpenApiRouter::new()
        .routes(routes!(upload::create))
        .routes(routes!(receive::create))
        .routes(routes!(load::create))
        .routes(routes!(deploy::create))
        .routes(routes!(health_check::create))
        .routes(routes!(full::create))
        .routes(routes!(deployments::list))
        .routes(routes!(deployments::get))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::allowlist,
        ));
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::get))
        .routes(routes!(metrics::get))
        .merge(signed)
        .split_for_parts();
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", api))
        .with_state(state)
}
