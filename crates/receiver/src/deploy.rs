//! Deploying a container: the old container of the same name is stopped and set aside, the new one
//! is created, started and health-checked; healthy, the old one goes, otherwise the new one goes
//! and the old one comes back. Every step is written to the journal first, so that a receiver
//! killed mid-deploy can finish or undo it when it starts again (see [`reconcile`]).

mod containers;
pub mod health;
pub mod policy;
mod prune;
pub mod reconcile;
mod record;
mod replace;
mod rollback;
mod stopping;

pub use containers::aside_name;
pub use record::Deployment;
pub use rollback::roll_back;

use std::future::Future;
use std::time::Duration;

use bollard::Docker;
use deploy_protocol::api::{
    DeployRequest, DeploymentRecord, DeploymentStatus, LoadResponse, Stage, StageOutcome,
};
use deploy_protocol::{DeploymentSpec, HealthCheckKind, PackageManifest, ReleaseManifest};

use crate::docker::map_err;
use crate::error::{ReceiverError, Result};
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
    policy::check_policy(state.config(), &spec)?;
    let manifest = match request.package_id {
        Some(id) => state.store().get(id)?.map(|p| p.manifest),
        None => None,
    };
    let docker = state.docker().client().await?;
    let image_id = inspect_image(&docker, &image, &spec).await?;
    check_verified(state, &image, &image_id)?;
    let state = state.clone();
    detached(&state.clone(), async move {
        let _turn = state.container_lock(&spec.container_name).await;
        containers::refuse_unmanaged(&docker, &spec).await?;
        still_names(&docker, &image, &spec, &image_id).await?;
        let mut deployment = Deployment::begin(&state, &spec, &image, manifest.as_ref()).await?;
        deployment.record.package_id = deployment.record.package_id.or(request.package_id);
        deployment.record.image_id = Some(image_id);
        deployment.save().await;
        outcome(replace::replace(deployment, &docker, &spec, &image).await)
    })
    .await
}

/// Runs `work` in a task of its own and waits for it. A deployment goes on this way from the
/// moment its request's body has been read: a client that hangs up drops its request's future,
/// which would cut the deployment off halfway (a container started but never health-checked, its
/// record IN_PROGRESS until the receiver's next start); in a task of its own it ends, healthy or
/// rolled back, and is journaled either way.
/// The task keeps the request's correlation id (its records carry it) and its log span, and a
/// stop of the receiver waits for it (`AppState::deployment_tasks`, within SHUTDOWN_GRACE_SECS).
pub(crate) async fn detached<T: Send + 'static>(
    state: &AppState,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    use tracing::Instrument as _;
    let work = work.instrument(tracing::Span::current());
    let tasks = state.deployment_tasks();
    let task = match deploy_http::correlation_id() {
        Some(id) => tasks.spawn(deploy_http::with_correlation_id(id, work)),
        None => tasks.spawn(work),
    };
    task.await.map_err(|e| {
        ReceiverError::Internal(format!("the deployment's task ended abnormally: {e}"))
    })?
}

/// The spec `/deployment/full` runs for `manifest`: its `deployment` with `image` defaulting to
/// the first image tag, validated and within policy. Checked as soon as the manifest is
/// authenticated, before the package is read: a refused spec stores nothing.
pub fn full_spec(state: &AppState, manifest: &PackageManifest) -> Result<(DeploymentSpec, String)> {
    let spec = manifest.deployment.clone().ok_or_else(|| {
        ReceiverError::Validation(format!(
            "the manifest of package {} has no `deployment` spec, which /deployment/full needs (upload it with /deployment/upload, then /deployment/load and /deployment/deploy)",
            manifest.package_id
        ))
    })?;
    image_of(
        state,
        spec,
        &manifest.image_tags,
        "the manifest's",
        "the package's image_tags: /deployment/full runs the image its package loads",
    )
}

/// `spec` with `image` defaulting to the first of `tags`, validated and within policy, and (unless
/// ALLOW_UNVERIFIED_IMAGES) running one of `tags`; with the image. `named` says whose tags they
/// are in "neither deployment.image nor {named} image_tags", `rule` ends "deployment.image X is
/// not one of {rule}".
fn image_of(
    state: &AppState,
    mut spec: DeploymentSpec,
    tags: &[String],
    named: &str,
    rule: &str,
) -> Result<(DeploymentSpec, String)> {
    spec.image = spec.image.or_else(|| tags.first().cloned());
    let image = spec.image.clone().ok_or_else(|| {
        ReceiverError::Validation(format!(
            "neither deployment.image nor {named} image_tags name the image to run"
        ))
    })?;
    spec.validate().map_err(ReceiverError::Validation)?;
    policy::check_policy(state.config(), &spec)?;
    if !state.config().allow_unverified_images && !tags.contains(&image) {
        return Err(ReceiverError::PolicyDenied(format!(
            "deployment.image {image} is not one of {rule} (ALLOW_UNVERIFIED_IMAGES lets it run another)"
        )));
    }
    Ok((spec, image))
}

/// Refuses to run an image this receiver did not load from a verified package, unless
/// ALLOW_UNVERIFIED_IMAGES.
fn check_verified(state: &AppState, image: &str, image_id: &str) -> Result<()> {
    if state.config().allow_unverified_images || state.images().contains(image_id) {
        return Ok(());
    }
    Err(ReceiverError::PolicyDenied(format!(
        "image {image} ({image_id}) was not loaded by this receiver from a verified package: send its package first (ALLOW_UNVERIFIED_IMAGES lets it run images the host already has)"
    )))
}

/// `POST /deployment/full` after the upload: load the received package, then deploy the spec in
/// its manifest (`image` defaults to the first image tag) with health check and rollback.
pub async fn deploy_package(state: &AppState, received: Received) -> Result<DeploymentRecord> {
    let manifest = &received.package.manifest;
    let (spec, image) = full_spec(state, manifest)?;
    if let Ok(docker) = state.docker().client().await {
        containers::refuse_unmanaged(&docker, &spec).await?;
    }

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
    let load = crate::load::load_package(state, &received.package);
    load_and_replace(state, deployment, &spec, &image, load).await
}

/// The spec a release's `/deploy` runs: its `deployment` with `image` defaulting to the first
/// image tag, validated and within policy, checked before anything is loaded.
pub fn release_spec(
    state: &AppState,
    release: &ReleaseManifest,
) -> Result<(DeploymentSpec, String)> {
    let spec = release.deployment.clone().ok_or_else(|| {
        ReceiverError::Validation(format!(
            "release {} has no `deployment` spec, which /deploy needs (load it with /load instead)",
            release.release_id
        ))
    })?;
    image_of(
        state,
        spec,
        &release.image_tags,
        "the release's",
        "the release's image_tags: a release runs the image it loads",
    )
}

/// `POST /deployment/v2/releases/{id}/deploy`: load the release (LAYERS_MISSING, before any
/// record, when the engine lacks layers that were not received), then deploy the spec it signs
/// (`image` defaults to its first tag) with health check and rollback, as `/deployment/full`.
pub async fn deploy_release(
    state: &AppState,
    release: &ReleaseManifest,
    arrival: crate::v2::load::Arrival,
) -> Result<DeploymentRecord> {
    let (spec, image) = release_spec(state, release)?;
    if let Ok(docker) = state.docker().client().await {
        containers::refuse_unmanaged(&docker, &spec).await?;
    }
    let plan = crate::v2::load::plan(state, release, arrival).await?;
    let mut deployment =
        Deployment::begin_for(state, &spec, &image, Some((release.release_id, None))).await?;
    deployment.stage(
        Stage::Verify,
        StageOutcome::Ok,
        Duration::ZERO,
        Some(format!(
            "release {}: {} layer(s) held by the engine, {} {}",
            release.release_id,
            plan.omitted.len(),
            plan.plan.carried.len(),
            match arrival {
                crate::v2::load::Arrival::Received =>
                    "received and verified against the signed diffIDs",
                crate::v2::load::Arrival::Awaited =>
                    "received or arriving, each checked against its signed BLAKE3 and diffID as it loads",
            }
        )),
    );
    let load = crate::v2::load::load_release(state, release.release_id, arrival);
    load_and_replace(state, deployment, &spec, &image, load).await
}

/// The spec `/deployment/stream` runs for `manifest`: as [`full_spec`], checked as soon as the
/// manifest is authenticated, before a byte of the package is read.
pub fn stream_spec(
    state: &AppState,
    manifest: &deploy_protocol::stream::StreamManifest,
) -> Result<(DeploymentSpec, String)> {
    image_of(
        state,
        manifest.deployment.clone(),
        &manifest.image_tags,
        "the manifest's",
        "the package's image_tags: a streamed package runs the image it loads",
    )
}

/// The deployment of a streamed package (`/deployment/stream`), begun before its package is read.
pub(crate) async fn begin_streamed(
    state: &AppState,
    spec: &DeploymentSpec,
    image: &str,
    package_id: uuid::Uuid,
) -> Result<Deployment> {
    Deployment::begin_for(state, spec, image, Some((package_id, None))).await
}

/// Refuses to replace a container of the spec's name that this receiver does not manage.
pub(crate) async fn refuse_unmanaged(docker: &Docker, spec: &DeploymentSpec) -> Result<()> {
    containers::refuse_unmanaged(docker, spec).await
}

/// Runs `load`, then replaces the container with one of `image`, health-checked, rolled back on
/// failure; every step in `deployment`'s record.
pub(crate) async fn load_and_replace(
    state: &AppState,
    mut deployment: Deployment,
    spec: &DeploymentSpec,
    image: &str,
    load: impl Future<Output = Result<LoadResponse>>,
) -> Result<DeploymentRecord> {
    let timed = Deployment::time(Stage::Load);
    match load.await {
        Ok(loaded) => timed.ok(
            &mut deployment,
            format!(
                "loaded {} tagged {}",
                loaded.image_id,
                loaded.image_tags.join(", ")
            ),
        ),
        Err(e) => {
            timed.failed(&mut deployment, &e);
            let record = deployment.finish(DeploymentStatus::Failed, Some(&e)).await;
            // Layers that are not there (gone since the check, or an awaited blob that never
            // completed) are the client's to send: the same 409 as before the deployment began,
            // the FAILED record kept in the journal.
            if let ReceiverError::LayersMissing(missing) = e {
                tracing::info!(deployment_id = %record.deployment_id, "deployment failed: layers missing");
                return Err(ReceiverError::LayersMissing(missing));
            }
            return outcome(record);
        }
    }
    start_loaded(state, deployment, spec, image).await
}

/// The deployment of a loaded image: the image checked, then the container replaced under the
/// name's lock, health-checked, rolled back on failure.
async fn start_loaded(
    state: &AppState,
    mut deployment: Deployment,
    spec: &DeploymentSpec,
    image: &str,
) -> Result<DeploymentRecord> {
    let timed = Deployment::time(Stage::Start);
    let prepared = async {
        let docker = state.docker().client().await?;
        let id = inspect_image(&docker, image, spec).await?;
        check_verified(state, image, &id)?;
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
            timed.failed(&mut deployment, &e);
            return outcome(deployment.finish(DeploymentStatus::Failed, Some(&e)).await);
        }
    };
    let _turn = state.container_lock(&spec.container_name).await;
    let checked = match deployment.record.image_id.clone() {
        Some(id) => still_names(&docker, image, spec, &id).await,
        None => Ok(()),
    };
    if let Err(e) = checked.and(containers::refuse_unmanaged(&docker, spec).await) {
        let timed = Deployment::time(Stage::Start);
        timed.failed(&mut deployment, &e);
        return outcome(deployment.finish(DeploymentStatus::Failed, Some(&e)).await);
    }
    outcome(replace::replace(deployment, &docker, spec, image).await)
}

/// CONFLICT unless `image` still names `expected`, the image checked (and recorded) before the
/// name's turn came: meanwhile a load of another package may have moved the tag, and the
/// container would run an image this deployment neither checked nor records.
async fn still_names(
    docker: &Docker,
    image: &str,
    spec: &DeploymentSpec,
    expected: &str,
) -> Result<()> {
    let now = inspect_image(docker, image, spec).await?;
    if now == expected {
        return Ok(());
    }
    Err(ReceiverError::Conflict(format!(
        "{image} was moved from {} to {} (another package loaded with the same tag) while this \
         deployment waited for its turn on {}: deploy again to run what the tag names now",
        deploy_protocol::display::short(expected),
        deploy_protocol::display::short(&now),
        spec.container_name
    )))
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
