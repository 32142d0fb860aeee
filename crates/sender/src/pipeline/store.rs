//! The package store: compressed packages and their metadata in `PACKAGE_DIR`, written through
//! temp files and atomic renames so that a listed package is always complete.
//!
//! Layout: `<package_id>.<ext>` (the package), `<package_id>.json` (its [`PackageInfo`]), and
//! `.tmp-<package_id>` while a package is being written.

use std::path::{Path, PathBuf};

use deploy_protocol::{Checksum, Compression, PackageManifest};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::SenderError;

/// Prefix of files being written; anything with it is incomplete.
pub const TEMP_PREFIX: &str = ".tmp-";

/// An exclusive lock (`flock`) on a temp file, held by its writer from creation until the file is
/// renamed into place or removed. The sweep at open removes exactly the temp files whose lock it
/// can take: no live process (this one or another sharing the directory) is writing them, however
/// young they are; the lock goes with the process, so a killed writer's file is free at once.
pub(crate) struct TempLock(#[allow(dead_code)] std::fs::File);

impl TempLock {
    /// Locks `path`; `Ok(None)` when another open file holds its lock.
    pub(crate) fn try_acquire(path: &Path) -> std::io::Result<Option<Self>> {
        use fs4::fs_std::FileExt;
        let file = std::fs::File::open(path)?;
        Ok(file.try_lock_exclusive()?.then_some(Self(file)))
    }
}

/// A shared lock (`flock`) on a stored package's file, held by whatever sends the package for
/// as long as it may still read it (every attempt, every host). `delete` and retention, in this
/// process or another sharing the directory, leave a held package alone: a retry or a later
/// host's upload opens the file again by its path.
#[derive(Debug)]
pub struct PackageHold(#[allow(dead_code)] std::fs::File);

/// A stored package: what packaging reports and what the store keeps beside the package file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PackageInfo {
    /// Package id.
    pub package_id: Uuid,
    /// Docker image id of the packaged image (`sha256:...`).
    pub image_id: String,
    /// Tags the archive carries (what a receiver may tag when loading it).
    pub image_tags: Vec<String>,
    /// Path of the package file (filled in from the store's directory when read).
    pub package_path: String,
    /// Size of the package file in bytes.
    pub package_size: u64,
    /// Size of the package file in MB (10^6 bytes).
    pub package_size_mb: f64,
    /// Size of the uncompressed `docker save` archive in bytes.
    pub original_size: u64,
    /// Compression of the package file.
    pub compression: Compression,
    /// Compression level used, when compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<i32>,
    /// Space saved: `1 - package_size / original_size` (0.989 is "98.9%").
    pub compression_ratio: f64,
    /// `original_size / package_size` (0.0 for an empty package).
    pub compression_factor: f64,
    /// Lowercase hex BLAKE3 of the package file.
    pub package_checksum: Checksum,
    /// Milliseconds spent building the image (0 when an existing image was packaged).
    pub build_duration_ms: u64,
    /// Milliseconds spent exporting, compressing, hashing and writing.
    pub export_duration_ms: u64,
    /// When the package was made (RFC 3339).
    pub created_at: String,
    /// Container the package is meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
}

impl PackageInfo {
    /// The manifest to upload this package with (tags are the image tags).
    pub fn manifest(&self) -> PackageManifest {
        PackageManifest {
            package_id: self.package_id,
            package_checksum: self.package_checksum,
            package_size: self.package_size,
            compression: self.compression,
            image_id: Some(self.image_id.clone()),
            image_tags: self.image_tags.clone(),
            container_name: self.container_name.clone(),
            created_at: Some(self.created_at.clone()),
            original_size: Some(self.original_size),
            deployment: None,
        }
    }
}

/// `1 - compressed / original` and `original / compressed`, both 0.0 when undefined.
pub fn compression_stats(original: u64, compressed: u64) -> (f64, f64) {
    let ratio = if original > 0 {
        1.0 - compressed as f64 / original as f64
    } else {
        0.0
    };
    let factor = if compressed > 0 {
        original as f64 / compressed as f64
    } else {
        0.0
    };
    (ratio, factor)
}

/// Current time, RFC 3339, whole seconds, UTC.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The package directory.
#[derive(Debug, Clone)]
pub struct PackageStore {
    dir: PathBuf,
}

impl PackageStore {
    /// Opens (creating it if needed) the store at `dir` and removes the temp files no live process
    /// is writing.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Self, SenderError> {
        let dir = dir.into();
        tokio::fs::create_dir_all(&dir).await.map_err(|e| {
            SenderError::io(
                format!(
                    "cannot create package directory {} (set PACKAGE_DIR or --package-dir)",
                    dir.display()
                ),
                e,
            )
        })?;
        let store = Self { dir };
        store.sweep_temp_files().await?;
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the package file of `id` lives.
    pub fn package_path(&self, id: Uuid, compression: Compression) -> PathBuf {
        self.dir.join(format!("{id}.{}", compression.extension()))
    }

    /// Where the metadata of `id` lives.
    pub fn metadata_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The temp file a package of `id` is written to.
    pub(crate) fn temp_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{TEMP_PREFIX}{id}"))
    }

    /// Removes the temp files that no live process holds (see [`TempLock`]), and package files
    /// without metadata that none holds (a writer killed between renaming its file into place
    /// and recording it: it holds its lock until the metadata is written); returns how many.
    pub async fn sweep_temp_files(&self) -> Result<usize, SenderError> {
        let mut removed = 0;
        for path in self.entries().await? {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            // A package file is `<id>.<extension>`; its metadata `<id>.json`.
            let unrecorded = name
                .split_once('.')
                .filter(|(_, ext)| *ext != "json")
                .and_then(|(id, _)| Uuid::parse_str(id).ok())
                .map(|id| self.metadata_path(id));
            let unrecorded = unrecorded.filter(|meta| !meta.exists());
            if !name.starts_with(TEMP_PREFIX) && unrecorded.is_none() {
                continue;
            }
            let abandoned = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || match TempLock::try_acquire(&path) {
                    // Removed while the lock is held, so no writer can take it in between
                    // (and a package's metadata, looked at again, was not written meanwhile).
                    Ok(Some(_lock)) if unrecorded.as_ref().is_none_or(|m| !m.exists()) => {
                        std::fs::remove_file(&path).is_ok()
                    }
                    Ok(_) | Err(_) => false,
                })
                .await
                .unwrap_or(false)
            };
            if abandoned {
                tracing::info!(path = %path.display(), "removed a temp file no process was writing");
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn entries(&self) -> Result<Vec<PathBuf>, SenderError> {
        let context = || format!("cannot read package directory {}", self.dir.display());
        let mut dir = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(|e| SenderError::io(context(), e))?;
        let mut out = Vec::new();
        while let Some(entry) = dir
            .next_entry()
            .await
            .map_err(|e| SenderError::io(context(), e))?
        {
            out.push(entry.path());
        }
        Ok(out)
    }

    /// Every stored package, newest first. Unreadable metadata files are logged and skipped.
    pub async fn list(&self) -> Result<Vec<PackageInfo>, SenderError> {
        let mut out = Vec::new();
        for path in self.entries().await? {
            let id = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| Uuid::parse_str(n).ok());
            let Some(id) = id else { continue };
            match self.get(id).await {
                Ok(info) => out.push(info),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "skipping package"),
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        Ok(out)
    }

    /// The newest stored package of exactly this image, tags, compression, level and container
    /// name whose file is still there at its recorded size: what packaging the same image again
    /// would produce, so it is used instead of exporting again.
    pub async fn find_same(
        &self,
        image_id: &str,
        tags: &[String],
        compression: Compression,
        level: Option<i32>,
        container_name: Option<&str>,
    ) -> Result<Option<PackageInfo>, SenderError> {
        let mut wanted_tags = tags.to_vec();
        wanted_tags.sort();
        for info in self.list().await? {
            let mut info_tags = info.image_tags.clone();
            info_tags.sort();
            let same = info.image_id == image_id
                && info_tags == wanted_tags
                && info.compression == compression
                && info.compression_level == level
                && info.container_name.as_deref() == container_name;
            let intact = tokio::fs::metadata(&info.package_path)
                .await
                .is_ok_and(|m| m.len() == info.package_size);
            if same && intact {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    /// Retention: keeps the newest `keep_per_name` packages of each container name (or image,
    /// for packages without one), then deletes the oldest others until the store holds at most
    /// `max_bytes` (when given). `spare` (the package just made) is never deleted. Returns what
    /// was deleted, oldest first.
    pub async fn prune(
        &self,
        keep_per_name: usize,
        max_bytes: Option<u64>,
        spare: Option<Uuid>,
    ) -> Result<Vec<PackageInfo>, SenderError> {
        let list = self.list().await?; // newest first
        let mut per_name: std::collections::HashMap<String, usize> = Default::default();
        let mut kept = Vec::new();
        let mut doomed = Vec::new();
        for info in list {
            let name = info
                .container_name
                .clone()
                .or_else(|| {
                    info.image_tags
                        .first()
                        .map(|t| super::default_container_name(t))
                })
                .unwrap_or_else(|| info.image_id.clone());
            let count = per_name.entry(name).or_default();
            *count += 1;
            if *count > keep_per_name.max(1) && Some(info.package_id) != spare {
                doomed.push(info);
            } else {
                kept.push(info);
            }
        }
        if let Some(max) = max_bytes {
            let mut total: u64 = kept.iter().map(|i| i.package_size).sum();
            // Oldest first, never the spared one.
            for info in kept.iter().rev() {
                if total <= max {
                    break;
                }
                if Some(info.package_id) != spare {
                    total = total.saturating_sub(info.package_size);
                    doomed.push(info.clone());
                }
            }
        }
        doomed.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        let mut deleted = Vec::with_capacity(doomed.len());
        for info in doomed {
            match self.delete(info.package_id).await {
                Ok(()) => {
                    tracing::info!(package_id = %info.package_id, size = info.package_size, "package pruned");
                    deleted.push(info);
                }
                // Being sent: kept until a later prune (the budget may be over meanwhile).
                Err(SenderError::Conflict(why)) => {
                    tracing::info!(package_id = %info.package_id, %why, "package kept: in use");
                }
                Err(SenderError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Whether a package of this id is stored.
    pub async fn contains(&self, id: Uuid) -> bool {
        tokio::fs::try_exists(self.metadata_path(id))
            .await
            .unwrap_or(false)
    }

    /// The stored package `id`, or `NOT_FOUND`.
    pub async fn get(&self, id: Uuid) -> Result<PackageInfo, SenderError> {
        let path = self.metadata_path(id);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SenderError::NotFound(format!(
                    "no package {id} in {}",
                    self.dir.display()
                )))
            }
            Err(e) => {
                return Err(SenderError::io(
                    format!("cannot read {}", path.display()),
                    e,
                ))
            }
        };
        let mut info: PackageInfo = serde_json::from_slice(&bytes).map_err(|e| {
            SenderError::Internal(format!("metadata {} is corrupt: {e}", path.display()))
        })?;
        info.package_path = self
            .package_path(id, info.compression)
            .to_string_lossy()
            .into_owned();
        Ok(info)
    }

    /// Removes package `id` (metadata first, so it is never listed without its file).
    pub async fn delete(&self, id: Uuid) -> Result<(), SenderError> {
        let info = self.get(id).await?;
        // The exclusive lock is held until both files are gone, so no send can take its hold
        // in between.
        let _lock = match exclusive(Path::new(&info.package_path)) {
            Ok(lock) => lock,
            Err(Held) => {
                return Err(SenderError::Conflict(format!(
                    "package {id} is being sent (a transfer, deployment or rollout holds it): \
                     delete it once that has ended"
                )))
            }
        };
        remove_if_exists(&self.metadata_path(id)).await?;
        remove_if_exists(Path::new(&info.package_path)).await
    }
}

impl PackageHold {
    /// Holds package `info` for a send: `NOT_FOUND` when it is gone or is being deleted.
    pub fn new(info: &PackageInfo) -> Result<Self, SenderError> {
        let gone = || {
            SenderError::NotFound(format!(
                "package {} is no longer stored at {} (deleted or pruned): package it again",
                info.package_id, info.package_path
            ))
        };
        let file = match std::fs::File::open(&info.package_path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(gone()),
            Err(e) => {
                return Err(SenderError::io(
                    format!("cannot open package {}", info.package_path),
                    e,
                ))
            }
        };
        match file.try_lock_shared() {
            Ok(()) if Path::new(&info.package_path).exists() => Ok(Self(file)),
            // Locked for deletion, or deleted between the open and the lock.
            Ok(()) | Err(std::fs::TryLockError::WouldBlock) => Err(gone()),
            Err(std::fs::TryLockError::Error(e)) => Err(SenderError::io(
                format!("cannot lock package {}", info.package_path),
                e,
            )),
        }
    }
}

impl PackageStore {
    /// Re-hashes package `id` and compares with the recorded size and checksum.
    pub async fn verify(&self, id: Uuid) -> Result<PackageInfo, SenderError> {
        let info = self.get(id).await?;
        let (checksum, size) = hash_file(Path::new(&info.package_path)).await?;
        if size != info.package_size || checksum != info.package_checksum {
            return Err(SenderError::ChecksumMismatch(format!(
                "package {id} changed on disk: recorded {} bytes with BLAKE3 {}, found {size} bytes \
                 with BLAKE3 {checksum}; package it again",
                info.package_size, info.package_checksum
            )));
        }
        Ok(info)
    }

    /// Records `info` for a package file already renamed into place: the metadata goes through a
    /// temp file and an atomic rename, and the directory is synced so both renames survive a crash.
    pub(crate) async fn write_metadata(&self, info: &PackageInfo) -> Result<(), SenderError> {
        let path = self.metadata_path(info.package_id);
        let temp = self
            .dir
            .join(format!("{TEMP_PREFIX}{}.json", info.package_id));
        let bytes = serde_json::to_vec_pretty(info)
            .map_err(|e| SenderError::Internal(format!("cannot serialise metadata: {e}")))?;
        let write = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            let _lock = TempLock::try_acquire(&temp)?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &bytes).await?;
            file.sync_all().await?;
            tokio::fs::rename(&temp, &path).await?;
            sync_dir(&self.dir).await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(SenderError::io(
                format!("cannot write metadata {}", path.display()),
                e,
            ));
        }
        Ok(())
    }
}

async fn remove_if_exists(path: &Path) -> Result<(), SenderError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SenderError::io(
            format!("cannot remove {}", path.display()),
            e,
        )),
    }
}

/// Another open file holds a lock on the file.
struct Held;

/// An exclusive lock on `path`'s file: `Err(Held)` while a [`PackageHold`] holds it; `Ok(None)`
/// when the file is gone or cannot be opened (there is nothing to protect).
fn exclusive(path: &Path) -> Result<Option<std::fs::File>, Held> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(None);
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(Held),
        // A file system without locks: nothing can hold it either.
        Err(std::fs::TryLockError::Error(_)) => Ok(None),
    }
}

/// fsyncs a directory so that renames in it are durable.
pub(crate) async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// BLAKE3 and size of a file, read in 1 MiB blocks on a blocking thread.
pub async fn hash_file(path: &Path) -> Result<(Checksum, u64), SenderError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&owned)
            .map_err(|e| SenderError::io(format!("cannot open {}", owned.display()), e))?;
        let mut hasher = blake3::Hasher::new();
        let reader = std::io::BufReader::with_capacity(1024 * 1024, file);
        hasher
            .update_reader(reader)
            .map_err(|e| SenderError::io(format!("cannot read {}", owned.display()), e))?;
        Ok((Checksum::from_hasher(&hasher), hasher.count()))
    })
    .await
    .map_err(|e| SenderError::Internal(format!("hashing task failed: {e}")))?
}

#[cfg(test)]
mod tests;
