//! What an operator and an API client see of the receiver: the OpenAPI document against the
//! router (both directions), the committed `docs/openapi/receiver.json`, `/metrics` checked by
//! Prometheus' own parser (`promtool check metrics`) and moving with the work done, and `/health`
//! saying where lifecycle events go. No Docker needed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use deploy_protocol::Checksum;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

/// Where the committed document lives.
const OPENAPI_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../docs/openapi/receiver.json"
);

/// `(METHOD, path)` of every operation in an OpenAPI document.
fn documented_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in [
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ] {
            if item.get(method).is_some() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn openapi_json(receiver: &Receiver) -> Value {
    http()
        .get(format!("{}/openapi.json", receiver.base))
        .send()
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn every_route_is_documented_and_every_documented_operation_is_routed() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let doc = openapi_json(&receiver).await;
    let documented = documented_operations(&doc);
    let routed: BTreeSet<(String, String)> =
        deploy_receiver::routes::route_list().into_iter().collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from /openapi.json: {undocumented:?}"
    );
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        unrouted.is_empty(),
        "documented but not in the route table: {unrouted:?}"
    );

    // Each documented operation reaches a handler: axum's own 404 and 405 have empty bodies.
    for (method, path) in &documented {
        let url = format!(
            "{}{}",
            receiver.base,
            path.replace("{id}", &Uuid::new_v4().to_string())
                .replace("{blake3}", &"0".repeat(64))
        );
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let response = no_redirects()
            .request(method.clone(), &url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            status != StatusCode::NOT_FOUND || !body.is_empty(),
            "{method} {path} is not routed"
        );
        let operation = &doc["paths"][path][method.as_str().to_lowercase()];
        if operation.get("security").is_some() {
            // Signed operations answer an unsigned request with the API's own 401; a multipart
            // upload, whose signature covers its manifest part, first says there is no manifest.
            let multipart = operation["requestBody"]["content"]
                .get("multipart/form-data")
                .is_some();
            let expected = if multipart {
                (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
            } else {
                (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
            };
            if method == Method::HEAD {
                // A HEAD answer has no body: the status says it.
                assert_eq!(status, expected.0, "{method} {path}");
                continue;
            }
            let error: Value = serde_json::from_str(&body).expect("JSON error body");
            assert_eq!(
                (status, error["error"]["code"].as_str().unwrap_or_default()),
                expected,
                "{method} {path}: {body}"
            );
        } else {
            assert!(
                status.is_success() || status.is_redirection(),
                "{method} {path}: {status}"
            );
        }
    }
    receiver.stop().await;
}

#[tokio::test]
async fn every_operation_documents_its_headers_and_error_responses() {
    let doc = serde_json::to_value(deploy_receiver::routes::openapi()).expect("json");
    for (method, path) in documented_operations(&doc) {
        let op = &doc["paths"][&path][method.to_lowercase()];
        let what = format!("{method} {path}");
        assert!(
            op["summary"].is_string() || op["description"].is_string(),
            "{what}: no description"
        );
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses
                .keys()
                .any(|s| s.starts_with('2') || s.starts_with('3')),
            "{what}: no success response"
        );
        for (status, response) in responses {
            assert!(
                response["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{what} {status}: no description"
            );
            // A HEAD answer has no body to describe.
            if method != "HEAD" && (status.starts_with('4') || status.starts_with('5')) {
                let schema = response["content"]["application/json"]["schema"]["$ref"]
                    .as_str()
                    .unwrap_or_default();
                assert!(
                    schema.ends_with("/ErrorBody")
                        || schema.ends_with("/DeploymentRecord")
                        || schema.ends_with("/RecordOrError"),
                    "{what} {status}: an error response is an ErrorBody (or a failed DeploymentRecord, or either), not {schema:?}"
                );
            }
        }
        if op.get("security").is_some() {
            for status in ["401", "403"] {
                assert!(responses.contains_key(status), "{what}: no {status}");
            }
            let headers: BTreeSet<&str> = op["parameters"]
                .as_array()
                .expect("parameters")
                .iter()
                .filter(|p| p["in"] == "header")
                .filter_map(|p| p["name"].as_str())
                .collect();
            for header in [
                "X-Deploy-Key-Id",
                "X-Deploy-Timestamp",
                "X-Deploy-Nonce",
                "X-Deploy-Signature",
                "X-Correlation-Id",
            ] {
                assert!(
                    headers.contains(header),
                    "{what}: header {header} not documented"
                );
            }
        }
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for schema in [
        "ErrorBody",
        "ErrorCode",
        "PackageManifest",
        "DeploymentRecord",
        "HealthResponse",
    ] {
        assert!(schemas.contains_key(schema), "schema {schema}");
    }
}

/// Recursively sorted keys: the committed file is the same whatever map order serde_json has.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[tokio::test]
async fn the_committed_openapi_document_is_current() {
    let doc = serde_json::to_value(deploy_receiver::routes::openapi()).expect("json");
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    assert_eq!(
        sorted(openapi_json(&receiver).await),
        sorted(doc.clone()),
        "/openapi.json serves routes::openapi()"
    );
    receiver.stop().await;

    let mut text = serde_json::to_string_pretty(&sorted(doc)).expect("json");
    text.push('\n');
    let committed = std::fs::read_to_string(OPENAPI_FILE).unwrap_or_default();
    if committed != text {
        std::fs::create_dir_all(std::path::Path::new(OPENAPI_FILE).parent().expect("dir"))
            .expect("docs/openapi");
        std::fs::write(OPENAPI_FILE, &text).expect("write docs/openapi/receiver.json");
        panic!(
            "docs/openapi/receiver.json was out of date and has been regenerated: review the API change with `git diff docs/openapi/receiver.json` and commit it"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// /metrics

/// Runs `promtool check metrics` (Prometheus' own exposition parser and linter) on `text`.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => panic!(
            "promtool is needed to check /metrics and could not be run ({e}): install the Debian package `prometheus` (scripts/prereqs.sh does)"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool check metrics refused /metrics:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Samples of a text exposition: `name{labels}` (as written) to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(receiver: &Receiver) -> (String, BTreeMap<String, f64>) {
    let response = http()
        .get(format!("{}/metrics", receiver.base))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("content type")
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.expect("text");
    promtool_check(&text);
    let samples = samples(&text);
    (text, samples)
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Sum over every series of metric `name`.
fn sum(samples: &BTreeMap<String, f64>, name: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test]
async fn metrics_pass_promtool_and_move_with_uploads_refusals_and_errors() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let (text, before) = scrape(&receiver).await;
    for name in [
        "deploy_receiver_received_bytes_total",
        "deploy_receiver_rollbacks_total",
        "deploy_receiver_uploads_in_flight",
        "deploy_receiver_events_recorded_total",
        "deploy_receiver_events_delivered_total",
        "deploy_receiver_event_delivery_failures_total",
        "deploy_receiver_events_pending",
        "deploy_receiver_event_record_failures_total",
    ] {
        assert!(text.contains(&format!("\n{name} ")), "{name} is exported");
    }
    let build_info = format!(
        "deploy_receiver_build_info{{protocol_version=\"{}\",version=\"{}\"}}",
        deploy_protocol::PROTOCOL_VERSION,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&before, &build_info), 1.0, "{text}");
    // The process metrics of this test process (the receiver runs in it).
    assert!(
        value(&before, "process_resident_memory_bytes") > 1e6,
        "{text}"
    );
    assert!(value(&before, "process_open_fds") >= 3.0, "{text}");
    assert!(value(&before, "process_max_fds") > 0.0, "{text}");
    assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");

    // An upload: counted ok, its bytes received.
    let package: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (status, body) = receiver.upload(package.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A refused signature.
    let mut wrong_key = Signer::new("GET", "/deployments");
    wrong_key.secret = b"not-the-receivers-secret-0123456789abcdef".to_vec();
    let request = wrong_key.request(&http(), &receiver.base, b"");
    let refused = request.send().await.expect("GET /deployments");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // An error with a code of its own: bytes that do not match the signed checksum.
    let mut manifest = manifest_for(&package);
    manifest.package_checksum = Checksum::of(b"something else");
    let (status, body) = receiver
        .multipart("/deployment/upload", &manifest.to_bytes(), package.clone())
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "CHECKSUM_MISMATCH");

    let (_, after) = scrape(&receiver).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(delta(r#"deploy_receiver_uploads_total{result="ok"}"#), 1.0);
    assert_eq!(
        delta(r#"deploy_receiver_uploads_total{result="CHECKSUM_MISMATCH"}"#),
        1.0
    );
    assert_eq!(
        delta("deploy_receiver_received_bytes_total"),
        2.0 * package.len() as f64,
        "both uploads' bytes were received"
    );
    assert_eq!(
        delta(r#"deploy_receiver_auth_refused_total{reason="bad_signature"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"deploy_receiver_errors_total{code="UNAUTHORIZED"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"deploy_receiver_errors_total{code="CHECKSUM_MISMATCH"}"#),
        1.0
    );
    assert_eq!(
        sum(&after, "deploy_receiver_errors_total") - sum(&before, "deploy_receiver_errors_total"),
        2.0,
        "one count per error response"
    );
    assert_eq!(
        value(
            &after,
            r#"deploy_receiver_stage_duration_seconds_count{stage="upload"}"#
        ),
        1.0,
        "the stored upload's duration is observed"
    );
    assert_eq!(value(&after, "deploy_receiver_uploads_in_flight"), 0.0);
    receiver.stop().await;
}

// ---------------------------------------------------------------------------------------------
// /health

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

#[tokio::test]
async fn health_says_where_events_go() {
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let events = health(&receiver).await["events"]
        .as_str()
        .expect("events")
        .to_owned();
    let outbox = dir
        .path()
        .canonicalize()
        .expect("dir")
        .join("packages/.state/events/events.jsonl");
    assert_eq!(events, format!("outbox:{}", outbox.display()));
    receiver.stop().await;

    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| {
        c.kafka_bootstrap_servers = Some("127.0.0.1:9".into());
        c.kafka_topic = "deploys".into();
    })
    .await;
    assert_eq!(
        health(&receiver).await["events"],
        "kafka://127.0.0.1:9/deploys"
    );
    receiver.stop().await;
}
