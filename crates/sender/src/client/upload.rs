//! Uploads: a package file streamed from disk as the signed two-part multipart request of
//! protocol v1 (`manifest`, then `package`), never held in memory, retried when that is safe.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy_protocol::display::millis;
use deploy_protocol::multipart::{
    MANIFEST_CONTENT_TYPE, PACKAGE_CONTENT_TYPE, PART_MANIFEST, PART_PACKAGE,
};
use deploy_protocol::PackageManifest;
use futures::TryStreamExt;
use reqwest::multipart::{Form, Part};
use reqwest::Method;
use serde::Serialize;

use super::retry::{remote_error, with_retry, Failure, RetryPolicy, Stage};
use super::{Endpoint, ReceiverClient};
use crate::SenderError;

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
    s.serialize_u64(millis(*d))
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

type OnProgress = Arc<dyn Fn(u64) + Send + Sync>;

/// One upload, set up with [`ReceiverClient::upload`] and its builder methods, run by
/// [`send`](Upload::send).
#[must_use = "an upload does nothing until `send` is awaited"]
pub struct Upload<'a> {
    client: &'a ReceiverClient,
    path: &'a Path,
    manifest: &'a PackageManifest,
    endpoint: Endpoint,
    correlation_id: Option<&'a str>,
    retry: RetryPolicy,
    progress: OnProgress,
}

impl ReceiverClient {
    /// An upload of the package at `path`, described by `manifest`: to `/deployment/upload`,
    /// retried with the default [`RetryPolicy`], no correlation id, no progress; change those
    /// with the builder methods, then [`send`](Upload::send) it.
    pub fn upload<'a>(&'a self, path: &'a Path, manifest: &'a PackageManifest) -> Upload<'a> {
        Upload {
            client: self,
            path,
            manifest,
            endpoint: Endpoint::Upload,
            correlation_id: None,
            retry: RetryPolicy::default(),
            progress: Arc::new(|_| {}),
        }
    }
}

impl<'a> Upload<'a> {
    /// The endpoint to send to.
    pub fn to(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = endpoint;
        self
    }

    /// The correlation id to send (echoed in the receiver's logs, events and records).
    pub fn correlation_id(mut self, id: Option<&'a str>) -> Self {
        self.correlation_id = id;
        self
    }

    /// When and how often to try again after a transient failure.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Called with the number of package bytes handed to the connection so far (from zero again
    /// on a retry).
    pub fn on_progress(mut self, progress: impl Fn(u64) + Send + Sync + 'static) -> Self {
        self.progress = Arc::new(progress);
        self
    }

    /// Sends the package. Each attempt is signed afresh (new timestamp and nonce) and streams the
    /// file from its start.
    ///
    /// Connection failures are `REMOTE_UNREACHABLE`; an error answer from the receiver carries
    /// its code and message through; anything else that breaks the transfer is `TRANSFER_FAILED`.
    pub async fn send(self) -> Result<UploadOutcome, SenderError> {
        with_retry(&self.retry, || self.once()).await
    }

    async fn once(&self) -> Result<UploadOutcome, Failure> {
        let (path, manifest) = (self.path, self.manifest);
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
        let url = self.client.target().endpoint_url(self.endpoint);
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let progress = Arc::clone(&self.progress);
        let body = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect_ok(
            move |chunk| {
                let done =
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                progress(done);
            },
        );
        let internal =
            |e: reqwest::Error| SenderError::Internal(format!("cannot build request: {e}"));
        let request = self.client.signed(
            Method::POST,
            url.clone(),
            &manifest_bytes,
            self.correlation_id,
        );
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

        let started = Instant::now();
        tracing::info!(url = %url, package_id = %manifest.package_id, bytes = len, "upload started");
        let response = request
            .multipart(form)
            .send()
            .await
            .map_err(|e| Failure::of_send(&url, e))?;
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
}

fn package_file_name(manifest: &PackageManifest) -> String {
    format!(
        "{}.{}",
        manifest.package_id,
        manifest.compression.extension()
    )
}

#[cfg(test)]
mod tests;
