//! The real `deploy-sender` REST service on loopback, against the real
//! Docker engine (images built `FROM scratch` with this machine's static busybox, removed by a
//! guard), a real receiver where a transfer is needed, and librdkafka's mock cluster for events.
//! Without a reachable Docker engine the Docker tests fail; they never skip.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{spawn_receiver, SECRET};
use deploy_sender::config::ServeConfig;
use deploy_sender::service::AppState;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

/// A sender serving on 127.0.0.1:<ephemeral> until dropped.
struct Sender {
    url: String,
    state: AppState,
    _dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts a sender with a fresh package directory and the test receivers' key.
async fn spawn_sender(tune: impl FnOnce(&mut ServeConfig)) -> Sender {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServeConfig::for_dir(dir.path().join("packages"));
    config.receiver.secret = Some(SECRET.into());
    config.zstd_workers = Some(2);
    tune(&mut config);
    let state = AppState::new(config).await.expect("sender state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let served = tokio::spawn(deploy_sender::service::serve(
        listener,
        state.clone(),
        async {
            let _ = rx.await;
        },
    ));
    Sender {
        url,
        state,
        _dir: dir,
        shutdown: Some(tx),
        served,
    }
}

/// One HTTP exchange: status, headers and the body as JSON (`Null` when it is not JSON).
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<no code>")
    }
}

async fn call(method: &str, url: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

impl Sender {
    async fn get(&self, path: &str) -> Answer {
        call("GET", &format!("{}{path}", self.url), None, &[]).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        call("POST", &format!("{}{path}", self.url), Some(body), &[]).await
    }
}

// ---- Docker test images -------------------------------------------------------------------

/// busybox httpd on port 80, built from a context with the static busybox (labelled for the
/// guard, so tests never share build-cache images).
const HTTPD: &str =
    "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\",\"httpd\",\"-f\",\"-p\",\"80\"]\n";

fn busybox_context(guard: &common::docker::Guard) -> tempfile::TempDir {
    common::docker::busybox_context(guard, HTTPD, "")
}

fn build_input(context: &tempfile::TempDir, tag: &str) -> Value {
    json!({
        "container_name": "sender-api-test",
        "image_tag": tag,
        "dockerfile_path": "Dockerfile",
        "build_context": context.path(),
        "build_args": {"UNUSED": "1"},
        "compression": "gzip",
        "verify_checksum": true,
    })
}

// ---- Tests -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_are_built_listed_shown_and_deleted() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let sender = spawn_sender(|_| {}).await;
    let context = busybox_context(&images);
    let tag = images.image("v1");

    let created = sender
        .post("/api/v1/packages", build_input(&context, &tag))
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let package = &created.body;
    let id = package["package_id"]
        .as_str()
        .expect("package_id")
        .to_owned();
    assert_eq!(package["checksum_verified"], true);
    assert_eq!(package["image_tags"], json!([tag]));
    assert_eq!(package["compression"], "gzip");
    assert_eq!(package["container_name"], "sender-api-test");
    assert!(package["package_size"].as_u64().expect("size") > 0);
    assert!(std::path::Path::new(package["package_path"].as_str().expect("path")).is_file());

    let list = sender.get("/api/v1/packages").await;
    assert_eq!(list.status, 200);
    assert!(
        list.body
            .as_array()
            .expect("array")
            .iter()
            .any(|p| p["package_id"] == id.as_str()),
        "{}",
        list.text
    );
    let shown = sender.get(&format!("/api/v1/packages/{id}")).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.body["package_checksum"], package["package_checksum"]);

    // An existing image is packaged too; an unknown one is NOT_FOUND.
    let existing = sender
        .post(
            "/api/v1/packages",
            json!({"image": tag, "compression": "zstd"}),
        )
        .await;
    assert_eq!(existing.status, 201, "{}", existing.text);
    assert_eq!(existing.body["build_duration_ms"], 0);
    let missing = sender
        .post(
            "/api/v1/packages",
            json!({"image": format!("deploy-sender-api-test/{}:none", Uuid::new_v4().simple())}),
        )
        .await;
    assert_eq!((missing.status, missing.code()), (404, "NOT_FOUND"));

    let deleted = call(
        "DELETE",
        &format!("{}/api/v1/packages/{id}", sender.url),
        None,
        &[],
    )
    .await;
    assert_eq!(deleted.status, 204);
    let gone = sender.get(&format!("/api/v1/packages/{id}")).await;
    assert_eq!((gone.status, gone.code()), (404, "NOT_FOUND"));
    let bad_id = sender.get("/api/v1/packages/not-a-uuid").await;
    assert_eq!((bad_id.status, bad_id.code()), (400, "VALIDATION_ERROR"));
    let nothing = sender.post("/api/v1/packages", json!({})).await;
    assert_eq!((nothing.status, nothing.code()), (400, "VALIDATION_ERROR"));
}

/// Reads server-sent events until a `finished` event; returns (event, data) pairs.
async fn read_sse(url: &str) -> Vec<(String, Value)> {
    let response = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .expect("events request");
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/event-stream"));
    let mut stream = response.bytes_stream();
    let (mut buffer, mut events) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), stream.next())
        .await
        .expect("the job finishes within 120 s")
    {
        buffer.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("utf-8"));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let (mut name, mut data) = (String::from("message"), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // keep-alive comment
            }
            let finished = name == "finished";
            events.push((name, serde_json::from_str(&data).expect("JSON data")));
            if finished {
                return events;
            }
        }
    }
    panic!("the event stream ended without a finished event: {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_packaging_streams_progress_until_the_job_finishes() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let sender = spawn_sender(|_| {}).await;
    let context = busybox_context(&images);
    let tag = images.image("v1");

    let accepted = call(
        "POST",
        &format!("{}/api/v1/packages", sender.url),
        Some(build_input(&context, &tag)),
        &[("Prefer", "respond-async")],
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let job_id = accepted.body["job_id"].as_str().expect("job_id").to_owned();
    assert_eq!(accepted.body["state"], "running");
    assert_eq!(
        accepted.headers["location"].to_str().expect("ascii"),
        format!("/api/v1/jobs/{job_id}")
    );

    let events_url = format!(
        "{}{}",
        sender.url,
        accepted.body["events_url"].as_str().expect("url")
    );
    let events = read_sse(&events_url).await;
    let (last_name, last) = events.last().expect("events");
    assert_eq!(last_name, "finished");
    assert_eq!(last["state"], "succeeded", "{last}");
    let package_id = last["result"]["package_id"].as_str().expect("package id");
    let export: Vec<&Value> = events
        .iter()
        .filter(|(name, data)| name == "progress" && data["stage"] == "export")
        .map(|(_, data)| data)
        .collect();
    assert!(
        !export.is_empty(),
        "export progress was streamed: {events:?}"
    );
    assert!(export
        .iter()
        .all(|p| p["done"].is_u64() && p["bytes_per_sec"].is_number()));
    assert!(
        export.iter().any(|p| p["done"].as_u64() > Some(0)),
        "{export:?}"
    );

    let job = sender.get(&format!("/api/v1/jobs/{job_id}")).await;
    assert_eq!(job.status, 200);
    assert_eq!(job.body["state"], "succeeded");
    assert_eq!(job.body["kind"], "package");
    assert_eq!(job.body["result"]["package_id"], package_id);
    // A finished job's stream answers its end at once.
    let again = read_sse(&events_url).await;
    assert_eq!(again.len(), 1);
    let stored = sender.get(&format!("/api/v1/packages/{package_id}")).await;
    assert_eq!(stored.status, 200);

    let unknown = sender
        .get(&format!("/api/v1/jobs/{}", Uuid::new_v4()))
        .await;
    assert_eq!((unknown.status, unknown.code()), (404, "NOT_FOUND"));
}

/// Polls the job until its progress message contains `text`.
async fn until_job_says(sender: &Sender, job_id: &str, text: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = sender.get(&format!("/api/v1/jobs/{job_id}")).await;
        let message = job.body["progress"]["message"].as_str().unwrap_or_default();
        if message.contains(text) {
            return job.body;
        }
        assert!(
            Instant::now() < deadline,
            "the job never said {text:?}: {}",
            job.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads an event stream to its end (at most `within`), answering its text.
async fn sse_until_end(response: reqwest::Response, within: Duration) -> String {
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Some(Err(_)) | None) => return text,
            Err(_) => panic!("the event stream was still open after {within:?}: {text}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_service_ends_event_streams_and_lets_a_queued_job_finish() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let mut sender = spawn_sender(|c| {
        c.max_concurrent_packages = 1;
        c.shutdown_grace_secs = 120;
    })
    .await;
    let context = busybox_context(&images);
    let tag = images.image("v1");
    // The one image slot is held, as a packaging job building another image would hold it.
    let slot = sender
        .state
        .package_slot(&deploy_sender::NoProgress)
        .await
        .expect("the free slot");
    let accepted = call(
        "POST",
        &format!("{}/api/v1/packages", sender.url),
        Some(build_input(&context, &tag)),
        &[("Prefer", "respond-async")],
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let job_id = accepted.body["job_id"].as_str().expect("job_id").to_owned();
    let waiting = until_job_says(&sender, &job_id, "waiting for one of the 1 image slots").await;
    assert_eq!(waiting["state"], "running");
    assert_eq!(waiting["progress"]["stage"], "context");

    let events = reqwest::Client::new()
        .get(format!("{}/api/v1/jobs/{job_id}/events", sender.url))
        .send()
        .await
        .expect("events request");
    assert_eq!(events.status().as_u16(), 200);
    // SIGTERM, as `serve` hears it.
    let _ = sender.shutdown.take().expect("running").send(());
    let streamed = sse_until_end(events, Duration::from_secs(10)).await;
    assert!(
        !streamed.contains("event: finished"),
        "the job has not finished; its stream ended because the service stops: {streamed}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sender.served.is_finished(),
        "the service waits for its running job"
    );
    assert!(
        reqwest::Client::new()
            .get(format!("{}/health", sender.url))
            .send()
            .await
            .is_err(),
        "a stopping service takes no new connection"
    );

    drop(slot);
    let served = tokio::time::timeout(Duration::from_secs(120), &mut sender.served)
        .await
        .expect("the service stops once its job has finished")
        .expect("serve's task");
    assert!(served.is_ok(), "{served:?}");
    let stored = sender.state.store().list().await.expect("packages");
    assert_eq!(stored.len(), 1, "the queued job ran to its end: {stored:?}");
    assert!(stored[0].image_tags.contains(&tag), "{stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_still_running_after_the_grace_period_does_not_hold_the_stop_open() {
    // No Docker: the job waits for an image slot before it asks the engine anything.
    let mut sender = spawn_sender(|c| {
        c.max_concurrent_packages = 1;
        c.shutdown_grace_secs = 1;
    })
    .await;
    let _slot = sender
        .state
        .package_slot(&deploy_sender::NoProgress)
        .await
        .expect("the free slot");
    let accepted = call(
        "POST",
        &format!("{}/api/v1/packages", sender.url),
        Some(json!({"image": "sender-api-test/never:1"})),
        &[("Prefer", "respond-async")],
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let job_id = accepted.body["job_id"].as_str().expect("job_id").to_owned();
    until_job_says(&sender, &job_id, "image slots").await;
    let events = reqwest::Client::new()
        .get(format!("{}/api/v1/jobs/{job_id}/events", sender.url))
        .send()
        .await
        .expect("events request");
    let stopped = Instant::now();
    let _ = sender.shutdown.take().expect("running").send(());
    sse_until_end(events, Duration::from_secs(10)).await;
    let served = tokio::time::timeout(Duration::from_secs(15), &mut sender.served)
        .await
        .expect("the stop is not held open by a job past the grace period")
        .expect("serve's task");
    assert!(served.is_ok(), "{served:?}");
    assert!(
        stopped.elapsed() >= Duration::from_secs(1),
        "the job got its grace period: {:?}",
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_to_a_real_receiver_stores_the_package_there() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let receiver = spawn_receiver(|_| {}).await;
    let url = receiver.url.clone();
    let sender = spawn_sender(|c| {
        c.receiver.to = vec![url];
        c.max_concurrent_packages = 1;
    })
    .await;
    let context = busybox_context(&images);
    let tag = images.image("v1");
    let package = sender
        .post("/api/v1/packages", build_input(&context, &tag))
        .await;
    assert_eq!(package.status, 201, "{}", package.text);
    let id = package.body["package_id"].as_str().expect("id").to_owned();
    let size = package.body["package_size"].as_u64().expect("size");

    // The whole package (protocol v1), upload only, to DEFAULT_RECEIVER_URL.
    let sent = sender
        .post("/api/v1/transfers", json!({"package_id": id, "full": true}))
        .await;
    assert_eq!(sent.status, 200, "{}", sent.text);
    assert_eq!(sent.body["transfer_success"], true);
    assert_eq!(sent.body["endpoint"], "upload");
    let outcome = &sent.body["receivers"][0];
    assert_eq!(outcome["receiver"], format!("{}/", receiver.url));
    assert_eq!(outcome["success"], true);
    assert_eq!(outcome["bytes"].as_u64(), Some(size));
    assert!(outcome["throughput_mbps"].is_number());
    assert_eq!(outcome["response"]["checksum_verified"], true);
    assert_eq!(outcome["response"]["package_id"], id.as_str());
    let stored = std::fs::read(receiver.package_dir.join(format!("{id}.pkg"))).expect("stored");
    let local = std::fs::read(package.body["package_path"].as_str().expect("path")).expect("local");
    assert!(
        stored == local,
        "the receiver holds the very bytes packaged"
    );

    // Two receivers at once: one fine (the same package again: idempotent), one unreachable.
    let mixed = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": id, "full": true,
                   "receivers": [receiver.url, "http://127.0.0.1:1"]}),
        )
        .await;
    assert_eq!(mixed.status, 200, "{}", mixed.text);
    assert_eq!(mixed.body["transfer_success"], false);
    assert_eq!(mixed.body["receivers"][0]["success"], true);
    assert_eq!(
        mixed.body["receivers"][1]["error"]["code"],
        "REMOTE_UNREACHABLE"
    );

    // A misspelt field is refused, not dropped (which would send to DEFAULT_RECEIVER_URL).
    let typo = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": id, "full": true, "receiver": ["http://127.0.0.1:1"]}),
        )
        .await;
    assert_eq!(
        (typo.status, typo.code()),
        (400, "VALIDATION_ERROR"),
        "{}",
        typo.text
    );
    assert!(typo.text.contains("receiver"), "{}", typo.text);

    let unreachable = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": id, "full": true, "receivers": ["http://127.0.0.1:1"]}),
        )
        .await;
    assert_eq!(
        (unreachable.status, unreachable.code()),
        (502, "REMOTE_UNREACHABLE")
    );

    // By default the package's image goes as a release from the layer cache: this receiver's
    // engine (the same one) holds every layer, so nothing of the image travels.
    let release = sender
        .post("/api/v1/transfers", json!({"package_id": id}))
        .await;
    assert_eq!(release.status, 200, "{}", release.text);
    assert_eq!(release.body["endpoint"], "release");
    let outcome = &release.body["receivers"][0];
    assert_eq!(outcome["success"], true, "{outcome}");
    assert_eq!(outcome["bytes"], 0);
    let totals = &outcome["response"]["totals"];
    assert_eq!(totals["present"], totals["layers"], "{outcome}");
    assert!(
        outcome["response"]["summary"]
            .as_str()
            .is_some_and(|s| s.contains("100.0 % already there")),
        "{outcome}"
    );
    let unknown = sender
        .post("/api/v1/transfers", json!({"package_id": Uuid::new_v4()}))
        .await;
    assert_eq!((unknown.status, unknown.code()), (404, "NOT_FOUND"));
    let metrics = sender.get("/api/v1/metrics").await;
    assert_eq!(metrics.body["successful_transfers"], 3);
    assert_eq!(metrics.body["failed_transfers"], 2);

    // A package a transfer will send is not deleted from under it: the transfer waits for the
    // one image slot (held here), and a DELETE meanwhile is a conflict that changes nothing.
    let slot = sender
        .state
        .package_slot(&deploy_sender::NoProgress)
        .await
        .expect("the free slot");
    let accepted = call(
        "POST",
        &format!("{}/api/v1/transfers", sender.url),
        Some(json!({"package_id": id, "full": true})),
        &[("Prefer", "respond-async")],
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let job_id = accepted.body["job_id"].as_str().expect("job_id").to_owned();
    until_job_says(&sender, &job_id, "image slots").await;
    let refused = call(
        "DELETE",
        &format!("{}/api/v1/packages/{id}", sender.url),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (refused.status, refused.code()),
        (409, "CONFLICT"),
        "{}",
        refused.text
    );
    drop(slot);
    let events_url = format!(
        "{}{}",
        sender.url,
        accepted.body["events_url"].as_str().expect("url")
    );
    let events = read_sse(&events_url).await;
    let (_, finished) = events.last().expect("events");
    assert_eq!(finished["state"], "succeeded", "{finished}");
    let deleted = call(
        "DELETE",
        &format!("{}/api/v1/packages/{id}", sender.url),
        None,
        &[],
    )
    .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_envelope_runs_each_operation() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let receiver = spawn_receiver(|_| {}).await;
    let sender = spawn_sender(|_| {}).await;
    let context = busybox_context(&images);
    let tag = images.image("v1");

    let packaged = sender
        .post(
            "/api/v1/execute",
            json!({"operation": "package_container", "input": build_input(&context, &tag),
                   "correlation_id": "exec-001"}),
        )
        .await;
    assert_eq!(packaged.status, 201, "{}", packaged.text);
    assert_eq!(packaged.headers["x-correlation-id"], "exec-001");
    let id = packaged.body["package_id"].as_str().expect("id").to_owned();

    let transferred = sender
        .post(
            "/api/v1/execute",
            json!({"operation": "transfer_package", "correlation_id": "exec-001",
                   "input": {"package_id": id, "remote_receiver_url": receiver.url, "full": true,
                             "package_checksum": packaged.body["package_checksum"]}}),
        )
        .await;
    assert_eq!(transferred.status, 200, "{}", transferred.text);
    assert_eq!(transferred.body["transfer_success"], true);
    assert!(receiver.package_dir.join(format!("{id}.pkg")).is_file());

    let published = sender
        .post(
            "/api/v1/execute",
            json!({"operation": "publish_transfer_event", "correlation_id": "exec-001",
                   "input": {"event_type": "DEPLOYMENT_FAILED", "event_payload": {"why": "test"},
                             "package_id": id, "container_name": "sender-api-test",
                             "image_tag": tag}}),
        )
        .await;
    assert_eq!(published.status, 201, "{}", published.text);
    assert_eq!(published.body["event_published"], true);
    assert_eq!(published.body["topic"], "deployment.lifecycle");

    let metrics = sender
        .post("/api/v1/execute", json!({"operation": "get_metrics"}))
        .await;
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    assert_eq!(metrics.body["total_builds"], 1);
    assert_eq!(metrics.body["successful_builds"], 1);
    assert_eq!(metrics.body["successful_transfers"], 1);
    assert!(metrics.body["total_bytes_sent"].as_u64() > Some(0));
    // BUILD_STARTED, BUILD_COMPLETED, TRANSFER_STARTED, TRANSFER_COMPLETED, and the explicit one.
    assert_eq!(metrics.body["events_published"], 5);

    let events = sender.get("/api/v1/events?limit=5").await;
    let types: Vec<&str> = events.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "DEPLOYMENT_FAILED",
            "TRANSFER_COMPLETED",
            "TRANSFER_STARTED",
            "BUILD_COMPLETED",
            "BUILD_STARTED"
        ],
        "newest first"
    );
    assert!(events.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .all(|e| e["correlation_id"] == "exec-001"));

    let unknown = sender
        .post("/api/v1/execute", json!({"operation": "launch_rockets"}))
        .await;
    assert_eq!((unknown.status, unknown.code()), (400, "VALIDATION_ERROR"));
    let bad_input = sender
        .post(
            "/api/v1/execute",
            json!({"operation": "transfer_package", "input": {"package_id": 7}}),
        )
        .await;
    assert_eq!(
        (bad_input.status, bad_input.code()),
        (400, "VALIDATION_ERROR")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required_on_the_api_when_configured() {
    let sender = spawn_sender(|c| c.api_token = Some("test-token-0123456789".into())).await;
    let url = format!("{}/api/v1/packages", sender.url);
    let none = call("GET", &url, None, &[("X-Correlation-Id", "auth-1")]).await;
    assert_eq!((none.status, none.code()), (401, "UNAUTHORIZED"));
    assert_eq!(none.body["error"]["correlation_id"], "auth-1");
    let wrong = call(
        "GET",
        &url,
        None,
        &[("Authorization", "Bearer test-token-0123456788")],
    )
    .await;
    assert_eq!((wrong.status, wrong.code()), (401, "UNAUTHORIZED"));
    let basic = call("GET", &url, None, &[("Authorization", "Basic dGVzdA==")]).await;
    assert_eq!(basic.status, 401);
    let right = call(
        "GET",
        &url,
        None,
        &[("Authorization", "Bearer test-token-0123456789")],
    )
    .await;
    assert_eq!(right.status, 200, "{}", right.text);
    // The scheme's case does not matter (RFC 7235).
    let lower = call(
        "GET",
        &url,
        None,
        &[("Authorization", "bearer test-token-0123456789")],
    )
    .await;
    assert_eq!(lower.status, 200, "{}", lower.text);
    let execute = call(
        "POST",
        &format!("{}/api/v1/execute", sender.url),
        Some(json!({"operation": "get_metrics"})),
        &[],
    )
    .await;
    assert_eq!(execute.status, 401);

    // Health, metrics and docs stay open.
    let health = sender.get("/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.body["service"], "deploy-sender");
    assert!(health.body["events"]
        .as_str()
        .expect("events")
        .starts_with("outbox:"));
    assert!(health.body["free_bytes"].as_u64() > Some(0));
    assert!(health.body["docker_available"].is_boolean());
    assert_eq!(sender.get("/metrics").await.status, 200);
    assert_eq!(sender.get("/openapi.json").await.status, 200);
    let docs = sender.get("/docs/").await;
    assert_eq!(docs.status, 200);
    assert!(
        docs.text.contains("swagger"),
        "the docs page is served offline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_validation_errors_with_the_error_body() {
    let sender = spawn_sender(|_| {}).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/packages", sender.url);
    for (body, content_type) in [
        ("{", "application/json"),
        ("[]", "application/json"),
        ("{\"image\": \"a:b\", \"colour\": 1}", "application/json"),
        ("{\"image\": \"a:b\"}", "text/plain"),
    ] {
        let response = client
            .post(&url)
            .header("content-type", content_type)
            .header("x-correlation-id", "bad-json-1")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 400, "{body}");
        let answer: Value = response.json().await.expect("a JSON error body");
        assert_eq!(answer["error"]["code"], "VALIDATION_ERROR", "{body}");
        assert_eq!(answer["error"]["correlation_id"], "bad-json-1");
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    let unknown_type = sender
        .post("/api/v1/events", json!({"event_type": "SOMETHING_ELSE"}))
        .await;
    assert_eq!(
        (unknown_type.status, unknown_type.code()),
        (400, "VALIDATION_ERROR")
    );
    // Larger than an event may ever be: the client's error (400), not an outbox failure (503).
    let huge = sender
        .post(
            "/api/v1/events",
            json!({"event_type": "TRANSFER_STARTED", "payload": {"x": "y".repeat(600 * 1024)}}),
        )
        .await;
    assert_eq!(
        (huge.status, huge.code()),
        (400, "VALIDATION_ERROR"),
        "{}",
        huge.text
    );
    let bad_limit = sender.get("/api/v1/events?limit=lots").await;
    assert_eq!(
        (bad_limit.status, bad_limit.code()),
        (400, "VALIDATION_ERROR")
    );
    let bad_async = sender.post("/api/v1/packages?async=maybe", json!({})).await;
    assert_eq!(
        (bad_async.status, bad_async.code()),
        (400, "VALIDATION_ERROR")
    );
    let no_receiver = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": Uuid::new_v4(), "receivers": ["ftp://x"]}),
        )
        .await;
    assert_eq!(no_receiver.status, 404, "the package is looked up first");
}

/// What schemathesis found the service answering wrongly (tests/tests/api_conformance.rs): each
/// is a 400 VALIDATION_ERROR now, not a 201 for a request the document calls invalid, nor a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_document_calls_invalid_are_validation_errors() {
    let docker = common::docker::docker().await;
    let images = common::docker::host_guard();
    let sender = spawn_sender(|_| {}).await;
    let layerless = images.image("layerless");
    common::docker::build_image(
        &docker,
        &images,
        &layerless,
        "FROM scratch\nCMD [\"/x\"]\n",
        &[],
    )
    .await;
    for (path, body) in [
        // An event's payload is an object.
        (
            "/api/v1/events",
            json!({"event_type": "BUILD_FAILED", "payload": [null, null]}),
        ),
        (
            "/api/v1/events",
            json!({"event_type": "BUILD_FAILED", "payload": "text"}),
        ),
        // A port is 1-65535.
        (
            "/api/v1/transfers",
            json!({"package_id": Uuid::new_v4(), "deployment": {"container_name": "web", "ports": [{"container_port": 70000}]}}),
        ),
        // `image` or `build_context`, and an image is named.
        ("/api/v1/packages", json!({})),
        ("/api/v1/packages", json!({"image": " "})),
        (
            "/api/v1/packages",
            json!({"image": "", "build_context": "/nonexistent"}),
        ),
        (
            "/api/v1/packages",
            json!({"image": "a:b", "build_context": "/nonexistent"}),
        ),
        // Levels are 1-19 whatever the compression.
        (
            "/api/v1/packages",
            json!({"image": "a:b", "compression": "none", "compression_level": 20}),
        ),
        // Docker cannot parse the reference (it answered 400, which was reported as a 500).
        ("/api/v1/packages", json!({"image": "Not A Reference"})),
        // Nor this one (Docker answered a 301, also reported as a 500).
        ("/api/v1/packages", json!({"image": "\u{10}Jt/"})),
        // Docker cannot export an image without layers (its 500 was passed on).
        ("/api/v1/packages", json!({"image": layerless})),
    ] {
        let answer = sender.post(path, body.clone()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (400, "VALIDATION_ERROR"),
            "{path} {body}: {}",
            answer.text
        );
    }
    let too_many = sender.get("/api/v1/events?limit=10001").await;
    assert_eq!(
        (too_many.status, too_many.code()),
        (400, "VALIDATION_ERROR")
    );
    assert_eq!(sender.get("/api/v1/events?limit=10000").await.status, 200);
}

/// `name{labels} value` lines of a text exposition, comments left out.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("name value");
            (name.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn sample(text: &str, name: &str) -> f64 {
    samples(text)
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0.0, |(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counters_move_after_work() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let sender = spawn_sender(|_| {}).await;
    let before = sender.get("/metrics").await;
    assert!(before.headers["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain; version=0.0.4"));
    assert_eq!(
        sample(&before.text, "deploy_sender_builds_total{result=\"ok\"}"),
        0.0
    );
    let build_info = format!(
        "deploy_sender_build_info{{protocol_version=\"{}\",version=\"{}\"}}",
        deploy_protocol::PROTOCOL_VERSION,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&before.text, &build_info), 1.0, "{}", before.text);
    assert!(
        sample(&before.text, "process_resident_memory_bytes") > 1e6,
        "{}",
        before.text
    );
    assert!(
        sample(&before.text, "process_open_fds") >= 3.0,
        "{}",
        before.text
    );
    assert!(
        before.text.contains("\nprocess_cpu_seconds_total "),
        "{}",
        before.text
    );

    let context = busybox_context(&images);
    let tag = images.image("v1");
    let built = sender
        .post("/api/v1/packages", build_input(&context, &tag))
        .await;
    assert_eq!(built.status, 201, "{}", built.text);
    let id = built.body["package_id"].as_str().expect("id");
    let failed = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": id, "full": true, "receivers": ["http://127.0.0.1:1"]}),
        )
        .await;
    assert_eq!(failed.status, 502);

    let after = sender.get("/metrics").await;
    let text = &after.text;
    assert_eq!(
        sample(text, "deploy_sender_builds_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        sample(
            text,
            "deploy_sender_transfers_total{result=\"REMOTE_UNREACHABLE\"}"
        ),
        1.0
    );
    assert_eq!(sample(text, "deploy_sender_transfers_in_flight"), 0.0);
    for stage in ["build", "export"] {
        let count = format!("deploy_sender_stage_duration_seconds_count{{stage=\"{stage}\"}}");
        assert_eq!(sample(text, &count), 1.0, "{stage}");
    }
    // BUILD_STARTED, BUILD_COMPLETED, TRANSFER_STARTED, TRANSFER_FAILED.
    assert_eq!(
        sample(text, "deploy_sender_events_total{result=\"recorded\"}"),
        4.0
    );
    assert_eq!(
        sample(text, "deploy_sender_events_total{result=\"record_failed\"}"),
        0.0
    );
    assert!(text.contains("deploy_sender_sent_bytes_total 0"));

    // Prometheus' own parser and linter checks the exposition (Debian package `prometheus`,
    // installed by scripts/prereqs.sh).
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed to check /metrics and could not be run ({e}): install the Debian package `prometheus` (scripts/prereqs.sh does)")
        });
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every endpoint of the service, as `METHOD path`.
const ENDPOINTS: &[&str] = &[
    "GET /health",
    "GET /metrics",
    "GET /api/v1/packages",
    "POST /api/v1/packages",
    "GET /api/v1/packages/{id}",
    "DELETE /api/v1/packages/{id}",
    "POST /api/v1/transfers",
    "POST /api/v1/rollouts",
    "GET /api/v1/rollouts",
    "GET /api/v1/rollouts/{id}",
    "DELETE /api/v1/rollouts/{id}",
    "GET /api/v1/rollouts/{id}/events",
    "GET /api/v1/events",
    "POST /api/v1/events",
    "GET /api/v1/jobs/{id}",
    "GET /api/v1/jobs/{id}/events",
    "GET /api/v1/metrics",
    "POST /api/v1/execute",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_route_is_routed() {
    let sender = spawn_sender(|_| {}).await;
    let document = sender.get("/openapi.json").await.body;
    let mut documented = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                documented.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    let expected: BTreeSet<String> = ENDPOINTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        documented, expected,
        "the document lists exactly the service's endpoints"
    );

    for endpoint in &documented {
        let (method, path) = endpoint.split_once(' ').expect("method path");
        let path = path.replace("{id}", &Uuid::new_v4().to_string());
        let body = (method == "POST").then(|| json!({}));
        let answer = call(method, &format!("{}{path}", sender.url), body, &[]).await;
        let bare_404 = answer.status == 404 && answer.body["error"]["code"].is_null();
        assert!(
            !bare_404 && answer.status != 405,
            "{endpoint} is documented but not routed: {} {}",
            answer.status,
            answer.text
        );
    }
    // And the router has nothing the document lacks: an undocumented path is axum's bare 404.
    let undocumented = sender.get("/api/v1/nothing-here").await;
    assert_eq!((undocumented.status, undocumented.text.as_str()), (404, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_openapi_document_is_current() {
    let sender = spawn_sender(|_| {}).await;
    let document = sender.get("/openapi.json").await.body;
    let rendered = serde_json::to_string_pretty(&document).expect("render") + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi/sender.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != rendered {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &rendered).expect("write");
        panic!(
            "docs/openapi/sender.json was out of date and has been rewritten from the running \
             service: review and commit it"
        );
    }
}

// ---- Lifecycle events through a Kafka-protocol broker -------------------------------------------

fn read_topic(bootstrap: &str, topic: &str, key: &str, expected: usize) -> Vec<Value> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "sender-api-tests")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let timeout = Duration::from_secs(30);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("metadata");
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut received = Vec::new();
    while received.len() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} events arrived: {received:?}",
            received.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.expect("consume");
        if message.key() != Some(key.as_bytes()) {
            continue;
        }
        received.push(serde_json::from_slice(message.payload().expect("value")).expect("JSON"));
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn package_and_transfer_emit_lifecycle_events_to_kafka_in_order() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let topic = "sender.lifecycle.test";
    cluster.create_topic(topic, 1, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    let receiver = spawn_receiver(|_| {}).await;
    let (servers, url) = (bootstrap.clone(), receiver.url.clone());
    let sender = spawn_sender(|c| {
        c.events.kafka_bootstrap_servers = Some(servers);
        c.events.kafka_topic = topic.into();
        c.receiver.to = vec![url];
    })
    .await;
    let health = sender.get("/health").await;
    assert_eq!(
        health.body["events"],
        format!("kafka://{bootstrap}/{topic}")
    );

    let context = busybox_context(&images);
    let tag = images.image("v1");
    let correlation = [("X-Correlation-Id", "kafka-corr-1")];
    let package = call(
        "POST",
        &format!("{}/api/v1/packages", sender.url),
        Some({
            // Without a container name: every event, BUILD_STARTED too, names the one the
            // package gets from its tag.
            let mut input = build_input(&context, &tag);
            input
                .as_object_mut()
                .expect("object")
                .remove("container_name");
            input
        }),
        &correlation,
    )
    .await;
    assert_eq!(package.status, 201, "{}", package.text);
    let id = package.body["package_id"].as_str().expect("id").to_owned();
    let transfer = call(
        "POST",
        &format!("{}/api/v1/transfers", sender.url),
        Some(json!({"package_id": id, "full": true})),
        &correlation,
    )
    .await;
    assert_eq!(transfer.status, 200, "{}", transfer.text);

    sender
        .state
        .events()
        .sink()
        .flush(Duration::from_secs(30))
        .await
        .expect("Kafka took every event");
    let events = tokio::task::spawn_blocking(move || read_topic(&bootstrap, topic, &id, 4))
        .await
        .expect("consumer");
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "BUILD_STARTED",
            "BUILD_COMPLETED",
            "TRANSFER_STARTED",
            "TRANSFER_COMPLETED"
        ]
    );
    for event in &events {
        assert_eq!(event["source_service"], "deploy-sender");
        assert_eq!(event["correlation_id"], "kafka-corr-1");
        assert_eq!(event["image_tag"], tag.as_str());
        assert_eq!(
            event["container_name"],
            deploy_sender::default_container_name(&tag).as_str(),
            "{event}"
        );
    }
    assert_eq!(
        events[1]["payload"]["package_checksum"],
        package.body["package_checksum"]
    );
    assert_eq!(
        events[3]["payload"]["bytes"], package.body["package_size"],
        "{}",
        events[3]
    );
    let metrics = sender.get("/metrics").await.text;
    assert_eq!(
        sample(&metrics, "deploy_sender_events_total{result=\"delivered\"}"),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_with_a_deployment_runs_it_and_reports_a_failed_one() {
    let docker = common::docker::docker().await;
    let host = common::docker::host_guard();
    let receiver = spawn_receiver(|_| {}).await;
    let url = receiver.url.clone();
    let sender = spawn_sender(|c| c.receiver.to = vec![url]).await;
    let package = |health_port: u16, tag: &str| {
        let context = common::docker::busybox_context(
            &host,
            &common::docker::httpd_dockerfile(health_port),
            "hello from the sender API",
        );
        let input = json!({"image_tag": host.image(tag), "build_context": context.path()});
        (context, input)
    };
    let deployment = json!({
        "container_name": host.name,
        "ports": [{"container_port": 80, "host_ip": "127.0.0.1"}],
        "health_check": {"kind": "docker", "deadline_secs": 60.0},
    });

    let (_good_context, good_input) = package(80, "good");
    let good = sender.post("/api/v1/packages", good_input).await;
    assert_eq!(good.status, 201, "{}", good.text);
    let deployed = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": good.body["package_id"], "deployment": deployment, "full": true}),
        )
        .await;
    assert_eq!(deployed.status, 200, "{}", deployed.text);
    assert_eq!(deployed.body["endpoint"], "full");
    let outcome = &deployed.body["receivers"][0];
    assert_eq!(outcome["response"]["status"], "SUCCEEDED", "{outcome}");
    assert_eq!(
        deployed.body["remote_deployment_id"],
        outcome["response"]["deployment_id"]
    );
    let port = common::docker::published_port(&docker, &host.name).await;
    let page = reqwest::get(format!("http://127.0.0.1:{port}/"))
        .await
        .expect("the deployed container serves")
        .text()
        .await
        .expect("body");
    assert_eq!(page, "hello from the sender API");

    // An image that never becomes healthy: the receiver rolls back, the sender says so.
    let (_bad_context, bad_input) = package(81, "bad");
    let bad = sender.post("/api/v1/packages", bad_input).await;
    assert_eq!(bad.status, 201, "{}", bad.text);
    let failed = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": bad.body["package_id"], "deployment": deployment, "full": true}),
        )
        .await;
    assert_eq!(
        (failed.status, failed.code()),
        (422, "HEALTH_CHECK_FAILED"),
        "{}",
        failed.text
    );
    let events = sender.get("/api/v1/events?limit=2").await;
    let newest = &events.body["events"][0];
    assert_eq!(newest["event_type"], "DEPLOYMENT_FAILED", "{}", events.text);
    assert_eq!(newest["payload"]["code"], "HEALTH_CHECK_FAILED");
    assert_eq!(newest["payload"]["status"], "ROLLED_BACK");
    assert_eq!(events.body["events"][1]["event_type"], "TRANSFER_COMPLETED");
    let bad_spec = sender
        .post(
            "/api/v1/transfers",
            json!({"package_id": good.body["package_id"],
                   "deployment": {"container_name": "no spaces allowed"}}),
        )
        .await;
    assert_eq!(
        (bad_spec.status, bad_spec.code()),
        (400, "VALIDATION_ERROR")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_transfer_to_a_cold_host_deploys_every_layer_and_a_second_sends_none() {
    common::docker::docker().await;
    let images = common::docker::host_guard();
    let host = tokio::task::spawn_blocking(|| deploy_testkit::hosts::TestHost::start("sapicold"))
        .await
        .expect("test host");
    let receiver = spawn_receiver(|c| c.docker_host = Some(host.docker_host())).await;
    let sender = spawn_sender(|_| {}).await;
    let context = busybox_context(&images);
    let tag = images.image("cold");
    let package = sender
        .post("/api/v1/packages", build_input(&context, &tag))
        .await;
    assert_eq!(package.status, 201, "{}", package.text);
    let id = package.body["package_id"].as_str().expect("id").to_owned();
    let transfer = json!({"package_id": id, "receivers": [receiver.url],
        "deployment": {"container_name": "sender-api-cold", "health_check": {"kind": "none", "settle_secs": 0.5}}});

    let accepted = call(
        "POST",
        &format!("{}/api/v1/transfers", sender.url),
        Some(transfer.clone()),
        &[("Prefer", "respond-async")],
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let events_url = format!(
        "{}{}",
        sender.url,
        accepted.body["events_url"].as_str().expect("url")
    );
    let events = read_sse(&events_url).await;
    let (_, finished) = events.last().expect("events");
    assert_eq!(finished["state"], "succeeded", "{finished}");
    assert!(
        events
            .iter()
            .any(|(name, data)| name == "progress" && data["stage"] == "upload"),
        "upload progress was streamed: {events:?}"
    );
    let result = &finished["result"];
    assert_eq!(result["endpoint"], "release", "{result}");
    let outcome = &result["receivers"][0]["response"];
    let layers = outcome["layers"].as_array().expect("per-layer report");
    assert!(
        !layers.is_empty() && layers.iter().all(|l| l["fate"] == "sent"),
        "a cold host lacks every layer: {outcome}"
    );
    assert!(
        outcome["summary"]
            .as_str()
            .is_some_and(|s| s.contains("(0.0 % already there)")),
        "{outcome}"
    );
    assert_eq!(outcome["deployment"]["status"], "SUCCEEDED", "{outcome}");
    let running = host
        .docker_cli()
        .args(["inspect", "-f", "{{.Image}}", "sender-api-cold"])
        .output()
        .expect("docker inspect");
    assert_eq!(
        String::from_utf8_lossy(&running.stdout).trim(),
        package.body["image_id"].as_str().expect("image id"),
        "the cold host runs the build host's image id"
    );

    let again = sender.post("/api/v1/transfers", transfer).await;
    assert_eq!(again.status, 200, "{}", again.text);
    let outcome = &again.body["receivers"][0];
    assert_eq!(outcome["bytes"], 0, "{outcome}");
    let totals = &outcome["response"]["totals"];
    assert_eq!(totals["present"], totals["layers"], "{outcome}");
}
