//! `package_container`: build (or take) an image and store it as a package, with events and metrics.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use deploy_protocol::Compression;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::pipeline::PackageInfo;
use crate::pipeline::Progress;
use crate::pipeline::Subject;
use crate::pipeline::{package_image, FrontDoor, ImageSource, PackageParts, PackageRequest};
use crate::service::jobs::Job;
use crate::service::metrics::OK;
use crate::service::state::AppState;
use crate::SenderError;

use super::serde_defaults::yes;

/// `package_container`: build an image from a Dockerfile (or take an existing one) and store it
/// as a compressed, hashed package.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PackageInput {
    /// Container the package is for; with a bare `image_tag` it also names the image
    /// (`container_name:image_tag`).
    #[serde(default)]
    pub container_name: Option<String>,
    /// Tag of the image to build: `name:tag`, or just `tag` (then the name is `container_name`).
    #[serde(default)]
    pub image_tag: Option<String>,
    /// Dockerfile on this host, relative to `build_context` unless absolute (default `Dockerfile`).
    #[serde(default)]
    pub dockerfile_path: Option<String>,
    /// Build context directory on this host.
    #[serde(default)]
    pub build_context: Option<String>,
    /// `--build-arg` values.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Package this existing local image (`name:tag` or an id) instead of building one.
    #[serde(default)]
    pub image: Option<String>,
    /// `zstd` (default), `gzip` or `none`.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// gzip 1-9 (default 1), zstd 1-19 (default 3); ignored with `none`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 19)]
    pub compression_level: Option<i32>,
    /// Re-hash the stored package and compare with the checksum computed while writing it.
    #[serde(default = "yes")]
    pub verify_checksum: bool,
    /// Package id (default: a new UUID).
    #[serde(default)]
    pub package_id: Option<Uuid>,
}

/// A stored package as `package_container` reports it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct PackageOutput {
    /// The package.
    #[serde(flatten)]
    pub package: PackageInfo,
    /// Whether the stored file was re-hashed and matched (`verify_checksum`).
    pub checksum_verified: bool,
}

/// A checked packaging request, ready to run.
#[derive(Debug, Clone)]
pub(crate) struct PackagePlan {
    request: PackageRequest,
    verify: bool,
    subject: Subject,
}

impl PackageInput {
    /// Checks the input and turns it into a plan (`VALIDATION_ERROR` naming what is wrong).
    pub(crate) fn plan(
        self,
        zstd_workers: Option<u32>,
        max_package_size: u64,
    ) -> Result<PackagePlan, SenderError> {
        // The document's rules (PackageRequest) that the shared PackageParts rule is looser
        // about: an `image` given is not blank, and a level is 1-19 whatever the compression.
        if self.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            return Err(SenderError::Validation(
                "`image` is empty: name an image, or leave `image` out to build one".into(),
            ));
        }
        if let Some(level) = self.compression_level.filter(|l| !(1..=19).contains(l)) {
            return Err(SenderError::Validation(format!(
                "compression_level {level} is out of range 1-19 (gzip 1-9)"
            )));
        }
        let package_id = self.package_id.unwrap_or_else(Uuid::new_v4);
        let request = PackageParts {
            image: self.image,
            context: self.build_context.map(PathBuf::from),
            dockerfile: self.dockerfile_path.map(PathBuf::from),
            tag: self.image_tag,
            build_args: self.build_args,
            container_name: self.container_name,
            package_id: Some(package_id),
            compression: self.compression,
            level: self.compression_level,
            zstd_workers,
            max_package_size: Some(max_package_size),
        }
        .request(FrontDoor::Api)?;
        let image_tag = request.source.reference().to_owned();
        // The name the package will carry when none is given (as `package_image` picks it), so
        // that BUILD_STARTED names the container as the events after it do.
        let container_name = request.container_name.clone().or_else(|| {
            (!image_tag.starts_with("sha256:")).then(|| crate::default_container_name(&image_tag))
        });
        Ok(PackagePlan {
            subject: Subject {
                package_id: Some(package_id),
                correlation_id: None,
                container_name,
                image_tag: Some(image_tag),
            },
            request,
            verify: self.verify_checksum,
        })
    }
}

/// Runs a packaging plan, with BUILD_STARTED, then BUILD_COMPLETED or BUILD_FAILED.
pub(crate) async fn package(
    state: AppState,
    plan: PackagePlan,
    correlation_id: Option<String>,
    progress: Arc<Job>,
) -> Result<PackageOutput, SenderError> {
    let subject = Subject {
        correlation_id,
        ..plan.subject.clone()
    };
    let building = matches!(plan.request.source, ImageSource::Build(_));
    let events = state.events();
    events.build_started(&subject, &plan.request).await;
    let result = run_package(&state, &plan, progress).await;
    match &result {
        Ok(out) => {
            let info = &out.package;
            state.metrics().build(OK);
            if building {
                state
                    .metrics()
                    .stage("build", info.build_duration_ms as f64 / 1e3);
            }
            state
                .metrics()
                .stage("export", info.export_duration_ms as f64 / 1e3);
            events.build_finished(&subject, Ok(info)).await;
        }
        Err(e) => {
            state.metrics().build(e.code().as_str());
            events.build_finished(&subject, Err(e)).await;
        }
    }
    result
}

async fn run_package(
    state: &AppState,
    plan: &PackagePlan,
    progress: Arc<Job>,
) -> Result<PackageOutput, SenderError> {
    let _slot = state.package_slot(progress.as_ref()).await?;
    let docker = state.docker().await?;
    let (store, request) = (state.store().clone(), plan.request.clone());
    let runtime = tokio::runtime::Handle::current();
    let reporter = progress.clone();
    // gzip (and zstd without workers) compress inside `poll_write`: the whole pipeline runs on a
    // blocking-pool thread so that it never holds up the runtime's workers serving requests.
    let info = tokio::task::spawn_blocking(move || {
        runtime.block_on(async move {
            package_image(
                &docker,
                &store,
                &request,
                reporter.as_ref() as &dyn Progress,
            )
            .await
        })
    })
    .await
    .map_err(|e| SenderError::Internal(format!("the packaging task failed: {e}")))??;
    state
        .config()
        .store
        .retain(state.store(), info.package_id)
        .await;
    let checksum_verified = if plan.verify {
        state.store().verify(info.package_id).await?;
        true
    } else {
        false
    };
    Ok(PackageOutput {
        package: info,
        checksum_verified,
    })
}
