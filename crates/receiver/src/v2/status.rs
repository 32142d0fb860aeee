//! A release's status: per layer, held by the engine, received, partial (with its durable
//! offset) or missing.

use deploy_protocol::{LayerState, LayerStatus, ReleaseManifest, ReleaseStatus};

use super::blobs::BlobState;
use crate::error::Result;
use crate::state::AppState;

/// Where each layer of `manifest` stands now. The blobs it reports partial or missing are
/// remembered as the ones the client will send ([`super::Layers::announce`]).
pub async fn status(state: &AppState, manifest: &ReleaseManifest) -> Result<ReleaseStatus> {
    let docker = state.docker().client().await?;
    let held = state.layers().chains().held(&docker).await?;
    let blobs = state.layers().blobs();
    let layers: Vec<LayerStatus> = manifest
        .layers
        .iter()
        .zip(manifest.chain_ids())
        .map(|(layer, chain_id)| {
            let (state, offset) = if held.contains(&chain_id) {
                (LayerState::Present, 0)
            } else {
                match blobs.state(&layer.blob.blake3) {
                    BlobState::Complete(meta) if meta.diff_id == layer.diff_id => {
                        (LayerState::Received, layer.blob.size)
                    }
                    BlobState::Partial(n) if n > 0 => (LayerState::Partial, n.min(layer.blob.size)),
                    _ => (LayerState::Missing, 0),
                }
            };
            LayerStatus {
                diff_id: layer.diff_id,
                chain_id,
                blake3: layer.blob.blake3,
                size: layer.blob.size,
                state,
                offset,
            }
        })
        .collect();
    state.layers().announce(
        manifest.release_id,
        layers
            .iter()
            .filter(|l| matches!(l.state, LayerState::Partial | LayerState::Missing))
            .map(|l| l.blake3)
            .collect(),
    );
    Ok(ReleaseStatus {
        release_id: manifest.release_id,
        image_id: manifest.image_id,
        layers,
    })
}
