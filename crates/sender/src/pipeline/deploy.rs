//! Deploy in one call: package an image (build it from a Dockerfile, or take an existing one),
//! then stream the stored package to a receiver's `POST /deployment/full` with the deployment spec
//! in its manifest, and report both halves: the package and the receiver's deployment record.
//! The CLI (`deploy-sender deploy`) and the REST service both call [`deploy`].

use std::sync::Arc;

use bollard::Docker;
use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::{DeploymentSpec, ErrorCode};
use serde::Serialize;

use super::package::{package_image, PackageRequest};
use super::progress::{Progress, ProgressExt, Stage};
use super::store::{PackageInfo, PackageStore};
use uuid::Uuid;

use super::events::{Lifecycle, Subject};
use crate::client::{ReceiverClient, TransferStats};
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
    client: &ReceiverClient,
    request: &DeployRequest,
    progress: Arc<dyn Progress>,
    events: &Lifecycle,
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
    // The id is chosen here so that every event of this deployment carries it.
    let package_id = *package_request.package_id.get_or_insert_with(Uuid::new_v4);
    let subject = Subject {
        package_id: Some(package_id),
        correlation_id: request.correlation_id.clone(),
        container_name: Some(request.deployment.container_name.clone()),
        image_tag: Some(package_request.source.reference().to_owned()),
    };
    events.build_started(&subject, &package_request).await;
    let packaged = package_image(docker, store, &package_request, &*progress).await;
    events.build_finished(&subject, packaged.as_ref()).await;
    let package = packaged.map_err(|e| fail(None, e))?;

    let receiver = client.target().base_url.to_string();
    events
        .transfer_started(&subject, &receiver, "full", package.package_size)
        .await;
    let sent = deploy_package(
        client,
        &package,
        &request.deployment,
        request.correlation_id.as_deref(),
        progress,
    )
    .await;
    match sent {
        Ok((transfer, deployment)) => {
            events
                .transfer_completed(
                    &subject,
                    &receiver,
                    &transfer,
                    Some(deployment.deployment_id),
                )
                .await;
            Ok(DeployOutcome {
                package,
                transfer,
                deployment,
            })
        }
        Err(error) => {
            if let SenderError::Deployment(record) = &error {
                // The package reached the receiver and was verified; the deployment failed.
                let transfer = TransferStats {
                    bytes: package.package_size,
                    request_duration_ms: 0,
                };
                events
                    .transfer_completed(&subject, &receiver, &transfer, Some(record.deployment_id))
                    .await;
                events
                    .deployment_failed(&subject, &receiver, &error, record)
                    .await;
            } else {
                events.transfer_failed(&subject, &receiver, &error).await;
            }
            Err(fail(Some(package), error))
        }
    }
}

/// Streams a stored package to the receiver's `/deployment/full` with `spec` in its manifest and
/// returns the receiver's record of a successful deployment. A deployment that ran and failed is
/// [`SenderError::Deployment`] (the record, with the receiver's code); a refusal before it ran is
/// [`SenderError::Remote`].
pub async fn deploy_package(
    client: &ReceiverClient,
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

    // Every attempt opens the file again: retention and deletes leave it alone meanwhile.
    let _hold = super::PackageHold::new(package)?;
    let total = manifest.package_size;
    let reporter = Arc::clone(&progress);
    let on_sent = move |sent: u64| {
        reporter.advance(Stage::Upload, sent, Some(total));
        if sent >= total {
            reporter.finish(Stage::Upload, sent);
            reporter.message(Stage::Deploy, "receiver: verify, load, start, health check");
        }
    };
    let result = client
        .deploy(
            std::path::Path::new(&package.package_path),
            &manifest,
            correlation_id,
            on_sent,
        )
        .await;
    progress.finish(Stage::Deploy, 0);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deployments run on spawned tasks: the future must be `Send`.
    #[allow(dead_code)]
    fn deploy_future_is_send(
        docker: &Docker,
        store: &PackageStore,
        client: &ReceiverClient,
        request: &DeployRequest,
        events: &Lifecycle,
    ) {
        fn is_send<T: Send>(_: &T) {}
        is_send(&deploy(
            docker,
            store,
            client,
            request,
            Arc::new(crate::NoProgress),
            events,
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
