//! `transfer_package`: send a stored package to receivers, concurrently, optionally deploying it.

use std::sync::Arc;
use std::time::Instant;

use deploy_events::EventType;
use deploy_protocol::{Checksum, DeploymentSpec, ErrorBody, ErrorDetail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::client::{Endpoint, ReceiverClient, ReceiverTarget, RetryPolicy};
use crate::pipeline::Subject;
use crate::pipeline::{
    prepare_image, send_release, CompressionOptions, PackageHold, PackageInfo, PreparedImage,
    Progress, ReleaseAction,
};
use crate::service::jobs::Job;
use crate::service::metrics::OK;
use crate::service::state::AppState;
use crate::SenderError;

use super::serde_defaults::yes;
use deploy_protocol::display::millis;

/// `transfer_package`: send a stored package to one or more receivers, optionally deploying it.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TransferInput {
    /// The stored package.
    pub package_id: Uuid,
    /// Receiver base URLs, e.g. `http://192.168.86.200:8001` (default: DEFAULT_RECEIVER_URL).
    #[serde(default)]
    pub receivers: Vec<String>,
    /// One receiver URL; added to `receivers`.
    #[serde(default)]
    pub remote_receiver_url: Option<String>,
    /// Deploy on the receivers (`/deployment/full`: load, run, health-check, roll back on
    /// failure); without it the package is only uploaded and verified.
    #[serde(default)]
    pub deployment: Option<DeploymentSpec>,
    /// Re-hash the stored package before sending it.
    #[serde(default = "yes")]
    pub verify_checksum: bool,
    /// The checksum the caller expects the stored package to have.
    #[serde(default)]
    pub package_checksum: Option<Checksum>,
    /// Send the whole package (protocol v1) instead of only the layers each receiver lacks.
    /// Without it the package's image is sent as a release from the layer cache when the image
    /// is still in the local Docker engine, and as the whole package otherwise.
    #[serde(default)]
    pub full: bool,
}

/// One receiver's outcome.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct ReceiverOutcome {
    /// The receiver's base URL.
    pub receiver: String,
    /// Whether the upload (and the deployment, when asked for) succeeded.
    pub success: bool,
    /// The receiver's deployment id, when a deployment ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_deployment_id: Option<Uuid>,
    /// Package bytes sent.
    pub bytes: u64,
    /// Time until the receiver's complete answer, milliseconds.
    pub duration_ms: u64,
    /// MB/s (10^6 bytes per second).
    pub throughput_mbps: f64,
    /// The receiver's answer: its upload response or deployment record.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub response: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// What `transfer_package` reports.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct TransferReport {
    /// The package sent.
    pub package_id: Uuid,
    /// Whether every receiver succeeded.
    pub transfer_success: bool,
    /// `upload` or `full` (with deployment).
    pub endpoint: String,
    /// The first receiver's deployment id, when a deployment ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_deployment_id: Option<Uuid>,
    /// Bytes sent to all receivers.
    pub total_bytes: u64,
    /// Wall time of the whole transfer, milliseconds.
    pub duration_ms: u64,
    /// `total_bytes` over the wall time, MB/s.
    pub transfer_throughput_mbps: f64,
    /// Per receiver, in the order given.
    pub receivers: Vec<ReceiverOutcome>,
}

/// A checked transfer request, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct TransferPlan {
    info: PackageInfo,
    /// Keeps the package from retention and `DELETE` from the request until the last host.
    _hold: Arc<PackageHold>,
    receivers: Vec<ReceiverClient>,
    deployment: Option<DeploymentSpec>,
    verify: bool,
    full: bool,
}

impl TransferInput {
    /// Checks the input against the store and the configuration.
    pub(crate) async fn plan(self, state: &AppState) -> Result<TransferPlan, SenderError> {
        let info = state.store().get(self.package_id).await?;
        let hold = Arc::new(PackageHold::new(&info)?);
        if let Some(expected) = self.package_checksum {
            if expected != info.package_checksum {
                return Err(SenderError::ChecksumMismatch(format!(
                    "package {} has BLAKE3 {}, not the expected {expected}",
                    info.package_id, info.package_checksum
                )));
            }
        }
        let mut urls: Vec<String> = self.receivers;
        urls.extend(self.remote_receiver_url);
        if urls.is_empty() {
            urls.extend(state.config().receiver.url().map(str::to_owned));
        }
        if urls.is_empty() {
            return Err(SenderError::Validation(
                "no receiver: pass `receivers` or set DEFAULT_RECEIVER_URL".into(),
            ));
        }
        // Each receiver once, however its URL is written (case, default port, trailing `/`).
        let mut seen = std::collections::HashSet::new();
        urls.retain(|u| seen.insert(crate::pipeline::rollout::same_receiver(u)));
        let receiver = &state.config().receiver;
        let secret = receiver.secret.as_deref().unwrap_or_default();
        let receivers = urls
            .iter()
            .map(|url| {
                ReceiverTarget::new(url, &receiver.key_id, secret.as_bytes())
                    .map(|target| receiver.client_for(state.http().clone(), target))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(spec) = &self.deployment {
            // Refuse a bad spec before any byte is sent (the image defaults as it will on send).
            let mut check = spec.clone();
            check.image = check
                .image
                .or_else(|| info.image_tags.first().cloned())
                .or_else(|| Some(info.image_id.clone()));
            check
                .validate()
                .map_err(|e| SenderError::Validation(format!("deployment: {e}")))?;
        }
        Ok(TransferPlan {
            info,
            _hold: hold,
            receivers,
            deployment: self.deployment,
            verify: self.verify_checksum,
            full: self.full,
        })
    }
}

/// Runs a transfer plan: every receiver at once, at most MAX_CONCURRENT_TRANSFERS uploads in the
/// whole service. When every receiver failed the first failure is the error; otherwise the
/// report tells each receiver's outcome.
pub(crate) async fn transfer(
    state: AppState,
    plan: TransferPlan,
    correlation_id: Option<String>,
    job: Arc<Job>,
) -> Result<TransferReport, SenderError> {
    // Hashing the package again and exporting its image take an image slot, as packaging does.
    let slot = state.package_slot(job.as_ref()).await?;
    if plan.verify {
        state.store().verify(plan.info.package_id).await?;
    }
    let started = Instant::now();
    let prepared = if plan.full {
        None
    } else {
        prepare_layers(&state, &plan.info, &job).await?
    };
    drop(slot);
    let endpoint = if plan.deployment.is_some() {
        Endpoint::Full
    } else {
        Endpoint::Upload
    };
    let mut manifest = plan.info.manifest();
    manifest.deployment = plan.deployment.clone();
    let subject = Subject {
        package_id: Some(plan.info.package_id),
        correlation_id,
        container_name: plan
            .deployment
            .as_ref()
            .map(|d| d.container_name.clone())
            .or_else(|| plan.info.container_name.clone()),
        image_tag: plan.info.image_tags.first().cloned(),
    };
    let sends = plan.receivers.iter().map(|client| {
        send_one(
            &state,
            &plan.info,
            &manifest,
            prepared.as_ref(),
            client,
            endpoint,
            &subject,
            &job,
        )
    });
    let results = futures::future::join_all(sends).await;
    let duration = started.elapsed();

    let mut outcomes = Vec::with_capacity(results.len());
    let mut first_error = None;
    for (outcome, error) in results {
        if first_error.is_none() {
            first_error = error;
        }
        outcomes.push(outcome);
    }
    if outcomes.iter().all(|o| !o.success) {
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    let total_bytes = outcomes.iter().map(|o| o.bytes).sum();
    Ok(TransferReport {
        package_id: plan.info.package_id,
        transfer_success: outcomes.iter().all(|o| o.success),
        endpoint: if prepared.is_some() {
            "release".into()
        } else {
            endpoint_name(endpoint).into()
        },
        remote_deployment_id: outcomes.iter().find_map(|o| o.remote_deployment_id),
        total_bytes,
        duration_ms: millis(duration),
        transfer_throughput_mbps: round2(crate::client::throughput_mbps(total_bytes, duration)),
        receivers: outcomes,
    })
}

fn endpoint_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Upload => "upload",
        Endpoint::Full => "full",
        Endpoint::Stream => "stream",
    }
}

/// Decrements the in-flight gauge however the transfer ends.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_one(
    state: &AppState,
    info: &PackageInfo,
    manifest: &deploy_protocol::PackageManifest,
    prepared: Option<&PreparedImage>,
    client: &ReceiverClient,
    endpoint: Endpoint,
    subject: &Subject,
    job: &Arc<Job>,
) -> (ReceiverOutcome, Option<SenderError>) {
    let receiver = client.target().base_url.to_string();
    let _slot = state.transfer_slots().acquire().await;
    state.metrics().transfers_in_flight().inc();
    let _in_flight = InFlight(state.metrics().transfers_in_flight());
    let events = state.events();
    events
        .transfer_started(
            subject,
            &receiver,
            endpoint_name(endpoint),
            info.package_size,
        )
        .await;
    let started = Instant::now();
    let result = match prepared {
        Some(image) => send_release_to(state, image, manifest, client, subject, job).await,
        None => send(info, manifest, client, endpoint, subject, job).await,
    };
    let mut outcome = ReceiverOutcome {
        receiver: receiver.clone(),
        success: false,
        remote_deployment_id: None,
        bytes: 0,
        duration_ms: millis(started.elapsed()),
        throughput_mbps: 0.0,
        response: None,
        error: None,
    };
    match result {
        Ok(out) => {
            state.metrics().transfer(OK);
            state.metrics().sent_bytes(out.bytes);
            state.metrics().stage("upload", out.duration.as_secs_f64());
            outcome.success = true;
            outcome.bytes = out.bytes;
            outcome.duration_ms = millis(out.duration);
            outcome.throughput_mbps =
                round2(crate::client::throughput_mbps(out.bytes, out.duration));
            outcome.remote_deployment_id = out
                .response
                .get("deployment_id")
                .or_else(|| out.response.pointer("/deployment/deployment_id"))
                .and_then(|v| v.as_str())
                .and_then(|s| Uuid::parse_str(s).ok());
            outcome.response = Some(out.response);
            events
                .emit(
                    EventType::TransferCompleted,
                    subject,
                    json!({ "receiver": receiver, "bytes": outcome.bytes,
                            "duration_ms": outcome.duration_ms,
                            "throughput_mbps": outcome.throughput_mbps,
                            "remote_deployment_id": outcome.remote_deployment_id }),
                )
                .await;
            (outcome, None)
        }
        Err(e) => {
            state.metrics().transfer(e.code().as_str());
            outcome.error =
                Some(ErrorBody::new(e.code(), e.to_string(), subject.correlation_id.clone()).error);
            if let SenderError::Deployment(record) = &e {
                // The package reached the receiver and was verified; the deployment failed.
                outcome.bytes = info.package_size;
                outcome.remote_deployment_id = Some(record.deployment_id);
                outcome.response = serde_json::to_value(record.as_ref()).ok();
                events
                    .emit(
                        EventType::TransferCompleted,
                        subject,
                        json!({ "receiver": receiver, "bytes": outcome.bytes,
                                "duration_ms": outcome.duration_ms,
                                "remote_deployment_id": record.deployment_id }),
                    )
                    .await;
                events
                    .deployment_failed(subject, &receiver, &e, record)
                    .await;
            } else {
                events.transfer_failed(subject, &receiver, &e).await;
            }
            (outcome, Some(e))
        }
    }
}

/// What a receiver answered to a successful transfer.
struct Sent {
    bytes: u64,
    duration: std::time::Duration,
    response: serde_json::Value,
}

/// Uploads to the receiver, or with a deployment hands over to [`crate::pipeline::deploy_package`] (the
/// library's `/deployment/full` client, shared with `deploy-sender deploy`).
async fn send(
    info: &PackageInfo,
    manifest: &deploy_protocol::PackageManifest,
    client: &ReceiverClient,
    endpoint: Endpoint,
    subject: &Subject,
    job: &Arc<Job>,
) -> Result<Sent, SenderError> {
    let correlation_id = subject.correlation_id.as_deref();
    if let (Endpoint::Full, Some(spec)) = (endpoint, &manifest.deployment) {
        let started = Instant::now();
        let progress: Arc<dyn Progress> = job.clone();
        let (stats, record) =
            crate::pipeline::deploy_package(client, info, spec, correlation_id, progress).await?;
        return Ok(Sent {
            bytes: stats.bytes,
            duration: started.elapsed(),
            response: serde_json::to_value(&record)
                .map_err(|e| SenderError::Internal(format!("cannot serialise the record: {e}")))?,
        });
    }
    let progress = {
        let (job, receiver, total) = (
            job.clone(),
            client.target().base_url.to_string(),
            info.package_size,
        );
        move |sent| job.upload_progress(&receiver, sent, total)
    };
    let out = client
        .upload(std::path::Path::new(&info.package_path), manifest)
        .to(endpoint)
        .correlation_id(correlation_id)
        .on_progress(progress)
        .send()
        .await?;
    Ok(Sent {
        bytes: out.bytes,
        duration: out.duration,
        response: out.response,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The package's image as layers in the cache, when it is still in the local Docker engine
/// (`None`: it is not, and the whole package is sent).
async fn prepare_layers(
    state: &AppState,
    info: &PackageInfo,
    job: &Arc<Job>,
) -> Result<Option<PreparedImage>, SenderError> {
    let docker = match state.docker().await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "no Docker engine: sending the whole package");
            return Ok(None);
        }
    };
    let options = CompressionOptions {
        compression: info.compression,
        level: info.compression_level,
        zstd_workers: state
            .config()
            .zstd_workers
            .unwrap_or_else(crate::pipeline::default_zstd_workers),
    };
    let progress: Arc<dyn Progress> = job.clone();
    let started = Instant::now();
    match prepare_image(
        &docker,
        state.layer_cache(),
        &info.image_id,
        &options,
        progress,
    )
    .await
    {
        Ok(mut image) => {
            state
                .metrics()
                .stage("export", started.elapsed().as_secs_f64());
            image.tags = info.image_tags.clone();
            Ok(Some(image))
        }
        Err(SenderError::NotFound(why)) => {
            tracing::warn!(image = %info.image_id, %why, "image gone from the engine: sending the whole package");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends `image` as a release: stored, or deployed with the manifest's spec.
async fn send_release_to(
    state: &AppState,
    image: &PreparedImage,
    manifest: &deploy_protocol::PackageManifest,
    client: &ReceiverClient,
    subject: &Subject,
    job: &Arc<Job>,
) -> Result<Sent, SenderError> {
    let policy = RetryPolicy::default();
    let calls = client.release_calls(subject.correlation_id.as_deref(), &policy);
    let action = match &manifest.deployment {
        Some(spec) => ReleaseAction::Deploy(Box::new(spec.clone())),
        None => ReleaseAction::Store,
    };
    let started = Instant::now();
    let progress: Arc<dyn Progress> = job.clone();
    let outcome = send_release(calls, image, &action, progress).await?;
    state.metrics().release(&outcome.totals);
    Ok(Sent {
        bytes: outcome.totals.bytes_sent,
        duration: started.elapsed(),
        response: serde_json::to_value(&outcome)
            .map_err(|e| SenderError::Internal(format!("cannot serialise the outcome: {e}")))?,
    })
}
