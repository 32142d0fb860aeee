//! Fleet rollouts as a service resource: a stored package rolled out to several receivers in the
//! background ([`crate::pipeline::rollout`]), its report kept for `GET`, followed as server-sent events,
//! stoppable (`DELETE`: stop and roll back), and told as ROLLOUT_* lifecycle events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deploy_protocol::DeploymentSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::serde_defaults::yes;
use crate::client::ReceiverTarget;
use crate::pipeline::rollout::{
    roll_out, BatchSize, Payload, Plan, Release, RolloutEvent, RolloutOptions, RolloutRecorder,
    RolloutReport, RolloutStatus,
};
use crate::pipeline::{prepare_image, CompressionOptions, NoProgress, PackageInfo, Subject};
use crate::service::error::correlation_id;
use crate::service::state::AppState;
use crate::SenderError;

/// `POST /api/v1/rollouts`: roll a stored package out to several receivers.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutInput {
    /// The stored package.
    pub package_id: Uuid,
    /// Receiver base URLs, in rollout order (the first `canary` are the canary).
    pub receivers: Vec<String>,
    /// What each receiver runs (`image` defaults to the package's first tag).
    pub deployment: DeploymentSpec,
    /// Canary hosts (default: 1 with 3 hosts or more, else 0).
    #[serde(default)]
    pub canary: Option<usize>,
    /// Hosts per batch after the canary: `"2"` or `"25%"` (the default).
    #[serde(default)]
    pub batch: Option<String>,
    /// Failed hosts tolerated (default 0; a failed canary always stops the rollout).
    #[serde(default)]
    pub max_failures: usize,
    /// Roll back the hosts a stopped rollout moved (default true).
    #[serde(default = "yes")]
    pub rollback: bool,
    /// Longest wait for one host's deployment, seconds (default 600).
    #[serde(default)]
    pub host_timeout_secs: Option<u64>,
    /// Send and load the release on every host after the first step while that step is deployed
    /// and checked, so that later steps only switch containers (default false). Hosts a stopped
    /// rollout did not reach may then hold the new image, never a container of it.
    #[serde(default)]
    pub preload: bool,
}

/// A rollout as the service shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// The rollout's id.
    pub rollout_id: Uuid,
    /// The package rolled out.
    pub package_id: Uuid,
    /// The container name on every host.
    pub container_name: String,
    /// True once `DELETE` asked it to stop.
    pub abort_requested: bool,
    /// Hosts, outcomes, and where the fleet stands.
    pub report: RolloutReport,
}

struct Entry {
    view: watch::Sender<RolloutView>,
    abort: CancellationToken,
}

/// The rollouts of this service run.
#[derive(Clone, Default)]
pub struct Rollouts(Arc<Mutex<HashMap<Uuid, Arc<Entry>>>>);

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

impl Rollouts {
    fn get(&self, id: Uuid) -> Result<Arc<Entry>, SenderError> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
            .ok_or_else(|| SenderError::NotFound(format!("no rollout {id} in this service run")))
    }

    /// The rollout's view, followed.
    pub fn watch(&self, id: Uuid) -> Result<watch::Receiver<RolloutView>, SenderError> {
        Ok(self.get(id)?.view.subscribe())
    }

    /// Asks the rollout to stop and roll back; CONFLICT when it has already finished.
    pub fn abort(&self, id: Uuid) -> Result<RolloutView, SenderError> {
        let entry = self.get(id)?;
        if entry.view.borrow().report.status != RolloutStatus::Running {
            return Err(SenderError::Conflict(format!(
                "rollout {id} has already finished"
            )));
        }
        entry.abort.cancel();
        entry.view.send_modify(|v| v.abort_requested = true);
        let view = entry.view.borrow().clone();
        Ok(view)
    }
}

/// Checks `input` and starts the rollout in the background; answers its first view.
pub async fn start(state: &AppState, input: RolloutInput) -> Result<RolloutView, SenderError> {
    let package = state.store().get(input.package_id).await?;
    let batch = match input.batch.as_deref() {
        Some(b) => b.parse::<BatchSize>().map_err(SenderError::Validation)?,
        None => BatchSize::default(),
    };
    let options = RolloutOptions {
        canary: input.canary,
        batch,
        max_failures: input.max_failures,
        rollback: input.rollback,
        host_timeout: Duration::from_secs(input.host_timeout_secs.unwrap_or(600).max(1)),
        max_concurrent: state.config().max_concurrent_transfers.max(1),
        slots: Some(std::sync::Arc::clone(state.transfer_slots())),
        preload: input.preload,
        ..RolloutOptions::default()
    };
    let plan = Plan::new(input.receivers.len(), options.canary, options.batch)
        .map_err(SenderError::Validation)?;
    let receiver = &state.config().receiver;
    let secret = receiver.secret.as_deref().unwrap_or_default();
    let targets = input
        .receivers
        .iter()
        .map(|url| {
            ReceiverTarget::new(url, &receiver.key_id, secret.as_bytes())
                .map(|target| receiver.client_for(state.http().clone(), target))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut check = input.deployment.clone();
    check.image = check.image.or_else(|| Some(package.image_id.clone()));
    check
        .validate()
        .map_err(|e| SenderError::Validation(format!("deployment: {e}")))?;

    let id = Uuid::new_v4();
    let correlation_id = correlation_id().unwrap_or_else(|| format!("rollout-{id}"));
    let release = Release {
        payload: Payload::Package(Box::new(package.clone())),
        spec: input.deployment,
        correlation_id: Some(correlation_id.clone()),
    };
    let (tx, _) = watch::channel(RolloutView {
        rollout_id: id,
        package_id: package.package_id,
        container_name: release.spec.container_name.clone(),
        abort_requested: false,
        report: RolloutReport::planned(&input.receivers, &plan),
    });
    let entry = Arc::new(Entry {
        view: tx,
        abort: CancellationToken::new(),
    });
    state
        .rollouts()
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, Arc::clone(&entry));
    let first = entry.view.borrow().clone();

    let subject = Subject {
        package_id: Some(package.package_id),
        correlation_id: Some(correlation_id),
        container_name: Some(release.spec.container_name.clone()),
        image_tag: package.image_tags.first().cloned(),
    };
    let recorder = RolloutRecorder::spawn(state.events().clone(), subject, id);
    let state = state.clone();
    tokio::spawn(async move {
        let release = Release {
            payload: payload(&state, package).await,
            ..release
        };
        let on_event = |event: RolloutEvent| {
            recorder.observe(&event);
            let report = match event {
                RolloutEvent::Started { report }
                | RolloutEvent::Host { report, .. }
                | RolloutEvent::StepCompleted { report, .. }
                | RolloutEvent::RollingBack { report, .. }
                | RolloutEvent::Finished { report } => report,
            };
            entry.view.send_modify(|v| v.report = report);
        };
        let result = roll_out(&targets, &release, &options, entry.abort.clone(), &on_event).await;
        if let Err(e) = result {
            tracing::error!(rollout_id = %id, error = %e, "rollout could not run");
            entry.view.send_modify(|v| {
                v.report.status = RolloutStatus::Failed;
                v.report.reason = Some(e.to_string());
            });
        }
        recorder.finish().await;
    });
    Ok(first)
}

/// The package's image as layers prepared in the layer cache (each host then receives only the
/// blobs it lacks), or the whole package when its image is no longer in the local engine (or
/// cannot be prepared).
async fn payload(state: &AppState, package: PackageInfo) -> Payload {
    let docker = match state.docker().await {
        Ok(docker) => docker,
        Err(e) => {
            tracing::warn!(error = %e, "no Docker engine: the rollout sends the whole package");
            return Payload::Package(Box::new(package));
        }
    };
    let options = CompressionOptions {
        compression: package.compression,
        level: package.compression_level,
        zstd_workers: state
            .config()
            .zstd_workers
            .unwrap_or_else(crate::pipeline::default_zstd_workers),
    };
    match prepare_image(
        &docker,
        state.layer_cache(),
        &package.image_id,
        &options,
        Arc::new(NoProgress),
    )
    .await
    {
        Ok(mut image) => {
            image.tags = package.image_tags.clone();
            Payload::Layers(Arc::new(image))
        }
        Err(e) => {
            tracing::warn!(image = %package.image_id, error = %e, "cannot prepare the image's layers: the rollout sends the whole package");
            Payload::Package(Box::new(package))
        }
    }
}
