//! The outbox on its own: the embedded default sink without Kafka, and its file format.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::{log_lines, wait_until};
use deploy_events::{EventConfig, EventError, EventSink, EventType, LOG_FILE, MAX_EVENT_BYTES};
use uuid::Uuid;

#[tokio::test]
async fn without_bootstrap_servers_events_are_recorded_and_listed_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let sink = EventSink::open(EventConfig::new(dir.path(), "deploy-receiver"))
        .await
        .unwrap();
    let log = dir.path().canonicalize().unwrap().join(LOG_FILE);
    assert_eq!(sink.destination(), format!("outbox:{}", log.display()));

    let package = Uuid::new_v4();
    for event_type in [EventType::DeploymentStarted, EventType::DeploymentCompleted] {
        sink.event(event_type)
            .package_id(package)
            .correlation_id("c-1")
            .publish()
            .await
            .unwrap();
    }
    sink.flush(Duration::from_secs(1)).await.unwrap();

    let listed = sink.list(10);
    let types: Vec<_> = listed.iter().map(|e| e.event_type).collect();
    assert_eq!(
        types,
        [EventType::DeploymentCompleted, EventType::DeploymentStarted]
    );
    assert!(listed.iter().all(|e| e.source_service == "deploy-receiver"
        && e.package_id == Some(package)
        && e.correlation_id.as_deref() == Some("c-1")));
    assert_eq!(sink.list(1).len(), 1);
    let stats = sink.stats();
    assert_eq!((stats.recorded, stats.delivered, stats.pending), (2, 0, 0));

    // Durable: a new sink on the same directory lists the same events.
    sink.shutdown().await;
    drop(sink);
    let reopened = EventSink::open(EventConfig::new(dir.path(), "deploy-receiver"))
        .await
        .unwrap();
    assert_eq!(reopened.list(10), listed);
}

#[tokio::test]
async fn an_empty_bootstrap_setting_means_the_outbox_is_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig {
        bootstrap_servers: Some("  ".into()),
        ..EventConfig::new(dir.path(), "deploy-sender")
    };
    let sink = EventSink::open(config).await.unwrap();
    assert!(sink.destination().starts_with("outbox:"));
}

#[tokio::test]
async fn without_kafka_the_log_keeps_only_the_newest_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig {
        retain: 5,
        ..EventConfig::new(dir.path(), "deploy-sender")
    };
    let sink = EventSink::open(config.clone()).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let event = sink.event(EventType::BuildStarted).build();
        ids.push(event.event_id);
        sink.publish(event).await.unwrap();
    }
    // The file is replaced first, then the in-memory copy is trimmed.
    wait_until("the log is compacted", Duration::from_secs(10), || {
        log_lines(dir.path()) < 10 && sink.list(100).len() < 10
    })
    .await;
    let listed: Vec<_> = sink.list(100).iter().map(|e| e.event_id).collect();
    let newest: Vec<_> = ids.iter().rev().take(listed.len()).copied().collect();
    assert_eq!(listed, newest);
    assert!(listed.len() >= 5);

    sink.shutdown().await;
    drop(sink);
    let reopened = EventSink::open(config).await.unwrap();
    let seq = reopened
        .event(EventType::BuildCompleted)
        .publish()
        .await
        .unwrap();
    assert_eq!(seq.0, 41, "sequence numbers survive compaction and restart");
}

#[tokio::test]
async fn a_torn_last_line_from_a_crash_is_cut_off_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig::new(dir.path(), "deploy-sender");
    let sink = EventSink::open(config.clone()).await.unwrap();
    for _ in 0..3 {
        sink.event(EventType::BuildStarted).publish().await.unwrap();
    }
    sink.shutdown().await;
    drop(sink);
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join(LOG_FILE))
        .unwrap();
    log.write_all(br#"{"seq":4,"event":{"event_id":"#).unwrap();
    drop(log);

    let sink = EventSink::open(config).await.unwrap();
    assert_eq!(sink.list(10).len(), 3);
    let seq = sink
        .event(EventType::BuildCompleted)
        .publish()
        .await
        .unwrap();
    assert_eq!(seq.0, 4);
    let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("every line is whole JSON");
    }
    assert_eq!(text.lines().count(), 4);
}

#[tokio::test]
async fn an_event_too_large_for_kafka_is_refused_and_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let sink = EventSink::open(EventConfig::new(dir.path(), "deploy-sender"))
        .await
        .unwrap();
    let huge = "x".repeat(MAX_EVENT_BYTES);
    let result = sink
        .event(EventType::BuildFailed)
        .payload(serde_json::json!({ "log": huge }))
        .publish()
        .await;
    assert!(
        matches!(result, Err(EventError::TooLarge { .. })),
        "{result:?}"
    );
    assert!(sink.list(10).is_empty());
    assert_eq!(sink.stats().recorded, 0);
}

#[tokio::test]
async fn a_second_sink_on_the_same_directory_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EventSink::open(EventConfig::new(dir.path(), "deploy-sender"))
        .await
        .unwrap();
    // Waits 5 s for the first to go away, then gives up.
    let second = EventSink::open(EventConfig::new(dir.path(), "deploy-sender")).await;
    assert!(
        matches!(second, Err(EventError::AlreadyOpen(_))),
        "{second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_each_get_their_own_durable_line_in_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let config = EventConfig::new(dir.path(), "deploy-sender");
    let sink = EventSink::open(config.clone()).await.unwrap();
    let publishers: Vec<_> = (0..8)
        .map(|_| {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut published = Vec::new();
                for _ in 0..25 {
                    let event = sink.event(EventType::BuildStarted).build();
                    let seq = sink.publish(event.clone()).await.unwrap();
                    published.push((seq.0, event.event_id));
                }
                published
            })
        })
        .collect();
    let mut published = Vec::new();
    for publisher in publishers {
        let mine = publisher.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "one publisher's events are in its order"
        );
        published.extend(mine);
    }
    published.sort();
    let seqs: Vec<_> = published.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<_>>(),
        "each its own sequence number"
    );

    // What the file holds right after the publishes returned, without a shutdown: the guarantee.
    let text = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
    let on_disk: Vec<(u64, Uuid)> = text
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let id = v["event"]["event_id"].as_str().unwrap().parse().unwrap();
            (v["seq"].as_u64().unwrap(), id)
        })
        .collect();
    assert_eq!(on_disk, published, "every event once, in sequence order");
}
