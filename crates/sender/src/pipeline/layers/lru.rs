//! Keeping the layer cache within its budget: the least recently used blobs go first (a record's
//! mtime is its blob's last use), never one pinned by a transfer in progress.

use std::time::SystemTime;

use super::cache::{list_dir, LayerCache};
use crate::SenderError;

/// What an eviction pass found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Bytes of blobs in the cache before the pass.
    pub before: u64,
    /// Blobs removed.
    pub removed: usize,
    /// Bytes removed.
    pub removed_bytes: u64,
}

struct Entry {
    record: std::path::PathBuf,
    blob: std::path::PathBuf,
    size: u64,
    used: SystemTime,
}

impl LayerCache {
    /// Removes least recently used, unpinned blobs until the cache holds at most its budget.
    pub async fn evict(&self) -> Result<Eviction, SenderError> {
        let mut entries = Vec::new();
        for record in list_dir(&self.blobs_dir()).await? {
            let Some(blob) = record
                .to_str()
                .and_then(|s| s.strip_suffix(".json"))
                .map(std::path::PathBuf::from)
            else {
                continue;
            };
            let (Ok(meta), Ok(blob_meta)) = (
                tokio::fs::metadata(&record).await,
                tokio::fs::metadata(&blob).await,
            ) else {
                continue;
            };
            entries.push(Entry {
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                size: blob_meta.len(),
                record,
                blob,
            });
        }
        let before: u64 = entries.iter().map(|e| e.size).sum();
        let mut outcome = Eviction {
            before,
            ..Eviction::default()
        };
        let mut total = before;
        entries.sort_by_key(|e| e.used);
        for entry in entries {
            if total <= self.budget() {
                break;
            }
            if self.is_pinned(&entry.blob) {
                continue;
            }
            // The record first: a blob without a record is never listed as cached.
            if tokio::fs::remove_file(&entry.record).await.is_ok() {
                let _ = tokio::fs::remove_file(&entry.blob).await;
                total -= entry.size;
                outcome.removed += 1;
                outcome.removed_bytes += entry.size;
                tracing::info!(blob = %entry.blob.display(), bytes = entry.size, "evicted a cached layer");
            }
        }
        if total > self.budget() {
            tracing::warn!(
                bytes = total,
                budget = self.budget(),
                "the layers of transfers in progress exceed LAYER_CACHE_SIZE"
            );
        }
        Ok(outcome)
    }
}
