//! Fleet rollouts as a service resource: a stored package rolled out to several receivers in the
//! background ([`crate::pipeline::rollout`]), its report kept for `GET`, followed as server-sent events,
//! stoppable (`DELETE`: stop and roll back), and told as ROLLOUT_* lifecycle events. Each
//! rollout's record is kept in the state directory: a restarted service shows the rollouts of
//! earlier runs, those it was running then as INTERRUPTED, which `DELETE` undoes.

mod records;

pub use records::Rollouts;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use deploy_protocol::DeploymentSpec;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::serde_defaults::yes;
use crate::client::{ReceiverClient, ReceiverTarget};
use crate::pipeline::rollout::{
    roll_out, rollout_correlation_id, undo_on_receivers, BatchSize, HostError, Payload, Plan,
    Release, RolloutEvent, RolloutOptions, RolloutRecorder, RolloutReport, RolloutStatus,
    MAX_HOST_TIMEOUT_SECS,
};
use crate::pipeline::{
    now_rfc3339, prepare_image, CompressionOptions, NoProgress, PackageHold, PackageInfo, Subject,
};
use crate::service::error::correlation_id;
use crate::service::jobs::panic_message;
use crate::service::state::AppState;
use crate::SenderError;
use records::Entry;

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
    /// Longest wait for one host's deployment, seconds (default 600, at most 86400); its
    /// receiver is then asked for up to 60 s more whether it finished the deployment anyway.
    #[serde(default)]
    pub host_timeout_secs: Option<u64>,
    /// Send and load the release on every host after the first step while that step is deployed
    /// and checked, so that later steps only switch containers (default false). Hosts a stopped
    /// rollout did not reach may then hold the new image, never a container of it.
    #[serde(default)]
    pub preload: bool,
}

/// A host's deadline when the request names none, seconds.
fn default_host_timeout_secs() -> u64 {
    600
}

/// A rollout as the service shows it. Kept in the state directory (`rollouts/<id>.json`), so a
/// restarted service still shows it; one that was running then is INTERRUPTED.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// The rollout's id.
    pub rollout_id: Uuid,
    /// The package rolled out.
    pub package_id: Uuid,
    /// The container name on every host.
    pub container_name: String,
    /// Sent with every request to the receivers: their deployment records carry it.
    pub correlation_id: String,
    /// When it was started (RFC 3339).
    pub started_at: String,
    /// Whether a stopped rollout rolls back the hosts it moved (the request's `rollback`; an
    /// INTERRUPTED one's `DELETE` then only looks its hosts up).
    #[serde(default = "yes")]
    pub rollback: bool,
    /// Longest wait for one host's deployment, seconds (the request's `host_timeout_secs`, or
    /// its default).
    #[serde(default = "default_host_timeout_secs")]
    pub host_timeout_secs: u64,
    /// True once `DELETE` asked it to stop (or, INTERRUPTED, to be undone).
    pub abort_requested: bool,
    /// Hosts, outcomes, and where the fleet stands.
    pub report: RolloutReport,
}

/// The events' subject of a rollout.
fn subject_of(view: &RolloutView) -> Subject {
    Subject {
        package_id: Some(view.package_id),
        correlation_id: Some(view.correlation_id.clone()),
        container_name: Some(view.container_name.clone()),
        image_tag: None,
    }
}

/// Undoes an INTERRUPTED rollout: each host left IN_PROGRESS is looked up on its receiver (its
/// deployment of this rollout, waited for while it runs), then every host on the new release is
/// rolled back at once, as a stopped rollout's are; told as ROLLOUT_ROLLED_BACK or _FAILED.
async fn undo_interrupted_rollout(state: AppState, entry: Arc<Entry>) {
    let view = entry.view.borrow().clone();
    let receiver = &state.config().receiver;
    let secret = receiver.secret.as_deref().unwrap_or_default();
    let clients: Vec<Result<ReceiverClient, HostError>> = view
        .report
        .hosts
        .iter()
        .map(|h| {
            ReceiverTarget::new(&h.host, &receiver.key_id, secret.as_bytes())
                .map(|target| receiver.client_for(state.http().clone(), target))
                .map_err(|e| HostError {
                    code: e.code(),
                    message: e.to_string(),
                })
        })
        .collect();
    let name = view.container_name.as_str();
    let correlation_id = view.correlation_id.as_str();
    let recorder =
        RolloutRecorder::spawn(state.events().clone(), subject_of(&view), view.rollout_id);
    let on_event = |event: RolloutEvent| {
        recorder.observe(&event);
        state.rollouts().publish(&entry, event.into_report());
    };
    undo_on_receivers(
        view.report.clone(),
        &clients,
        name,
        correlation_id,
        (
            view.rollback,
            Duration::from_secs(view.host_timeout_secs),
            RolloutOptions::default().rollback_timeout,
        ),
        &on_event,
    )
    .await;
    recorder.finish().await;
}

/// Checks `input` and starts the rollout in the background; answers its first view.
pub async fn start(state: &AppState, input: RolloutInput) -> Result<RolloutView, SenderError> {
    let package = state.store().get(input.package_id).await?;
    let hold = PackageHold::new(&package)?;
    let batch = match input.batch.as_deref() {
        Some(b) => b.parse::<BatchSize>().map_err(SenderError::Validation)?,
        None => BatchSize::default(),
    };
    let host_timeout_secs = input
        .host_timeout_secs
        .unwrap_or_else(default_host_timeout_secs)
        .max(1);
    if host_timeout_secs > MAX_HOST_TIMEOUT_SECS {
        return Err(SenderError::Validation(format!(
            "host_timeout_secs {host_timeout_secs} is more than {MAX_HOST_TIMEOUT_SECS} (a day)"
        )));
    }
    let options = RolloutOptions {
        canary: input.canary,
        batch,
        max_failures: input.max_failures,
        rollback: input.rollback,
        host_timeout: Duration::from_secs(host_timeout_secs),
        max_concurrent: state.config().max_concurrent_transfers.max(1),
        slots: Some(std::sync::Arc::clone(state.transfer_slots())),
        preload: input.preload,
        ..RolloutOptions::default()
    };
    let plan = Plan::new(input.receivers.len(), options.canary, options.batch)
        .map_err(SenderError::Validation)?;
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = input
        .receivers
        .iter()
        .find(|url| !seen.insert(crate::pipeline::rollout::same_receiver(url)))
    {
        return Err(SenderError::Validation(format!(
            "receivers: {twice} is named twice (one rollout deploys to a receiver once)"
        )));
    }
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
    // Unique to the rollout (a client may send the same X-Correlation-Id again): the receivers'
    // records of its deployments carry it, which is how an interrupted rollout finds them.
    let correlation_id = rollout_correlation_id(correlation_id().as_deref(), id);
    let release = Release {
        payload: Payload::Package(Box::new(package.clone())),
        spec: input.deployment,
        correlation_id: Some(correlation_id.clone()),
    };
    let entry = Arc::new(Entry::new(RolloutView {
        rollout_id: id,
        package_id: package.package_id,
        container_name: release.spec.container_name.clone(),
        correlation_id: correlation_id.clone(),
        started_at: now_rfc3339(),
        rollback: options.rollback,
        host_timeout_secs,
        abort_requested: false,
        report: RolloutReport::planned(&input.receivers, &plan),
    }));
    state.rollouts().insert(&entry);
    state.rollouts().keep(&entry);
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
        // The whole package may be sent to any host, batch after batch: kept from retention
        // and `DELETE` until the rollout ends.
        let _hold = hold;
        let release = Release {
            payload: payload(&state, package).await,
            ..release
        };
        let on_event = |event: RolloutEvent| {
            recorder.observe(&event);
            state.rollouts().publish(&entry, event.into_report());
        };
        let run = roll_out(&targets, &release, &options, entry.abort.clone(), &on_event);
        // A panic stops the rollout as a stopped service would: INTERRUPTED, which DELETE
        // undoes, rather than RUNNING for good.
        let result = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(result) => result.map_err(|e| (RolloutStatus::Failed, e.to_string())),
            Err(panic) => {
                let what = panic_message(panic.as_ref());
                tracing::error!(rollout_id = %id, panic = %what, "a rollout panicked");
                Err((
                    RolloutStatus::Interrupted,
                    format!(
                        "the rollout stopped unexpectedly ({what}): DELETE /api/v1/rollouts/{id} \
                         looks its hosts up and rolls back those it moved"
                    ),
                ))
            }
        };
        if let Err((status, reason)) = result {
            tracing::error!(rollout_id = %id, %reason, "rollout could not run");
            let mut report = entry.view.borrow().report.clone();
            report.status = status;
            report.reason = Some(reason);
            recorder.observe(&RolloutEvent::Finished {
                report: report.clone(),
            });
            state.rollouts().publish(&entry, report);
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
    let Ok(_slot) = state.package_slot(&NoProgress).await else {
        return Payload::Package(Box::new(package));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::rollout::is_rollouts_own;

    #[test]
    fn a_rollouts_correlation_id_is_its_own_and_fits() {
        let id = Uuid::from_u128(7);
        assert_eq!(
            rollout_correlation_id(Some("ci-42"), id),
            format!("ci-42.rollout-{id}")
        );
        assert_eq!(rollout_correlation_id(None, id), format!("rollout-{id}"));
        let long = "x".repeat(128);
        let made = rollout_correlation_id(Some(&long), id);
        assert!(made.ends_with(&format!(".rollout-{id}")), "{made}");
        assert!(is_rollouts_own(&made));
        assert!(is_rollouts_own(&rollout_correlation_id(None, id)));
        assert!(!is_rollouts_own("ci-42"));
        assert!(!is_rollouts_own("rollout-e2e-fleet"));
        assert!(
            deploy_protocol::envelope::is_valid_correlation_id(&made),
            "{made}"
        );
        // What a receiver would refuse (and replace) is left out.
        let spaced = rollout_correlation_id(Some("Build 42 \u{e9}\t"), id);
        assert_eq!(spaced, format!("Build42.rollout-{id}"));
        assert_eq!(
            rollout_correlation_id(Some(" \u{e9} "), id),
            format!("rollout-{id}")
        );
    }
}
