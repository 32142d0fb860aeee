//! The container helpers the deployment steps share: finding a container by its exact name,
//! removing one, the name an old container carries while set aside, and whether one is running.

use bollard::container::RemoveContainerOptions;
use bollard::models::ContainerInspectResponse;
use bollard::Docker;

use deploy_protocol::display::short;
use deploy_protocol::DeploymentSpec;

use super::LABEL_MANAGED;
use crate::docker::map_err;
use crate::error::{ReceiverError, Result};

/// Refuses (409 CONFLICT, naming it) to replace a container of the spec's name that this receiver
/// did not create (it lacks [`LABEL_MANAGED`]), unless the spec adopts it (`adopt_existing`).
pub(super) async fn refuse_unmanaged(docker: &Docker, spec: &DeploymentSpec) -> Result<()> {
    if spec.adopt_existing {
        return Ok(());
    }
    let Some(existing) = container_named(docker, &spec.container_name).await? else {
        return Ok(());
    };
    if is_managed(&existing) {
        return Ok(());
    }
    Err(ReceiverError::Conflict(format!(
        "a container named {} ({}) exists that this receiver did not create: it is left alone; set deployment.adopt_existing to replace it",
        spec.container_name,
        short(existing.id.as_deref().unwrap_or_default())
    )))
}

/// Whether this receiver created the container (it carries [`LABEL_MANAGED`]).
pub(super) fn is_managed(c: &ContainerInspectResponse) -> bool {
    c.config
        .as_ref()
        .and_then(|config| config.labels.as_ref())
        .and_then(|labels| labels.get(LABEL_MANAGED))
        .is_some_and(|v| v == "true")
}

/// Seconds the old container gets to stop before it is killed.
pub(super) const STOP_TIMEOUT_SECS: i64 = 10;

/// The container named exactly `name`, if any (Docker resolves an id prefix too: never take an
/// unrelated container for the one to replace).
pub(super) async fn container_named(
    docker: &Docker,
    name: &str,
) -> Result<Option<bollard::models::ContainerInspectResponse>> {
    let wanted = format!("/{name}");
    Ok(find_container(docker, name)
        .await?
        .filter(|c| c.name.as_deref() == Some(wanted.as_str())))
}

/// The container with this id (or name), if any.
pub(super) async fn find_container(
    docker: &Docker,
    name: &str,
) -> Result<Option<bollard::models::ContainerInspectResponse>> {
    match docker.inspect_container(name, None).await {
        Ok(c) => Ok(Some(c)),
        Err(e) => match map_err(e, ReceiverError::Internal) {
            ReceiverError::NotFound(_) => Ok(None),
            other => Err(other),
        },
    }
}

/// Removes a container, running or not; one already gone is fine.
pub(super) async fn remove_container(docker: &Docker, id: &str) -> Result<()> {
    let options = RemoveContainerOptions {
        force: true,
        v: false,
        link: false,
    };
    match docker.remove_container(id, Some(options)).await {
        Ok(()) => Ok(()),
        Err(e) => match map_err(e, ReceiverError::DeployFailed) {
            ReceiverError::NotFound(_) => Ok(()),
            other => Err(other),
        },
    }
}

/// The name an old container carries while its replacement is tried.
pub fn aside_name(name: &str, id: &str) -> String {
    format!("{name}.previous-{}", short(id))
}

/// Whether a container is running (and not restarting).
pub(super) fn is_running(c: &ContainerInspectResponse) -> bool {
    let state = c.state.as_ref();
    state.and_then(|s| s.running).unwrap_or(false)
        && !state.and_then(|s| s.restarting).unwrap_or(false)
}
