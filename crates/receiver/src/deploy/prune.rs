//! Version history: the images and packages of the last IMAGE_HISTORY successful deployments of
//! a container name are kept (for rollback and redeploys), and, when those all ran one image (the
//! same image redeployed), also the newest successful deployment of another image, so there is
//! always an earlier version to roll back to. Older images that this receiver loaded for that name
//! are removed once no container uses them and no other name still keeps them, with the packages
//! they were loaded from. The journal keeps JOURNAL_HISTORY finished records besides those.
//! Pruning runs after each successful deployment, for its name, and never fails it.

use std::collections::{HashMap, HashSet};

use bollard::container::ListContainersOptions;
use bollard::image::RemoveImageOptions;
use bollard::Docker;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::Sha256Digest;
use uuid::Uuid;

use crate::docker::map_err;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// What one pruning pass removed.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Image ids removed.
    pub images: Vec<String>,
    /// Tags taken off images (that others still tag or use, or that went with them).
    pub untagged: Vec<String>,
    /// Packages deleted from the store.
    pub packages: Vec<Uuid>,
    /// Journal records deleted.
    pub records: usize,
}

impl Pruned {
    /// A line for the cleanup stage's detail, or None when nothing went.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.untagged.is_empty() {
            parts.push(format!("untagged {}", self.untagged.join(", ")));
        }
        if !self.images.is_empty() {
            parts.push(format!("pruned images {}", self.images.join(", ")));
        }
        if !self.packages.is_empty() {
            let ids: Vec<String> = self.packages.iter().map(Uuid::to_string).collect();
            parts.push(format!("deleted packages {}", ids.join(", ")));
        }
        if self.records > 0 {
            parts.push(format!("deleted {} old journal records", self.records));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Removes `name`'s older images and packages, then old journal records, once deployment
/// `current` of `name` has succeeded (it counts as one of the kept versions, though its record is
/// only marked SUCCEEDED after this). A failed removal is logged and skipped.
pub async fn prune(state: &AppState, docker: &Docker, name: &str, current: Uuid) -> Result<Pruned> {
    let records = state.journal().all()?;
    let kept = Kept::of(&records, state.config().image_history.max(1), Some(current));
    let mut pruned = Pruned::default();
    // Layers a registered, not yet loaded release relies on stay, whoever's image holds them.
    let protected = state.layers().releases().pending_chain_ids();
    // Only images this receiver loaded from verified packages: an image the host had is never
    // untagged or deleted because a deployment ran it.
    let allow_any = state.config().allow_unverified_images;
    let candidates: Vec<Candidate> = kept
        .image_candidates(&records, name)
        .into_iter()
        .filter(|c| allow_any || state.images().contains(&c.id))
        .collect();
    prune_images(docker, &candidates, &protected, &mut pruned).await?;
    for id in kept.package_candidates(&records, name) {
        match state.store().remove(id) {
            Ok(true) => pruned.packages.push(id),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(package_id = %id, error = %e, "could not delete an old package")
            }
        }
    }
    pruned.records = state
        .journal()
        .prune(state.config().journal_history, |r| {
            kept.deployments.contains(&r.deployment_id)
        })
        .await?;
    Ok(pruned)
}

/// Prunes the candidate images. Only the tags this receiver's deployments used are taken away
/// (each only while it still names that image), and an image is deleted only once no tag is left
/// on it and no container uses it: an identical image that someone else tagged or runs (the same
/// content built or loaded under another name gets the same id) is left alone.
async fn prune_images(
    docker: &Docker,
    candidates: &[Candidate],
    protected: &HashSet<Sha256Digest>,
    pruned: &mut Pruned,
) -> Result<()> {
    if candidates.is_empty() {
        return Ok(());
    }
    let containers = docker
        .list_containers(Some(ListContainersOptions::<String> {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))?;
    let in_use: HashSet<String> = containers.into_iter().filter_map(|c| c.image_id).collect();
    for candidate in candidates {
        if !protected.is_empty() && holds_any(docker, &candidate.id, protected).await {
            tracing::info!(
                image = candidate.id,
                "old image kept: a registered release relies on its layers"
            );
            continue;
        }
        if let Err(e) = prune_image(docker, candidate, &in_use, pruned).await {
            tracing::warn!(image = candidate.id, error = %e, "could not prune an old image");
        }
    }
    Ok(())
}

/// Untags `candidate`'s tags that still name it, then deletes it if no tag is left and no
/// container uses it.
async fn prune_image(
    docker: &Docker,
    candidate: &Candidate,
    in_use: &HashSet<String>,
    pruned: &mut Pruned,
) -> Result<()> {
    let used = in_use.contains(&candidate.id);
    for tag in &candidate.tags {
        // Only while the tag still names this image (a tag like `web:latest` moves on).
        if inspect(docker, tag)
            .await?
            .is_none_or(|(id, _)| id != candidate.id)
        {
            continue;
        }
        // The last tag of an image a container uses stays: Docker refuses to take it off.
        if used
            && inspect(docker, &candidate.id)
                .await?
                .is_some_and(|(_, tags)| tags <= 1)
        {
            continue;
        }
        if remove_reference(docker, tag).await? {
            pruned.untagged.push(tag.clone());
        }
    }
    if !used
        && inspect(docker, &candidate.id)
            .await?
            .is_some_and(|(_, tags)| tags == 0)
        && remove_reference(docker, &candidate.id).await?
    {
        pruned.images.push(candidate.id.clone());
    }
    Ok(())
}

/// Whether image `id` holds a layer (by chain ID) in `chain_ids`; an image that cannot be
/// inspected counts as holding one (kept, to be safe).
async fn holds_any(docker: &Docker, id: &str, chain_ids: &HashSet<Sha256Digest>) -> bool {
    match docker.inspect_image(id).await {
        Ok(image) => {
            let diff_ids: Vec<Sha256Digest> = image
                .root_fs
                .and_then(|r| r.layers)
                .unwrap_or_default()
                .iter()
                .filter_map(|l| l.parse().ok())
                .collect();
            deploy_protocol::chain_ids(&diff_ids)
                .iter()
                .any(|c| chain_ids.contains(c))
        }
        Err(_) => true,
    }
}

/// The image id `reference` names and how many tags that image has; None if there is none.
async fn inspect(docker: &Docker, reference: &str) -> Result<Option<(String, usize)>> {
    match docker.inspect_image(reference).await {
        Ok(image) => Ok(Some((
            image.id.unwrap_or_default(),
            image.repo_tags.map_or(0, |t| t.len()),
        ))),
        Err(e) => match map_err(e, ReceiverError::Internal) {
            ReceiverError::NotFound(_) => Ok(None),
            e => Err(e),
        },
    }
}

/// Removes an image reference (a tag, or an image by id) without force; false if it was gone.
async fn remove_reference(docker: &Docker, reference: &str) -> Result<bool> {
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
    };
    match docker.remove_image(reference, Some(options), None).await {
        Ok(_) => Ok(true),
        Err(e) => match map_err(e, ReceiverError::Internal) {
            ReceiverError::NotFound(_) => Ok(false),
            e => Err(e),
        },
    }
}

/// An image id to prune, with the image references deployments of the name ran it as.
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    id: String,
    tags: Vec<String>,
}

/// What the history keeps, over all names: the deployments in progress and the last `history`
/// successful ones of each name (plus the newest of another image when those all ran one image),
/// with their images and packages.
struct Kept<'a> {
    deployments: HashSet<Uuid>,
    images: HashSet<&'a str>,
    packages: HashSet<Uuid>,
}

impl<'a> Kept<'a> {
    /// `records` are newest first; `succeeded` is a deployment to count as SUCCEEDED whatever
    /// its record says yet.
    fn of(records: &'a [DeploymentRecord], history: usize, succeeded: Option<Uuid>) -> Self {
        let mut per_name: HashMap<&str, Vec<&str>> = HashMap::new();
        let mut kept = Kept {
            deployments: HashSet::new(),
            images: HashSet::new(),
            packages: HashSet::new(),
        };
        for r in records {
            let status = if Some(r.deployment_id) == succeeded {
                DeploymentStatus::Succeeded
            } else {
                r.status
            };
            let keep = match status {
                DeploymentStatus::InProgress => true,
                DeploymentStatus::Succeeded => match r.image_id.as_deref() {
                    Some(image) => {
                        let list = per_name.entry(&r.container_name).or_default();
                        // Past `history`, only a rollback target: while every kept deployment
                        // ran the newest one's image, the first of another image is kept too.
                        let one_image = list.iter().all(|kept| Some(kept) == list.first());
                        let rollback_target = one_image && list.first() != Some(&image);
                        if list.len() < history || rollback_target {
                            list.push(image);
                            true
                        } else {
                            false
                        }
                    }
                    None => false,
                },
                DeploymentStatus::RolledBack | DeploymentStatus::Failed => false,
            };
            if keep {
                kept.deployments.insert(r.deployment_id);
                kept.images.extend(r.image_id.as_deref());
                kept.packages.extend(r.package_id);
            }
        }
        kept
    }

    /// Image ids loaded (from packages) for `name` that no container name keeps any more, with
    /// the references `name`'s deployments ran them as.
    fn image_candidates(&self, records: &[DeploymentRecord], name: &str) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for r in records {
            let Some(image) = r.image_id.as_deref() else {
                continue;
            };
            if r.container_name != name || r.package_id.is_none() || self.images.contains(image) {
                continue;
            }
            let tag = (r.image != image).then(|| r.image.clone());
            match out.iter_mut().find(|c| c.id == image) {
                Some(candidate) => candidate
                    .tags
                    .extend(tag.filter(|t| !candidate.tags.contains(t))),
                None => out.push(Candidate {
                    id: image.to_owned(),
                    tags: tag.into_iter().collect(),
                }),
            }
        }
        out
    }

    /// Packages that finished deployments of `name` came from, that nothing kept refers to.
    fn package_candidates(&self, records: &[DeploymentRecord], name: &str) -> Vec<Uuid> {
        let mut out = Vec::new();
        for r in records {
            let Some(package) = r.package_id else {
                continue;
            };
            if r.container_name == name
                && !self.deployments.contains(&r.deployment_id)
                && !self.packages.contains(&package)
                && !out.contains(&package)
            {
                out.push(package);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, image: &str, status: DeploymentStatus) -> DeploymentRecord {
        DeploymentRecord {
            deployment_id: uuid::Uuid::new_v4(),
            status,
            container_name: name.into(),
            image: format!("{name}:{image}"),
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
            spec: None,
            rollback_of: None,
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
        let ids = |candidates: Vec<Candidate>| -> Vec<String> {
            candidates.into_iter().map(|c| c.id).collect()
        };
        // Three deployments (i5, i3, i3): i3's redeploy counts as one of them.
        let kept = Kept::of(&records, 3, None);
        assert_eq!(
            ids(kept.image_candidates(&records, "web")),
            ["i4", "i2", "i0"]
        );
        assert!(kept.image_candidates(&records, "api").is_empty());
        let kept = Kept::of(&records, 4, None);
        assert_eq!(ids(kept.image_candidates(&records, "web")), ["i4", "i0"]);
        // One deployment (i5), and i3 as the version to roll back to.
        let kept = Kept::of(&records, 1, None);
        assert_eq!(
            ids(kept.image_candidates(&records, "web")),
            ["i4", "i2", "i0"]
        );
        // The references each was run as come along (i0 ran twice, as the same tag).
        let mut records = records;
        records.push(record("web", "i0", Succeeded));
        let kept = Kept::of(&records, 1, None);
        let candidates = kept.image_candidates(&records, "web");
        assert_eq!(
            candidates[2],
            Candidate {
                id: "i0".into(),
                tags: vec!["web:i0".into()]
            }
        );
    }

    #[test]
    fn redeploying_an_image_keeps_earlier_deployments_packages_and_a_rollback_target() {
        use DeploymentStatus::*;
        // web ran i1, then i2, then i2 again from a new package, then i2 once more.
        let records = vec![
            record("web", "i2", Succeeded),
            record("web", "i2", Succeeded),
            record("web", "i2", Succeeded),
            record("web", "i1", Succeeded),
        ];
        let packages: Vec<Uuid> = records.iter().filter_map(|r| r.package_id).collect();
        let kept = Kept::of(&records, 2, Some(records[0].deployment_id));
        // Two deployments are kept with their packages, and i1's, the only other version.
        assert!(kept.packages.contains(&packages[0]));
        assert!(kept.packages.contains(&packages[1]));
        assert!(kept.packages.contains(&packages[3]), "the rollback target");
        assert_eq!(kept.package_candidates(&records, "web"), [packages[2]]);
        assert!(kept.image_candidates(&records, "web").is_empty());
        // With a history of 3 the second redeploy's package stays too.
        let kept = Kept::of(&records, 3, None);
        assert!(kept.package_candidates(&records, "web").is_empty());
    }

    #[test]
    fn packages_go_with_the_deployments_the_history_no_longer_keeps() {
        use DeploymentStatus::*;
        let mut records = vec![
            record("web", "i4", InProgress),
            record("web", "i3", RolledBack),
            record("web", "i2", Succeeded),
            record("web", "i1", Succeeded),
            record("api", "i0", Succeeded),
            record("web", "i0", Succeeded),
        ];
        // A redeploy of i1's package: the package is kept because a kept deployment uses it.
        records[3].package_id = records[5].package_id;
        let ids: Vec<Uuid> = records.iter().filter_map(|r| r.package_id).collect();
        let kept = Kept::of(&records, 2, None);
        assert_eq!(
            kept.package_candidates(&records, "web"),
            [ids[1]],
            "only the rolled-back deployment's package: i2 and i1 are kept, i0's package is i1's"
        );
        assert!(kept.deployments.contains(&records[0].deployment_id));
        // Once the deployment in progress counts as succeeded it is one of the 2 kept versions,
        // so i1 (and the package it shares with i0) go too.
        let kept = Kept::of(&records, 2, Some(records[0].deployment_id));
        assert_eq!(kept.package_candidates(&records, "web"), [ids[1], ids[3]]);
        assert!(!kept.deployments.contains(&records[1].deployment_id));
        assert!(
            kept.deployments.contains(&records[4].deployment_id),
            "api keeps its own"
        );
    }
}
