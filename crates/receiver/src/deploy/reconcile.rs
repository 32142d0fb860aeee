//! Start-up reconciliation: deployments the journal still shows IN_PROGRESS were cut off by a
//! stop of the receiver. Each is finished when its new container is running and healthy, and
//! rolled back otherwise, so that the name ends with exactly one container (never two, never none
//! when there was one before).

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::{ListContainersOptions, RenameContainerOptions};
use bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus, Stage, StageOutcome};
use deploy_protocol::{ErrorCode, ErrorDetail};
use uuid::Uuid;

use deploy_protocol::display::short;

use super::containers::{find_container, is_running, remove_container};
use super::{stopping, Deployment, LABEL_DEPLOYMENT_ID};
use crate::docker::map_err;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Reconciles the deployments left over from before this start, retrying (with backoff, up to a
/// minute apart) while Docker is unreachable. Meant to be spawned when the receiver starts serving.
pub async fn run(state: AppState) {
    let mut delay = Duration::from_secs(2);
    loop {
        match reconcile_all(&state).await {
            Ok(0) => return,
            Ok(n) => {
                tracing::info!(
                    reconciled = n,
                    "finished deployments interrupted by the last stop"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_secs = delay.as_secs(), "cannot reconcile interrupted deployments yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Reconciles every leftover IN_PROGRESS deployment; returns how many were settled.
pub async fn reconcile_all(state: &AppState) -> Result<usize> {
    let leftovers = state.journal().leftovers();
    if leftovers.is_empty() {
        return Ok(0);
    }
    let docker = state.docker().client().await?;
    let mut settled = 0;
    let mut first_error = None;
    for id in leftovers {
        let Some(record) = state.journal().get(id)? else {
            continue;
        };
        if record.status != DeploymentStatus::InProgress {
            continue;
        }
        let _turn = state.container_lock(&record.container_name).await;
        // Read again under the name's lock: a deployment of the name may have settled it meanwhile.
        let record = match state.journal().get(id)? {
            Some(record) if record.status == DeploymentStatus::InProgress => record,
            _ => continue,
        };
        // One that cannot be settled yet does not hold up the others; the pass is retried.
        match reconcile_one(state, &docker, record).await {
            Ok(record) => {
                tracing::warn!(deployment_id = %record.deployment_id, container = %record.container_name, status = ?record.status, "reconciled a deployment interrupted by a stop of the receiver");
                settled += 1;
            }
            Err(e) => {
                tracing::warn!(deployment_id = %id, error = %e, "cannot reconcile this interrupted deployment yet");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(settled),
    }
}

/// Settles the leftover deployments of container `name`; the caller holds the name's lock.
pub(super) async fn settle(state: &AppState, docker: &Docker, name: &str) -> Result<()> {
    for id in state.journal().leftovers() {
        let Some(record) = state.journal().get(id)? else {
            continue;
        };
        if record.status == DeploymentStatus::InProgress && record.container_name == name {
            reconcile_one(state, docker, record).await?;
        }
    }
    Ok(())
}

/// Settles deployment `id` of this run, which its request left half done when Docker went away
/// (see [`super::replace`]), once Docker answers again: retried with backoff, 1 s doubling up to
/// a minute apart. The next deployment of the same name settles it first too.
pub(super) fn settle_later(state: AppState, id: Uuid) {
    state.journal().leave(id);
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        loop {
            tokio::time::sleep(delay).await;
            match settle_id(&state, id).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(deployment_id = %id, error = %e, retry_in_secs = delay.as_secs(), "cannot settle a deployment that lost Docker yet");
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    });
}

async fn settle_id(state: &AppState, id: Uuid) -> Result<()> {
    let Some(record) = state.journal().get(id)? else {
        return Ok(());
    };
    let docker = state.docker().client().await?;
    let _turn = state.container_lock(&record.container_name).await;
    match state.journal().get(id)? {
        Some(record) if record.status == DeploymentStatus::InProgress => {
            let record = reconcile_one(state, &docker, record).await?;
            tracing::warn!(deployment_id = %id, container = %record.container_name, status = ?record.status, "settled a deployment that had lost Docker");
            Ok(())
        }
        // Settled meanwhile, by the next deployment of the name.
        _ => Ok(()),
    }
}

/// Settles one interrupted deployment: forward when its new container was healthy (or cleanup had
/// begun), otherwise back to the previous container.
async fn reconcile_one(
    state: &AppState,
    docker: &Docker,
    record: DeploymentRecord,
) -> Result<DeploymentRecord> {
    let new = new_container(docker, &record).await?;
    let previous = match &record.previous_container_id {
        Some(id) => find_container(docker, id).await?,
        None => None,
    };
    let previous_existed = record.previous_container_id.is_some();
    let judged_failed = failed_before(&record);
    let d = Deployment::resume(state, record);
    match new {
        // Healthy: finish. Previous already removed: cleanup had begun after the health check
        // passed, and removing the new one would leave nothing. Never when the deployment had
        // already failed: Docker may call a container healthy that the deployment's own check
        // judged unhealthy, and the rollback it began is finished instead.
        Some(new)
            if !judged_failed && (is_healthy(&new) || (previous_existed && previous.is_none())) =>
        {
            finish_forward(d, docker, &new, previous.as_ref()).await
        }
        new => roll_back(d, docker, new.as_ref(), previous.as_ref()).await,
    }
}

/// Whether the deployment had failed before it was cut off: an error recorded (a rollback that
/// lost Docker), a failed start or health check, or a rollback begun. (A failed cleanup comes
/// after the health check passed: that deployment goes forward.)
fn failed_before(record: &DeploymentRecord) -> bool {
    record.error.is_some()
        || record.stages.iter().any(|s| {
            s.stage == Stage::Rollback
                || (s.outcome == StageOutcome::Failed
                    && matches!(s.stage, Stage::Start | Stage::Health))
        })
}

/// Keeps the new container: the previous one goes, the new one runs, the deployment succeeded.
async fn finish_forward(
    mut d: Deployment,
    docker: &Docker,
    new: &ContainerInspectResponse,
    previous: Option<&ContainerInspectResponse>,
) -> Result<DeploymentRecord> {
    let timed = Deployment::time(Stage::Cleanup);
    let new_id = new.id.clone().unwrap_or_default();
    let mut notes = vec![
        "the receiver stopped during this deployment; the new container was healthy".to_owned(),
    ];
    if let Some(p) = previous {
        let pid = p.id.clone().unwrap_or_default();
        remove_container(docker, &pid).await?;
        notes.push(format!("removed the previous container {}", short(&pid)));
    }
    if !is_running(new) {
        docker
            .start_container::<String>(&new_id, None)
            .await
            .map_err(|e| map_err(e, ReceiverError::DeployFailed))?;
        notes.push("started the new container again".into());
    }
    d.record.container_id = Some(new_id);
    d.record.error = None;
    timed.ok(&mut d, notes.join("; "));
    Ok(d.finish(DeploymentStatus::Succeeded, None).await)
}

/// Undoes the deployment: the new container (if any) goes, the previous one (if any) comes back
/// under the name, running if it was.
async fn roll_back(
    mut d: Deployment,
    docker: &Docker,
    new: Option<&ContainerInspectResponse>,
    previous: Option<&ContainerInspectResponse>,
) -> Result<DeploymentRecord> {
    let timed = Deployment::time(Stage::Rollback);
    let name = d.record().container_name.clone();
    let mut notes = Vec::new();
    if let Some(new) = new {
        let new_id = new.id.clone().unwrap_or_default();
        remove_container(docker, &new_id).await?;
        notes.push(format!(
            "removed the new container {}, not healthy yet",
            short(&new_id)
        ));
    }
    let previous_id = d.record().previous_container_id.clone();
    match (previous, &previous_id) {
        (Some(p), _) => {
            let pid = p.id.clone().unwrap_or_default();
            if p.name.as_deref() != Some(format!("/{name}").as_str()) {
                docker
                    .rename_container(&pid, RenameContainerOptions { name: name.clone() })
                    .await
                    .map_err(|e| map_err(e, ReceiverError::DeployFailed))?;
            }
            let started_at = d.record().started_at.clone();
            if stopped_before(p, &started_at) {
                notes.push(format!(
                    "restored the previous container {} as {name}, stopped as it was before \
                     this deployment",
                    short(&pid)
                ));
            } else {
                if !stopping::keeps_running(docker, p, &started_at).await? {
                    docker
                        .start_container::<String>(&pid, None)
                        .await
                        .map_err(|e| map_err(e, ReceiverError::DeployFailed))?;
                }
                notes.push(format!(
                    "restored the previous container {} as {name}",
                    short(&pid)
                ));
            }
        }
        (None, Some(gone)) => notes.push(format!(
            "the previous container {} no longer exists",
            short(gone)
        )),
        (None, None) if new.is_none() => notes.push("no container had been changed yet".into()),
        (None, None) => notes.push("there was no previous container to restore".into()),
    }
    let detail = notes.join("; ");
    timed.ok(&mut d, detail.clone());
    let status = if previous.is_some() {
        d.state().metrics().rollback();
        DeploymentStatus::RolledBack
    } else {
        DeploymentStatus::Failed
    };
    // A deployment of this run that lost Docker mid-rollback already carries that error.
    let error = match d.record().error.clone() {
        Some(e) => ErrorDetail {
            message: format!("{}; once Docker answered again: {detail}", e.message),
            ..e
        },
        None => ErrorDetail {
            code: ErrorCode::DeployFailed,
            message: format!("the receiver stopped before this deployment finished: {detail}"),
            correlation_id: d.record().correlation_id.clone(),
        },
    };
    Ok(d.finish_with(status, Some(error)).await)
}

/// The container this deployment created, found by its label (its id may not have been
/// journaled before the stop).
async fn new_container(
    docker: &Docker,
    record: &DeploymentRecord,
) -> Result<Option<ContainerInspectResponse>> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_DEPLOYMENT_ID}={}", record.deployment_id)],
    )]);
    let listed = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters,
            ..Default::default()
        }))
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))?;
    match listed.into_iter().find_map(|c| c.id) {
        Some(id) => find_container(docker, &id).await,
        None => Ok(None),
    }
}

/// Whether container `c` is not running and had already stopped before `deployment_started` (an
/// RFC 3339 time): the deployment found it stopped, and its rollback leaves it so. (One that
/// stopped after that was stopped by the deployment, or died meanwhile: it was running.)
fn stopped_before(c: &ContainerInspectResponse, deployment_started: &str) -> bool {
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;
    if is_running(c) {
        return false;
    }
    let finished = c
        .state
        .as_ref()
        .and_then(|s| s.finished_at.as_deref())
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
    let started = OffsetDateTime::parse(deployment_started, &Rfc3339).ok();
    match (finished, started) {
        // Docker's zero time (never started) is before any deployment too.
        (Some(finished), Some(started)) => finished < started,
        _ => false,
    }
}

fn is_healthy(c: &ContainerInspectResponse) -> bool {
    let health = c
        .state
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status);
    is_running(c) && health == Some(HealthStatusEnum::HEALTHY)
}
