//! Rolling back a deployment on request (a fleet rollout undoing the hosts it moved): the
//! deployment that preceded it for the same container name runs again, from the image kept by
//! IMAGE_HISTORY, through the same replace-and-health-check path as any deployment; when there was
//! none, the container goes. Asked again, the answer is the same and nothing is touched.

use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus, RollbackOutcome, RollbackResponse};
use uuid::Uuid;

use super::containers::{container_named, remove_container};
use super::LABEL_DEPLOYMENT_ID;
use super::{check_verified, inspect_image, outcome, replace, Deployment};
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// `POST /deployments/{id}/rollback`.
pub async fn roll_back(state: &AppState, id: Uuid) -> Result<RollbackResponse> {
    let name = find(state, id)?.container_name;
    let _turn = state.container_lock(&name).await;
    // Read again under the lock: a deployment of the name may have finished meanwhile.
    let target = find(state, id)?;
    let respond = |outcome, repeated, image, deployment| RollbackResponse {
        rolled_back: id,
        outcome,
        repeated,
        image,
        deployment,
    };
    let records = state.journal().all()?;
    let predecessor = predecessor(&records, &target).cloned();
    match target.status {
        DeploymentStatus::InProgress => {
            return Err(ReceiverError::Conflict(format!(
                "deployment {id} of {name} is still in progress: roll it back once it has finished"
            )))
        }
        DeploymentStatus::RolledBack | DeploymentStatus::Failed => {
            let image = predecessor.map(|p| p.image);
            return Ok(respond(RollbackOutcome::NotApplied, false, image, None));
        }
        DeploymentStatus::Succeeded => {}
    }
    let docker = state.docker().client().await?;
    let current = running_deployment(&docker, &name).await?;
    if current.as_ref().map(|c| c.1) == Some(Some(id)) {
        let Some(previous) = predecessor else {
            remove_container(&docker, &current.map(|c| c.0).unwrap_or_default()).await?;
            tracing::info!(deployment_id = %id, container = %name, "rolled back the first deployment of the name: container removed");
            return Ok(respond(RollbackOutcome::Removed, false, None, None));
        };
        let record = rerun(state, &docker, &previous, id).await?;
        return Ok(respond(
            RollbackOutcome::Restored,
            false,
            Some(previous.image.clone()),
            Some(record),
        ));
    }
    // Not running any more: done by an earlier call, or replaced by a later deployment.
    let current_id = current.as_ref().and_then(|c| c.1);
    let earlier = records.iter().find(|r| {
        r.rollback_of == Some(id)
            && r.status == DeploymentStatus::Succeeded
            && Some(r.deployment_id) == current_id
    });
    if let Some(earlier) = earlier {
        return Ok(respond(
            RollbackOutcome::Restored,
            true,
            predecessor.map(|p| p.image),
            Some(earlier.clone()),
        ));
    }
    if current.is_none() && predecessor.is_none() {
        return Ok(respond(RollbackOutcome::Removed, true, None, None));
    }
    let now = match current_id {
        Some(other) => format!("deployment {other}"),
        None if current.is_some() => "a container this receiver did not deploy".to_owned(),
        None => "nothing".to_owned(),
    };
    Err(ReceiverError::Conflict(format!(
        "{name} now runs {now}, not deployment {id}: it was replaced after that deployment; roll back the one that runs, or deploy again"
    )))
}

fn find(state: &AppState, id: Uuid) -> Result<DeploymentRecord> {
    state.journal().get(id)?.ok_or_else(|| {
        ReceiverError::NotFound(format!("no deployment {id} in this receiver's journal"))
    })
}

/// What `target` replaced: the deployment that made the container it set aside
/// (`previous_container_id`), or none when it set none aside (it was the name's first, or came
/// after a rollback that removed the container). Records are ordered by when their request
/// began, not by when they took the name, so the order alone can name the wrong one. Only when
/// no record made that container (one started by hand, or a record pruned) is it the newest
/// successful deployment of the same name that started before `target`.
fn predecessor<'a>(
    newest_first: &'a [DeploymentRecord],
    target: &DeploymentRecord,
) -> Option<&'a DeploymentRecord> {
    let replaced = target.previous_container_id.as_deref()?;
    let made_it = newest_first.iter().find(|r| {
        r.deployment_id != target.deployment_id
            && r.container_name == target.container_name
            && r.container_id.as_deref() == Some(replaced)
            && r.status == DeploymentStatus::Succeeded
    });
    made_it.or_else(|| {
        newest_first
            .iter()
            .skip_while(|r| r.deployment_id != target.deployment_id)
            .skip(1)
            .find(|r| {
                r.container_name == target.container_name && r.status == DeploymentStatus::Succeeded
            })
    })
}

/// The container running under `name` (id) and the deployment that made it, if any.
async fn running_deployment(docker: &Docker, name: &str) -> Result<Option<(String, Option<Uuid>)>> {
    Ok(container_named(docker, name).await?.map(|c| {
        let deployment = c
            .config
            .as_ref()
            .and_then(|config| config.labels.as_ref())
            .and_then(|labels| labels.get(LABEL_DEPLOYMENT_ID))
            .and_then(|id| Uuid::parse_str(id).ok());
        (c.id.unwrap_or_default(), deployment)
    }))
}

/// Runs `previous` again (its spec, its image by id) as a new deployment marked as the rollback
/// of `undone`, with health check (like any deployment, only an image this receiver loaded from a
/// verified package, unless ALLOW_UNVERIFIED_IMAGES); when that one fails, `undone`'s container is restored by the
/// usual rollback and the answer is the failed record.
async fn rerun(
    state: &AppState,
    docker: &Docker,
    previous: &DeploymentRecord,
    undone: Uuid,
) -> Result<DeploymentRecord> {
    let mut spec = previous.spec.clone().ok_or_else(|| {
        ReceiverError::Conflict(format!(
            "deployment {} (what ran before) was recorded without its spec, so it cannot be run again: deploy that release again instead",
            previous.deployment_id
        ))
    })?;
    let image = previous
        .image_id
        .clone()
        .unwrap_or_else(|| previous.image.clone());
    spec.image = Some(image.clone());
    let image_id = inspect_image(docker, &image, &spec).await.map_err(|e| match e {
        ReceiverError::NotFound(_) => ReceiverError::NotFound(format!(
            "the image of deployment {} ({}) is no longer on this host (IMAGE_HISTORY keeps the last few): deploy that release again instead",
            previous.deployment_id, previous.image
        )),
        other => other,
    })?;
    check_verified(state, &image, &image_id)?;
    let mut deployment = Deployment::begin(state, &spec, &image, None).await?;
    deployment.record.rollback_of = Some(undone);
    deployment.record.image_id = Some(image_id);
    deployment.record.package_id = previous.package_id;
    deployment.record.package_checksum = previous.package_checksum;
    deployment.save().await;
    tracing::info!(deployment_id = %deployment.record.deployment_id, rollback_of = %undone, from = %previous.deployment_id, "rolling back by running the previous deployment again");
    outcome(replace::replace(deployment, docker, &spec, &image).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, status: DeploymentStatus) -> DeploymentRecord {
        DeploymentRecord {
            deployment_id: Uuid::new_v4(),
            status,
            container_name: name.into(),
            image: "img".into(),
            image_id: None,
            package_id: None,
            package_checksum: None,
            container_id: None,
            previous_container_id: None,
            correlation_id: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: None,
            stages: Vec::new(),
            error: None,
            spec: None,
            rollback_of: None,
        }
    }

    #[test]
    fn the_predecessor_is_the_deployment_whose_container_the_target_replaced() {
        use DeploymentStatus::*;
        let made = |name: &str, status, container: &str| DeploymentRecord {
            container_id: Some(container.into()),
            ..record(name, status)
        };
        // Newest first, by when each request began. `target` began before `later` but took the
        // name after it (its load was longer): it replaced `later`'s container.
        let later = made("web", Succeeded, "c-later");
        let target = DeploymentRecord {
            previous_container_id: Some("c-later".into()),
            ..made("web", Succeeded, "c-target")
        };
        let failed = made("web", RolledBack, "c-failed");
        let other = made("db", Succeeded, "c-later");
        let older = made("web", Succeeded, "c-older");
        let all = vec![later.clone(), target.clone(), failed, other, older.clone()];
        assert_eq!(
            predecessor(&all, &target).map(|r| r.deployment_id),
            Some(later.deployment_id)
        );

        // A container no record made (started by hand, or its record pruned): the newest older
        // success of the name, as before.
        let over_a_stranger = DeploymentRecord {
            previous_container_id: Some("c-by-hand".into()),
            ..target.clone()
        };
        assert_eq!(
            predecessor(&all, &over_a_stranger).map(|r| r.deployment_id),
            Some(older.deployment_id)
        );

        // Nothing set aside (the name's first deployment, or one after a rollback that removed
        // the container): nothing to run again, whatever older records say.
        let first = DeploymentRecord {
            previous_container_id: None,
            ..target
        };
        assert_eq!(predecessor(&all, &first), None);
    }
}
