//! `POST /deployment/v2/inventory`: which of the given chain IDs the engine holds.

use axum::extract::State;
use axum::Json;
use deploy_protocol::release::MAX_INVENTORY_CHAIN_IDS;
use deploy_protocol::{ErrorBody, InventoryRequest, InventoryResponse};

use super::SignedJson;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Largest inventory request body.
const MAX_BODY: usize = 512 * 1024;

/// Which of the given chain IDs the engine holds (its images' layer prefixes; computed once per
/// image id and cached), with the engine version and image store kind.
#[utoipa::path(post, path = "/deployment/v2/inventory", operation_id = "query_inventory", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body = InventoryRequest,
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "The chain IDs held, in the order asked", body = InventoryResponse),
        (status = 400, description = "VALIDATION_ERROR: malformed body or more than 4096 chain IDs", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    SignedJson(request): SignedJson<InventoryRequest, MAX_BODY>,
) -> Result<Json<InventoryResponse>> {
    if request.chain_ids.len() > MAX_INVENTORY_CHAIN_IDS {
        return Err(ReceiverError::Validation(format!(
            "at most {MAX_INVENTORY_CHAIN_IDS} chain_ids per inventory request"
        )));
    }
    let docker = state.docker().client().await?;
    let held = state.layers().chains().held(&docker).await?;
    let (engine_version, image_store) = crate::v2::inventory::engine(&docker).await?;
    let present = request
        .chain_ids
        .into_iter()
        .filter(|c| held.contains(c))
        .collect();
    Ok(Json(InventoryResponse {
        engine_version,
        image_store,
        present,
    }))
}
