//! `POST /deployment/upload`: a signed, streamed multipart upload of one package.

use axum::extract::{Request, State};
use axum::Json;
use deploy_protocol::api::UploadResponse;
use deploy_protocol::ErrorBody;

use crate::error::Result;
use crate::spool::{self, Received};
use crate::state::AppState;

/// The multipart layout of an upload, for the OpenAPI document.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only: the body is streamed by `spool`
pub struct UploadForm {
    /// JSON `PackageManifest`, at most 64 KiB; its bytes are the signed content.
    #[schema(value_type = deploy_protocol::PackageManifest)]
    manifest: String,
    /// The package bytes (compressed `docker save` archive).
    #[schema(value_type = String, format = Binary)]
    package: Vec<u8>,
}

/// Upload a package: parts `manifest` then `package`; verified against the signed checksum and
/// size while streaming, stored atomically. Repeating an upload is idempotent.
#[utoipa::path(post, path = "/deployment/upload", operation_id = "upload_package", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "Stored (or already stored with the same checksum)", body = UploadResponse),
        (status = 400, description = "VALIDATION_ERROR: wrong parts, malformed manifest", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED: signature, key id, timestamp or nonce refused", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: client not in ALLOWED_NETWORKS", body = ErrorBody),
        (status = 408, description = "TIMEOUT: the client stopped sending", body = ErrorBody),
        (status = 409, description = "CONFLICT: the package id is stored with another checksum", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "CHECKSUM_MISMATCH: bytes differ from the signed manifest", body = ErrorBody),
        (status = 429, description = "BUSY: too many uploads; see Retry-After", body = ErrorBody),
        (status = 507, description = "INSUFFICIENT_STORAGE", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<UploadResponse>> {
    let (parts, body) = request.into_parts();
    let result = spool::receive_multipart(&state, &parts, body, |_| Ok(())).await;
    match &result {
        Ok(_) => state.metrics().upload("ok"),
        Err(e) => state.metrics().upload(e.code().as_str()),
    }
    let received = result?;
    state
        .metrics()
        .stage("upload", received.duration.as_secs_f64());
    tracing::info!(package_id = %received.package.manifest.package_id, bytes = received.bytes, outcome = ?received.outcome, "package stored");
    Ok(Json(response(&received)))
}

/// The response for a stored package.
pub fn response(received: &Received) -> UploadResponse {
    let secs = received.duration.as_secs_f64().max(1e-9);
    UploadResponse {
        package_id: received.package.manifest.package_id,
        package_size: received.package.manifest.package_size,
        package_checksum: received.package.manifest.package_checksum,
        checksum_verified: true,
        outcome: received.outcome,
        duration_ms: received.duration.as_millis() as u64,
        throughput_mbps: (received.bytes as f64 / 1e6 / secs * 100.0).round() / 100.0,
    }
}
