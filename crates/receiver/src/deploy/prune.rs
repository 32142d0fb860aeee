//! Image history: the images of the last IMAGE_HISTORY successful deployments of a container name
//! are kept (for rollback); older images that this receiver loaded for that name are removed once
//! no container uses them and no other name still keeps them.

use std::collections::{HashMap, HashSet};

use bollard::container::ListContainersOptions;
use bollard::image::RemoveImageOptions;
use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};

use crate::docker::map_err;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// Removes the images of `name`'s older deployments; returns the ids removed. A failed removal is
/// logged and skipped: pruning never fails a deployment.
pub async fn prune_images(state: &AppState, docker: &Docker, name: &str) -> Result<Vec<String>> {
    let records = state.journal().all()?;
    let candidates = candidates(&records, name, state.config().image_history.max(1));
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let containers = docker
        .list_containers(Some(ListContainersOptions::<String> {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))?;
    let in_use: HashSet<String> = containers.into_iter().filter_map(|c| c.image_id).collect();
    let mut removed = Vec::new();
    for image in candidates.into_iter().filter(|i| !in_use.contains(i)) {
        let options = RemoveImageOptions {
            force: true,
            noprune: false,
        };
        match docker.remove_image(&image, Some(options), None).await {
            Ok(_) => removed.push(image),
            Err(e) => match map_err(e, ReceiverError::Internal) {
                ReceiverError::NotFound(_) => {}
                other => tracing::warn!(image, error = %other, "could not prune an old image"),
            },
        }
    }
    Ok(removed)
}

/// Image ids loaded (from packages) for `name` that no container name keeps any more. `records`
/// are newest first.
fn candidates(records: &[DeploymentRecord], name: &str, history: usize) -> Vec<String> {
    let mut kept_per_name: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut kept: HashSet<&str> = HashSet::new();
    for r in records {
        let Some(image) = r.image_id.as_deref() else {
            continue;
        };
        match r.status {
            DeploymentStatus::InProgress => {
                kept.insert(image);
            }
            DeploymentStatus::Succeeded => {
                let list = kept_per_name.entry(&r.container_name).or_default();
                if list.len() < history && !list.contains(&image) {
                    list.push(image);
                    kept.insert(image);
                }
            }
            DeploymentStatus::RolledBack | DeploymentStatus::Failed => {}
        }
    }
    let mut out: Vec<String> = Vec::new();
    for r in records {
        let Some(image) = r.image_id.as_deref() else {
            continue;
        };
        if r.container_name == name
            && r.package_id.is_some()
            && !kept.contains(image)
            && !out.iter().any(|o| o == image)
        {
            out.push(image.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, image: &str, status: DeploymentStatus) -> DeploymentRecord {
        DeploymentRecord {
            deployment_id: uuid::Uuid::new_v4(),
            status,
            container_name: name.into(),
            image: image.into(),
            image_id: Some(image.into()),
            package_id: Some(uuid::Uuid::new_v4()),
            package_checksum: None,
            container_id: None,
            previous_container_id: None,
            correlation_id: None,
            started_at: String::new(),
            finished_at: None,
            stages: vec![],
            error: None,
        }
    }

    #[test]
    fn keeps_the_last_successful_images_per_name() {
        use DeploymentStatus::*;
        let records = vec![
            record("web", "i5", Succeeded),
            record("web", "i4", RolledBack),
            record("web", "i3", Succeeded),
            record("web", "i3", Succeeded),
            record("web", "i2", Succeeded),
            record("api", "i1", Succeeded),
            record("web", "i1", Succeeded),
            record("web", "i0", Succeeded),
        ];
        assert_eq!(candidates(&records, "web", 3), ["i4", "i0"]);
        assert_eq!(candidates(&records, "api", 3), Vec::<String>::new());
        assert_eq!(candidates(&records, "web", 1), ["i4", "i3", "i2", "i0"]);
    }
}
