//! Both services as a generated client sees them: their OpenAPI documents checked by a real
//! validator (`openapi-spec-validator`), and the running services checked against those documents
//! by schemathesis (property-based: valid and deliberately invalid requests, every response
//! checked against the document; receiver requests signed by tests/schemathesis/hooks.py).
//! Both tools come from PyPI (scripts/prereqs.sh installs them); without them the tests fail.
//! The schemathesis run is bounded (`--max-examples`, `--max-time`): a few minutes at most.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{spawn_receiver, SECRET};
use deploy_sender::config::ServeConfig;
use deploy_sender::service::AppState;
use deploy_testkit::hosts::TestHost;
use serde_json::Value;
use tokio::sync::oneshot;

/// A sender serving on 127.0.0.1:<ephemeral> until the returned sender is dropped.
async fn spawn_sender(dir: &Path) -> (String, oneshot::Sender<()>) {
    let mut config = ServeConfig::for_dir(dir.join("packages"));
    config.receiver.secret = Some(SECRET.into());
    let state = AppState::new(config).await.expect("sender state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(deploy_sender::service::serve(listener, state, async {
        let _ = rx.await;
    }));
    (url, tx)
}

async fn document(base: &str) -> Value {
    reqwest::get(format!("{base}/openapi.json"))
        .await
        .expect("GET /openapi.json")
        .json()
        .await
        .expect("a JSON document")
}

/// Runs a Python tool from PyPI, failing with what to install when it is missing.
fn python_tool(program: &str, args: &[&str], envs: &[(&str, String)]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} is needed and could not be run ({e}): run scripts/prereqs.sh (pip)")
        })
}

/// Every operation has an operationId, and no two share one (client generators name methods
/// after them).
fn assert_unique_operation_ids(service: &str, doc: &Value) {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let endpoint = format!("{} {path}", method.to_uppercase());
            let id = operation["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{service}: {endpoint} has no operationId"))
                .to_owned();
            if let Some(other) = seen.insert(id.clone(), endpoint.clone()) {
                panic!("{service}: operationId {id:?} of {endpoint} is also {other}'s");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_openapi_documents_pass_a_validator_with_unique_operation_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = spawn_receiver(|_| {}).await;
    let (sender, _stop) = spawn_sender(dir.path()).await;
    for (service, base) in [("receiver", receiver.url.as_str()), ("sender", &sender)] {
        let doc = document(base).await;
        assert_unique_operation_ids(service, &doc);
        let file = dir.path().join(format!("{service}.json"));
        std::fs::write(&file, serde_json::to_vec_pretty(&doc).expect("json")).expect("write");
        let output = python_tool(
            "openapi-spec-validator",
            &["--errors", "all", file.to_str().expect("utf-8")],
            &[],
        );
        assert!(
            output.status.success(),
            "openapi-spec-validator refused the {service}'s document:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// One bounded schemathesis run against `base`, with `config` (a file in tests/schemathesis)
/// when given: its report when it found something.
fn schemathesis(base: &str, config: Option<&str>, extra: &[&str]) -> Option<String> {
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemathesis");
    let url = format!("{base}/openapi.json");
    let config = config.map(|name| hooks.join(name).display().to_string());
    let mut args: Vec<&str> = match &config {
        Some(file) => vec!["--config-file", file.as_str()],
        None => Vec::new(),
    };
    args.extend_from_slice(&[
        "run",
        url.as_str(),
        "--max-examples",
        "25",
        "--max-time",
        "60",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
        "--seed",
        "1",
        // No .hypothesis directory in the source tree.
        "--generation-database",
        "none",
    ]);
    args.extend_from_slice(extra);
    let output = python_tool(
        "schemathesis",
        &args,
        &[
            ("SCHEMATHESIS_HOOKS", "hooks".into()),
            ("PYTHONPATH", hooks.display().to_string()),
            ("DEPLOY_HMAC_SECRET", SECRET.into()),
            ("DEPLOY_HMAC_KEY_ID", common::KEY_ID.into()),
        ],
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("schemathesis {}:\n{report}", extra.join(" "));
    (!output.status.success()).then(|| format!("{base} {}:\n{report}", extra.join(" ")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_wrong_with_the_receiver() {
    let receiver = spawn_receiver(|_| {}).await;
    let receiver_url = receiver.url.clone();
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        // The hook signs every request, so a request schemathesis meant to be unauthenticated
        // arrives signed (`ignored_auth`): refused signatures are tested in hardening.rs and
        // the protocol's envelope tests. The receiver refuses schema-valid requests for reasons
        // no schema can say (a package over MAX_PACKAGE_SIZE, durations over an hour, a
        // checksum that does not match the bytes), with documented codes, so
        // `positive_data_acceptance` cannot hold; and it checks an upload's declared size
        // before the rest of its manifest, so an invalid manifest that also declares too much
        // is answered 413 PACKAGE_TOO_LARGE, not 400 (`negative_data_rejection`). Every other
        // check runs: status codes, content types, headers and bodies against the document.
        // Settings, and why: tests/schemathesis/receiver.toml.
        failures.extend(schemathesis(
            &receiver_url,
            Some("receiver.toml"),
            &[
                "--exclude-checks",
                "ignored_auth,positive_data_acceptance,negative_data_rejection",
                // A blob PATCH body is raw bytes (`application/offset+octet-stream`), which
                // schemathesis cannot generate; crates/receiver/tests/v2_blobs.rs sends it.
                "--exclude-operation-id",
                "append_blob",
            ],
        ));
        failures
    })
    .await
    .expect("schemathesis runs");
    assert!(
        failures.is_empty(),
        "schemathesis found problems:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_wrong_with_the_sender() {
    // The sender packages through a real Docker engine of its own (a test host), not the
    // machine's: generated image names such as "0" are short image ids that would otherwise
    // match whatever image another test holds at that moment, so the outcome would depend on
    // the machine. This engine holds no images, and generated build contexts do not exist, so
    // packaging requests get the engine's and the checks' real refusals. The sender reads
    // DOCKER_HOST when it first needs the engine; nextest runs each test in a process of its
    // own, so no other test sees it.
    let host = tokio::task::spawn_blocking(|| TestHost::start("stfz"))
        .await
        .expect("test host");
    std::env::set_var("DOCKER_HOST", host.docker_host());
    let dir = tempfile::tempdir().expect("tempdir");
    let (sender, _stop) = spawn_sender(dir.path()).await;
    // Settings per operation, and why: tests/schemathesis/sender.toml.
    let failures =
        tokio::task::spawn_blocking(move || schemathesis(&sender, Some("sender.toml"), &[]))
            .await
            .expect("schemathesis runs");
    assert!(
        failures.is_none(),
        "schemathesis found problems:\n{}",
        failures.unwrap_or_default()
    );
    drop(host);
}
