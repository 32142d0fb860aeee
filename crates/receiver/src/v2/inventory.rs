//! Which layers the engine holds, by chain ID. Image ids are immutable, so each image's chain
//! IDs are computed once (one inspect) and cached; an inventory lists the images (one call) and
//! inspects only the ones not seen before.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use bollard::image::ListImagesOptions;
use bollard::Docker;
use deploy_protocol::{chain_ids, ImageStore, Sha256Digest};

use crate::docker::map_err;
use crate::error::{ReceiverError, Result};

/// Chain IDs per image id.
#[derive(Debug, Default)]
pub struct ChainCache {
    by_image: Mutex<HashMap<String, Vec<Sha256Digest>>>,
}

impl ChainCache {
    /// Every chain ID the engine holds now (the layer prefixes of every image, intermediate ones
    /// included).
    pub async fn held(&self, docker: &Docker) -> Result<HashSet<Sha256Digest>> {
        let images = docker
            .list_images(Some(ListImagesOptions::<String> {
                all: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| map_err(e, ReceiverError::Internal))?;
        let ids: Vec<String> = images.into_iter().map(|i| i.id).collect();
        let unknown: Vec<String> = {
            let cache = self.lock();
            ids.iter()
                .filter(|id| !cache.contains_key(*id))
                .cloned()
                .collect()
        };
        for id in unknown {
            match self.image_chain(docker, &id).await {
                Ok(chain) => {
                    self.lock().insert(id, chain);
                }
                // Removed between the list and the inspect: it holds nothing now.
                Err(ReceiverError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let mut cache = self.lock();
        cache.retain(|id, _| ids.contains(id));
        Ok(cache.values().flatten().copied().collect())
    }

    /// The chain IDs of one image, bottom first.
    pub async fn image_chain(&self, docker: &Docker, image: &str) -> Result<Vec<Sha256Digest>> {
        let inspect = docker
            .inspect_image(image)
            .await
            .map_err(|e| map_err(e, ReceiverError::Internal))?;
        let diff_ids: Vec<Sha256Digest> = inspect
            .root_fs
            .and_then(|r| r.layers)
            .unwrap_or_default()
            .iter()
            .filter_map(|l| l.parse().ok())
            .collect();
        Ok(chain_ids(&diff_ids))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Sha256Digest>>> {
        self.by_image.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The engine's version and image store kind (`containerd.snapshotter` in `docker info`'s
/// DriverStatus means Docker's containerd image store).
pub async fn engine(docker: &Docker) -> Result<(String, ImageStore)> {
    let version = docker
        .version()
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))?
        .version
        .unwrap_or_else(|| "unknown".into());
    let info = docker
        .info()
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))?;
    let containerd = info
        .driver_status
        .unwrap_or_default()
        .iter()
        .flatten()
        .any(|s| s.contains("containerd.snapshotter"));
    let store = if containerd {
        ImageStore::Containerd
    } else {
        ImageStore::Graphdriver
    };
    Ok((version, store))
}
