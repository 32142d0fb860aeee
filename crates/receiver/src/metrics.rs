//! Prometheus metrics of the receiver, served at `GET /metrics` in the text format.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric the receiver exports. Cheap to clone (the collectors are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    uploads: IntCounterVec,
    received_bytes: IntCounter,
    auth_refused: IntCounterVec,
    stage_seconds: HistogramVec,
    deployments: IntCounterVec,
    rollbacks: IntCounter,
    errors: IntCounterVec,
    uploads_in_flight: IntGauge,
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Registers all metrics in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let received_bytes = IntCounter::new(
            "deploy_receiver_received_bytes_total",
            "Package bytes received",
        )?;
        registry.register(Box::new(received_bytes.clone()))?;
        let rollbacks = IntCounter::new(
            "deploy_receiver_rollbacks_total",
            "Deployments rolled back to the previous container",
        )?;
        registry.register(Box::new(rollbacks.clone()))?;
        let uploads_in_flight = IntGauge::new(
            "deploy_receiver_uploads_in_flight",
            "Uploads being received now",
        )?;
        registry.register(Box::new(uploads_in_flight.clone()))?;
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new(
                "deploy_receiver_stage_duration_seconds",
                "Duration of pipeline stages",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["stage"],
        )?;
        registry.register(Box::new(stage_seconds.clone()))?;
        Ok(Self {
            uploads: counter_vec(
                &registry,
                "deploy_receiver_uploads_total",
                "Uploads by result (ok or error code)",
                &["result"],
            )?,
            auth_refused: counter_vec(
                &registry,
                "deploy_receiver_auth_refused_total",
                "Requests refused by the allowlist or the signature check",
                &["reason"],
            )?,
            deployments: counter_vec(
                &registry,
                "deploy_receiver_deployments_total",
                "Finished deployments by status",
                &["status"],
            )?,
            errors: counter_vec(
                &registry,
                "deploy_receiver_errors_total",
                "Error responses by code",
                &["code"],
            )?,
            registry,
            received_bytes,
            stage_seconds,
            rollbacks,
            uploads_in_flight,
        })
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
