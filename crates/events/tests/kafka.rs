//! Delivery to a real Kafka-protocol broker: librdkafka's mock cluster on loopback.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{kafka_config, log_lines, message_count, read_topic, wait_until, TOPIC};
use deploy_events::{EventSink, EventType, LifecycleEvent, CURSOR_FILE};
use rdkafka::mocking::MockCluster;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn publish_n(sink: &EventSink, n: usize, packages: &[Option<Uuid>]) -> Vec<LifecycleEvent> {
    let mut events = Vec::new();
    for i in 0..n {
        let mut builder = sink
            .event(EventType::TransferStarted)
            .correlation_id(format!("corr-{i}"))
            .payload(serde_json::json!({ "n": i }));
        if let Some(package) = packages[i % packages.len()] {
            builder = builder
                .package_id(package)
                .container_name("web")
                .image_tag("web:1.0.0");
        }
        let event = builder.build();
        sink.publish(event.clone()).await.unwrap();
        events.push(event);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_reach_the_topic_in_order_keyed_by_package_id() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let sink = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();
    assert_eq!(sink.destination(), format!("kafka://{bootstrap}/{TOPIC}"));

    let package = Uuid::new_v4();
    let sent = publish_n(&sink, 20, &[Some(package), None]).await;
    sink.flush(WAIT).await.unwrap();

    let received = read_topic(&bootstrap, TOPIC, 20, WAIT);
    assert_eq!(
        message_count(&bootstrap, TOPIC),
        20,
        "no duplicates on the broker"
    );
    for (sent, got) in sent.iter().zip(&received) {
        assert_eq!(&got.event, sent, "same events in the same order");
        let key = sent.package_id.unwrap_or(sent.event_id).to_string();
        assert_eq!(got.key, key);
        assert_eq!(got.value["event_type"], "TRANSFER_STARTED");
        assert_eq!(got.value["source_service"], "deploy-sender");
        time::OffsetDateTime::parse(&sent.time, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 time");
    }

    let stats = sink.stats();
    assert_eq!(
        (stats.recorded, stats.delivered, stats.pending),
        (20, 20, 0)
    );
    sink.shutdown().await;
    let cursor = std::fs::read_to_string(dir.path().join(CURSOR_FILE)).unwrap();
    assert_eq!(cursor.trim(), "20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_the_broker_is_down_arrive_exactly_once_when_it_returns() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 3, 1).unwrap();
    cluster.broker_down(-1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let config = deploy_events::EventConfig {
        delivery_timeout: Duration::from_millis(500),
        ..kafka_config(dir.path(), &bootstrap)
    };
    let sink = EventSink::open(config).await.unwrap();

    let packages: Vec<_> = (0..5).map(|_| Some(Uuid::new_v4())).collect();
    let started = Instant::now();
    let sent = publish_n(&sink, 50, &packages).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "publish must not wait for the broker: 50 took {:?}",
        started.elapsed()
    );

    // Deliveries time out and are retried from the outbox while the broker is down.
    wait_until("a delivery failed", WAIT, || {
        sink.stats().delivery_failures > 0
    })
    .await;
    let stats = sink.stats();
    assert_eq!(
        (stats.recorded, stats.delivered, stats.pending),
        (50, 0, 50)
    );
    assert!(stats.last_error.is_some());

    cluster.broker_up(-1).unwrap();
    sink.flush(WAIT).await.unwrap();

    let received = read_topic(&bootstrap, TOPIC, 50, WAIT);
    assert_eq!(
        message_count(&bootstrap, TOPIC),
        50,
        "no duplicates on the broker"
    );
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for got in &received {
        *seen.entry(got.event.event_id).or_default() += 1;
    }
    for event in &sent {
        assert_eq!(
            seen.get(&event.event_id),
            Some(&1),
            "event {} exactly once",
            event.event_id
        );
    }
    // Per key (one partition each) the order is the publish order.
    for package in packages.iter().flatten() {
        let sent_ids: Vec<_> = sent
            .iter()
            .filter(|e| e.package_id == Some(*package))
            .map(|e| e.event_id)
            .collect();
        let got_ids: Vec<_> = received
            .iter()
            .filter(|r| r.event.package_id == Some(*package))
            .map(|r| r.event.event_id)
            .collect();
        assert_eq!(got_ids, sent_ids);
    }
    let stats = sink.stats();
    assert_eq!(
        (stats.delivered, stats.pending, stats.last_error),
        (50, 0, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_sink_dropped_before_delivery_are_delivered_by_the_next_one() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 2, 1).unwrap();
    cluster.broker_down(-1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();

    let first = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();
    let sent = publish_n(&first, 10, &[Some(Uuid::new_v4()), Some(Uuid::new_v4())]).await;
    assert_eq!(first.stats().pending, 10);
    drop(first);

    cluster.broker_up(-1).unwrap();
    let second = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();
    assert_eq!(second.list(100).len(), 10, "the outbox was re-read");
    second.flush(WAIT).await.unwrap();

    let received = read_topic(&bootstrap, TOPIC, 10, WAIT);
    assert_eq!(
        message_count(&bootstrap, TOPIC),
        10,
        "no duplicates on the broker"
    );
    let mut got: Vec<_> = received.iter().map(|r| r.event.event_id).collect();
    let mut want: Vec<_> = sent.iter().map(|e| e.event_id).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!((second.stats().recorded, second.stats().delivered), (0, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_are_not_sent_again_after_a_restart() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();

    let first = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();
    publish_n(&first, 5, &[None]).await;
    first.flush(WAIT).await.unwrap();
    first.shutdown().await;
    drop(first);

    let second = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();
    assert_eq!(second.stats().pending, 0);
    let seq = second
        .event(EventType::BuildStarted)
        .publish()
        .await
        .unwrap();
    assert_eq!(seq.0, 6, "sequence numbers continue across restarts");
    second.flush(WAIT).await.unwrap();

    read_topic(&bootstrap, TOPIC, 6, WAIT);
    assert_eq!(message_count(&bootstrap, TOPIC), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_beyond_the_retention_are_compacted_away() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let config = deploy_events::EventConfig {
        retain: 10,
        ..kafka_config(dir.path(), &bootstrap)
    };
    let sink = EventSink::open(config).await.unwrap();

    let sent = publish_n(&sink, 100, &[None]).await;
    sink.flush(WAIT).await.unwrap();
    // The file is replaced first, then the in-memory copy is trimmed.
    wait_until("the log is compacted", WAIT, || {
        log_lines(dir.path()) < 20 && sink.list(100).len() < 20
    })
    .await;

    let listed = sink.list(100);
    assert!((10..20).contains(&listed.len()), "kept {}", listed.len());
    let newest: Vec<_> = sent.iter().rev().take(listed.len()).cloned().collect();
    assert_eq!(
        listed, newest,
        "the newest events are kept, listed newest first"
    );
    assert_eq!(message_count(&bootstrap, TOPIC), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_are_delivered_once_each_in_their_own_order_and_recorded() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic(TOPIC, 3, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let sink = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();

    // Each publisher has its own key, so its events share a partition and keep their order.
    let publishers: Vec<_> = (0..8)
        .map(|_| {
            let sink = sink.clone();
            tokio::spawn(async move {
                let package = Uuid::new_v4();
                let mut sent = Vec::new();
                for i in 0..25 {
                    let event = sink
                        .event(EventType::TransferStarted)
                        .package_id(package)
                        .payload(serde_json::json!({ "n": i }))
                        .build();
                    sink.publish(event.clone()).await.unwrap();
                    sent.push(event.event_id);
                }
                (package, sent)
            })
        })
        .collect();
    let mut sent = Vec::new();
    for publisher in publishers {
        sent.push(publisher.await.unwrap());
    }
    sink.flush(WAIT).await.unwrap();

    let received = read_topic(&bootstrap, TOPIC, 200, WAIT);
    assert_eq!(
        message_count(&bootstrap, TOPIC),
        200,
        "no duplicates on the broker"
    );
    for (package, ids) in &sent {
        let got: Vec<_> = received
            .iter()
            .filter(|r| r.event.package_id == Some(*package))
            .map(|r| r.event.event_id)
            .collect();
        assert_eq!(&got, ids, "one publisher's events in its order");
    }

    // Every event is in the outbox too (a publish may return on the broker's acknowledgement
    // before its write finishes; shutdown lets the writes complete).
    sink.shutdown().await;
    drop(sink);
    assert_eq!(log_lines(dir.path()), 200);
    let reopened = EventSink::open(kafka_config(dir.path(), &bootstrap))
        .await
        .unwrap();
    assert_eq!(reopened.list(1000).len(), 200);
    assert_eq!(reopened.stats().pending, 0, "nothing left to deliver");
}
