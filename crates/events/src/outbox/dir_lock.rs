//! One outbox per state directory within a process: two writers would interleave sequence
//! numbers. (Across processes the deployment must not share a state directory.)

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use super::lock;

static OPEN_DIRS: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

/// Marks a state directory as in use by one outbox of this process (two writers would interleave
/// sequence numbers); released when the outbox is dropped.
pub(crate) struct DirLock(pub(super) PathBuf);

impl DirLock {
    pub(crate) fn try_acquire(dir: &Path) -> Option<Self> {
        lock(&OPEN_DIRS)
            .insert(dir.to_path_buf())
            .then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        lock(&OPEN_DIRS).remove(&self.0);
    }
}
