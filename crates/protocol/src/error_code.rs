//! Stable error codes, each with exactly one HTTP status, and the JSON error body both services send.
//!
//! The wire strings are pinned by a golden test: a code is never renamed or reused.

use serde::{Deserialize, Serialize};

/// Every error either service reports, serialised in SCREAMING_SNAKE_CASE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Input failed validation (malformed JSON, bad UUID, wrong multipart layout...). 400.
    ValidationError,
    /// Missing or invalid signature, unknown key id, stale timestamp or replayed nonce. 401.
    Unauthorized,
    /// The client address is not in the receiver's allowlist. 403.
    Forbidden,
    /// A deployment spec asks for something the receiver's policy does not allow. 403.
    PolicyDenied,
    /// No such package, deployment, job or container. 404.
    NotFound,
    /// The client was too slow sending its request. 408.
    Timeout,
    /// The same package id was uploaded before with another checksum. 409.
    Conflict,
    /// The package exceeds the configured size limit. 413.
    PackageTooLarge,
    /// Bytes received do not hash to the signed checksum or size. 422.
    ChecksumMismatch,
    /// The Docker image build failed. 422.
    BuildFailed,
    /// The package could not be loaded into Docker (corrupt or disallowed archive). 422.
    LoadFailed,
    /// The new container did not become healthy and was removed; the record's status says whether
    /// the previous one was restored (`ROLLED_BACK`) or not (`FAILED`). 422.
    HealthCheckFailed,
    /// Too many concurrent operations; retry after the `Retry-After` delay. 429.
    Busy,
    /// An unexpected server-side failure. 500.
    InternalError,
    /// Docker refused to create or start the container. 500.
    DeployFailed,
    /// The transfer to a receiver failed after it was reached. 502.
    TransferFailed,
    /// The receiver could not be reached. 502.
    RemoteUnreachable,
    /// The Docker engine is not reachable. 503.
    DockerUnavailable,
    /// An explicit event publish could not even be recorded. 503.
    KafkaPublishFailed,
    /// Not enough free disk space for the declared package. 507.
    InsufficientStorage,
    /// A blob `PATCH` did not start at the receiver's durable offset (sent in `Upload-Offset`);
    /// nothing was appended. 409.
    OffsetMismatch,
    /// A release cannot be loaded: some layers are neither held by the engine nor received as
    /// blobs; the body lists their diffIDs. Send them and retry. 409.
    LayersMissing,
}

impl ErrorCode {
    /// All codes, for documentation and golden tests.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::ValidationError,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::PolicyDenied,
        ErrorCode::NotFound,
        ErrorCode::Timeout,
        ErrorCode::Conflict,
        ErrorCode::PackageTooLarge,
        ErrorCode::ChecksumMismatch,
        ErrorCode::BuildFailed,
        ErrorCode::LoadFailed,
        ErrorCode::HealthCheckFailed,
        ErrorCode::Busy,
        ErrorCode::InternalError,
        ErrorCode::DeployFailed,
        ErrorCode::TransferFailed,
        ErrorCode::RemoteUnreachable,
        ErrorCode::DockerUnavailable,
        ErrorCode::KafkaPublishFailed,
        ErrorCode::InsufficientStorage,
        ErrorCode::OffsetMismatch,
        ErrorCode::LayersMissing,
    ];

    /// The one HTTP status of this code.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::ValidationError => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::PolicyDenied => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Timeout => 408,
            ErrorCode::Conflict | ErrorCode::OffsetMismatch | ErrorCode::LayersMissing => 409,
            ErrorCode::PackageTooLarge => 413,
            ErrorCode::ChecksumMismatch
            | ErrorCode::BuildFailed
            | ErrorCode::LoadFailed
            | ErrorCode::HealthCheckFailed => 422,
            ErrorCode::Busy => 429,
            ErrorCode::InternalError | ErrorCode::DeployFailed => 500,
            ErrorCode::TransferFailed | ErrorCode::RemoteUnreachable => 502,
            ErrorCode::DockerUnavailable | ErrorCode::KafkaPublishFailed => 503,
            ErrorCode::InsufficientStorage => 507,
        }
    }

    /// The wire string, e.g. `CHECKSUM_MISMATCH`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ValidationError => "VALIDATION_ERROR",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::PolicyDenied => "POLICY_DENIED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::PackageTooLarge => "PACKAGE_TOO_LARGE",
            ErrorCode::ChecksumMismatch => "CHECKSUM_MISMATCH",
            ErrorCode::BuildFailed => "BUILD_FAILED",
            ErrorCode::LoadFailed => "LOAD_FAILED",
            ErrorCode::HealthCheckFailed => "HEALTH_CHECK_FAILED",
            ErrorCode::Busy => "BUSY",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::DeployFailed => "DEPLOY_FAILED",
            ErrorCode::TransferFailed => "TRANSFER_FAILED",
            ErrorCode::RemoteUnreachable => "REMOTE_UNREACHABLE",
            ErrorCode::DockerUnavailable => "DOCKER_UNAVAILABLE",
            ErrorCode::KafkaPublishFailed => "KAFKA_PUBLISH_FAILED",
            ErrorCode::InsufficientStorage => "INSUFFICIENT_STORAGE",
            ErrorCode::OffsetMismatch => "OFFSET_MISMATCH",
            ErrorCode::LayersMissing => "LAYERS_MISSING",
        }
    }

    /// Whether a client may succeed by retrying the same request later (429, 503, 502 unreachable).
    pub const fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy | ErrorCode::DockerUnavailable | ErrorCode::RemoteUnreachable
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error response: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// What went wrong and what to do about it, for people.
    pub message: String,
    /// The request's correlation id, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl ErrorBody {
    /// Builds a body.
    pub fn new(
        code: ErrorCode,
        message: impl Into<String>,
        correlation_id: Option<String>,
    ) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                correlation_id,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden: the wire strings and statuses never change.
    #[test]
    fn wire_strings_and_statuses_are_pinned() {
        let expected = [
            ("VALIDATION_ERROR", 400),
            ("UNAUTHORIZED", 401),
            ("FORBIDDEN", 403),
            ("POLICY_DENIED", 403),
            ("NOT_FOUND", 404),
            ("TIMEOUT", 408),
            ("CONFLICT", 409),
            ("PACKAGE_TOO_LARGE", 413),
            ("CHECKSUM_MISMATCH", 422),
            ("BUILD_FAILED", 422),
            ("LOAD_FAILED", 422),
            ("HEALTH_CHECK_FAILED", 422),
            ("BUSY", 429),
            ("INTERNAL_ERROR", 500),
            ("DEPLOY_FAILED", 500),
            ("TRANSFER_FAILED", 502),
            ("REMOTE_UNREACHABLE", 502),
            ("DOCKER_UNAVAILABLE", 503),
            ("KAFKA_PUBLISH_FAILED", 503),
            ("INSUFFICIENT_STORAGE", 507),
            ("OFFSET_MISMATCH", 409),
            ("LAYERS_MISSING", 409),
        ];
        assert_eq!(ErrorCode::ALL.len(), expected.len());
        for (code, (wire, status)) in ErrorCode::ALL.iter().zip(expected) {
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(serde_json::json!(wire))
            );
            assert_eq!(code.as_str(), wire);
            assert_eq!(code.http_status(), status, "{wire}");
            let back: ErrorCode = serde_json::from_value(serde_json::json!(wire)).expect("parses");
            assert_eq!(back, *code);
        }
    }

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::new(ErrorCode::ChecksumMismatch, "bad", Some("c-1".into()));
        assert_eq!(
            serde_json::to_value(&body).ok(),
            Some(
                serde_json::json!({"error": {"code": "CHECKSUM_MISMATCH", "message": "bad", "correlation_id": "c-1"}})
            )
        );
    }
}
