//! Deploying a container: the old container of the same name is stopped and set aside, the new one
//! is created, started and health-checked; healthy, the old one goes, otherwise the new one goes
//! and the old one comes back. Every step is written to the journal first, so that a receiver
//! killed mid-deploy can finish or undo it when it starts again (see [`reconcile`]).

mod prune;
pub mod reconcile;
pub mod spec;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::container::{
    CreateContainerOptions, RemoveContainerOptions, RenameContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use deploy_protocol::api::{
    DeployRequest, DeploymentRecord, DeploymentStatus, Stage, StageOutcome, StageReport,
};
use deploy_protocol::{
    DeploymentSpec, ErrorDetail, HealthCheckKind, HealthCheckSpec, PackageManifest, PortProtocol,
};
use uuid::Uuid;

use crate::docker::map_err;
use crate::error::{correlation_id, ReceiverError, Result};
use crate::health;
use crate::journal::now_rfc3339;
use crate::spool::Received;
use crate::state::AppState;

/// Marks containers this receiver runs.
pub const LABEL_MANAGED: &str = "io.deploy.managed";
/// The deployment that created a container.
pub const LABEL_DEPLOYMENT_ID: &str = "io.deploy.deployment_id";
/// The package a container's image came from.
pub const LABEL_PACKAGE_ID: &str = "io.deploy.package_id";
/// The checksum of that package.
pub const LABEL_PACKAGE_CHECKSUM: &str = "io.deploy.package_checksum";

/// Seconds the old container gets to stop before it is killed.
const STOP_TIMEOUT_SECS: i64 = 10;

/// `POST /deployment/deploy`: runs `request.deployment` from an image already loaded here.
/// Refusals before anything is touched (validation, policy, unknown image) are plain errors;
/// afterwards the outcome is the journaled record, an error when it did not succeed.
pub async fn deploy(state: &AppState, request: DeployRequest) -> Result<DeploymentRecord> {
    let spec = request.deployment;
    spec.validate().map_err(ReceiverError::Validation)?;
    let image = spec.image.clone().ok_or_else(|| {
        ReceiverError::Validation(
            "deployment.image is required: the image to run, loaded on this host".into(),
        )
    })?;
    spec::check_policy(state.config(), &spec)?;
    let manifest = match request.package_id {
        Some(id) => state.store().get(id)?.map(|p| p.manifest),
        None => None,
    };
    let docker = state.docker().client().await?;
    let image_id = inspect_image(&docker, &image, &spec).await?;
    let _turn = state.container_lock(&spec.container_name).await;
    let mut deployment = Deployment::begin(state, &spec, &image, manifest.as_ref()).await?;
    deployment.record.package_id = deployment.record.package_id.or(request.package_id);
    deployment.record.image_id = Some(image_id);
    deployment.save().await;
    outcome(replace(deployment, &docker, &spec, &image).await)
}

/// `POST /deployment/full` after the upload: load the received package, then deploy the spec in
/// its manifest (`image` defaults to the first image tag) with health check and rollback.
pub async fn deploy_package(state: &AppState, received: Received) -> Result<DeploymentRecord> {
    let manifest = &received.package.manifest;
    let mut spec = manifest.deployment.clone().ok_or_else(|| {
        ReceiverError::Validation(format!(
            "the manifest of package {} has no `deployment` spec, which /deployment/full needs (the package was stored: deploy it with /deployment/load and /deployment/deploy)",
            manifest.package_id
        ))
    })?;
    spec.image = spec.image.or_else(|| manifest.image_tags.first().cloned());
    let image = spec.image.clone().ok_or_else(|| {
        ReceiverError::Validation(
            "neither deployment.image nor the manifest's image_tags name the image to run".into(),
        )
    })?;
    spec.validate().map_err(ReceiverError::Validation)?;
    spec::check_policy(state.config(), &spec)?;

    let mut deployment = Deployment::begin(state, &spec, &image, Some(manifest)).await?;
    let secs = received.duration.as_secs_f64().max(1e-9);
    deployment.stage(
        Stage::Upload,
        StageOutcome::Ok,
        received.duration,
        Some(format!(
            "{} bytes at {:.1} MB/s",
            received.bytes,
            received.bytes as f64 / 1e6 / secs
        )),
    );
    deployment.stage(
        Stage::Verify,
        StageOutcome::Ok,
        Duration::ZERO,
        Some(format!(
            "size and BLAKE3 {} match the signed manifest",
            manifest.package_checksum
        )),
    );
    let started = Instant::now();
    match crate::load::load_package(state, &received.package).await {
        Ok(loaded) => deployment.stage(
            Stage::Load,
            StageOutcome::Ok,
            started.elapsed(),
            Some(format!(
                "loaded {} tagged {}",
                loaded.image_id,
                loaded.image_tags.join(", ")
            )),
        ),
        Err(e) => {
            deployment.stage(
                Stage::Load,
                StageOutcome::Failed,
                started.elapsed(),
                Some(e.to_string()),
            );
            return outcome(deployment.finish(DeploymentStatus::Failed, Some(&e)).await);
        }
    }
    let started = Instant::now();
    let prepared = async {
        let docker = state.docker().client().await?;
        let id = inspect_image(&docker, &image, &spec).await?;
        Ok::<_, ReceiverError>((docker, id))
    }
    .await;
    let docker = match prepared {
        Ok((docker, image_id)) => {
            deployment.record.image_id = Some(image_id);
            deployment.save().await;
            docker
        }
        Err(e) => {
            deployment.stage(
                Stage::Start,
                StageOutcome::Failed,
                started.elapsed(),
                Some(e.to_string()),
            );
            return outcome(deployment.finish(DeploymentStatus::Failed, Some(&e)).await);
        }
    };
    let _turn = state.container_lock(&spec.container_name).await;
    outcome(replace(deployment, &docker, &spec, &image).await)
}

/// A finished record as a result: an error unless it succeeded.
fn outcome(record: DeploymentRecord) -> Result<DeploymentRecord> {
    match record.status {
        DeploymentStatus::Succeeded => Ok(record),
        _ => Err(ReceiverError::Deployment(Box::new(record))),
    }
}

/// The image's id; NOT_FOUND when it is not loaded, VALIDATION_ERROR when the spec asks for its
/// Docker HEALTHCHECK and it has none.
async fn inspect_image(docker: &Docker, image: &str, spec: &DeploymentSpec) -> Result<String> {
    let inspect = docker.inspect_image(image).await.map_err(|e| match map_err(e, ReceiverError::Internal) {
        ReceiverError::NotFound(_) => ReceiverError::NotFound(format!(
            "image {image} is not loaded on this host: send its package first (/deployment/full, or /deployment/upload and /deployment/load)"
        )),
        other => other,
    })?;
    let test = inspect
        .config
        .as_ref()
        .and_then(|c| c.healthcheck.as_ref())
        .and_then(|h| h.test.as_ref());
    if spec.health_check.kind == HealthCheckKind::Docker && !health::has_healthcheck(test) {
        return Err(ReceiverError::Validation(format!(
            "health_check.kind is `docker` but image {image} has no HEALTHCHECK: use `http` or `none`"
        )));
    }
    Ok(inspect.id.unwrap_or_else(|| image.to_owned()))
}

/// The container that was running under the name, while it is set aside.
#[derive(Debug)]
struct Previous {
    id: String,
    was_running: bool,
    renamed: bool,
}

/// Replaces the container named in `spec` (if any) by a new one, health-checks it, and either
/// cleans up or rolls back. Never fails: the outcome is in the returned record.
async fn replace(
    mut d: Deployment,
    docker: &Docker,
    spec: &DeploymentSpec,
    image: &str,
) -> DeploymentRecord {
    let started = Instant::now();
    let mut previous = None;
    let new_id = match start_new(&mut d, docker, spec, image, &mut previous).await {
        Ok(id) => {
            let detail = match &previous {
                Some(p) => format!(
                    "started {} in place of {}, set aside as {}",
                    short(&id),
                    short(&p.id),
                    aside_name(&spec.container_name, &p.id)
                ),
                None => format!("started {}", short(&id)),
            };
            d.stage(
                Stage::Start,
                StageOutcome::Ok,
                started.elapsed(),
                Some(detail),
            );
            id
        }
        Err(e) => {
            d.stage(
                Stage::Start,
                StageOutcome::Failed,
                started.elapsed(),
                Some(e.to_string()),
            );
            let new_id = d.record.container_id.clone();
            return rollback(d, docker, &spec.container_name, new_id, previous, e).await;
        }
    };

    let started = Instant::now();
    let check = health_spec(spec);
    let failure = match health::wait(docker, &new_id, &check).await {
        Ok(report) if report.healthy => {
            d.stage(
                Stage::Health,
                StageOutcome::Ok,
                started.elapsed(),
                Some(format!(
                    "{} check: {}",
                    report.kind,
                    report.output.unwrap_or_else(|| "healthy".into())
                )),
            );
            None
        }
        Ok(report) => {
            let output = report.output.unwrap_or_else(|| "no output".into());
            d.stage(
                Stage::Health,
                StageOutcome::Failed,
                started.elapsed(),
                Some(format!("{} check: {output}", report.kind)),
            );
            Some(ReceiverError::HealthCheckFailed(format!(
                "container {} did not become healthy ({} check): {output}",
                spec.container_name, report.kind
            )))
        }
        Err(e) => {
            d.stage(
                Stage::Health,
                StageOutcome::Failed,
                started.elapsed(),
                Some(e.to_string()),
            );
            Some(e)
        }
    };
    if let Some(e) = failure {
        return rollback(d, docker, &spec.container_name, Some(new_id), previous, e).await;
    }

    let started = Instant::now();
    let mut notes = Vec::new();
    let mut outcome = StageOutcome::Ok;
    if let Some(p) = &previous {
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
    match prune::prune_images(d.state(), docker, &spec.container_name).await {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => notes.push(format!("pruned images {}", removed.join(", "))),
        Err(e) => notes.push(format!("image pruning skipped: {e}")),
    }
    d.stage(
        Stage::Cleanup,
        outcome,
        started.elapsed(),
        (!notes.is_empty()).then(|| notes.join("; ")),
    );
    d.finish(DeploymentStatus::Succeeded, None).await
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
    if let Some(old) = find_container(docker, name).await? {
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
    let config = spec::container_config(spec, image, d.labels())?;
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
    let started = Instant::now();
    let mut problems = Vec::new();
    if let Some(id) = &new_id {
        if let Err(e) = remove_container(docker, id).await {
            problems.push(format!(
                "could not remove the new container {}: {e}",
                short(id)
            ));
        }
    }
    if let Some(p) = &previous {
        if let Err(e) = restore(docker, name, p).await {
            problems.push(format!(
                "could not restore the previous container {}: {e}",
                short(&p.id)
            ));
        }
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
    d.stage(
        Stage::Rollback,
        outcome,
        started.elapsed(),
        Some(detail.clone()),
    );
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

/// The container of this exact name, if any.
pub(crate) async fn find_container(
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
pub(crate) async fn remove_container(docker: &Docker, id: &str) -> Result<()> {
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

fn short(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Upload => "upload",
        Stage::Verify => "verify",
        Stage::Load => "load",
        Stage::Start => "start",
        Stage::Health => "health",
        Stage::Rollback => "rollback",
        Stage::Cleanup => "cleanup",
    }
}

fn status_label(status: DeploymentStatus) -> &'static str {
    match status {
        DeploymentStatus::InProgress => "in_progress",
        DeploymentStatus::Succeeded => "succeeded",
        DeploymentStatus::RolledBack => "rolled_back",
        DeploymentStatus::Failed => "failed",
    }
}

/// A deployment under way: its record, journaled at every change, and metrics.
pub struct Deployment {
    state: AppState,
    record: DeploymentRecord,
}

impl Deployment {
    /// Starts a record (IN_PROGRESS) and writes it; a receiver that cannot journal does not deploy.
    pub async fn begin(
        state: &AppState,
        spec: &DeploymentSpec,
        image: &str,
        manifest: Option<&PackageManifest>,
    ) -> Result<Self> {
        let record = DeploymentRecord {
            deployment_id: Uuid::new_v4(),
            status: DeploymentStatus::InProgress,
            container_name: spec.container_name.clone(),
            image: image.to_owned(),
            image_id: None,
            package_id: manifest.map(|m| m.package_id),
            package_checksum: manifest.map(|m| m.package_checksum),
            container_id: None,
            previous_container_id: None,
            correlation_id: correlation_id(),
            started_at: now_rfc3339(),
            finished_at: None,
            stages: Vec::new(),
            error: None,
        };
        state.journal().save(&record).await?;
        tracing::info!(deployment_id = %record.deployment_id, container = %record.container_name, image, "deployment started");
        Ok(Self {
            state: state.clone(),
            record,
        })
    }

    /// Continues a record found in the journal (reconciliation).
    pub fn resume(state: &AppState, record: DeploymentRecord) -> Self {
        Self {
            state: state.clone(),
            record,
        }
    }

    /// The record so far.
    pub fn record(&self) -> &DeploymentRecord {
        &self.record
    }

    fn state(&self) -> &AppState {
        &self.state
    }

    /// The receiver's labels for the new container.
    fn labels(&self) -> HashMap<String, String> {
        let r = &self.record;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_DEPLOYMENT_ID.to_owned(), r.deployment_id.to_string()),
        ]);
        if let Some(id) = r.package_id {
            labels.insert(LABEL_PACKAGE_ID.to_owned(), id.to_string());
        }
        if let Some(sum) = r.package_checksum {
            labels.insert(LABEL_PACKAGE_CHECKSUM.to_owned(), sum.to_string());
        }
        labels
    }

    /// Appends a stage report and observes its duration.
    pub fn stage(
        &mut self,
        stage: Stage,
        outcome: StageOutcome,
        duration: Duration,
        detail: Option<String>,
    ) {
        // The loader observes its own duration.
        if stage != Stage::Load {
            self.state
                .metrics()
                .stage(stage_label(stage), duration.as_secs_f64());
        }
        tracing::info!(deployment_id = %self.record.deployment_id, stage = stage_label(stage), ?outcome, duration_ms = duration.as_millis() as u64, detail = detail.as_deref().unwrap_or(""), "stage finished");
        self.record.stages.push(StageReport {
            stage,
            outcome,
            duration_ms: duration.as_millis() as u64,
            detail,
        });
    }

    /// Writes the record. Mid-deploy a failed write is logged, not fatal: stopping halfway would
    /// leave the containers in a worse state than finishing with a stale journal entry.
    async fn save(&self) {
        if let Err(e) = self.state.journal().save(&self.record).await {
            tracing::error!(deployment_id = %self.record.deployment_id, error = %e, "could not journal the deployment");
        }
    }

    /// Ends the deployment with `status`, and `error` when it failed.
    pub async fn finish(
        self,
        status: DeploymentStatus,
        error: Option<&ReceiverError>,
    ) -> DeploymentRecord {
        let detail = error.map(|e| ErrorDetail {
            code: e.code(),
            message: e.to_string(),
            correlation_id: correlation_id(),
        });
        self.finish_with(status, detail).await
    }

    async fn finish_with(
        mut self,
        status: DeploymentStatus,
        error: Option<ErrorDetail>,
    ) -> DeploymentRecord {
        self.record.status = status;
        self.record.error = error;
        self.record.finished_at = Some(now_rfc3339());
        self.save().await;
        self.state.metrics().deployment(status_label(status));
        match &self.record.error {
            None => {
                tracing::info!(deployment_id = %self.record.deployment_id, status = status_label(status), "deployment finished")
            }
            Some(e) => {
                tracing::warn!(deployment_id = %self.record.deployment_id, status = status_label(status), code = %e.code, error = %e.message, "deployment finished")
            }
        }
        self.record
    }
}
