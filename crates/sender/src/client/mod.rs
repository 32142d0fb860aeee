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
//! - `stream`: a package streamed as it is made (`/deployment/stream`), sealed at its end.

mod blobs;
mod deploy;
mod get;
mod releases;
mod retry;
mod rollback;
mod sign;
mod stream;
mod target;
mod upload;

pub use blobs::BlobOutcome;
pub use deploy::TransferStats;
pub use releases::{FinishError, ReleaseCalls};
pub use retry::RetryPolicy;
pub use stream::StreamFailure;
pub use target::{Endpoint, ReceiverTarget};
pub use upload::{throughput_mbps, Upload, UploadOutcome};

/// Blobs of one release uploaded at once unless configured (DEPLOY_BLOB_CONNECTIONS).
pub const DEFAULT_BLOB_CONNECTIONS: usize = 1;

/// A deploy-receiver and the HTTP client to reach it. Cheap to clone (the HTTP client is shared).
#[derive(Clone, Debug)]
pub struct ReceiverClient {
    http: reqwest::Client,
    target: ReceiverTarget,
    await_blobs: bool,
    blob_connections: usize,
    stream_cold: bool,
}

impl ReceiverClient {
    /// A client for `target` over `http` (whose connection pool, timeouts and trusted CAs apply).
    /// Release loads overlap their blob uploads (see [`Self::with_await_blobs`]).
    pub fn new(http: reqwest::Client, target: ReceiverTarget) -> Self {
        Self {
            http,
            target,
            await_blobs: true,
            blob_connections: DEFAULT_BLOB_CONNECTIONS,
            stream_cold: true,
        }
    }

    /// Whether a deploy to a host that holds none of the image's layers streams the image
    /// (`/deployment/stream`) when the layer cache lacks it (DEPLOY_STREAM_COLD).
    pub fn with_stream_cold(mut self, stream_cold: bool) -> Self {
        self.stream_cold = stream_cold;
        self
    }

    /// Whether a release's load or deploy is asked for right after registering, beside the blob
    /// uploads (`?await_blobs=true`: the receiver loads the blobs as they arrive), or only once
    /// every blob is sent (DEPLOY_AWAIT_BLOBS=false).
    pub fn with_await_blobs(mut self, await_blobs: bool) -> Self {
        self.await_blobs = await_blobs;
        self
    }

    /// Most blobs of one release uploaded at once, each on its own connection (at least 1;
    /// DEPLOY_BLOB_CONNECTIONS). Blobs start bottom layer first either way.
    pub fn with_blob_connections(mut self, connections: usize) -> Self {
        self.blob_connections = connections.max(1);
        self
    }

    /// The receiver this client talks to.
    pub fn target(&self) -> &ReceiverTarget {
        &self.target
    }
}
