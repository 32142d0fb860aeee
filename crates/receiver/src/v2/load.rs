//! Loading a release: which layers the engine holds and which were received (anything else is
//! LAYERS_MISSING, named), the assembled archive through the tar gate into `docker load`, then
//! the check that the image Docker now has is the signed one. A failed load leaves the release's
//! tags where they were.

use std::time::Instant;

use bollard::image::{RemoveImageOptions, TagImageOptions};
use bollard::Docker;
use deploy_protocol::api::LoadResponse;
use deploy_protocol::{Compression, ReleaseManifest, Sha256Digest};
use uuid::Uuid;

use super::assemble::{self, BlobSource, CarriedLayer, Plan};
use crate::archive::Policy;
use crate::error::{ReceiverError, Result};
use crate::state::AppState;

/// How a release's layers will reach the engine.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    /// The archive plan.
    pub plan: Plan,
    /// diffIDs of the layers the engine holds (not carried).
    pub omitted: Vec<Sha256Digest>,
    /// Compressed bytes the omitted layers' blobs would have been.
    pub omitted_blob_bytes: u64,
}

/// The stored release `id`, or NOT_FOUND.
pub fn release(state: &AppState, id: Uuid) -> Result<ReleaseManifest> {
    state.layers().releases().get(id).ok_or_else(|| {
        ReceiverError::NotFound(format!(
            "no release {id} is registered here: POST /deployment/v2/releases first"
        ))
    })
}

/// Whether a load waits for blobs still on their way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Only complete blobs count; a layer without one is LAYERS_MISSING at once.
    Received,
    /// A blob not complete yet that the release's latest status told the client to send is read
    /// as it arrives (`?await_blobs=true`): its upload may run beside the load, which fails when
    /// no byte of it comes for UPLOAD_IDLE_TIMEOUT_SECS. Any other layer neither held nor
    /// received (e.g. present at registration, removed since) is LAYERS_MISSING at once.
    Awaited,
}

/// Which layers the engine holds now and which blobs are received (or, with
/// [`Arrival::Awaited`], will be read as they arrive); LAYERS_MISSING for the rest.
pub async fn plan(
    state: &AppState,
    manifest: &ReleaseManifest,
    arrival: Arrival,
) -> Result<LayerPlan> {
    let docker = state.docker().client().await?;
    let held = state.layers().chains().held(&docker).await?;
    let blobs = state.layers().blobs();
    let mut plan = LayerPlan {
        plan: Plan {
            carried: Vec::new(),
            sizes: Vec::new(),
        },
        omitted: Vec::new(),
        omitted_blob_bytes: 0,
    };
    let mut missing = Vec::new();
    // The blobs this load may wait for: those the release's latest status asked for.
    let awaited: std::sync::Arc<Vec<deploy_protocol::Checksum>> = match arrival {
        Arrival::Received => std::sync::Arc::default(),
        Arrival::Awaited => std::sync::Arc::new(
            manifest
                .layers
                .iter()
                .map(|l| l.blob.blake3)
                .filter(|b| state.layers().announced(manifest.release_id, b))
                .collect(),
        ),
    };
    for (layer, chain_id) in manifest.layers.iter().zip(manifest.chain_ids()) {
        let meta = blobs
            .meta(&layer.blob.blake3)
            .filter(|m| m.diff_id == layer.diff_id);
        let size = meta
            .map(|m| m.uncompressed_size)
            .or(layer.uncompressed_size)
            .unwrap_or(0);
        plan.plan.sizes.push(size);
        if held.contains(&chain_id) {
            plan.omitted.push(layer.diff_id);
            plan.omitted_blob_bytes += layer.blob.size;
        } else if let Some(meta) = meta {
            plan.plan.carried.push(CarriedLayer {
                diff_id: layer.diff_id,
                size: meta.uncompressed_size,
                source: BlobSource::Complete(blobs.complete_path(&layer.blob.blake3)),
                compression: layer.blob.compression,
            });
        } else if let (Some(size), true) = (
            layer.uncompressed_size,
            awaited.contains(&layer.blob.blake3),
        ) {
            plan.plan.carried.push(CarriedLayer {
                diff_id: layer.diff_id,
                size,
                source: BlobSource::Arriving {
                    store: std::sync::Arc::clone(blobs),
                    blob: layer.blob,
                    release_blobs: std::sync::Arc::clone(&awaited),
                    idle: std::time::Duration::from_secs(
                        state.config().upload_idle_timeout_secs.max(1),
                    ),
                },
                compression: layer.blob.compression,
            });
        } else {
            missing.push(layer.diff_id);
        }
    }
    if !missing.is_empty() {
        return Err(ReceiverError::LayersMissing(missing));
    }
    Ok(plan)
}

/// Loads release `id` (one load at a time) and checks the result.
pub async fn load_release(state: &AppState, id: Uuid, arrival: Arrival) -> Result<LoadResponse> {
    let manifest = release(state, id)?;
    let _turn = crate::load::load_turn().await;
    let started = Instant::now();
    let layer_plan = plan(state, &manifest, arrival).await?;
    let docker = state.docker().client().await?;
    let before = tag_targets(&docker, &manifest.image_tags).await;
    let omitted_paths: Vec<String> = layer_plan
        .omitted
        .iter()
        .map(|d| format!("blobs/sha256/{}", d.hex()))
        .collect();
    let policy = Policy {
        allowed_tags: manifest.image_tags.clone(),
        max_bytes: state.config().max_image_size,
        omitted_layers: omitted_paths,
    };
    let what = format!("release {id}");
    let carried: Vec<_> = layer_plan.plan.carried.clone();
    let reader = assemble::archive(&manifest, layer_plan.plan.clone());
    let loaded =
        crate::load::load_archive(state, &what, reader, Compression::None, None, policy).await;
    let checked = match loaded {
        Ok((_, image_id, tags)) => verify(&docker, &manifest, &image_id).await.map(|()| tags),
        Err(e) => Err(e),
    };
    let tags = match checked {
        Ok(tags) => tags,
        Err(e) => {
            restore_tags(&docker, &before).await;
            // A layer held at planning time may have been removed since: name it, not a failure.
            if let Err(missing @ ReceiverError::LayersMissing(_)) =
                plan(state, &manifest, Arrival::Received).await
            {
                return Err(missing);
            }
            return Err(e);
        }
    };
    state.layers().releases().mark_loaded(id);
    state.layers().forget_announced(id);
    let metrics = state.layers().metrics();
    metrics.skipped(
        layer_plan.omitted.len() as u64,
        layer_plan.omitted_blob_bytes,
    );
    for layer in &manifest.layers {
        if let Some(c) = carried.iter().find(|c| c.diff_id == layer.diff_id) {
            let blobs = state.layers().blobs();
            match c.source {
                BlobSource::Complete(_) => blobs.remove_complete(&layer.blob.blake3),
                // Its upload may still be checking it: removed once it completes.
                BlobSource::Arriving { .. } => {
                    remove_when_complete(std::sync::Arc::clone(blobs), layer.blob.blake3)
                }
            }
        }
    }
    let duration = started.elapsed();
    state.metrics().stage("load", duration.as_secs_f64());
    tracing::info!(release_id = %id, image_id = %manifest.image_id, carried = carried.len(), omitted = layer_plan.omitted.len(), elapsed_ms = duration.as_millis() as u64, "release loaded");
    Ok(LoadResponse {
        package_id: id,
        image_id: manifest.image_id.to_string(),
        image_tags: tags,
        duration_ms: duration.as_millis() as u64,
    })
}

/// Removes an awaited blob once its upload has finished with it (its own check and commit run
/// after the load read its last byte). A blob no writer finishes within a minute is left to the
/// sweep.
fn remove_when_complete(
    blobs: std::sync::Arc<super::blobs::BlobStore>,
    blake3: deploy_protocol::Checksum,
) {
    tokio::spawn(async move {
        for _ in 0..600 {
            match blobs.state(&blake3) {
                super::blobs::BlobState::Partial(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                super::blobs::BlobState::Complete(_) | super::blobs::BlobState::Missing => break,
            }
        }
        blobs.remove_complete(&blake3);
    });
}

/// The loaded image must be the signed one: same id, same RootFS layers, every tag on it.
async fn verify(docker: &Docker, manifest: &ReleaseManifest, loaded_id: &str) -> Result<()> {
    let signed = manifest.image_id.to_string();
    if loaded_id != signed {
        return Err(ReceiverError::LoadFailed(format!(
            "Docker loaded image {loaded_id}, not the signed {signed}"
        )));
    }
    let inspect = docker.inspect_image(&signed).await.map_err(|e| {
        crate::docker::map_err(e, |m| {
            ReceiverError::LoadFailed(format!(
                "the loaded image {signed} cannot be inspected: {m}"
            ))
        })
    })?;
    let layers = inspect.root_fs.and_then(|r| r.layers).unwrap_or_default();
    let signed_layers: Vec<String> = manifest
        .diff_ids()
        .iter()
        .map(ToString::to_string)
        .collect();
    if layers != signed_layers {
        return Err(ReceiverError::LoadFailed(format!(
            "the loaded image's RootFS layers {layers:?} differ from the signed {signed_layers:?}"
        )));
    }
    for tag in &manifest.image_tags {
        let id = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
        if id.as_deref() != Some(signed.as_str()) {
            return Err(ReceiverError::LoadFailed(format!(
                "tag {tag} names {id:?} after the load, not the signed {signed}"
            )));
        }
    }
    Ok(())
}

/// What each tag names now (None: nothing).
async fn tag_targets(docker: &Docker, tags: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for tag in tags {
        let id = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
        out.push((tag.clone(), id));
    }
    out
}

/// Puts tags back where they were before a failed load.
async fn restore_tags(docker: &Docker, before: &[(String, Option<String>)]) {
    for (tag, old) in before {
        let now = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
        if now == *old {
            continue;
        }
        let result = match old {
            Some(old) => {
                let (repo, tag_part) = tag.rsplit_once(':').unwrap_or((tag.as_str(), "latest"));
                docker
                    .tag_image(
                        old,
                        Some(TagImageOptions {
                            repo,
                            tag: tag_part,
                        }),
                    )
                    .await
            }
            None => docker
                .remove_image(
                    tag,
                    Some(RemoveImageOptions {
                        force: false,
                        noprune: true,
                    }),
                    None,
                )
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => tracing::info!(tag, "tag restored after a failed release load"),
            Err(e) => {
                tracing::warn!(tag, error = %e, "could not restore a tag after a failed release load")
            }
        }
    }
}
