//! The upload client: streams a package file from disk to a receiver as the signed two-part
//! multipart request of protocol v1 (`manifest`, then `package`), never holding it in memory.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::envelope::{self, HEADER_CORRELATION_ID};
use deploy_protocol::multipart::{
    MANIFEST_CONTENT_TYPE, PACKAGE_CONTENT_TYPE, PART_MANIFEST, PART_PACKAGE,
};
use deploy_protocol::{Checksum, ErrorBody, PackageManifest, SignatureHeaders};
use futures::TryStreamExt;
use reqwest::multipart::{Form, Part};
use reqwest::Url;
use serde::Serialize;

use crate::error::error_chain;
use crate::SenderError;

/// Where to send packages and the shared key to sign with.
#[derive(Clone)]
pub struct ReceiverTarget {
    /// Base URL of the receiver, e.g. `http://192.168.86.200:8001` (may carry a path prefix).
    pub base_url: Url,
    /// Id of the shared key (`X-Deploy-Key-Id`).
    pub key_id: String,
    /// The shared secret.
    pub secret: Vec<u8>,
}

impl fmt::Debug for ReceiverTarget {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverTarget")
            .field("base_url", &self.base_url.as_str())
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ReceiverTarget {
    /// Parses and checks a base URL (http or https, no query or fragment).
    pub fn new(base_url: &str, key_id: &str, secret: &[u8]) -> Result<Self, SenderError> {
        let url = Url::parse(base_url).map_err(|e| {
            SenderError::Validation(format!(
                "receiver URL {base_url:?} is not a URL ({e}): use e.g. http://192.168.86.200:8001"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(SenderError::Validation(format!(
                "receiver URL {base_url:?} must be http:// or https:// with a host"
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SenderError::Validation(format!(
                "receiver URL {base_url:?} must not carry a query or fragment"
            )));
        }
        if secret.is_empty() {
            return Err(SenderError::Validation(
                "no HMAC secret: set DEPLOY_HMAC_SECRET or pass --secret".into(),
            ));
        }
        Ok(Self {
            base_url: url,
            key_id: key_id.to_owned(),
            secret: secret.to_vec(),
        })
    }

    /// The full URL of a receiver endpoint, keeping any path prefix of the base URL.
    pub fn endpoint_url(&self, endpoint: Endpoint) -> Url {
        let mut url = self.base_url.clone();
        let path = format!(
            "{}{}",
            self.base_url.path().trim_end_matches('/'),
            endpoint.path()
        );
        url.set_path(&path);
        url
    }
}

/// Which receiver endpoint to upload to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /deployment/upload`: store and verify only.
    Upload,
    /// `POST /deployment/full`: upload, verify, load, deploy and health-check.
    Full,
}

impl Endpoint {
    /// The endpoint's path below the receiver's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Upload => "/deployment/upload",
            Endpoint::Full => "/deployment/full",
        }
    }
}

/// What a successful upload reports.
#[derive(Debug, Clone, Serialize)]
pub struct UploadOutcome {
    /// The receiver's JSON answer (an `UploadResponse`, or a deployment record for `Full`).
    pub response: serde_json::Value,
    /// HTTP status of the answer.
    pub status: u16,
    /// Package bytes sent.
    pub bytes: u64,
    /// Time from the start of the request to the receiver's complete answer.
    #[serde(rename = "duration_ms", serialize_with = "as_millis")]
    pub duration: Duration,
    /// `bytes` per second over `duration`, in MB/s (10^6 bytes per second).
    pub throughput_mbps: f64,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// MB/s (10^6 bytes per second); zero for a zero duration.
pub fn throughput_mbps(bytes: u64, duration: Duration) -> f64 {
    let secs = duration.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

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

/// Uploads the package at `path`, described by `manifest`, to `target`, retrying transient
/// failures with the default [`RetryPolicy`].
///
/// `progress` is called with the number of package bytes handed to the connection so far (it
/// starts again from zero on a retry).
/// Connection failures are `REMOTE_UNREACHABLE`; an error answer from the receiver carries its
/// code and message through; anything else that breaks the transfer is `TRANSFER_FAILED`.
pub async fn upload_package(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    path: &Path,
    manifest: &PackageManifest,
    endpoint: Endpoint,
    correlation_id: Option<&str>,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<UploadOutcome, SenderError> {
    upload_package_with_retry(
        client,
        target,
        path,
        manifest,
        endpoint,
        correlation_id,
        progress,
        &RetryPolicy::default(),
    )
    .await
}

/// [`upload_package`] with an explicit retry policy. Each attempt is signed afresh (new
/// timestamp and nonce) and streams the file from its start.
#[allow(clippy::too_many_arguments)]
pub async fn upload_package_with_retry(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    path: &Path,
    manifest: &PackageManifest,
    endpoint: Endpoint,
    correlation_id: Option<&str>,
    progress: impl Fn(u64) + Send + Sync + 'static,
    policy: &RetryPolicy,
) -> Result<UploadOutcome, SenderError> {
    let progress: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(progress);
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_attempts.saturating_sub(1))
        .with_jitter()
        .build();
    let mut attempt = 1;
    loop {
        let failure = match upload_once(
            client,
            target,
            path,
            manifest,
            endpoint,
            correlation_id,
            Arc::clone(&progress),
        )
        .await
        {
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
            attempt,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            error = %failure.error,
            "upload failed; retrying"
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// Why one attempt failed, and what that says about trying again.
struct Failure {
    error: SenderError,
    stage: Stage,
    retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
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
    fn local(error: SenderError) -> Self {
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

async fn upload_once(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    path: &Path,
    manifest: &PackageManifest,
    endpoint: Endpoint,
    correlation_id: Option<&str>,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<UploadOutcome, Failure> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| SenderError::io(format!("cannot open package {}", path.display()), e))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| SenderError::io(format!("cannot stat package {}", path.display()), e))?
        .len();
    if len != manifest.package_size {
        return Err(SenderError::Validation(format!(
            "package {} is {len} bytes but its manifest says {}: rebuild the manifest",
            path.display(),
            manifest.package_size
        ))
        .into());
    }

    let manifest_bytes = manifest.to_bytes();
    let url = target.endpoint_url(endpoint);
    let headers = SignatureHeaders::sign(
        &target.key_id,
        &target.secret,
        "POST",
        url.path(),
        &Checksum::of(&manifest_bytes),
        unix_now(),
        envelope::new_nonce(),
    );

    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let body =
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect_ok(move |chunk| {
            let done =
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            progress(done);
        });
    let internal = |e: reqwest::Error| SenderError::Internal(format!("cannot build request: {e}"));
    let form = Form::new()
        .part(
            PART_MANIFEST,
            Part::bytes(manifest_bytes)
                .mime_str(MANIFEST_CONTENT_TYPE)
                .map_err(internal)?,
        )
        .part(
            PART_PACKAGE,
            Part::stream_with_length(reqwest::Body::wrap_stream(body), len)
                .file_name(package_file_name(manifest))
                .mime_str(PACKAGE_CONTENT_TYPE)
                .map_err(internal)?,
        );

    let mut request = client.post(url.clone()).multipart(form);
    for (name, value) in headers.to_pairs() {
        request = request.header(name, value);
    }
    if let Some(id) = correlation_id {
        request = request.header(HEADER_CORRELATION_ID, id);
    }

    let started = Instant::now();
    tracing::info!(url = %url, package_id = %manifest.package_id, bytes = len, "upload started");
    let response = request.send().await.map_err(|e| Failure {
        stage: if e.is_connect() && is_tls_refusal(&e) {
            Stage::Tls
        } else if e.is_connect() {
            Stage::Connect
        } else {
            Stage::Broken
        },
        error: classify_send_error(&url, e),
        retry_after: None,
    })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.bytes().await.map_err(|e| Failure {
        error: SenderError::TransferFailed(format!(
            "reading the answer of {url} failed after status {status}: {e}"
        )),
        stage: Stage::Broken,
        retry_after: None,
    })?;
    let duration = started.elapsed();

    if !status.is_success() {
        return Err(Failure {
            error: remote_error(&url, status.as_u16(), &body),
            stage: Stage::Answer(status.as_u16()),
            retry_after,
        });
    }
    let response: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        Failure::local(SenderError::TransferFailed(format!(
            "{url} answered {status} but not with JSON ({e}): is it a deploy-receiver?"
        )))
    })?;
    let bytes = sent.load(Ordering::Relaxed);
    Ok(UploadOutcome {
        response,
        status: status.as_u16(),
        bytes,
        duration,
        throughput_mbps: throughput_mbps(bytes, duration),
    })
}

fn package_file_name(manifest: &PackageManifest) -> String {
    format!(
        "{}.{}",
        manifest.package_id,
        manifest.compression.extension()
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn classify_send_error(url: &Url, e: reqwest::Error) -> SenderError {
    if e.is_connect() && is_tls_refusal(&e) {
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
pub(crate) fn remote_error(url: &Url, status: u16, body: &[u8]) -> SenderError {
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
        Err(_) => SenderError::TransferFailed(format!(
            "{url} answered {status} without a protocol error body: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests;
