//! Streamed uploads (`POST /deployment/stream`): a package sent while it is being made. The
//! request is signed over a [`StreamManifest`] (no size, no checksum); the package part is
//! hashed and counted as it goes; the `seal` part after it carries both, HMAC-signed over the
//! request's nonce and manifest. Made once: a stream cannot be replayed, so a failure that
//! another path could get past is handed back as [`StreamFailure::Fallback`], not retried here.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::display::millis;
use deploy_protocol::envelope;
use deploy_protocol::multipart::{
    MANIFEST_CONTENT_TYPE, PACKAGE_CONTENT_TYPE, PART_MANIFEST, PART_PACKAGE, PART_SEAL,
};
use deploy_protocol::stream::{Seal, StreamManifest};
use deploy_protocol::{Checksum, ErrorCode};
use futures::Stream;
use reqwest::multipart::{Form, Part};
use reqwest::Method;
use tokio::sync::oneshot;

use super::retry::{classify_send_error, remote_error};
use super::sign::sign_with_nonce;
use super::{Endpoint, ReceiverClient, TransferStats};
use crate::SenderError;

/// Why a stream did not deliver.
#[derive(Debug)]
pub enum StreamFailure {
    /// Nothing was run, and the image may still be delivered another way (as layers): the
    /// receiver does not know `/deployment/stream` (an older one), is loading another image
    /// (`429`), or the connection failed or broke before an answer.
    Fallback(SenderError),
    /// The outcome: a refusal (signature, policy, spec...), a package that failed on its way
    /// (`docker save`), or a deployment that ran and failed (its record).
    Final(SenderError),
}

impl StreamFailure {
    /// The error either way.
    pub fn into_error(self) -> SenderError {
        match self {
            StreamFailure::Fallback(e) | StreamFailure::Final(e) => e,
        }
    }
}

/// The package stream as sent: hashed and counted, the totals handed to the seal at its end, its
/// bytes so far to `on_sent`.
struct Sealing<S> {
    inner: S,
    hasher: blake3::Hasher,
    count: u64,
    done: Option<oneshot::Sender<(Checksum, u64)>>,
    on_sent: Arc<dyn Fn(u64) + Send + Sync>,
    sent: Arc<Mutex<u64>>,
}

impl<S> Stream for Sealing<S>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => {
                this.hasher.update(chunk);
                this.count += chunk.len() as u64;
                if let Ok(mut sent) = this.sent.lock() {
                    *sent = this.count;
                }
                (this.on_sent)(this.count);
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    let _ = done.send((Checksum::from_hasher(&this.hasher), this.count));
                }
            }
            _ => {}
        }
        polled
    }
}

impl ReceiverClient {
    /// Streams `package` (the compressed archive, as it is made) to `/deployment/stream` with
    /// `manifest`, then its seal, and returns the receiver's record of a deployment that
    /// succeeded. `on_sent` hears the package bytes sent so far.
    pub async fn stream_deploy<S>(
        &self,
        manifest: &StreamManifest,
        package: S,
        correlation_id: Option<&str>,
        on_sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<(TransferStats, DeploymentRecord), StreamFailure>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
    {
        let url = self.target().endpoint_url(Endpoint::Stream);
        let manifest_bytes = manifest.to_bytes();
        let manifest_digest = Checksum::of(&manifest_bytes);
        let nonce = envelope::new_nonce();
        let request = sign_with_nonce(
            &self.http,
            self.target(),
            Method::POST,
            url.clone(),
            &manifest_digest,
            correlation_id,
            nonce.clone(),
        );
        let (done, sealed) = oneshot::channel();
        let sent = Arc::new(Mutex::new(0u64));
        let body = Sealing {
            inner: package,
            hasher: blake3::Hasher::new(),
            count: 0,
            done: Some(done),
            on_sent: Arc::new(on_sent),
            sent: Arc::clone(&sent),
        };
        let secret = self.target().secret.clone();
        // Set once the seal was handed to the connection: from then on the receiver may have
        // everything it needs to deploy, and a failure is no longer safe to send again.
        let seal_out = Arc::new(AtomicBool::new(false));
        let seal_flag = Arc::clone(&seal_out);
        let seal = futures::stream::once(async move {
            let (checksum, size) = sealed.await.map_err(|_| {
                std::io::Error::other("the package stream ended without its totals")
            })?;
            let seal = Seal::sign(&secret, &nonce, &manifest_digest, checksum, size);
            seal_flag.store(true, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(seal.to_bytes()))
        });
        let internal = |e: reqwest::Error| {
            StreamFailure::Final(SenderError::Internal(format!("cannot build request: {e}")))
        };
        let form = Form::new()
            .part(
                PART_MANIFEST,
                Part::bytes(manifest_bytes)
                    .mime_str(MANIFEST_CONTENT_TYPE)
                    .map_err(internal)?,
            )
            .part(
                PART_PACKAGE,
                Part::stream(reqwest::Body::wrap_stream(body))
                    .file_name(format!(
                        "{}.{}",
                        manifest.package_id,
                        manifest.compression.extension()
                    ))
                    .mime_str(PACKAGE_CONTENT_TYPE)
                    .map_err(internal)?,
            )
            .part(
                PART_SEAL,
                Part::stream(reqwest::Body::wrap_stream(seal))
                    .mime_str(MANIFEST_CONTENT_TYPE)
                    .map_err(internal)?,
            );

        let started = Instant::now();
        tracing::info!(url = %url, package_id = %manifest.package_id, "stream started");
        let response = match request.multipart(form).send().await {
            Ok(response) => response,
            Err(e) if seal_out.load(Ordering::SeqCst) => {
                return Err(StreamFailure::Final(SenderError::TransferFailed(format!(
                    "the whole stream and its seal were sent to {url}, but no answer came ({}): the receiver may have deployed it; see its GET /deployments (package_id {})",
                    classify_send_error(&url, e),
                    manifest.package_id
                ))))
            }
            Err(e) => return Err(StreamFailure::Fallback(classify_send_error(&url, e))),
        };
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            StreamFailure::Final(SenderError::TransferFailed(format!(
                "reading the answer of {url} failed after status {status}: {e}: the receiver may have deployed it; see its GET /deployments (package_id {})",
                manifest.package_id
            )))
        })?;
        let duration = started.elapsed();
        if !status.is_success() {
            let error = remote_error(&url, status.as_u16(), &body);
            return Err(if nothing_ran(status.as_u16(), &error) {
                StreamFailure::Fallback(match error {
                    SenderError::TransferFailed(_) => SenderError::TransferFailed(format!(
                        "{url} answered {status} without a protocol error body: it has no streamed deploy (a deploy-receiver older than /deployment/stream, or a proxy in front of it that does not pass that route)"
                    )),
                    error => error,
                })
            } else {
                StreamFailure::Final(error)
            });
        }
        let record: DeploymentRecord = serde_json::from_slice(&body).map_err(|e| {
            StreamFailure::Final(SenderError::TransferFailed(format!(
                "{url} answered {status} without a deployment record ({e}): is it a deploy-receiver?"
            )))
        })?;
        if record.status != DeploymentStatus::Succeeded {
            return Err(StreamFailure::Final(SenderError::Deployment(Box::new(
                record,
            ))));
        }
        let bytes = sent.lock().map_or(0, |n| *n);
        Ok((
            TransferStats {
                bytes,
                request_duration_ms: millis(duration),
            },
            record,
        ))
    }
}

/// Whether an error answer to a stream says that nothing was run and the image may go another
/// way: an older receiver without the endpoint (a `404`/`405` that is no protocol answer), a
/// receiver busy loading another image (`429`), or a stream the receiver stopped reading (too
/// large for `MAX_PACKAGE_SIZE` as a whole, which applies per blob to layers; or stalled).
fn nothing_ran(status: u16, error: &SenderError) -> bool {
    let protocol_answer = matches!(
        error,
        SenderError::Remote { .. } | SenderError::Deployment(_)
    );
    match error.code() {
        _ if matches!(status, 404 | 405) => !protocol_answer,
        ErrorCode::Busy | ErrorCode::PackageTooLarge | ErrorCode::Timeout => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(status: u16, code: ErrorCode) -> SenderError {
        SenderError::Remote {
            status,
            code,
            message: String::new(),
        }
    }

    #[test]
    fn only_answers_that_ran_nothing_fall_back() {
        let plain_404 = SenderError::TransferFailed("answered 404 without a protocol body".into());
        assert!(nothing_ran(404, &plain_404), "an older receiver");
        assert!(!nothing_ran(404, &remote(404, ErrorCode::NotFound)));
        assert!(nothing_ran(429, &remote(429, ErrorCode::Busy)));
        assert!(nothing_ran(413, &remote(413, ErrorCode::PackageTooLarge)));
        for code in [
            ErrorCode::Unauthorized,
            ErrorCode::PolicyDenied,
            ErrorCode::ChecksumMismatch,
            ErrorCode::LoadFailed,
            ErrorCode::HealthCheckFailed,
            ErrorCode::DockerUnavailable,
        ] {
            assert!(!nothing_ran(422, &remote(422, code)), "{code:?}");
        }
    }
}
