//! Lifecycle events as they appear on the Kafka topic (JSON value, key = package id).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default topic.
pub const DEFAULT_TOPIC: &str = "deployment.lifecycle";

/// Kinds of lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    /// Sender: an image build started.
    BuildStarted,
    /// Sender: a package was built and stored.
    BuildCompleted,
    /// Sender: a build or packaging failed.
    BuildFailed,
    /// Sender: an upload to a receiver started.
    TransferStarted,
    /// Sender: an upload finished and the receiver verified it.
    TransferCompleted,
    /// Sender: an upload failed.
    TransferFailed,
    /// Receiver: a deployment started.
    DeploymentStarted,
    /// Receiver: the new container is healthy.
    DeploymentCompleted,
    /// Either side: a deployment failed.
    DeploymentFailed,
    /// Receiver: the new container failed and the previous one was restored.
    DeploymentRolledBack,
    /// Sender: a fleet rollout started (payload: hosts and plan).
    RolloutStarted,
    /// Sender: a rollout step (canary or batch) ended healthy.
    RolloutBatchCompleted,
    /// Sender: every step of a rollout ran.
    RolloutCompleted,
    /// Sender: a rollout stopped and the hosts it moved were rolled back.
    RolloutRolledBack,
    /// Sender: a rollout stopped and the fleet is not back where it was (no rollback asked, or a
    /// rollback failed).
    RolloutFailed,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LifecycleEvent {
    /// Unique id; consumers deduplicate on it.
    pub event_id: Uuid,
    /// Kind.
    pub event_type: EventType,
    /// RFC 3339 time of the event.
    pub time: String,
    /// Correlation id of the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Package id (also the message key); on the layer-aware path, which makes no package, the
    /// release id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_id: Option<Uuid>,
    /// Container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// Image tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tag: Option<String>,
    /// `deploy-sender` or `deploy-receiver`.
    pub source_service: String,
    /// Event-specific data.
    #[serde(default)]
    pub payload: serde_json::Value,
}
