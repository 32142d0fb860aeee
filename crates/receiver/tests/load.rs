//! `POST /deployment/load` against the real Docker engine: packages are `docker save` archives
//! of FROM-scratch busybox images built here (never pulled), uploaded over signed HTTP and loaded.
//! Hostile archives must be refused with LOAD_FAILED and leave the engine exactly as it was.
//!
//! Every image a test builds carries its guard's label; the guard removes them all when the test
//! ends, passed or failed.

use std::time::{Duration, Instant};

use bollard::image::RemoveImageOptions;
use bollard::Docker;
use deploy_protocol::api::LoadRequest;
use deploy_protocol::{Checksum, Compression, PackageManifest};
use deploy_testkit::docker::{docker, Guard};
use deploy_testkit::images::build_image;
use deploy_testkit::receiver::{spawn_receiver as spawn, Receiver};
use deploy_testkit::signing::Signer;
use futures::StreamExt;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Set in the child process that runs with an unreachable DOCKER_HOST.
const CHILD_ENV: &str = "DEPLOY_LOAD_TEST_NO_DOCKER_CHILD";

// ---------------------------------------------------------------- receiver and HTTP

async fn spawn_receiver(max_image_size: Option<u64>) -> Receiver {
    spawn(|config| {
        if let Some(max) = max_image_size {
            config.max_image_size = max;
        }
    })
    .await
}

fn signed(r: &Receiver, path: &str, content: &[u8]) -> reqwest::RequestBuilder {
    Signer::post(path).request(&reqwest::Client::new(), &r.url, content)
}

/// Uploads `package` through the signed multipart endpoint; returns its id.
async fn upload(r: &Receiver, package: &[u8], compression: Compression, tags: &[&str]) -> Uuid {
    let manifest = PackageManifest {
        package_id: Uuid::new_v4(),
        package_checksum: Checksum::of(package),
        package_size: package.len() as u64,
        compression,
        image_id: None,
        image_tags: tags.iter().map(|t| t.to_string()).collect(),
        container_name: None,
        created_at: None,
        original_size: None,
        deployment: None,
    };
    let bytes = manifest.to_bytes();
    let form = Form::new()
        .part(
            "manifest",
            Part::bytes(bytes.clone())
                .mime_str("application/json")
                .expect("mime"),
        )
        .part(
            "package",
            Part::bytes(package.to_vec())
                .file_name("package")
                .mime_str("application/octet-stream")
                .expect("mime"),
        );
    let response = signed(r, "/deployment/upload", &bytes)
        .multipart(form)
        .send()
        .await
        .expect("upload request");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, StatusCode::OK, "upload failed: {body}");
    manifest.package_id
}

async fn load(r: &Receiver, package_id: Uuid) -> (StatusCode, Value) {
    let body = serde_json::to_vec(&LoadRequest { package_id }).expect("json");
    let response = signed(r, "/deployment/load", &body)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("load request");
    let status = response.status();
    let json = response.json().await.expect("json body");
    (status, json)
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

fn error_message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("<none>")
}

// ---------------------------------------------------------------- Docker helpers

/// One test's images on the engine, removed by its guard however the test ends.
struct Run {
    guard: Guard,
    docker: Docker,
}

impl Run {
    async fn new() -> Self {
        Self {
            guard: Guard::new("refold-load"),
            docker: docker().await,
        }
    }

    /// A unique image reference of this run.
    fn tag(&self, name: &str) -> String {
        self.guard.image(name)
    }

    /// Images built by this run (ids).
    async fn images(&self) -> Vec<String> {
        self.guard.labelled_images(&self.docker).await
    }

    /// Builds a FROM-scratch busybox image tagged `tag`; returns its id.
    async fn build(&self, tag: &str) -> String {
        // One layer holding busybox and this image's own id: no other image (of this or a
        // parallel test) shares it, so `docker load` must read it from the archive rather than
        // skip it as a layer the engine already has.
        let dockerfile = format!(
            "FROM scratch\nCOPY busybox deploy-test-image /bin/\nLABEL name={tag}\nCMD [\"/bin/busybox\", \"true\"]\n"
        );
        build_image(
            &self.docker,
            &self.guard,
            tag,
            &dockerfile,
            &[("deploy-test-image", tag.as_bytes())],
        )
        .await;
        self.image_id(tag).await.expect("built image")
    }

    async fn image_id(&self, reference: &str) -> Option<String> {
        self.docker
            .inspect_image(reference)
            .await
            .ok()
            .and_then(|i| i.id)
    }

    /// `docker save` of one image.
    async fn save(&self, reference: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stream = self.docker.export_image(reference);
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.expect("export"));
        }
        out
    }

    async fn remove(&self, reference: &str) {
        let _ = self
            .docker
            .remove_image(
                reference,
                Some(RemoveImageOptions {
                    force: true,
                    noprune: false,
                }),
                None,
            )
            .await;
    }

    /// Builds an image, saves it and removes it again: the archive and the image id.
    async fn saved_image(&self, name: &str) -> (String, String, Vec<u8>) {
        let tag = self.tag(name);
        let id = self.build(&tag).await;
        let archive = self.save(&tag).await;
        self.remove(&tag).await;
        assert_eq!(self.image_id(&id).await, None, "image {id} still present");
        (tag, id, archive)
    }
}

// ---------------------------------------------------------------- archives

async fn compress(data: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::Zstd => {
            let mut e = async_compression::tokio::write::ZstdEncoder::new(Vec::new());
            e.write_all(data).await.expect("zstd");
            e.shutdown().await.expect("zstd");
            e.into_inner()
        }
        Compression::Gzip => {
            let mut e = async_compression::tokio::write::GzipEncoder::new(Vec::new());
            e.write_all(data).await.expect("gzip");
            e.shutdown().await.expect("gzip");
            e.into_inner()
        }
        Compression::None => data.to_vec(),
    }
}

/// Raw entries of a tar archive (headers as they are, extension headers included).
struct Entries(Vec<(tar::Header, Vec<u8>)>);

impl Entries {
    fn read(archive: &[u8]) -> Self {
        let mut tar = tar::Archive::new(archive);
        let mut out = Vec::new();
        for entry in tar.entries().expect("entries").raw(true) {
            let mut entry = entry.expect("entry");
            let header = entry.header().clone();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("data");
            out.push((header, data));
        }
        Self(out)
    }

    fn position(&self, name: &str) -> usize {
        self.0
            .iter()
            .position(|(h, _)| h.path_bytes().as_ref() == name.as_bytes())
            .unwrap_or_else(|| panic!("no entry {name}"))
    }

    fn layer_path(&self) -> String {
        self.0
            .iter()
            .map(|(h, _)| String::from_utf8_lossy(&h.path_bytes()).into_owned())
            .find(|p| p.ends_with("/layer.tar"))
            .expect("a layer")
    }

    /// Inserts an entry with a raw name (no validation) before `before`.
    fn insert_before(
        &mut self,
        before: &str,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
    ) {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        let at = self.position(before);
        self.0.insert(at, (header, data.to_vec()));
    }

    /// Moves an entry to the front, so Docker has it before the rest arrives.
    fn move_to_front(&mut self, name: &str) {
        let at = self.position(name);
        let entry = self.0.remove(at);
        self.0.insert(0, entry);
    }

    /// Appends an entry with a raw name.
    fn push(&mut self, name: &[u8], kind: tar::EntryType, data: &[u8]) {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        self.0.push((header, data.to_vec()));
    }

    fn edit_manifest(&mut self, edit: impl FnOnce(&mut Value)) {
        let at = self.position("manifest.json");
        let (header, data) = &mut self.0[at];
        let mut manifest: Value = serde_json::from_slice(data).expect("manifest.json");
        edit(&mut manifest);
        *data = serde_json::to_vec(&manifest).expect("json");
        header.set_size(data.len() as u64);
        header.set_cksum();
    }

    fn write(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (header, data) in &self.0 {
            builder.append(header, data.as_slice()).expect("append");
        }
        builder.into_inner().expect("finish")
    }
}

/// Uploads a hostile archive and asserts it is refused with LOAD_FAILED naming `why`, and that
/// nothing of this run appeared in Docker.
async fn assert_refused(run: &Run, r: &Receiver, archive: &[u8], tags: &[&str], why: &str) {
    let before = run.images().await;
    let id = upload(
        r,
        &compress(archive, Compression::Zstd).await,
        Compression::Zstd,
        tags,
    )
    .await;
    let (status, body) = load(r, id).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "LOAD_FAILED", "{body}");
    assert!(
        error_message(&body).contains(why),
        "message should say {why:?}: {body}"
    );
    assert_eq!(
        run.images().await,
        before,
        "the refused load changed the images"
    );
    for tag in tags {
        assert_eq!(run.image_id(tag).await, None, "{tag} appeared");
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn valid_package_loads_with_each_compression_and_reports_image_id_and_tag() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, image_id, archive) = run.saved_image("web").await;
    for compression in [Compression::Zstd, Compression::Gzip, Compression::None] {
        let package = compress(&archive, compression).await;
        let id = upload(&r, &package, compression, &[&tag]).await;
        let (status, body) = load(&r, id).await;
        assert_eq!(status, StatusCode::OK, "{compression}: {body}");
        assert_eq!(body["image_id"], image_id, "{compression}: {body}");
        assert_eq!(body["image_tags"], serde_json::json!([tag]), "{body}");
        assert_eq!(body["package_id"], id.to_string());
        assert_eq!(run.image_id(&tag).await.as_deref(), Some(image_id.as_str()));
        run.remove(&tag).await;
    }
}

#[tokio::test]
async fn archive_tag_outside_image_tags_is_refused_and_the_existing_tag_keeps_its_image() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let existing_tag = run.tag("existing");
    let existing_id = run.build(&existing_tag).await;
    let (tag, new_id, archive) = run.saved_image("intruder").await;
    let mut entries = Entries::read(&archive);
    entries.edit_manifest(|m| m[0]["RepoTags"] = serde_json::json!([existing_tag]));
    let archive = entries.write();
    let id = upload(
        &r,
        &compress(&archive, Compression::Zstd).await,
        Compression::Zstd,
        &[&tag],
    )
    .await;
    let (status, body) = load(&r, id).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(error_code(&body), "LOAD_FAILED");
    assert!(error_message(&body).contains(&existing_tag), "{body}");
    assert!(error_message(&body).contains("image_tags"), "{body}");
    assert_eq!(
        run.image_id(&existing_tag).await.as_deref(),
        Some(existing_id.as_str()),
        "the existing tag was moved"
    );
    assert_eq!(
        run.image_id(&new_id).await,
        None,
        "the refused image was loaded"
    );
}

#[tokio::test]
async fn dot_dot_entry_is_refused_and_nothing_is_loaded() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, _, archive) = run.saved_image("traversal").await;
    let mut entries = Entries::read(&archive);
    entries.insert_before(
        "manifest.json",
        b"../evil",
        tar::EntryType::Regular,
        b"",
        b"pwned\n",
    );
    assert_refused(&run, &r, &entries.write(), &[&tag], "`..`").await;
}

#[tokio::test]
async fn absolute_entry_is_refused() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, _, archive) = run.saved_image("absolute").await;
    let mut entries = Entries::read(&archive);
    entries.insert_before(
        "manifest.json",
        b"/tmp/evil",
        tar::EntryType::Regular,
        b"",
        b"x",
    );
    assert_refused(&run, &r, &entries.write(), &[&tag], "absolute path").await;
}

#[tokio::test]
async fn symlink_escaping_the_archive_is_refused() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, _, archive) = run.saved_image("symlink").await;
    let layer = Entries::read(&archive).layer_path();
    let dir = layer.trim_end_matches("/layer.tar");
    let mut entries = Entries::read(&archive);
    let name = format!("{dir}/escape");
    entries.insert_before(
        "manifest.json",
        name.as_bytes(),
        tar::EntryType::Symlink,
        b"../../etc/passwd",
        b"",
    );
    assert_refused(
        &run,
        &r,
        &entries.write(),
        &[&tag],
        "leads outside the archive",
    )
    .await;
}

#[tokio::test]
async fn device_entry_right_after_a_layer_is_refused() {
    // The refusal comes while Docker is inside the layer's data (the gate holds only the tail),
    // so this proves the mid-entry cut too.
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, _, archive) = run.saved_image("fifo").await;
    let mut entries = Entries::read(&archive);
    let layer = entries.layer_path();
    let after_layer = entries.0[entries.position(&layer) + 1]
        .0
        .path_bytes()
        .into_owned();
    let after_layer = String::from_utf8(after_layer).expect("utf-8");
    entries.insert_before(&after_layer, b"pipe", tar::EntryType::Fifo, b"", b"");
    assert_refused(&run, &r, &entries.write(), &[&tag], "FIFO").await;
}

#[tokio::test]
async fn manifest_naming_a_missing_layer_is_refused() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, _, archive) = run.saved_image("missing").await;
    let mut entries = Entries::read(&archive);
    entries.edit_manifest(|m| {
        m[0]["Layers"]
            .as_array_mut()
            .expect("layers")
            .push(Value::from(
                "0000000000000000000000000000000000000000000000000000000000000000/layer.tar",
            ));
    });
    assert_refused(
        &run,
        &r,
        &entries.write(),
        &[&tag],
        "which is not in the archive",
    )
    .await;
}

#[tokio::test]
async fn refusal_after_docker_has_the_manifest_cut_at_a_header_loads_nothing() {
    // manifest.json first (valid tags), then the layers, then empty entries (header blocks
    // only, more than one read chunk of them) and a FIFO last: Docker holds everything it needs
    // when the refusal comes, and the cut falls on a header boundary, where merely ending the
    // stream would look like a complete archive to Docker.
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, image_id, archive) = run.saved_image("late-header").await;
    let mut entries = Entries::read(&archive);
    entries.move_to_front("manifest.json");
    for i in 0..1200 {
        entries.push(format!("pad-{i}").as_bytes(), tar::EntryType::Regular, b"");
    }
    entries.push(b"late-pipe", tar::EntryType::Fifo, b"");
    assert_refused(&run, &r, &entries.write(), &[&tag], "FIFO").await;
    assert_eq!(run.image_id(&image_id).await, None);
}

#[tokio::test]
async fn refusal_after_docker_has_the_manifest_cut_inside_a_layer_loads_nothing() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, image_id, archive) = run.saved_image("late-data").await;
    let mut entries = Entries::read(&archive);
    entries.move_to_front("manifest.json");
    let layer = entries.layer_path();
    let after_layer = entries.0[entries.position(&layer) + 1]
        .0
        .path_bytes()
        .into_owned();
    let after_layer = String::from_utf8(after_layer).expect("utf-8");
    entries.insert_before(&after_layer, b"pipe", tar::EntryType::Fifo, b"", b"");
    assert_refused(&run, &r, &entries.write(), &[&tag], "FIFO").await;
    assert_eq!(run.image_id(&image_id).await, None);
}

/// A tar holding one entry that claims 1 GiB of zeros, compressed: small on the wire.
async fn bomb(compression: Compression) -> Vec<u8> {
    let size: u64 = 1 << 30;
    let mut header = tar::Header::new_ustar();
    header.set_path("blob").expect("path");
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    let zeros = vec![0u8; 1 << 20];
    match compression {
        Compression::Zstd => {
            let mut e = async_compression::tokio::write::ZstdEncoder::with_quality(
                Vec::new(),
                async_compression::Level::Fastest,
            );
            e.write_all(header.as_bytes()).await.expect("write");
            for _ in 0..(size >> 20) {
                e.write_all(&zeros).await.expect("write");
            }
            e.shutdown().await.expect("shutdown");
            e.into_inner()
        }
        _ => {
            let mut e = async_compression::tokio::write::GzipEncoder::with_quality(
                Vec::new(),
                async_compression::Level::Fastest,
            );
            e.write_all(header.as_bytes()).await.expect("write");
            for _ in 0..(size >> 20) {
                e.write_all(&zeros).await.expect("write");
            }
            e.shutdown().await.expect("shutdown");
            e.into_inner()
        }
    }
}

#[tokio::test]
async fn decompression_bomb_is_refused_quickly() {
    let run = Run::new().await;
    let r = spawn_receiver(Some(32 << 20)).await;
    let tag = run.tag("bomb");
    for compression in [Compression::Zstd, Compression::Gzip] {
        let package = bomb(compression).await;
        assert!(
            package.len() < 8 << 20,
            "{compression} bomb is {} bytes",
            package.len()
        );
        let id = upload(&r, &package, compression, &[&tag]).await;
        let started = Instant::now();
        let (status, body) = load(&r, id).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error_code(&body), "LOAD_FAILED");
        assert!(error_message(&body).contains("MAX_IMAGE_SIZE"), "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{compression} bomb took {:?}",
            started.elapsed()
        );
    }
    assert!(run.images().await.is_empty());
}

#[tokio::test]
async fn corrupt_packages_fail_to_load_and_leave_no_images() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (tag, image_id, archive) = run.saved_image("corrupt").await;
    let zstd = compress(&archive, Compression::Zstd).await;
    let gzip = compress(&archive, Compression::Gzip).await;
    let mut garbled = zstd.clone();
    let middle = garbled.len() / 2;
    for b in &mut garbled[middle..middle + 64] {
        *b ^= 0x5a;
    }
    let cases: Vec<(&str, Vec<u8>, Compression)> = vec![
        (
            "truncated zstd",
            zstd[..zstd.len() / 2].to_vec(),
            Compression::Zstd,
        ),
        ("garbled zstd", garbled, Compression::Zstd),
        (
            "truncated gzip",
            gzip[..gzip.len() - 100].to_vec(),
            Compression::Gzip,
        ),
        (
            "not gzip at all",
            b"this is not a gzip stream".to_vec(),
            Compression::Gzip,
        ),
        (
            "truncated tar",
            archive[..archive.len() / 2].to_vec(),
            Compression::None,
        ),
        (
            "tar without its end",
            archive[..archive.len() - 2048].to_vec(),
            Compression::None,
        ),
    ];
    let before = run.images().await;
    assert!(before.is_empty());
    for (case, package, compression) in cases {
        let id = upload(&r, &package, compression, &[&tag]).await;
        let (status, body) = load(&r, id).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{case}: {body}");
        assert_eq!(error_code(&body), "LOAD_FAILED", "{case}: {body}");
        assert_eq!(run.images().await, before, "{case}: images changed");
        assert_eq!(run.image_id(&image_id).await, None, "{case}: image loaded");
        assert_eq!(run.image_id(&tag).await, None, "{case}: tag set");
    }
}

#[tokio::test]
async fn unknown_package_id_is_404_not_found() {
    let r = spawn_receiver(None).await;
    let (status, body) = load(&r, Uuid::new_v4()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(error_code(&body), "NOT_FOUND");
}

#[tokio::test]
async fn loads_wait_their_turn_instead_of_failing() {
    let run = Run::new().await;
    let r = spawn_receiver(None).await;
    let (a, a_id, archive_a) = run.saved_image("first").await;
    let (b, b_id, archive_b) = run.saved_image("second").await;
    let pa = upload(
        &r,
        &compress(&archive_a, Compression::Zstd).await,
        Compression::Zstd,
        &[&a],
    )
    .await;
    let pb = upload(
        &r,
        &compress(&archive_b, Compression::Zstd).await,
        Compression::Zstd,
        &[&b],
    )
    .await;
    let ((sa, ba), (sb, bb)) = tokio::join!(load(&r, pa), load(&r, pb));
    assert_eq!(sa, StatusCode::OK, "{ba}");
    assert_eq!(sb, StatusCode::OK, "{bb}");
    assert_eq!(ba["image_id"], a_id);
    assert_eq!(bb["image_id"], b_id);
}

/// Runs `child_process_loads_with_docker_unreachable` in a child process whose DOCKER_HOST
/// names a socket that does not exist (the variable is never changed in this process).
#[tokio::test]
async fn docker_unreachable_is_503_docker_unavailable() {
    let exe = std::env::current_exe().expect("test binary");
    let output = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "child_process_loads_with_docker_unreachable",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "DOCKER_HOST",
            "unix:///nonexistent/deploy-load-test/docker.sock",
        )
        .env(CHILD_ENV, "1")
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

/// Only does something in the child process started by `docker_unreachable_is_503_docker_unavailable`.
#[tokio::test]
async fn child_process_loads_with_docker_unreachable() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let r = spawn_receiver(None).await;
    let id = upload(
        &r,
        b"any bytes: Docker is never reached",
        Compression::None,
        &[],
    )
    .await;
    let (status, body) = load(&r, id).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "DOCKER_UNAVAILABLE", "{body}");
    assert!(
        error_message(&body).contains("/nonexistent/deploy-load-test/docker.sock"),
        "{body}"
    );
    println!("child checked DOCKER_UNAVAILABLE");
}
