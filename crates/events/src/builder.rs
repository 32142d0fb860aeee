//! [`EventBuilder`]: fills id, time and source; the caller adds what it knows.

use deploy_protocol::events::{EventType, LifecycleEvent};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::Result;
use crate::outbox::Seq;
use crate::sink::EventSink;

/// An event being put together; from [`EventSink::event`].
#[derive(Debug)]
#[must_use = "an event is recorded only by `publish`"]
pub struct EventBuilder {
    sink: EventSink,
    event: LifecycleEvent,
}

impl EventBuilder {
    pub(crate) fn new(sink: EventSink, event_type: EventType, source_service: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            sink,
            event: LifecycleEvent {
                event_id: Uuid::new_v4(),
                event_type,
                // Only years outside 0..=9999 fail to format.
                time: now
                    .format(&Rfc3339)
                    .unwrap_or_else(|_| now.unix_timestamp().to_string()),
                correlation_id: None,
                package_id: None,
                container_name: None,
                image_tag: None,
                source_service: source_service.to_owned(),
                payload: serde_json::Value::Null,
            },
        }
    }

    /// Correlation id of the operation.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.event.correlation_id = Some(id.into());
        self
    }

    /// Package id; also the Kafka message key.
    pub fn package_id(mut self, id: Uuid) -> Self {
        self.event.package_id = Some(id);
        self
    }

    /// Container name.
    pub fn container_name(mut self, name: impl Into<String>) -> Self {
        self.event.container_name = Some(name.into());
        self
    }

    /// Image tag.
    pub fn image_tag(mut self, tag: impl Into<String>) -> Self {
        self.event.image_tag = Some(tag.into());
        self
    }

    /// Event-specific data.
    pub fn payload(mut self, payload: serde_json::Value) -> Self {
        self.event.payload = payload;
        self
    }

    /// The event, without recording it.
    pub fn build(self) -> LifecycleEvent {
        self.event
    }

    /// Records the event; see [`EventSink::publish`].
    pub async fn publish(self) -> Result<Seq> {
        self.sink.publish(self.event).await
    }
}
