//! What the receiver answers about its engine and a release: the inventory, per-layer state,
//! and the body of `LAYERS_MISSING`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Sha256Digest;
use crate::{Checksum, ErrorDetail};

/// Most chain IDs one inventory request may ask about.
pub const MAX_INVENTORY_CHAIN_IDS: usize = 4096;

/// `POST /deployment/v2/inventory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InventoryRequest {
    /// Chain IDs to look up, at most [`MAX_INVENTORY_CHAIN_IDS`].
    pub chain_ids: Vec<Sha256Digest>,
}

/// Which image store the engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ImageStore {
    /// The classic graph-driver store (overlay2, fuse-overlayfs, ...).
    Graphdriver,
    /// Docker's containerd image store (`containerd.snapshotter` in `docker info`).
    Containerd,
}

/// Answer to [`InventoryRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InventoryResponse {
    /// The engine's version, e.g. `20.10.24`.
    pub engine_version: String,
    /// The engine's image store.
    pub image_store: ImageStore,
    /// The asked chain IDs the engine holds, in the order asked.
    pub present: Vec<Sha256Digest>,
}

/// Where one layer of a release stands on the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// The engine holds this chain ID: nothing to send.
    Present,
    /// The blob is complete and verified in the receiver's blob store.
    Received,
    /// `offset` bytes of the blob are held durably; send the rest from there.
    Partial,
    /// Nothing held: send the whole blob.
    Missing,
}

/// One layer in a [`ReleaseStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LayerStatus {
    /// The layer's diffID.
    pub diff_id: Sha256Digest,
    /// Its chain ID in this image.
    pub chain_id: Sha256Digest,
    /// The blob that carries it.
    pub blake3: Checksum,
    /// The blob's size.
    pub size: u64,
    /// Where it stands.
    pub state: LayerState,
    /// Durable bytes of the blob held (the size when received, 0 when present or missing).
    pub offset: u64,
}

/// `POST /deployment/v2/releases` and `GET /deployment/v2/releases/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseStatus {
    /// The release.
    pub release_id: Uuid,
    /// Its image id.
    pub image_id: Sha256Digest,
    /// Per layer, bottom first.
    pub layers: Vec<LayerStatus>,
}

impl ReleaseStatus {
    /// The blobs the receiver still needs (state `partial` or `missing`), each once.
    pub fn blobs_to_send(&self) -> Vec<&LayerStatus> {
        let mut seen = std::collections::HashSet::new();
        self.layers
            .iter()
            .filter(|l| matches!(l.state, LayerState::Partial | LayerState::Missing))
            .filter(|l| seen.insert(l.blake3))
            .collect()
    }
}

/// The 409 body of `LAYERS_MISSING`: the usual error plus the diffIDs to send before retrying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LayersMissingBody {
    /// Code `LAYERS_MISSING`, with the diffIDs in the message too.
    pub error: ErrorDetail,
    /// The layers neither the engine holds nor the blob store has, bottom first.
    pub missing_diff_ids: Vec<Sha256Digest>,
}
