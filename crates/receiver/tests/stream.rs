//! `POST /deployment/stream` against the real Docker engine: a `docker save` archive of a
//! FROM-scratch busybox image built here, compressed, sent as the package part of a signed
//! three-part request (`manifest`, `package`, `seal`) whose package part is a stream. The image is
//! removed from the engine before it is sent, so "Docker kept nothing" is checked on the engine:
//! a stream whose seal does not check out must leave no image behind.

mod common;

use bytes::Bytes;
use common::v2::compress;
use common::{build_image, docker, guard, image_exists, save_image, web_spec, ImageSpec};
use deploy_protocol::stream::{Seal, StreamManifest};
use deploy_protocol::{Checksum, Compression};
use deploy_testkit::receiver::{spawn_receiver, Receiver};
use deploy_testkit::signing::{Signer, SECRET};
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use uuid::Uuid;

/// How the test bends the request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bend {
    /// A correct request.
    None,
    /// The seal signed with another key.
    ForeignSeal,
    /// The seal signed correctly, for a package one byte longer than the one sent.
    WrongSize,
    /// No seal part.
    NoSeal,
}

/// An image built, saved and removed again: its compressed archive, tag and id.
struct Saved {
    package: Vec<u8>,
    tag: String,
    id: String,
    /// Removes the image and the containers named after it when the test ends.
    guard: deploy_testkit::docker::Guard,
}

async fn saved_image(page: &str) -> Saved {
    let docker = docker().await;
    let mut guard = guard();
    let tag = guard.image(page);
    build_image(&docker, &mut guard, &tag, ImageSpec::healthy(page)).await;
    let id = docker
        .inspect_image(&tag)
        .await
        .expect("the built image")
        .id
        .expect("an id");
    let archive = save_image(&docker, &tag).await;
    docker
        .remove_image(
            &tag,
            Some(bollard::image::RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await
        .expect("remove the image again");
    assert!(!image_exists(&docker, &tag).await);
    Saved {
        package: compress(&archive, Compression::Zstd).await,
        tag,
        id,
        guard,
    }
}

/// Sends `saved` as a stream (in 64 KiB chunks), bent as `bend` says; the status and body.
async fn stream(r: &Receiver, saved: &Saved, name: &str, bend: Bend) -> (u16, Value) {
    let mut spec = web_spec(name);
    spec.health_check.kind = deploy_protocol::HealthCheckKind::None;
    let manifest = StreamManifest {
        package_id: Uuid::new_v4(),
        compression: Compression::Zstd,
        image_id: saved.id.clone(),
        image_tags: vec![saved.tag.clone()],
        container_name: Some(name.to_owned()),
        created_at: None,
        deployment: spec,
    };
    let manifest_bytes = manifest.to_bytes();
    let signer = Signer::post("/deployment/stream");
    let key: &[u8] = match bend {
        Bend::ForeignSeal => b"not-the-receivers-key-0123456789abcdef",
        _ => SECRET.as_bytes(),
    };
    let size = saved.package.len() as u64 + u64::from(bend == Bend::WrongSize);
    let seal = Seal::sign(
        key,
        &signer.nonce,
        &Checksum::of(&manifest_bytes),
        Checksum::of(&saved.package),
        size,
    );
    let chunks: Vec<Result<Bytes, std::io::Error>> = saved
        .package
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut form = Form::new()
        .part(
            "manifest",
            Part::bytes(manifest_bytes.clone())
                .mime_str("application/json")
                .expect("mime"),
        )
        .part(
            "package",
            Part::stream(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
                .mime_str("application/octet-stream")
                .expect("mime"),
        );
    if bend != Bend::NoSeal {
        form = form.part(
            "seal",
            Part::bytes(seal.to_bytes())
                .mime_str("application/json")
                .expect("mime"),
        );
    }
    let response = signer
        .request(&reqwest::Client::new(), &r.url, &manifest_bytes)
        .multipart(form)
        .send()
        .await
        .expect("the receiver answers");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("a JSON answer");
    (status, body)
}

/// The error code of an error body or of a record's `error`.
fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_streamed_package_is_loaded_and_its_container_run() {
    let saved = saved_image("streamed").await;
    let r = spawn_receiver(|_| {}).await;
    let name = format!("{}-run", saved.guard.name);
    let (status, body) = stream(&r, &saved, &name, Bend::None).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["status"], "SUCCEEDED", "{body:#}");
    assert_eq!(body["image_id"], saved.id.as_str(), "{body:#}");
    let docker = docker().await;
    assert!(image_exists(&docker, &saved.tag).await);
    let running = docker
        .inspect_container(&name, None)
        .await
        .expect("the container runs");
    assert_eq!(running.image.as_deref(), Some(saved.id.as_str()));
}

#[tokio::test]
async fn a_seal_signed_with_another_key_is_unauthorized_and_docker_keeps_nothing() {
    let saved = saved_image("foreign-seal").await;
    let r = spawn_receiver(|_| {}).await;
    let name = format!("{}-run", saved.guard.name);
    let (status, body) = stream(&r, &saved, &name, Bend::ForeignSeal).await;
    assert_eq!(status, 401, "{body:#}");
    assert_eq!(code(&body), "UNAUTHORIZED", "{body:#}");
    let docker = docker().await;
    assert!(
        !image_exists(&docker, &saved.tag).await && !image_exists(&docker, &saved.id).await,
        "Docker kept the image of a stream whose seal did not verify"
    );
    assert!(docker.inspect_container(&name, None).await.is_err());
}

#[tokio::test]
async fn a_stream_that_differs_from_its_seal_is_a_checksum_mismatch_and_docker_keeps_nothing() {
    let saved = saved_image("wrong-size").await;
    let r = spawn_receiver(|_| {}).await;
    let name = format!("{}-run", saved.guard.name);
    let (status, body) = stream(&r, &saved, &name, Bend::WrongSize).await;
    assert_eq!(status, 422, "{body:#}");
    assert_eq!(code(&body), "CHECKSUM_MISMATCH", "{body:#}");
    let docker = docker().await;
    assert!(!image_exists(&docker, &saved.id).await);
}

#[tokio::test]
async fn a_stream_without_its_seal_is_refused_and_docker_keeps_nothing() {
    let saved = saved_image("no-seal").await;
    let r = spawn_receiver(|_| {}).await;
    let name = format!("{}-run", saved.guard.name);
    let (status, body) = stream(&r, &saved, &name, Bend::NoSeal).await;
    assert_eq!(status, 400, "{body:#}");
    assert_eq!(code(&body), "VALIDATION_ERROR", "{body:#}");
    let docker = docker().await;
    assert!(!image_exists(&docker, &saved.id).await);
    // The receiver goes on serving: the same image, sealed, is loaded afterwards.
    let (status, body) = stream(&r, &saved, &name, Bend::None).await;
    assert_eq!(status, 200, "{body:#}");
}
