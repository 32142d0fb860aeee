//! Sending an image as a release (protocol v2): its layers come from the layer cache (exported
//! and compressed only when missing there), the receiver says which chain IDs its engine holds,
//! the signed release manifest is registered, only the blobs the receiver lacks travel (each
//! resumable from the receiver's durable offset), then the receiver loads or deploys it. A layer
//! that vanished from the engine between inventory and load (`LAYERS_MISSING`) is sent and the
//! load retried once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use deploy_protocol::api::{DeploymentRecord, DeploymentStatus};
use deploy_protocol::release::{
    BlobRef, ImageStore, LayerEntry, LayerState, ReleaseManifest, ReleaseStatus, Sha256Digest,
};
use deploy_protocol::{Checksum, DeploymentSpec};
use futures::StreamExt as _;
use serde::Serialize;
use uuid::Uuid;

use super::build::build_image;
use super::deploy::{DeployFailure, DeployRequest};
use super::events::{Lifecycle, Subject};
use super::layers::{prepare_image, LayerCache, PrepareStats, PreparedImage, PreparedLayer};
use super::package::{ImageSource, PackageRequest};
use crate::client::{BlobOutcome, FinishError, ReleaseCalls};
use crate::pipeline::progress::{Progress, ProgressExt, Stage};
use crate::pipeline::store::now_rfc3339;
use crate::SenderError;

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

/// What happened to one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerFate {
    /// The target's engine holds it: nothing sent.
    Present,
    /// The receiver already held the whole blob (an earlier transfer): nothing sent.
    Received,
    /// Sent whole.
    Sent,
    /// Sent from an offset the receiver already held, or after an interruption.
    Resumed,
}

impl LayerFate {
    /// As shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerFate::Present => "present on target",
            LayerFate::Received => "already received",
            LayerFate::Sent => "sent",
            LayerFate::Resumed => "resumed",
        }
    }
}

/// One layer of the release, as the transfer saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerReport {
    /// The layer's diffID.
    pub diff_id: String,
    /// BLAKE3 of its blob.
    pub blake3: String,
    /// Blob size in bytes.
    pub size: u64,
    /// What happened to it.
    pub fate: LayerFate,
    /// Blob bytes put on the wire for it.
    pub bytes_sent: u64,
    /// The receiver's offset when sending started (> 0: resumed from there).
    pub resumed_from: u64,
    /// What the receiver held of the blob before this transfer began (a partial left by an
    /// earlier one): the part of it "already there", unlike offsets this transfer reached itself
    /// before an interruption.
    #[serde(skip)]
    pub held_before: u64,
}

/// Totals of a release transfer: "sent X of Y (Z % already there)".
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReleaseTotals {
    /// Layers in the image (distinct blobs).
    pub layers: usize,
    /// Layers the target's engine held.
    pub present: usize,
    /// Layers the receiver held as complete blobs already.
    pub received: usize,
    /// Layers sent whole.
    pub sent: usize,
    /// Layers resumed.
    pub resumed: usize,
    /// Compressed bytes of all blobs.
    pub bytes_total: u64,
    /// Blob bytes put on the wire.
    pub bytes_sent: u64,
    /// Blob bytes the target already had (present layers, received blobs, resumed offsets).
    pub bytes_already_there: u64,
    /// `bytes_already_there / bytes_total` in percent.
    pub percent_already_there: f64,
    /// Blob bytes of layers not sent at all (present on the target or received earlier).
    #[serde(skip)]
    pub skipped_bytes: u64,
}

impl ReleaseTotals {
    /// Blob bytes of layers not sent at all (present on the target or received earlier).
    pub fn bytes_skipped(&self) -> u64 {
        self.skipped_bytes
    }

    /// "sent 12.3 MB of 80.1 MB (84.6 % already there)".
    pub fn summary(&self) -> String {
        format!(
            "sent {} of {} ({:.1} % already there)",
            human(self.bytes_sent),
            human(self.bytes_total),
            self.percent_already_there
        )
    }
}

fn human(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// How a release's image travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// Protocol v2: only the layers the target lacked, as blobs from the layer cache.
    Layers,
    /// A host holding none of the image's layers: `docker save` compressed and streamed into its
    /// `docker load` as it was made (`/deployment/stream`); no layer reports.
    Stream,
}

/// A release delivered: per layer what happened, the totals, and the receiver's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleaseOutcome {
    /// How the image travelled: as layers, or streamed whole to a cold host.
    pub mode: TransferMode,
    /// The release id.
    pub release_id: Uuid,
    /// The image id (the build host's; the receiver checks the loaded image has it).
    pub image_id: String,
    /// Tags the release carries.
    pub image_tags: Vec<String>,
    /// The receiver's engine version.
    pub engine_version: String,
    /// The receiver's image store.
    pub image_store: ImageStore,
    /// What preparing the layers cost on this host.
    pub prepare: PrepareStats,
    /// Per layer, bottom first (each distinct blob once).
    pub layers: Vec<LayerReport>,
    /// Totals.
    pub totals: ReleaseTotals,
    /// "sent X of Y (Z % already there)".
    pub summary: String,
    /// Milliseconds from the inventory to the receiver's final answer.
    pub transfer_duration_ms: u64,
    /// The receiver's `LoadResponse`, for a load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<serde_json::Value>,
    /// The receiver's record, for a deploy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentRecord>,
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

fn initial_reports(status: &ReleaseStatus) -> Vec<LayerReport> {
    let mut seen = std::collections::HashSet::new();
    status
        .layers
        .iter()
        .filter(|l| seen.insert(l.blake3))
        .map(|l| {
            // A partial the receiver held when the transfer began: sending resumes from there,
            // and it was already there.
            let held = if l.state == LayerState::Partial {
                l.offset
            } else {
                0
            };
            LayerReport {
                diff_id: l.diff_id.to_string(),
                blake3: l.blake3.to_hex(),
                size: l.size,
                fate: match l.state {
                    LayerState::Present => LayerFate::Present,
                    LayerState::Received => LayerFate::Received,
                    LayerState::Partial => LayerFate::Resumed,
                    LayerState::Missing => LayerFate::Sent,
                },
                bytes_sent: 0,
                resumed_from: held,
                held_before: held,
            }
        })
        .collect()
}

fn record(report: &mut LayerReport, outcome: &BlobOutcome) {
    report.bytes_sent += outcome.sent;
    report.resumed_from = report.resumed_from.max(outcome.resumed_from);
    report.fate = if outcome.resumed_from > 0 || outcome.interruptions > 0 {
        LayerFate::Resumed
    } else {
        LayerFate::Sent
    };
}

fn layer_line(report: &LayerReport) -> String {
    let short = report
        .diff_id
        .trim_start_matches("sha256:")
        .get(..12)
        .unwrap_or_default()
        .to_owned();
    match report.fate {
        LayerFate::Resumed if report.resumed_from > 0 => format!(
            "layer {short} {}: resumed from {}",
            human(report.size),
            human(report.resumed_from)
        ),
        fate => format!("layer {short} {}: {}", human(report.size), fate.as_str()),
    }
}

fn totals(reports: &[LayerReport]) -> ReleaseTotals {
    let mut t = ReleaseTotals {
        layers: reports.len(),
        ..ReleaseTotals::default()
    };
    for r in reports {
        t.bytes_total += r.size;
        t.bytes_sent += r.bytes_sent;
        match r.fate {
            LayerFate::Present => t.present += 1,
            LayerFate::Received => t.received += 1,
            LayerFate::Sent => t.sent += 1,
            LayerFate::Resumed => t.resumed += 1,
        }
        if matches!(r.fate, LayerFate::Present | LayerFate::Received) {
            t.skipped_bytes += r.size;
        }
        t.bytes_already_there += match r.fate {
            LayerFate::Present | LayerFate::Received => r.size,
            LayerFate::Resumed | LayerFate::Sent => r.held_before,
        };
    }
    t.percent_already_there = if t.bytes_total > 0 {
        100.0 * t.bytes_already_there as f64 / t.bytes_total as f64
    } else {
        100.0
    };
    t
}

/// Builds the image of `request` if asked, prepares its layers in `cache` and deploys it to
/// `target` as a release (only the layers the target lacks travel). The layer-aware counterpart
/// of [`deploy`](super::deploy::deploy), recording the same lifecycle events (BUILD_*, TRANSFER_*,
/// DEPLOYMENT_FAILED) keyed by the release id; a failure carries no package (there is none).
pub async fn deploy_release(
    docker: &bollard::Docker,
    cache: &LayerCache,
    calls: ReleaseCalls<'_>,
    request: &DeployRequest,
    progress: Arc<dyn Progress>,
    events: &Lifecycle,
) -> Result<ReleaseOutcome, DeployFailure> {
    let fail = |error| DeployFailure {
        package: None,
        error,
    };
    let mut check = request.deployment.clone();
    check.image = None;
    check
        .validate()
        .map_err(|e| fail(SenderError::Validation(e)))?;
    let release_id = Uuid::new_v4();
    let subject = Subject {
        package_id: Some(release_id),
        correlation_id: request.correlation_id.clone(),
        container_name: Some(request.deployment.container_name.clone()),
        image_tag: Some(request.package.source.reference().to_owned()),
    };
    events.build_started(&subject, &request.package).await;
    let reference = match &request.package.source {
        ImageSource::Build(spec) => {
            let built = build_image(docker, spec, &*progress).await;
            if let Err(e) = &built {
                events
                    .layers_prepared(&subject, &request.package, Err(e))
                    .await;
            }
            built.map_err(fail)?.tag
        }
        ImageSource::Existing(reference) => reference.clone(),
    };
    let receiver = calls.target.base_url.to_string();

    // A host that holds none of the image's layers, of an image the layer cache lacks: stream it.
    if calls.stream_cold {
        let attempt = super::stream::StreamAttempt {
            docker,
            cache,
            calls: &calls,
            request,
            reference: &reference,
            release_id,
            subject: &subject,
            receiver: &receiver,
        };
        if let Some(done) = attempt.run(Arc::clone(&progress), events).await {
            return done.map_err(fail);
        }
    }

    let prepared = prepare_image(
        docker,
        cache,
        &reference,
        &request.package.compression,
        Arc::clone(&progress),
    )
    .await;
    events
        .layers_prepared(&subject, &request.package, prepared.as_ref())
        .await;
    let image = prepared.map_err(fail)?;

    events
        .transfer_started(&subject, &receiver, "release", image.total_blob_bytes())
        .await;
    let action = ReleaseAction::Deploy(Box::new(request.deployment.clone()));
    let mut manifest = release_manifest(&image, &action).map_err(fail)?;
    manifest.release_id = release_id;
    let sent = send_manifest(calls, &image, manifest, &action, progress).await;
    match &sent {
        Ok(outcome) => {
            events
                .release_transferred(&subject, &receiver, outcome)
                .await
        }
        Err(error @ SenderError::Deployment(record)) => {
            // Every layer reached the receiver and was verified; the deployment failed.
            events
                .deployment_failed(&subject, &receiver, error, record)
                .await;
        }
        Err(error) => events.transfer_failed(&subject, &receiver, error).await,
    }
    sent.map_err(fail)
}

/// Builds (for [`ImageSource::Build`]) or takes the image, and prepares its layers.
pub async fn prepare_source(
    docker: &bollard::Docker,
    cache: &LayerCache,
    request: &PackageRequest,
    progress: Arc<dyn Progress>,
) -> Result<PreparedImage, SenderError> {
    let reference = match &request.source {
        ImageSource::Build(spec) => build_image(docker, spec, &*progress).await?.tag,
        ImageSource::Existing(reference) => reference.clone(),
    };
    prepare_image(docker, cache, &reference, &request.compression, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(size: u64, fate: LayerFate, bytes_sent: u64, resumed_from: u64) -> LayerReport {
        LayerReport {
            diff_id: format!("sha256:{}", "a".repeat(64)),
            blake3: "b".repeat(64),
            size,
            fate,
            bytes_sent,
            resumed_from,
            // As from the release's status: what the receiver held when the transfer began.
            held_before: resumed_from,
        }
    }

    #[test]
    fn totals_count_what_was_already_there() {
        let t = totals(&[
            report(600, LayerFate::Present, 0, 0),
            report(100, LayerFate::Received, 0, 0),
            report(200, LayerFate::Resumed, 150, 50),
            report(100, LayerFate::Sent, 100, 0),
        ]);
        assert_eq!(
            (t.layers, t.present, t.received, t.resumed, t.sent),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(t.bytes_total, 1000);
        assert_eq!(t.bytes_sent, 250);
        assert_eq!(t.bytes_already_there, 750);
        assert_eq!(t.bytes_skipped(), 700);
        assert_eq!(t.summary(), "sent 0.0 MB of 0.0 MB (75.0 % already there)");
    }

    #[test]
    fn a_blob_is_resumed_when_it_started_past_zero_or_was_interrupted() {
        let mut r = report(100, LayerFate::Sent, 0, 0);
        record(&mut r, &BlobOutcome::default());
        assert_eq!(r.fate, LayerFate::Sent);
        record(
            &mut r,
            &BlobOutcome {
                sent: 40,
                resumed_from: 60,
                interruptions: 1,
            },
        );
        assert_eq!(
            (r.fate, r.resumed_from, r.bytes_sent),
            (LayerFate::Resumed, 60, 40)
        );
        assert!(layer_line(&r).contains("resumed from"));
    }

    #[test]
    fn offsets_this_transfer_reached_itself_are_not_already_there() {
        // Missing at the start, cut at 80 of 100 bytes, finished from there.
        let mut r = report(100, LayerFate::Sent, 0, 0);
        record(
            &mut r,
            &BlobOutcome {
                sent: 100,
                resumed_from: 80,
                interruptions: 1,
            },
        );
        assert_eq!((r.fate, r.resumed_from), (LayerFate::Resumed, 80));
        let t = totals(&[r]);
        assert_eq!(t.bytes_already_there, 0, "all of it came in this transfer");
        assert!(
            t.summary().ends_with("(0.0 % already there)"),
            "{}",
            t.summary()
        );
    }
}
