//! `POST /deployment/stream`: a package streamed as it is made, loaded as it arrives, then
//! deployed and health-checked as `/deployment/full` does (see [`crate::stream`]).

use axum::extract::{Request, State};
use axum::Json;
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::ErrorBody;

use crate::error::Result;
use crate::routes::full::RecordOrError;
use crate::state::AppState;

/// The parts of a streamed upload (for the OpenAPI document only).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct StreamForm {
    /// `application/json`: a `StreamManifest` (the signed content): the package without its size
    /// and checksum, with `image_id` and `deployment`.
    manifest: deploy_protocol::stream::StreamManifest,
    /// `application/octet-stream`: the package bytes as they are made, any length up to
    /// MAX_PACKAGE_SIZE.
    #[schema(value_type = String, format = Binary)]
    package: Vec<u8>,
    /// `application/json`: the `Seal`: the package's size and BLAKE3, HMAC-signed over this
    /// request's nonce and manifest digest.
    seal: deploy_protocol::stream::Seal,
}

/// Upload, verify, load, deploy and health-check in one request whose package is streamed while
/// the client makes it: parts `manifest` (signed), `package`, then `seal` (its size and BLAKE3,
/// signed). The package goes into `docker load` as it arrives; Docker gets the archive's tail
/// only once the seal checks out. Nothing is stored, so nothing resumes: a cut stream is sent
/// again (`deploy-sender` then sends the image as a release). A load in progress on this host is
/// `429 BUSY` (a stream is not queued). Once the package is being read, a failure is answered
/// with the deployment's record (`error` says why).
#[utoipa::path(post, path = "/deployment/stream", operation_id = "stream_and_deploy", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body(content = StreamForm, content_type = "multipart/form-data"),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "SUCCEEDED", body = DeploymentRecord),
        (status = 400, description = "VALIDATION_ERROR: wrong parts, bad manifest or spec (error body), or a bad seal or cut stream (the record)", body = RecordOrError),
        (status = 401, description = "UNAUTHORIZED: the request's signature (error body), or the seal's (the record; Docker kept nothing)", body = RecordOrError),
        (status = 403, description = "FORBIDDEN, or POLICY_DENIED: the spec (error body, nothing changed), or after the load a tag the package would move or an image not verified (the record; the image stays loaded, moved tags are put back)", body = RecordOrError),
        (status = 409, description = "CONFLICT: a container of that name exists that this receiver does not manage (error body before the package is read, or the record)", body = RecordOrError),
        (status = 408, description = "TIMEOUT: the client stopped sending (the record)", body = RecordOrError),
        (status = 413, description = "PACKAGE_TOO_LARGE: more than MAX_PACKAGE_SIZE bytes (the record)", body = RecordOrError),
        (status = 422, description = "CHECKSUM_MISMATCH (Docker kept nothing), LOAD_FAILED or HEALTH_CHECK_FAILED: the record, with `error`", body = RecordOrError),
        (status = 429, description = "BUSY: too many uploads, this package id being received already, or a load in progress; see Retry-After", body = ErrorBody),
        (status = 500, description = "DEPLOY_FAILED: the record with `error`", body = RecordOrError),
        (status = 503, description = "DOCKER_UNAVAILABLE", body = RecordOrError),
    ))]
pub async fn create(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<DeploymentRecord>> {
    let (parts, body) = request.into_parts();
    Ok(Json(
        crate::stream::receive_and_deploy(&state, &parts, body).await?,
    ))
}
