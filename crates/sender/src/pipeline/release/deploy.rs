//! Deploying a release in one call: build (if asked), stream to a cold host or prepare the
//! layers, send them and deploy, with the lifecycle events.

use std::sync::Arc;

use uuid::Uuid;

use super::super::build::build_image;
use super::super::deploy::{DeployFailure, DeployRequest};
use super::super::events::{Lifecycle, Subject};
use super::super::layers::{prepare_image, LayerCache, PreparedImage};
use super::super::package::{ImageSource, PackageRequest};
use super::{release_manifest, send_manifest, ReleaseAction, ReleaseOutcome};
use crate::client::ReleaseCalls;
use crate::pipeline::progress::Progress;
use crate::SenderError;

/// Builds the image of `request` if asked, prepares its layers in `cache` and deploys it to
/// `target` as a release (only the layers the target lacks travel). The layer-aware counterpart
/// of [`deploy`](super::deploy::deploy), recording the same lifecycle events (BUILD_*, TRANSFER_*,
/// DEPLOYMENT_FAILED) keyed by the release id; a failure carries no package (there is none).
pub async fn deploy_release(
    docker: &bollard::Docker,
    cache: &LayerCache,
    calls: ReleaseCalls<'_>,
    request: &DeployRequest,
    progress: Arc<dyn Progress>,
    events: &Lifecycle,
) -> Result<ReleaseOutcome, DeployFailure> {
    let fail = |error| DeployFailure {
        package: None,
        error,
    };
    let mut check = request.deployment.clone();
    check.image = None;
    check
        .validate()
        .map_err(|e| fail(SenderError::Validation(e)))?;
    let release_id = Uuid::new_v4();
    let subject = Subject {
        package_id: Some(release_id),
        correlation_id: request.correlation_id.clone(),
        container_name: Some(request.deployment.container_name.clone()),
        image_tag: Some(request.package.source.reference().to_owned()),
    };
    events.build_started(&subject, &request.package).await;
    let reference = match &request.package.source {
        ImageSource::Build(spec) => {
            let built = build_image(docker, spec, &*progress).await;
            if let Err(e) = &built {
                events
                    .layers_prepared(&subject, &request.package, Err(e))
                    .await;
            }
            built.map_err(fail)?.tag
        }
        ImageSource::Existing(reference) => reference.clone(),
    };
    let receiver = calls.target.base_url.to_string();

    // A host that holds none of the image's layers, of an image the layer cache lacks: stream it.
    if calls.stream_cold {
        let attempt = super::super::stream::StreamAttempt {
            docker,
            cache,
            calls: &calls,
            request,
            reference: &reference,
            release_id,
            subject: &subject,
            receiver: &receiver,
        };
        if let Some(done) = attempt.run(Arc::clone(&progress), events).await {
            return done.map_err(fail);
        }
    }

    let prepared = prepare_image(
        docker,
        cache,
        &reference,
        &request.package.compression,
        Arc::clone(&progress),
    )
    .await;
    events
        .layers_prepared(&subject, &request.package, prepared.as_ref())
        .await;
    let image = prepared.map_err(fail)?;

    events
        .transfer_started(&subject, &receiver, "release", image.total_blob_bytes())
        .await;
    let action = ReleaseAction::Deploy(Box::new(request.deployment.clone()));
    let mut manifest = release_manifest(&image, &action).map_err(fail)?;
    manifest.release_id = release_id;
    let sent = send_manifest(calls, &image, manifest, &action, progress).await;
    match &sent {
        Ok(outcome) => {
            events
                .release_transferred(&subject, &receiver, outcome)
                .await
        }
        Err(error @ SenderError::Deployment(record)) => {
            // Every layer reached the receiver and was verified; the deployment failed.
            events
                .deployment_failed(&subject, &receiver, error, record)
                .await;
        }
        Err(error) => events.transfer_failed(&subject, &receiver, error).await,
    }
    sent.map_err(fail)
}

/// Builds (for [`ImageSource::Build`]) or takes the image, and prepares its layers.
pub async fn prepare_source(
    docker: &bollard::Docker,
    cache: &LayerCache,
    request: &PackageRequest,
    progress: Arc<dyn Progress>,
) -> Result<PreparedImage, SenderError> {
    let reference = match &request.source {
        ImageSource::Build(spec) => build_image(docker, spec, &*progress).await?.tag,
        ImageSource::Existing(reference) => reference.clone(),
    };
    prepare_image(docker, cache, &reference, &request.compression, progress).await
}
