//! Sending an image as a release (protocol v2): its layers come from the layer cache (exported
//! and compressed only when missing there), the receiver says which chain IDs its engine holds,
//! the signed release manifest is registered, only the blobs the receiver lacks travel (each
//! resumable from the receiver's durable offset), then the receiver loads or deploys it. A layer
//! that vanished from the engine between inventory and load (`LAYERS_MISSING`) is sent and the
//! load retried once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use deploy_protocol::api::DeploymentStatus;
use deploy_protocol::release::{BlobRef, LayerEntry, ReleaseManifest, Sha256Digest};
use deploy_protocol::{Checksum, DeploymentSpec};
use futures::StreamExt as _;
use uuid::Uuid;

use super::layers::{PreparedImage, PreparedLayer};
use crate::client::{BlobOutcome, FinishError, ReleaseCalls};
use crate::pipeline::progress::{Progress, ProgressExt, Stage};
use crate::pipeline::store::now_rfc3339;
use crate::SenderError;

mod deploy;
mod report;

pub use deploy::{deploy_release, prepare_source};
use report::{initial_reports, layer_line, record, totals};
pub use report::{LayerFate, LayerReport, ReleaseOutcome, ReleaseTotals, TransferMode};

/// What the receiver does with the release once every layer is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseAction {
    /// Only make the receiver hold every blob (the v2 counterpart of `/deployment/upload`).
    Store,
    /// `docker load` only.
    Load,
    /// Load, then deploy, health-check and roll back like `/deployment/full`.
    Deploy(Box<DeploymentSpec>),
}
fn digest(s: &str) -> Result<Sha256Digest, SenderError> {
    s.parse()
        .map_err(|e| SenderError::Internal(format!("bad digest {s:?}: {e}")))
}

/// The signed manifest of `image` for `action`.
pub fn release_manifest(
    image: &PreparedImage,
    action: &ReleaseAction,
) -> Result<ReleaseManifest, SenderError> {
    let mut layers = Vec::with_capacity(image.layers.len());
    for layer in &image.layers {
        layers.push(LayerEntry {
            diff_id: digest(&layer.diff_id)?,
            blob: blob_ref(layer),
            uncompressed_size: Some(layer.blob.uncompressed_size),
        });
    }
    let deployment = match action {
        ReleaseAction::Store | ReleaseAction::Load => None,
        ReleaseAction::Deploy(spec) => {
            let mut spec = (**spec).clone();
            if spec.image.is_none() {
                spec.image = Some(
                    image
                        .tags
                        .first()
                        .cloned()
                        .unwrap_or_else(|| image.image_id.clone()),
                );
            }
            spec.validate().map_err(SenderError::Validation)?;
            Some(spec)
        }
    };
    let manifest = ReleaseManifest {
        release_id: Uuid::new_v4(),
        image_id: digest(&image.image_id)?,
        config: image.config.clone(),
        layers,
        image_tags: image.tags.clone(),
        created_at: Some(now_rfc3339()),
        deployment,
    };
    manifest
        .validate()
        .map_err(|e| SenderError::Validation(e.to_string()))?;
    Ok(manifest)
}

fn blob_ref(layer: &PreparedLayer) -> BlobRef {
    BlobRef {
        blake3: layer.blob.blake3,
        size: layer.blob.size,
        compression: layer.blob.compression,
    }
}

/// Sends `image` to the receiver of `calls` and has it loaded or deployed (see the module
/// comment). Progress: [`Stage::Upload`] with bytes sent of bytes to send and a line per layer,
/// then [`Stage::Deploy`] while the receiver loads (and deploys).
pub async fn send_release(
    calls: ReleaseCalls<'_>,
    image: &PreparedImage,
    action: &ReleaseAction,
    progress: Arc<dyn Progress>,
) -> Result<ReleaseOutcome, SenderError> {
    let manifest = release_manifest(image, action)?;
    send_manifest(calls, image, manifest, action, progress).await
}

/// [`send_release`] with the signed manifest already made by [`release_manifest`] for `action`
/// (its release id chosen, or the release registered already: registering it again is a no-op).
pub async fn send_manifest(
    calls: ReleaseCalls<'_>,
    image: &PreparedImage,
    manifest: ReleaseManifest,
    action: &ReleaseAction,
    progress: Arc<dyn Progress>,
) -> Result<ReleaseOutcome, SenderError> {
    let started = Instant::now();
    let inventory = calls.inventory(manifest.chain_ids()).await?;
    let status = calls.register(&manifest).await?;
    let by_blake3: HashMap<_, _> = image.layers.iter().map(|l| (l.blob.blake3, l)).collect();

    let reports = std::sync::Mutex::new(initial_reports(&status));
    let to_send: u64 = status
        .blobs_to_send()
        .iter()
        .map(|l| l.size - l.offset.min(l.size))
        .sum();
    progress.advance(Stage::Upload, 0, Some(to_send));
    for report in reports
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|r| r.fate != LayerFate::Sent)
    {
        progress.message(Stage::Upload, &layer_line(report));
    }
    let shown = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let uploads = async {
        // Bottom layer first; up to `blob_connections` blobs at once, each on its own connection.
        let upload = Upload {
            progress: &progress,
            shown: &shown,
            to_send,
        };
        let mut queue = status.blobs_to_send().into_iter();
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < calls.blob_connections.max(1) {
                let Some(layer) = queue.next() else { break };
                let prepared = by_blake3.get(&layer.blake3).copied().ok_or_else(|| {
                    SenderError::Internal(format!(
                        "the receiver asked for unknown blob {}",
                        layer.blake3
                    ))
                })?;
                running.push(send_one(&calls, prepared, layer.offset, &upload));
            }
            let Some(sent) = running.next().await else {
                break;
            };
            let (blake3, outcome) = sent?;
            if let Some(report) = reports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter_mut()
                .find(|r| r.blake3 == blake3.to_hex())
            {
                record(report, &outcome);
                progress.message(Stage::Upload, &layer_line(report));
            }
        }
        progress.finish(
            Stage::Upload,
            shown.load(std::sync::atomic::Ordering::Relaxed),
        );
        Ok::<(), SenderError>(())
    };
    let finish = |await_blobs: bool| async move {
        match action {
            ReleaseAction::Store => Ok((None, None)),
            ReleaseAction::Load => calls
                .load(manifest.release_id, await_blobs)
                .await
                .map(|l| (Some(l), None)),
            ReleaseAction::Deploy(_) => calls
                .deploy(manifest.release_id, await_blobs)
                .await
                .map(|d| (None, Some(d))),
        }
    };

    // The load overlaps the upload: the receiver reads each blob as it arrives (`await_blobs`),
    // so Docker has the layers as soon as their last byte is checked.
    let mut pending = None;
    if *action != ReleaseAction::Store && !status.blobs_to_send().is_empty() && calls.await_blobs {
        progress.message(
            Stage::Deploy,
            "receiver: assemble, verify, load as the blobs arrive",
        );
        let uploads = uploads;
        let finish = finish(true);
        tokio::pin!(uploads, finish);
        let mut uploaded = false;
        while pending.is_none() || !uploaded {
            tokio::select! {
                sent = &mut uploads, if !uploaded => {
                    match (sent, &pending) {
                        (Ok(()), _) => {
                            progress.message(Stage::Deploy, "receiver: load, deploy, health check");
                        }
                        // The receiver loaded (or deployed) the release: it had every blob,
                        // checked; what failed was only an answer to one of the uploads.
                        (Err(e), Some(Ok(_))) => tracing::warn!(
                            error = %e,
                            "a blob upload reported an error after the receiver had loaded the release"
                        ),
                        // A failed upload ends the load too (its request is dropped).
                        (Err(e), _) => {
                            progress.finish(Stage::Deploy, 0);
                            return Err(e);
                        }
                    }
                    uploaded = true;
                }
                done = &mut finish, if pending.is_none() => match done {
                    Err(FinishError::Other(e)) => {
                        progress.finish(Stage::Deploy, 0);
                        return Err(e);
                    }
                    done => pending = Some(done),
                },
            }
        }
    } else {
        uploads.await?;
    }
    let mut reports = reports
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

    let mut retried = false;
    let (load, deployment) = loop {
        if *action == ReleaseAction::Store {
            break (None, None);
        }
        let result = match pending.take() {
            Some(done) => done,
            None => {
                progress.message(Stage::Deploy, "receiver: assemble, verify, load");
                finish(false).await
            }
        };
        match result {
            Ok(done) => break done,
            Err(FinishError::LayersMissing(missing)) if !retried => {
                retried = true;
                tracing::warn!(
                    ?missing,
                    "layers vanished from the target since the inventory; sending them"
                );
                for diff_id in missing {
                    let text = diff_id.to_string();
                    let prepared =
                        image
                            .layers
                            .iter()
                            .find(|l| l.diff_id == text)
                            .ok_or_else(|| {
                                SenderError::Internal(format!(
                                    "the receiver asked for unknown layer {text}"
                                ))
                            })?;
                    let offset = calls.blob_offset(&blob_ref(prepared)).await?;
                    let upload = Upload {
                        progress: &progress,
                        shown: &shown,
                        to_send,
                    };
                    let (_, outcome) = send_one(&calls, prepared, offset, &upload).await?;
                    if let Some(report) = reports.iter_mut().find(|r| r.diff_id == text) {
                        if matches!(report.fate, LayerFate::Present | LayerFate::Received) {
                            // Counted as the engine's at the start: what the receiver held of
                            // its blob now is what was there before this sending.
                            report.held_before = offset;
                        }
                        record(report, &outcome);
                        progress.message(Stage::Upload, &layer_line(report));
                    }
                }
            }
            Err(e) => {
                progress.finish(Stage::Deploy, 0);
                return Err(e.into_sender());
            }
        }
    };
    progress.finish(Stage::Deploy, 0);
    if let Some(record) = &deployment {
        if record.status != DeploymentStatus::Succeeded {
            return Err(SenderError::Deployment(Box::new(record.clone())));
        }
    }
    let totals = totals(&reports);
    let summary = totals.summary();
    progress.message(Stage::Upload, &summary);
    Ok(ReleaseOutcome {
        mode: TransferMode::Layers,
        release_id: manifest.release_id,
        image_id: image.image_id.clone(),
        image_tags: image.tags.clone(),
        engine_version: inventory.engine_version,
        image_store: inventory.image_store,
        prepare: image.stats.clone(),
        layers: reports,
        totals,
        summary,
        transfer_duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        load,
        deployment,
    })
}

/// What the uploads of one release share, for their progress.
struct Upload<'a> {
    progress: &'a Arc<dyn Progress>,
    /// Blob bytes sent so far, across the uploads running at once: each blob adds its size less
    /// the offset it started from, as it moves forward (what the receiver already held is not
    /// counted, nor bytes sent again after an interruption).
    shown: &'a Arc<std::sync::atomic::AtomicU64>,
    to_send: u64,
}

async fn send_one(
    calls: &ReleaseCalls<'_>,
    layer: &PreparedLayer,
    offset: u64,
    upload: &Upload<'_>,
) -> Result<(Checksum, BlobOutcome), SenderError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let reporter = Arc::clone(upload.progress);
    let shown = Arc::clone(upload.shown);
    let to_send = upload.to_send;
    // Each blob adds what it moved past the furthest point it reported (bytes sent again after
    // an interruption are not counted twice).
    let last = Arc::new(AtomicU64::new(offset));
    let reached_before = Arc::clone(&last);
    let on_progress = move |reached: u64| {
        let before = reached_before.fetch_max(reached, Ordering::Relaxed);
        let done = shown.fetch_add(reached.saturating_sub(before), Ordering::Relaxed)
            + reached.saturating_sub(before);
        reporter.advance(Stage::Upload, done, Some(to_send.max(done)));
    };
    let outcome = calls
        .send_blob(&blob_ref(layer), &layer.blob.path, offset, &on_progress)
        .await?;
    let rest = layer.blob.size.saturating_sub(last.load(Ordering::Relaxed));
    upload.shown.fetch_add(rest, Ordering::Relaxed);
    Ok((layer.blob.blake3, outcome))
}
