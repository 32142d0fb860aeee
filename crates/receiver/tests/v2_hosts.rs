//! Protocol v2 against cold target hosts: extra Docker engines (deploy-testkit's `hosts`), each
//! with a receiver (the real binary) in front. A cold host receives a three-layer busybox image
//! and runs it with the build host's image id; a second release on the same base sends only the
//! layer the host lacks; the same release again sends nothing. The assembled archive also
//! imports with containerd's importer (`ctr images import`).

mod common;

use std::process::Command;

use common::v2::{build, split, V2};
use common::{guard, start_daemon, temp_dir, Guard};
use deploy_protocol::{Compression, DeploymentSpec, HealthCheckKind, ReleaseStatus};
use deploy_testkit::hosts::TestHost;
use reqwest::StatusCode;

const HEALTHCHECK: &str = r#"HEALTHCHECK --interval=1s --timeout=2s --retries=3 CMD ["/bin/busybox","wget","-q","-O","/dev/null","http://127.0.0.1:80/"]"#;
const CMD: &str = r#"CMD ["/bin/busybox","httpd","-f","-p","80","-h","/www"]"#;

/// Builds `<prefix>-app:v1` (busybox, page, extra: three layers) and `<prefix>-app:v2`
/// (`v1` plus one more layer) on the main engine.
async fn build_images(
    docker: &bollard::Docker,
    cleanup: &mut Guard,
    prefix: &str,
) -> (String, String) {
    let busybox = std::fs::read("/bin/busybox").expect("the static busybox at /bin/busybox");
    let v1 = format!("{prefix}-app:v1");
    let v2 = format!("{prefix}-app:v2");
    cleanup.remove_image(&v2.clone());
    cleanup.remove_image(&v1.clone());
    let dockerfile = format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nCOPY extra /extra\n{HEALTHCHECK}\n{CMD}\n"
    );
    build(
        docker,
        &v1,
        &dockerfile,
        &[
            ("busybox", busybox, 0o755),
            (
                "www/index.html",
                format!("<p>{prefix} v1</p>").into_bytes(),
                0o644,
            ),
            ("extra/one.txt", b"layer three".to_vec(), 0o644),
        ],
    )
    .await;
    build(
        docker,
        &v2,
        &format!("FROM {v1}\nCOPY next /next\n"),
        &[("next/two.txt", format!("{prefix} v2").into_bytes(), 0o644)],
    )
    .await;
    (v1, v2)
}

fn spec(name: &str) -> DeploymentSpec {
    let mut spec = DeploymentSpec {
        container_name: name.to_owned(),
        ..Default::default()
    };
    spec.health_check.kind = HealthCheckKind::Docker;
    spec
}

#[tokio::test]
async fn a_cold_host_gets_only_the_layers_it_lacks_and_runs_the_build_hosts_image() {
    let docker = common::docker().await;
    let prefix = format!(
        "layers-rx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut cleanup = guard();
    let (v1, v2_tag) = build_images(&docker, &mut cleanup, &prefix).await;
    let host = tokio::task::spawn_blocking(|| TestHost::start("lrx"))
        .await
        .expect("start a test host");
    let dir = temp_dir();
    let daemon = start_daemon(
        &dir.path().join("packages"),
        &dir.path().join("state"),
        &[("DOCKER_HOST", host.docker_host())],
    );
    let api = V2::new(&daemon.base);
    let cold = bollard::Docker::connect_with_unix(
        &host.socket().display().to_string(),
        120,
        bollard::API_DEFAULT_VERSION,
    )
    .expect("connect to the test host")
    .negotiate_version()
    .await
    .expect("test host API version");
    let name = format!("{prefix}-web");

    // First release: three layers, none on the host.
    let save = common::save_image(&docker, &v1).await;
    let first = split(&save, Compression::Zstd, &[&v1], Some(spec(&name))).await;
    assert_eq!(first.manifest.layers.len(), 3);
    let inventory = api.inventory(&first.manifest.chain_ids()).await;
    assert_eq!(inventory.status, StatusCode::OK, "{}", inventory.body);
    assert_eq!(inventory.body["present"], serde_json::json!([]));
    assert_eq!(inventory.body["image_store"], "graphdriver");
    let (sent, _) = api.send_release(&first).await;
    let all: u64 = first.blobs.values().map(|b| b.len() as u64).sum();
    assert_eq!(sent, all);
    eprintln!("cold host, first release: {sent} blob bytes sent (3 of 3 layers)");
    let deployed = api.deploy(first.manifest.release_id).await;
    assert_eq!(deployed.status, StatusCode::OK, "{}", deployed.body);
    let build_id = docker.inspect_image(&v1).await.expect("v1").id.expect("id");
    let running = cold
        .inspect_container(&name, None)
        .await
        .expect("container on the cold host");
    assert_eq!(
        running.image.as_deref(),
        Some(build_id.as_str()),
        "the build host's image id runs"
    );
    assert_eq!(running.state.and_then(|s| s.running), Some(true));

    // Second release on the same base: only its new top layer travels.
    let save = common::save_image(&docker, &v2_tag).await;
    let second = split(&save, Compression::Zstd, &[&v2_tag], Some(spec(&name))).await;
    assert_eq!(second.manifest.layers.len(), 4);
    let inventory = api.inventory(&second.manifest.chain_ids()).await;
    assert_eq!(inventory.body["present"].as_array().map(Vec::len), Some(3));
    let (sent, status) = api.send_release(&second).await;
    let status: ReleaseStatus = serde_json::from_value(status).expect("status");
    let states: Vec<_> = status.layers.iter().map(|l| l.state).collect();
    use deploy_protocol::LayerState::{Missing, Present};
    assert_eq!(states, [Present, Present, Present, Missing]);
    assert_eq!(
        sent, second.manifest.layers[3].blob.size,
        "only the missing layer is sent"
    );
    let deployed = api.deploy(second.manifest.release_id).await;
    assert_eq!(deployed.status, StatusCode::OK, "{}", deployed.body);
    let v2_id = docker
        .inspect_image(&v2_tag)
        .await
        .expect("v2")
        .id
        .expect("id");
    let running = cold
        .inspect_container(&name, None)
        .await
        .expect("container");
    assert_eq!(running.image.as_deref(), Some(v2_id.as_str()));

    // The same image again: nothing to send.
    let mut again = second.clone();
    again.manifest.release_id = uuid::Uuid::new_v4();
    let (sent, _) = api.send_release(&again).await;
    assert_eq!(sent, 0);
    eprintln!("the same image again: {sent} blob bytes sent");
    let loaded = api.load(again.manifest.release_id).await;
    assert_eq!(loaded.status, StatusCode::OK, "{}", loaded.body);

    let metrics = common::http()
        .get(format!("{}/metrics", daemon.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("deploy_receiver_layers_total{result=\"received\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("deploy_receiver_layers_total{result=\"skipped\"} 7"),
        "{metrics}"
    );
    let _ = cold
        .remove_container(
            &name,
            Some(bollard::container::RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    drop(daemon);
    drop(host);
}

/// `ctr` against the machine's containerd, in namespace `ns`.
fn ctr(ns: &str, args: &[&str]) -> std::process::Output {
    let socket = deploy_testkit::hosts::containerd_socket();
    Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("ctr (containerd's client) must be installed")
}

/// Removes a containerd namespace's images and the namespace on drop.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let listed = ctr(&self.0, &["images", "ls", "-q"]);
        for name in String::from_utf8_lossy(&listed.stdout).lines() {
            let _ = ctr(&self.0, &["images", "rm", name]);
        }
        let _ = Command::new("ctr")
            .arg("--address")
            .arg(deploy_testkit::hosts::containerd_socket())
            .args(["namespaces", "rm", &self.0])
            .output();
    }
}

#[tokio::test]
async fn the_assembled_archive_imports_with_containerds_importer_also_without_held_layers() {
    use deploy_receiver::v2::assemble::{archive, BlobSource, CarriedLayer, Plan};
    use tokio::io::AsyncReadExt;

    let docker = common::docker().await;
    let prefix = format!(
        "layers-rx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut cleanup = guard();
    let (v1, v2_tag) = build_images(&docker, &mut cleanup, &prefix).await;
    let dir = temp_dir();
    let ns = Namespace(format!("{prefix}-ns"));

    // Writes release `built` as the receiver assembles it, carrying layers `from..`.
    let root = dir.path().to_owned();
    let write = |built: common::v2::Built, from: usize, file: &str| {
        let root = root.clone();
        let path = root.join(file);
        async move {
            let mut carried = Vec::new();
            let mut sizes = Vec::new();
            for (i, layer) in built.manifest.layers.iter().enumerate() {
                let blob_path = root.join(layer.blob.blake3.to_hex());
                std::fs::write(&blob_path, &built.blobs[&layer.blob.blake3]).expect("blob");
                let size = layer.uncompressed_size.expect("size");
                sizes.push(size);
                if i >= from {
                    carried.push(CarriedLayer {
                        diff_id: layer.diff_id,
                        size,
                        source: BlobSource::Complete(blob_path),
                        compression: layer.blob.compression,
                    });
                }
            }
            let mut reader = archive(&built.manifest, Plan { carried, sizes });
            let mut bytes = Vec::new();
            reader
                .read_to_end(&mut bytes)
                .await
                .expect("assembled archive");
            std::fs::write(&path, bytes).expect("archive file");
            path
        }
    };
    let first = split(
        &common::save_image(&docker, &v1).await,
        Compression::Gzip,
        &[&v1],
        None,
    )
    .await;
    let second = split(
        &common::save_image(&docker, &v2_tag).await,
        Compression::Zstd,
        &[&v2_tag],
        None,
    )
    .await;
    let full = write(first, 0, "first.tar").await;
    let out = ctr(&ns.0, &["images", "import", &full.display().to_string()]);
    assert!(
        out.status.success(),
        "ctr import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The second omits the three layers the namespace holds now.
    let partial = write(second, 3, "second.tar").await;
    let out = ctr(&ns.0, &["images", "import", &partial.display().to_string()]);
    assert!(
        out.status.success(),
        "ctr import without held layers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&ctr(&ns.0, &["images", "ls", "-q"]).stdout).into_owned();
    assert!(
        listed.contains(&format!("docker.io/library/{v1}")),
        "{listed}"
    );
    assert!(
        listed.contains(&format!("docker.io/library/{v2_tag}")),
        "{listed}"
    );
}
