//! Lifecycle events of real deployments (real Docker engine, images `FROM scratch` with the host's
//! static busybox) read back from a real Kafka-protocol broker (librdkafka's mock cluster on
//! loopback) by a real consumer.

mod common;
#[path = "../../events/tests/common/mod.rs"]
mod kafka;

use std::time::{Duration, Instant};

use common::*;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::events::{EventType, DEFAULT_TOPIC};
use rdkafka::mocking::MockCluster;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Generous: with the broker back, librdkafka may first wait out its reconnect backoff, and an
/// event that timed out meanwhile is resent by the outbox after its own backoff.
const WAIT: Duration = Duration::from_secs(120);

async fn metrics(receiver: &Receiver) -> String {
    http()
        .get(format!("{}/metrics", receiver.base))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text")
}

async fn health(receiver: &Receiver) -> Value {
    http()
        .get(format!("{}/health", receiver.base))
        .send()
        .await
        .expect("GET /health")
        .json()
        .await
        .expect("json")
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

/// Asserts that `got` is the event of `record` with `event_type`, as Kafka delivered it.
fn assert_event(
    got: &kafka::Received,
    event_type: EventType,
    record: &DeploymentRecord,
    tag: &str,
) {
    let event = &got.event;
    assert_eq!(event.event_type, event_type, "{:?}", got.value);
    let package_id = record.package_id.expect("package id");
    assert_eq!(got.key, package_id.to_string(), "keyed by package id");
    assert_eq!(event.package_id, Some(package_id));
    assert_eq!(event.source_service, "deploy-receiver");
    assert_eq!(
        event.container_name.as_deref(),
        Some(record.container_name.as_str())
    );
    assert_eq!(event.image_tag.as_deref(), Some(tag));
    assert!(event.correlation_id.is_some());
    assert_eq!(event.correlation_id, record.correlation_id);
    assert_eq!(event.payload["deployment_id"], json!(record.deployment_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_publish_started_then_completed_or_rolled_back_keyed_by_package_id() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let (good, bad) = (format!("{name}:good"), format!("{name}:bad"));
    build_image(&docker, &mut cleanup, &good, ImageSpec::healthy("good")).await;
    build_image(&docker, &mut cleanup, &bad, ImageSpec::failing("bad")).await;
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(DEFAULT_TOPIC, 1, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| {
        c.kafka_bootstrap_servers = Some(bootstrap.clone());
    })
    .await;
    let health: Value = http()
        .get(format!("{}/health", receiver.base))
        .send()
        .await
        .expect("GET /health")
        .json()
        .await
        .expect("json");
    assert_eq!(
        health["events"],
        json!(format!("kafka://{bootstrap}/{DEFAULT_TOPIC}"))
    );
    let spec = web_spec(&name);

    let (status, body) = receiver
        .full(&[&good], save_image(&docker, &good).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let completed = record(&body);
    let (status, body) = receiver
        .full(&[&bad], save_image(&docker, &bad).await, &spec)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let rolled_back = record(&body);
    assert_eq!(rolled_back.status, DeploymentStatus::RolledBack, "{body}");

    let got = kafka::read_topic(&bootstrap, DEFAULT_TOPIC, 4, WAIT);
    assert_eq!(
        kafka::message_count(&bootstrap, DEFAULT_TOPIC),
        4,
        "four events, no duplicates"
    );
    assert_event(&got[0], EventType::DeploymentStarted, &completed, &good);
    assert_eq!(got[0].value["payload"]["status"], "IN_PROGRESS");
    assert_event(&got[1], EventType::DeploymentCompleted, &completed, &good);
    let payload = &got[1].value["payload"];
    assert_eq!(payload["status"], "SUCCEEDED");
    assert_eq!(payload["error_code"], Value::Null);
    for stage in ["upload", "verify", "load", "start", "health", "cleanup"] {
        assert!(
            payload["stage_durations_ms"][stage].is_u64(),
            "{stage} duration in {payload}"
        );
    }
    assert_event(&got[2], EventType::DeploymentStarted, &rolled_back, &bad);
    assert_event(&got[3], EventType::DeploymentRolledBack, &rolled_back, &bad);
    let payload = &got[3].value["payload"];
    assert_eq!(payload["status"], "ROLLED_BACK");
    assert_eq!(payload["error_code"], "HEALTH_CHECK_FAILED");
    assert!(
        payload["stage_durations_ms"]["rollback"].is_u64(),
        "{payload}"
    );

    let mut text = metrics(&receiver).await;
    for _ in 0..100 {
        if metric(&text, "deploy_receiver_events_delivered_total") == 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = metrics(&receiver).await;
    }
    assert_eq!(metric(&text, "deploy_receiver_events_recorded_total"), 4.0);
    assert_eq!(metric(&text, "deploy_receiver_events_delivered_total"), 4.0);
    assert_eq!(metric(&text, "deploy_receiver_events_pending"), 0.0);
    assert_eq!(metric(&text, "deploy_receiver_rollbacks_total"), 1.0);
    assert_eq!(
        metric(
            &text,
            r#"deploy_receiver_deployments_total{status="succeeded"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"deploy_receiver_deployments_total{status="rolled_back"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"deploy_receiver_stages_total{outcome="failed",stage="health"}"#
        ),
        1.0
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_with_the_broker_down_succeeds_and_its_events_arrive_when_the_broker_returns() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let tag = format!("{name}:v1");
    build_image(&docker, &mut cleanup, &tag, ImageSpec::healthy("v1")).await;
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(DEFAULT_TOPIC, 1, 1).expect("topic");
    cluster.broker_down(-1).expect("broker down");
    let bootstrap = cluster.bootstrap_servers();
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| {
        c.kafka_bootstrap_servers = Some(bootstrap.clone());
    })
    .await;

    let package = save_image(&docker, &tag).await;
    let started = Instant::now();
    let (status, body) = receiver.full(&[&tag], package, &web_spec(&name)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the deploy does not need the broker: {body}"
    );
    let deployed = record(&body);
    let took = started.elapsed();
    let text = metrics(&receiver).await;
    assert_eq!(metric(&text, "deploy_receiver_events_recorded_total"), 2.0);
    assert_eq!(metric(&text, "deploy_receiver_events_delivered_total"), 0.0);
    assert_eq!(metric(&text, "deploy_receiver_events_pending"), 2.0);
    assert_eq!(
        metric(&text, "deploy_receiver_event_record_failures_total"),
        0.0
    );

    // /health says events are stuck, and why, as the sender's does.
    let mut health = health(&receiver).await;
    let deadline = Instant::now() + WAIT;
    while health["events_last_error"].is_null() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = self::health(&receiver).await;
    }
    assert_eq!(health["events_pending"], 2, "{health}");
    assert!(health["events_last_error"].is_string(), "{health}");

    cluster.broker_up(-1).expect("broker up");
    let got = kafka::read_topic(&bootstrap, DEFAULT_TOPIC, 2, WAIT);
    assert_event(&got[0], EventType::DeploymentStarted, &deployed, &tag);
    assert_event(&got[1], EventType::DeploymentCompleted, &deployed, &tag);
    assert_eq!(kafka::message_count(&bootstrap, DEFAULT_TOPIC), 2);
    let mut health = self::health(&receiver).await;
    while health["events_pending"] != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = self::health(&receiver).await;
    }
    assert_eq!(health["events_pending"], 0, "{health}");
    assert!(health["events_last_error"].is_null(), "{health}");
    eprintln!("deploy with the broker down took {took:?}");
    receiver.stop().await;
}
