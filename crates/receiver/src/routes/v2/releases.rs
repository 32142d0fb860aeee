//! `/deployment/v2/releases`: register a signed release manifest, read its status, load it,
//! deploy it.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use deploy_protocol::api::{DeploymentRecord, LoadResponse};
use deploy_protocol::release::MAX_RELEASE_MANIFEST_BYTES;
use deploy_protocol::{ErrorBody, ReleaseManifest, ReleaseStatus};
use uuid::Uuid;

use super::SignedJson;
use crate::auth::Signed;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;
use crate::v2::load::Arrival;
use crate::v2::releases::{Registered, ReleaseStoreError};

/// How `/load` and `/deploy` treat blobs that are not complete yet.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ArrivalQuery {
    /// `true`: a layer whose blob is not complete yet is loaded from the blob as it arrives
    /// (its upload runs beside this request), each byte checked against the signed size and
    /// BLAKE3 and the layer against its diffID before Docker may keep it; the request fails when
    /// no byte of such a blob comes for UPLOAD_IDLE_TIMEOUT_SECS. Default `false`: such a layer
    /// is 409 LAYERS_MISSING at once.
    #[serde(default)]
    pub await_blobs: bool,
}

impl ArrivalQuery {
    fn arrival(query: std::result::Result<Query<Self>, QueryRejection>) -> Result<Arrival> {
        let Query(query) = query.map_err(|e| ReceiverError::Validation(e.body_text()))?;
        Ok(if query.await_blobs {
            Arrival::Awaited
        } else {
            Arrival::Received
        })
    }
}

/// Register a release: the config (its sha256 is the image id, its `rootfs.diff_ids` the layers'
/// diffIDs in order), per layer the blob that carries it, the tags, and for `/deploy` the spec.
/// Stored durably; the same body again is idempotent. The answer says which layers to send.
#[utoipa::path(post, path = "/deployment/v2/releases", operation_id = "register_release", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body = ReleaseManifest,
    security(("deploy_hmac" = [])),
    responses(
        (status = 201, description = "Registered now: where each layer stands", body = ReleaseStatus),
        (status = 200, description = "Registered before with the same content", body = ReleaseStatus),
        (status = 400, description = "VALIDATION_ERROR: unknown field, config not matching image_id or the layers, bad tag or spec, over 1 MiB", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 409, description = "CONFLICT: this release_id is registered with other content", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE: a blob is larger than MAX_PACKAGE_SIZE", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    SignedJson(manifest): SignedJson<ReleaseManifest, MAX_RELEASE_MANIFEST_BYTES>,
) -> Result<(StatusCode, Json<ReleaseStatus>)> {
    manifest
        .validate()
        .map_err(|e| ReceiverError::Validation(e.to_string()))?;
    let limit = state.config().max_package_size;
    if let Some(blob) = manifest
        .layers
        .iter()
        .map(|l| &l.blob)
        .find(|b| b.size > limit)
    {
        return Err(ReceiverError::TooLarge {
            size: blob.size,
            limit,
        });
    }
    state.layers().sweep();
    let registered = state
        .layers()
        .releases()
        .register(&manifest)
        .map_err(|e| match e {
            ReleaseStoreError::Conflict(_) => ReceiverError::Conflict(e.to_string()),
            ReleaseStoreError::Io(e) => ReceiverError::Io(e),
        })?;
    let status = crate::v2::status::status(&state, &manifest).await?;
    let code = match registered {
        Registered::New => StatusCode::CREATED,
        Registered::Same => StatusCode::OK,
    };
    Ok((code, Json(status)))
}

/// Where each layer of a registered release stands now.
#[utoipa::path(get, path = "/deployment/v2/releases/{id}", operation_id = "get_release", tag = "deployment",
    params(("id" = Uuid, Path, description = "Release id"), crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 400, description = "VALIDATION_ERROR: not a UUID", body = ErrorBody),
        (status = 200, description = "Per layer: present, received, partial (with offset) or missing", body = ReleaseStatus),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such release", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<AppState>,
    id: std::result::Result<Path<Uuid>, PathRejection>,
    Signed(()): Signed<()>,
) -> Result<Json<ReleaseStatus>> {
    let Path(id) = id.map_err(|e| ReceiverError::Validation(e.body_text()))?;
    let manifest = crate::v2::load::release(&state, id)?;
    Ok(Json(crate::v2::status::status(&state, &manifest).await?))
}

/// Assemble the release's archive (layers the engine holds are named, not carried; received
/// layers are checked against their signed diffIDs on the way), `docker load` it through the
/// tar gate, and check that the image is the signed one (id, RootFS layers, tags).
#[utoipa::path(post, path = "/deployment/v2/releases/{id}/load", operation_id = "load_release", tag = "deployment",
    params(("id" = Uuid, Path, description = "Release id"), ArrivalQuery, crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 400, description = "VALIDATION_ERROR: not a UUID, or a bad query", body = ErrorBody),
        (status = 200, description = "Loaded (`package_id` is the release id)", body = LoadResponse),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such release", body = ErrorBody),
        (status = 409, description = "LAYERS_MISSING: an ErrorBody with `missing_diff_ids` (the LayersMissingBody schema): send those layers' blobs and retry", body = ErrorBody),
        (status = 422, description = "LOAD_FAILED: refused by the gate or Docker, or not the signed image; tags left as they were", body = ErrorBody),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn load(
    State(state): State<AppState>,
    id: std::result::Result<Path<Uuid>, PathRejection>,
    query: std::result::Result<Query<ArrivalQuery>, QueryRejection>,
    Signed(()): Signed<()>,
) -> Result<Json<LoadResponse>> {
    let Path(id) = id.map_err(|e| ReceiverError::Validation(e.body_text()))?;
    let arrival = ArrivalQuery::arrival(query)?;
    Ok(Json(
        crate::v2::load::load_release(&state, id, arrival).await?,
    ))
}

/// Load the release, then deploy the spec it signs, health-check, and roll back on failure,
/// exactly as `/deployment/full`.
#[utoipa::path(post, path = "/deployment/v2/releases/{id}/deploy", operation_id = "deploy_release", tag = "deployment",
    params(("id" = Uuid, Path, description = "Release id"), ArrivalQuery, crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 400, description = "VALIDATION_ERROR: not a UUID, or a bad query", body = ErrorBody),
        (status = 200, description = "SUCCEEDED", body = DeploymentRecord),
        (status = 400, description = "VALIDATION_ERROR: no `deployment` in the release, bad spec", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN, or POLICY_DENIED", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no such release", body = ErrorBody),
        (status = 409, description = "LAYERS_MISSING: an ErrorBody with `missing_diff_ids` (the LayersMissingBody schema); when a layer went (or an awaited blob never completed) after the deployment began, its FAILED record stays in the journal: send them and retry", body = ErrorBody),
        (status = 422, description = "LOAD_FAILED or HEALTH_CHECK_FAILED: the record, FAILED or ROLLED_BACK, with `error`", body = DeploymentRecord),
        (status = 500, description = "DEPLOY_FAILED: the record with `error`", body = DeploymentRecord),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = ErrorBody),
    ))]
pub async fn deploy(
    State(state): State<AppState>,
    id: std::result::Result<Path<Uuid>, PathRejection>,
    query: std::result::Result<Query<ArrivalQuery>, QueryRejection>,
    Signed(()): Signed<()>,
) -> Result<Json<DeploymentRecord>> {
    let Path(id) = id.map_err(|e| ReceiverError::Validation(e.body_text()))?;
    let arrival = ArrivalQuery::arrival(query)?;
    let manifest = crate::v2::load::release(&state, id)?;
    // Nothing more comes from the client: the deployment goes on if it hangs up.
    let record = crate::deploy::detached(&state.clone(), async move {
        crate::deploy::deploy_release(&state, &manifest, arrival).await
    })
    .await?;
    Ok(Json(record))
}
