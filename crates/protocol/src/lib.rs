//! `deploy-protocol`: the contract between `deploy-sender` and `deploy-receiver`.
//!
//! Wire types, stable error codes, the package manifest, multipart part names and the HMAC request
//! envelope of protocol v1, and the layer-aware, resumable protocol v2 (`release`; see `docs/PROTOCOL.md`). It knows nothing of HTTP servers, Docker or Kafka.

pub mod api;
pub mod checksum;
pub mod deployment;
pub mod display;
pub mod envelope;
pub mod error_code;
pub mod events;
pub mod manifest;
pub mod multipart;
pub mod release;
pub mod stream;

pub use checksum::{Checksum, ChecksumError};
pub use deployment::{
    DeploymentSpec, HealthCheckKind, HealthCheckSpec, PortMapping, PortProtocol, RestartPolicy,
};
pub use envelope::{AuthError, KeyRing, SignatureHeaders};
pub use error_code::{ErrorBody, ErrorCode, ErrorDetail};
pub use manifest::{Compression, ManifestError, PackageManifest};
pub use release::{
    chain_ids, BlobRef, ImageStore, InventoryRequest, InventoryResponse, LayerEntry, LayerState,
    LayerStatus, LayersMissingBody, ReleaseManifest, ReleaseStatus, Sha256Digest,
};

/// Version of the wire protocol this crate implements.
pub const PROTOCOL_VERSION: &str = "1";
