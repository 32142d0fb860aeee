//! The sender's lifecycle events (BUILD_*, TRANSFER_*, DEPLOYMENT_*) through the durable
//! [`EventSink`], recorded by the CLI and the service alike. Recording an event never fails or slows the operation it describes beyond the
//! local append: a recording failure is logged and counted, and the operation goes on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploy_events::{EventConfig, EventSink, EventType};
use deploy_protocol::api::DeploymentRecord;
use serde_json::json;
use uuid::Uuid;

use super::compress::CompressionOptions;
use super::layers::PreparedImage;
use super::package::{ImageSource, PackageRequest};
use super::release::ReleaseOutcome;
use super::store::PackageInfo;
use crate::client::TransferStats;
use crate::SenderError;

/// `source_service` of the sender's events.
pub const SOURCE_SERVICE: &str = "deploy-sender";

/// How long a graceful shutdown waits for Kafka to take the events still in the outbox.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// What an event is about: filled into every event of one operation.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    /// Package id (the Kafka key).
    pub package_id: Option<Uuid>,
    /// Correlation id of the request.
    pub correlation_id: Option<String>,
    /// Container name.
    pub container_name: Option<String>,
    /// Image tag.
    pub image_tag: Option<String>,
}

/// The service's event sink plus a count of events that could not be recorded.
#[derive(Clone, Debug)]
pub struct Lifecycle {
    sink: EventSink,
    record_failures: Arc<AtomicU64>,
}

impl Lifecycle {
    /// Opens the outbox in `state_dir`, delivering to Kafka when `bootstrap_servers` is set.
    pub async fn open(
        state_dir: std::path::PathBuf,
        bootstrap_servers: Option<String>,
        topic: String,
    ) -> Result<Self, SenderError> {
        let shown = state_dir.display().to_string();
        let config = EventConfig {
            bootstrap_servers,
            topic,
            ..EventConfig::new(state_dir, SOURCE_SERVICE)
        };
        let sink = EventSink::open(config).await.map_err(|e| {
            SenderError::Internal(format!(
                "cannot open the event outbox in {shown} (SENDER_STATE_DIR): {e}"
            ))
        })?;
        Ok(Self {
            sink,
            record_failures: Arc::default(),
        })
    }

    /// The sink, for explicit publishing, listing, stats and health.
    pub fn sink(&self) -> &EventSink {
        &self.sink
    }

    /// Events that could not be recorded since start.
    pub fn record_failures(&self) -> u64 {
        self.record_failures.load(Ordering::Relaxed)
    }

    /// Records a lifecycle event about `subject`; a failure is logged and counted, never returned.
    pub async fn emit(&self, event_type: EventType, subject: &Subject, payload: serde_json::Value) {
        let mut builder = self.sink.event(event_type).payload(payload);
        if let Some(id) = subject.package_id {
            builder = builder.package_id(id);
        }
        if let Some(id) = &subject.correlation_id {
            builder = builder.correlation_id(id.clone());
        }
        if let Some(name) = &subject.container_name {
            builder = builder.container_name(name.clone());
        }
        if let Some(tag) = &subject.image_tag {
            builder = builder.image_tag(tag.clone());
        }
        if let Err(e) = builder.publish().await {
            self.record_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(event_type = ?event_type, error = %e, "lifecycle event not recorded");
        }
    }

    /// Counts an explicit publish that could not be recorded (the caller reports it).
    pub fn count_failure(&self) {
        self.record_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives Kafka a moment to take what is left, then stops delivery (the rest stays in the
    /// outbox for the next start).
    pub async fn close(&self) {
        if let Err(e) = self.sink.flush(SHUTDOWN_FLUSH).await {
            tracing::warn!(error = %e, "events left in the outbox for the next start");
        }
        self.sink.shutdown().await;
    }

    /// BUILD_STARTED for packaging `request`.
    pub async fn build_started(&self, subject: &Subject, request: &PackageRequest) {
        let source = match request.source {
            ImageSource::Build(_) => "dockerfile",
            ImageSource::Existing(_) => "image",
        };
        let payload = json!({ "source": source, "compression": request.compression.compression });
        self.emit(EventType::BuildStarted, subject, payload).await;
    }

    /// BUILD_COMPLETED with the package, or BUILD_FAILED with the error.
    pub async fn build_finished(
        &self,
        subject: &Subject,
        result: Result<&PackageInfo, &SenderError>,
    ) {
        match result {
            Ok(info) => {
                let subject = Subject {
                    container_name: info.container_name.clone(),
                    ..subject.clone()
                };
                let payload = json!({ "image_id": info.image_id, "package_size": info.package_size,
                        "package_size_mb": info.package_size_mb,
                        "package_checksum": info.package_checksum,
                        "compression": info.compression,
                        "build_duration_ms": info.build_duration_ms,
                        "export_duration_ms": info.export_duration_ms });
                self.emit(EventType::BuildCompleted, &subject, payload)
                    .await;
            }
            Err(e) => {
                self.emit(EventType::BuildFailed, subject, error_payload(e))
                    .await
            }
        }
    }

    /// BUILD_COMPLETED with the release's image and what preparing its layers cost, or
    /// BUILD_FAILED with the error (the layer-aware path, which makes no package).
    pub async fn layers_prepared(
        &self,
        subject: &Subject,
        request: &PackageRequest,
        result: Result<&PreparedImage, &SenderError>,
    ) {
        match result {
            Ok(image) => {
                let stats = &image.stats;
                let payload = json!({ "image_id": image.image_id, "layers": image.layers.len(),
                        "blob_bytes": image.total_blob_bytes(),
                        "compression": request.compression.compression,
                        "exported": stats.exported,
                        "compressed_layers": stats.compressed_layers,
                        "cached_layers": stats.cached_layers,
                        "prepare_duration_ms": stats.duration_ms });
                self.emit(EventType::BuildCompleted, subject, payload).await;
            }
            Err(e) => {
                self.emit(EventType::BuildFailed, subject, error_payload(e))
                    .await
            }
        }
    }

    /// BUILD_COMPLETED of an image about to be streamed to a cold host: it is exported and
    /// compressed during the transfer, so nothing was prepared (`"mode": "stream"`).
    pub async fn stream_ready(
        &self,
        subject: &Subject,
        compression: &CompressionOptions,
        image_id: &str,
        layers: usize,
    ) {
        let payload = json!({ "image_id": image_id, "layers": layers, "mode": "stream",
                "compression": compression.compression,
                "compression_level": compression.level, "exported": false });
        self.emit(EventType::BuildCompleted, subject, payload).await;
    }

    /// TRANSFER_COMPLETED of a release: every layer reached `receiver`, which loaded and
    /// deployed it.
    pub async fn release_transferred(
        &self,
        subject: &Subject,
        receiver: &str,
        outcome: &ReleaseOutcome,
    ) {
        let totals = &outcome.totals;
        let payload = json!({ "receiver": receiver, "bytes": totals.bytes_sent,
                "bytes_total": totals.bytes_total,
                "percent_already_there": totals.percent_already_there,
                "duration_ms": outcome.transfer_duration_ms,
                "release_id": outcome.release_id,
                "remote_deployment_id": outcome.deployment.as_ref().map(|d| d.deployment_id) });
        self.emit(EventType::TransferCompleted, subject, payload)
            .await;
    }

    /// TRANSFER_STARTED of a package to `receiver`'s `endpoint` (`upload` or `full`).
    pub async fn transfer_started(
        &self,
        subject: &Subject,
        receiver: &str,
        endpoint: &str,
        package_size: u64,
    ) {
        let payload =
            json!({ "receiver": receiver, "endpoint": endpoint, "package_size": package_size });
        self.emit(EventType::TransferStarted, subject, payload)
            .await;
    }

    /// TRANSFER_COMPLETED: the package reached `receiver` (which answered with deployment
    /// `remote_deployment_id`).
    pub async fn transfer_completed(
        &self,
        subject: &Subject,
        receiver: &str,
        transfer: &TransferStats,
        remote_deployment_id: Option<Uuid>,
    ) {
        let payload = json!({ "receiver": receiver, "bytes": transfer.bytes,
                "duration_ms": transfer.request_duration_ms,
                "remote_deployment_id": remote_deployment_id });
        self.emit(EventType::TransferCompleted, subject, payload)
            .await;
    }

    /// TRANSFER_FAILED: the package did not reach `receiver`, or was refused before it ran.
    pub async fn transfer_failed(&self, subject: &Subject, receiver: &str, e: &SenderError) {
        let mut payload = error_payload(e);
        payload["receiver"] = json!(receiver);
        self.emit(EventType::TransferFailed, subject, payload).await;
    }

    /// DEPLOYMENT_FAILED: `receiver` ran the deployment of `record`, and it failed with `e`.
    pub async fn deployment_failed(
        &self,
        subject: &Subject,
        receiver: &str,
        e: &SenderError,
        record: &DeploymentRecord,
    ) {
        let mut payload = error_payload(e);
        payload["receiver"] = json!(receiver);
        payload["deployment_id"] = json!(record.deployment_id);
        payload["status"] = json!(record.status);
        self.emit(EventType::DeploymentFailed, subject, payload)
            .await;
    }
}

/// `{"code", "message"}` of an error, the payload of a *_FAILED event.
pub fn error_payload(e: &SenderError) -> serde_json::Value {
    json!({ "code": e.code(), "message": e.to_string() })
}
