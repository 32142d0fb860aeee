//! What a release transfer reports: per layer what happened to it, the totals ("sent X of Y (Z %
//! already there)"), and the outcome handed back to the CLI, the service and the events.

use deploy_protocol::api::DeploymentRecord;
use deploy_protocol::release::{ImageStore, LayerState, ReleaseStatus};
use serde::Serialize;
use uuid::Uuid;

use super::super::layers::PrepareStats;
use crate::client::BlobOutcome;

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

pub(super) fn initial_reports(status: &ReleaseStatus) -> Vec<LayerReport> {
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

pub(super) fn record(report: &mut LayerReport, outcome: &BlobOutcome) {
    report.bytes_sent += outcome.sent;
    report.resumed_from = report.resumed_from.max(outcome.resumed_from);
    report.fate = if outcome.resumed_from > 0 || outcome.interruptions > 0 {
        LayerFate::Resumed
    } else {
        LayerFate::Sent
    };
}

pub(super) fn layer_line(report: &LayerReport) -> String {
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

pub(super) fn totals(reports: &[LayerReport]) -> ReleaseTotals {
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
