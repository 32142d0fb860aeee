//! Lifecycle events that never slow down or fail a deployment, and are never lost.
//!
//! [`EventSink::publish`] appends the event to a durable local outbox and returns; a background
//! task delivers the outbox to Kafka (topic `KAFKA_TOPIC`, key = package id or else event id,
//! value = the [`LifecycleEvent`] as JSON) with an idempotent producer (`enable.idempotence=true`,
//! `acks=all`). While the broker is unreachable events wait in the outbox, also across restarts.
//! Without bootstrap servers the outbox is the sink: events are recorded and [`EventSink::list`]
//! reads them back.
//!
//! ```no_run
//! # async fn example(package_id: uuid::Uuid) -> Result<(), deploy_events::EventError> {
//! use deploy_events::{EventConfig, EventSink, EventType};
//! use std::time::Duration;
//!
//! let config = EventConfig {
//!     bootstrap_servers: Some("localhost:9092".into()), // None: the outbox is the sink
//!     ..EventConfig::new("/var/lib/deploy-sender", "deploy-sender")
//! };
//! let sink = EventSink::open(config).await?; // clone it into the AppState
//! sink.event(EventType::BuildStarted).package_id(package_id).correlation_id("c-1").publish().await?;
//! let _recent = sink.list(50); // GET /api/v1/events
//! let _health = (sink.destination(), sink.stats()); // /health, /metrics
//! let _ = sink.flush(Duration::from_secs(5)).await; // graceful shutdown: deliver what is left
//! sink.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Outbox format
//!
//! In the state directory:
//! - `events.jsonl`: one `{"seq":N,"event":{...}}` line per event, appended and `fdatasync`ed
//!   (with group commit: publishers that arrive while a sync is running are written together by
//!   the next one). `seq` grows by one per event and is never reused.
//! - `events.cursor`: the decimal `seq` up to which the broker has acknowledged every event,
//!   replaced atomically (write `events.cursor.tmp`, fsync, rename, fsync the directory).
//!
//! One log plus a cursor, rather than a file per event, keeps a publish to (a share of) one
//! `write` and one `fdatasync` on one file (no directory update per event) and makes reading in
//! order trivial.
//!
//! # Why nothing is lost
//!
//! - `publish` returns `Ok` only after the whole line is written and `fdatasync` returned, or,
//!   with Kafka, after the broker acknowledged the event with `acks=all`, whichever comes first.
//!   The event is handed to the producer as soon as it has its `seq`, so delivery runs alongside
//!   the write instead of after it; a slow sync (on a shared disk its p99 can be 5 ms and more)
//!   then delays no caller whose event the broker already holds, and the write still finishes in
//!   the background (`shutdown` waits for it). Either way the event is safe: on the disk, to be
//!   delivered after a crash, or on the broker. A crash before either can leave only a torn last
//!   line without its newline, which `open` cuts off (that publish never succeeded).
//! - A failed write is truncated away at once and its events are forgotten; each of their
//!   publishers gets the error unless the broker had already acknowledged its event. (One
//!   already handed to the producer may still reach the broker: an error means "not recorded",
//!   not "certainly not delivered".)
//! - The cursor only moves over events the broker acknowledged with `acks=all`, and only over a
//!   gap-free prefix; it is written after the acknowledgement, so a crash in between redelivers
//!   (never skips) those events: delivery is at least once across restarts and consumers
//!   deduplicate on `event_id`. Within one process each event is produced once, and the
//!   idempotent producer keeps its internal retries from duplicating or reordering it.
//! - Compaction rewrites the log into `events.jsonl.tmp` (fsync, rename over, fsync the directory)
//!   and drops only events that are acknowledged *and* older than the newest `retain`, so the
//!   log stays bounded at about `2 * retain` lines plus whatever the broker has not taken yet.
//!   Without Kafka nothing waits for a broker, and only the newest `retain` are kept.
//! - Events recorded while Kafka was not configured stay beyond the cursor: if a later start has
//!   bootstrap servers, the retained ones are delivered then.
//!
//! One sink per state directory: a second `open` in the same process waits for the first to be
//! dropped (up to 5 s). Two processes must not share a state directory.

mod builder;
mod delivery;
mod error;
mod housekeeping;
mod outbox;
mod sink;
mod stats;

pub use builder::EventBuilder;
pub use deploy_protocol::events::{EventType, LifecycleEvent, DEFAULT_TOPIC};
pub use error::{EventError, Result};
pub use outbox::{Seq, CURSOR_FILE, LOG_FILE, MAX_EVENT_BYTES};
pub use sink::{
    EventConfig, EventSink, DEFAULT_DELIVERY_TIMEOUT, DEFAULT_PRODUCER_REPLACE_AFTER,
    DEFAULT_RETAIN,
};
pub use stats::EventStats;

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>(_: &T) {}

    /// The sink lives in axum state and its futures run in handlers: all must be `Send`.
    /// Checked by compiling, never run.
    #[allow(dead_code)]
    fn sink_and_its_futures_are_send(sink: &EventSink) {
        send_sync(sink);
        send_sync(&sink.publish(sink.event(EventType::BuildStarted).build()));
        send_sync(&sink.event(EventType::BuildStarted).publish());
        send_sync(&sink.flush(std::time::Duration::ZERO));
        send_sync(&sink.shutdown());
        send_sync(&EventSink::open(EventConfig::new("/", "x")));
    }
}
