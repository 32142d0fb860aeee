//! The receiver's one error type: each variant has a stable [`ErrorCode`] and renders the JSON
//! error body. Server-side failures are logged once, here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::{AuthError, ErrorBody, ErrorCode, LayersMissingBody, Sha256Digest};

pub use deploy_http::correlation_id;

/// Everything that can go wrong in the receiver.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// Malformed input.
    #[error("{0}")]
    Validation(String),
    /// Signature, key id, timestamp or nonce refused.
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    /// Client address outside ALLOWED_NETWORKS (or not to be told from a forwarded chain).
    #[error("{0}")]
    Forbidden(String),
    /// A deployment spec asks for what the receiver's policy forbids.
    #[error("{0}")]
    PolicyDenied(String),
    /// Unknown package, deployment or container.
    #[error("{0}")]
    NotFound(String),
    /// The client stopped sending.
    #[error("{0}")]
    Timeout(String),
    /// Same id, other content.
    #[error("{0}")]
    Conflict(String),
    /// Over MAX_PACKAGE_SIZE.
    #[error(
        "package of at least {size} bytes exceeds the limit of {limit} bytes that applies to it (MAX_PACKAGE_SIZE, or its signed package_size)"
    )]
    TooLarge {
        /// Declared or counted size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Bytes differ from the signed manifest.
    #[error("{0}")]
    ChecksumMismatch(String),
    /// The archive could not or may not be loaded.
    #[error("{0}")]
    LoadFailed(String),
    /// Docker refused to create or start the container.
    #[error("{0}")]
    DeployFailed(String),
    /// The container did not become healthy.
    #[error("{0}")]
    HealthCheckFailed(String),
    /// A finished deployment that failed: the body is its record, whose `error` says why.
    #[error("deployment {} ended {:?}", .0.deployment_id, .0.status)]
    Deployment(Box<DeploymentRecord>),
    /// Too many concurrent operations.
    #[error("{message}")]
    Busy {
        /// What is busy.
        message: String,
        /// Seconds to wait before retrying.
        retry_after_secs: u64,
    },
    /// Docker is not reachable.
    #[error("{0}")]
    DockerUnavailable(String),
    /// Not enough disk space for the package.
    #[error("{0}")]
    InsufficientStorage(String),
    /// A blob `PATCH` did not start at the durable offset.
    #[error("{0}")]
    OffsetMismatch(String),
    /// Layers of a release neither held by the engine nor received.
    #[error(
        "{} layer(s) of this release are neither held by the engine nor received: send the blobs of {} and retry",
        .0.len(),
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    LayersMissing(Vec<Sha256Digest>),
    /// Another error, answered with the blob's durable offset in `Upload-Offset`.
    #[error("{error}")]
    AtOffset {
        /// The error.
        error: Box<ReceiverError>,
        /// The durable offset.
        offset: u64,
    },
    /// File system failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else unexpected.
    #[error("{0}")]
    Internal(String),
}

impl ReceiverError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReceiverError::Validation(_) => ErrorCode::ValidationError,
            ReceiverError::Unauthorized(_) => ErrorCode::Unauthorized,
            ReceiverError::Forbidden(_) => ErrorCode::Forbidden,
            ReceiverError::PolicyDenied(_) => ErrorCode::PolicyDenied,
            ReceiverError::NotFound(_) => ErrorCode::NotFound,
            ReceiverError::Timeout(_) => ErrorCode::Timeout,
            ReceiverError::Conflict(_) => ErrorCode::Conflict,
            ReceiverError::TooLarge { .. } => ErrorCode::PackageTooLarge,
            ReceiverError::ChecksumMismatch(_) => ErrorCode::ChecksumMismatch,
            ReceiverError::LoadFailed(_) => ErrorCode::LoadFailed,
            ReceiverError::DeployFailed(_) => ErrorCode::DeployFailed,
            ReceiverError::HealthCheckFailed(_) => ErrorCode::HealthCheckFailed,
            ReceiverError::Deployment(record) => record
                .error
                .as_ref()
                .map_or(ErrorCode::DeployFailed, |e| e.code),
            ReceiverError::Busy { .. } => ErrorCode::Busy,
            ReceiverError::DockerUnavailable(_) => ErrorCode::DockerUnavailable,
            ReceiverError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
            ReceiverError::OffsetMismatch(_) => ErrorCode::OffsetMismatch,
            ReceiverError::LayersMissing(_) => ErrorCode::LayersMissing,
            ReceiverError::AtOffset { error, .. } => error.code(),
            ReceiverError::Io(_) | ReceiverError::Internal(_) => ErrorCode::InternalError,
        }
    }

    /// The error body as it is sent.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string(), correlation_id())
    }
}

impl IntoResponse for ReceiverError {
    fn into_response(self) -> Response {
        let code = self.code();
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = %code, error = %self, "request failed");
        } else {
            tracing::info!(code = %code, error = %self, "request refused");
        }
        let mut response = match &self {
            ReceiverError::Deployment(record) => {
                (status, Json(record.as_ref().clone())).into_response()
            }
            ReceiverError::LayersMissing(missing) => {
                let body = LayersMissingBody {
                    error: self.body().error,
                    missing_diff_ids: missing.clone(),
                };
                (status, Json(body)).into_response()
            }
            _ => (status, Json(self.body())).into_response(),
        };
        // For the error counter (`metrics::count_errors`), which sees every response.
        response.extensions_mut().insert(code);
        if let ReceiverError::Busy {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if let ReceiverError::AtOffset { offset, .. } = self {
            response.headers_mut().insert(
                deploy_protocol::release::UPLOAD_OFFSET,
                HeaderValue::from(offset),
            );
        }
        response
    }
}

/// Shorthand.
pub type Result<T, E = ReceiverError> = std::result::Result<T, E>;
