//! The receiver client: everything the sender says to a deploy-receiver over signed HTTP.
//!
//! - `upload`: a package file streamed as the signed multipart request of protocol v1.
//! - `releases`: protocol v2 calls (inventory, releases, load/deploy), signed in one place.
//! - `blobs`: resumable blob upload (`HEAD` / `PATCH` from the receiver's durable offset).

mod blobs;
mod releases;
mod upload;

pub use blobs::BlobOutcome;
pub use releases::{FinishError, ReleaseCalls};
pub use upload::{
    throughput_mbps, upload_package, upload_package_with_retry, Endpoint, ReceiverTarget,
    RetryPolicy, UploadOutcome,
};
