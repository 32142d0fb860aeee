//! Cold deploys, streamed: to a host whose engine holds none of the image's layers, layer reuse
//! saves nothing, and splitting the image into cached blobs before the first byte is sent only
//! adds time. So `docker save` is streamed as Docker writes it, compressed for the link it
//! crosses ([`stream_options`]), in one signed request into the receiver's `docker load`
//! (`/deployment/stream`), which Docker reads while the sender is still exporting: Docker's own
//! `save | load` pipe, plus the network.
//! The receiver verifies every byte against the seal that ends the request before Docker may keep
//! the image. When the stream cannot get through (an older receiver, a load in progress there,
//! a broken connection), the caller sends the image as layers instead.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_compression::tokio::bufread::{GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bollard::Docker;
use deploy_protocol::release::InventoryResponse;
use deploy_protocol::stream::StreamManifest;
use deploy_protocol::Compression;
use futures::StreamExt;
use tokio::io::AsyncRead;
use uuid::Uuid;

use super::compress::CompressionOptions;
use super::deploy::DeployRequest;
use super::docker::docker_error;
use super::events::{Lifecycle, Subject};
use super::layers::{chain_ids, image_diff_ids, LayerCache, PrepareStats};
use super::package::{resolve_image, ResolvedImage};
use super::progress::{Progress, ProgressExt, Stage};
use super::release::{ReleaseOutcome, ReleaseTotals, TransferMode};
use super::store::now_rfc3339;
use crate::client::{ReceiverClient, ReleaseCalls, StreamFailure};
use crate::SenderError;

/// Compressed bytes handed to the connection at once.
const CHUNK: usize = 256 * 1024;

/// An image to stream to a host that holds none of its layers.
#[derive(Debug)]
pub(crate) struct ColdTarget {
    /// The image.
    pub image: ResolvedImage,
    /// Its layers' diffIDs, bottom first.
    pub diff_ids: Vec<String>,
    /// The receiver's answer: its engine holds none of them.
    pub inventory: InventoryResponse,
}

/// `Some` when `reference` should be streamed: it is tagged (the receiver runs a tag its archive
/// sets), the layer cache lacks at least one of its layers in `options.compression` (else the
/// blobs are ready and the layer path sends them at once), and the receiver's engine holds none
/// of them.
async fn cold_target(
    docker: &Docker,
    cache: &LayerCache,
    calls: &ReleaseCalls<'_>,
    reference: &str,
    options: &CompressionOptions,
) -> Result<Option<ColdTarget>, SenderError> {
    options.effective_level()?;
    let image = resolve_image(docker, reference).await?;
    if image.tags.is_empty() {
        return Ok(None);
    }
    let diff_ids = image_diff_ids(docker, &image.id).await?;
    if diff_ids.is_empty() {
        return Ok(None);
    }
    let mut all_cached = true;
    for diff_id in &diff_ids {
        if cache.get(diff_id, options.compression).await?.is_none() {
            all_cached = false;
            break;
        }
    }
    if all_cached {
        return Ok(None);
    }
    let chains = chain_ids(&diff_ids)
        .iter()
        .map(|c| c.parse())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SenderError::Internal(format!("a layer's chain ID is malformed: {e}")))?;
    let inventory = calls.inventory(chains).await?;
    if !inventory.present.is_empty() {
        return Ok(None);
    }
    Ok(Some(ColdTarget {
        image,
        diff_ids,
        inventory,
    }))
}

/// Streams `cold.image` to the receiver and deploys it with `request.deployment`; the outcome in
/// the shape of a release's (mode `stream`, no per-layer reports).
async fn stream_deploy(
    docker: &Docker,
    calls: &ReleaseCalls<'_>,
    cold: &ColdTarget,
    request: &DeployRequest,
    release_id: Uuid,
    chosen: &StreamCompression,
    progress: Arc<dyn Progress>,
) -> Result<ReleaseOutcome, StreamFailure> {
    let started = Instant::now();
    let image = &cold.image;
    // One thread (see `compress`): zstd's workers take CPU from the two engines
    // (docs/PERFORMANCE.md, "Cold hosts streamed").
    let options = chosen.options;
    let mut spec = request.deployment.clone();
    if spec.image.is_none() {
        spec.image = image.tags.first().cloned();
    }
    let manifest = StreamManifest {
        package_id: release_id,
        compression: options.compression,
        image_id: image.id.clone(),
        image_tags: image.tags.clone(),
        container_name: Some(spec.container_name.clone()),
        created_at: Some(now_rfc3339()),
        deployment: spec,
    };
    manifest
        .validate()
        .map_err(|e| StreamFailure::Final(SenderError::Validation(e.to_string())))?;

    // docker save -> (counted) -> compressor -> the request body.
    let exported = Arc::new(AtomicU64::new(0));
    let export_error: Arc<Mutex<Option<SenderError>>> = Arc::default();
    let source = {
        let exported = Arc::clone(&exported);
        let export_error = Arc::clone(&export_error);
        let progress = Arc::clone(&progress);
        let what = format!("exporting {}", image.reference);
        let total = image.size;
        docker
            .export_image(&image.reference)
            .map(move |chunk| match chunk {
                Ok(bytes) => {
                    let done = exported.fetch_add(bytes.len() as u64, Ordering::Relaxed)
                        + bytes.len() as u64;
                    progress.advance(Stage::Export, done, total);
                    Ok(bytes)
                }
                Err(e) => {
                    let error = docker_error(&what, e);
                    let message = error.to_string();
                    if let Ok(mut slot) = export_error.lock() {
                        slot.get_or_insert(error);
                    }
                    Err(std::io::Error::other(message))
                }
            })
    };
    // The request starts with Docker's first byte: Docker may spend seconds writing the export
    // before it (about 5 s a GiB on this kind of host), and the receiver would count that as an
    // idle stream.
    let mut source = Box::pin(source);
    let first = match source.next().await {
        Some(Ok(bytes)) => bytes,
        Some(Err(_)) => {
            let error = export_error.lock().ok().and_then(|mut slot| slot.take());
            return Err(StreamFailure::Final(error.unwrap_or_else(|| {
                SenderError::Internal(format!("exporting {} failed", image.reference))
            })));
        }
        None => {
            return Err(StreamFailure::Final(SenderError::Internal(format!(
                "Docker exported nothing for {}",
                image.reference
            ))))
        }
    };
    let source = futures::stream::iter([Ok(first)]).chain(source);
    let encoded = compress(tokio_util::io::StreamReader::new(source), &options)
        .map_err(StreamFailure::Final)?;
    let body = tokio_util::io::ReaderStream::with_capacity(encoded, CHUNK);
    let client = ReceiverClient::new(calls.http.clone(), calls.target.clone());
    let sent_progress = Arc::clone(&progress);
    progress.message(
        Stage::Deploy,
        "streaming: the receiver loads the image as it arrives",
    );
    let result = client
        .stream_deploy(&manifest, body, calls.correlation_id, move |sent| {
            sent_progress.advance(Stage::Upload, sent, None);
        })
        .await;
    let taken = export_error.lock().ok().and_then(|mut slot| slot.take());
    let (transfer, record) = match (result, taken) {
        // The export broke the stream before an answer: that is the cause, and a retry as layers
        // would export again and most likely fail the same way.
        (Err(StreamFailure::Fallback(e)), Some(export))
            if !matches!(e, SenderError::Remote { .. } | SenderError::Deployment(_)) =>
        {
            return Err(StreamFailure::Final(export))
        }
        (Err(failure), _) => return Err(failure),
        (Ok(done), _) => done,
    };
    let uncompressed = exported.load(Ordering::Relaxed);
    progress.finish(Stage::Export, uncompressed);
    progress.finish(Stage::Upload, transfer.bytes);
    progress.finish(Stage::Deploy, 0);
    let layers = cold.diff_ids.iter().collect::<HashSet<_>>().len();
    let totals = ReleaseTotals {
        layers,
        sent: layers,
        bytes_total: transfer.bytes,
        bytes_sent: transfer.bytes,
        ..ReleaseTotals::default()
    };
    let how = match (options.compression, options.level) {
        (Compression::None, _) => "uncompressed".to_owned(),
        (compression, Some(level)) => format!("{compression} level {level}"),
        (compression, None) => compression.to_string(),
    };
    let how = match chosen.reason {
        Some(reason) => format!("{how}: {reason}"),
        None => how,
    };
    let summary = format!(
        "streamed {:.1} MB ({:.1} MB uncompressed; {how}) into the host's docker load while docker save made it: the host held none of the image's {layers} layer(s)",
        transfer.bytes as f64 / 1e6,
        uncompressed as f64 / 1e6
    );
    Ok(ReleaseOutcome {
        mode: TransferMode::Stream,
        release_id,
        image_id: image.id.clone(),
        image_tags: image.tags.clone(),
        engine_version: cold.inventory.engine_version.clone(),
        image_store: cold.inventory.image_store,
        prepare: PrepareStats {
            exported: true,
            compressed_layers: layers,
            compressed_bytes: uncompressed,
            cached_layers: 0,
            // Exporting and compressing ran inside the transfer.
            duration_ms: 0,
        },
        layers: Vec::new(),
        totals,
        summary,
        transfer_duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        load: None,
        deployment: Some(record),
    })
}

/// The zstd level of a stream when the deploy names none: a stream is compressed on the deploy's
/// critical path, for one host, where the layer cache's blobs (level 3) are compressed once for
/// every host. On this project's bench machine level 1 compresses programs and libraries at
/// 150-230 MB/s on one core, level 3 at 87-100 MB/s: level 1 keeps ahead of a 1 Gbit/s link
/// where level 3 would be the slowest stage (docs/PERFORMANCE.md, "A compressible image").
pub(crate) const STREAM_ZSTD_LEVEL: i32 = 1;

/// The largest image sent uncompressed to a receiver on this machine; a larger one (or one whose
/// size Docker does not tell) is compressed, so that it stays under the receiver's
/// `MAX_PACKAGE_SIZE` (5 GiB by default), which counts the bytes of the stream.
pub(crate) const LOCAL_UNCOMPRESSED_MAX: u64 = 4 << 30;

/// How a stream is compressed, and why when it is not as the deploy asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamCompression {
    pub options: CompressionOptions,
    /// Set when the deploy's own options were not taken as they are: for its summary.
    pub reason: Option<&'static str>,
}

/// How a stream is compressed. A deploy that names a level, or another algorithm than zstd, gets
/// exactly that. Otherwise (the default: zstd, no level) a receiver on this machine gets an image
/// of up to [`LOCAL_UNCOMPRESSED_MAX`] uncompressed, since its bytes cross no network and a
/// compressor would only take CPU from that host's own `docker load`; any other stream is zstd
/// at [`STREAM_ZSTD_LEVEL`]. `image_size` is Docker's size of the image.
pub(crate) fn stream_options(
    asked: &CompressionOptions,
    local: bool,
    image_size: Option<u64>,
) -> StreamCompression {
    let mut options = *asked;
    if asked.compression != Compression::Zstd || asked.level.is_some() {
        return StreamCompression {
            options,
            reason: None,
        };
    }
    let small = image_size.is_some_and(|size| size <= LOCAL_UNCOMPRESSED_MAX);
    let reason = match (local, small) {
        (true, true) => {
            options.compression = Compression::None;
            "the receiver is on this machine"
        }
        (true, false) => {
            options.level = Some(STREAM_ZSTD_LEVEL);
            "the receiver is on this machine, but the image is over 4 GiB (or of unknown size)"
        }
        (false, _) => {
            options.level = Some(STREAM_ZSTD_LEVEL);
            "a stream's default level"
        }
    };
    StreamCompression {
        options,
        reason: Some(reason),
    }
}

/// How long [`receiver_is_local`] waits for a name to resolve.
const RESOLVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `url` names this machine: a loopback address (IPv4-mapped too), `localhost`, or a
/// name that resolves to loopback addresses only within [`RESOLVE_TIMEOUT`]. A name that does
/// not resolve in time is not local. A tunnel's local end (`ssh -L`, a port forward) is local by
/// this test although its receiver is not: name a level to compress such a stream.
pub(crate) async fn receiver_is_local(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let port = url.port_or_known_default().unwrap_or(80);
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<_> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().to_canonical().is_loopback())
        }
        _ => false,
    }
}

/// `reader` compressed as `options` say (zstd on the calling thread), read as it is compressed.
fn compress(
    reader: impl tokio::io::AsyncBufRead + Send + 'static,
    options: &CompressionOptions,
) -> Result<Pin<Box<dyn AsyncRead + Send>>, SenderError> {
    let level = options.effective_level()?;
    Ok(match (options.compression, level) {
        (Compression::Gzip, Some(l)) => {
            Box::pin(GzipEncoder::with_quality(reader, Level::Precise(l)))
        }
        (Compression::Zstd, Some(l)) => {
            Box::pin(ZstdEncoder::with_quality(reader, Level::Precise(l)))
        }
        _ => Box::pin(reader),
    })
}

/// A single-host deploy's try at streaming: what [`StreamAttempt::run`] needs of it.
pub(crate) struct StreamAttempt<'a> {
    pub docker: &'a Docker,
    pub cache: &'a LayerCache,
    pub calls: &'a ReleaseCalls<'a>,
    pub request: &'a DeployRequest,
    /// The image, built already if the request asked for a build.
    pub reference: &'a str,
    pub release_id: Uuid,
    pub subject: &'a Subject,
    /// The target's URL, as events name it.
    pub receiver: &'a str,
}

impl StreamAttempt<'_> {
    /// Streams the image when the host is cold ([`cold_target`]) and records the lifecycle
    /// events: `Some` with the deploy's end (success, or a failure after which nothing may be
    /// sent again), `None` when the caller should send the image as layers (the host is not
    /// cold, it could not be told, or the stream did not get through with nothing run).
    pub(crate) async fn run(
        &self,
        progress: Arc<dyn Progress>,
        events: &Lifecycle,
    ) -> Option<Result<ReleaseOutcome, SenderError>> {
        let options = &self.request.package.compression;
        let cold =
            match cold_target(self.docker, self.cache, self.calls, self.reference, options).await {
                Ok(Some(cold)) => cold,
                Ok(None) => return None,
                Err(e) => {
                    // The layer path asks again, and reports what it finds.
                    tracing::debug!(error = %e, "could not tell whether the host is cold");
                    return None;
                }
            };
        let (subject, receiver) = (self.subject, self.receiver);
        let local = receiver_is_local(&self.calls.target.base_url).await;
        let chosen = stream_options(&self.request.package.compression, local, cold.image.size);
        events
            .stream_ready(
                subject,
                &chosen.options,
                &cold.image.id,
                cold.diff_ids.len(),
            )
            .await;
        events
            .transfer_started(subject, receiver, "stream", cold.image.size.unwrap_or(0))
            .await;
        let streamed = stream_deploy(
            self.docker,
            self.calls,
            &cold,
            self.request,
            self.release_id,
            &chosen,
            Arc::clone(&progress),
        )
        .await;
        match streamed {
            Ok(outcome) => {
                events
                    .release_transferred(subject, receiver, &outcome)
                    .await;
                Some(Ok(outcome))
            }
            Err(StreamFailure::Final(error)) => {
                match &error {
                    SenderError::Deployment(record) => {
                        events
                            .deployment_failed(subject, receiver, &error, record)
                            .await
                    }
                    _ => events.transfer_failed(subject, receiver, &error).await,
                }
                Some(Err(error))
            }
            Err(StreamFailure::Fallback(error)) => {
                tracing::warn!(error = %error, "the streamed deploy did not get through; sending the image as layers");
                progress.message(
                    Stage::Upload,
                    &format!("streaming did not get through ({error}); sending layers"),
                );
                events.transfer_failed(subject, receiver, &error).await;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(compression: Compression, level: Option<i32>) -> CompressionOptions {
        CompressionOptions {
            compression,
            level,
            ..CompressionOptions::default()
        }
    }

    #[test]
    fn a_default_stream_is_uncompressed_to_this_machine_and_zstd_level_1_elsewhere() {
        let default = CompressionOptions::default();
        let small = Some(300 << 20);
        let local = stream_options(&default, true, small);
        assert_eq!(
            (local.options.compression, local.options.level),
            (Compression::None, None)
        );
        assert_eq!(local.reason, Some("the receiver is on this machine"));
        let remote = stream_options(&default, false, small).options;
        assert_eq!(
            (remote.compression, remote.level),
            (Compression::Zstd, Some(STREAM_ZSTD_LEVEL))
        );
        // Up to the limit uncompressed; over it, or of unknown size, a local stream is compressed.
        let at_limit = stream_options(&default, true, Some(LOCAL_UNCOMPRESSED_MAX));
        assert_eq!(at_limit.options.compression, Compression::None);
        for size in [Some(LOCAL_UNCOMPRESSED_MAX + 1), None] {
            let big = stream_options(&default, true, size).options;
            assert_eq!(
                (big.compression, big.level),
                (Compression::Zstd, Some(STREAM_ZSTD_LEVEL)),
                "{size:?}"
            );
        }
    }

    #[test]
    fn a_named_level_or_algorithm_is_kept_wherever_the_receiver_is() {
        for local in [true, false] {
            for asked in [
                options(Compression::Zstd, Some(3)),
                options(Compression::Gzip, None),
                options(Compression::Gzip, Some(6)),
                options(Compression::None, None),
            ] {
                let chosen = stream_options(&asked, local, Some(MIB_FOR_TESTS));
                assert_eq!(chosen.options, asked);
                assert_eq!(chosen.reason, None, "taken as asked: no reason to give");
            }
        }
    }

    const MIB_FOR_TESTS: u64 = 1 << 20;

    #[tokio::test]
    async fn loopback_receivers_are_local_and_others_are_not() {
        for (url, local) in [
            ("http://127.0.0.1:8001", true),
            ("http://127.9.8.7:8001/prefix/", true),
            ("http://[::1]:8001", true),
            ("http://[::ffff:127.0.0.1]:8001", true),
            ("http://localhost:8001", true),
            ("http://localhost.:8001", true),
            ("http://LOCALHOST", true),
            ("http://192.168.86.200:8001", false),
            ("http://[::ffff:192.168.86.200]:8001", false),
            ("http://[2001:db8::1]:8001", false),
            ("http://10.0.0.1", false),
        ] {
            let parsed: reqwest::Url = url.parse().expect("test url");
            assert_eq!(receiver_is_local(&parsed).await, local, "{url}");
        }
    }
}
