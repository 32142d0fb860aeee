//! Start-up reconciliation: deployments the journal still shows IN_PROGRESS were cut off by a
//! stop of the receiver. Each is finished when its new container is running and healthy, and
//! rolled back otherwise, so that the name ends with exactly one container (never two, never none
//! when there was one before).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::container::{ListContainersOptions, RenameContainerOptions};
use bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use bollard::system::EventsOptions;
use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus, Stage, StageOutcome};
use deploy_protocol::{ErrorCode, ErrorDetail};
use futures::StreamExt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::replace::STOP_TIMEOUT_SECS;
use super::{find_container, remove_container, Deployment, LABEL_DEPLOYMENT_ID};
use crate::docker::map_err;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// How long a container may still be stopping for a receiver that is gone: Docker carries out a
/// stop whose caller went away, with the timeout that caller gave.
const STOPPING: Duration = Duration::from_secs(STOP_TIMEOUT_SECS.unsigned_abs() + 5);
/// How often a stopping container is looked at.
const STOPPING_POLL: Duration = Duration::from_millis(200);
/// How long listing past events may take.
const EVENTS_TIMEOUT: Duration = Duration::from_secs(10);

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
    for id in leftovers {
        let Some(record) = state.journal().get(id)? else {
            continue;
        };
        if record.status != DeploymentStatus::InProgress {
            continue;
        }
        let _turn = state.container_lock(&record.container_name).await;
        let record = reconcile_one(state, &docker, record).await?;
        tracing::warn!(deployment_id = %record.deployment_id, container = %record.container_name, status = ?record.status, "reconciled a deployment interrupted by a stop of the receiver");
        settled += 1;
    }
    Ok(settled)
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

async fn reconcile_one(
    state: &AppState,
    docker: &Docker,
    record: DeploymentRecord,
) -> Result<DeploymentRecord> {
    let name = record.container_name.clone();
    let new = new_container(docker, &record).await?;
    let previous = match &record.previous_container_id {
        Some(id) => find_container(docker, id).await?,
        None => None,
    };
    let previous_existed = record.previous_container_id.is_some();
    // A deployment of this run that lost Docker mid-rollback already carries that error.
    let lost_docker = record.error.clone();
    let started = Instant::now();
    let mut d = Deployment::resume(state, record);

    let mut notes = Vec::new();
    if let Some(new) = &new {
        let new_id = new.id.clone().unwrap_or_default();
        // Healthy: finish. Previous already removed: cleanup had begun after the health check
        // passed, and removing the new one would leave nothing.
        if is_healthy(new) || (previous_existed && previous.is_none()) {
            notes.push(
                match lost_docker {
                    Some(_) => "Docker answered again and the new container was healthy",
                    None => {
                        "the receiver stopped during this deployment; the new container was healthy"
                    }
                }
                .to_owned(),
            );
            if let Some(p) = &previous {
                let pid = p.id.clone().unwrap_or_default();
                remove_container(docker, &pid).await?;
                notes.push(format!(
                    "removed the previous container {}",
                    super::short(&pid)
                ));
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
            d.stage(
                Stage::Cleanup,
                StageOutcome::Ok,
                started.elapsed(),
                Some(notes.join("; ")),
            );
            return Ok(d.finish(DeploymentStatus::Succeeded, None).await);
        }
        remove_container(docker, &new_id).await?;
        notes.push(format!(
            "removed the new container {}, not healthy yet",
            super::short(&new_id)
        ));
    }
    match &previous {
        Some(p) => {
            let pid = p.id.clone().unwrap_or_default();
            if p.name.as_deref() != Some(format!("/{name}").as_str()) {
                docker
                    .rename_container(&pid, RenameContainerOptions { name: name.clone() })
                    .await
                    .map_err(|e| map_err(e, ReceiverError::DeployFailed))?;
            }
            if !keeps_running(docker, p, &d.record().started_at).await? {
                docker
                    .start_container::<String>(&pid, None)
                    .await
                    .map_err(|e| map_err(e, ReceiverError::DeployFailed))?;
            }
            notes.push(format!(
                "restored the previous container {} as {name}",
                super::short(&pid)
            ));
        }
        None if previous_existed => notes.push(format!(
            "the previous container {} no longer exists",
            super::short(
                d.record()
                    .previous_container_id
                    .as_deref()
                    .unwrap_or_default()
            )
        )),
        None if new.is_none() => notes.push("no container had been changed yet".into()),
        None => notes.push("there was no previous container to restore".into()),
    }
    let detail = notes.join("; ");
    d.stage(
        Stage::Rollback,
        StageOutcome::Ok,
        started.elapsed(),
        Some(detail.clone()),
    );
    let status = if previous.is_some() {
        state.metrics().rollback();
        DeploymentStatus::RolledBack
    } else {
        DeploymentStatus::Failed
    };
    let error = match lost_docker {
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

/// Whether the previous container `c` will still run once a stop that the interrupted deployment
/// may have asked for is over. Docker finishes a stop whose caller died, so a running container
/// may be within its stop timeout and about to exit. Docker's events tell: a stop begins with a
/// `kill` event (the stop signal), which a `die` or a later `start` would follow. When a `kill`
/// is the container's last such event since the deployment began, the container is watched until
/// it exits, at most the stop timeout and a margin.
async fn keeps_running(
    docker: &Docker,
    c: &ContainerInspectResponse,
    deployment_started: &str,
) -> Result<bool> {
    if !is_running(c) {
        return Ok(false);
    }
    let id = c.id.as_deref().unwrap_or_default();
    if last_event(docker, id, deployment_started).await?.as_deref() != Some("kill") {
        return Ok(true);
    }
    let deadline = Instant::now() + STOPPING;
    while Instant::now() < deadline {
        tokio::time::sleep(STOPPING_POLL).await;
        match find_container(docker, id).await? {
            Some(now) if is_running(&now) => {}
            _ => {
                tracing::info!(
                    container = id,
                    "the previous container finished a stop asked for before the interruption"
                );
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The last `kill`, `die` or `start` event of container `id` since a minute before `since` (an
/// RFC 3339 time; the margin is for the engine's clock), up to now.
async fn last_event(docker: &Docker, id: &str, since: &str) -> Result<Option<String>> {
    let timestamp = |t: OffsetDateTime| format!("{}.{:09}", t.unix_timestamp(), t.nanosecond());
    let since = OffsetDateTime::parse(since, &Rfc3339).unwrap_or(OffsetDateTime::UNIX_EPOCH)
        - Duration::from_secs(60);
    let options = EventsOptions {
        since: Some(timestamp(since)),
        until: Some(timestamp(OffsetDateTime::now_utc())),
        filters: HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("container".to_owned(), vec![id.to_owned()]),
            (
                "event".to_owned(),
                vec!["kill".to_owned(), "die".to_owned(), "start".to_owned()],
            ),
        ]),
    };
    let events: Vec<_> =
        tokio::time::timeout(EVENTS_TIMEOUT, docker.events(Some(options)).collect())
            .await
            .map_err(|_| {
                ReceiverError::DockerUnavailable(format!(
                    "Docker did not list the events of container {id} within {} s",
                    EVENTS_TIMEOUT.as_secs()
                ))
            })?;
    let mut last = None;
    for event in events {
        let event = event.map_err(|e| map_err(e, ReceiverError::Internal))?;
        last = event.action.or(last);
    }
    Ok(last)
}

fn is_running(c: &ContainerInspectResponse) -> bool {
    let state = c.state.as_ref();
    state.and_then(|s| s.running).unwrap_or(false)
        && !state.and_then(|s| s.restarting).unwrap_or(false)
}

fn is_healthy(c: &ContainerInspectResponse) -> bool {
    let health = c
        .state
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status);
    is_running(c) && health == Some(HealthStatusEnum::HEALTHY)
}
