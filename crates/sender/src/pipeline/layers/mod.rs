//! Images as layers: a content-addressed cache of compressed layer blobs on the build host, and
//! [`prepare_image`], which makes sure every layer of an image (and its config) is in it, running
//! at most one `docker save` and compressing only the layers the cache lacks. A layer is
//! compressed once and reused for every host and release.

mod cache;
mod chain;
mod handover;
mod lru;
mod split;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bollard::Docker;
use serde::Serialize;

pub use cache::{
    digest_hex, sha256_digest, CachedLayer, LayerCache, PinGuard, DEFAULT_LAYER_CACHE_SIZE,
};
pub use chain::chain_ids;
pub use lru::Eviction;

use crate::pipeline::compress::CompressionOptions;
use crate::pipeline::docker::docker_error;
use crate::pipeline::package::resolve_image;
use crate::pipeline::progress::Progress;
use crate::SenderError;
use split::{split_save, SplitPlan};

/// One layer of a prepared image, in the image's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedLayer {
    /// `sha256:` of the uncompressed layer tar.
    pub diff_id: String,
    /// The chain ID of the image's layers up to and including this one.
    pub chain_id: String,
    /// The compressed blob in the cache.
    pub blob: CachedLayer,
}

/// What preparing cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PrepareStats {
    /// Whether `docker save` ran (false: everything came from the cache).
    pub exported: bool,
    /// Layers compressed now.
    pub compressed_layers: usize,
    /// Uncompressed bytes compressed now.
    pub compressed_bytes: u64,
    /// Layers taken from the cache as they were.
    pub cached_layers: usize,
    /// Milliseconds spent.
    pub duration_ms: u64,
}

/// An image whose config and every layer blob are in the cache, pinned there while this lives.
#[derive(Debug)]
pub struct PreparedImage {
    /// `sha256:` of the config bytes.
    pub image_id: String,
    /// The tags it is known by (none when taken by id).
    pub tags: Vec<String>,
    /// The config bytes, verbatim.
    pub config: Vec<u8>,
    /// Its layers in order (a repeated layer appears as often as in the image).
    pub layers: Vec<PreparedLayer>,
    /// What preparing cost.
    pub stats: PrepareStats,
    _pin: PinGuard,
}

impl PreparedImage {
    /// Compressed bytes of all its distinct blobs.
    pub fn total_blob_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.layers
            .iter()
            .filter(|l| seen.insert(&l.diff_id))
            .map(|l| l.blob.size)
            .sum()
    }
}

/// The diffIDs of image `id`'s layers, bottom first, as the engine reports them.
pub(crate) async fn image_diff_ids(docker: &Docker, id: &str) -> Result<Vec<String>, SenderError> {
    let inspected = docker
        .inspect_image(id)
        .await
        .map_err(|e| docker_error(&format!("image {id}"), e))?;
    Ok(inspected.root_fs.and_then(|r| r.layers).unwrap_or_default())
}

/// Makes sure `reference` (a tag or an image id in the local engine) is in `cache` as blobs of
/// `options.compression`, exporting and compressing only what is missing, then keeps the cache
/// within its budget (never evicting this image's layers while the result lives).
pub async fn prepare_image(
    docker: &Docker,
    cache: &LayerCache,
    reference: &str,
    options: &CompressionOptions,
    progress: Arc<dyn Progress>,
) -> Result<PreparedImage, SenderError> {
    options.effective_level()?;
    let started = Instant::now();
    let image = resolve_image(docker, reference).await?;
    let diff_ids = image_diff_ids(docker, &image.id).await?;
    if diff_ids.is_empty() {
        return Err(SenderError::Validation(format!(
            "image {reference} has no layers to send"
        )));
    }
    for d in &diff_ids {
        digest_hex(d)?;
    }

    let mut cached: HashMap<String, CachedLayer> = HashMap::new();
    for diff_id in &diff_ids {
        if !cached.contains_key(diff_id) {
            if let Some(layer) = cache.get(diff_id, options.compression).await? {
                cached.insert(diff_id.clone(), layer);
            }
        }
    }
    let mut config = cache.config(&image.id).await?;
    let mut stats = PrepareStats {
        cached_layers: cached.len(),
        ..PrepareStats::default()
    };
    let missing: HashSet<String> = diff_ids
        .iter()
        .filter(|d| !cached.contains_key(*d))
        .cloned()
        .collect();
    // Hold what is cached already while the rest is exported (another job may be evicting).
    let early_pin = cache.pin(cached.values());
    // And each layer made here, from the moment it is committed.
    let mut fresh_pins = Vec::new();

    if config.is_none() || !missing.is_empty() {
        let mut plan = SplitPlan {
            image_id: image.id.clone(),
            diff_ids: diff_ids.iter().cloned().collect(),
            wanted: missing,
            cached_sizes: cached.values().map(|l| l.uncompressed_size).collect(),
            need_config: config.is_none(),
            size_hint: image.size,
        };
        // Twice at most: the second pass compresses the layers a size collision skipped.
        for _ in 0..2 {
            let outcome =
                split_save(docker, cache, plan.clone(), *options, Arc::clone(&progress)).await?;
            stats.exported = true;
            stats.compressed_bytes += outcome.compressed_input;
            if let Some(bytes) = outcome.config {
                cache.put_config(&image.id, &bytes).await?;
                config = Some(bytes);
            }
            fresh_pins.extend(outcome.pins);
            for layer in outcome.stored {
                stats.compressed_layers += 1;
                plan.wanted.remove(&layer.diff_id);
                cached.insert(layer.diff_id.clone(), layer);
            }
            plan.need_config = config.is_none();
            if plan.wanted.is_empty() && !plan.need_config {
                break;
            }
            plan.cached_sizes.clear();
        }
        if let Some(absent) = plan.wanted.iter().next() {
            return Err(SenderError::Internal(format!(
                "docker save of {} carried no layer {absent}",
                image.id
            )));
        }
    }
    let config = config.ok_or_else(|| {
        SenderError::Internal(format!("docker save of {} carried no config", image.id))
    })?;
    check_config(&config, &diff_ids)?;

    let chains = chain_ids(&diff_ids);
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (diff_id, chain_id) in diff_ids.into_iter().zip(chains) {
        let blob = cached.get(&diff_id).cloned().ok_or_else(|| {
            SenderError::Internal(format!("layer {diff_id} vanished from the cache"))
        })?;
        layers.push(PreparedLayer {
            diff_id,
            chain_id,
            blob,
        });
    }
    let pin = cache.pin(layers.iter().map(|l| &l.blob));
    drop((early_pin, fresh_pins));
    cache.evict().await?;
    stats.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        image = %image.id,
        exported = stats.exported,
        compressed = stats.compressed_layers,
        cached = stats.cached_layers,
        "image prepared as layers"
    );
    Ok(PreparedImage {
        image_id: image.id,
        tags: image.tags,
        config,
        layers,
        stats,
        _pin: pin,
    })
}

/// The config's `rootfs.diff_ids` must be the image's layers, in order.
fn check_config(config: &[u8], diff_ids: &[String]) -> Result<(), SenderError> {
    let parsed: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| SenderError::Internal(format!("the image config is not JSON: {e}")))?;
    let listed: Vec<&str> = parsed
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if listed != diff_ids.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(SenderError::Internal(
            "the image config's rootfs.diff_ids differ from the layers Docker reports".into(),
        ));
    }
    Ok(())
}
