//! Metrics of the REST service: Prometheus collectors for `GET /metrics`, and the same counts as
//! the `get_metrics` JSON (`GET /api/v1/metrics`).

use std::sync::Mutex;

use deploy_events::EventStats;
use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use serde::Serialize;

use crate::pipeline::ReleaseTotals;

/// Label value of a successful build or transfer; failures are labelled with their error code.
pub(super) const OK: &str = "ok";

/// Every metric the sender exports. Cheap to clone (the collectors are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    stage_seconds: HistogramVec,
    builds: IntCounterVec,
    transfers: IntCounterVec,
    layers: IntCounterVec,
    layer_bytes: IntCounterVec,
    sent_bytes: IntCounter,
    transfers_in_flight: IntGauge,
    events: IntCounterVec,
    /// Serialises the copy of the event sink's counters into `events` at scrape time.
    events_sync: std::sync::Arc<Mutex<()>>,
}

/// The `get_metrics` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MetricsSummary {
    /// Packaging jobs finished (built or existing image).
    pub total_builds: u64,
    /// Of those, successful.
    pub successful_builds: u64,
    /// Of those, failed.
    pub failed_builds: u64,
    /// Transfers to a receiver finished (one per receiver).
    pub total_transfers: u64,
    /// Of those, successful.
    pub successful_transfers: u64,
    /// Of those, failed.
    pub failed_transfers: u64,
    /// Package bytes sent to receivers by successful transfers.
    pub total_bytes_sent: u64,
    /// Transfers under way now.
    pub transfers_in_flight: u64,
    /// Lifecycle events recorded in the outbox (then delivered to Kafka when configured).
    pub events_published: u64,
    /// Lifecycle events that could not even be recorded.
    pub events_failed: u64,
    /// Events acknowledged by Kafka.
    pub events_delivered: u64,
    /// Events recorded and not yet acknowledged by Kafka.
    pub events_pending: u64,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        register_build_and_process(&registry)?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "deploy_sender_stage_duration_seconds",
                "Duration of pipeline stages (build, export, upload)",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["stage"],
        )?;
        let builds = IntCounterVec::new(
            Opts::new(
                "deploy_sender_builds_total",
                "Packaging jobs by result (ok or error code)",
            ),
            &["result"],
        )?;
        let transfers = IntCounterVec::new(
            Opts::new(
                "deploy_sender_transfers_total",
                "Transfers to a receiver by result (ok or error code)",
            ),
            &["result"],
        )?;
        let layers = IntCounterVec::new(
            Opts::new(
                "deploy_sender_layers_total",
                "Layers of layer-aware transfers by what happened: sent, resumed, skipped (present \
                 on the target or already received)",
            ),
            &["result"],
        )?;
        let layer_bytes = IntCounterVec::new(
            Opts::new(
                "deploy_sender_layer_bytes_total",
                "Blob bytes of layer-aware transfers: sent (on the wire), skipped (already on the \
                 target), resumed (held by the receiver from an interrupted transfer)",
            ),
            &["result"],
        )?;
        let sent_bytes = IntCounter::new(
            "deploy_sender_sent_bytes_total",
            "Package bytes sent by successful transfers",
        )?;
        let transfers_in_flight = IntGauge::new(
            "deploy_sender_transfers_in_flight",
            "Transfers to receivers under way",
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "deploy_sender_events_total",
                "Lifecycle events: recorded, delivered (to Kafka), delivery_failed (retried), record_failed",
            ),
            &["result"],
        )?;
        registry.register(Box::new(stage_seconds.clone()))?;
        registry.register(Box::new(builds.clone()))?;
        registry.register(Box::new(transfers.clone()))?;
        registry.register(Box::new(sent_bytes.clone()))?;
        registry.register(Box::new(layers.clone()))?;
        registry.register(Box::new(layer_bytes.clone()))?;
        for result in ["sent", "resumed", "skipped"] {
            layers.with_label_values(&[result]);
            layer_bytes.with_label_values(&[result]);
        }
        registry.register(Box::new(transfers_in_flight.clone()))?;
        registry.register(Box::new(events.clone()))?;
        // Present from the start, so that rates work from the first scrape.
        builds.with_label_values(&[OK]);
        transfers.with_label_values(&[OK]);
        for result in ["recorded", "delivered", "delivery_failed", "record_failed"] {
            events.with_label_values(&[result]);
        }
        Ok(Self {
            registry,
            stage_seconds,
            builds,
            transfers,
            layers,
            layer_bytes,
            sent_bytes,
            transfers_in_flight,
            events,
            events_sync: Default::default(),
        })
    }

    /// Records a stage's duration (`build`, `export`, `upload`).
    pub fn stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(seconds);
    }

    /// Counts a finished packaging job.
    pub fn build(&self, result: &str) {
        self.builds.with_label_values(&[result]).inc();
    }

    /// Counts a finished transfer.
    pub fn transfer(&self, result: &str) {
        self.transfers.with_label_values(&[result]).inc();
    }

    /// Counts bytes sent.
    pub fn sent_bytes(&self, n: u64) {
        self.sent_bytes.inc_by(n);
    }

    /// Counts the layers and blob bytes of a layer-aware transfer.
    pub fn release(&self, totals: &ReleaseTotals) {
        let count = |result: &str, n: usize| {
            self.layers
                .with_label_values(&[result])
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        };
        count("sent", totals.sent);
        count("resumed", totals.resumed);
        count("skipped", totals.present + totals.received);
        let resumed = totals
            .bytes_already_there
            .saturating_sub(totals.bytes_skipped());
        self.layer_bytes
            .with_label_values(&["sent"])
            .inc_by(totals.bytes_sent);
        self.layer_bytes
            .with_label_values(&["skipped"])
            .inc_by(totals.bytes_skipped());
        self.layer_bytes
            .with_label_values(&["resumed"])
            .inc_by(resumed);
    }

    /// The in-flight transfers gauge.
    pub fn transfers_in_flight(&self) -> &IntGauge {
        &self.transfers_in_flight
    }

    /// Brings `deploy_sender_events_total` up to the sink's counters (which only grow).
    fn sync_events(&self, stats: &EventStats, record_failures: u64) {
        let _guard = self
            .events_sync
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (result, value) in [
            ("recorded", stats.recorded),
            ("delivered", stats.delivered),
            ("delivery_failed", stats.delivery_failures),
            ("record_failed", record_failures),
        ] {
            let counter = self.events.with_label_values(&[result]);
            let delta = value.saturating_sub(counter.get());
            if delta > 0 {
                counter.inc_by(delta);
            }
        }
    }

    /// The text exposition, with the event counters as of now.
    pub fn render(&self, stats: &EventStats, record_failures: u64) -> String {
        self.sync_events(stats, record_failures);
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The `get_metrics` summary.
    pub fn summary(&self, stats: &EventStats, record_failures: u64) -> MetricsSummary {
        let (successful_builds, failed_builds) = ok_and_failed(&self.builds);
        let (successful_transfers, failed_transfers) = ok_and_failed(&self.transfers);
        MetricsSummary {
            total_builds: successful_builds + failed_builds,
            successful_builds,
            failed_builds,
            total_transfers: successful_transfers + failed_transfers,
            successful_transfers,
            failed_transfers,
            total_bytes_sent: self.sent_bytes.get(),
            transfers_in_flight: u64::try_from(self.transfers_in_flight.get()).unwrap_or(0),
            events_published: stats.recorded,
            events_failed: record_failures,
            events_delivered: stats.delivered,
            events_pending: stats.pending,
        }
    }
}

/// Sums a `{result}` counter into (ok, everything else).
fn ok_and_failed(counter: &IntCounterVec) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    for family in counter.collect() {
        for metric in family.get_metric() {
            let value = metric.get_counter().value() as u64;
            let is_ok = metric
                .get_label()
                .iter()
                .any(|l| l.name() == "result" && l.value() == OK);
            if is_ok {
                ok += value;
            } else {
                failed += value;
            }
        }
    }
    (ok, failed)
}

/// `deploy_sender_build_info{version, protocol_version} 1` (which build is running, for joins and
/// upgrade dashboards) and the process metrics: `process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_virtual_memory_bytes`, `process_start_time_seconds` (read from /proc on Linux).
fn register_build_and_process(registry: &Registry) -> prometheus::Result<()> {
    let info = IntGauge::with_opts(
        Opts::new(
            "deploy_sender_build_info",
            "Always 1; the labels say which build of deploy-sender is running",
        )
        .const_label("version", env!("CARGO_PKG_VERSION"))
        .const_label("protocol_version", deploy_protocol::PROTOCOL_VERSION),
    )?;
    info.set(1);
    registry.register(Box::new(info))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))
}
