//! A small tmpfs, for a disk that is really full: mounted on a fresh directory, unmounted on drop.
//! Needs root (CI runs as root); without it the test fails saying so, it never skips.

use std::path::Path;
use std::process::{Command, Stdio};

/// A tmpfs of a given size on a fresh temp directory.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `8m`); panics when it cannot.
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temp directory for the tmpfs");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test needs to mount a small tmpfs (run as root, as CI does)"
        );
        Self { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes it `size` large, keeping what it holds.
    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount the tmpfs with size {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
