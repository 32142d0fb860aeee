//! The package store: `PACKAGE_DIR/<id>.pkg` with its signed manifest beside it as
//! `<id>.manifest.json`. The manifest is written last, so it is the commit record: a package file
//! without one is an orphan and is swept at start-up, like temp files of interrupted uploads.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use deploy_protocol::{Checksum, PackageManifest};
use uuid::Uuid;

/// Creates `path` (which must not exist) readable and writable by this user only: packages,
/// manifests, journal records and the nonce log are nobody else's business.
pub fn private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Creates `dir` (and its parents) if missing and makes it this user's only (0700). A directory
/// the receiver cannot change (someone else's) is left as it is, with a warning.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir)?;
    let mode = fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), error = %e, "cannot make the directory private (0700)");
        }
    }
    Ok(())
}

/// Prefix of temp files of uploads in progress.
const TEMP_PREFIX: &str = ".upload-";

/// A package that is fully received and verified.
#[derive(Debug, Clone)]
pub struct StoredPackage {
    /// Its signed manifest.
    pub manifest: PackageManifest,
    /// Path of the package bytes.
    pub path: PathBuf,
}

/// A package brought in by [`PackageStore::import`].
#[derive(Debug)]
pub struct Imported {
    /// The stored package.
    pub package: StoredPackage,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it was stored already (same id and checksum).
    pub existed: bool,
}

/// Why [`PackageStore::import`] stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file is not what the manifest says.
    #[error("the file is {size} bytes hashing to {checksum}")]
    Mismatch {
        /// BLAKE3 of the file.
        checksum: Checksum,
        /// Its size.
        size: u64,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The package directory.
#[derive(Debug, Clone)]
pub struct PackageStore {
    dir: PathBuf,
}

impl PackageStore {
    /// Opens (creating) the directory and sweeps leftovers of interrupted work.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        private_dir(&dir)?;
        let store = Self {
            dir: fs::canonicalize(&dir)?,
        };
        let swept = store.sweep()?;
        if swept > 0 {
            tracing::info!(swept, dir = %store.dir.display(), "removed temp files and orphans of interrupted uploads");
        }
        Ok(store)
    }

    /// The (canonical) directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a package's bytes live.
    pub fn package_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.pkg"))
    }

    fn manifest_path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.manifest.json"))
    }

    /// A fresh temp path for an upload, keyed by package id and checksum (so a later resumable
    /// upload can find it) plus a random suffix (so two attempts never share a file).
    pub fn temp_path(&self, id: Uuid, checksum: &Checksum) -> PathBuf {
        let nonce = Uuid::new_v4().simple();
        self.dir
            .join(format!("{TEMP_PREFIX}{id}-{checksum}-{nonce}.part"))
    }

    /// A stored package, if complete.
    pub fn get(&self, id: Uuid) -> std::io::Result<Option<StoredPackage>> {
        let bytes = match fs::read(self.manifest_path(id)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let manifest = PackageManifest::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored manifest of {id}: {e}"),
            )
        })?;
        let path = self.package_path(id);
        if !path.is_file() {
            return Ok(None);
        }
        Ok(Some(StoredPackage { manifest, path }))
    }

    /// Moves a verified, fsynced temp file into the store and writes its manifest, atomically:
    /// readers see either no package or the whole package.
    pub fn commit(
        &self,
        temp: &Path,
        manifest: &PackageManifest,
    ) -> std::io::Result<StoredPackage> {
        let id = manifest.package_id;
        let path = self.package_path(id);
        fs::rename(temp, &path)?;
        let manifest_tmp = self.dir.join(format!(
            "{TEMP_PREFIX}{id}-{}.manifest",
            Uuid::new_v4().simple()
        ));
        let result = (|| {
            let mut f = private_file(&manifest_tmp)?;
            f.write_all(&manifest.to_bytes())?;
            f.sync_all()?;
            fs::rename(&manifest_tmp, self.manifest_path(id))?;
            fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&manifest_tmp);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(StoredPackage {
            manifest: manifest.clone(),
            path,
        })
    }

    /// Brings `source` (a file inside the package directory, already confined) into the store for
    /// `manifest`: copies it to a private file, hashing what is copied, and commits the copy when
    /// its size and BLAKE3 are the manifest's. The copy shares nothing with `source`: rewriting
    /// the source afterwards changes nothing stored. A package already stored under the id with the same checksum is
    /// returned as it is (`existed` true). Blocking: call it from `spawn_blocking`.
    pub fn import(
        &self,
        source: &Path,
        manifest: &PackageManifest,
    ) -> Result<Imported, ImportError> {
        let id = manifest.package_id;
        let temp = TempGuard::new(self.temp_path(id, &manifest.package_checksum));
        let mut from = fs::File::open(source)?;
        let mut to = private_file(temp.path())?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match std::io::Read::read(&mut from, &mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            // Never more than was signed: a growing source is refused without filling the disk.
            if hasher.count() + n as u64 > manifest.package_size {
                hasher.update(&buf[..n]);
                break;
            }
            hasher.update(&buf[..n]);
            to.write_all(&buf[..n])?;
        }
        to.sync_all()?;
        drop(to);
        let (checksum, size) = (Checksum::from_hasher(&hasher), hasher.count());
        if size != manifest.package_size || checksum != manifest.package_checksum {
            return Err(ImportError::Mismatch { checksum, size });
        }
        if let Some(existing) = self.get(id)? {
            return Ok(Imported {
                package: existing,
                size,
                existed: true,
            });
        }
        let package = self.commit(temp.path(), manifest)?;
        temp.disarm();
        Ok(Imported {
            package,
            size,
            existed: false,
        })
    }

    /// Deletes a stored package: its manifest first (so a crash in between leaves an orphan that
    /// the next start sweeps), then its bytes. Returns whether there was one.
    pub fn remove(&self, id: Uuid) -> std::io::Result<bool> {
        let existed = match fs::remove_file(self.manifest_path(id)) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        match fs::remove_file(self.package_path(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(existed),
            Err(e) => Err(e),
        }
    }

    /// Removes temp files and package files without a manifest. Returns how many went.
    pub fn sweep(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan = name
                .strip_suffix(".pkg")
                .and_then(|id| Uuid::parse_str(id).ok())
                .is_some_and(|id| !self.manifest_path(id).exists());
            if (name.starts_with(TEMP_PREFIX) || orphan) && entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Free bytes on the store's file system.
    pub fn free_bytes(&self) -> u64 {
        fs4::available_space(&self.dir).unwrap_or(0)
    }

    /// Resolves a client-given path to a regular file inside the store, refusing `..`, absolute
    /// paths elsewhere and symlinks that lead out.
    pub fn confine(&self, given: &str) -> Result<PathBuf, String> {
        let candidate = Path::new(given);
        let joined = if candidate.is_absolute() {
            candidate.to_path_buf()
        } else {
            self.dir.join(candidate)
        };
        let real = fs::canonicalize(&joined)
            .map_err(|_| format!("no such file in the package directory: {given}"))?;
        if !real.starts_with(&self.dir) || real == self.dir {
            return Err(format!("{given} is outside the package directory"));
        }
        if !real.is_file() {
            return Err(format!("{given} is not a regular file"));
        }
        Ok(real)
    }
}

/// A temp file removed on drop unless kept: whatever ends a request (error, client gone, panic),
/// nothing half-written stays behind.
#[derive(Debug)]
pub struct TempGuard {
    path: Option<PathBuf>,
}

impl TempGuard {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    /// The guarded path.
    pub fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }

    /// Stops guarding (the file was moved away).
    pub fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_temps_and_orphans_but_keeps_committed_packages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PackageStore::open(dir.path()).expect("open");
        let id = Uuid::new_v4();
        let temp = store.temp_path(id, &Checksum::of(b"x"));
        fs::write(&temp, b"x").expect("write");
        let manifest = PackageManifest {
            package_id: id,
            package_checksum: Checksum::of(b"x"),
            package_size: 1,
            compression: deploy_protocol::Compression::None,
            image_id: None,
            image_tags: vec![],
            container_name: None,
            created_at: None,
            original_size: None,
            deployment: None,
        };
        store.commit(&temp, &manifest).expect("commit");
        fs::write(store.temp_path(Uuid::new_v4(), &Checksum::of(b"y")), b"y").expect("write");
        fs::write(store.package_path(Uuid::new_v4()), b"orphan").expect("write");
        let reopened = PackageStore::open(dir.path()).expect("reopen");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            reopened.get(id).expect("get").expect("present").manifest,
            manifest
        );
    }

    #[test]
    fn confine_refuses_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PackageStore::open(dir.path().join("pk")).expect("open");
        fs::write(dir.path().join("secret"), b"s").expect("write");
        fs::write(store.dir().join("ok.tar"), b"ok").expect("write");
        std::os::unix::fs::symlink(dir.path().join("secret"), store.dir().join("link"))
            .expect("symlink");
        assert!(store.confine("ok.tar").is_ok());
        assert!(store
            .confine(&store.dir().join("ok.tar").display().to_string())
            .is_ok());
        assert!(store.confine("../secret").is_err());
        assert!(store
            .confine(&dir.path().join("secret").display().to_string())
            .is_err());
        assert!(store.confine("link").is_err());
        assert!(store.confine(".").is_err());
    }
}
