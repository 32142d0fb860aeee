//! Protocol v2 on the receiver: the engine's layer inventory, the durable release and blob
//! stores, resumable blob uploads, and loading a release from an assembled archive
//! (docs/PROTOCOL.md, "Protocol v2").

pub mod assemble;
pub mod blob_upload;
pub mod blobs;
pub mod inventory;
pub mod load;
pub mod metrics;
pub mod releases;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deploy_protocol::Checksum;
use uuid::Uuid;

use crate::config::Config;

/// The v2 stores and caches, shared through `AppState`.
pub struct Layers {
    releases: releases::ReleaseStore,
    blobs: Arc<blobs::BlobStore>,
    chains: inventory::ChainCache,
    metrics: metrics::LayerMetrics,
    partial_ttl: Duration,
    partial_budget: u64,
    /// Per release, the blobs its latest status told the client to send (partial or missing):
    /// the ones a `?await_blobs=true` load waits for. In memory only.
    announced: Mutex<HashMap<Uuid, HashSet<Checksum>>>,
}

/// Most releases whose announced blobs are remembered at once; beyond it all are forgotten at
/// once (their loads then wait for nothing, as after a restart: a layer not received is
/// LAYERS_MISSING, which the client answers by sending it).
const MAX_ANNOUNCED: usize = 1024;

impl Layers {
    /// Opens the release store (`<STATE_DIR>/releases`) and the blob store
    /// (`<PACKAGE_DIR>/blobs`), and sweeps what expired.
    pub fn open(config: &Config, metrics: &crate::metrics::Metrics) -> anyhow::Result<Self> {
        let releases_dir = config.state_dir().join("releases");
        let releases = releases::ReleaseStore::open(&releases_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the release store {}: {e}",
                releases_dir.display()
            )
        })?;
        let blobs_dir = config.package_dir.join("blobs");
        let blobs = blobs::BlobStore::open(&blobs_dir).map_err(|e| {
            anyhow::anyhow!("cannot open the blob store {}: {e}", blobs_dir.display())
        })?;
        let layers = Self {
            releases,
            blobs: Arc::new(blobs),
            chains: inventory::ChainCache::default(),
            metrics: metrics::LayerMetrics::new(metrics)?,
            partial_ttl: config.partial_ttl,
            partial_budget: config.partial_budget,
            announced: Mutex::default(),
        };
        layers.sweep();
        Ok(layers)
    }

    /// The release store.
    pub fn releases(&self) -> &releases::ReleaseStore {
        &self.releases
    }

    /// The blob store.
    pub fn blobs(&self) -> &Arc<blobs::BlobStore> {
        &self.blobs
    }

    /// Chain IDs per image.
    pub fn chains(&self) -> &inventory::ChainCache {
        &self.chains
    }

    /// Layer transfer metrics.
    pub fn metrics(&self) -> &metrics::LayerMetrics {
        &self.metrics
    }

    /// Records the blobs release `id`'s status just told its client to send.
    pub fn announce(&self, id: Uuid, blobs: HashSet<Checksum>) {
        let mut announced = self
            .announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if announced.len() >= MAX_ANNOUNCED && !announced.contains_key(&id) {
            announced.clear();
        }
        announced.insert(id, blobs);
    }

    /// Whether release `id`'s latest status told its client to send `blob`.
    pub fn announced(&self, id: Uuid, blob: &Checksum) -> bool {
        self.announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .is_some_and(|blobs| blobs.contains(blob))
    }

    /// Forgets what was announced for release `id` (it loaded).
    pub fn forget_announced(&self, id: Uuid) {
        self.announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Removes releases and blobs older than PARTIAL_TTL, then partials beyond PARTIAL_BUDGET.
    pub fn sweep(&self) {
        let releases = self.releases.sweep(self.partial_ttl);
        let blobs = self.blobs.sweep(self.partial_ttl, self.partial_budget);
        self.announced
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| self.releases.get(*id).is_some());
        if releases + blobs > 0 {
            tracing::info!(releases, blobs, "swept expired releases and blobs");
        }
    }
}
