//! Cold deploys streamed end to end: the real sender library, the real receiver binary and cold
//! target hosts (extra Docker engines, deploy-testkit). To a host that holds none of the image's
//! layers, `deploy_release` streams `docker save` into the host's `docker load`
//! (`/deployment/stream`); a host that holds some gets layers; a stream that breaks is sent as
//! layers instead. The loopback proxy in front of the receiver counts the bytes and cuts the
//! connection for the fallback test (a real fault on a real socket); for a receiver without the
//! endpoint it answers 404 itself (a fake, said where it is used).

mod layers_common;

use deploy_protocol::api::DeploymentStatus;
use deploy_sender::{CompressionOptions, LayerFate, ReleaseOutcome, TransferMode};
use layers_common::{
    cold_host, container_image, host_has_image, journal, Fault, Images, Proxy, Sender,
};

const MIB: usize = 1024 * 1024;

impl Sender {
    /// The compression the newest streamed deploy's BUILD_COMPLETED names: `(compression, level)`.
    fn streamed_compression(&self) -> (serde_json::Value, serde_json::Value) {
        let events = self.events.sink().list(100);
        let event = events
            .iter()
            .find(|e| {
                e.event_type == deploy_protocol::events::EventType::BuildCompleted
                    && e.payload["mode"] == "stream"
            })
            .unwrap_or_else(|| panic!("no BUILD_COMPLETED of a stream in {events:#?}"));
        (
            event.payload["compression"].clone(),
            event.payload["compression_level"].clone(),
        )
    }

    async fn deploy(&self, url: &str, tag: &str, name: &str) -> ReleaseOutcome {
        self.deploy_at(url, tag, name, None).await
    }

    /// As [`Sender::deploy`], at a zstd `level` (`None`: the default, chosen per stream).
    async fn deploy_at(
        &self,
        url: &str,
        tag: &str,
        name: &str,
        level: Option<i32>,
    ) -> ReleaseOutcome {
        let compression = CompressionOptions {
            zstd_workers: 0,
            level,
            ..CompressionOptions::default()
        };
        self.deploy_with(url, tag, name, compression).await
    }
}

fn container_name() -> String {
    format!(
        "stream-tx-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[tokio::test]
async fn a_cold_host_gets_the_image_streamed_and_a_new_version_as_layers() {
    let images = Images::default();
    let base = images.base(3 * MIB);
    let v1 = images.app(&base, MIB);
    let v2 = images.app(&base, MIB);
    let host = cold_host("lst1").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let sender = Sender::new(true).await;
    let name = container_name();

    let first = sender.deploy(&proxy.url, &v1, &name).await;
    assert_eq!(first.mode, TransferMode::Stream, "{first:#?}");
    assert_eq!(first.totals.layers, 3);
    assert!(first.layers.is_empty(), "a stream has no per-layer reports");
    // The receiver is on this machine (loopback): by default its stream is not compressed.
    assert!(
        first
            .summary
            .contains("uncompressed: the receiver is on this machine"),
        "{}",
        first.summary
    );
    assert_eq!(
        first.totals.bytes_sent, first.prepare.compressed_bytes,
        "an uncompressed stream is the archive, byte for byte"
    );
    assert_eq!(
        sender.streamed_compression(),
        (serde_json::json!("none"), serde_json::Value::Null),
        "the event names the compression sent, not the deploy's default"
    );
    // The package was all on the wire, once.
    let wire = proxy.sent();
    assert!(
        first.totals.bytes_sent >= 4 * MIB as u64 && wire >= first.totals.bytes_sent,
        "{} bytes in the package, {wire} on the wire",
        first.totals.bytes_sent
    );
    assert!(
        wire < first.totals.bytes_sent + MIB as u64 / 4,
        "{wire} bytes on the wire for a {}-byte package",
        first.totals.bytes_sent
    );
    assert_eq!(container_image(&host, &name), images.id(&v1));
    let record = first.deployment.as_ref().expect("the deployment record");
    assert_eq!(record.image_id.as_deref(), Some(images.id(&v1).as_str()));

    // The host holds v1's layers now: v2 travels as layers, only its top one sent.
    let before = proxy.sent();
    let second = sender.deploy(&proxy.url, &v2, &name).await;
    assert_eq!(second.mode, TransferMode::Layers);
    let fates: Vec<LayerFate> = second.layers.iter().map(|l| l.fate).collect();
    assert_eq!(
        fates,
        [LayerFate::Present, LayerFate::Present, LayerFate::Sent]
    );
    assert!(proxy.sent() - before < 2 * MIB as u64);
    assert_eq!(container_image(&host, &name), images.id(&v2));
}

#[tokio::test]
async fn a_stream_cut_midway_is_sent_as_layers_and_the_deploy_succeeds() {
    let images = Images::default();
    let base = images.base(4 * MIB);
    let app = images.app(&base, 2 * MIB);
    let host = cold_host("lst2").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let sender = Sender::new(true).await;
    let name = container_name();

    // Cut 2 MiB into the stream (the first connection that carries the package).
    proxy.fault_after(2 * MIB as u64, Fault::Cut);
    let outcome = sender.deploy(&proxy.url, &app, &name).await;
    assert_eq!(outcome.mode, TransferMode::Layers, "{outcome:#?}");
    assert_eq!(outcome.totals.present, 0, "the cut stream left no layer");
    // The stream was tried: its 2 MiB went before the layers, sent whole (a cut blob upload
    // would have resumed instead, and the wire would carry little more than the image).
    assert!(
        proxy.sent() >= outcome.totals.bytes_sent + 2 * MIB as u64,
        "{} bytes on the wire, {} in the layers",
        proxy.sent(),
        outcome.totals.bytes_sent
    );
    assert_eq!(outcome.totals.bytes_sent, outcome.totals.bytes_total);
    assert_eq!(container_image(&host, &name), images.id(&app));
    assert!(host_has_image(&host, &app));

    // The receiver ended the cut stream's deployment FAILED (its client went away mid-package,
    // so its load failed): no record is left IN_PROGRESS, and the layers' deployment is the one
    // that took effect.
    let records: Vec<_> = journal(&proxy.url)
        .await
        .into_iter()
        .filter(|r| r.container_name == name)
        .collect();
    let statuses: Vec<_> = records.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [DeploymentStatus::Succeeded, DeploymentStatus::Failed],
        "newest first: {records:#?}"
    );
    assert!(records[1].error.is_some(), "{:#?}", records[1]);
}

#[tokio::test]
async fn a_stream_refused_busy_while_another_loads_is_sent_as_layers() {
    let images = Images::default();
    let first = images.app(&images.base(4 * MIB), 2 * MIB);
    let second = images.app(&images.base(3 * MIB), MIB);
    // A stream that stalls holds the host's load turn until the receiver's idle timeout ends it
    // (long enough for the second deploy to export its image and reach its stream request on a
    // loaded machine).
    let host = cold_host("lst4").await;
    let (_daemon, proxy) =
        Proxy::with_receiver_env(&host.docker_host(), &[("UPLOAD_IDLE_TIMEOUT_SECS", "15")]).await;
    let sender = Sender::new(true).await;
    let (first_name, second_name) = (container_name(), container_name());

    let stall_at = proxy.sent() + 2 * MIB as u64;
    proxy.fault_after(2 * MIB as u64, Fault::Stall);
    let stalled = sender.deploy(&proxy.url, &first, &first_name);
    let busy = async {
        // Once the first stream stalled mid-package (it holds the load turn), the second comes.
        let waited = std::time::Instant::now();
        while proxy.sent() < stall_at {
            assert!(
                waited.elapsed() < std::time::Duration::from_secs(60),
                "the first stream never reached {stall_at} bytes"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let busy_before = proxy
            .busy_answers
            .load(std::sync::atomic::Ordering::Relaxed);
        let outcome = sender.deploy(&proxy.url, &second, &second_name).await;
        let busy = proxy
            .busy_answers
            .load(std::sync::atomic::Ordering::Relaxed)
            - busy_before;
        (outcome, busy)
    };
    let (first_outcome, (second_outcome, busy)) = tokio::join!(stalled, busy);

    // The second stream was refused before a byte of its package was read: 429 BUSY, told as
    // TRANSFER_FAILED, then the image went as layers, whole, and was loaded once the turn came.
    assert!(busy >= 1, "no 429 reached the sender");
    assert_eq!(
        second_outcome.mode,
        TransferMode::Layers,
        "{second_outcome:#?}"
    );
    assert_eq!(second_outcome.totals.present, 0);
    assert_eq!(
        second_outcome.totals.bytes_sent,
        second_outcome.totals.bytes_total
    );
    let refused = sender
        .events
        .sink()
        .list(100)
        .into_iter()
        .filter(|e| e.event_type == deploy_protocol::events::EventType::TransferFailed)
        .any(|e| e.payload["code"] == "BUSY");
    assert!(refused, "no TRANSFER_FAILED with BUSY among the events");
    assert_eq!(container_image(&host, &second_name), images.id(&second));

    // The stalled stream timed out on the receiver (408, which the sender also answers with
    // layers), and its deployment went through as layers too.
    assert!(
        proxy
            .timeout_answers
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "the receiver never answered the stalled stream 408"
    );
    assert_eq!(
        first_outcome.mode,
        TransferMode::Layers,
        "{first_outcome:#?}"
    );
    assert_eq!(container_image(&host, &first_name), images.id(&first));
    let journal = journal(&proxy.url).await;
    assert!(
        journal
            .iter()
            .all(|r| r.status != DeploymentStatus::InProgress),
        "{journal:#?}"
    );
}

#[tokio::test]
async fn a_receiver_without_the_stream_endpoint_gets_layers() {
    let images = Images::default();
    let app = images.app(&images.base(3 * MIB), MIB);
    let host = cold_host("lst5").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    // A fake, for a fault this build cannot cause for real: a receiver from before
    // `/deployment/stream` answers it as any unknown route, 404 with an empty body (axum's
    // default). The proxy answers so itself; every other request reaches the real receiver.
    proxy.answer_instead(
        "POST /deployment/stream ",
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    let sender = Sender::new(true).await;
    let name = container_name();

    let outcome = sender.deploy(&proxy.url, &app, &name).await;
    assert_eq!(
        proxy.own_answers.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the stream was tried once"
    );
    assert_eq!(outcome.mode, TransferMode::Layers, "{outcome:#?}");
    assert_eq!(outcome.totals.present, 0);
    assert_eq!(outcome.totals.bytes_sent, outcome.totals.bytes_total);
    assert_eq!(container_image(&host, &name), images.id(&app));
    let told: Vec<_> = sender
        .events
        .sink()
        .list(100)
        .into_iter()
        .filter(|e| e.event_type == deploy_protocol::events::EventType::TransferFailed)
        .collect();
    assert_eq!(told.len(), 1, "{told:#?}");
    let message = told[0].payload["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no streamed deploy"),
        "the event says why the stream did not get through: {message}"
    );
    let records = journal(&proxy.url).await;
    let statuses: Vec<_> = records
        .iter()
        .filter(|r| r.container_name == name)
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        [DeploymentStatus::Succeeded],
        "one deployment ran"
    );
}

#[tokio::test]
async fn a_named_level_compresses_the_stream_even_to_this_machine() {
    let images = Images::default();
    let base = images.base(2 * MIB);
    let v1 = images.app(&base, MIB);
    let host = cold_host("lst3").await;
    let (_daemon, proxy) = Proxy::with_receiver(&host.docker_host()).await;
    let sender = Sender::new(true).await;
    let name = container_name();

    let outcome = sender.deploy_at(&proxy.url, &v1, &name, Some(2)).await;
    assert_eq!(outcome.mode, TransferMode::Stream, "{outcome:#?}");
    assert!(
        outcome.summary.contains("zstd level 2"),
        "{}",
        outcome.summary
    );
    assert_eq!(
        sender.streamed_compression(),
        (serde_json::json!("zstd"), serde_json::json!(2))
    );
    assert_eq!(container_image(&host, &name), images.id(&v1));
}
