//! Operations: `deploy-sender doctor` against a real receiver on loopback, and the compose file.

mod common;

use common::*;
use deploy_protocol::ErrorCode;
use deploy_sender::cli::doctor::{self, DoctorArgs, Report, Status};
use deploy_sender::config::ReceiverConfig;

fn receiver_config(url: &str, secret: &str) -> ReceiverConfig {
    ReceiverConfig {
        to: Some(url.to_owned()),
        key_id: KEY_ID.into(),
        secret: Some(secret.to_owned()),
        connect_timeout_secs: 5,
        ..ReceiverConfig::default()
    }
}

fn status_of(report: &Report, name: &str) -> Status {
    report
        .checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {name} check in {report:#?}"))
        .status
}

#[tokio::test]
async fn doctor_passes_every_check_against_a_receiver_with_the_right_key() {
    let receiver = spawn_receiver(|c| {
        c.allowed_networks =
            Some(deploy_receiver::config::parse_networks("127.0.0.0/8").expect("net"))
    })
    .await;
    let report = doctor::diagnose(&receiver_config(&receiver.url, SECRET), 0).await;
    assert!(report.ok, "{report:#?}");
    for check in &report.checks {
        assert_eq!(check.status, Status::Ok, "{check:#?}");
    }
    for name in ["reachable", "clock", "docker", "disk", "warnings", "key"] {
        assert_eq!(status_of(&report, name), Status::Ok, "{name}");
    }
    let args = DoctorArgs {
        receiver: receiver_config(&receiver.url, SECRET),
        min_free: 0,
        json: true,
    };
    doctor::run(args).await.expect("doctor exits 0");
}

#[tokio::test]
async fn doctor_with_a_wrong_key_reports_the_receivers_refusal_and_fails() {
    let receiver = spawn_receiver(|_| {}).await;
    let config = receiver_config(&receiver.url, "not-the-receivers-secret-0123456789abcdef");
    let report = doctor::diagnose(&config, 0).await;
    assert!(!report.ok);
    assert_eq!(status_of(&report, "reachable"), Status::Ok);
    let key = report
        .checks
        .iter()
        .find(|c| c.name == "key")
        .expect("key check");
    assert_eq!(key.status, Status::Fail, "{key:#?}");
    assert!(key.detail.contains("UNAUTHORIZED"), "{}", key.detail);
    assert!(
        key.fix
            .as_deref()
            .is_some_and(|f| f.contains("DEPLOY_HMAC_SECRET")),
        "{key:#?}"
    );
    let error = doctor::run(DoctorArgs {
        receiver: config,
        min_free: 0,
        json: false,
    })
    .await
    .expect_err("doctor exits non-zero");
    assert_eq!(error.code(), ErrorCode::ValidationError);
    assert!(error.to_string().contains("key"), "{error}");
}

#[tokio::test]
async fn doctor_relays_the_receivers_warnings_about_an_example_key() {
    let receiver =
        spawn_receiver(|c| c.hmac_secret = Some("change-me-run-openssl-rand-hex-32".into())).await;
    let report = doctor::diagnose(
        &receiver_config(&receiver.url, "change-me-run-openssl-rand-hex-32"),
        0,
    )
    .await;
    assert!(report.ok, "warnings are not failures: {report:#?}");
    assert_eq!(status_of(&report, "key"), Status::Ok);
    let warned: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.name == "warnings" && c.status == Status::Warn)
        .map(|c| c.detail.as_str())
        .collect();
    assert!(
        warned.iter().any(|w| w.contains("DEPLOY_HMAC_SECRET")),
        "{warned:?}"
    );
    assert!(
        warned.iter().any(|w| w.contains("ALLOWED_NETWORKS")),
        "{warned:?}"
    );
}

#[tokio::test]
async fn doctor_reports_an_unreachable_receiver_and_skips_the_key_check() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let report = doctor::diagnose(&receiver_config(&url, SECRET), 0).await;
    assert_eq!(status_of(&report, "reachable"), Status::Fail, "{report:#?}");
    assert_eq!(status_of(&report, "key"), Status::Skip);
    let error = doctor::run(DoctorArgs {
        receiver: receiver_config(&url, SECRET),
        min_free: 0,
        json: true,
    })
    .await
    .expect_err("doctor exits non-zero");
    assert_eq!(error.code(), ErrorCode::RemoteUnreachable);
}

#[tokio::test]
async fn doctor_without_a_secret_still_checks_the_receiver_and_names_the_missing_key() {
    let receiver = spawn_receiver(|_| {}).await;
    let mut config = receiver_config(&receiver.url, "");
    config.secret = None;
    let report = doctor::diagnose(&config, 0).await;
    assert_eq!(status_of(&report, "reachable"), Status::Ok);
    let key = report
        .checks
        .iter()
        .find(|c| c.name == "key")
        .expect("key check");
    assert_eq!(key.status, Status::Fail);
    assert!(key
        .fix
        .as_deref()
        .is_some_and(|f| f.contains("DEPLOY_HMAC_SECRET")));
}

#[test]
fn docker_compose_file_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(root.join("deploy/check-compose.sh"))
        .output()
        .expect("run deploy/check-compose.sh");
    assert!(
        output.status.success(),
        "docker-compose.yml does not validate, or no compose tool is installed \
         (Debian: apt-get install docker-compose):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn receiver_warns_about_example_values_in_every_key_it_holds() {
    let mut config = deploy_receiver::Config::for_dir("/nonexistent", "");
    config.hmac_keys = Some(format!(
        "old={SECRET},new=change-me-run-openssl-rand-hex-32"
    ));
    let warnings = deploy_receiver::warnings(&config);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("DEPLOY_HMAC_KEYS") && w.contains("new") && !w.contains("old")),
        "{warnings:?}"
    );
    assert!(
        !warnings.iter().any(|w| w.contains("DEPLOY_HMAC_SECRET ")),
        "no DEPLOY_HMAC_SECRET is set: {warnings:?}"
    );
    config.hmac_keys = Some(format!("old={SECRET}"));
    assert!(!deploy_receiver::warnings(&config)
        .iter()
        .any(|w| w.contains("DEPLOY_HMAC")));
}
