//! The rollout against real receivers: a host is deployed to through
//! [`deploy_package`](crate::deploy::deploy_package), the one function that sends a release to
//! one receiver, and rolled back with the receiver's signed `POST /deployments/{id}/rollback`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deploy_protocol::api::{DeploymentList, DeploymentStatus, RollbackResponse};
use deploy_protocol::envelope::{self, HEADER_CORRELATION_ID};
use deploy_protocol::{Checksum, DeploymentSpec, ErrorBody, ErrorCode, SignatureHeaders};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::report::{HostError, RolloutReport};
use super::run::{run, Moved, NotMoved, RolloutEvent, RolloutOptions};
use crate::deploy::deploy_package;
use crate::error::error_chain;
use crate::progress::NoProgress;
use crate::store::PackageInfo;
use crate::upload::ReceiverTarget;
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
    client: &reqwest::Client,
    targets: &[ReceiverTarget],
    release: &Release,
    options: &RolloutOptions,
    abort: CancellationToken,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> Result<RolloutReport, SenderError> {
    let hosts: Vec<String> = targets.iter().map(|t| t.base_url.to_string()).collect();
    let name = release.spec.container_name.as_str();
    let deploy = |i: usize| async move {
        let target = &targets[i];
        let before = running_image(client, target, name).await;
        match deploy_package(
            client,
            target,
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
        roll_back(
            client,
            &targets[i],
            deployment,
            release.correlation_id.as_deref(),
        )
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
pub async fn running_image(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    name: &str,
) -> Option<String> {
    let (status, body) = signed(
        client,
        target,
        reqwest::Method::GET,
        "/deployments",
        Some("limit=1000"),
        None,
        Some(QUERY_TIMEOUT),
    )
    .await
    .ok()?;
    if status != 200 {
        return None;
    }
    let list: DeploymentList = serde_json::from_slice(&body).ok()?;
    list.deployments
        .into_iter()
        .find(|r| r.container_name == name && r.status == DeploymentStatus::Succeeded)
        .map(|r| r.image)
}

/// `POST /deployments/{id}/rollback` on `target`.
pub async fn roll_back(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    deployment: Uuid,
    correlation_id: Option<&str>,
) -> Result<RollbackResponse, SenderError> {
    let path = format!("/deployments/{deployment}/rollback");
    let (status, body) = signed(
        client,
        target,
        reqwest::Method::POST,
        &path,
        None,
        correlation_id,
        None,
    )
    .await?;
    if status == 200 {
        return serde_json::from_slice(&body).map_err(|e| {
            SenderError::TransferFailed(format!(
                "{} answered a rollback without a rollback answer ({e}): is it a deploy-receiver that can roll back?",
                target.base_url
            ))
        });
    }
    // A re-run that failed answers its record, whose error carries the code.
    if let Ok(record) = serde_json::from_slice::<deploy_protocol::api::DeploymentRecord>(&body) {
        if record.error.is_some() {
            return Err(SenderError::Deployment(Box::new(record)));
        }
    }
    Err(match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(ErrorBody { error }) => SenderError::Remote {
            status,
            code: error.code,
            message: error.message,
        },
        Err(_) => SenderError::Remote {
            status,
            code: ErrorCode::TransferFailed,
            message: format!(
                "{} answered {status}: {}",
                target.base_url,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ),
        },
    })
}

/// A signed request with an empty body to `path` below the receiver's base URL.
async fn signed(
    client: &reqwest::Client,
    target: &ReceiverTarget,
    method: reqwest::Method,
    path: &str,
    query: Option<&str>,
    correlation_id: Option<&str>,
    timeout: Option<Duration>,
) -> Result<(u16, bytes::Bytes), SenderError> {
    let mut url = target.base_url.clone();
    url.set_path(&format!(
        "{}{path}",
        target.base_url.path().trim_end_matches('/')
    ));
    url.set_query(query);
    let signed_path = match query {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let headers = SignatureHeaders::sign(
        &target.key_id,
        &target.secret,
        method.as_str(),
        &signed_path,
        &Checksum::of(b""),
        unix_now(),
        envelope::new_nonce(),
    );
    let mut request = client.request(method, url.clone());
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    if let Some(id) = correlation_id {
        request = request.header(HEADER_CORRELATION_ID, id);
    }
    for (name, value) in headers.to_pairs() {
        request = request.header(name, value);
    }
    let unreachable = |e: reqwest::Error| SenderError::RemoteUnreachable {
        url: url.to_string(),
        detail: error_chain(&e),
    };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(unreachable)?;
    Ok((status, body))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
