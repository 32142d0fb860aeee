//! "Deploy in one command" end to end: the sender library's `deploy` (what `deploy-sender deploy`
//! calls) takes a Dockerfile to a healthy container through the real receiver on loopback and the
//! real Docker engine; upgrades replace, failing versions roll back, and bad packages, failed
//! builds and a missing engine are refused with their codes, leaving the host as it was.
//! Images are built `FROM scratch` with the static busybox; every test removes what it created.

mod common;

use std::path::Path;
use std::sync::Arc;

use bollard::Docker;
use clap::Parser;
use common::docker::{
    busybox_context, docker, host_guard, httpd_dockerfile, published_port, Guard,
};
use common::*;
use deploy_protocol::api::{DeploymentStatus, Stage, StageOutcome};
use deploy_protocol::events::EventType;
use deploy_protocol::{
    DeploymentSpec, ErrorCode, HealthCheckKind, HealthCheckSpec, PortMapping, PortProtocol,
};
use deploy_sender::{deploy, deploy_package, DeployFailure, DeployOutcome, DeployRequest};
use deploy_sender::{hash_file, Lifecycle, ReceiverClient, ReceiverTarget};
use deploy_sender::{
    package_image, BuildSpec, ImageSource, NoProgress, PackageInfo, PackageRequest, PackageStore,
};
use uuid::Uuid;

/// Set in the child process that runs with an unreachable DOCKER_HOST: the package store to use.
const CHILD_STORE_ENV: &str = "DEPLOY_E2E_NO_DOCKER_CHILD_STORE";
/// The stored package the child sends.
const CHILD_PACKAGE_ENV: &str = "DEPLOY_E2E_NO_DOCKER_CHILD_PACKAGE";
const MISSING_SOCKET: &str = "unix:///nonexistent/deploy-e2e/docker.sock";

/// One test's world: the engine, a receiver, a sender package store, and the guard that removes
/// the test's containers and images.
struct Rig {
    docker: Docker,
    receiver: Receiver,
    store: PackageStore,
    store_dir: tempfile::TempDir,
    client: reqwest::Client,
    events: Lifecycle,
    host: Guard,
}

impl Rig {
    async fn new() -> Self {
        let docker = docker().await;
        let store_dir = tempfile::tempdir().expect("tempdir");
        Self {
            store: PackageStore::open(store_dir.path()).await.expect("store"),
            events: open_events(store_dir.path()).await,
            store_dir,
            receiver: spawn_receiver(|_| {}).await,
            client: reqwest::Client::new(),
            host: host_guard(),
            docker,
        }
    }

    fn client(&self) -> ReceiverClient {
        ReceiverClient::new(self.client.clone(), target(&self.receiver))
    }

    /// The test's container: busybox httpd on a loopback port Docker picks, Docker health check.
    fn spec(&self) -> DeploymentSpec {
        spec(&self.host.name)
    }

    /// Builds `version` (serving `version`, healthy when `wget` reaches `health_port`) and deploys it.
    async fn deploy(
        &self,
        version: &str,
        health_port: u16,
    ) -> Result<DeployOutcome, DeployFailure> {
        let context = busybox_context(&self.host, &httpd_dockerfile(health_port), version);
        let request = DeployRequest {
            package: PackageRequest::new(build_source(context.path(), &self.host.image(version))),
            deployment: self.spec(),
            correlation_id: Some(format!("e2e-{version}")),
        };
        deploy(
            &self.docker,
            &self.store,
            &self.client(),
            &request,
            Arc::new(NoProgress),
            &self.events,
        )
        .await
    }

    /// GET / on the container's published port.
    async fn get(&self) -> String {
        let port = published_port(&self.docker, &self.host.name).await;
        reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .expect("the container answers")
            .text()
            .await
            .expect("a body")
    }

    /// Ids of the containers named exactly like the test's.
    async fn containers_named_exactly(&self) -> Vec<String> {
        self.host
            .containers(&self.docker)
            .await
            .into_iter()
            .filter(|(_, name)| *name == self.host.name)
            .map(|(id, _)| id)
            .collect()
    }
}

fn target(receiver: &Receiver) -> ReceiverTarget {
    ReceiverTarget::new(&receiver.url, KEY_ID, SECRET.as_bytes()).expect("target")
}

fn spec(container_name: &str) -> DeploymentSpec {
    DeploymentSpec {
        container_name: container_name.to_owned(),
        ports: vec![PortMapping {
            container_port: 80,
            host_port: None,
            protocol: PortProtocol::Tcp,
            host_ip: Some("127.0.0.1".into()),
        }],
        health_check: HealthCheckSpec {
            kind: HealthCheckKind::Docker,
            deadline_secs: 60.0,
            ..HealthCheckSpec::default()
        },
        ..DeploymentSpec::default()
    }
}

/// The sender's event outbox for a package store (no Kafka), as `deploy-sender` opens it.
async fn open_events(package_dir: &Path) -> Lifecycle {
    Lifecycle::open(
        package_dir.join(".state"),
        None,
        deploy_protocol::events::DEFAULT_TOPIC.into(),
    )
    .await
    .expect("event outbox")
}

fn build_source(context: &Path, tag: &str) -> ImageSource {
    ImageSource::Build(BuildSpec {
        dockerfile: context.join("Dockerfile"),
        context: context.to_path_buf(),
        build_args: Default::default(),
        tag: tag.to_owned(),
    })
}

fn stage_outcome(record: &deploy_protocol::api::DeploymentRecord, stage: Stage) -> StageOutcome {
    record
        .stages
        .iter()
        .rev()
        .find(|s| s.stage == stage)
        .map(|s| s.outcome)
        .unwrap_or_else(|| panic!("no {stage:?} stage in {:?}", record.stages))
}

#[tokio::test]
async fn dockerfile_becomes_a_healthy_container_reachable_on_its_port() {
    let rig = Rig::new().await;
    let outcome = rig.deploy("v1", 80).await.expect("v1 deploys");
    let record = &outcome.deployment;
    assert_eq!(record.status, DeploymentStatus::Succeeded, "{record:?}");
    for stage in [
        Stage::Upload,
        Stage::Verify,
        Stage::Load,
        Stage::Start,
        Stage::Health,
    ] {
        assert_eq!(stage_outcome(record, stage), StageOutcome::Ok, "{stage:?}");
    }
    assert_eq!(record.image, rig.host.image("v1"));
    assert_eq!(record.package_id, Some(outcome.package.package_id));
    assert_eq!(record.correlation_id.as_deref(), Some("e2e-v1"));
    assert_eq!(outcome.transfer.bytes, outcome.package.package_size);
    assert_eq!(
        rig.containers_named_exactly().await,
        [record.container_id.clone().expect("a container id")]
    );
    assert_eq!(rig.get().await, "v1");
}

#[tokio::test]
async fn v2_replaces_v1_and_an_unhealthy_v3_is_rolled_back_to_v2() {
    let rig = Rig::new().await;
    let v1 = rig.deploy("v1", 80).await.expect("v1 deploys").deployment;
    let v2 = rig.deploy("v2", 80).await.expect("v2 deploys").deployment;
    assert_eq!(v2.previous_container_id, v1.container_id);
    assert_eq!(rig.get().await, "v2");
    let v2_id = v2.container_id.clone().expect("a container id");
    assert_eq!(
        rig.containers_named_exactly().await,
        std::slice::from_ref(&v2_id)
    );

    // v3's HEALTHCHECK probes a port nobody listens on.
    let failure = rig.deploy("v3", 81).await.expect_err("v3 is unhealthy");
    assert_eq!(failure.code(), ErrorCode::HealthCheckFailed, "{failure}");
    let record = failure.deployment().expect("the receiver's record");
    assert_eq!(record.status, DeploymentStatus::RolledBack, "{record:?}");
    assert_eq!(stage_outcome(record, Stage::Health), StageOutcome::Failed);
    assert_eq!(stage_outcome(record, Stage::Rollback), StageOutcome::Ok);
    assert!(failure.to_string().contains("ROLLED_BACK"), "{failure}");
    assert!(failure.package.is_some(), "v3 was packaged");

    assert_eq!(rig.containers_named_exactly().await, [v2_id]);
    assert_eq!(rig.get().await, "v2");
}

#[tokio::test]
async fn corrupt_and_tampered_packages_are_refused_and_change_nothing_on_the_host() {
    let rig = Rig::new().await;
    let v1 = rig.deploy("v1", 80).await.expect("v1 deploys").deployment;

    // A v2 package; its image is then removed here, so that only a load could bring it back.
    let context = busybox_context(&rig.host, &httpd_dockerfile(80), "v2");
    let request = PackageRequest::new(build_source(context.path(), &rig.host.image("v2")));
    let v2 = package_image(&rig.docker, &rig.store, &request, &NoProgress)
        .await
        .expect("v2 packages");
    rig.docker
        .remove_image(&rig.host.image("v2"), None, None)
        .await
        .expect("remove the v2 image");
    let containers = rig.host.containers(&rig.docker).await;
    let images = rig.host.images(&rig.docker).await;

    // Corrupt: bytes garbled, then signed as they are: the checksum passes, the load fails.
    let mut bytes = std::fs::read(&v2.package_path).expect("package");
    let middle = bytes.len() / 2;
    let end = (middle + 4096).min(bytes.len());
    for b in &mut bytes[middle..end] {
        *b ^= 0x5a;
    }
    let corrupt = package_file(&rig, &v2, &bytes, "corrupt").await;
    let err = send(&rig, &corrupt).await;
    assert_eq!(err.code(), ErrorCode::LoadFailed, "{err}");

    // Tampered: one byte flipped after signing: the checksum fails.
    let mut bytes = std::fs::read(&v2.package_path).expect("package");
    bytes[middle] ^= 0x01;
    let mut tampered = package_file(&rig, &v2, &bytes, "tampered").await;
    tampered.package_checksum = v2.package_checksum;
    let err = send(&rig, &tampered).await;
    assert_eq!(err.code(), ErrorCode::ChecksumMismatch, "{err}");

    assert_eq!(rig.host.containers(&rig.docker).await, containers);
    assert_eq!(rig.host.images(&rig.docker).await, images);
    assert_eq!(
        rig.containers_named_exactly().await,
        [v1.container_id.expect("v1's container")]
    );
    assert_eq!(rig.get().await, "v1");
}

/// `package` with other bytes, under a new id (the receiver keeps ids bound to their checksum).
async fn package_file(rig: &Rig, package: &PackageInfo, bytes: &[u8], name: &str) -> PackageInfo {
    let path = rig.store_dir.path().join(format!("{name}.tar.zst"));
    std::fs::write(&path, bytes).expect("write package");
    let (checksum, size) = hash_file(&path).await.expect("hash");
    PackageInfo {
        package_id: Uuid::new_v4(),
        package_path: path.to_string_lossy().into_owned(),
        package_checksum: checksum,
        package_size: size,
        ..package.clone()
    }
}

async fn send(rig: &Rig, package: &PackageInfo) -> deploy_sender::SenderError {
    deploy_package(
        &rig.client(),
        package,
        &rig.spec(),
        None,
        Arc::new(NoProgress),
    )
    .await
    .expect_err("refused")
}

#[tokio::test]
async fn build_error_is_build_failed_with_the_log_tail() {
    let rig = Rig::new().await;
    let dockerfile = "FROM scratch\nCOPY busybox /bin/busybox\n\
        RUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo marker-build-broke-here; exit 3\"]\n";
    let context = busybox_context(&rig.host, dockerfile, "never served");
    let request = DeployRequest {
        package: PackageRequest::new(build_source(context.path(), &rig.host.image("broken"))),
        deployment: rig.spec(),
        correlation_id: None,
    };
    let failure = deploy(
        &rig.docker,
        &rig.store,
        &rig.client(),
        &request,
        Arc::new(NoProgress),
        &rig.events,
    )
    .await
    .expect_err("the build fails");
    assert_eq!(failure.code(), ErrorCode::BuildFailed, "{failure}");
    assert!(
        failure.to_string().contains("marker-build-broke-here"),
        "the log tail is in the message: {failure}"
    );
    assert!(failure.package.is_none() && failure.deployment().is_none());
    assert_eq!(rig.host.containers(&rig.docker).await, []);
}

/// Runs `child_process_deploys_with_docker_unreachable` in a child process whose DOCKER_HOST
/// names a socket that does not exist (the variable is never changed in this process).
#[tokio::test]
async fn docker_unreachable_is_docker_unavailable_for_packaging_and_for_the_receiver() {
    let docker = docker().await;
    let host = host_guard();
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(store_dir.path()).await.expect("store");
    let context = busybox_context(&host, &httpd_dockerfile(80), "v1");
    let request = PackageRequest::new(build_source(context.path(), &host.image("v1")));
    let package = package_image(&docker, &store, &request, &NoProgress)
        .await
        .expect("a package to send");

    let output = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_process_deploys_with_docker_unreachable",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DOCKER_HOST", MISSING_SOCKET)
        .env(CHILD_STORE_ENV, store_dir.path())
        .env(CHILD_PACKAGE_ENV, package.package_id.to_string())
        .output()
        .await
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child did not run:\n{stdout}");
    assert!(
        stdout.contains("child checked DOCKER_UNAVAILABLE"),
        "{stdout}"
    );
}

/// Only does something in the child process started by the test above.
#[tokio::test]
async fn child_process_deploys_with_docker_unreachable() {
    let Some(store_dir) = std::env::var_os(CHILD_STORE_ENV) else {
        return;
    };
    let package_id: Uuid = std::env::var(CHILD_PACKAGE_ENV)
        .expect("package id")
        .parse()
        .expect("a uuid");
    let store = PackageStore::open(store_dir).await.expect("store");
    let receiver = spawn_receiver(|_| {}).await;
    let client = reqwest::Client::new();
    let host = host_guard();
    let name = host.name.clone();

    // Packaging: what the CLI does first, connecting to the engine...
    let err = deploy_sender::connect_docker()
        .await
        .expect_err("no engine");
    assert_eq!(err.code(), ErrorCode::DockerUnavailable, "{err}");
    assert!(err.to_string().contains(MISSING_SOCKET), "{err}");
    // ...and a handle to an engine that went away, as a long-lived service may hold: its socket
    // file is still there, but nobody listens.
    let dead = tempfile::tempdir().expect("tempdir");
    let socket = dead.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a socket"));
    let lazy = Docker::connect_with_unix(
        &format!("unix://{}", socket.display()),
        10,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("a handle");
    let context = busybox_context(&host, &httpd_dockerfile(80), "v1");
    let request = DeployRequest {
        package: PackageRequest::new(build_source(context.path(), &format!("{name}:v1"))),
        deployment: spec(&name),
        correlation_id: None,
    };
    let failure = deploy(
        &lazy,
        &store,
        &ReceiverClient::new(client.clone(), target(&receiver)),
        &request,
        Arc::new(NoProgress),
        &open_events(store.dir()).await,
    )
    .await
    .expect_err("no engine to build with");
    assert_eq!(failure.code(), ErrorCode::DockerUnavailable, "{failure}");

    // The receiver's /full: the package arrives and is verified, then the engine is missing.
    let package = store.get(package_id).await.expect("the parent's package");
    let err = deploy_package(
        &ReceiverClient::new(client.clone(), target(&receiver)),
        &package,
        &spec(&name),
        None,
        Arc::new(NoProgress),
    )
    .await
    .expect_err("no engine to load into");
    assert_eq!(err.code(), ErrorCode::DockerUnavailable, "{err}");
    println!("child checked DOCKER_UNAVAILABLE");
}

#[tokio::test]
async fn the_cli_deploy_records_build_and_transfer_events_like_the_service() {
    // The default, layer-aware path: the events are keyed by the release id.
    let (rig, events) = cli_deploy_events(&[]).await;
    assert_eq!(events[1].payload["layers"], 2, "{:?}", events[1]);
    assert_eq!(events[2].payload["endpoint"], "release");
    assert_eq!(
        events[3].payload["release_id"].as_str(),
        events[0].package_id.map(|id| id.to_string()).as_deref()
    );
    assert!(rig.store.list().await.expect("the store").is_empty());
}

#[tokio::test]
async fn the_cli_deploy_of_a_whole_package_records_the_same_events() {
    let (rig, events) = cli_deploy_events(&["--full"]).await;
    assert_eq!(events[2].payload["endpoint"], "full");
    let stored = rig.store.list().await.expect("the store");
    assert_eq!(events[0].package_id, Some(stored[0].package_id));
}

/// Deploys a built image with the CLI (plus `extra` flags) and returns the events it recorded,
/// oldest first, after checking what both paths share: the four event types in order, one
/// correlation id, container name and key, and the receiver.
async fn cli_deploy_events(extra: &[&str]) -> (Rig, Vec<deploy_events::LifecycleEvent>) {
    let rig = Rig::new().await;
    let context = busybox_context(&rig.host, &httpd_dockerfile(80), "cli");
    let state_dir = rig.store_dir.path().join("cli-state");
    let dockerfile = context.path().join("Dockerfile");
    let tag = rig.host.image("cli");
    let mut args = vec![
        "deploy-sender",
        "deploy",
        "--dockerfile",
        path_str(&dockerfile),
        "--context",
        path_str(context.path()),
        "--tag",
        &tag,
        "--name",
        &rig.host.name,
        "--health",
        "docker",
        "--to",
        &rig.receiver.url,
        "--key-id",
        KEY_ID,
        "--secret",
        SECRET,
        "--package-dir",
        path_str(rig.store_dir.path()),
        "--state-dir",
        path_str(&state_dir),
        "--correlation-id",
        "e2e-cli",
        "--json",
    ];
    args.extend_from_slice(extra);
    let cli = deploy_sender::cli::Cli::try_parse_from(args).expect("valid flags");
    deploy_sender::cli::run(cli).await.expect("the CLI deploys");

    let outbox = deploy_events::EventSink::open(deploy_events::EventConfig::new(
        &state_dir,
        "deploy-sender",
    ))
    .await
    .expect("the CLI's outbox");
    let mut events = outbox.list(100);
    events.reverse();
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(
        types,
        [
            EventType::BuildStarted,
            EventType::BuildCompleted,
            EventType::TransferStarted,
            EventType::TransferCompleted,
        ],
        "{events:#?}"
    );
    for event in &events {
        assert_eq!(
            event.correlation_id.as_deref(),
            Some("e2e-cli"),
            "{event:?}"
        );
        assert_eq!(
            event.container_name.as_deref(),
            Some(rig.host.name.as_str())
        );
        assert_eq!(event.package_id, events[0].package_id);
    }
    assert_eq!(
        events[3].payload["receiver"],
        format!("{}/", rig.receiver.url)
    );
    drop(outbox);
    (rig, events)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}
