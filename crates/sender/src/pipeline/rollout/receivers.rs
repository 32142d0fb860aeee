//! The rollout against real receivers: a host is deployed to through
//! [`deploy_package`](crate::pipeline::deploy_package), the one function that sends a release to
//! one receiver, and rolled back with [`ReceiverClient::rollback`].

use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::api::{DeploymentList, DeploymentStatus};
use deploy_protocol::DeploymentSpec;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::report::{HostError, RolloutReport};
use super::run::{run, Moved, NotMoved, RolloutEvent, RolloutOptions};
use crate::client::ReceiverClient;
use crate::pipeline::{deploy_package, NoProgress, PackageInfo};
use crate::SenderError;

/// Longest wait for the journal query before a deployment (a rollback, which health-checks the
/// earlier release, is bounded by the rollout's own rollback deadline instead).
const QUERY_TIMEOUT: Duration = Duration::from_secs(15);

/// What to roll out: a stored package and the spec to run from it.
#[derive(Debug, Clone)]
pub struct Release {
    /// The package (sent whole to each host, or as the current transfer path sends it).
    pub package: PackageInfo,
    /// What each receiver runs.
    pub spec: DeploymentSpec,
    /// Sent to every receiver (their logs, events and records carry it).
    pub correlation_id: Option<String>,
}

/// Rolls `release` out to `targets` with `options`; see [`run`].
pub async fn roll_out(
    receivers: &[ReceiverClient],
    release: &Release,
    options: &RolloutOptions,
    abort: CancellationToken,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> Result<RolloutReport, SenderError> {
    let hosts: Vec<String> = receivers
        .iter()
        .map(|r| r.target().base_url.to_string())
        .collect();
    let name = release.spec.container_name.as_str();
    let deploy = |i: usize| async move {
        let receiver = &receivers[i];
        let before = running_image(receiver, name).await;
        match deploy_package(
            receiver,
            &release.package,
            &release.spec,
            release.correlation_id.as_deref(),
            Arc::new(NoProgress),
        )
        .await
        {
            Ok((transfer, record)) => Ok(Moved {
                deployment_id: record.deployment_id,
                version_before: record.previous_container_id.as_ref().and(before),
                version_after: record.image,
                bytes: transfer.bytes,
            }),
            Err(e) => Err(NotMoved {
                // A record means the receiver got the whole package and ran the deployment.
                bytes: match &e {
                    SenderError::Deployment(_) => release.package.package_size,
                    _ => 0,
                },
                error: HostError {
                    code: e.code(),
                    message: e.to_string(),
                },
                version_before: before,
            }),
        }
    };
    let rollback = |i: usize, deployment: Uuid| async move {
        receivers[i]
            .rollback(deployment, release.correlation_id.as_deref())
            .await
            .map(|r| r.image)
            .map_err(|e| HostError {
                code: e.code(),
                message: e.to_string(),
            })
    };
    run(&hosts, options, deploy, rollback, abort, on_event)
        .await
        .map_err(SenderError::Validation)
}

/// The image the receiver's newest successful deployment of `name` runs, if it can tell.
pub async fn running_image(receiver: &ReceiverClient, name: &str) -> Option<String> {
    let response = receiver
        .signed_get("/deployments?limit=1000", None, QUERY_TIMEOUT)
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let list: DeploymentList = response.json().await.ok()?;
    list.deployments
        .into_iter()
        .find(|r| r.container_name == name && r.status == DeploymentStatus::Succeeded)
        .map(|r| r.image)
}
