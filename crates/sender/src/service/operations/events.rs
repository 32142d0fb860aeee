//! `publish_transfer_event`: record a lifecycle event in the outbox.

use deploy_events::EventType;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::service::state::AppState;

/// `publish_transfer_event`: record a lifecycle event (delivered to Kafka when configured).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventInput {
    /// Kind of event.
    pub event_type: EventType,
    /// Event-specific data, a JSON object (`event_payload` is accepted as another name for it).
    #[serde(default, alias = "event_payload")]
    #[schema(value_type = Object)]
    pub payload: serde_json::Map<String, serde_json::Value>,
    /// Correlation id (default: the request's).
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// Package id; the Kafka message key.
    #[serde(default)]
    pub package_id: Option<Uuid>,
    /// Container name.
    #[serde(default)]
    pub container_name: Option<String>,
    /// Image tag.
    #[serde(default)]
    pub image_tag: Option<String>,
}

/// What `publish_transfer_event` reports.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct PublishedEvent {
    /// Always true: the event is durably recorded (Kafka delivery follows in the background).
    pub event_published: bool,
    /// The event's id.
    pub event_id: Uuid,
    /// Its position in the outbox.
    pub sequence: u64,
    /// The Kafka topic.
    pub topic: String,
    /// Where events go: `kafka://HOSTS/TOPIC` or `outbox:PATH`.
    pub destination: String,
}

/// Records `input` as an event from this service.
pub(crate) async fn publish(
    state: &AppState,
    input: EventInput,
    correlation_id: Option<String>,
) -> Result<PublishedEvent, deploy_events::EventError> {
    let sink = state.events().sink();
    let mut builder = sink
        .event(input.event_type)
        .payload(serde_json::Value::Object(input.payload));
    if let Some(id) = input.correlation_id.or(correlation_id) {
        builder = builder.correlation_id(id);
    }
    if let Some(id) = input.package_id {
        builder = builder.package_id(id);
    }
    if let Some(name) = input.container_name {
        builder = builder.container_name(name);
    }
    if let Some(tag) = input.image_tag {
        builder = builder.image_tag(tag);
    }
    let event = builder.build();
    let event_id = event.event_id;
    match sink.publish(event).await {
        Ok(seq) => Ok(PublishedEvent {
            event_published: true,
            event_id,
            sequence: seq.0,
            topic: state.config().events.kafka_topic.clone(),
            destination: sink.destination(),
        }),
        // An event too large to ever be accepted is the client's error, not the outbox's.
        Err(e @ deploy_events::EventError::TooLarge { .. }) => Err(e),
        Err(e) => {
            state.events().count_failure();
            Err(e)
        }
    }
}
