//! Shared by the event tests: a sink configuration and a real Kafka consumer that reads a topic
//! of librdkafka's mock cluster back.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use deploy_events::{EventConfig, LifecycleEvent};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub const TOPIC: &str = "deployment.lifecycle";

/// A configuration that reconnects quickly, so tests do not wait out librdkafka's 10 s backoff.
pub fn kafka_config(dir: &Path, bootstrap: &str) -> EventConfig {
    EventConfig {
        bootstrap_servers: Some(bootstrap.to_owned()),
        kafka_properties: vec![
            ("reconnect.backoff.ms".into(), "50".into()),
            ("reconnect.backoff.max.ms".into(), "250".into()),
        ],
        ..EventConfig::new(dir, "deploy-sender")
    }
}

/// One message as a consumer sees it.
#[derive(Debug)]
pub struct Received {
    pub key: String,
    pub event: LifecycleEvent,
    pub value: serde_json::Value,
    pub partition: i32,
}

fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "deploy-events-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Reads `topic` from the beginning of every partition until `expected` messages arrived.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Received> {
    let consumer = consumer(bootstrap);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("metadata");
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, partition.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).expect("assign");

    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while received.len() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} messages arrived",
            received.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("consume");
        let key = String::from_utf8(message.key().expect("key").to_vec()).unwrap();
        let payload = message.payload().expect("value");
        received.push(Received {
            key,
            event: serde_json::from_slice(payload).expect("value is a LifecycleEvent"),
            value: serde_json::from_slice(payload).unwrap(),
            partition: message.partition(),
        });
    }
    received
}

/// How many messages the topic holds, over all partitions (high watermarks): with the messages
/// read, this proves there are no duplicates without waiting for ones that might still come.
pub fn message_count(bootstrap: &str, topic: &str) -> i64 {
    let consumer = consumer(bootstrap);
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("metadata");
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .expect("watermarks");
            high - low
        })
        .sum()
}

/// Polls `condition` every 20 ms until it holds; panics after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lines of the outbox log.
pub fn log_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join(deploy_events::LOG_FILE))
        .unwrap()
        .lines()
        .count()
}
