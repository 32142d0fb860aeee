//! The release store: signed release manifests kept durably under `<STATE_DIR>/releases/`, so
//! that blobs can be matched to a release after a restart. A file is written to a temp name,
//! fsynced and renamed; releases older than PARTIAL_TTL are swept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use deploy_protocol::{Checksum, Compression, ReleaseManifest, Sha256Digest};
use uuid::Uuid;

/// What registering a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// Stored now.
    New,
    /// The very same manifest was stored before.
    Same,
}

/// Why a release could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseStoreError {
    /// The id is stored with other content.
    #[error("release {0} is already registered with other content: use a new release_id")]
    Conflict(Uuid),
    /// File system failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Durable store of release manifests, with an in-memory index.
#[derive(Debug)]
pub struct ReleaseStore {
    dir: PathBuf,
    index: Mutex<HashMap<Uuid, ReleaseManifest>>,
}

impl ReleaseStore {
    /// Opens (creating) `dir` and reads every stored manifest; unreadable files and temp files
    /// left by a crash are removed.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut index = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "loaded") {
                continue;
            }
            let parsed = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|stem| stem.parse::<Uuid>().ok())
                .and_then(|id| {
                    let bytes = std::fs::read(&path).ok()?;
                    let manifest = ReleaseManifest::from_slice(&bytes).ok()?;
                    (manifest.release_id == id).then_some(manifest)
                });
            match parsed {
                Some(manifest) => {
                    index.insert(manifest.release_id, manifest);
                }
                None => {
                    tracing::warn!(path = %path.display(), "removing an unreadable release file");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            index: Mutex::new(index),
        })
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Stores `manifest` durably; the same content again is [`Registered::Same`].
    pub fn register(&self, manifest: &ReleaseManifest) -> Result<Registered, ReleaseStoreError> {
        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(stored) = index.get(&manifest.release_id) {
            return if stored == manifest {
                Ok(Registered::Same)
            } else {
                Err(ReleaseStoreError::Conflict(manifest.release_id))
            };
        }
        let path = self.path(manifest.release_id);
        let temp = path.with_extension("json.tmp");
        let written = (|| {
            use std::io::Write;
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&manifest.to_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e.into());
        }
        index.insert(manifest.release_id, manifest.clone());
        Ok(Registered::New)
    }

    /// A stored release.
    pub fn get(&self, id: Uuid) -> Option<ReleaseManifest> {
        self.lock().get(&id).cloned()
    }

    /// The signed size, compression and the diffIDs expected of a blob, over every stored
    /// release naming it; `None` when no stored release names it.
    pub fn blob(&self, blake3: &Checksum) -> Option<(u64, Compression, Vec<Sha256Digest>)> {
        let index = self.lock();
        let mut found: Option<(u64, Compression, Vec<Sha256Digest>)> = None;
        for layer in index.values().flat_map(|m| &m.layers) {
            if layer.blob.blake3 == *blake3 {
                let entry =
                    found.get_or_insert((layer.blob.size, layer.blob.compression, Vec::new()));
                if !entry.2.contains(&layer.diff_id) {
                    entry.2.push(layer.diff_id);
                }
            }
        }
        found
    }

    /// Every chain ID a stored release not yet loaded relies on: images holding these layers
    /// must not be pruned from under the transfer.
    pub fn pending_chain_ids(&self) -> std::collections::HashSet<Sha256Digest> {
        self.lock()
            .values()
            .filter(|m| !self.loaded_path(m.release_id).exists())
            .flat_map(ReleaseManifest::chain_ids)
            .collect()
    }

    fn loaded_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.loaded"))
    }

    /// Records that release `id` was loaded: its layers no longer need protecting. The release
    /// stays (until PARTIAL_TTL) so that a repeated load or deploy finds it.
    pub fn mark_loaded(&self, id: Uuid) {
        if let Err(e) = std::fs::File::create(self.loaded_path(id)) {
            tracing::warn!(release_id = %id, error = %e, "could not mark a release loaded");
        }
    }

    /// Forgets a release (when it expires).
    pub fn remove(&self, id: Uuid) {
        let mut index = self.lock();
        if index.remove(&id).is_some() {
            let _ = std::fs::remove_file(self.path(id));
            let _ = std::fs::remove_file(self.loaded_path(id));
        }
    }

    /// Removes releases stored longer than `ttl` ago; returns how many.
    pub fn sweep(&self, ttl: Duration) -> usize {
        let now = SystemTime::now();
        let expired: Vec<Uuid> = self
            .lock()
            .keys()
            .copied()
            .filter(|id| {
                std::fs::metadata(self.path(*id))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > ttl)
            })
            .collect();
        for id in &expired {
            self.remove(*id);
        }
        expired.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, ReleaseManifest>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploy_protocol::{BlobRef, LayerEntry};

    fn manifest(tag: &str) -> ReleaseManifest {
        let diff_id = Sha256Digest::of(b"layer");
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
        )
        .into_bytes();
        ReleaseManifest {
            release_id: Uuid::new_v4(),
            image_id: Sha256Digest::of(&config),
            config,
            layers: vec![LayerEntry {
                diff_id,
                blob: BlobRef {
                    blake3: Checksum::of(b"blob"),
                    size: 4,
                    compression: Compression::None,
                },
                uncompressed_size: None,
            }],
            image_tags: vec![tag.into()],
            created_at: None,
            deployment: None,
        }
    }

    #[test]
    fn releases_survive_reopening_same_content_is_idempotent_other_content_conflicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ReleaseStore::open(dir.path()).expect("open");
        let m = manifest("a:1");
        assert_eq!(store.register(&m).expect("new"), Registered::New);
        assert_eq!(store.register(&m).expect("same"), Registered::Same);
        let mut other = manifest("a:2");
        other.release_id = m.release_id;
        assert!(matches!(
            store.register(&other),
            Err(ReleaseStoreError::Conflict(_))
        ));
        assert_eq!(store.pending_chain_ids().len(), 1);

        let store = ReleaseStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(m.release_id), Some(m.clone()));
        assert_eq!(
            store.blob(&Checksum::of(b"blob")),
            Some((4, Compression::None, vec![Sha256Digest::of(b"layer")]))
        );
        store.mark_loaded(m.release_id);
        assert!(
            store.pending_chain_ids().is_empty(),
            "a loaded release protects nothing"
        );
        assert_eq!(store.sweep(Duration::ZERO), 1);
        assert_eq!(store.get(m.release_id), None);
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
    }
}
