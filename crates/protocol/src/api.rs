//! Request and response bodies of the receiver's endpoints.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Checksum, DeploymentSpec, ErrorDetail, HealthCheckSpec, PackageManifest};

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HealthResponse {
    /// `healthy`, or `degraded` when Docker is unreachable.
    pub status: String,
    /// `deploy-receiver`.
    pub service: String,
    /// Crate version.
    pub version: String,
    /// Protocol version (`1`).
    pub protocol_version: String,
    /// Always `standalone` for now.
    pub mode: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Free bytes in the package directory.
    pub free_bytes: u64,
    /// Whether the Docker engine answered a ping.
    pub docker_available: bool,
    /// The engine's version, when reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_version: Option<String>,
    /// Where lifecycle events go (`kafka://...` or the local outbox path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
    /// Lifecycle events recorded and not yet acknowledged by Kafka (0 without Kafka).
    #[serde(default)]
    pub events_pending: u64,
    /// The latest Kafka delivery error, until a delivery succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_last_error: Option<String>,
    /// Configuration the operator should fix (e.g. no allowlist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Whether an upload stored new bytes or found the same package already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StoreOutcome {
    /// The package was stored by this request.
    Created,
    /// The same package id with the same checksum was already stored (idempotent repeat).
    Existing,
}

/// `POST /deployment/upload` and `POST /deployment/receive`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadResponse {
    /// Package id.
    pub package_id: Uuid,
    /// Bytes stored.
    pub package_size: u64,
    /// Verified BLAKE3 of the stored bytes.
    pub package_checksum: Checksum,
    /// Always true in a success response: the bytes hashed to the signed checksum.
    pub checksum_verified: bool,
    /// Created now or already there.
    pub outcome: StoreOutcome,
    /// Time spent receiving and verifying, in milliseconds.
    pub duration_ms: u64,
    /// Receive rate in MB/s (10^6 bytes per second).
    pub throughput_mbps: f64,
}

/// `POST /deployment/receive`: register a package already on the receiver's disk (copied there
/// by other means than an upload). The path must resolve inside the package directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Path of the package file, absolute or relative to the package directory.
    pub package_path: String,
    /// What the file must hash to, and what it may tag.
    pub manifest: PackageManifest,
}

/// `POST /deployment/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// A stored package.
    pub package_id: Uuid,
}

/// Result of loading a package into Docker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoadResponse {
    /// Package id.
    pub package_id: Uuid,
    /// Image id Docker reports, `sha256:...`.
    pub image_id: String,
    /// Tags set by the load.
    pub image_tags: Vec<String>,
    /// Milliseconds.
    pub duration_ms: u64,
}

/// `POST /deployment/deploy`: a spec, and optionally the package it came from (for labels).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// What to run; `image` is required here.
    pub deployment: DeploymentSpec,
    /// The package the image came from, recorded in labels and the journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_id: Option<Uuid>,
}

/// `POST /deployment/health-check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HealthCheckRequest {
    /// Container to wait for.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
    )]
    pub container_name: String,
    /// How to check; defaults apply.
    #[serde(default)]
    pub health_check: HealthCheckSpec,
}

/// Result of a health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HealthCheckResponse {
    /// Container name.
    pub container_name: String,
    /// Whether it became healthy in time.
    pub healthy: bool,
    /// The check that was applied (`docker`, `http`, `none`).
    pub kind: String,
    /// Last probe output or Docker health log line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Milliseconds waited.
    pub duration_ms: u64,
}

/// A pipeline stage of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Receiving the package bytes.
    Upload,
    /// Checking size and checksum.
    Verify,
    /// `docker load`.
    Load,
    /// Creating and starting the container (and setting the old one aside).
    Start,
    /// Waiting for the container to be healthy.
    Health,
    /// Restoring the previous container after a failure.
    Rollback,
    /// Removing the old container and pruning old images.
    Cleanup,
}

/// How a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StageOutcome {
    /// Done.
    Ok,
    /// Failed.
    Failed,
    /// Not needed.
    Skipped,
}

/// One stage's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StageReport {
    /// Which stage.
    pub stage: Stage,
    /// How it ended.
    pub outcome: StageOutcome,
    /// Milliseconds.
    pub duration_ms: u64,
    /// Detail for people (bytes, image id, health output...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Where a deployment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeploymentStatus {
    /// Under way.
    InProgress,
    /// The new container runs and is healthy.
    Succeeded,
    /// The new container failed; the previous one was restored.
    RolledBack,
    /// Failed with nothing to roll back to (or before touching any container).
    Failed,
}

/// A deployment as recorded in the receiver's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeploymentRecord {
    /// Deployment id.
    pub deployment_id: Uuid,
    /// Status.
    pub status: DeploymentStatus,
    /// Container name.
    pub container_name: String,
    /// Image reference that was run.
    pub image: String,
    /// Image id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Package the image came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_id: Option<Uuid>,
    /// Checksum of that package.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_checksum: Option<Checksum>,
    /// The new container's id, when it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The container it replaced, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_container_id: Option<String>,
    /// Correlation id of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Stage reports in order.
    pub stages: Vec<StageReport>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    /// The spec that was run (with `image` set), so that a later rollback can run it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<DeploymentSpec>,
    /// When this deployment re-ran an earlier one to roll back deployment `rollback_of`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<Uuid>,
}

/// `POST /deployments/{id}/rollback`: what the receiver did to undo a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RollbackOutcome {
    /// The deployment that preceded it for the same container name runs again, healthy
    /// (`deployment` is the record of that re-run).
    Restored,
    /// It was the first deployment of its name: its container was removed.
    Removed,
    /// It never took effect (it was rolled back or failed by itself): nothing to undo.
    NotApplied,
}

/// `POST /deployments/{id}/rollback` answer. Repeating the call answers the same outcome
/// (`repeated` is then true) without touching a container again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RollbackResponse {
    /// The deployment that was undone.
    pub rolled_back: Uuid,
    /// What was done.
    pub outcome: RollbackOutcome,
    /// True when an earlier call had already done it.
    pub repeated: bool,
    /// The image that runs under the name now, as the earlier deployment named it (`RESTORED`),
    /// or that ran before (`NOT_APPLIED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The record of the re-run deployment (`RESTORED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentRecord>,
}

/// `GET /deployments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeploymentList {
    /// Newest first.
    pub deployments: Vec<DeploymentRecord>,
}
