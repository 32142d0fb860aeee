//! Layer-aware transfer end to end: the real sender (library and `deploy-sender` binary), the
//! real receiver binary, and cold target hosts (extra Docker engines, deploy-testkit). Bytes on
//! the wire are counted by a loopback proxy in front of the receiver, which also cuts or stalls
//! connections for the resume tests (a real fault on a real socket).

mod layers_common;

use std::sync::Arc;
use std::time::Duration;

use deploy_protocol::release::ReleaseManifest;
use deploy_sender::{
    prepare_image, release_manifest, send_manifest, send_release, CompressionOptions, LayerFate,
    NoProgress, PreparedImage, ReleaseAction, ReleaseCalls, ReleaseOutcome,
};
use layers_common::{
    cold_host, container_image, copy_image, host_has_image, target, workspace_binary, Daemon,
    Fault, Images, Proxy, Sender, SECRET,
};

const MIB: usize = 1024 * 1024;

impl Sender {
    async fn prepare(&self, tag: &str) -> PreparedImage {
        prepare_image(
            &self.docker,
            &self.cache,
            tag,
            &options(),
            Arc::new(NoProgress),
        )
        .await
        .expect("prepare")
    }

    async fn deploy(&self, url: &str, tag: &str, name: &str) -> ReleaseOutcome {
        self.deploy_with(url, tag, name, options()).await
    }

    async fn load(&self, url: &str, tag: &str) -> ReleaseOutcome {
        let target = target(url);
        let calls = self.calls(&target);
        let image = self.prepare(tag).await;
        send_release(calls, &image, &ReleaseAction::Load, Arc::new(NoProgress))
            .await
            .expect("load")
    }
}

impl Sender {
    /// Registers a release of `tag` (to be loaded) on the receiver at `url` and sends nothing:
    /// a transfer that has begun, which [`Sender::finish`] completes.
    async fn register(&self, url: &str, tag: &str) -> (PreparedImage, ReleaseManifest) {
        let target = target(url);
        let calls = self.calls(&target);
        let image = self.prepare(tag).await;
        let manifest = release_manifest(&image, &ReleaseAction::Load).expect("manifest");
        calls
            .inventory(manifest.chain_ids())
            .await
            .expect("inventory");
        calls.register(&manifest).await.expect("register");
        (image, manifest)
    }

    /// Sends what a [`Sender::register`]ed release lacks and has it loaded.
    async fn finish(
        &self,
        url: &str,
        image: &PreparedImage,
        manifest: ReleaseManifest,
    ) -> ReleaseOutcome {
        let target = target(url);
        let calls = self.calls(&target);
        send_manifest(
            calls,
            image,
            manifest,
            &ReleaseAction::Load,
            Arc::new(NoProgress),
        )
        .await
        .expect("load")
    }
}

fn options() -> CompressionOptions {
    CompressionOptions {
        zstd_workers: 2,
        ..CompressionOptions::default()
    }
}

fn fates(outcome: &ReleaseOutcome) -> Vec<LayerFate> {
    outcome.layers.iter().map(|l| l.fate).collect()
}

#[tokio::test]
async fn a_cold_host_gets_every_layer_then_only_a_changed_top_layer_then_almost_nothing() {
    let images = Images::default();
    let base = images.base(2 * MIB);
    let v1 = images.app(&base, MIB);
    let v2 = images.app(&base, MIB);
    let host = cold_host("ltx1").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let sender = Sender::new(false).await;
    let name = format!(
        "layers-tx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );

    let first = sender.deploy(&proxy.url, &v1, &name).await;
    assert_eq!(
        fates(&first),
        vec![LayerFate::Sent; 3],
        "a cold host lacks every layer"
    );
    assert_eq!(first.totals.present, 0);
    assert_eq!(
        container_image(&host, &name),
        images.id(&v1),
        "the build host's image id"
    );

    let before = proxy.sent();
    let second = sender.deploy(&proxy.url, &v2, &name).await;
    let wire = proxy.sent() - before;
    assert_eq!(
        fates(&second),
        vec![LayerFate::Present, LayerFate::Present, LayerFate::Sent]
    );
    let top = second.layers[2].size;
    assert!(
        wire as f64 <= 1.05 * top as f64 + 256.0 * 1024.0,
        "redeploy after a top-layer change: {wire} bytes on the wire for a {top}-byte layer"
    );
    assert_eq!(
        second.prepare.compressed_layers, 1,
        "only the new top layer compressed"
    );
    assert_eq!(container_image(&host, &name), images.id(&v2));

    let before = proxy.sent();
    let third = sender.deploy(&proxy.url, &v2, &name).await;
    let wire = proxy.sent() - before;
    assert_eq!(third.totals.bytes_sent, 0);
    assert!(!third.prepare.exported, "all cached: no docker save");
    assert!(
        wire < 1024 * 1024,
        "the same image again: {wire} bytes on the wire"
    );
    assert_eq!(container_image(&host, &name), images.id(&v2));
    assert!(
        third.summary.contains("100.0 % already there"),
        "{}",
        third.summary
    );
}

#[tokio::test]
async fn blobs_go_on_as_many_connections_at_once_as_configured_and_wait_out_a_busy_receiver() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let images = Images::default();
    let host = cold_host("ltx7").await;
    // One upload slot: a second PATCH at once is answered 429 BUSY, and waits for the slot.
    let (_daemon, proxy) =
        Proxy::with_receiver_env(&host.docker_host(), &[("MAX_CONCURRENT_UPLOADS", "1")]).await;
    let sender = Sender::new(false).await;
    let target = target(&proxy.url);
    // The first app's three layers are all missing; the second shares the busybox layer.
    for (connections, missing) in [(3, 3), (1, 2)] {
        let base = images.base(2 * MIB);
        let app = images.app(&base, 2 * MIB);
        let image = sender.prepare(&app).await;
        let before = proxy.patch_connections.load(Ordering::Relaxed);
        let busy_before = proxy.busy_answers.load(Ordering::Relaxed);
        // With several connections, the first PATCH is held at the proxy until the others have
        // started: they can only start if the sender does not wait for the first one's answer.
        let all_started = Arc::new(AtomicBool::new(false));
        if connections > 1 {
            let (started, seen) = (
                Arc::clone(&all_started),
                Arc::clone(&proxy.patch_connections),
            );
            proxy.before("PATCH /deployment/v2/blobs/", move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while std::time::Instant::now() < deadline {
                    if seen.load(Ordering::Relaxed) - before >= connections as u64 {
                        started.store(true, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        // A new connection pool each time.
        let http = reqwest::Client::new();
        let calls = ReleaseCalls {
            http: &http,
            blob_connections: connections,
            ..sender.calls(&target)
        };
        let outcome = send_release(calls, &image, &ReleaseAction::Load, Arc::new(NoProgress))
            .await
            .expect("load");
        let fates = fates(&outcome);
        let sent = fates.iter().filter(|f| **f == LayerFate::Sent).count();
        // Every missing layer went over the wire. With several connections a layer was once
        // reported resumed (from offset 0) in CI: its PATCH saw a send error, probably a 429
        // answered before the body was read and the connection closed under the writing client.
        // The receiver now drains a refused body while it answers (receiver tests/v2_blobs.rs,
        // `a_busy_patch_is_answered_...`), but that cause was never proven, so this stays lenient.
        let transferred = fates
            .iter()
            .filter(|f| matches!(f, LayerFate::Sent | LayerFate::Resumed))
            .count();
        assert_eq!(transferred, missing, "{fates:?}");
        if connections == 1 {
            assert_eq!(
                sent, missing,
                "one blob at a time is never interrupted: {fates:?}"
            );
        }
        let used = proxy.patch_connections.load(Ordering::Relaxed) - before;
        let busy = proxy.busy_answers.load(Ordering::Relaxed) - busy_before;
        if connections > 1 {
            // A PATCH answered 429 before its body was read closes its connection: the retry
            // may come on another one.
            assert!(
                used >= connections as u64,
                "{connections} blobs at once: the PATCHes went on {used} connection(s)"
            );
            assert!(
                all_started.load(Ordering::Relaxed),
                "all {connections} PATCHes started while the first was held"
            );
            assert!(
                busy > 0,
                "the receiver's one slot answered 429 BUSY to the others"
            );
        } else {
            assert_eq!(
                used, 1,
                "one blob at a time: the PATCHes went on {used} connections"
            );
            assert_eq!(busy, 0, "one blob at a time never finds the slot taken");
        }
        assert!(
            host_has_image(&host, &images.id(&app)),
            "the build host's image"
        );
    }
}

#[tokio::test]
async fn a_second_host_sharing_the_base_gets_only_its_missing_layers_and_nothing_is_recompressed() {
    let images = Images::default();
    let base = images.base(2 * MIB);
    let app = images.app(&base, MIB);
    let (first_host, second_host) = (cold_host("ltx2").await, cold_host("ltx3").await);
    let (first, second) = (
        Daemon::start(&first_host.docker_host()),
        Daemon::start(&second_host.docker_host()),
    );
    let sender = Sender::new(false).await;
    let name = format!(
        "layers-tx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );

    let cold = sender.deploy(&first.url, &app, &name).await;
    assert_eq!(cold.prepare.compressed_layers, 3);
    // The second host holds the base already (loaded earlier), not the app.
    let based = sender.load(&second.url, &base).await;
    assert_eq!(
        based.prepare.compressed_layers, 0,
        "the base's layers come from the cache"
    );
    let warm = sender.deploy(&second.url, &app, &name).await;
    assert_eq!(
        fates(&warm),
        vec![LayerFate::Present, LayerFate::Present, LayerFate::Sent]
    );
    assert!(
        !warm.prepare.exported && warm.prepare.compressed_layers == 0,
        "nothing recompressed"
    );
    assert_eq!(warm.totals.bytes_sent, warm.layers[2].size);
    assert_eq!(container_image(&second_host, &name), images.id(&app));
}

#[tokio::test]
async fn a_connection_cut_mid_blob_resumes_from_the_receivers_offset_without_a_rerun() {
    let images = Images::default();
    let base = images.base(64 * 1024);
    let app = images.app(&base, 8 * MIB);
    let host = cold_host("ltx4").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let sender = Sender::new(false).await;
    let name = format!(
        "layers-tx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );

    // Prepare first, to know where the top blob's bytes fall on the wire.
    let image = prepare_image(
        &sender.docker,
        &sender.cache,
        &app,
        &options(),
        Arc::new(NoProgress),
    )
    .await
    .expect("prepare");
    let below: u64 = image.layers[..2].iter().map(|l| l.blob.size).sum();
    let top = image.layers[2].blob.size;
    drop(image);
    proxy.fault_after(below + top * 6 / 10, Fault::Cut);

    let outcome = sender.deploy(&proxy.url, &app, &name).await;
    let report = &outcome.layers[2];
    assert_eq!(report.fate, LayerFate::Resumed, "{:?}", outcome.layers);
    assert!(
        report.resumed_from > 0,
        "resumed from the receiver's offset"
    );
    assert_eq!(outcome.totals.resumed, 1);
    let total: u64 = outcome.layers.iter().map(|l| l.size).sum();
    assert!(
        proxy.sent() as f64 <= 1.15 * total as f64 + 64.0 * 1024.0,
        "{} bytes on the wire for {total} bytes of blobs",
        proxy.sent()
    );
    assert_eq!(container_image(&host, &name), images.id(&app));
}

/// A transfer whose blob another writer holds (here an earlier transfer stalled mid-blob, its
/// `PATCH` kept by the receiver until its idle timeout) is answered `409 CONFLICT` until then: it
/// waits the other writer out and sends the rest, instead of failing after a few answers.
#[tokio::test]
async fn a_blob_held_by_a_stalled_writer_is_waited_for_and_then_sent() {
    let images = Images::default();
    let base = images.base(64 * 1024);
    let app = images.app(&base, 8 * MIB);
    let host = cold_host("ltx9").await;
    let (_daemon, proxy) =
        Proxy::with_receiver_env(&host.docker_host(), &[("UPLOAD_IDLE_TIMEOUT_SECS", "6")]).await;
    let sender = Sender::new(false).await;
    let target = target(&proxy.url);
    let image = sender.prepare(&app).await;
    let below: u64 = image.layers[..2].iter().map(|l| l.blob.size).sum();
    let top = image.layers[2].blob.size;
    let stall_at = below + top / 2;
    proxy.fault_after(stall_at, Fault::Stall);

    // The first transfer stalls half-way through the top blob and never ends by itself.
    let stalled = send_release(
        sender.calls(&target),
        &image,
        &ReleaseAction::Load,
        Arc::new(NoProgress),
    );
    let second = async {
        while proxy.sent() < stall_at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = std::time::Instant::now();
        let outcome = send_release(
            sender.calls(&target),
            &image,
            &ReleaseAction::Load,
            Arc::new(NoProgress),
        )
        .await;
        (outcome, started.elapsed())
    };
    tokio::pin!(stalled, second);
    let (outcome, took) = tokio::select! {
        out = &mut second => out,
        _ = &mut stalled => second.await,
    };
    let outcome = outcome.expect("the second transfer waits out the stalled writer");
    assert_eq!(
        outcome.layers[2].fate,
        LayerFate::Resumed,
        "{:?}",
        outcome.layers
    );
    assert!(
        took >= Duration::from_secs(3),
        "it waited for the receiver to end the stalled writer ({took:?})"
    );
    assert!(
        host_has_image(&host, &images.id(&app)),
        "the build host's image"
    );
}

#[tokio::test]
async fn a_killed_sender_is_rerun_and_resumes_from_the_receivers_offset() {
    let images = Images::default();
    let base = images.base(64 * 1024);
    let app = images.app(&base, 8 * MIB);
    let host = cold_host("ltx5").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = format!(
        "layers-tx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let command = || {
        let mut c = tokio::process::Command::new(workspace_binary("deploy-sender"));
        c.args([
            "deploy", "--image", &app, "--name", &name, "--health", "none", "--json",
        ])
        .args(["--to", &proxy.url])
        .env("DEPLOY_HMAC_SECRET", SECRET)
        .env("PACKAGE_DIR", dir.path())
        .env("DEPLOY_ZSTD_WORKERS", "2")
        // Layers, which resume (a cold host's stream would not).
        .env("DEPLOY_STREAM_COLD", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
        c
    };

    // The first run stalls 5 MiB into the transfer (inside the 8 MiB top blob) and is killed.
    proxy.fault_after(5 * MIB as u64, Fault::Stall);
    let mut first = command().spawn().expect("deploy-sender runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while proxy.sent() < 5 * MIB as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never got 5 MiB out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill().await.expect("SIGKILL the sender");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let before = proxy.sent();
    let rerun = command().output().await.expect("deploy-sender reruns");
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stdout)
    );
    let outcome: serde_json::Value =
        serde_json::from_slice(&rerun.stdout).expect("--json prints the outcome");
    let top = &outcome["layers"][2];
    assert_eq!(top["fate"], "resumed", "{outcome:#}");
    let resumed_from = top["resumed_from"].as_u64().expect("resumed_from");
    let size = top["size"].as_u64().expect("size");
    assert!(resumed_from > 0, "{outcome:#}");
    assert_eq!(top["bytes_sent"].as_u64(), Some(size - resumed_from));
    assert!(
        proxy.sent() - before < size,
        "the rerun sent less than the whole layer"
    );
    assert_eq!(
        outcome["prepare"]["exported"], false,
        "the rerun took the layers from the cache"
    );
    assert_eq!(container_image(&host, &name), images.id(&app));
}

#[tokio::test]
async fn a_layer_gone_from_the_target_between_inventory_and_load_is_sent_and_the_deploy_succeeds() {
    let images = Images::default();
    let base = images.base(2 * MIB);
    let app = images.app(&base, MIB);
    let host = cold_host("ltx-race").await;
    // The target's operator loaded the base: the engine holds its layers, no receiver kept a blob.
    copy_image(&base, &host);
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let removed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (flag, docker_host, base_tag) = (removed.clone(), host.docker_host(), base.clone());
    // After the inventory said "present", and before the receiver loads: the base goes.
    proxy.before("/deploy?await_blobs=true HTTP/1.1", move || {
        let out = std::process::Command::new("docker")
            .env("DOCKER_HOST", docker_host)
            .args(["rmi", &base_tag])
            .output()
            .expect("docker rmi runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let sender = Sender::new(false).await;
    let name = format!(
        "layers-race-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );

    let outcome = sender.deploy(&proxy.url, &app, &name).await;
    assert!(
        removed.load(std::sync::atomic::Ordering::SeqCst),
        "the base was removed mid-deploy"
    );
    assert_eq!(
        fates(&outcome),
        vec![LayerFate::Sent; 3],
        "the two base layers, present at inventory, were sent after LAYERS_MISSING: {:?}",
        outcome.layers
    );
    assert_eq!(container_image(&host, &name), images.id(&app));
}

#[tokio::test]
async fn layers_a_registered_release_relies_on_are_not_pruned_from_under_it() {
    let images = Images::default();
    let (base, other_base) = (images.base(2 * MIB), images.base(MIB));
    let old = images.app(&base, MIB);
    let (next, last) = (
        images.app(&other_base, 64 * 1024),
        images.app(&other_base, 64 * 1024),
    );
    let later = images.app(&base, 128 * 1024);
    let host = cold_host("ltx-prune").await;
    // IMAGE_HISTORY=1: the current image and one earlier one are kept; older ones are pruned.
    let daemon = Daemon::start_with(&host.docker_host(), &[("IMAGE_HISTORY", "1")]);
    let sender = Sender::new(false).await;
    let name = format!(
        "layers-prune-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let old_id = images.id(&old);

    sender.deploy(&daemon.url, &old, &name).await;
    sender.deploy(&daemon.url, &next, &name).await;
    // A transfer of `later` (on `old`'s base) has begun: registered, nothing sent yet.
    let (image, manifest) = sender.register(&daemon.url, &later).await;
    sender.deploy(&daemon.url, &last, &name).await;
    assert!(
        host_has_image(&host, &old_id),
        "`old` is past IMAGE_HISTORY but holds the base a registered release relies on"
    );
    let loaded = sender.finish(&daemon.url, &image, manifest).await;
    assert_eq!(
        fates(&loaded)[..2],
        [LayerFate::Present, LayerFate::Present],
        "the base stayed on the target: {:?}",
        loaded.layers
    );

    // Once nothing pending relies on it, the next deployment prunes `old` as usual.
    sender.deploy(&daemon.url, &next, &name).await;
    assert!(
        !host_has_image(&host, &old_id),
        "with no release pending, `old` is pruned"
    );
}

/// A signed `PATCH` of `chunks` (sent `gap` apart, chunked) to blob `blob` at `offset`, as a
/// client below the sender's own would; answers the status and the `Upload-Offset` held.
async fn raw_patch(
    url: &str,
    blob: &deploy_sender::CachedLayer,
    offset: u64,
    chunks: Vec<Vec<u8>>,
    gap: Duration,
) -> (u16, Option<u64>) {
    let hex = blob.blake3.to_hex();
    let path = deploy_protocol::release::paths::blob(&blob.blake3);
    let authority = url.trim_start_matches("http://").to_owned();
    let headers = deploy_protocol::SignatureHeaders::sign(
        "default",
        SECRET.as_bytes(),
        Some(&authority),
        "PATCH",
        &path,
        &blob.blake3,
        deploy_protocol::envelope::unix_now(),
        deploy_protocol::envelope::new_nonce(),
    );
    use futures::StreamExt as _;
    let body = futures::stream::iter(chunks).then(move |chunk| async move {
        tokio::time::sleep(gap).await;
        Ok::<_, std::io::Error>(chunk)
    });
    let mut request = reqwest::Client::new()
        .patch(format!("{url}{path}"))
        .header("Upload-Offset", offset.to_string())
        .header("Content-Type", "application/offset+octet-stream")
        .body(reqwest::Body::wrap_stream(body));
    for (name, value) in headers.to_pairs() {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("PATCH {hex}: {e}"));
    let held = response
        .headers()
        .get("Upload-Offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (response.status().as_u16(), held)
}

#[tokio::test]
async fn a_blob_held_whole_but_never_checked_is_checked_and_one_torn_is_sent_again() {
    let images = Images::default();
    let base = images.base(64 * 1024);
    let app = images.app(&base, MIB);
    let host = cold_host("ltx-torn").await;
    let daemon = Daemon::start(&host.docker_host());
    let sender = Sender::new(false).await;
    let (image, manifest) = sender.register(&daemon.url, &app).await;
    let top = &image.layers.last().expect("layers").blob;

    // The top blob at full length with wrong bytes, never checked: what a receiver killed
    // between the last byte and its check leaves. Made here by a client whose body runs one
    // byte past the end (refused 413 after the blob's length, which is kept).
    let (status, held) = raw_patch(
        &daemon.url,
        top,
        0,
        vec![vec![0u8; usize::try_from(top.size - 1).expect("fits")]],
        Duration::ZERO,
    )
    .await;
    assert_eq!((status, held), (204, Some(top.size - 1)));
    let (status, held) = raw_patch(
        &daemon.url,
        top,
        top.size - 1,
        vec![vec![0u8], vec![0u8]],
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(
        (status, held),
        (413, Some(top.size)),
        "the whole length held"
    );

    // The sender finds the blob held whole, has it checked (an empty PATCH at its end), is told
    // it was discarded (422), sends it again and the release loads.
    let outcome = sender.finish(&daemon.url, &image, manifest).await;
    assert!(
        outcome.totals.bytes_sent >= top.size,
        "the top blob went again: {:?}",
        outcome.totals
    );
    assert!(host_has_image(&host, &images.id(&app)));
}
