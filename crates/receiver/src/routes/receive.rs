//! `POST /deployment/receive`: register a package that is already on this host's disk (copied
//! there by other means than an upload), inside the package directory.

use std::time::Instant;

use axum::extract::State;
use axum::Json;
use deploy_protocol::api::{ReceiveRequest, StoreOutcome, UploadResponse};
use deploy_protocol::ErrorBody;

use crate::auth::Signed;
use crate::error::{ReceiverError, Result};
use crate::spool::Received;
use crate::state::{AppState, InFlight};
use crate::store::ImportError;

/// Validate and register a package file already in the package directory (no traversal, no
/// symlink escape); it is hashed and stored exactly as an upload would be.
#[utoipa::path(post, path = "/deployment/receive", operation_id = "receive_package", tag = "deployment",
    params(crate::routes::SignatureHeaderParams),
    request_body = ReceiveRequest,
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "Registered", body = UploadResponse),
        (status = 400, description = "VALIDATION_ERROR: bad body, or a path outside the package directory", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 409, description = "CONFLICT", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE", body = ErrorBody),
        (status = 422, description = "CHECKSUM_MISMATCH", body = ErrorBody),
    ))]
pub async fn create(
    State(state): State<AppState>,
    Signed(request): Signed<ReceiveRequest>,
) -> Result<Json<UploadResponse>> {
    let started = Instant::now();
    let manifest = request.manifest;
    manifest
        .validate()
        .map_err(|e| ReceiverError::Validation(e.to_string()))?;
    let limit = state.config().max_package_size;
    if manifest.package_size > limit {
        return Err(ReceiverError::TooLarge {
            size: manifest.package_size,
            limit,
        });
    }
    let source = state
        .store()
        .confine(&request.package_path)
        .map_err(ReceiverError::Validation)?;
    let id = manifest.package_id;
    let _in_flight = InFlight::claim(&state, id)?;
    let existing = state.store().get(id)?;
    if let Some(existing) = &existing {
        if existing.manifest.package_checksum != manifest.package_checksum {
            return Err(ReceiverError::Conflict(format!(
                "package {id} is already stored with another checksum"
            )));
        }
    }
    let store = state.store().clone();
    let signed = manifest.clone();
    let imported = tokio::task::spawn_blocking(move || store.import(&source, &signed))
        .await
        .map_err(|e| ReceiverError::Internal(format!("hashing task failed: {e}")))?
        .map_err(|e| match e {
            ImportError::Mismatch { .. } => ReceiverError::ChecksumMismatch(format!(
                "{}: {e}, but the signed manifest says {} bytes hashing to {}",
                request.package_path, manifest.package_size, manifest.package_checksum
            )),
            ImportError::Io(e) => e.into(),
        })?;
    let outcome = if imported.existed {
        StoreOutcome::Existing
    } else {
        StoreOutcome::Created
    };
    let (package, size) = (imported.package, imported.size);
    let received = Received {
        package,
        outcome,
        bytes: size,
        duration: started.elapsed(),
    };
    Ok(Json(crate::routes::upload::response(&received)))
}
