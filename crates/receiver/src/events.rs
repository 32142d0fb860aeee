//! Deployment lifecycle events: DEPLOYMENT_STARTED when a deployment is journaled, then
//! DEPLOYMENT_COMPLETED, DEPLOYMENT_ROLLED_BACK or DEPLOYMENT_FAILED when it ends, keyed by package
//! id, through the durable outbox of `deploy-events` (delivered to Kafka when
//! KAFKA_BOOTSTRAP_SERVERS is set).
//!
//! Events never fail or hold up a deployment: publishing returns once the event is fsynced in the
//! outbox, and a failure to record it is logged and counted
//! (`deploy_receiver_event_record_failures_total`), never returned. The sink is opened on first
//! use (its `open` is async while `AppState::new` is not) and again after a failed open.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deploy_events::{EventConfig, EventSink, EventStats, EventType};
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::config::Config;
use crate::metrics::{EventStatsCollector, Metrics};

/// The `source_service` of the receiver's events.
pub const SOURCE_SERVICE: &str = "deploy-receiver";
/// How long a graceful shutdown waits for Kafka to take the events still in the outbox.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// Longest error message carried in an event (the journal keeps the whole of it).
const MAX_MESSAGE_CHARS: usize = 4096;

/// The receiver's handle on its event sink. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    config: EventConfig,
    sink: Arc<OnceCell<EventSink>>,
    metrics: Metrics,
    open_error: Arc<Mutex<Option<String>>>,
}

impl Events {
    /// Events of `config` (outbox in `STATE_DIR/events`), not yet opened. Registers the sink's
    /// counters with `metrics`.
    pub fn new(config: &Config, metrics: Metrics) -> prometheus::Result<Self> {
        let event_config = EventConfig {
            bootstrap_servers: config.kafka_bootstrap_servers.clone(),
            topic: config.kafka_topic.clone(),
            ..EventConfig::new(config.state_dir().join("events"), SOURCE_SERVICE)
        };
        let sink: Arc<OnceCell<EventSink>> = Arc::default();
        let cell = sink.clone();
        metrics.register(Box::new(EventStatsCollector::new(move || {
            cell.get().map(EventSink::stats).unwrap_or_default()
        })?))?;
        Ok(Self {
            config: event_config,
            sink,
            metrics,
            open_error: Arc::default(),
        })
    }

    /// The sink, opened on first use; `None` (logged) when it cannot be opened.
    pub async fn sink(&self) -> Option<&EventSink> {
        let opened = self
            .sink
            .get_or_try_init(|| EventSink::open(self.config.clone()))
            .await;
        let mut open_error = self
            .open_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match opened {
            Ok(sink) => {
                *open_error = None;
                Some(sink)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the lifecycle event outbox; events are not recorded");
                *open_error = Some(e.to_string());
                None
            }
        }
    }

    /// Where events go (`kafka://HOSTS/TOPIC` or `outbox:PATH`), or why they cannot be recorded.
    pub async fn destination(&self) -> Result<String, String> {
        match self.sink().await {
            Some(sink) => Ok(sink.destination()),
            None => Err(self
                .open_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_else(|| "the event outbox could not be opened".into())),
        }
    }

    /// The sink's counters (zero before it is opened).
    pub fn stats(&self) -> EventStats {
        self.sink.get().map(EventSink::stats).unwrap_or_default()
    }

    /// Records the event for a deployment's current status: STARTED while in progress, then
    /// COMPLETED, ROLLED_BACK or FAILED. Never fails: a recording failure is logged and counted.
    pub async fn deployment(&self, record: &DeploymentRecord) {
        let event_type = match record.status {
            DeploymentStatus::InProgress => EventType::DeploymentStarted,
            DeploymentStatus::Succeeded => EventType::DeploymentCompleted,
            DeploymentStatus::RolledBack => EventType::DeploymentRolledBack,
            DeploymentStatus::Failed => EventType::DeploymentFailed,
        };
        let Some(sink) = self.sink().await else {
            self.metrics.event_record_failure();
            return;
        };
        let mut event = sink
            .event(event_type)
            .container_name(&record.container_name)
            .image_tag(&record.image)
            .payload(payload(record));
        if let Some(id) = record.package_id {
            event = event.package_id(id);
        }
        if let Some(id) = record
            .correlation_id
            .clone()
            .or_else(crate::error::correlation_id)
        {
            event = event.correlation_id(id);
        }
        if let Err(e) = event.publish().await {
            self.metrics.event_record_failure();
            tracing::error!(deployment_id = %record.deployment_id, event = ?event_type, error = %e, "lifecycle event not recorded; the deployment goes on");
        }
    }

    /// Graceful shutdown: gives Kafka up to `timeout` to take what is recorded, then stops the
    /// delivery task. What is left stays in the outbox for the next start.
    pub async fn close(&self, timeout: Duration) {
        let Some(sink) = self.sink.get() else {
            return;
        };
        if let Err(e) = sink.flush(timeout).await {
            tracing::warn!(error = %e, "lifecycle events left in the outbox for the next start");
        }
        sink.shutdown().await;
    }
}

/// The event's payload: what a consumer needs to follow the deployment without the journal.
fn payload(record: &DeploymentRecord) -> serde_json::Value {
    let mut stage_durations_ms: BTreeMap<String, u64> = BTreeMap::new();
    for report in &record.stages {
        let stage = serde_json::to_value(report.stage)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *stage_durations_ms.entry(stage).or_default() += report.duration_ms;
    }
    let error = record.error.as_ref();
    json!({
        "deployment_id": record.deployment_id,
        "status": record.status,
        "image": record.image,
        "image_id": record.image_id,
        "package_checksum": record.package_checksum,
        "container_id": record.container_id,
        "previous_container_id": record.previous_container_id,
        "rollback_of": record.rollback_of,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "stage_durations_ms": stage_durations_ms,
        "duration_ms": stage_durations_ms.values().sum::<u64>(),
        "error_code": error.map(|e| e.code),
        "error_message": error.map(|e| e.message.chars().take(MAX_MESSAGE_CHARS).collect::<String>()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploy_protocol::api::{Stage, StageOutcome, StageReport};
    use deploy_protocol::{ErrorCode, ErrorDetail};

    fn record(status: DeploymentStatus) -> DeploymentRecord {
        DeploymentRecord {
            deployment_id: uuid::Uuid::new_v4(),
            status,
            container_name: "web".into(),
            image: "web:1".into(),
            image_id: None,
            package_id: Some(uuid::Uuid::new_v4()),
            package_checksum: None,
            container_id: None,
            previous_container_id: None,
            correlation_id: Some("corr-1".into()),
            started_at: "2025-01-01T00:00:00Z".into(),
            finished_at: None,
            stages: vec![
                StageReport {
                    stage: Stage::Upload,
                    outcome: StageOutcome::Ok,
                    duration_ms: 5,
                    detail: None,
                },
                StageReport {
                    stage: Stage::Health,
                    outcome: StageOutcome::Failed,
                    duration_ms: 7,
                    detail: None,
                },
            ],
            error: Some(ErrorDetail {
                code: ErrorCode::HealthCheckFailed,
                message: "not healthy".into(),
                correlation_id: None,
            }),
            spec: None,
            rollback_of: None,
        }
    }

    fn config(dir: &std::path::Path) -> Config {
        let mut config = Config::for_dir(dir.join("packages"), "secret");
        config.state_dir = Some(dir.join("state"));
        config
    }

    #[tokio::test]
    async fn each_status_is_recorded_as_its_event_type_with_the_payload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = Events::new(&config(dir.path()), Metrics::new().expect("m")).expect("events");
        for status in [
            DeploymentStatus::InProgress,
            DeploymentStatus::Succeeded,
            DeploymentStatus::RolledBack,
            DeploymentStatus::Failed,
        ] {
            events.deployment(&record(status)).await;
        }
        let sink = events.sink().await.expect("sink");
        assert!(sink.destination().starts_with("outbox:"));
        let listed = sink.list(10);
        let types: Vec<_> = listed.iter().rev().map(|e| e.event_type).collect();
        assert_eq!(
            types,
            [
                EventType::DeploymentStarted,
                EventType::DeploymentCompleted,
                EventType::DeploymentRolledBack,
                EventType::DeploymentFailed
            ]
        );
        let last = &listed[0];
        assert_eq!(last.source_service, SOURCE_SERVICE);
        assert_eq!(last.correlation_id.as_deref(), Some("corr-1"));
        assert_eq!(last.container_name.as_deref(), Some("web"));
        assert_eq!(last.image_tag.as_deref(), Some("web:1"));
        assert!(last.package_id.is_some());
        assert_eq!(last.payload["status"], "FAILED");
        assert_eq!(last.payload["error_code"], "HEALTH_CHECK_FAILED");
        assert_eq!(last.payload["stage_durations_ms"]["health"], 7);
        assert_eq!(last.payload["duration_ms"], 12);
        assert_eq!(events.stats().recorded, 4);
        events.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn an_event_that_cannot_be_recorded_is_counted_not_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = config(dir.path());
        std::fs::create_dir_all(config.state_dir()).expect("state dir");
        // A file where the outbox directory should be: the sink cannot open.
        std::fs::write(config.state_dir().join("events"), b"not a directory").expect("file");
        let metrics = Metrics::new().expect("m");
        let events = Events::new(&config, metrics.clone()).expect("events");
        events
            .deployment(&record(DeploymentStatus::InProgress))
            .await;
        assert!(metrics
            .render()
            .contains("deploy_receiver_event_record_failures_total 1"));
        assert!(events.destination().await.is_err());
    }
}
