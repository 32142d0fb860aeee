//! Metrics of layer transfers: layers and bytes by result (`received`: a blob completed here;
//! `skipped`: the engine held the layer, nothing was sent; `resumed`: a `PATCH` continued a
//! partial blob), and who checked each completed blob's content against its diffID (`upload`: the
//! `PATCH` decompressed it; `load`: the load reading it as it arrived had, and the `PATCH` took its
//! verdict).

use prometheus::{IntCounterVec, Opts};

use super::blob_upload::CheckedBy;
use crate::metrics::Metrics;

/// Layer transfer counters.
#[derive(Clone)]
pub struct LayerMetrics {
    layers: IntCounterVec,
    bytes: IntCounterVec,
    checks: IntCounterVec,
}

impl LayerMetrics {
    /// Creates the counters and registers them with the receiver's registry.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let layers = IntCounterVec::new(
            Opts::new(
                "deploy_receiver_layers_total",
                "Release layers by result: received (blob completed), skipped (held by the engine), resumed (a PATCH continued a partial blob)",
            ),
            &["result"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "deploy_receiver_layer_bytes_total",
                "Blob bytes by result: received (written by PATCH), skipped (blob sizes of layers the engine held), resumed (bytes already held when a PATCH continued)",
            ),
            &["result"],
        )?;
        let checks = IntCounterVec::new(
            Opts::new(
                "deploy_receiver_blob_checks_total",
                "Completed blobs by who decompressed them and checked their diffID: upload (the PATCH that completed the blob), load (the load reading the blob as it arrived; the PATCH took its verdict)",
            ),
            &["by"],
        )?;
        metrics.register(Box::new(layers.clone()))?;
        metrics.register(Box::new(bytes.clone()))?;
        metrics.register(Box::new(checks.clone()))?;
        Ok(Self {
            layers,
            bytes,
            checks,
        })
    }

    /// A completed blob's content was checked against its diffID by `by`.
    pub fn checked(&self, by: CheckedBy) {
        self.checks.with_label_values(&[by.as_str()]).inc();
    }

    /// `n` bytes of blobs written.
    pub fn received_bytes(&self, n: u64) {
        self.bytes.with_label_values(&["received"]).inc_by(n);
    }

    /// A blob completed and verified.
    pub fn received_layer(&self) {
        self.layers.with_label_values(&["received"]).inc();
    }

    /// A `PATCH` continued a partial blob from `held` bytes.
    pub fn resumed(&self, held: u64) {
        self.layers.with_label_values(&["resumed"]).inc();
        self.bytes.with_label_values(&["resumed"]).inc_by(held);
    }

    /// Layers the engine held when a release was loaded, and their blobs' size.
    pub fn skipped(&self, layers: u64, bytes: u64) {
        self.layers.with_label_values(&["skipped"]).inc_by(layers);
        self.bytes.with_label_values(&["skipped"]).inc_by(bytes);
    }
}
