//! Deployment against the real Docker engine: a real receiver on loopback, signed requests, images
//! built `FROM scratch` with the host's static busybox (no registry, no pulls), packages made by
//! `docker save`. Every test removes the containers and images it created, also when it fails.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, RenameContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use common::*;
use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::HealthCheckKind;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Tests

/// These tests deploy images built on the test host by naming them (`/deployment/deploy`), which
/// the receiver allows only with ALLOW_UNVERIFIED_IMAGES (tests/provenance.rs tests the refusal).
fn run_local_images(config: &mut deploy_receiver::Config) {
    config.allow_unverified_images = true;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_deploys_v1_replaces_it_with_v2_rolls_a_failing_v3_back_and_v4_prunes_the_history() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let (v1, v2, v3) = (
        format!("{name}:v1"),
        format!("{name}:v2"),
        format!("{name}:v3"),
    );
    build_image(&docker, &mut cleanup, &v1, ImageSpec::healthy("v1")).await;
    build_image(&docker, &mut cleanup, &v2, ImageSpec::healthy("v2")).await;
    build_image(&docker, &mut cleanup, &v3, ImageSpec::failing("v3")).await;
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let spec = web_spec(&name);

    // v1: a new container, healthy by the image's HEALTHCHECK.
    let (status, body) = receiver
        .full(&[&v1], save_image(&docker, &v1).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = record(&body);
    assert_eq!(first.status, DeploymentStatus::Succeeded);
    assert_eq!(
        first.image, v1,
        "the image defaults to the manifest's first tag"
    );
    let stages: Vec<_> = first
        .stages
        .iter()
        .map(|s| serde_json::to_value(s.stage).expect("stage"))
        .collect();
    assert_eq!(
        stages,
        [
            json!("upload"),
            json!("verify"),
            json!("load"),
            json!("start"),
            json!("health"),
            json!("cleanup")
        ]
    );
    assert_eq!(page(&docker, &name).await, "v1");
    let v1_container = inspect(&docker, &name).await;
    let labels = v1_container
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .expect("labels");
    assert_eq!(labels["io.deploy.managed"], "true");
    assert_eq!(
        labels["io.deploy.deployment_id"],
        first.deployment_id.to_string()
    );
    assert_eq!(
        labels.get("io.deploy.package_id").map(String::as_str),
        first.package_id.map(|p| p.to_string()).as_deref()
    );
    assert!(labels.contains_key("io.deploy.package_checksum"));

    // The running container is healthy for /deployment/health-check too.
    let (status, body) = receiver
        .post(
            "/deployment/health-check",
            &json!({"container_name": name, "health_check": {"deadline_secs": 30}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["healthy"].clone(), body["kind"].clone()),
        (json!(true), json!("docker"))
    );

    // v2 replaces v1: one container, serving v2; v1's image is kept for rollback.
    let (status, body) = receiver
        .full(&[&v2], save_image(&docker, &v2).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = record(&body);
    assert_eq!(second.previous_container_id, v1_container.id);
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    assert!(
        docker
            .inspect_container(v1_container.id.as_deref().expect("id"), None)
            .await
            .is_err(),
        "the v1 container is gone"
    );
    assert!(image_exists(&docker, &v1).await, "the v1 image is kept");
    let v2_id = inspect(&docker, &name).await.id;

    // v3 never becomes healthy: rolled back to v2.
    let (status, body) = receiver
        .full(&[&v3], save_image(&docker, &v3).await, &spec)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let third = record(&body);
    assert_eq!(third.status, DeploymentStatus::RolledBack, "{body}");
    let error = third.error.clone().expect("error");
    assert_eq!(
        serde_json::to_value(error.code).expect("code"),
        json!("HEALTH_CHECK_FAILED")
    );
    assert!(
        error.message.contains("exit code 1"),
        "the last health output is reported: {}",
        error.message
    );
    assert_eq!(inspect(&docker, &name).await.id, v2_id, "v2 runs again");
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1,
        "exactly one container"
    );

    // The journal answers, newest first, and survives a restart.
    let (status, body) = receiver.get("/deployments?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<_> = body["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["deployment_id"].clone())
        .collect();
    assert_eq!(
        ids,
        [json!(third.deployment_id), json!(second.deployment_id)]
    );
    receiver.stop().await;
    // Restarted with a shorter history: 2 versions per name, 1 other journal record.
    let receiver = start_receiver_with(dir.path(), |c| {
        c.image_history = 2;
        c.journal_history = 1;
    })
    .await;
    for expected in [&first, &second, &third] {
        let (status, body) = receiver
            .get(&format!("/deployments/{}", expected.deployment_id))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(&record(&body), expected);
    }

    // v4 succeeds, and the history is pruned: v4 and v2 are the 2 kept versions (images and
    // packages); v1 and the rolled-back v3 lose theirs; of the other records the newest (v3's)
    // stays and v1's is deleted.
    let v4 = format!("{name}:v4");
    build_image(&docker, &mut cleanup, &v4, ImageSpec::healthy("v4")).await;
    // Someone else's tag on v1's image (identical content gets the same id): it must survive.
    let other = format!("{name}-other:v1");
    docker
        .tag_image(
            &v1,
            Some(bollard::image::TagImageOptions {
                repo: format!("{name}-other"),
                tag: "v1".to_owned(),
            }),
        )
        .await
        .expect("tag");
    cleanup.remove_image(&other);
    let (status, body) = receiver
        .full(&[&v4], save_image(&docker, &v4).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fourth = record(&body);
    assert_eq!(page(&docker, &name).await, "v4");
    let cleanup_detail = fourth
        .stages
        .last()
        .and_then(|s| s.detail.clone())
        .unwrap_or_default();
    assert!(
        cleanup_detail.contains("deleted packages") && cleanup_detail.contains("journal"),
        "the cleanup stage says what it pruned: {cleanup_detail}"
    );
    for (tag, kept) in [(&v1, false), (&v2, true), (&v3, false), (&v4, true)] {
        assert_eq!(image_exists(&docker, tag).await, kept, "image {tag}");
    }
    assert!(
        image_exists(&docker, &other).await,
        "only the receiver's tag was taken off v1's image"
    );
    let store = receiver.state.store();
    for (deployment, kept) in [
        (&first, false),
        (&second, true),
        (&third, false),
        (&fourth, true),
    ] {
        let package = deployment.package_id.expect("package id");
        assert_eq!(
            store.get(package).expect("store").is_some(),
            kept,
            "package of {}",
            deployment.image
        );
        assert_eq!(store.package_path(package).exists(), kept);
    }
    for (deployment, kept) in [
        (&first, false),
        (&second, true),
        (&third, true),
        (&fourth, true),
    ] {
        let (status, _) = receiver
            .get(&format!("/deployments/{}", deployment.deployment_id))
            .await;
        let expected = if kept {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        assert_eq!(status, expected, "record of {}", deployment.image);
    }
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_runs_a_loaded_image_with_an_http_check_and_refuses_risky_specs_without_change() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let tag = format!("{name}:plain");
    build_image(
        &docker,
        &mut cleanup,
        &tag,
        ImageSpec {
            page: "plain",
            healthcheck: None,
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;

    let mut spec = web_spec(&name);
    spec.image = Some(tag.clone());
    spec.health_check.kind = HealthCheckKind::Http;
    spec.health_check.path = Some("/index.html".into());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deployed = record(&body);
    assert_eq!(deployed.status, DeploymentStatus::Succeeded);
    assert!(
        deployed.stages.iter().any(|s| s
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("http check"))),
        "{body}"
    );
    assert_eq!(page(&docker, &name).await, "plain");
    let running = inspect(&docker, &name).await.id;

    let (status, body) = receiver
        .post(
            "/deployment/health-check",
            &json!({"container_name": name, "health_check": {"kind": "http", "path": "/"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["kind"], json!("http"));

    // An http check on a port the spec does not publish could never pass: refused before
    // anything is touched, not found out after a start and a deadline.
    let mut unpublished = spec.clone();
    unpublished.health_check.port = Some(8080);
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": unpublished}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("VALIDATION_ERROR")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("8080/tcp is not published")),
        "{body}"
    );
    assert_eq!(
        inspect(&docker, &name).await.id,
        running,
        "nothing was touched"
    );

    let risky: [Risky; 3] = [
        ("privileged", |s| s.privileged = true),
        ("binds", |s| s.binds = vec!["/etc:/host-etc:ro".into()]),
        // (On host networking an http check names the port it probes.)
        ("host network", |s| {
            s.network_mode = Some("host".into());
            s.health_check.port = Some(80);
        }),
    ];
    for (what, change) in risky {
        let mut asks = spec.clone();
        change(&mut asks);
        let (status, body) = receiver
            .post("/deployment/deploy", &json!({"deployment": asks}))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
        assert_eq!(
            body["error"]["code"],
            json!("POLICY_DENIED"),
            "{what}: {body}"
        );
        let (status, body) = receiver
            .full(&[&tag], save_image(&docker, &tag).await, &asks)
            .await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (StatusCode::FORBIDDEN, json!("POLICY_DENIED")),
            "{what} via /full: {body}"
        );
    }
    assert_eq!(inspect(&docker, &name).await.id, running, "nothing changed");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    let (_, body) = receiver.get("/deployments").await;
    assert_eq!(
        body["deployments"].as_array().map(Vec::len),
        Some(1),
        "refusals are not deployments: {body}"
    );

    // Unknown container and unknown deployment: 404.
    let (status, body) = receiver
        .post(
            "/deployment/health-check",
            &json!({"container_name": format!("{name}-nope")}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("NOT_FOUND")),
        "{body}"
    );
    // The journal is signed like everything else, and every route is documented.
    let unsigned = http()
        .get(format!("{}/deployments", receiver.base))
        .send()
        .await
        .expect("GET");
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    let doc: Value = http()
        .get(format!("{}/openapi.json", receiver.base))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    for path in [
        "/deployment/deploy",
        "/deployment/health-check",
        "/deployment/full",
        "/deployments",
        "/deployments/{id}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} is in the OpenAPI document"
        );
    }
    let (status, body) = receiver
        .get(&format!("/deployments/{}", Uuid::new_v4()))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("NOT_FOUND")),
        "{body}"
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_check_passes_on_the_images_own_command_before_dockers_first_interval() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let tag = format!("{name}:slowcheck");
    // Docker's own first check would run 300 s after start (the later HEALTHCHECK replaces the
    // image's 1 s one): only the receiver's run of the image's command can make this deployment
    // healthy within its 30 s deadline.
    build_image_with(
        &docker,
        &mut cleanup,
        &tag,
        ImageSpec::healthy("slow"),
        &format!("HEALTHCHECK --interval=300s --timeout=2s CMD {HEALTHY}\n"),
    )
    .await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;

    let mut spec = web_spec(&name);
    spec.image = Some(tag.clone());
    spec.health_check.kind = HealthCheckKind::Docker;
    spec.health_check.deadline_secs = 30.0;
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deployed = record(&body);
    assert_eq!(deployed.status, DeploymentStatus::Succeeded);
    assert!(
        deployed.stages.iter().any(|s| s
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("run by the receiver"))),
        "{body}"
    );
    // Docker itself has not run the check yet.
    let health = inspect(&docker, &name)
        .await
        .state
        .and_then(|s| s.health)
        .and_then(|h| h.status);
    assert_eq!(health, Some(bollard::models::HealthStatusEnum::STARTING));
    assert_eq!(page(&docker, &name).await, "slow");
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_deploy_that_fails_is_failed_and_leaves_no_container() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let tag = format!("{name}:crash");
    build_image(
        &docker,
        &mut cleanup,
        &tag,
        ImageSpec {
            page: "x",
            healthcheck: None,
        },
    )
    .await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;

    let mut spec = web_spec(&name);
    spec.image = Some(tag.clone());
    spec.command = Some(vec!["/bin/busybox".into(), "false".into()]);
    spec.restart_policy = deploy_protocol::RestartPolicy::No;
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let failed = record(&body);
    assert_eq!(failed.status, DeploymentStatus::Failed);
    assert_eq!(body["error"]["code"], json!("HEALTH_CHECK_FAILED"));
    assert!(containers_named(&docker, std::slice::from_ref(&name))
        .await
        .is_empty());

    // A port Docker cannot bind is DEPLOY_FAILED with Docker's own message.
    let mut taken = web_spec(&name);
    taken.image = Some(tag.clone());
    taken.ports[0].host_ip = Some("203.0.113.1".into());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": taken}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::INTERNAL_SERVER_ERROR, json!("DEPLOY_FAILED")),
        "{body}"
    );
    assert!(containers_named(&docker, std::slice::from_ref(&name))
        .await
        .is_empty());
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rolls_back_a_deployment_cut_off_before_its_container_was_healthy() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let good = format!("{name}:good");
    let bad = format!("{name}:bad");
    build_image(&docker, &mut cleanup, &good, ImageSpec::healthy("good")).await;
    build_image(&docker, &mut cleanup, &bad, ImageSpec::failing("bad")).await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;
    let mut spec = web_spec(&name);
    spec.image = Some(good.clone());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    receiver.stop().await;

    let (deployment_id, old_id, _) = interrupt_deployment(&docker, dir.path(), &name, &bad).await;
    let receiver = start_receiver_with(dir.path(), run_local_images).await;
    let reconciled = settled(&receiver, deployment_id).await;
    assert_eq!(
        reconciled.status,
        DeploymentStatus::RolledBack,
        "{reconciled:?}"
    );
    assert_eq!(
        inspect(&docker, &name).await.id.as_deref(),
        Some(old_id.as_str())
    );
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        [old_id]
    );
    assert_eq!(page(&docker, &name).await, "good");
    assert!(receiver
        .state
        .journal()
        .get(deployment_id)
        .expect("journal")
        .is_some());
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_to_one_name_take_turns() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let (a, b) = (format!("{name}:a"), format!("{name}:b"));
    build_image(&docker, &mut cleanup, &a, ImageSpec::healthy("a")).await;
    build_image(&docker, &mut cleanup, &b, ImageSpec::healthy("b")).await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;
    let request = |image: &str| {
        let mut spec = web_spec(&name);
        spec.image = Some(image.to_owned());
        json!({ "deployment": spec })
    };
    let (to_a, to_b) = (request(&a), request(&b));
    let (first, second) = tokio::join!(
        receiver.post("/deployment/deploy", &to_a),
        receiver.post("/deployment/deploy", &to_b),
    );
    for (status, body) in [&first, &second] {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(record(body).status, DeploymentStatus::Succeeded);
    }
    let (first, second) = (record(&first.1), record(&second.1));
    let last = if first.previous_container_id == second.container_id {
        &first
    } else {
        &second
    };
    let containers = containers_named(&docker, std::slice::from_ref(&name)).await;
    assert_eq!(containers.len(), 1, "one container after two deployments");
    assert_eq!(
        Some(&containers[0]),
        last.container_id.as_ref(),
        "the later deployment runs"
    );
    let expected = if last.image == a { "a" } else { "b" };
    assert_eq!(page(&docker, &name).await, expected);
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_whose_client_hangs_up_still_ends_health_checked_under_its_correlation_id_also_when_the_receiver_stops(
) {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let (a, b) = (format!("{name}:a"), format!("{name}:b"));
    build_image(&docker, &mut cleanup, &a, ImageSpec::healthy("a")).await;
    build_image(&docker, &mut cleanup, &b, ImageSpec::healthy("b")).await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;
    let request = |image: &str, settle: f64| {
        let mut spec = web_spec(&name);
        spec.image = Some(image.to_owned());
        spec.health_check.kind = HealthCheckKind::None;
        spec.health_check.settle_secs = settle;
        json!({ "deployment": spec })
    };
    let (status, body) = receiver.post("/deployment/deploy", &request(&a, 0.2)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Asks for `image` (settling for 4 s) under `correlation_id`, and hangs up after 1.5 s, as a
    // sender that dies would: the request's future is dropped with the connection.
    let hang_up = |image: String, correlation_id: &'static str| {
        let body = serde_json::to_vec(&request(&image, 4.0)).expect("json");
        let sent = Signer::new("POST", "/deployment/deploy")
            .request(&http(), &receiver.url, &body)
            .header("content-type", "application/json")
            .header("x-correlation-id", correlation_id)
            .body(body)
            .send();
        async move {
            assert!(
                tokio::time::timeout(Duration::from_millis(1500), sent)
                    .await
                    .is_err(),
                "the deployment answered within its settle time"
            );
        }
    };

    // The deployment goes on to its verdict.
    hang_up(b.clone(), "client-hung-up").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let (status, list) = receiver.get("/deployments?limit=10").await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let newest = record(&list["deployments"][0]);
        if newest.status != DeploymentStatus::InProgress {
            break newest;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the deployment never ended: {newest:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ended.status, DeploymentStatus::Succeeded, "{ended:?}");
    assert_eq!(ended.image, b);
    assert_eq!(ended.correlation_id.as_deref(), Some("client-hung-up"));
    assert_eq!(page(&docker, &name).await, "b");
    // The journal answers by correlation id (how an interrupted rollout finds its deployments),
    // percent-encoded as `deploy-sender` sends it.
    let (status, list) = receiver
        .get("/deployments?correlation_id=client%2Dhung%2Dup")
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<_> = list["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["deployment_id"].clone())
        .collect();
    assert_eq!(ids, [json!(ended.deployment_id)], "{list}");
    let (_, list) = receiver
        .get("/deployments?correlation_id=client-hung-up%26not")
        .await;
    assert_eq!(list["deployments"], json!([]), "{list}");

    // Hung up again, and the receiver is stopped at once: the stop waits for the deployment
    // (within SHUTDOWN_GRACE_SECS), whose journal record on disk then says how it ended.
    hang_up(a.clone(), "hung-up-then-stopped").await;
    receiver.stop().await;
    let records: Vec<DeploymentRecord> = std::fs::read_dir(state_dir(dir.path()))
        .expect("the journal")
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect();
    let stopped = records
        .iter()
        .find(|r| r.correlation_id.as_deref() == Some("hung-up-then-stopped"))
        .unwrap_or_else(|| panic!("no record of the second deployment in {records:#?}"));
    assert_eq!(stopped.status, DeploymentStatus::Succeeded, "{stopped:?}");
    assert_eq!(page(&docker, &name).await, "a");
}

/// Leaves what a receiver killed mid-deploy leaves: the container named `name` stopped and set
/// aside, a new one from `image` started under the name, the journal saying IN_PROGRESS.
/// Returns the deployment id, the old and the new container id.
async fn interrupt_deployment(
    docker: &Docker,
    dir: &Path,
    name: &str,
    image: &str,
) -> (Uuid, String, String) {
    let old_id = inspect(docker, name).await.id.expect("id");
    docker
        .stop_container(&old_id, Some(StopContainerOptions { t: 1 }))
        .await
        .expect("stop");
    let aside = deploy_receiver::deploy::aside_name(name, &old_id);
    docker
        .rename_container(&old_id, RenameContainerOptions { name: aside })
        .await
        .expect("rename");
    let deployment_id = Uuid::new_v4();
    let config = ContainerConfig {
        image: Some(image.to_owned()),
        labels: Some(HashMap::from([
            ("io.deploy.managed".to_owned(), "true".to_owned()),
            (
                "io.deploy.deployment_id".to_owned(),
                deployment_id.to_string(),
            ),
        ])),
        exposed_ports: Some(HashMap::from([("80/tcp".to_owned(), HashMap::new())])),
        host_config: Some(bollard::models::HostConfig {
            port_bindings: Some(HashMap::from([(
                "80/tcp".to_owned(),
                Some(vec![bollard::models::PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                }]),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    let new_id = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.to_owned(),
                platform: None,
            }),
            config,
        )
        .await
        .expect("create")
        .id;
    docker
        .start_container::<String>(&new_id, None)
        .await
        .expect("start");
    let interrupted = json!({
        "deployment_id": deployment_id, "status": "IN_PROGRESS", "container_name": name,
        "image": image, "container_id": new_id, "previous_container_id": old_id,
        "started_at": "2025-01-01T00:00:00Z", "stages": []
    });
    std::fs::write(
        state_dir(dir).join(format!("{deployment_id}.json")),
        interrupted.to_string(),
    )
    .expect("journal");
    (deployment_id, old_id, new_id)
}

/// The record once start-up reconciliation has settled it.
async fn settled(receiver: &Receiver, id: Uuid) -> DeploymentRecord {
    for _ in 0..600 {
        let (status, body) = receiver.get(&format!("/deployments/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body["status"] != json!("IN_PROGRESS") {
            return record(&body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("deployment {id} was never reconciled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_finishes_a_deployment_whose_new_container_was_already_healthy() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let (v1, v2) = (format!("{name}:v1"), format!("{name}:v2"));
    build_image(&docker, &mut cleanup, &v1, ImageSpec::healthy("v1")).await;
    build_image(&docker, &mut cleanup, &v2, ImageSpec::healthy("v2")).await;
    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), run_local_images).await;
    let mut spec = web_spec(&name);
    spec.image = Some(v1.clone());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({"deployment": spec}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    receiver.stop().await;

    let (deployment_id, old_id, new_id) =
        interrupt_deployment(&docker, dir.path(), &name, &v2).await;
    let mut healthy = false;
    for _ in 0..300 {
        let health = inspect(&docker, &new_id)
            .await
            .state
            .and_then(|s| s.health)
            .and_then(|h| h.status);
        if health == Some(bollard::models::HealthStatusEnum::HEALTHY) {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(healthy, "the v2 container never became healthy");

    let receiver = start_receiver_with(dir.path(), run_local_images).await;
    let reconciled = settled(&receiver, deployment_id).await;
    assert_eq!(
        reconciled.status,
        DeploymentStatus::Succeeded,
        "{reconciled:?}"
    );
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name)).await,
        [new_id]
    );
    assert!(
        docker.inspect_container(&old_id, None).await.is_err(),
        "the v1 container is gone"
    );
    assert_eq!(page(&docker, &name).await, "v2");
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_reruns_the_previous_release_removes_a_first_one_and_answers_the_same_when_repeated(
) {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    // Starts with the guard's name, so the guard removes its container too.
    let first_only = format!("{name}-first");
    let (v1, v2) = (format!("{name}:v1"), format!("{name}:v2"));
    build_image(&docker, &mut cleanup, &v1, ImageSpec::healthy("v1")).await;
    build_image(&docker, &mut cleanup, &v2, ImageSpec::healthy("v2")).await;
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let spec = web_spec(&name);

    let (status, body) = receiver
        .full(&[&v1], save_image(&docker, &v1).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = record(&body);
    let (status, body) = receiver
        .full(&[&v2], save_image(&docker, &v2).await, &spec)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = record(&body);
    assert_eq!(page(&docker, &name).await, "v2");

    // Rolling back v2 runs v1 again (by image id, with its spec and health check).
    let path = format!("/deployments/{}/rollback", second.deployment_id);
    let (status, body) = receiver.post(&path, &json!(null)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], json!("RESTORED"), "{body}");
    assert_eq!(body["repeated"], json!(false));
    let rerun = record(&body["deployment"]);
    assert_eq!(rerun.rollback_of, Some(second.deployment_id));
    assert_eq!(rerun.status, DeploymentStatus::Succeeded);
    assert_eq!(rerun.image_id, first.image_id, "v1's image, by id");
    assert_eq!(page(&docker, &name).await, "v1");
    let restored = inspect(&docker, &name).await.id;
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1,
        "v2's container is gone"
    );

    // Asked again: the same answer, nothing touched.
    let (status, body) = receiver
        .send(reqwest::Method::POST, &path, Vec::new(), "", b"")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["outcome"].clone(), body["repeated"].clone()),
        (json!("RESTORED"), json!(true)),
        "{body}"
    );
    assert_eq!(
        record(&body["deployment"]).deployment_id,
        rerun.deployment_id
    );
    assert_eq!(inspect(&docker, &name).await.id, restored);

    // v1's own deployment no longer runs: refused, nothing touched.
    let (status, body) = receiver
        .post(
            &format!("/deployments/{}/rollback", first.deployment_id),
            &json!(null),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("CONFLICT")),
        "{body}"
    );
    assert_eq!(inspect(&docker, &name).await.id, restored);

    // The first deployment of a name: rolling it back removes its container.
    let (status, body) = receiver
        .full(
            &[&v1],
            save_image(&docker, &v1).await,
            &web_spec(&first_only),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let only = record(&body);
    let path = format!("/deployments/{}/rollback", only.deployment_id);
    for repeated in [false, true] {
        let (status, body) = receiver.post(&path, &json!(null)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            (body["outcome"].clone(), body["repeated"].clone()),
            (json!("REMOVED"), json!(repeated)),
            "{body}"
        );
        assert!(containers_named(&docker, std::slice::from_ref(&first_only))
            .await
            .is_empty());
    }

    // Deployed again after that: it set nothing aside, so rolling it back removes its container
    // again rather than running the deployment rolled back above.
    let (status, body) = receiver
        .full(
            &[&v2],
            save_image(&docker, &v2).await,
            &web_spec(&first_only),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again = record(&body);
    assert_eq!(again.previous_container_id, None, "{body}");
    let (status, body) = receiver
        .post(
            &format!("/deployments/{}/rollback", again.deployment_id),
            &json!(null),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], json!("REMOVED"), "{body}");
    assert!(containers_named(&docker, std::slice::from_ref(&first_only))
        .await
        .is_empty());

    let (status, body) = receiver
        .post(
            &format!("/deployments/{}/rollback", Uuid::new_v4()),
            &json!(null),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("NOT_FOUND")),
        "{body}"
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_while_a_deployment_waits_for_its_turn_is_a_conflict_not_another_image() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let side = format!("{name}-side");
    let (a, b, latest) = (
        format!("{name}:a"),
        format!("{name}:b"),
        format!("{name}:latest"),
    );
    build_image(&docker, &mut cleanup, &a, ImageSpec::healthy("a")).await;
    build_image(&docker, &mut cleanup, &b, ImageSpec::healthy("b")).await;
    cleanup.remove_image(&latest);
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    // Both images loaded here from verified packages (deployed to a side container).
    for tag in [&a, &b] {
        let (status, body) = receiver
            .full(&[tag], save_image(&docker, tag).await, &web_spec(&side))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let tag_latest = |source: String| {
        let docker = docker.clone();
        let name = name.clone();
        async move {
            docker
                .tag_image(
                    &source,
                    Some(bollard::image::TagImageOptions {
                        repo: name,
                        tag: "latest".to_owned(),
                    }),
                )
                .await
                .expect("docker tag");
        }
    };
    tag_latest(a.clone()).await;

    // A deployment of `a` holds the name's turn for its 4 s settle; one of `latest` (= a) asks
    // meanwhile and waits; then `latest` is moved to b, as a load of another package would.
    let mut slow = web_spec(&name);
    slow.image = Some(a.clone());
    slow.health_check.kind = HealthCheckKind::None;
    slow.health_check.settle_secs = 4.0;
    let mut waiting = web_spec(&name);
    waiting.image = Some(latest.clone());
    waiting.health_check.kind = HealthCheckKind::None;
    waiting.health_check.settle_secs = 0.2;
    let slow = json!({ "deployment": slow });
    let first = receiver.post("/deployment/deploy", &slow);
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        receiver
            .post("/deployment/deploy", &json!({ "deployment": waiting }))
            .await
    };
    let moved = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tag_latest(b.clone()).await;
    };
    let ((status, body), (refused, why), ()) = tokio::join!(first, second, moved);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (refused, why["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("CONFLICT")),
        "the image it checked is not what the tag names any more: {why}"
    );
    assert!(
        why["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("was moved")),
        "{why}"
    );
    assert_eq!(page(&docker, &name).await, "a", "nothing replaced a");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    receiver.stop().await;
}
