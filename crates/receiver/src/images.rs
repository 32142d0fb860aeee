//! The images this receiver loaded from verified packages (`STATE_DIR/images.json`). Only these
//! may be run, have their tags moved by a later package, or be pruned, unless
//! ALLOW_UNVERIFIED_IMAGES says otherwise: an image already on the host (`nginx:latest`, a
//! database) is never touched because a request named it.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use uuid::Uuid;

/// File name of the list under STATE_DIR.
pub const IMAGES_FILE: &str = "images.json";

/// Image ids (`sha256:...`) loaded from verified packages.
#[derive(Debug)]
pub struct LoadedImages {
    path: PathBuf,
    ids: Mutex<BTreeSet<String>>,
}

impl LoadedImages {
    /// Reads the list at `path` (none yet: empty).
    pub fn open(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        let path = path.into();
        let ids = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            ids: Mutex::new(ids),
        })
    }

    /// Whether `id` was loaded from a verified package.
    pub fn contains(&self, id: &str) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }

    /// Records `id` as loaded from a verified package (written before this returns).
    pub fn add(&self, id: &str) -> std::io::Result<()> {
        let mut ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        if !ids.insert(id.to_owned()) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&*ids).unwrap_or_default();
        write_atomically(&self.path, &bytes)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension(format!("{}.tmp", Uuid::new_v4().simple()));
    let result = (|| {
        let mut file = crate::store::private_file(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(IMAGES_FILE);
        let images = LoadedImages::open(&path).expect("open");
        assert!(!images.contains("sha256:a"));
        images.add("sha256:a").expect("add");
        assert!(images.contains("sha256:a"));
        let again = LoadedImages::open(&path).expect("reopen");
        assert!(again.contains("sha256:a"));
        assert!(!again.contains("sha256:b"));
    }
}
