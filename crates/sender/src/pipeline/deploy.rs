//! Deploy in one call: package an image (build it from a Dockerfile, or take an existing one),
//! then stream the stored package to a receiver's `POST /deployment/full` with the deployment spec
//! in its manifest, and report both halves: the package and the receiver's deployment record.
//! The CLI (`deploy-sender deploy`) and the REST service both call [`deploy`].

use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::{DeploymentSpec, ErrorCode};
use serde::Serialize;

use super::package::{package_image, PackageRequest};
use super::progress::{Progress, ProgressExt, Stage};
use super::store::{PackageInfo, PackageStore};
use crate::client::{upload_package, Endpoint, ReceiverTarget};
use crate::SenderError;

/// A deployment job: what to package and what to run from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployRequest {
    /// What to package. Its `container_name` defaults to the spec's.
    pub package: PackageRequest,
    /// What to run. `image` defaults to the package's first tag (its image id when untagged).
    pub deployment: DeploymentSpec,
    /// Correlation id sent to the receiver (echoed in its logs, events and the record).
    pub correlation_id: Option<String>,
}

/// The transfer as the sender saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferStats {
    /// Package bytes sent.
    pub bytes: u64,
    /// From the start of the request to the receiver's answer: upload *and* the whole deployment.
    pub request_duration_ms: u64,
}

/// A deployment that succeeded: the package that was sent and the receiver's record of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeployOutcome {
    /// The stored package (with build and export durations).
    pub package: PackageInfo,
    /// The request to the receiver.
    pub transfer: TransferStats,
    /// The receiver's record: status, container id, every stage's outcome and duration.
    pub deployment: DeploymentRecord,
}

/// A deployment that did not succeed, with whatever was done before it failed.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct DeployFailure {
    /// The package, when packaging succeeded (it stays in the store).
    pub package: Option<PackageInfo>,
    /// Why it failed. A deployment the receiver ran and that failed is
    /// [`SenderError::Deployment`], holding the record (e.g. `HEALTH_CHECK_FAILED`, `ROLLED_BACK`).
    #[source]
    pub error: SenderError,
}

impl DeployFailure {
    /// The stable code: the receiver's when it answered with one.
    pub fn code(&self) -> ErrorCode {
        self.error.code()
    }

    /// The receiver's record, when the receiver ran the deployment.
    pub fn deployment(&self) -> Option<&DeploymentRecord> {
        match &self.error {
            SenderError::Deployment(record) => Some(record),
            _ => None,
        }
    }
}

impl From<DeployFailure> for SenderError {
    fn from(failure: DeployFailure) -> Self {
        failure.error
    }
}

/// Packages `request.package` into `store`, then deploys it to `target` (see [`deploy_package`]).
///
/// `progress` hears the build, export and upload stages, then [`Stage::Deploy`] while the
/// receiver loads, starts and health-checks.
pub async fn deploy(
    docker: &Docker,
    store: &PackageStore,
    client: &reqwest::Client,
    target: &ReceiverTarget,
    request: &DeployRequest,
    progress: Arc<dyn Progress>,
) -> Result<DeployOutcome, DeployFailure> {
    let fail = |package, error| DeployFailure { package, error };
    // Refuse a bad spec before spending a build on it (the image is filled in after packaging).
    let mut check = request.deployment.clone();
    check.image = None;
    check
        .validate()
        .map_err(|e| fail(None, SenderError::Validation(e)))?;

    let mut package_request = request.package.clone();
    package_request.container_name = package_request
        .container_name
        .or_else(|| Some(request.deployment.container_name.clone()));
    let package = package_image(docker, store, &package_request, &*progress)
        .await
        .map_err(|e| fail(None, e))?;
    match deploy_package(
        client,
        target,
        &package,
        &request.deployment,
        request.correlation_id.as_deref(),
        progress,
    )
    .await
    {
        Ok((transfer, deployment)) => Ok(DeployOutcome {
            package,
            transfer,
            deployment,
        }),
        Err(error) => Err(fail(Some(package), error)),
    }
}

/// Streams a stored package to `target`'s `/deployment/full` with `spec` in its manifest and
/// returns the receiver's record of a successful deployment. A deployment that ran and failed is
/// [`SenderError::Deployment`] (the record, with the receiver's code); a refusal before it ran is
/// [`SenderError::Remote`].
pub async fn deploy_package(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    package: &PackageInfo,
    spec: &DeploymentSpec,
    correlation_id: Option<&str>,
    progress: Arc<dyn Progress>,
) -> Result<(TransferStats, DeploymentRecord), SenderError> {
    let mut spec = spec.clone();
    if spec.image.is_none() {
        spec.image = Some(
            package
                .image_tags
                .first()
                .cloned()
                .unwrap_or_else(|| package.image_id.clone()),
        );
    }
    spec.validate().map_err(SenderError::Validation)?;
    let mut manifest = package.manifest();
    manifest.container_name = Some(spec.container_name.clone());
    manifest.deployment = Some(spec);
    manifest
        .validate()
        .map_err(|e| SenderError::Validation(e.to_string()))?;

    let total = manifest.package_size;
    let reporter = Arc::clone(&progress);
    let on_sent = move |sent: u64| {
        reporter.advance(Stage::Upload, sent, Some(total));
        if sent >= total {
            reporter.finish(Stage::Upload, sent);
            reporter.message(Stage::Deploy, "receiver: verify, load, start, health check");
        }
    };
    let result = upload_package(
        client,
        target,
        std::path::Path::new(&package.package_path),
        &manifest,
        Endpoint::Full,
        correlation_id,
        on_sent,
    )
    .await;
    progress.finish(Stage::Deploy, 0);
    let outcome = result?;
    let record: DeploymentRecord = serde_json::from_value(outcome.response).map_err(|e| {
        SenderError::TransferFailed(format!(
            "{} answered {} without a deployment record ({e}): is it a deploy-receiver of protocol v1?",
            target.endpoint_url(Endpoint::Full),
            outcome.status
        ))
    })?;
    if record.status != DeploymentStatus::Succeeded {
        return Err(SenderError::Deployment(Box::new(record)));
    }
    Ok((
        TransferStats {
            bytes: outcome.bytes,
            request_duration_ms: millis(outcome.duration),
        },
        record,
    ))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The REST service will `tokio::spawn` deployments: the future must be `Send`.
    #[allow(dead_code)]
    fn deploy_future_is_send(
        docker: &Docker,
        store: &PackageStore,
        client: &reqwest::Client,
        target: &ReceiverTarget,
        request: &DeployRequest,
    ) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&deploy(
            docker,
            store,
            client,
            target,
            request,
            Arc::new(crate::NoProgress),
        ));
    }

    #[test]
    fn a_failed_deployment_carries_the_receivers_code_and_record() {
        let record: DeploymentRecord = serde_json::from_value(serde_json::json!({
            "deployment_id": "643f58f6-4f40-4ecf-921f-0001187a7fd6",
            "status": "ROLLED_BACK", "container_name": "web", "image": "web:v3",
            "started_at": "2025-10-25T12:00:00Z", "stages": [],
            "error": {"code": "HEALTH_CHECK_FAILED", "message": "unhealthy after 3 probes"}
        }))
        .expect("a record");
        let failure = DeployFailure {
            package: None,
            error: SenderError::Deployment(Box::new(record)),
        };
        assert_eq!(failure.code(), ErrorCode::HealthCheckFailed);
        assert!(failure.deployment().is_some());
        let message = failure.to_string();
        assert!(message.contains("unhealthy after 3 probes"), "{message}");
        assert!(message.contains("ROLLED_BACK"), "{message}");
    }
}
