//! `/deployment/v2/blobs/{blake3}`: the durable offset of a blob (`HEAD`) and appending to it
//! (`PATCH`), tus-style. The signed content digest of both is the blob's BLAKE3 for `PATCH`
//! (the body is checked against it when the blob completes) and of the empty body for `HEAD`.

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use deploy_protocol::release::{UPLOAD_LENGTH, UPLOAD_OFFSET};
use deploy_protocol::{Checksum, ErrorBody};

use crate::auth::{authenticate, Signed};
use crate::error::{ReceiverError, Result};
use crate::spool::{drain_in_background, FREE_SPACE_MARGIN};
use crate::state::{AppState, UploadSlot};
use crate::v2::blob_upload::{self, Expected, Outcome, UploadError};
use crate::v2::blobs::BlobState;

fn parse(hex: &str) -> Result<Checksum> {
    hex.parse()
        .map_err(|e: deploy_protocol::ChecksumError| ReceiverError::Validation(e.to_string()))
}

/// The signed releases' view of a blob, or NOT_FOUND.
fn expected(state: &AppState, blake3: &Checksum) -> Result<Expected> {
    let (size, compression, diff_ids) =
        state.layers().releases().blob(blake3).ok_or_else(|| {
            ReceiverError::NotFound(format!(
                "no registered release names blob {blake3}: POST the release manifest first"
            ))
        })?;
    Ok(Expected {
        blake3: *blake3,
        size,
        compression,
        diff_ids,
        max_uncompressed: state.config().max_image_size,
    })
}

fn offset_headers(offset: u64, length: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    headers.insert(UPLOAD_LENGTH, HeaderValue::from(length));
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    headers
}

/// How many bytes of the blob the receiver holds durably: continue a `PATCH` from there.
#[utoipa::path(head, path = "/deployment/v2/blobs/{blake3}", operation_id = "get_blob_offset", tag = "deployment",
    params(("blake3" = String, Path, description = "The blob's lowercase hex BLAKE3"), crate::routes::SignatureHeaderParams),
    security(("deploy_hmac" = [])),
    responses(
        (status = 200, description = "`Upload-Offset`: durable bytes held (the size when complete); `Upload-Length`: the signed size"),
        (status = 400, description = "VALIDATION_ERROR: the path is not a BLAKE3 digest"),
        (status = 401, description = "UNAUTHORIZED"),
        (status = 403, description = "FORBIDDEN"),
        (status = 404, description = "NOT_FOUND: no registered release names this blob"),
    ))]
pub async fn head(
    State(state): State<AppState>,
    Path(hex): Path<String>,
    Signed(()): Signed<()>,
) -> Result<impl IntoResponse> {
    let blake3 = parse(&hex)?;
    let expected = expected(&state, &blake3)?;
    let offset = match state.layers().blobs().state(&blake3) {
        BlobState::Complete(_) => expected.size,
        BlobState::Partial(n) => n.min(expected.size),
        BlobState::Missing => 0,
    };
    Ok((StatusCode::OK, offset_headers(offset, expected.size)))
}

/// Append the blob's bytes from `Upload-Offset`, which must be the durable offset (`HEAD`).
/// Bytes are fsynced before an offset is reported; when the last byte arrives the blob's
/// BLAKE3 and its layer's diffID are checked (a mismatch discards the blob).
#[utoipa::path(patch, path = "/deployment/v2/blobs/{blake3}", operation_id = "append_blob", tag = "deployment",
    params(("blake3" = String, Path, description = "The blob's lowercase hex BLAKE3 (also the signed content digest)"),
        ("Upload-Offset" = u64, Header, description = "Where this body starts in the blob"),
        crate::routes::SignatureHeaderParams),
    request_body(content = Vec<u8>, content_type = "application/offset+octet-stream"),
    security(("deploy_hmac" = [])),
    responses(
        (status = 204, description = "Appended; `Upload-Offset`: durable bytes held now (the size when the blob completed and verified)"),
        (status = 400, description = "VALIDATION_ERROR: no or malformed Upload-Offset", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN", body = ErrorBody),
        (status = 404, description = "NOT_FOUND: no registered release names this blob", body = ErrorBody),
        (status = 408, description = "TIMEOUT: the body stalled (`Upload-Offset` says what is kept)", body = ErrorBody),
        (status = 409, description = "OFFSET_MISMATCH: not the durable offset, nothing appended; CONFLICT: another request is writing this blob (both with `Upload-Offset`)", body = ErrorBody),
        (status = 413, description = "PACKAGE_TOO_LARGE: the body goes past the signed size (what came before is kept)", body = ErrorBody),
        (status = 422, description = "CHECKSUM_MISMATCH: the complete blob's BLAKE3 or its layer's diffID differs; the blob was discarded", body = ErrorBody),
        (status = 429, description = "BUSY: too many uploads; see Retry-After", body = ErrorBody),
        (status = 507, description = "INSUFFICIENT_STORAGE: the rest of the blob does not fit with a 16 MiB margin (nothing written), or the disk filled up; the partial blob is kept (`Upload-Offset`)", body = ErrorBody),
    ))]
pub async fn patch(
    State(state): State<AppState>,
    Path(hex): Path<String>,
    request: Request,
) -> Result<impl IntoResponse> {
    let (parts, body) = request.into_parts();
    let mut body = body.into_data_stream();
    // The path's digest is the signed content: a malformed one cannot have been signed.
    let parsed = parse(&hex);
    authenticate(
        &state,
        &parts,
        parsed.as_ref().unwrap_or(&Checksum::empty()),
    )?;
    // Authenticated: a refusal from here on (BUSY above all, when a sender's blob connections
    // outnumber the free upload slots) drains the body while the answer goes out, so that the
    // sender reads the answer instead of a reset it would count as an interruption.
    let (expected, offset, slot) = match admit(&state, &parts, parsed) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            drain_in_background(body);
            return Err(refusal);
        }
    };
    let idle = Duration::from_secs(state.config().upload_idle_timeout_secs.max(1));
    // The write runs in its own task: if the connection goes and this handler is dropped, what
    // arrived is still fsynced and the writer slot released.
    let task_state = state.clone();
    let task = tokio::spawn(async move {
        let layers = task_state.layers();
        let before = match layers.blobs().state(&expected.blake3) {
            BlobState::Partial(n) => n,
            _ => 0,
        };
        let result = blob_upload::receive(layers.blobs(), &expected, offset, &mut body, idle).await;
        drop(slot);
        if let Err(e) = &result {
            if !matches!(
                e,
                UploadError::Cut { .. } | UploadError::Idle { .. } | UploadError::Deadline { .. }
            ) {
                // Refused, or failed, with the body not read to its end: drain it, so that the
                // answer (409, 413, 507...) is what the sender reads.
                drain_in_background(body);
            }
        }
        let after = match &result {
            Ok(Outcome::Partial(n)) => *n,
            Ok(Outcome::Complete(..)) => expected.size,
            Err(e) => e.held().unwrap_or(0),
        };
        // A request refused for another writer's sake (409) wrote nothing: what its answer
        // reports is that writer's, counted by that writer's request.
        let wrote = !matches!(
            result,
            Err(UploadError::InUse { .. } | UploadError::OffsetMismatch { .. })
        );
        if wrote && offset == before && after > before {
            layers.metrics().received_bytes(after - before);
            if before > 0 {
                layers.metrics().resumed(before);
            }
        }
        if let Ok(Outcome::Complete(_, checked)) = &result {
            if offset < expected.size {
                layers.metrics().received_layer();
            }
            if let Some(by) = checked {
                layers.metrics().checked(*by);
            }
        }
        (result, expected.size)
    });
    let (result, size) = task
        .await
        .map_err(|e| ReceiverError::Internal(format!("blob writer task failed: {e}")))?;
    match result {
        Ok(Outcome::Partial(n)) => Ok((StatusCode::NO_CONTENT, offset_headers(n, size))),
        Ok(Outcome::Complete(..)) => Ok((StatusCode::NO_CONTENT, offset_headers(size, size))),
        Err(e) => Err(upload_error(e)),
    }
}

/// An authenticated `PATCH`'s blob, its `Upload-Offset` and an upload slot, or the refusal.
fn admit(
    state: &AppState,
    parts: &http::request::Parts,
    parsed: Result<Checksum>,
) -> Result<(Expected, u64, UploadSlot)> {
    let blake3 = parsed?;
    let offset: u64 = parts
        .headers
        .get(UPLOAD_OFFSET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            ReceiverError::Validation(format!("{UPLOAD_OFFSET} is required: a byte offset"))
        })?;
    let expected = expected(state, &blake3)?;
    // The rest of the blob must fit with a margin, as a v1 upload's package must: a disk filled
    // by blobs would also refuse the nonce log every signed request writes to.
    let held = match state.layers().blobs().state(&blake3) {
        BlobState::Complete(_) => expected.size,
        BlobState::Partial(n) => n.min(expected.size),
        BlobState::Missing => 0,
    };
    let needed = (expected.size - held).saturating_add(FREE_SPACE_MARGIN);
    let free = state.store().free_bytes();
    if held < expected.size && free < needed {
        return Err(ReceiverError::AtOffset {
            error: Box::new(ReceiverError::InsufficientStorage(format!(
                "not enough free space for the rest of blob {blake3}: {needed} bytes needed \
                 (with a {} MiB margin), {free} free; nothing was written",
                FREE_SPACE_MARGIN >> 20
            ))),
            offset: held,
        });
    }
    let slot = state.upload_slot()?;
    Ok((expected, offset, slot))
}

fn upload_error(e: UploadError) -> ReceiverError {
    let held = e.held();
    let message = e.to_string();
    let error = match e {
        UploadError::OffsetMismatch { .. } => ReceiverError::OffsetMismatch(message),
        UploadError::InUse { .. } => ReceiverError::Conflict(message),
        UploadError::TooLarge { size, .. } => ReceiverError::TooLarge {
            size: size + 1,
            limit: size,
        },
        UploadError::Mismatch { .. } => ReceiverError::ChecksumMismatch(message),
        UploadError::StorageFull { .. } => ReceiverError::InsufficientStorage(message),
        UploadError::Idle { .. } | UploadError::Deadline { .. } => ReceiverError::Timeout(message),
        UploadError::Cut { .. } => ReceiverError::Validation(message),
        UploadError::Io { error, .. } => ReceiverError::Io(error),
    };
    match held {
        Some(offset) => ReceiverError::AtOffset {
            error: Box::new(error),
            offset,
        },
        None => error,
    }
}
