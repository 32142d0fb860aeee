//! The receiver client: everything the sender says to a deploy-receiver over signed HTTP.
//!
//! - `upload`: a package file streamed as the signed multipart request of protocol v1.

mod upload;

pub use upload::{
    throughput_mbps, upload_package, upload_package_with_retry, Endpoint, ReceiverTarget,
    RetryPolicy, UploadOutcome,
};
