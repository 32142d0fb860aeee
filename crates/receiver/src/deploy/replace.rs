//! Replacing a container: set the old one aside, start the new one, health-check it, then clean
//! up or roll back.

use bollard::container::{
    CreateContainerOptions, ListContainersOptions, RenameContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus, Stage, StageOutcome};
use deploy_protocol::{DeploymentSpec, ErrorCode, ErrorDetail, HealthCheckSpec, PortProtocol};

use deploy_protocol::display::short;

use super::containers::{aside_name, container_named, remove_container, STOP_TIMEOUT_SECS};
use super::record::Timed;
use super::{health, policy, prune, reconcile, Deployment, LABEL_MANAGED};
use crate::docker::map_err;
use crate::error::{correlation_id, ReceiverError, Result};

/// The container that was running under the name, while it is set aside.
#[derive(Debug)]
struct Previous {
    id: String,
    was_running: bool,
    renamed: bool,
}

/// Replaces the container named in `spec` (if any) by a new one, health-checks it, and either
/// cleans up or rolls back. Never fails: the outcome is in the returned record. Called with the
/// name's lock held.
pub(super) async fn replace(
    mut d: Deployment,
    docker: &Docker,
    spec: &DeploymentSpec,
    image: &str,
) -> DeploymentRecord {
    let name = &spec.container_name;
    if let Err(e) = settle_first(&mut d, docker, name).await {
        return d.finish(DeploymentStatus::Failed, Some(&e)).await;
    }
    let mut previous = None;
    let new_id = match start(&mut d, docker, spec, image, &mut previous).await {
        Ok(id) => id,
        Err(e) => {
            let new_id = d.record.container_id.clone();
            return rollback(d, docker, name, new_id, previous, e).await;
        }
    };
    if let Err(e) = check_health(&mut d, docker, spec, &new_id).await {
        return rollback(d, docker, name, Some(new_id), previous, e).await;
    }
    clean_up(&mut d, docker, name, previous.as_ref()).await;
    d.finish(DeploymentStatus::Succeeded, None).await
}

/// A deployment of this name that a previous run left half done is settled first.
async fn settle_first(d: &mut Deployment, docker: &Docker, name: &str) -> Result<()> {
    let timed = Deployment::time(Stage::Start);
    let state = d.state().clone();
    reconcile::settle(&state, docker, name)
        .await
        .inspect_err(|e| {
            timed.failed(
                d,
                format!("an interrupted deployment of this name could not be settled first: {e}"),
            );
        })
}

/// The start phase: the old container set aside, the new one created and started.
async fn start(
    d: &mut Deployment,
    docker: &Docker,
    spec: &DeploymentSpec,
    image: &str,
    previous: &mut Option<Previous>,
) -> Result<String> {
    let timed = Deployment::time(Stage::Start);
    match start_new(d, docker, spec, image, previous).await {
        Ok(id) => {
            let detail = match previous {
                Some(p) => format!(
                    "started {} in place of {}, set aside as {}",
                    short(&id),
                    short(&p.id),
                    aside_name(&spec.container_name, &p.id)
                ),
                None => format!("started {}", short(&id)),
            };
            timed.ok(d, detail);
            Ok(id)
        }
        Err(e) => {
            timed.failed(d, &e);
            Err(e)
        }
    }
}

/// The health phase: waits for the new container to be healthy by the spec's check.
async fn check_health(
    d: &mut Deployment,
    docker: &Docker,
    spec: &DeploymentSpec,
    new_id: &str,
) -> Result<()> {
    let timed = Deployment::time(Stage::Health);
    match health::wait(docker, new_id, &health_spec(spec)).await {
        Ok(report) if report.healthy => {
            let output = report.output.unwrap_or_else(|| "healthy".into());
            timed.ok(d, format!("{} check: {output}", report.kind));
            Ok(())
        }
        Ok(report) => {
            let output = report.output.unwrap_or_else(|| "no output".into());
            timed.failed(d, format!("{} check: {output}", report.kind));
            Err(ReceiverError::HealthCheckFailed(format!(
                "container {} did not become healthy ({} check): {output}",
                spec.container_name, report.kind
            )))
        }
        Err(e) => {
            timed.failed(d, &e);
            Err(e)
        }
    }
}

/// The cleanup phase: the previous container, stale set-aside ones, and images and packages the
/// history no longer keeps are removed. Its failures are noted, never fatal.
async fn clean_up(d: &mut Deployment, docker: &Docker, name: &str, previous: Option<&Previous>) {
    let timed = Deployment::time(Stage::Cleanup);
    let mut notes = Vec::new();
    let mut outcome = StageOutcome::Ok;
    if let Some(p) = previous {
        match remove_container(docker, &p.id).await {
            Ok(()) => notes.push(format!("removed the previous container {}", short(&p.id))),
            Err(e) => {
                outcome = StageOutcome::Failed;
                notes.push(format!(
                    "could not remove the previous container {}: {e}",
                    short(&p.id)
                ));
            }
        }
    }
    match stale_asides(docker, name).await {
        Ok(stale) => {
            for id in stale {
                notes.push(match remove_container(docker, &id).await {
                    Ok(()) => format!("removed the stale set-aside container {}", short(&id)),
                    Err(e) => format!(
                        "could not remove the stale set-aside container {}: {e}",
                        short(&id)
                    ),
                });
            }
        }
        Err(e) => notes.push(format!("stale set-aside containers not checked: {e}")),
    }
    let state = d.state().clone();
    match prune::prune(&state, docker, name, d.record.deployment_id).await {
        Ok(pruned) => notes.extend(pruned.describe()),
        Err(e) => notes.push(format!("pruning skipped: {e}")),
    }
    timed.record(d, outcome, (!notes.is_empty()).then(|| notes.join("; ")));
}

/// Stopped containers (this receiver's) set aside for `name` by earlier deployments whose cleanup or rollback did
/// not finish; once a new container is healthy they are no longer needed.
async fn stale_asides(docker: &Docker, name: &str) -> Result<Vec<String>> {
    let prefix = format!("/{name}.previous-");
    let all = docker
        .list_containers(Some(ListContainersOptions::<String> {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))?;
    Ok(all
        .into_iter()
        .filter(|c| c.state.as_deref() != Some("running"))
        .filter(|c| c.names.iter().flatten().any(|n| n.starts_with(&prefix)))
        // Only ours: a container someone named like a set-aside one is not ours to remove.
        .filter(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(LABEL_MANAGED))
                .is_some_and(|v| v == "true")
        })
        .filter_map(|c| c.id)
        .collect())
}

/// Sets the old container aside (stopped, renamed), creates and starts the new one. The journal
/// knows each container before it is touched.
async fn start_new(
    d: &mut Deployment,
    docker: &Docker,
    spec: &DeploymentSpec,
    image: &str,
    previous: &mut Option<Previous>,
) -> Result<String> {
    let name = &spec.container_name;
    let deploy_err = |e| map_err(e, ReceiverError::DeployFailed);
    if let Some(old) = container_named(docker, name).await? {
        let id = old.id.clone().unwrap_or_default();
        let was_running = old.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        d.record.previous_container_id = Some(id.clone());
        d.save().await;
        *previous = Some(Previous {
            id: id.clone(),
            was_running,
            renamed: false,
        });
        docker
            .stop_container(
                &id,
                Some(StopContainerOptions {
                    t: STOP_TIMEOUT_SECS,
                }),
            )
            .await
            .map_err(deploy_err)?;
        docker
            .rename_container(
                &id,
                RenameContainerOptions {
                    name: aside_name(name, &id),
                },
            )
            .await
            .map_err(deploy_err)?;
        if let Some(p) = previous.as_mut() {
            p.renamed = true;
        }
    }
    let config = policy::container_config(spec, image, d.labels())?;
    let created = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.clone(),
                platform: None,
            }),
            config,
        )
        .await
        .map_err(deploy_err)?;
    d.record.container_id = Some(created.id.clone());
    d.save().await;
    docker
        .start_container::<String>(&created.id, None)
        .await
        .map_err(deploy_err)?;
    Ok(created.id)
}

/// Removes the new container and brings the previous one back under its name.
async fn rollback(
    mut d: Deployment,
    docker: &Docker,
    name: &str,
    new_id: Option<String>,
    previous: Option<Previous>,
    error: ReceiverError,
) -> DeploymentRecord {
    let timed = Deployment::time(Stage::Rollback);
    let mut problems = Vec::new();
    let mut docker_lost = false;
    if let Some(id) = &new_id {
        if let Err(e) = remove_container(docker, id).await {
            docker_lost |= matches!(e, ReceiverError::DockerUnavailable(_));
            problems.push(format!(
                "could not remove the new container {}: {e}",
                short(id)
            ));
        }
    }
    if let Some(p) = &previous {
        if let Err(e) = restore(docker, name, p).await {
            docker_lost |= matches!(e, ReceiverError::DockerUnavailable(_));
            problems.push(format!(
                "could not restore the previous container {}: {e}",
                short(&p.id)
            ));
        }
    }
    if docker_lost {
        return roll_back_later(d, problems, error, timed).await;
    }
    let restored = previous.is_some() && problems.is_empty();
    let detail = match (&previous, restored) {
        (Some(p), true) => format!("restored the previous container {} as {name}", short(&p.id)),
        (None, _) if problems.is_empty() => {
            "removed the new container; there was no previous one to restore".into()
        }
        _ => problems.join("; "),
    };
    let outcome = if problems.is_empty() {
        StageOutcome::Ok
    } else {
        StageOutcome::Failed
    };
    timed.record(&mut d, outcome, Some(detail.clone()));
    let status = if restored {
        d.state().metrics().rollback();
        DeploymentStatus::RolledBack
    } else {
        DeploymentStatus::Failed
    };
    let message = if previous.is_some() {
        format!("{error}; {detail}")
    } else {
        error.to_string()
    };
    d.finish_with(
        status,
        Some(ErrorDetail {
            code: error.code(),
            message,
            correlation_id: correlation_id(),
        }),
    )
    .await
}

/// Docker went away before the rollback was done: the deployment stays IN_PROGRESS, carrying the
/// error, and is settled like one cut off by a stop of the receiver as soon as Docker answers
/// again (the answer to this request is 503 DOCKER_UNAVAILABLE with this record). Finishing it
/// FAILED instead would leave the old container stopped and set aside until someone deploys again.
async fn roll_back_later(
    mut d: Deployment,
    problems: Vec<String>,
    error: ReceiverError,
    timed: Timed,
) -> DeploymentRecord {
    let id = d.record.deployment_id;
    let detail = format!(
        "{}; the receiver rolls back as soon as Docker answers again (GET /deployments/{id})",
        problems.join("; ")
    );
    timed.failed(&mut d, &detail);
    d.record.error = Some(ErrorDetail {
        code: ErrorCode::DockerUnavailable,
        message: format!("{error}; {detail}"),
        correlation_id: correlation_id(),
    });
    d.save().await;
    tracing::warn!(deployment_id = %id, error = %error, "Docker went away before the rollback was done; retrying it in the background");
    reconcile::settle_later(d.state().clone(), id);
    d.record
}

/// Puts a set-aside container back under `name` and starts it if it was running.
async fn restore(docker: &Docker, name: &str, previous: &Previous) -> Result<()> {
    let err = |e| map_err(e, ReceiverError::DeployFailed);
    if previous.renamed {
        docker
            .rename_container(
                &previous.id,
                RenameContainerOptions {
                    name: name.to_owned(),
                },
            )
            .await
            .map_err(err)?;
    }
    if previous.was_running {
        docker
            .start_container::<String>(&previous.id, None)
            .await
            .map_err(err)?;
    }
    Ok(())
}

/// The health check of a deployment: an `http` check without a port probes the first published
/// TCP port.
fn health_spec(spec: &DeploymentSpec) -> HealthCheckSpec {
    let mut check = spec.health_check.clone();
    if check.port.is_none() {
        check.port = spec
            .ports
            .iter()
            .find(|p| p.protocol == PortProtocol::Tcp)
            .map(|p| p.container_port);
    }
    check
}
