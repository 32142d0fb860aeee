//! The route table and the OpenAPI document: every route is added through `routes!` from one
//! table ([`table`]), so the router and the document cannot disagree; [`route_list`] lists what
//! the router serves, for the test that holds the two together.

use axum::middleware;
use axum::Router;
use utoipa::openapi::path::Paths;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
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
pub mod stream;
pub mod upload;
pub mod v2;

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

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";
/// Where the interactive API page is served (Swagger UI, bundled: works offline).
pub const DOCS_PATH: &str = "/docs";

/// The OpenAPI 3 document of this API (this document).
#[utoipa::path(get, path = "/openapi.json", operation_id = "get_openapi_document", tag = "service",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = Object)))]
#[allow(dead_code)] // documentation only: served by Swagger UI's router
fn openapi_json() {}

/// The interactive API page (redirects to `/docs/`; served offline, no CDN).
#[utoipa::path(get, path = "/docs", operation_id = "get_api_docs_page", tag = "service",
    responses(
        (status = 200, description = "The page (at `/docs/`)", content_type = "text/html", body = String),
        (status = 303, description = "Redirect from `/docs` to `/docs/`"),
    ))]
#[allow(dead_code)] // documentation only: served by Swagger UI's router
fn docs() {}

/// The receiver's OpenAPI document (the table's paths are added by the router).
#[derive(OpenApi)]
#[openapi(
    info(title = "deploy-receiver", description = "Receives signed, streamed deployment packages and runs them on this host's Docker engine. Wire protocols v1 (whole packages) and v2 (layers, resumable): docs/PROTOCOL.md."),
    paths(openapi_json, docs),
    modifiers(&HmacScheme),
    components(schemas(deploy_protocol::ErrorBody, deploy_protocol::ErrorCode, deploy_protocol::PackageManifest, deploy_protocol::LayersMissingBody)),
    tags((name = "deployment", description = "Signed deployment operations"), (name = "service", description = "Health, metrics and docs"))
)]
pub struct ApiDoc;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone who can reach the port.
    Open,
    /// Clients in ALLOWED_NETWORKS, with a valid signature (checked by the handler's extractor).
    Signed,
}

/// Every route of the API, once: the handler and its OpenAPI operation, by `routes!`.
pub fn table() -> Vec<(Access, UtoipaMethodRouter<AppState>)> {
    use Access::{Open, Signed};
    vec![
        (Open, routes!(health::get)),
        (Open, routes!(metrics::get)),
        (Signed, routes!(upload::create)),
        (Signed, routes!(receive::create)),
        (Signed, routes!(load::create)),
        (Signed, routes!(deploy::create)),
        (Signed, routes!(health_check::create)),
        (Signed, routes!(full::create)),
        (Signed, routes!(stream::create)),
        (Signed, routes!(deployments::list)),
        (Signed, routes!(deployments::get)),
        (Signed, routes!(deployments::rollback)),
        (Signed, routes!(v2::inventory::create)),
        (Signed, routes!(v2::releases::create)),
        (Signed, routes!(v2::releases::get)),
        (Signed, routes!(v2::releases::load)),
        (Signed, routes!(v2::releases::deploy)),
        (Signed, routes!(v2::blobs::head, v2::blobs::patch)),
    ]
}

/// `(METHOD, path)` of every route the router serves: the table's, and the docs' own two.
pub fn route_list() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = table()
        .iter()
        .flat_map(|(_, (_, paths, _))| operations(paths))
        .collect();
    out.push(("GET".into(), OPENAPI_PATH.into()));
    out.push(("GET".into(), DOCS_PATH.into()));
    out
}

/// `(METHOD, path)` of each operation in `paths`.
pub fn operations(paths: &Paths) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in &paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("PUT", item.put.is_some()),
            ("POST", item.post.is_some()),
            ("DELETE", item.delete.is_some()),
            ("OPTIONS", item.options.is_some()),
            ("HEAD", item.head.is_some()),
            ("PATCH", item.patch.is_some()),
            ("TRACE", item.trace.is_some()),
        ];
        for (method, present) in methods {
            if present {
                out.push((method.to_owned(), path.clone()));
            }
        }
    }
    out
}

/// The table as an OpenAPI router; signed routes behind the allowlist when `state` is given.
fn assemble(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    let (mut open, mut signed) = (OpenApiRouter::new(), OpenApiRouter::new());
    for (access, route) in table() {
        match access {
            Access::Open => open = open.routes(route),
            Access::Signed => signed = signed.routes(route),
        }
    }
    if let Some(state) = state {
        signed = signed.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::allowlist,
        ));
    }
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(open)
        .merge(signed)
}

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    assemble(None).split_for_parts().1
}

/// Builds the router with its OpenAPI document, `/openapi.json` and `/docs`. Every error response
/// is counted by code (`deploy_receiver_errors_total`).
pub fn router(state: AppState) -> Router {
    let (router, api) = assemble(Some(&state)).split_for_parts();
    router
        .merge(SwaggerUi::new(DOCS_PATH).url(OPENAPI_PATH, api))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::count_errors,
        ))
        .with_state(state)
}
