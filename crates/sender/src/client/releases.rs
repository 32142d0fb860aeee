//! Protocol v2 requests about releases: the inventory of the receiver's engine, registering a
//! signed release manifest, its status, and loading or deploying it. Every request is signed
//! here ([`signed`]); JSON requests whose connection could not be made are retried with the
//! usual backoff.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::release::{
    paths, InventoryRequest, InventoryResponse, LayersMissingBody, ReleaseManifest, ReleaseStatus,
    Sha256Digest,
};
use deploy_protocol::{Checksum, ErrorCode};
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::retry::{classify_send_error, remote_error};
use super::{ReceiverTarget, RetryPolicy};
use crate::SenderError;

/// The URL of `path` (a `/deployment/v2/...` path) below the target's base URL.
pub(crate) fn url_of(target: &ReceiverTarget, path: &str) -> Url {
    let mut url = target.base_url.clone();
    let (path, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    url.set_path(&format!(
        "{}{path}",
        target.base_url.path().trim_end_matches('/')
    ));
    url.set_query(query);
    url
}

/// A request signed for `target` (through the client's one signing function): `digest` is the
/// BLAKE3 of the signed content (the JSON body, the empty body, or for a blob `PATCH` the whole
/// blob).
pub(crate) fn signed(
    http: &reqwest::Client,
    target: &ReceiverTarget,
    method: Method,
    path: &str,
    digest: &Checksum,
    correlation_id: Option<&str>,
) -> (Url, reqwest::RequestBuilder) {
    let url = url_of(target, path);
    let request =
        super::sign::sign_request(http, target, method, url.clone(), digest, correlation_id);
    (url, request)
}

pub(crate) fn backoff(policy: &RetryPolicy) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_max_times(policy.max_attempts.saturating_sub(1))
        .with_jitter()
        .build()
}

/// `path` with `?await_blobs=true` when asked.
fn with_arrival(path: String, await_blobs: bool) -> String {
    if await_blobs {
        format!("{path}?await_blobs=true")
    } else {
        path
    }
}

/// Why `load`/`deploy` of a release did not succeed.
#[derive(Debug)]
pub enum FinishError {
    /// `409 LAYERS_MISSING`: these layers are neither in the engine nor received.
    LayersMissing(Vec<Sha256Digest>),
    /// Anything else.
    Other(SenderError),
}

impl From<SenderError> for FinishError {
    fn from(e: SenderError) -> Self {
        FinishError::Other(e)
    }
}

/// The receiver's v2 calls, for one target.
#[derive(Clone, Copy)]
pub struct ReleaseCalls<'a> {
    /// The HTTP client.
    pub http: &'a reqwest::Client,
    /// The receiver.
    pub target: &'a ReceiverTarget,
    /// Sent with every request.
    pub correlation_id: Option<&'a str>,
    /// Retries of requests whose connection could not be made, and of blob transfers.
    pub policy: &'a RetryPolicy,
    /// Ask for the load beside the blob uploads (see [`super::ReceiverClient::with_await_blobs`]).
    pub await_blobs: bool,
    /// Most blobs uploaded at once (see [`super::ReceiverClient::with_blob_connections`]).
    pub blob_connections: usize,
    /// Stream a cold deploy (see [`super::ReceiverClient::with_stream_cold`]).
    pub stream_cold: bool,
}

impl ReleaseCalls<'_> {
    /// Which of `chain_ids` the receiver's engine holds.
    pub async fn inventory(
        &self,
        chain_ids: Vec<Sha256Digest>,
    ) -> Result<InventoryResponse, SenderError> {
        let body = serde_json::to_vec(&InventoryRequest { chain_ids })
            .map_err(|e| SenderError::Internal(format!("cannot serialise: {e}")))?;
        self.json(Method::POST, paths::INVENTORY, body)
            .await
            .map_err(FinishError::into_sender)
    }

    /// Registers `manifest` (idempotent) and returns where each layer stands.
    pub async fn register(&self, manifest: &ReleaseManifest) -> Result<ReleaseStatus, SenderError> {
        self.json(Method::POST, paths::RELEASES, manifest.to_bytes())
            .await
            .map_err(FinishError::into_sender)
    }

    /// Where each layer of release `id` stands now.
    pub async fn status(&self, id: Uuid) -> Result<ReleaseStatus, SenderError> {
        self.json(Method::GET, &paths::release(id), Vec::new())
            .await
            .map_err(FinishError::into_sender)
    }

    /// `docker load` of release `id` on the receiver (its `LoadResponse`).
    /// With `await_blobs`, blobs still on their way are loaded as they arrive (their uploads run
    /// beside this request).
    pub async fn load(
        &self,
        id: Uuid,
        await_blobs: bool,
    ) -> Result<serde_json::Value, FinishError> {
        self.json(
            Method::POST,
            &with_arrival(paths::release_load(id), await_blobs),
            Vec::new(),
        )
        .await
    }

    /// Load, deploy and health-check release `id`. A deployment that ran and failed is
    /// [`SenderError::Deployment`].
    /// `await_blobs` as for [`Self::load`].
    pub async fn deploy(
        &self,
        id: Uuid,
        await_blobs: bool,
    ) -> Result<DeploymentRecord, FinishError> {
        self.json(
            Method::POST,
            &with_arrival(paths::release_deploy(id), await_blobs),
            Vec::new(),
        )
        .await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, FinishError> {
        let digest = Checksum::of(&body);
        let mut delays = backoff(self.policy);
        loop {
            let (url, mut request) = signed(
                self.http,
                self.target,
                method.clone(),
                path,
                &digest,
                self.correlation_id,
            );
            if !body.is_empty() {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let response = match request.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => match delays.next() {
                    Some(delay) => {
                        tracing::warn!(url = %url, error = %e, "receiver unreachable; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    None => return Err(classify_send_error(&url, e).into()),
                },
                Err(e) => return Err(classify_send_error(&url, e).into()),
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = response.bytes().await.map_err(|e| {
                SenderError::TransferFailed(format!(
                    "reading the answer of {url} failed after status {status}: {e}"
                ))
            })?;
            if matches!(status.as_u16(), 429 | 503) {
                if let Some(delay) = delays.next() {
                    let delay = retry_after.map_or(delay, |r| r.max(delay));
                    if delay <= self.policy.max_retry_after {
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
            }
            if !status.is_success() {
                if let Ok(missing) = serde_json::from_slice::<LayersMissingBody>(&bytes) {
                    if missing.error.code == ErrorCode::LayersMissing {
                        return Err(FinishError::LayersMissing(missing.missing_diff_ids));
                    }
                }
                return Err(remote_error(&url, status.as_u16(), &bytes).into());
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                SenderError::TransferFailed(format!(
                    "{url} answered {status} with an unexpected body ({e}): is it a deploy-receiver \
                     of protocol v2?"
                ))
                .into()
            });
        }
    }
}

impl FinishError {
    /// As a plain error (`LAYERS_MISSING` from the receiver, with the diffIDs in the message).
    pub fn into_sender(self) -> SenderError {
        match self {
            FinishError::Other(e) => e,
            FinishError::LayersMissing(missing) => SenderError::Remote {
                status: 409,
                code: ErrorCode::LayersMissing,
                message: format!(
                    "the receiver still lacks layers {}",
                    missing
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
}

impl super::ReceiverClient {
    /// The protocol v2 calls to this client's receiver.
    pub fn release_calls<'a>(
        &'a self,
        correlation_id: Option<&'a str>,
        policy: &'a RetryPolicy,
    ) -> ReleaseCalls<'a> {
        ReleaseCalls {
            http: &self.http,
            target: &self.target,
            correlation_id,
            policy,
            await_blobs: self.await_blobs,
            blob_connections: self.blob_connections,
            stream_cold: self.stream_cold,
        }
    }
}
