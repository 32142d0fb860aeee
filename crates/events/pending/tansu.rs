//! Delivery to tansu, a real Kafka-protocol broker (not librdkafka's mock), on loopback with
//! memory storage: restarting it loses every producer id and sequence it knew, as a broker that
//! lost its state does.
//!
//! Not in the suite: it needs `tansu` 0.6.0 (`cargo install tansu --version 0.6.0 --features
//! dynostore --locked`, ~17 min on two cores), so it builds only with a feature:
//! `cargo nextest run -p deploy-events --features broker-tansu --test tansu`. Without tansu it
//! fails, saying so.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kafka_config, TOPIC};
use deploy_events::{EventConfig, EventSink, EventType, LifecycleEvent};

const WAIT: Duration = Duration::from_secs(120);

/// The tansu binary: `TANSU` if set, else `tansu` on PATH, else cargo's bin directory.
fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU") {
        return path.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|p| p.is_file());
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|h| h.join("bin/tansu"))
                .filter(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "tansu (a Kafka-protocol broker) is needed and was not found on PATH or in \
                 ~/.cargo/bin: cargo install tansu --version 0.6.0 --features dynostore \
                 --locked, or set TANSU=/path/to/tansu"
            )
        })
}

/// One tansu broker with memory storage on a loopback port; killed when dropped.
struct Tansu {
    child: Child,
    port: u16,
}

impl Tansu {
    fn start(port: u16) -> Self {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tansu");
        let mut broker = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = broker.child.try_wait().expect("wait") {
                panic!("tansu exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        broker.create_topic(TOPIC);
        broker
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn create_topic(&self, name: &str) {
        let output = Command::new(tansu_binary())
            .args([
                "topic",
                "create",
                name,
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--partitions",
                "1",
            ])
            .output()
            .expect("tansu topic create");
        assert!(
            output.status.success(),
            "tansu topic create {name}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Kills the broker: with memory storage every topic, message and producer id is gone.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn publish_n(sink: &EventSink, n: usize, label: &str) -> Vec<LifecycleEvent> {
    let mut events = Vec::new();
    for i in 0..n {
        let event = sink
            .event(EventType::TransferStarted)
            .correlation_id(format!("{label}-{i}"))
            .build();
        sink.publish(event.clone()).await.unwrap();
        events.push(event);
    }
    events
}

/// The topic read from the beginning until every event of `expected` has arrived and the
/// partition's end was reached after that: everything on it then, duplicates included.
///
/// Not by counting the watermarks: tansu 0.6.0 (memory storage) reports a high watermark of 1
/// after one batch of five records, which sit at offsets 0-4 (the first run of this test read
/// back "1 of 5" for that reason). The end of the partition is where a fetch returns nothing
/// more, which holds on tansu too.
async fn everything_on(bootstrap: &str, expected: &[LifecycleEvent]) -> Vec<LifecycleEvent> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::KafkaError;
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};

    let bootstrap = bootstrap.to_owned();
    let mut missing: HashSet<_> = expected.iter().map(|e| e.event_id).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "deploy-events-tansu")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(TOPIC, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + WAIT;
        let mut received: Vec<LifecycleEvent> = Vec::new();
        loop {
            assert!(
                Instant::now() < deadline,
                "{} of the {} events expected did not arrive; read: {:?}",
                missing.len(),
                missing.len() + received.len(),
                received
                    .iter()
                    .map(|e| &e.correlation_id)
                    .collect::<Vec<_>>()
            );
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(message)) => {
                    let event: LifecycleEvent =
                        serde_json::from_slice(message.payload().expect("value")).unwrap();
                    missing.remove(&event.event_id);
                    received.push(event);
                }
                Some(Err(KafkaError::PartitionEOF(_))) if missing.is_empty() => return received,
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => panic!("consume: {e}"),
            }
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_by_itself_after_the_broker_restarts_without_its_producer_state() {
    let port = free_port();
    let broker = Tansu::start(port);
    let bootstrap = broker.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig {
        delivery_timeout: Duration::from_secs(3),
        producer_replace_after: Duration::from_secs(3),
        ..kafka_config(dir.path(), &bootstrap)
    };
    let sink = EventSink::open(config).await.unwrap();

    let before = publish_n(&sink, 5, "before").await;
    sink.flush(WAIT).await.expect("the first broker took them");
    let got = everything_on(&bootstrap, &before).await;
    assert_eq!(
        got.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        before.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        "once each, in order"
    );

    // The broker comes back on the same address knowing nothing: not the topic, not our
    // producer id. The sink is not restarted.
    broker.kill();
    let broker = Tansu::start(port);
    let after = publish_n(&sink, 5, "after").await;
    let started = Instant::now();
    sink.flush(WAIT)
        .await
        .expect("delivery resumed without restarting the service");
    let resumed_in = started.elapsed();

    let got = everything_on(&bootstrap, &after).await;
    for event in &after {
        let copies = got.iter().filter(|e| e.event_id == event.event_id).count();
        assert_eq!(
            copies,
            1,
            "event {} published after the restart arrived once",
            event.correlation_id.as_deref().unwrap_or_default()
        );
    }
    let stats = sink.stats();
    assert_eq!(stats.pending, 0);
    assert_eq!(stats.last_error, None, "cleared by the deliveries");
    eprintln!(
        "delivery resumed {resumed_in:?} after the broker returned; producers replaced: {}; failed attempts: {}",
        stats.producers_replaced, stats.delivery_failures
    );
    sink.shutdown().await;
    drop(broker);
}
