//! Errors of the event sink. Only [`EventError::Record`] and [`EventError::TooLarge`] can come
//! out of `publish`; delivery problems never do (they are retried from the outbox).

use std::path::PathBuf;
use std::time::Duration;

/// Something the event sink could not do.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The outbox file could not be read, written or fsynced.
    #[error("cannot {action} the event outbox at {}: {source}; is the state directory writable and the disk not full?", path.display())]
    Record {
        /// What was being done, e.g. "append to".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The event is too large to ever be accepted by Kafka, so it is refused up front.
    #[error("event {event_id} is {size} bytes as JSON, more than the {limit}-byte limit; shorten its payload")]
    TooLarge {
        /// Id of the refused event.
        event_id: uuid::Uuid,
        /// Its size as JSON.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Another sink in this process has the same state directory open.
    #[error("the event outbox in {} is already open in this process; open one EventSink per state directory and clone it", .0.display())]
    AlreadyOpen(PathBuf),
    /// The Kafka producer could not be configured.
    #[error("invalid Kafka producer configuration: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The configuration is unusable.
    #[error("invalid event configuration: {0}")]
    Config(String),
    /// `flush` or `wait_delivered` ran out of time.
    #[error("{pending} events still waiting for Kafka after {waited:?}; is the broker reachable?")]
    Timeout {
        /// How long was waited.
        waited: Duration,
        /// Events recorded but not yet acknowledged by the broker.
        pending: u64,
    },
    /// A blocking outbox operation panicked or was cancelled.
    #[error("outbox worker failed: {0}")]
    Worker(String),
}

/// Result alias of this crate.
pub type Result<T, E = EventError> = std::result::Result<T, E>;
