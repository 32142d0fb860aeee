//! The one error type of `deploy-sender`: every failure carries a stable [`ErrorCode`] and a
//! message that says what went wrong and what to do about it.

use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::ErrorCode;

/// Everything that can go wrong in the sender's library.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// Input refused before any work was done (bad path, bad tag, bad URL...).
    #[error("{0}")]
    Validation(String),
    /// No such package (or image) where one was expected.
    #[error("{0}")]
    NotFound(String),
    /// The package id is already taken in the store, or being written right now.
    #[error("{0}")]
    Conflict(String),
    /// The Docker engine could not be reached.
    #[error("{0}")]
    DockerUnavailable(String),
    /// The image build failed; `log_tail` holds the last lines of the build output.
    #[error("{message}{}", format_tail(.log_tail))]
    BuildFailed {
        /// What Docker reported.
        message: String,
        /// The last lines of the build log.
        log_tail: Vec<String>,
    },
    /// The compressed package grew past the configured limit.
    #[error("package exceeds the maximum package size of {limit} bytes: raise --max-package-size or package a smaller image")]
    PackageTooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Stored bytes no longer hash to the recorded checksum or size.
    #[error("{0}")]
    ChecksumMismatch(String),
    /// The receiver could not be reached (connection refused, DNS, timeout before a response).
    #[error("receiver {url} is unreachable: {detail}; check the URL, that deploy-receiver runs there, and the network path")]
    RemoteUnreachable {
        /// The URL that was tried.
        url: String,
        /// The underlying failure.
        detail: String,
    },
    /// The transfer failed after the receiver was reached.
    #[error("{0}")]
    TransferFailed(String),
    /// The receiver answered with a protocol error; its code and message are passed through.
    #[error("{message}")]
    Remote {
        /// HTTP status of the receiver's answer.
        status: u16,
        /// The receiver's error code.
        code: ErrorCode,
        /// The receiver's message, verbatim.
        message: String,
    },
    /// The receiver ran the deployment and it did not succeed: the record says which stage failed
    /// and why (its `error`), and whether the previous container was restored (its `status`).
    #[error("{}", deployment_message(.0))]
    Deployment(Box<DeploymentRecord>),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An unexpected failure that is neither the caller's nor a remote's fault.
    #[error("{0}")]
    Internal(String),
}

fn format_tail(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(
            "\n--- last {} lines of the build log ---\n{}",
            tail.len(),
            tail.join("\n")
        )
    }
}

fn deployment_message(record: &DeploymentRecord) -> String {
    let why = record
        .error
        .as_ref()
        .map_or("the receiver gave no reason", |e| e.message.as_str());
    let status = match record.status {
        DeploymentStatus::RolledBack => "ROLLED_BACK, the previous container runs again",
        DeploymentStatus::Failed => "FAILED",
        DeploymentStatus::InProgress => "IN_PROGRESS",
        DeploymentStatus::Succeeded => "SUCCEEDED",
    };
    format!(
        "{why} (deployment {} of {}: {status})",
        record.deployment_id, record.container_name
    )
}

impl SenderError {
    /// The stable code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            SenderError::Validation(_) => ErrorCode::ValidationError,
            SenderError::NotFound(_) => ErrorCode::NotFound,
            SenderError::Conflict(_) => ErrorCode::Conflict,
            SenderError::DockerUnavailable(_) => ErrorCode::DockerUnavailable,
            SenderError::BuildFailed { .. } => ErrorCode::BuildFailed,
            SenderError::PackageTooLarge { .. } => ErrorCode::PackageTooLarge,
            SenderError::ChecksumMismatch(_) => ErrorCode::ChecksumMismatch,
            SenderError::RemoteUnreachable { .. } => ErrorCode::RemoteUnreachable,
            SenderError::TransferFailed(_) => ErrorCode::TransferFailed,
            SenderError::Remote { code, .. } => *code,
            SenderError::Deployment(record) => record
                .error
                .as_ref()
                .map_or(ErrorCode::DeployFailed, |e| e.code),
            SenderError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                ErrorCode::InsufficientStorage
            }
            SenderError::Io { .. } | SenderError::Internal(_) => ErrorCode::InternalError,
        }
    }

    /// An [`SenderError::Io`] naming what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SenderError::Io {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_pass_the_receivers_code_through() {
        let e = SenderError::Remote {
            status: 401,
            code: ErrorCode::Unauthorized,
            message: "signature does not match".into(),
        };
        assert_eq!(e.code(), ErrorCode::Unauthorized);
        assert_eq!(e.to_string(), "signature does not match");
    }

    #[test]
    fn build_failure_message_carries_the_log_tail() {
        let e = SenderError::BuildFailed {
            message: "COPY failed".into(),
            log_tail: vec!["Step 2/3 : COPY missing /x".into()],
        };
        assert_eq!(e.code(), ErrorCode::BuildFailed);
        assert!(e.to_string().contains("Step 2/3 : COPY missing /x"));
    }
}
