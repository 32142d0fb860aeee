//! Prometheus metrics of the receiver, served at `GET /metrics` in the text format. Names follow
//! the Prometheus conventions: `deploy_receiver_` prefix, `_total` counters, `_seconds` and
//! `_bytes` units, low-cardinality labels (stage, status, error code; never ids).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use deploy_events::EventStats;
use deploy_protocol::ErrorCode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::state::AppState;

/// Every metric the receiver exports. Cheap to clone (the collectors are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    uploads: IntCounterVec,
    received_bytes: IntCounter,
    auth_refused: IntCounterVec,
    stage_seconds: HistogramVec,
    stages: IntCounterVec,
    deployments: IntCounterVec,
    rollbacks: IntCounter,
    errors: IntCounterVec,
    uploads_in_flight: IntGauge,
    event_record_failures: IntCounter,
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> prometheus::Result<C> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
}

impl Metrics {
    /// Registers all metrics in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        register_build_and_process(&registry)?;
        let r = &registry;
        Ok(Self {
            uploads: counter_vec(
                r,
                "deploy_receiver_uploads_total",
                "Package uploads (/deployment/upload and /deployment/full) by result: ok or the error code",
                &["result"],
            )?,
            received_bytes: register(
                r,
                IntCounter::new(
                    "deploy_receiver_received_bytes_total",
                    "Package bytes received by uploads",
                )?,
            )?,
            auth_refused: counter_vec(
                r,
                "deploy_receiver_auth_refused_total",
                "Requests refused by the allowlist or the signature check, by reason",
                &["reason"],
            )?,
            stage_seconds: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "deploy_receiver_stage_duration_seconds",
                        "Duration of pipeline stages (upload, verify, load, start, health, rollback, cleanup), of deployments and of standalone uploads and loads",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                    ]),
                    &["stage"],
                )?,
            )?,
            stages: counter_vec(
                r,
                "deploy_receiver_stages_total",
                "Finished stages of deployments by stage and outcome (ok, failed, skipped)",
                &["stage", "outcome"],
            )?,
            deployments: counter_vec(
                r,
                "deploy_receiver_deployments_total",
                "Finished deployments by status (succeeded, rolled_back, failed)",
                &["status"],
            )?,
            rollbacks: register(
                r,
                IntCounter::new(
                    "deploy_receiver_rollbacks_total",
                    "Deployments rolled back to the previous container",
                )?,
            )?,
            errors: counter_vec(
                r,
                "deploy_receiver_errors_total",
                "Error responses by error code",
                &["code"],
            )?,
            uploads_in_flight: register(
                r,
                IntGauge::new(
                    "deploy_receiver_uploads_in_flight",
                    "Uploads being received now",
                )?,
            )?,
            event_record_failures: register(
                r,
                IntCounter::new(
                    "deploy_receiver_event_record_failures_total",
                    "Lifecycle events that could not be recorded in the outbox (lost; the deployment went on)",
                )?,
            )?,
            registry,
        })
    }

    /// Adds a collector (e.g. [`EventStatsCollector`]) to this registry.
    pub fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Counts an upload's outcome.
    pub fn upload(&self, result: &str) {
        self.uploads.with_label_values(&[result]).inc();
    }

    /// Counts received package bytes.
    pub fn received_bytes(&self, n: u64) {
        self.received_bytes.inc_by(n);
    }

    /// Counts a refused request.
    pub fn auth_refused(&self, reason: &str) {
        self.auth_refused.with_label_values(&[reason]).inc();
    }

    /// Records a stage's duration.
    pub fn stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds
            .with_label_values(&[stage])
            .observe(seconds);
    }

    /// Counts a finished stage by outcome (`ok`, `failed`).
    pub fn stage_finished(&self, stage: &str, outcome: &str) {
        self.stages.with_label_values(&[stage, outcome]).inc();
    }

    /// Counts a finished deployment.
    pub fn deployment(&self, status: &str) {
        self.deployments.with_label_values(&[status]).inc();
    }

    /// Counts a rollback.
    pub fn rollback(&self) {
        self.rollbacks.inc();
    }

    /// Counts an error response.
    pub fn error(&self, code: &str) {
        self.errors.with_label_values(&[code]).inc();
    }

    /// Counts a lifecycle event that could not be recorded.
    pub fn event_record_failure(&self) {
        self.event_record_failures.inc();
    }

    /// The in-flight uploads gauge.
    pub fn uploads_in_flight(&self) -> &IntGauge {
        &self.uploads_in_flight
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `deploy_receiver_build_info{version, protocol_version} 1` (which build is running, for joins and
/// upgrade dashboards) and the process metrics: `process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_virtual_memory_bytes`, `process_start_time_seconds` (read from /proc on Linux).
fn register_build_and_process(registry: &Registry) -> prometheus::Result<()> {
    let info = IntGauge::with_opts(
        Opts::new(
            "deploy_receiver_build_info",
            "Always 1; the labels say which build of deploy-receiver is running",
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

/// Middleware: counts every error response by its code. The one place that sees them all:
/// [`crate::error::ReceiverError`]'s `IntoResponse` puts the code in the response's extensions,
/// whichever handler, extractor or middleware the error came from.
pub async fn count_errors(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        state.metrics().error(code.as_str());
    }
    response
}

/// Exports the event sink's counters, read at scrape time: events recorded, delivered to Kafka,
/// failed delivery attempts, and events waiting for the broker.
pub struct EventStatsCollector {
    stats: Box<dyn Fn() -> EventStats + Send + Sync>,
    recorded: IntCounter,
    delivered: IntCounter,
    delivery_failures: IntCounter,
    pending: IntGauge,
}

impl EventStatsCollector {
    /// A collector reading `stats` at every scrape.
    pub fn new(stats: impl Fn() -> EventStats + Send + Sync + 'static) -> prometheus::Result<Self> {
        Ok(Self {
            stats: Box::new(stats),
            recorded: IntCounter::new(
                "deploy_receiver_events_recorded_total",
                "Lifecycle events durably recorded in the outbox",
            )?,
            delivered: IntCounter::new(
                "deploy_receiver_events_delivered_total",
                "Lifecycle events acknowledged by Kafka",
            )?,
            delivery_failures: IntCounter::new(
                "deploy_receiver_event_delivery_failures_total",
                "Failed attempts to deliver an event to Kafka (each is retried from the outbox)",
            )?,
            pending: IntGauge::new(
                "deploy_receiver_events_pending",
                "Recorded lifecycle events not yet acknowledged by Kafka",
            )?,
        })
    }
}

impl Collector for EventStatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        [
            self.recorded.desc(),
            self.delivered.desc(),
            self.delivery_failures.desc(),
            self.pending.desc(),
        ]
        .concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let stats = (self.stats)();
        // The sink's counters only grow: catch ours up to them.
        for (counter, value) in [
            (&self.recorded, stats.recorded),
            (&self.delivered, stats.delivered),
            (&self.delivery_failures, stats.delivery_failures),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        self.pending
            .set(i64::try_from(stats.pending).unwrap_or(i64::MAX));
        [
            self.recorded.collect(),
            self.delivered.collect(),
            self.delivery_failures.collect(),
            self.pending.collect(),
        ]
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stats_are_read_at_scrape_time() {
        let metrics = Metrics::new().expect("metrics");
        let stats = std::sync::Arc::new(std::sync::Mutex::new(EventStats::default()));
        let source = stats.clone();
        let collector =
            EventStatsCollector::new(move || source.lock().expect("stats").clone()).expect("c");
        metrics.register(Box::new(collector)).expect("register");
        assert!(metrics
            .render()
            .contains("deploy_receiver_events_recorded_total 0"));
        *stats.lock().expect("stats") = EventStats {
            recorded: 5,
            delivered: 3,
            delivery_failures: 1,
            producers_replaced: 0,
            pending: 2,
            last_error: None,
        };
        let text = metrics.render();
        for line in [
            "deploy_receiver_events_recorded_total 5",
            "deploy_receiver_events_delivered_total 3",
            "deploy_receiver_event_delivery_failures_total 1",
            "deploy_receiver_events_pending 2",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
