//! The package store: `PACKAGE_DIR/<id>.pkg` with its signed manifest beside it as
//! `<id>.manifest.json`. The manifest is written last, so it is the commit record: a package file
//! without one is an orphan and is swept at start-up, like temp files of interrupted uploads.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use deploy_protocol::{Checksum, PackageManifest};
use uuid::Uuid;

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

/// The package directory.
#[derive(Debug, Clone)]
pub struct PackageStore {
    dir: PathBuf,
}

impl PackageStore {
    /// Opens (creating) the directory and sweeps leftovers of interrupted work.
    pub fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
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
            let mut f = fs::File::create(&manifest_tmp)?;
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
