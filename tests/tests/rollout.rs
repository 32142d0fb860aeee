//! Fleet rollouts against real hosts: four extra Docker engines, each in its own network namespace
//! (deploy-testkit's `TestHost`), each with its own real receiver on loopback, and the sender's
//! rollout moving images built on the main engine as layers prepared once (each host receives only
//! the blobs it lacks). After every rollout, what runs on each host is read from that host's own
//! engine.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use clap::Parser;
use common::docker::{busybox_context, docker, httpd_dockerfile, Guard};
use common::{spawn_receiver, Receiver, KEY_ID, SECRET};
use deploy_protocol::events::EventType;
use deploy_protocol::{
    DeploymentSpec, ErrorCode, HealthCheckKind, HealthCheckSpec, PortMapping, RestartPolicy,
};
use deploy_sender::config::ServeConfig;
use deploy_sender::rollout::{
    roll_out, BatchSize, FleetState, HostOutcome, Payload, Phase, Plan, Release, RolloutEvent,
    RolloutOptions, RolloutReport, RolloutStatus,
};
use deploy_sender::service::AppState as SenderState;
use deploy_sender::{
    package_image, prepare_image, BuildSpec, CompressionOptions, ImageSource, LayerCache,
    NoProgress, PackageInfo, PackageRequest, PackageStore, ReceiverClient, ReceiverTarget,
};
use deploy_testkit::hosts::{main_bridge_exists, TestHost};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Four hosts, each an engine and a receiver.
struct Fleet {
    hosts: Vec<TestHost>,
    engines: Vec<Docker>,
    receivers: Vec<Option<Receiver>>,
    targets: Vec<ReceiverClient>,
}

impl Fleet {
    async fn start(n: usize) -> Self {
        let hosts = tokio::task::spawn_blocking(move || {
            let starting: Vec<_> = (0..n)
                .map(|i| std::thread::spawn(move || TestHost::start(&format!("fl{i}"))))
                .collect();
            starting
                .into_iter()
                .map(|t| t.join().expect("a test host"))
                .collect::<Vec<_>>()
        })
        .await
        .expect("test hosts");
        let mut engines = Vec::new();
        let mut receivers = Vec::new();
        let mut targets = Vec::new();
        let http = reqwest::Client::new();
        for host in &hosts {
            engines.push(
                Docker::connect_with_unix(&host.docker_host(), 120, bollard::API_DEFAULT_VERSION)
                    .expect("the test host's engine"),
            );
            let docker_host = host.docker_host();
            let receiver = spawn_receiver(|c| {
                c.docker_host = Some(docker_host);
                c.allowed_networks =
                    Some(deploy_receiver::config::parse_networks("127.0.0.0/8").expect("cidr"));
            })
            .await;
            let target =
                ReceiverTarget::new(&receiver.url, KEY_ID, SECRET.as_bytes()).expect("target");
            targets.push(ReceiverClient::new(http.clone(), target));
            receivers.push(Some(receiver));
        }
        Self {
            hosts,
            engines,
            receivers,
            targets,
        }
    }

    /// `(container id, image id)` of `name` on each host's engine, `None` where none runs.
    async fn running(&self, name: &str) -> Vec<Option<(String, String)>> {
        let mut out = Vec::new();
        for engine in &self.engines {
            out.push(match engine.inspect_container(name, None).await {
                Ok(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                    Some((c.id.unwrap_or_default(), c.image.unwrap_or_default()))
                }
                _ => None,
            });
        }
        out
    }

    /// Whether each host's engine holds `image_id`.
    async fn holds(&self, image_id: &str) -> Vec<bool> {
        let mut out = Vec::new();
        for engine in &self.engines {
            out.push(engine.inspect_image(image_id).await.is_ok());
        }
        out
    }
}

fn spec(name: &str) -> DeploymentSpec {
    DeploymentSpec {
        container_name: name.to_owned(),
        restart_policy: RestartPolicy::No,
        health_check: HealthCheckSpec {
            kind: HealthCheckKind::Docker,
            deadline_secs: 30.0,
            ..HealthCheckSpec::default()
        },
        ..DeploymentSpec::default()
    }
}

async fn package(
    docker: &Docker,
    store: &PackageStore,
    guard: &Guard,
    version: &str,
    health_port: u16,
) -> PackageInfo {
    let context = busybox_context(guard, &httpd_dockerfile(health_port), version);
    let request = PackageRequest::new(ImageSource::Build(BuildSpec {
        dockerfile: context.path().join("Dockerfile"),
        context: context.path().to_path_buf(),
        build_args: Default::default(),
        tag: guard.image(version),
    }));
    package_image(docker, store, &request, &NoProgress)
        .await
        .expect("package")
}

/// The image of `package` as layers in `cache`, prepared once for every host.
async fn layers(docker: &Docker, cache: &LayerCache, package: &PackageInfo) -> Payload {
    let image = prepare_image(
        docker,
        cache,
        &package.image_id,
        &CompressionOptions::default(),
        Arc::new(NoProgress),
    )
    .await
    .expect("prepared layers");
    let mut image = image;
    image.tags = package.image_tags.clone();
    Payload::Layers(Arc::new(image))
}

/// Blob bytes of the distinct layers of `new` that `old` does not have.
fn lacking_bytes(new: &Payload, old: &Payload) -> u64 {
    let (Payload::Layers(new), Payload::Layers(old)) = (new, old) else {
        panic!("layers expected");
    };
    let mut seen = std::collections::HashSet::new();
    new.layers
        .iter()
        .filter(|l| old.layers.iter().all(|o| o.diff_id != l.diff_id))
        .filter(|l| seen.insert(l.diff_id.clone()))
        .map(|l| l.blob.size)
        .sum()
}

fn options() -> RolloutOptions {
    RolloutOptions {
        canary: Some(1),
        batch: BatchSize::Percent(50),
        host_timeout: Duration::from_secs(180),
        rollback_timeout: Duration::from_secs(120),
        ..RolloutOptions::default()
    }
}

async fn rollout(
    fleet: &Fleet,
    payload: &Payload,
    spec: DeploymentSpec,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> RolloutReport {
    let release = Release {
        payload: payload.clone(),
        spec,
        correlation_id: Some("rollout-e2e-fleet".into()),
    };
    roll_out(
        &fleet.targets,
        &release,
        &options(),
        CancellationToken::new(),
        on_event,
    )
    .await
    .expect("a rollout")
}

/// Runs `deploy-sender deploy --image TAG --to <the four hosts> --preload` in this process;
/// answers its exit code and the lifecycle events in its outbox, oldest first.
async fn cli_rollout(
    fleet: &Fleet,
    tag: &str,
    name: &str,
    package_dir: &Path,
    state_dir: &Path,
) -> (u8, Vec<deploy_events::LifecycleEvent>) {
    let to = fleet
        .targets
        .iter()
        .map(|t| t.target().base_url.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let layer_cache = package_dir.join("cli-layers");
    let args = [
        "deploy-sender",
        "deploy",
        "--image",
        tag,
        "--name",
        name,
        "--health",
        "docker",
        "--health-timeout",
        "30",
        "--restart",
        "no",
        "--to",
        &to,
        "--canary",
        "1",
        "--batch",
        "50%",
        "--host-timeout",
        "180",
        "--key-id",
        KEY_ID,
        "--secret",
        SECRET,
        "--package-dir",
        path_str(package_dir),
        "--layer-cache-dir",
        path_str(&layer_cache),
        "--state-dir",
        path_str(state_dir),
        "--correlation-id",
        "rollout-e2e-cli",
        "--preload",
    ];
    let cli = deploy_sender::cli::Cli::try_parse_from(args).expect("valid flags");
    let code = deploy_sender::cli::run(cli)
        .await
        .expect("the CLI rolls out");
    let outbox =
        deploy_events::EventSink::open(deploy_events::EventConfig::new(state_dir, "deploy-sender"))
            .await
            .expect("the CLI's outbox");
    let mut events = outbox.list(100);
    events.reverse();
    (code, events)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn outcomes(report: &RolloutReport) -> Vec<HostOutcome> {
    report.hosts.iter().map(|h| h.outcome).collect()
}

fn images(running: &[Option<(String, String)>]) -> Vec<Option<&str>> {
    running
        .iter()
        .map(|r| r.as_ref().map(|(_, image)| image.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_to_four_real_hosts_gate_on_the_canary_and_roll_back_what_they_moved() {
    let docker = docker().await;
    let guard = Guard::new("deploy-e2e-fleet");
    let name = guard.name.clone();
    let store_dir = tempfile::tempdir().expect("store dir");
    let store = PackageStore::open(store_dir.path()).await.expect("store");
    let v1 = package(&docker, &store, &guard, "v1", 80).await;
    let v2 = package(&docker, &store, &guard, "v2", 80).await;
    let unhealthy = package(&docker, &store, &guard, "v3", 81).await;
    let mut fleet = Fleet::start(4).await;
    use HostOutcome::*;

    let cache_dir = tempfile::tempdir().expect("layer cache dir");
    let cache = LayerCache::open(cache_dir.path(), 1 << 30)
        .await
        .expect("layer cache");
    let v2_layers = layers(&docker, &cache, &v2).await;

    // A healthy release reaches every host, the canary first, through the CLI
    // (`deploy --to A,B,C,D`), which records the ROLLOUT_* events in its outbox.
    let state_dir = store_dir.path().join("cli-state");
    let (code, events) = cli_rollout(
        &fleet,
        &guard.image("v1"),
        &name,
        store_dir.path(),
        &state_dir,
    )
    .await;
    assert_eq!(code, 0, "the fleet ends on the new release: {events:#?}");
    let on_v1 = fleet.running(&name).await;
    assert_eq!(images(&on_v1), [Some(v1.image_id.as_str()); 4]);
    let steps = Plan::new(4, Some(1), BatchSize::Percent(50))
        .expect("plan")
        .steps
        .len();
    let mut expected = vec![EventType::RolloutStarted];
    expected.extend(std::iter::repeat_n(EventType::RolloutBatchCompleted, steps));
    expected.push(EventType::RolloutCompleted);
    let types: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    assert_eq!(types, expected, "{events:#?}");
    let rollout_id = &events[0].payload["rollout_id"];
    // `--correlation-id`, made the rollout's own.
    let correlation_id = format!(
        "rollout-e2e-cli.rollout-{}",
        rollout_id.as_str().expect("a rollout id")
    );
    for event in &events {
        assert_eq!(&event.payload["rollout_id"], rollout_id, "{event:?}");
        assert_eq!(
            event.correlation_id.as_deref(),
            Some(correlation_id.as_str())
        );
        assert_eq!(event.container_name.as_deref(), Some(name.as_str()));
    }
    let last = &events[events.len() - 1].payload["report"];
    assert_eq!(last["fleet"], json!("NEW_RELEASE"), "{last}");
    let v1_layers = layers(&docker, &cache, &v1).await;
    let v1_bytes = v1_layers.total_bytes();
    for (i, host) in last["hosts"].as_array().expect("hosts").iter().enumerate() {
        assert_eq!(host["outcome"], json!("DEPLOYED"), "{host}");
        assert_eq!(
            host["bytes"],
            json!(v1_bytes),
            "a fresh host receives every blob of the image once (preloaded or not): {host}"
        );
        // `--preload`: every host after the canary was sent and loaded the release ahead of its
        // step; the canary was not.
        assert_eq!(host["preload_ms"].is_u64(), i > 0, "{host}");
        assert!(host.get("preload_error").is_none(), "{host}");
    }

    // An unhealthy release stops at the canary (rolled back there by its receiver); no other
    // host is touched: not even the image reaches them. This one goes as a whole package
    // (`--full`), the canary receiving all of it.
    let whole = Payload::Package(Box::new(unhealthy.clone()));
    let report = rollout(&fleet, &whole, spec(&name), &|_| {}).await;
    assert_eq!(report.hosts[0].bytes, unhealthy.package_size);
    assert_eq!(
        outcomes(&report),
        [Failed, NotReached, NotReached, NotReached],
        "{}",
        report.table()
    );
    assert_eq!(
        report.hosts[0].error.as_ref().map(|e| e.code),
        Some(ErrorCode::HealthCheckFailed)
    );
    assert_eq!(
        (report.status, report.fleet),
        (RolloutStatus::RolledBack, FleetState::OldRelease)
    );
    let now = fleet.running(&name).await;
    assert_eq!(images(&now), [Some(v1.image_id.as_str()); 4]);
    assert_eq!(now[1..], on_v1[1..], "the same containers run on hosts 2-4");
    assert_eq!(
        fleet.holds(&unhealthy.image_id).await[1..],
        [false, false, false]
    );

    // The same unhealthy release as layers with preload: the hosts after the canary receive and
    // load it while the canary is checked, but when the canary fails none of them moves: each
    // holds the image (by id: its tag is the deployment's to set) and still runs the very
    // container it ran before.
    let unhealthy_layers = layers(&docker, &cache, &unhealthy).await;
    let release = Release {
        payload: unhealthy_layers,
        spec: spec(&name),
        correlation_id: Some("rollout-e2e-preload".into()),
    };
    let preloading = RolloutOptions {
        preload: true,
        ..options()
    };
    let report = roll_out(
        &fleet.targets,
        &release,
        &preloading,
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("a rollout");
    assert_eq!(
        outcomes(&report),
        [Failed, NotReached, NotReached, NotReached],
        "{}",
        report.table()
    );
    assert_eq!(
        report.hosts[0].error.as_ref().map(|e| e.code),
        Some(ErrorCode::HealthCheckFailed)
    );
    assert_eq!(report.fleet, FleetState::OldRelease);
    let now = fleet.running(&name).await;
    assert_eq!(images(&now), [Some(v1.image_id.as_str()); 4]);
    assert_eq!(now[1..], on_v1[1..], "the same containers run on hosts 2-4");
    assert_eq!(
        fleet.holds(&unhealthy.image_id).await[1..],
        [true, true, true],
        "preloaded: {}",
        report.table()
    );
    let tag = unhealthy.image_tags.first().expect("the release's tag");
    assert_eq!(
        fleet.holds(tag).await[1..],
        [false, false, false],
        "a preload does not set the tag {tag}: only a deployment does"
    );
    for h in &report.hosts[1..] {
        assert!(h.preload_ms.is_some(), "{}", report.table());
        assert!(h.bytes > 0, "{}", report.table());
    }

    // A release whose new published port is taken on the third host alone: that host fails,
    // the canary and the second host (already moved) are rolled back to v1, the fourth is never
    // reached.
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut listener = fleet.hosts[2]
        .command_in_netns("/bin/busybox")
        .args(["nc", "-l", "-p", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("a listener in the third host's namespace");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut with_port = spec(&name);
    with_port.ports = vec![PortMapping {
        container_port: 80,
        host_port: Some(port),
        protocol: Default::default(),
        host_ip: None,
    }];
    let report = rollout(&fleet, &v2_layers, with_port.clone(), &|_| {}).await;
    eprintln!("{}", report.table());
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(
        outcomes(&report),
        [RolledBack, RolledBack, Failed, NotReached],
        "{}",
        report.table()
    );
    assert_eq!(
        report.hosts[2].error.as_ref().map(|e| e.code),
        Some(ErrorCode::DeployFailed)
    );
    assert_eq!(report.fleet, FleetState::OldRelease);
    for h in &report.hosts[..2] {
        assert_eq!(
            h.version_before.as_deref(),
            Some(guard.image("v1").as_str())
        );
        assert!(h.rollback_ms.is_some());
    }
    let now = fleet.running(&name).await;
    assert_eq!(
        images(&now),
        [Some(v1.image_id.as_str()); 4],
        "{}",
        report.table()
    );
    assert_eq!(now[3], on_v1[3], "the fourth host was not touched");
    assert_eq!(fleet.holds(&v2.image_id).await, [true, true, true, false]);
    // The hosts it reached received the blobs of v2 they lacked (the layers v2 does not share
    // with v1; the test images copy busybox afresh, so none), the failed host as many before its
    // deployment failed.
    let lacking = lacking_bytes(&v2_layers, &v1_layers);
    assert!(lacking > 0);
    for h in &report.hosts[..3] {
        assert_eq!(h.bytes, lacking, "{}", report.table());
    }
    assert_eq!(report.hosts[3].bytes, 0);

    // Abort through the REST API once the canary is healthy on the new release: the rollout stops, the
    // hosts it moved are rolled back, the last batch is never started; the SSE stream ends with
    // the final view and the ROLLOUT_* events are in the outbox.
    let service_dir = tempfile::tempdir().expect("service dir");
    let mut config = ServeConfig::for_dir(service_dir.path().join("packages"));
    config.receiver.secret = Some(SECRET.into());
    let sender = SenderState::new(config).await.expect("sender state");
    let v2_stored = package(&docker, sender.store(), &guard, "v2", 80).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = format!("http://{}/api/v1", listener.local_addr().expect("addr"));
    let (stop_sender, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(deploy_sender::service::serve(
        listener,
        sender.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::new();
    // Refused before anything moves: a receiver named twice (one written with a trailing `/`),
    // a host deadline a day long or more.
    let first = fleet.targets[0].target().base_url.to_string();
    let refused = [
        json!({
            "receivers": [first.clone(), first.trim_end_matches('/'), fleet.targets[1].target().base_url.to_string()],
        }),
        json!({
            "receivers": [first.clone()],
            "host_timeout_secs": u64::MAX,
        }),
    ];
    for extra in refused {
        let mut body = json!({
            "package_id": v2_stored.package_id,
            "deployment": spec(&name),
        });
        for (key, value) in extra.as_object().expect("fields") {
            body[key] = value.clone();
        }
        let answer = http
            .post(format!("{api}/rollouts"))
            .json(&body)
            .send()
            .await
            .expect("POST /rollouts");
        let status = answer.status().as_u16();
        let text = answer.text().await.expect("an error body");
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains("VALIDATION_ERROR"), "{text}");
    }
    let started: Value = http
        .post(format!("{api}/rollouts"))
        .json(&json!({
            "package_id": v2_stored.package_id,
            "receivers": fleet.targets.iter().map(|t| t.target().base_url.to_string()).collect::<Vec<_>>(),
            "deployment": spec(&name),
            "canary": 1,
            "batch": "50%",
        }))
        .send()
        .await
        .expect("POST /rollouts")
        .json()
        .await
        .expect("a rollout view");
    let id = started["rollout_id"]
        .as_str()
        .expect("rollout id")
        .to_owned();
    let events = tokio::spawn({
        let url = format!("{api}/rollouts/{id}/events");
        async move {
            reqwest::get(url)
                .await
                .expect("GET events")
                .text()
                .await
                .expect("the event stream")
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let view: Value = http
            .get(format!("{api}/rollouts/{id}"))
            .send()
            .await
            .expect("GET rollout")
            .json()
            .await
            .expect("view");
        if view["report"]["steps_completed"] == json!(1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the canary never deployed: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = http
        .delete(format!("{api}/rollouts/{id}"))
        .send()
        .await
        .expect("DELETE rollout");
    assert_eq!(answer.status(), reqwest::StatusCode::ACCEPTED);
    let stream = tokio::time::timeout(Duration::from_secs(300), events)
        .await
        .expect("the event stream ends")
        .expect("events task");
    let last = stream
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .next_back()
        .expect("a data line");
    let last: Value = serde_json::from_str(last.trim()).expect("json");
    assert!(stream.contains("event: finished"), "{stream}");
    assert_eq!(last["report"]["status"], json!("ABORTED"), "{last}");
    assert_eq!(last["report"]["fleet"], json!("OLD_RELEASE"), "{last}");
    assert_eq!(last["report"]["hosts"][0]["outcome"], json!("ROLLED_BACK"));
    assert_eq!(last["report"]["hosts"][3]["outcome"], json!("NOT_REACHED"));
    let again = http
        .delete(format!("{api}/rollouts/{id}"))
        .send()
        .await
        .expect("DELETE again");
    assert_eq!(again.status(), reqwest::StatusCode::CONFLICT);
    let now = fleet.running(&name).await;
    assert_eq!(images(&now), [Some(v1.image_id.as_str()); 4], "{last}");
    assert_eq!(now[3], on_v1[3], "the fourth host was not touched");
    let outbox: Value = http
        .get(format!("{api}/events?limit=50"))
        .send()
        .await
        .expect("GET events")
        .json()
        .await
        .expect("event list");
    let types: Vec<&str> = outbox["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["event_type"].as_str())
        .filter(|t| t.starts_with("ROLLOUT_"))
        .collect();
    assert_eq!(
        types,
        [
            "ROLLOUT_ROLLED_BACK",
            "ROLLOUT_BATCH_COMPLETED",
            "ROLLOUT_STARTED"
        ],
        "newest first"
    );
    let _ = stop_sender.send(());

    // A receiver that goes away mid-rollout (the fourth, once the canary is healthy) is a failed
    // host, and the hosts moved by then are rolled back. The release is the one the REST rollout
    // moved (at least) the canary to: a host whose engine still holds it (the receiver keeps the
    // images of its last deployments) receives nothing of it, the others what they lack.
    let v2_stored_layers = layers(&docker, &cache, &v2_stored).await;
    let lacking = lacking_bytes(&v2_stored_layers, &v1_layers);
    let had = fleet.holds(&v2_stored.image_id).await;
    assert!(had[0], "the canary keeps the image it ran last");
    let victim = Mutex::new(fleet.receivers[3].take());
    let kill_after_canary = |event: RolloutEvent| {
        if let RolloutEvent::StepCompleted {
            phase: Phase::Canary,
            ..
        } = event
        {
            if let Some(mut receiver) = victim.lock().expect("victim").take() {
                receiver.kill();
            }
        }
    };
    let report = rollout(&fleet, &v2_stored_layers, with_port, &kill_after_canary).await;
    assert_eq!(
        outcomes(&report),
        [RolledBack, RolledBack, RolledBack, Failed],
        "{}",
        report.table()
    );
    assert_eq!(
        report.hosts[3].error.as_ref().map(|e| e.code),
        Some(ErrorCode::RemoteUnreachable)
    );
    for (h, had) in report.hosts[..3].iter().zip(&had) {
        assert_eq!(
            h.bytes,
            if *had { 0 } else { lacking },
            "held the image before: {had}\n{}",
            report.table()
        );
    }
    assert_eq!(report.fleet, FleetState::OldRelease);
    let now = fleet.running(&name).await;
    assert_eq!(
        images(&now),
        [Some(v1.image_id.as_str()); 4],
        "{}",
        report.table()
    );

    for receiver in fleet.receivers.iter_mut().filter_map(Option::take) {
        receiver.stop().await;
    }
    let hosts: HashMap<usize, TestHost> = fleet.hosts.drain(..).enumerate().collect();
    tokio::task::spawn_blocking(move || drop(hosts))
        .await
        .expect("hosts stopped");
    assert!(
        main_bridge_exists(),
        "the main engine's docker0 survives four extra engines"
    );
}
