//! [`EventSink`]: the handle a service holds to record lifecycle events and read them back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::events::{EventType, LifecycleEvent, DEFAULT_TOPIC};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::builder::EventBuilder;
use crate::delivery::{producer_config, Delivery};
use crate::error::{EventError, Result};
use crate::housekeeping;
use crate::outbox::{DirLock, Outbox, Seq};
use crate::stats::{Counters, EventStats};

/// How many of the newest events the outbox keeps after delivery, by default.
pub const DEFAULT_RETAIN: usize = 10_000;
/// How long librdkafka tries to deliver an event before reporting a failure (it is then retried
/// from the outbox), by default.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long every delivery may fail before the producer is replaced, by default: one delivery
/// timeout, so the second failed attempt in a row brings a new producer.
pub const DEFAULT_PRODUCER_REPLACE_AFTER: Duration = Duration::from_secs(30);
/// How long `open` waits for a sink on the same directory, dropped a moment ago, to finish.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// Where events are recorded and where they go.
#[derive(Debug, Clone)]
pub struct EventConfig {
    /// The service's state directory; the outbox lives in `events.jsonl` and `events.cursor`.
    pub state_dir: PathBuf,
    /// Kafka bootstrap servers (`KAFKA_BOOTSTRAP_SERVERS`); `None` or empty: the outbox is the sink.
    pub bootstrap_servers: Option<String>,
    /// Topic (`KAFKA_TOPIC`).
    pub topic: String,
    /// `deploy-sender` or `deploy-receiver`; filled into every event and used as Kafka client id.
    pub source_service: &'static str,
    /// How many of the newest events to keep for [`EventSink::list`] once delivered.
    pub retain: usize,
    /// librdkafka's `message.timeout.ms`: after this a delivery counts as failed and is retried.
    pub delivery_timeout: Duration,
    /// Extra librdkafka properties (e.g. `security.protocol`); `enable.idempotence` and `acks`
    /// cannot be overridden.
    pub kafka_properties: Vec<(String, String)>,
    /// A producer whose deliveries have all failed for this long is replaced by a new one (a
    /// broker that lost its producer state accepts only a new producer id).
    pub producer_replace_after: Duration,
}

impl EventConfig {
    /// Outbox-only configuration with the default topic and limits.
    pub fn new(state_dir: impl Into<PathBuf>, source_service: &'static str) -> Self {
        Self {
            state_dir: state_dir.into(),
            bootstrap_servers: None,
            topic: DEFAULT_TOPIC.to_owned(),
            source_service,
            retain: DEFAULT_RETAIN,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            kafka_properties: Vec::new(),
            producer_replace_after: DEFAULT_PRODUCER_REPLACE_AFTER,
        }
    }
}

/// Records lifecycle events durably and delivers them to Kafka in the background. Cheap to
/// clone; the background task stops on [`EventSink::shutdown`] or when the last clone is dropped.
#[derive(Clone)]
pub struct EventSink {
    inner: Arc<Inner>,
}

struct Inner {
    outbox: Arc<Outbox>,
    counters: Arc<Counters>,
    source_service: &'static str,
    destination: String,
    kafka: bool,
    stop: watch::Sender<bool>,
    /// Delivery (with Kafka), then housekeeping.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("destination", &self.inner.destination)
            .finish()
    }
}

impl EventSink {
    /// Opens (or creates) the outbox in `config.state_dir`, and starts delivering what it holds
    /// beyond its cursor. Must run inside a tokio runtime.
    pub async fn open(config: EventConfig) -> Result<Self> {
        if config.topic.trim().is_empty() {
            return Err(EventError::Config("the Kafka topic is empty".into()));
        }
        let bootstrap = config.bootstrap_servers.filter(|s| !s.trim().is_empty());
        let dir = &config.state_dir;
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| record_err("create", dir, source))?;
        let dir = tokio::fs::canonicalize(dir)
            .await
            .map_err(|source| record_err("resolve", dir, source))?;
        let dir_lock = acquire(&dir).await?;
        let (retain, outbox_is_sink) = (config.retain, bootstrap.is_none());
        let outbox =
            tokio::task::spawn_blocking(move || Outbox::open(dir_lock, retain, outbox_is_sink))
                .await
                .map_err(|e| EventError::Worker(e.to_string()))??;
        let outbox = Arc::new(outbox);
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);

        let mut tasks = vec![tokio::spawn(housekeeping::run(
            outbox.clone(),
            stop_rx.clone(),
        ))];
        let destination = match bootstrap {
            Some(servers) => {
                let delivery = Delivery {
                    outbox: outbox.clone(),
                    counters: counters.clone(),
                    config: producer_config(
                        &servers,
                        config.source_service,
                        config.delivery_timeout,
                        &config.kafka_properties,
                    ),
                    topic: config.topic.clone(),
                    replace_after: config.producer_replace_after,
                };
                let producer = delivery.producer()?;
                // It writes the cursor once more as it stops, after its last acknowledgement.
                tasks.insert(0, tokio::spawn(delivery.run(producer, stop_rx)));
                format!("kafka://{servers}/{}", config.topic)
            }
            None => format!("outbox:{}", outbox.log_path().display()),
        };
        tracing::info!(%destination, pending = outbox.pending(), "event sink open");
        Ok(Self {
            inner: Arc::new(Inner {
                kafka: !outbox_is_sink,
                outbox,
                counters,
                source_service: config.source_service,
                destination,
                stop,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    /// Starts an event of this type with a fresh id, the current time and this service's name.
    pub fn event(&self, event_type: EventType) -> EventBuilder {
        EventBuilder::new(self.clone(), event_type, self.inner.source_service)
    }

    /// Records the event durably and returns its position; never waits for Kafka to be
    /// reachable. Returns once the event is appended and `fdatasync`ed, or, with Kafka, once the
    /// broker has acknowledged it (`acks=all`), whichever comes first: the producer sends it while
    /// it is being written, so a slow disk sync does not hold up a caller whose event is already
    /// safe on the broker (the write still completes in the background). Concurrent publishers
    /// share one write and sync. Fails only when the event cannot be recorded (disk error, or
    /// larger than [`crate::MAX_EVENT_BYTES`]) and the broker has not acknowledged it. Still
    /// records after `shutdown`, for delivery at the next start.
    pub async fn publish(&self, event: LifecycleEvent) -> Result<Seq> {
        let outbox = self.inner.outbox.clone();
        let seq = outbox.record(event)?;
        let commit = tokio::task::spawn_blocking(move || outbox.commit(seq));
        let committed = if self.inner.kafka {
            let mut delivered = self.inner.outbox.subscribe_delivered();
            tokio::select! {
                biased;
                result = commit => result,
                // The broker has it; the write goes on without us.
                Ok(_) = delivered.wait_for(|d| *d >= seq.0) => Ok(Ok(())),
            }
        } else {
            commit.await
        };
        match committed.map_err(|e| EventError::Worker(e.to_string()))? {
            Ok(()) => {}
            Err(_) if self.inner.kafka && self.inner.outbox.delivered() >= seq.0 => {}
            Err(e) => return Err(e),
        }
        Counters::bump(&self.inner.counters.recorded);
        Ok(seq)
    }

    /// Up to `limit` of the retained events, newest first.
    pub fn list(&self, limit: usize) -> Vec<LifecycleEvent> {
        self.inner.outbox.list(limit)
    }

    /// Where events go: `kafka://HOSTS/TOPIC` or `outbox:/path/events.jsonl`.
    pub fn destination(&self) -> String {
        self.inner.destination.clone()
    }

    /// The counters, for metrics and health.
    pub fn stats(&self) -> EventStats {
        let pending = if self.inner.kafka {
            self.inner.outbox.pending()
        } else {
            0
        };
        self.inner.counters.snapshot(pending)
    }

    /// Waits until the broker has acknowledged every event up to `seq` (at once without Kafka).
    pub async fn wait_delivered(&self, seq: Seq, timeout: Duration) -> Result<()> {
        if !self.inner.kafka {
            return Ok(());
        }
        let mut delivered = self.inner.outbox.subscribe_delivered();
        let reached = tokio::time::timeout(timeout, delivered.wait_for(|d| *d >= seq.0))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(EventError::Timeout {
                waited: timeout,
                pending: self.inner.outbox.pending(),
            })
        }
    }

    /// Waits until everything recorded so far is delivered: for tests and graceful shutdown.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        self.wait_delivered(self.inner.outbox.last_seq(), timeout)
            .await
    }

    /// Stops the background task (without waiting for deliveries: call `flush` first for that),
    /// finishes writing recorded events, and writes the cursor. Undelivered events stay in the outbox for the next start.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        // A publish that returned on the broker's acknowledgement may still be writing its event.
        let outbox = self.inner.outbox.clone();
        let _ = tokio::task::spawn_blocking(move || outbox.commit_queued()).await;
        let tasks = std::mem::take(&mut *self.inner.tasks.lock().await);
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "event sink task failed");
            }
        }
    }
}

/// A sink on the same directory that was just dropped releases it once its task has ended.
async fn acquire(dir: &Path) -> Result<DirLock> {
    let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
    loop {
        if let Some(lock) = DirLock::try_acquire(dir) {
            return Ok(lock);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(EventError::AlreadyOpen(dir.to_path_buf()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn record_err(action: &'static str, path: &Path, source: std::io::Error) -> EventError {
    EventError::Record {
        action,
        path: path.to_path_buf(),
        source,
    }
}
