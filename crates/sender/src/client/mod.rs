//! The receiver client: everything the sender says to a deploy-receiver, as a
//! [`ReceiverClient`] (an HTTP client and one receiver with the key to sign for it).
//!
//! - `target`: [`ReceiverTarget`] (base URL, key) and the [`Endpoint`]s below it.
//! - `sign`: the HMAC envelope on a request, written once for every signed call.
//! - `upload`: a package file streamed as the signed multipart request of protocol v1.
//! - `deploy`: an upload to `/deployment/full`, answered with the receiver's deployment record.
//! - `get`: plain and signed GETs (the doctor's checks, a rollout's look at what runs).
//! - `rollback`: `POST /deployments/{id}/rollback` (a fleet rollout undoing a host).
//! - `retry`: which failures are transient, and how often to try again.
//! - `releases`: protocol v2 calls (inventory, releases, load/deploy), signed in one place.
//! - `blobs`: resumable blob upload (`HEAD` / `PATCH` from the receiver's durable offset).

mod blobs;
mod deploy;
mod get;
mod releases;
mod retry;
mod rollback;
mod sign;
mod target;
mod upload;

pub use blobs::BlobOutcome;
pub use deploy::TransferStats;
pub use releases::{FinishError, ReleaseCalls};
pub use retry::RetryPolicy;
pub use target::{Endpoint, ReceiverTarget};
pub use upload::{throughput_mbps, Upload, UploadOutcome};

/// A deploy-receiver and the HTTP client to reach it. Cheap to clone (the HTTP client is shared).
#[derive(Clone, Debug)]
pub struct ReceiverClient {
    http: reqwest::Client,
    target: ReceiverTarget,
}

impl ReceiverClient {
    /// A client for `target` over `http` (whose connection pool, timeouts and trusted CAs apply).
    pub fn new(http: reqwest::Client, target: ReceiverTarget) -> Self {
        Self { http, target }
    }

    /// The receiver this client talks to.
    pub fn target(&self) -> &ReceiverTarget {
        &self.target
    }
}
