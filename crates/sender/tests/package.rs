//! Packaging against the real Docker engine: images are built `FROM scratch` with the static
//! busybox of this machine (no registry, no pulls) and removed again by a guard, even on failure.
//! Without a reachable engine these tests fail; they never skip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use deploy_protocol::{Checksum, Compression, ErrorCode};
use deploy_sender::{
    package_image, BuildSpec, CompressionOptions, ImageSource, NoProgress, PackageRequest,
    PackageStore, ProgressEvent, Stage,
};
use deploy_testkit::docker::{docker, Guard};
use uuid::Uuid;

/// A unique image reference in the guard's repository, removed with it.
fn tag(guard: &Guard) -> String {
    guard.image(&Uuid::new_v4().simple().to_string())
}

/// A build context holding the static busybox and this Dockerfile (labelled for the guard, so
/// tests never share build-cache images).
fn busybox_context(guard: &Guard, dockerfile: &str) -> tempfile::TempDir {
    deploy_testkit::images::busybox_context(guard, dockerfile, "")
}

const HTTPD: &str = "FROM scratch\nCOPY busybox /bin/busybox\nCMD [\"/bin/busybox\",\"httpd\",\"-f\",\"-p\",\"80\"]\n";

fn build_spec(context: &Path, tag: &str) -> BuildSpec {
    BuildSpec {
        dockerfile: context.join("Dockerfile"),
        context: context.to_path_buf(),
        build_args: BTreeMap::new(),
        tag: tag.to_owned(),
    }
}

fn request(source: ImageSource, compression: Compression) -> PackageRequest {
    let mut request = PackageRequest::new(source);
    request.compression = CompressionOptions {
        compression,
        level: None,
        zstd_workers: 2,
    };
    request
}

/// Decompresses with the real command-line decoders.
fn decompress(path: &Path, compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => std::fs::read(path).expect("read"),
        Compression::Gzip | Compression::Zstd => {
            let tool = if compression == Compression::Gzip {
                "gzip"
            } else {
                "zstd"
            };
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .expect("decoder runs");
            assert!(
                out.status.success(),
                "{tool} -dc failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    }
}

/// The `RepoTags` of a `docker save` archive's manifest.json.
fn archive_tags(tar_bytes: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().expect("a tar archive") {
        let entry = entry.expect("entry");
        if entry.path().expect("path") == Path::new("manifest.json") {
            let manifest: serde_json::Value =
                serde_json::from_reader(entry).expect("manifest.json is JSON");
            return manifest[0]["RepoTags"]
                .as_array()
                .map(|tags| {
                    tags.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    panic!("no manifest.json: not a docker save archive");
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .collect()
}

#[tokio::test]
async fn built_image_is_packaged_with_zstd_and_gzip_as_docker_save_archives() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let context = busybox_context(&images, HTTPD);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("store");

    let mut ids = Vec::new();
    for compression in [Compression::Zstd, Compression::Gzip] {
        let source = ImageSource::Build(build_spec(context.path(), &tag));
        let info = package_image(&docker, &store, &request(source, compression), &NoProgress)
            .await
            .expect("package");
        let path = Path::new(&info.package_path);
        assert_eq!(info.compression, compression);
        assert!(path.to_string_lossy().ends_with(compression.extension()));
        assert_eq!(info.image_tags, std::slice::from_ref(&tag));
        assert!(info.image_id.starts_with("sha256:"));
        assert_eq!(
            info.container_name.as_deref(),
            Some(images.name.as_str()),
            "the container name defaults to the image name"
        );

        let bytes = std::fs::read(path).expect("package file");
        assert_eq!(info.package_size, bytes.len() as u64);
        assert_eq!(
            info.package_checksum,
            Checksum::of(&bytes),
            "metadata checksum is BLAKE3 of the file"
        );
        let tar = decompress(path, compression);
        assert_eq!(info.original_size, tar.len() as u64);
        assert_eq!(archive_tags(&tar), std::slice::from_ref(&tag));
        assert!(info.compression_ratio > 0.0 && info.compression_ratio < 1.0);

        let manifest = info.manifest();
        manifest.validate().expect("a valid upload manifest");
        assert_eq!(manifest.image_tags, std::slice::from_ref(&tag));
        ids.push(info.package_id);
    }

    let reopened = PackageStore::open(dir.path()).await.expect("reopen");
    let mut listed: Vec<Uuid> = reopened
        .list()
        .await
        .expect("list")
        .iter()
        .map(|p| p.package_id)
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids, "packages survive a restart");

    let info = reopened
        .verify(ids[0])
        .await
        .expect("intact package verifies");
    let mut bytes = std::fs::read(&info.package_path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&info.package_path, bytes).expect("write");
    let err = reopened.verify(ids[0]).await.expect_err("flipped byte");
    assert_eq!(err.code(), ErrorCode::ChecksumMismatch);
}

#[tokio::test]
async fn an_existing_image_is_packaged_by_tag_and_by_id() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let context = busybox_context(&images, HTTPD);
    let built = deploy_sender::build_image(&docker, &build_spec(context.path(), &tag), &NoProgress)
        .await
        .expect("build");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("store");

    let seen = Mutex::new(Vec::new());
    let progress = |e: ProgressEvent<'_>| {
        seen.lock()
            .expect("lock")
            .push((e.stage, e.done, e.finished))
    };
    let mut by_tag = request(ImageSource::Existing(tag.clone()), Compression::None);
    by_tag.container_name = Some("web".into());
    let info = package_image(&docker, &store, &by_tag, &progress)
        .await
        .expect("package by tag");
    assert_eq!(info.build_duration_ms, 0);
    assert_eq!(info.image_id, built.image_id);
    assert_eq!(info.container_name.as_deref(), Some("web"));
    assert_eq!(info.compression_level, None);
    let tar = decompress(Path::new(&info.package_path), Compression::None);
    assert_eq!(archive_tags(&tar), std::slice::from_ref(&tag));
    assert!(
        seen.lock()
            .expect("lock")
            .iter()
            .any(|(s, done, fin)| *s == Stage::Export && *fin && *done == info.original_size),
        "export progress reported and finished"
    );

    let by_id = request(
        ImageSource::Existing(built.image_id.clone()),
        Compression::Zstd,
    );
    let info = package_image(&docker, &store, &by_id, &NoProgress)
        .await
        .expect("package by id");
    assert_eq!(info.image_id, built.image_id);
    assert!(
        info.image_tags.is_empty(),
        "an archive saved by id carries no tag"
    );
    let tar = decompress(Path::new(&info.package_path), Compression::Zstd);
    assert!(archive_tags(&tar).is_empty());
}

#[tokio::test]
async fn build_args_reach_the_build() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let context = busybox_context(
        &images,
        "FROM scratch\nARG GREETING\nLABEL greeting=$GREETING\nCOPY busybox /bin/busybox\n",
    );
    let mut spec = build_spec(context.path(), &tag);
    spec.build_args.insert("GREETING".into(), "hello".into());
    deploy_sender::build_image(&docker, &spec, &NoProgress)
        .await
        .expect("build");
    let image = docker.inspect_image(&tag).await.expect("inspect");
    let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(labels.get("greeting").map(String::as_str), Some("hello"));
}

#[tokio::test]
async fn a_failing_build_is_build_failed_with_the_log_tail_and_stores_nothing() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let context = busybox_context(
        &images,
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY missing-file /x\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("store");
    let source = ImageSource::Build(build_spec(context.path(), &tag));
    let err = package_image(
        &docker,
        &store,
        &request(source, Compression::Zstd),
        &NoProgress,
    )
    .await
    .expect_err("COPY of a missing file fails");
    assert_eq!(err.code(), ErrorCode::BuildFailed);
    let message = err.to_string();
    assert!(message.contains("missing-file"), "{message}");
    assert!(message.contains("last"), "carries the log tail: {message}");
    match &err {
        deploy_sender::SenderError::BuildFailed { log_tail, .. } => {
            assert!(!log_tail.is_empty() && log_tail.len() <= deploy_sender::LOG_TAIL_LINES)
        }
        other => panic!("{other:?}"),
    }
    assert!(files_in(dir.path()).is_empty(), "nothing stored");
}

#[tokio::test]
async fn dockerignored_files_are_not_sent_to_the_build() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let context = busybox_context(&images, "FROM scratch\nCOPY secret.txt /secret.txt\n");
    std::fs::write(context.path().join("secret.txt"), "do not ship").expect("secret");
    std::fs::write(context.path().join(".dockerignore"), "secret.txt\n").expect("ignore");
    let err = deploy_sender::build_image(&docker, &build_spec(context.path(), &tag), &NoProgress)
        .await
        .expect_err("secret.txt is not in the context");
    assert_eq!(err.code(), ErrorCode::BuildFailed);
    assert!(err.to_string().contains("secret.txt"), "{err}");
}

#[tokio::test]
async fn a_dockerfile_outside_the_context_is_refused() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let outer = busybox_context(&images, HTTPD);
    let context = outer.path().join("ctx");
    std::fs::create_dir(&context).expect("ctx");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("store");
    let spec = BuildSpec {
        dockerfile: context.join("../Dockerfile"),
        context: context.clone(),
        build_args: BTreeMap::new(),
        tag: tag(&images),
    };
    let err = package_image(
        &docker,
        &store,
        &request(ImageSource::Build(spec), Compression::Zstd),
        &NoProgress,
    )
    .await
    .expect_err("outside");
    assert_eq!(err.code(), ErrorCode::ValidationError);
    assert!(
        err.to_string().contains("outside the build context"),
        "{err}"
    );
}

#[tokio::test]
async fn a_tiny_size_limit_is_package_too_large_and_leaves_no_temp_file() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let context = busybox_context(&images, HTTPD);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("store");
    for compression in [Compression::None, Compression::Zstd] {
        let mut limited = request(
            ImageSource::Build(build_spec(context.path(), &tag)),
            compression,
        );
        limited.max_package_size = 64 * 1024;
        let err = package_image(&docker, &store, &limited, &NoProgress)
            .await
            .expect_err("too large");
        assert_eq!(
            err.code(),
            ErrorCode::PackageTooLarge,
            "{compression}: {err}"
        );
        assert!(
            files_in(dir.path()).is_empty(),
            "{compression}: no temp file or package left"
        );
    }
}

#[tokio::test]
async fn unknown_images_and_taken_package_ids_are_refused() {
    let docker = docker().await;
    let images = Guard::new("deploy-sender-test");
    let tag = tag(&images);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = PackageStore::open(dir.path()).await.expect("store");
    let missing = request(ImageSource::Existing(tag.clone()), Compression::Zstd);
    let err = package_image(&docker, &store, &missing, &NoProgress)
        .await
        .expect_err("no such image");
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");

    let context = busybox_context(&images, HTTPD);
    let mut first = request(
        ImageSource::Build(build_spec(context.path(), &tag)),
        Compression::Zstd,
    );
    first.package_id = Some(Uuid::new_v4());
    package_image(&docker, &store, &first, &NoProgress)
        .await
        .expect("first");
    let err = package_image(&docker, &store, &first, &NoProgress)
        .await
        .expect_err("id taken");
    assert_eq!(err.code(), ErrorCode::Conflict);
}
