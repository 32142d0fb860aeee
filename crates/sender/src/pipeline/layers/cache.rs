//! The layer cache on disk: compressed layer blobs keyed by diffID and compression, each with a
//! small JSON record (BLAKE3, size, uncompressed size), and image configs keyed by image id.
//! Everything is written to a temp file, fsynced and renamed into place, the record after its
//! blob, so a listed layer is always complete; temp files of crashed writers are swept at open.
//!
//! Layout: `blobs/<diffid hex>.<ext>` and `blobs/<diffid hex>.<ext>.json`, `configs/<id hex>.json`,
//! `.tmp-*` while being written. The record's mtime is the layer's last use (for the LRU).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use deploy_protocol::{Checksum, Compression};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::pipeline::store::{now_rfc3339, sync_dir, TEMP_PREFIX};
use crate::SenderError;

/// Default budget of the layer cache: 20 GiB.
pub const DEFAULT_LAYER_CACHE_SIZE: u64 = 20 * 1024 * 1024 * 1024;

/// A temp file untouched for this long belongs to a crashed writer.
const STALE_TEMP_AGE: Duration = Duration::from_secs(10 * 60);

/// Largest image config accepted (Docker's own are a few KiB).
pub const MAX_CONFIG_SIZE: u64 = 8 * 1024 * 1024;

/// One compressed layer blob in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedLayer {
    /// `sha256:<hex>` of the uncompressed layer tar.
    pub diff_id: String,
    /// How the blob is compressed.
    pub compression: Compression,
    /// BLAKE3 of the blob bytes.
    pub blake3: Checksum,
    /// Blob size in bytes.
    pub size: u64,
    /// Size of the uncompressed layer tar.
    pub uncompressed_size: u64,
    /// When the blob was made (RFC 3339).
    pub created_at: String,
    /// Where the blob lives (filled in when read).
    #[serde(skip)]
    pub path: PathBuf,
}

/// The cache directory with its budget. Cheap to clone; clones share the pins and take their
/// commits in turn.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
    budget: u64,
    pins: Arc<Mutex<HashMap<PathBuf, usize>>>,
    /// Held while a blob is put in place and recorded.
    commits: Arc<tokio::sync::Mutex<()>>,
}

/// `sha256:<64 lowercase hex>` -> the hex, or `VALIDATION_ERROR`.
pub fn digest_hex(digest: &str) -> Result<&str, SenderError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or_else(|| SenderError::Validation(format!("{digest:?} is not a sha256:<hex> digest")))
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl LayerCache {
    /// Opens (creating it if needed) the cache at `dir` with a budget of `budget` bytes of blobs,
    /// and removes stale temp files.
    pub async fn open(dir: impl Into<PathBuf>, budget: u64) -> Result<Self, SenderError> {
        let dir = dir.into();
        for sub in [dir.join("blobs"), dir.join("configs")] {
            tokio::fs::create_dir_all(&sub).await.map_err(|e| {
                SenderError::io(
                    format!(
                        "cannot create layer cache directory {} (set LAYER_CACHE_DIR or --layer-cache-dir)",
                        sub.display()
                    ),
                    e,
                )
            })?;
        }
        let cache = Self {
            dir,
            budget,
            pins: Arc::default(),
            commits: Arc::default(),
        };
        cache.sweep_temp_files(STALE_TEMP_AGE).await?;
        Ok(cache)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    fn blob_path(&self, diff_hex: &str, compression: Compression) -> PathBuf {
        self.blobs_dir()
            .join(format!("{diff_hex}.{}", compression.extension()))
    }

    fn record_path(&self, blob: &Path) -> PathBuf {
        let mut name = blob.as_os_str().to_owned();
        name.push(".json");
        PathBuf::from(name)
    }

    fn config_path(&self, image_hex: &str) -> PathBuf {
        self.dir.join("configs").join(format!("{image_hex}.json"))
    }

    /// A new temp file in the blob directory, and its path.
    pub(crate) async fn temp_file(&self) -> Result<(PathBuf, tokio::fs::File), SenderError> {
        let path = self
            .blobs_dir()
            .join(format!("{TEMP_PREFIX}{}", Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| SenderError::io(format!("cannot create {}", path.display()), e))?;
        Ok((path, file))
    }

    /// The cached blob of `diff_id` in `compression`, marking it used; `None` when absent or when
    /// its record and file disagree (the stray files are then removed).
    pub async fn get(
        &self,
        diff_id: &str,
        compression: Compression,
    ) -> Result<Option<CachedLayer>, SenderError> {
        let blob = self.blob_path(digest_hex(diff_id)?, compression);
        let record = self.record_path(&blob);
        let bytes = match tokio::fs::read(&record).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SenderError::io(
                    format!("cannot read {}", record.display()),
                    e,
                ))
            }
        };
        let parsed = serde_json::from_slice::<CachedLayer>(&bytes)
            .ok()
            .filter(|l| l.diff_id == diff_id && l.compression == compression);
        let on_disk = tokio::fs::metadata(&blob).await.ok().map(|m| m.len());
        match parsed {
            Some(mut layer) if on_disk == Some(layer.size) => {
                layer.path = blob;
                touch(&record);
                Ok(Some(layer))
            }
            // A blob being put in place (or sent) is never dropped here: its commit pinned it.
            _ if self.is_pinned(&blob) => Ok(None),
            _ => {
                tracing::warn!(path = %blob.display(), "dropping an inconsistent layer cache entry");
                let _ = tokio::fs::remove_file(&record).await;
                let _ = tokio::fs::remove_file(&blob).await;
                Ok(None)
            }
        }
    }

    /// Moves a finished, fsynced temp blob into place as `layer` and records it, pinned from
    /// before it is in place (another job's eviction never takes a layer just made for a
    /// transfer in progress). When another preparation committed the same layer first (at
    /// another compression level: the same diffID and compression name one blob), that entry
    /// stays, and this blob is dropped: replacing a blob another transfer is sending would
    /// change its bytes under it. Commits in this process take their turn.
    pub(crate) async fn commit(
        &self,
        temp: &Path,
        mut layer: CachedLayer,
    ) -> Result<(CachedLayer, PinGuard), SenderError> {
        let blob = self.blob_path(digest_hex(&layer.diff_id)?, layer.compression);
        let pin = self.pin_paths(vec![blob.clone()]);
        let _turn = self.commits.lock().await;
        if let Some(existing) = self.get(&layer.diff_id, layer.compression).await? {
            let _ = tokio::fs::remove_file(temp).await;
            return Ok((existing, pin));
        }
        layer.created_at = now_rfc3339();
        let bytes = serde_json::to_vec_pretty(&layer)
            .map_err(|e| SenderError::Internal(format!("cannot serialise a layer record: {e}")))?;
        tokio::fs::rename(temp, &blob).await.map_err(|e| {
            SenderError::io(format!("cannot rename {} into place", temp.display()), e)
        })?;
        if let Err(e) = self
            .write_atomically(&self.record_path(&blob), &bytes)
            .await
        {
            // No record, no entry: the blob would be neither found nor evicted.
            let _ = tokio::fs::remove_file(&blob).await;
            return Err(e);
        }
        layer.path = blob;
        Ok((layer, pin))
    }

    /// The config bytes of `image_id`, when cached and still hashing to it.
    pub async fn config(&self, image_id: &str) -> Result<Option<Vec<u8>>, SenderError> {
        let path = self.config_path(digest_hex(image_id)?);
        match tokio::fs::read(&path).await {
            Ok(bytes) if sha256_digest(&bytes) == image_id => Ok(Some(bytes)),
            Ok(_) => {
                let _ = tokio::fs::remove_file(&path).await;
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SenderError::io(
                format!("cannot read {}", path.display()),
                e,
            )),
        }
    }

    /// Stores `config` under `image_id` (refused unless it hashes to it).
    pub async fn put_config(&self, image_id: &str, config: &[u8]) -> Result<(), SenderError> {
        let hex = digest_hex(image_id)?;
        if sha256_digest(config) != image_id {
            return Err(SenderError::ChecksumMismatch(format!(
                "the image config Docker exported does not hash to {image_id}"
            )));
        }
        self.write_atomically(&self.config_path(hex), config).await
    }

    async fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<(), SenderError> {
        let dir = path.parent().unwrap_or(&self.dir).to_path_buf();
        let temp = dir.join(format!("{TEMP_PREFIX}{}", Uuid::new_v4().simple()));
        let write = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut file, bytes).await?;
            file.sync_all().await?;
            tokio::fs::rename(&temp, path).await?;
            sync_dir(&dir).await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(SenderError::io(
                format!("cannot write {}", path.display()),
                e,
            ));
        }
        Ok(())
    }

    /// Keeps `layers` from eviction until the returned guard is dropped.
    pub fn pin<'a>(&self, layers: impl IntoIterator<Item = &'a CachedLayer>) -> PinGuard {
        self.pin_paths(layers.into_iter().map(|l| l.path.clone()).collect())
    }

    fn pin_paths(&self, paths: Vec<PathBuf>) -> PinGuard {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        for path in &paths {
            *pins.entry(path.clone()).or_default() += 1;
        }
        PinGuard {
            pins: Arc::clone(&self.pins),
            paths,
        }
    }

    pub(crate) fn is_pinned(&self, blob: &Path) -> bool {
        self.pins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(blob)
    }

    /// Removes temp files not modified for `max_age`; returns how many were removed.
    pub async fn sweep_temp_files(&self, max_age: Duration) -> Result<usize, SenderError> {
        let mut removed = 0;
        for dir in [self.blobs_dir(), self.dir.join("configs")] {
            for path in list_dir(&dir).await? {
                let is_temp = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(TEMP_PREFIX));
                let age = tokio::fs::metadata(&path)
                    .await
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if is_temp
                    && age.is_some_and(|a| a >= max_age)
                    && tokio::fs::remove_file(&path).await.is_ok()
                {
                    tracing::info!(path = %path.display(), "removed stale layer cache temp file");
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Keeps a set of cached blobs from eviction while alive.
#[derive(Debug)]
pub struct PinGuard {
    pins: Arc<Mutex<HashMap<PathBuf, usize>>>,
    paths: Vec<PathBuf>,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        for path in &self.paths {
            if let Some(n) = pins.get_mut(path) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(path);
                }
            }
        }
    }
}

/// Sets a file's mtime to now (the LRU's clock); failures only cost recency.
fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::options().append(true).open(path) {
        let _ = file.set_modified(SystemTime::now());
    }
}

pub(crate) async fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, SenderError> {
    let context = || format!("cannot read {}", dir.display());
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| SenderError::io(context(), e))?;
    let mut out = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| SenderError::io(context(), e))?
    {
        out.push(entry.path());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Commits `bytes` as the zstd blob of `diff_id`, as a layer writer does.
    async fn commit(cache: &LayerCache, diff_id: &str, bytes: &[u8]) -> (CachedLayer, PinGuard) {
        let (temp, mut file) = cache.temp_file().await.expect("temp file");
        file.write_all(bytes).await.expect("write");
        file.sync_all().await.expect("sync");
        let layer = CachedLayer {
            diff_id: diff_id.to_owned(),
            compression: Compression::Zstd,
            blake3: Checksum::of(bytes),
            size: bytes.len() as u64,
            uncompressed_size: 1024,
            created_at: String::new(),
            path: PathBuf::new(),
        };
        cache.commit(&temp, layer).await.expect("commit")
    }

    #[tokio::test]
    async fn a_layer_committed_twice_keeps_the_first_blob_and_drops_the_second() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = LayerCache::open(dir.path(), u64::MAX).await.expect("open");
        let diff_id = sha256_digest(b"a layer tar");
        // Two preparations of the same layer at two compression levels: the first's blob is in
        // place (and may be on the wire) when the second finishes.
        let (first, _sending) = commit(&cache, &diff_id, b"compressed at level 3").await;
        let (second, _pin) = commit(&cache, &diff_id, b"compressed at level 19!").await;
        assert_eq!(
            (second.blake3, second.size, &second.path),
            (first.blake3, first.size, &first.path),
            "the entry in place stays"
        );
        assert_eq!(
            std::fs::read(&first.path).expect("blob"),
            b"compressed at level 3",
            "its bytes did not change under the first transfer"
        );
        let found = cache
            .get(&diff_id, Compression::Zstd)
            .await
            .expect("get")
            .expect("an entry");
        assert_eq!((found.blake3, found.size), (first.blake3, first.size));
        let temps = std::fs::read_dir(cache.blobs_dir())
            .expect("blobs dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
            .count();
        assert_eq!(temps, 0, "the second blob's temp file is gone");
    }
}
