//! What the receiver may touch on its Docker host, against the real engine: only the bytes it
//! verified are loaded, only images it loaded from verified packages are run, re-tagged or pruned,
//! and only containers it created are replaced (unless a signed spec adopts one). Images are built
//! `FROM scratch` with the host's static busybox and removed by the cleanup guards.

mod common;

use bollard::container::{Config as ContainerConfig, CreateContainerOptions};
use bollard::Docker;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn image_id(docker: &Docker, reference: &str) -> Option<String> {
    docker
        .inspect_image(reference)
        .await
        .ok()
        .and_then(|i| i.id)
}

/// Uploads `package` with `tags` in its manifest; returns its id.
async fn upload_tagged(receiver: &Receiver, tags: &[&str], package: Vec<u8>) -> String {
    let mut manifest = manifest_for(&package);
    manifest.image_tags = tags.iter().map(|t| (*t).to_owned()).collect();
    let (status, body) = receiver
        .multipart("/deployment/upload", &manifest.to_bytes(), package)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    manifest.package_id.to_string()
}

fn code(body: &Value) -> &str {
    body["code"]
        .as_str()
        .or_else(|| body["error"]["code"].as_str())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_changed_on_disk_after_verification_is_not_loaded() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let tag = format!("{name}:v1");
    build_image(&docker, &mut cleanup, &tag, ImageSpec::healthy("verified")).await;
    let verified = save_image(&docker, &tag).await;
    let first_id = image_id(&docker, &tag).await.expect("built");
    cleanup.remove_image(&first_id);
    build_image(&docker, &mut cleanup, &tag, ImageSpec::healthy("swapped")).await;
    let swapped = save_image(&docker, &tag).await;
    let swapped_id = image_id(&docker, &tag).await.expect("built");
    cleanup.remove_image(&swapped_id);
    let _ = docker.remove_image(&tag, None, None).await;

    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let id = upload_tagged(&receiver, &[&tag], verified).await;
    // After the 200, the stored file is replaced by another valid archive of the same tag.
    let stored = receiver
        .state
        .store()
        .package_path(id.parse().expect("uuid"));
    std::fs::write(&stored, &swapped).expect("swap the stored package");
    let (status, body) = receiver
        .post("/deployment/load", &json!({ "package_id": id }))
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "LOAD_FAILED"),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("changed after it was verified")),
        "{body}"
    );
    assert_ne!(
        image_id(&docker, &tag).await.as_deref(),
        Some(swapped_id.as_str()),
        "the swapped image was tagged"
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_the_host_had_is_never_run_retagged_or_pruned() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let host = format!("{name}-host:v1");
    // An image whose archive is tagged like the host's, made first...
    build_image(&docker, &mut cleanup, &host, ImageSpec::healthy("evil")).await;
    let evil = save_image(&docker, &host).await;
    cleanup.remove_image(&image_id(&docker, &host).await.expect("built"));
    // ...then the host's own image under that tag.
    build_image(&docker, &mut cleanup, &host, ImageSpec::healthy("host")).await;
    let host_id = image_id(&docker, &host).await.expect("built");
    cleanup.remove_image(&host_id);

    let dir = temp_dir();
    let receiver = start_receiver_with(dir.path(), |c| c.image_history = 1).await;
    // Run by naming it, with a package id the receiver never verified.
    let mut spec = web_spec(&name);
    spec.image = Some(host.clone());
    let (status, body) = receiver
        .post(
            "/deployment/deploy",
            &json!({ "deployment": spec, "package_id": uuid::Uuid::new_v4() }),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "POLICY_DENIED"),
        "{body}"
    );
    assert!(containers_named(&docker, std::slice::from_ref(&name))
        .await
        .is_empty());

    // A package that declares the host's tag: loaded, the tag put back, refused.
    let id = upload_tagged(&receiver, &[&host], evil).await;
    let (status, body) = receiver
        .post("/deployment/load", &json!({ "package_id": id }))
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "POLICY_DENIED"),
        "{body}"
    );
    assert_eq!(
        image_id(&docker, &host).await,
        Some(host_id.clone()),
        "the tag moved"
    );

    // Two real deployments of the name, history 1: cleanup prunes, the host image stays.
    for version in ["v1", "v2"] {
        let tag = format!("{name}:{version}");
        build_image(&docker, &mut cleanup, &tag, ImageSpec::healthy(version)).await;
        let package = save_image(&docker, &tag).await;
        let (status, body) = receiver.full(&[&tag], package, &web_spec(&name)).await;
        assert_eq!(status, StatusCode::OK, "{version}: {body}");
    }
    assert_eq!(
        image_id(&docker, &host).await,
        Some(host_id),
        "the host image was pruned"
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_an_image_never_verified_is_refused_and_changes_nothing() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let host = format!("{name}-host:v1");
    build_image(&docker, &mut cleanup, &host, ImageSpec::healthy("host")).await;
    let v2 = format!("{name}:v2");
    build_image(&docker, &mut cleanup, &v2, ImageSpec::healthy("v2")).await;
    let dir = temp_dir();

    // The host's own image, run by naming it while ALLOW_UNVERIFIED_IMAGES was on...
    let receiver = start_receiver_with(dir.path(), |c| c.allow_unverified_images = true).await;
    let mut spec = web_spec(&name);
    spec.image = Some(host.clone());
    let (status, body) = receiver
        .post("/deployment/deploy", &json!({ "deployment": spec }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    receiver.stop().await;

    // ...then, the setting off, a verified package replaces it.
    let receiver = start_receiver(dir.path()).await;
    let (status, body) = receiver
        .full(&[&v2], save_image(&docker, &v2).await, &web_spec(&name))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = record(&body);
    let running = inspect(&docker, &name).await.id;
    assert_eq!(page(&docker, &name).await, "v2");

    // Rolling v2 back would run the unverified image again: refused, v2's container untouched.
    let (status, body) = receiver
        .post(
            &format!("/deployments/{}/rollback", second.deployment_id),
            &json!(null),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "POLICY_DENIED"),
        "{body}"
    );
    assert_eq!(inspect(&docker, &name).await.id, running);
    assert_eq!(page(&docker, &name).await, "v2");
    assert_eq!(
        containers_named(&docker, std::slice::from_ref(&name))
            .await
            .len(),
        1
    );
    receiver.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_the_receiver_did_not_create_is_left_alone_unless_adopted() {
    let docker = docker().await;
    let mut cleanup = guard();
    let name = cleanup.name.clone();
    let tag = format!("{name}:v1");
    build_image(&docker, &mut cleanup, &tag, ImageSpec::healthy("v1")).await;
    // A container someone made by hand under the name, from the same image.
    let theirs = docker
        .create_container(
            Some(CreateContainerOptions {
                name: name.clone(),
                platform: None,
            }),
            ContainerConfig {
                image: Some(tag.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("create")
        .id;
    docker
        .start_container::<String>(&theirs, None)
        .await
        .expect("start");
    let dir = temp_dir();
    let receiver = start_receiver(dir.path()).await;
    let package = save_image(&docker, &tag).await;
    let (status, body) = receiver
        .full(&[&tag], package.clone(), &web_spec(&name))
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "CONFLICT"),
        "{body}"
    );
    assert!(
        body.to_string().contains(&name),
        "the refusal names it: {body}"
    );
    let still = inspect(&docker, &theirs).await;
    assert_eq!(
        still.state.and_then(|s| s.running),
        Some(true),
        "it was stopped"
    );

    let mut adopt = web_spec(&name);
    adopt.adopt_existing = true;
    let (status, body) = receiver.full(&[&tag], package, &adopt).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        docker.inspect_container(&theirs, None).await.is_err(),
        "adopted and replaced"
    );
    receiver.stop().await;
}
