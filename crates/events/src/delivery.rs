//! The background task that delivers the outbox to Kafka in order with an idempotent producer.
//!
//! It keeps up to [`WINDOW`] events in flight. When one fails (broker unreachable past
//! `message.timeout.ms`, or any other error) it stops sending, collects the results of what is
//! still in flight, backs off, and resends from the first unacknowledged event, skipping those
//! acknowledged meanwhile, so one process never produces an event twice; the idempotent producer
//! removes duplicates of its own retries.
//!
//! A producer in a fatal state is replaced at once, and so is one whose deliveries have all failed
//! for `replace_after`: a broker that restarted without its producer state (memory storage, a
//! lost log) answers an idempotent producer's old id with `UNKNOWN_PRODUCER_ID` forever, and only
//! a new producer (a new producer id) gets through. The outbox makes that safe: the new producer
//! resends from the first unacknowledged event, so an event the broker took without the
//! acknowledgement reaching us may arrive twice (at least once; consumers deduplicate on
//! `event_id`), and none is lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::outbox::{Entry, Outbox};
use crate::stats::Counters;

/// Events handed to librdkafka and not yet acknowledged, at most.
const WINDOW: usize = 1000;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub(crate) type KafkaProducer = FutureProducer<SinkContext>;

/// Routes librdkafka's logs and errors to tracing and to `last_error`.
pub(crate) struct SinkContext {
    counters: Arc<Counters>,
}

impl ClientContext for SinkContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error; events wait in the outbox");
        self.counters
            .set_last_error(Some(format!("{error}: {reason}")));
    }
}

/// librdkafka settings: the caller's extras first, then the ones the outbox's guarantees rest on.
pub(crate) fn producer_config(
    bootstrap_servers: &str,
    client_id: &str,
    delivery_timeout: Duration,
    extra: &[(String, String)],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("client.id", client_id)
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().max(1).to_string(),
        )
        // Lifecycle events are few and someone may be waiting on them; bursts still batch,
        // since messages queue up while a request is in flight.
        .set("linger.ms", "1");
    for (key, value) in extra {
        config.set(key, value);
    }
    config.set("enable.idempotence", "true").set("acks", "all");
    config
}

pub(crate) struct Delivery {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) config: ClientConfig,
    pub(crate) topic: String,
    /// A producer whose deliveries have all failed for this long is replaced by a new one.
    pub(crate) replace_after: Duration,
}

impl Delivery {
    pub(crate) fn producer(&self) -> Result<KafkaProducer, KafkaError> {
        self.config.create_with_context(SinkContext {
            counters: self.counters.clone(),
        })
    }

    /// Runs until `stop` turns true or its sender is dropped.
    pub(crate) async fn run(self, producer: KafkaProducer, mut stop: watch::Receiver<bool>) {
        let mut producer = Some(producer);
        let mut inflight: VecDeque<(u64, DeliveryFuture)> = VecDeque::new();
        let mut sent_up_to = self.outbox.delivered();
        let mut failing = false;
        let mut backoff = BACKOFF_MIN;
        // When the current producer's unbroken run of failures began.
        let mut failing_since: Option<Instant> = None;

        loop {
            let Some(active) = producer.as_ref() else {
                match self.producer() {
                    Ok(p) => producer = Some(p),
                    Err(e) => {
                        self.counters
                            .set_last_error(Some(format!("cannot create Kafka producer: {e}")));
                        if sleep_or_stop(&mut stop, &mut backoff).await {
                            break;
                        }
                    }
                }
                continue;
            };

            if !failing && inflight.len() < WINDOW {
                for entry in self
                    .outbox
                    .pending_after(sent_up_to, WINDOW - inflight.len())
                {
                    match self.send(active, &entry) {
                        Ok(future) => {
                            inflight.push_back((entry.seq, future));
                            sent_up_to = entry.seq;
                        }
                        Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                            if !inflight.is_empty() =>
                        {
                            break; // room frees up as acknowledgements arrive
                        }
                        Err(e) => {
                            self.failed(entry.seq, &e);
                            failing_since.get_or_insert_with(Instant::now);
                            failing = true;
                            break;
                        }
                    }
                }
            }

            if failing && inflight.is_empty() {
                if let Some((code, reason)) = active.client().fatal_error() {
                    tracing::warn!(
                        ?code,
                        reason,
                        "Kafka producer hit a fatal error; replacing it"
                    );
                    drop_producer(producer.take()).await;
                    failing_since = None;
                } else if failing_since.is_some_and(|since| since.elapsed() >= self.replace_after) {
                    tracing::warn!(
                        failing_for = ?self.replace_after,
                        last_error = self.counters.last_error().as_deref().unwrap_or("none"),
                        "every Kafka delivery has failed for a while; replacing the producer \
                         (a broker that lost its producer state only accepts a new one)"
                    );
                    Counters::bump(&self.counters.producers_replaced);
                    drop_producer(producer.take()).await;
                    failing_since = None;
                }
                if sleep_or_stop(&mut stop, &mut backoff).await {
                    break;
                }
                failing = false;
                sent_up_to = self.outbox.delivered();
                continue;
            }

            tokio::select! {
                biased;
                () = stopped(&mut stop) => break,
                (seq, result) = next_ack(&mut inflight) => {
                    match result {
                        Ok(Ok(_delivery)) => {
                            // Count before the cursor moves, so a `flush` that returned
                            // sees the counter complete.
                            Counters::bump(&self.counters.delivered);
                            self.outbox.mark_delivered(seq);
                            self.counters.set_last_error(None);
                            backoff = BACKOFF_MIN;
                            failing_since = None;
                        }
                        Ok(Err((e, _message))) => {
                            self.failed(seq, &e);
                            failing_since.get_or_insert_with(Instant::now);
                            failing = true;
                        }
                        Err(_canceled) => {
                            failing_since.get_or_insert_with(Instant::now);
                            failing = true;
                        }
                    }
                }
                () = self.outbox.appended(), if !failing => {}
            }
        }

        crate::housekeeping::checkpoint(&self.outbox).await;
        drop_producer(producer).await;
    }

    fn send(&self, producer: &KafkaProducer, entry: &Entry) -> Result<DeliveryFuture, KafkaError> {
        let event = &entry.event;
        let key = event.package_id.unwrap_or(event.event_id).to_string();
        // It serialised when it was recorded, so this cannot fail in practice.
        let payload = serde_json::to_vec(&**event).map_err(|e| {
            tracing::error!(seq = entry.seq, error = %e, "cannot serialise a recorded event");
            KafkaError::MessageProduction(RDKafkaErrorCode::InvalidMessage)
        })?;
        let mut record = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        if let Ok(time) = OffsetDateTime::parse(&event.time, &Rfc3339) {
            record = record.timestamp((time.unix_timestamp_nanos() / 1_000_000) as i64);
        }
        producer.send_result(record).map_err(|(e, _record)| e)
    }

    fn failed(&self, seq: u64, error: &KafkaError) {
        tracing::warn!(seq, %error, "event delivery failed; it will be retried from the outbox");
        Counters::bump(&self.counters.delivery_failures);
        self.counters.set_last_error(Some(error.to_string()));
    }
}

/// The oldest in-flight delivery's result; pending forever when nothing is in flight.
async fn next_ack(
    inflight: &mut VecDeque<(u64, DeliveryFuture)>,
) -> (u64, <DeliveryFuture as std::future::Future>::Output) {
    match inflight.front_mut() {
        Some((seq, future)) => {
            let seq = *seq;
            let result = future.await;
            inflight.pop_front();
            (seq, result)
        }
        None => std::future::pending().await,
    }
}

pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Sleeps for `backoff` (then doubles it); true when asked to stop meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, backoff: &mut Duration) -> bool {
    let delay = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        () = stopped(stop) => true,
        () = tokio::time::sleep(delay) => false,
    }
}

/// Dropping a producer purges its queue and joins its polling thread: keep that off the runtime.
pub(crate) async fn drop_producer(producer: Option<KafkaProducer>) {
    if let Some(producer) = producer {
        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
    }
}
