//! Protocol v2: the layer, not the image, is the unit of transfer.
//!
//! The sender asks which chain IDs the receiver's engine holds ([`InventoryRequest`]), registers
//! a signed [`ReleaseManifest`] that binds the image config and every layer (diffID and blob
//! BLAKE3), uploads only the blobs the receiver lacks, resumably (`HEAD`/`PATCH` with
//! [`UPLOAD_OFFSET`]), then asks the receiver to load or deploy the release. See
//! docs/PROTOCOL.md, "Protocol v2".

mod digest;
mod manifest;
mod status;

pub use digest::{chain_ids, DigestError, Sha256Digest};
pub use manifest::{
    BlobRef, LayerEntry, ReleaseManifest, MAX_RELEASE_LAYERS, MAX_RELEASE_MANIFEST_BYTES,
};
pub use status::{
    ImageStore, InventoryRequest, InventoryResponse, LayerState, LayerStatus, LayersMissingBody,
    ReleaseStatus, MAX_INVENTORY_CHAIN_IDS,
};

/// Header: the durable byte offset of a blob (request: where this `PATCH` starts; response: how
/// many bytes the receiver holds durably).
pub const UPLOAD_OFFSET: &str = "Upload-Offset";
/// Header: the blob's total size as signed in its release, on `HEAD` responses.
pub const UPLOAD_LENGTH: &str = "Upload-Length";
/// Content type of a `PATCH` body.
pub const BLOB_CONTENT_TYPE: &str = "application/offset+octet-stream";

/// Paths of the v2 endpoints (all under `/deployment/v2/`).
pub mod paths {
    use uuid::Uuid;

    use crate::Checksum;

    /// `POST`: which of these chain IDs the engine holds.
    pub const INVENTORY: &str = "/deployment/v2/inventory";
    /// `POST`: register a release manifest.
    pub const RELEASES: &str = "/deployment/v2/releases";

    /// `GET`: a release's status.
    pub fn release(id: Uuid) -> String {
        format!("{RELEASES}/{id}")
    }

    /// `POST`: assemble and `docker load` a release.
    pub fn release_load(id: Uuid) -> String {
        format!("{RELEASES}/{id}/load")
    }

    /// `POST`: load a release, then deploy, health-check and roll back like `/deployment/full`.
    pub fn release_deploy(id: Uuid) -> String {
        format!("{RELEASES}/{id}/deploy")
    }

    /// `HEAD` (durable offset) and `PATCH` (append from that offset) of one blob.
    pub fn blob(blake3: &Checksum) -> String {
        format!("/deployment/v2/blobs/{blake3}")
    }
}

#[cfg(test)]
mod kat_tests;
