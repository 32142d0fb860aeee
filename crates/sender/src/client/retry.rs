//! Which failures of a request are transient, and how often to try again: [`RetryPolicy`] and
//! the classification of an attempt's failure (connect, TLS, broken, the receiver's answer).

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::display::{error_chain, millis};
use deploy_protocol::ErrorBody;
use reqwest::Url;

use crate::SenderError;

/// When and how often an upload that failed for a transient reason is tried again.
///
/// Transient: no connection could be made (refused, DNS), or the receiver answered `429 BUSY` or
/// `503` (honouring `Retry-After`), or `408 TIMEOUT`. Never retried: any other answer, in
/// particular 401, 403, 409, 413 and 422, which a repeat cannot change; nor a connection that
/// broke during the exchange, since that may have been one of those answers cut short (or, for
/// `/deployment/full`, a deployment that ran).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: usize,
    /// First backoff delay; it doubles up to `max_delay`, with random jitter.
    pub min_delay: Duration,
    /// Longest backoff delay.
    pub max_delay: Duration,
    /// Longest `Retry-After` honoured; a receiver asking for more ends the retries.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, 0.5 s, 1 s, 2 s apart (plus jitter), `Retry-After` up to 60 s.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A single attempt.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `policy` says stop; waits between
/// attempts with exponential backoff and jitter, honouring the receiver's `Retry-After`.
pub(super) async fn with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    mut attempt: F,
) -> Result<T, SenderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_attempts.saturating_sub(1))
        .with_jitter()
        .build();
    let mut attempt_no = 1;
    loop {
        let failure = match attempt().await {
            Ok(outcome) => return Ok(outcome),
            Err(failure) => failure,
        };
        if !failure.is_transient() {
            return Err(failure.error);
        }
        let Some(backoff_delay) = backoff.next() else {
            return Err(failure.error);
        };
        let delay = match failure.retry_after {
            Some(asked) if asked > policy.max_retry_after => return Err(failure.error),
            Some(asked) => asked.max(backoff_delay),
            None => backoff_delay,
        };
        tracing::warn!(
            attempt = attempt_no,
            retry_in_ms = millis(delay),
            error = %failure.error,
            "request to the receiver failed; retrying"
        );
        tokio::time::sleep(delay).await;
        attempt_no += 1;
    }
}

/// Why one attempt failed, and what that says about trying again.
pub(super) struct Failure {
    pub(super) error: SenderError,
    pub(super) stage: Stage,
    pub(super) retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Before sending: bad file, bad manifest. Never retried.
    Local,
    /// No connection could be made: the receiver did nothing.
    Connect,
    /// The TLS handshake was refused (a certificate not trusted or not for this host, no common
    /// protocol): trying again cannot change it.
    Tls,
    /// The connection broke or timed out during the exchange.
    Broken,
    /// The receiver answered with this status.
    Answer(u16),
}

impl Failure {
    pub(super) fn local(error: SenderError) -> Self {
        Self {
            error,
            stage: Stage::Local,
            retry_after: None,
        }
    }

    fn is_transient(&self) -> bool {
        match self.stage {
            Stage::Local => false,
            Stage::Connect => true,
            Stage::Tls => false,
            Stage::Broken => false,
            Stage::Answer(status) => matches!(status, 408 | 429 | 503),
        }
    }
}

impl From<SenderError> for Failure {
    fn from(error: SenderError) -> Self {
        Self::local(error)
    }
}

impl Failure {
    /// A request that could not be sent or whose answer could not be read.
    pub(super) fn of_send(url: &Url, e: reqwest::Error) -> Self {
        Self {
            stage: if e.is_connect() && is_tls_refusal(&e) {
                Stage::Tls
            } else if e.is_connect() {
                Stage::Connect
            } else {
                Stage::Broken
            },
            error: classify_send_error(url, e),
            retry_after: None,
        }
    }
}

pub(super) fn classify_send_error(url: &Url, e: reqwest::Error) -> SenderError {
    let chain = error_chain(&e);
    if e.is_connect() && is_tls_refusal(&e) && speaks_plain_http(&chain) {
        let mut plain = url.clone();
        let _ = plain.set_scheme("http");
        SenderError::RemoteUnreachable {
            url: url.to_string(),
            detail: format!(
                "the receiver answered in plain HTTP, not TLS ({chain}): the receiver itself \
                 speaks plain HTTP, so use {plain}, or put a TLS proxy in front of it (docs/\
                 OPERATIONS.md, \"TLS in front\"); not retried"
            ),
        }
    } else if e.is_connect() && is_tls_refusal(&e) {
        SenderError::RemoteUnreachable {
            url: url.to_string(),
            detail: format!(
                "TLS handshake refused: {} (for a private CA, pass its certificate with --ca-cert \
                 or DEPLOY_CA_CERT; not retried)",
                error_chain(&e)
            ),
        }
    } else if e.is_connect() || e.is_timeout() {
        SenderError::RemoteUnreachable {
            url: url.to_string(),
            detail: error_chain(&e),
        }
    } else {
        SenderError::TransferFailed(format!("upload to {url} failed: {}", error_chain(&e)))
    }
}

/// Whether a TLS handshake failed because the other side answered in plain HTTP: rustls then
/// reports a record of an invalid content type (an HTTP response's `HTTP/1.1` is no TLS record).
fn speaks_plain_http(chain: &str) -> bool {
    chain.contains("InvalidContentType") || chain.contains("corrupt message")
}

/// Whether a connect error is a TLS handshake refusal: rustls reports those as an `io::Error` of
/// kind `InvalidData` (a refused connection is `ConnectionRefused`, a timeout `TimedOut`), which
/// the connector wraps in another `io::Error` (whose `source()` skips the inner one, so the
/// wrapped errors are walked with `get_ref`).
fn is_tls_refusal(e: &reqwest::Error) -> bool {
    fn invalid_data(io: &std::io::Error) -> bool {
        io.kind() == std::io::ErrorKind::InvalidData
            || io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<std::io::Error>())
                .is_some_and(invalid_data)
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(invalid_data)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// The receiver's `{"error": {...}}` passed through, or `TRANSFER_FAILED` for any other answer.
/// `/deployment/full` answers a deployment that ran and failed with its record (whose `error`
/// carries the code): that is kept whole, so the caller can show every stage.
pub(super) fn remote_error(url: &Url, status: u16, body: &[u8]) -> SenderError {
    if let Ok(record) = serde_json::from_slice::<DeploymentRecord>(body) {
        if record.error.is_some() {
            return SenderError::Deployment(Box::new(record));
        }
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => SenderError::Remote {
            status,
            code: error.code,
            message: error.message,
        },
        Err(_) => {
            let shown = if body.is_empty() {
                "(an empty body)".to_owned()
            } else {
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
            };
            SenderError::TransferFailed(format!(
                "{url} answered {status} without a protocol error body: {shown}; is that \
                 address a deploy-receiver (check the host and port: `deploy-sender doctor --to \
                 URL`)?"
            ))
        }
    }
}
