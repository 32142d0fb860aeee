//! Cold deploys, streamed: to a host whose engine holds none of the image's layers, layer reuse
//! saves nothing, and splitting the image into cached blobs before the first byte is sent only
//! adds time. So `docker save` is compressed as Docker writes it and streamed in one signed
//! request into the receiver's `docker load` (`/deployment/stream`), which Docker reads while the
//! sender is still exporting: Docker's own `save | load` pipe, plus compression and the network.
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
pub(crate) async fn cold_target(
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
pub(crate) async fn stream_deploy(
    docker: &Docker,
    calls: &ReleaseCalls<'_>,
    cold: &ColdTarget,
    request: &DeployRequest,
    release_id: Uuid,
    progress: Arc<dyn Progress>,
) -> Result<ReleaseOutcome, StreamFailure> {
    let started = Instant::now();
    let image = &cold.image;
    // One thread (see `compress`): Docker's load is slower than one zstd thread, and zstd's
    // workers take CPU from the two engines (docs/PERFORMANCE.md, "Cold hosts streamed").
    let options = request.package.compression;
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
    let summary = format!(
        "streamed {:.1} MB ({:.1} MB uncompressed) into the host's docker load while docker save made it: the host held none of the image's {layers} layer(s)",
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
