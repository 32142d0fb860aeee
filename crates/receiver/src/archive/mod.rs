//! A streaming gate for `docker save` archives on their way into `docker load`: one pass parses
//! the tar stream as Go's `archive/tar` (Docker's reader) would, refuses what a package must not
//! carry, and holds back the archive's tail until the end-of-archive checks have passed.
//!
//! Docker extracts the whole upload to a temp dir before it reads `manifest.json`, and fails the
//! load on a malformed tar. So bytes flow on as they are checked, but the tail (always including
//! the end-of-archive marker) is kept back; on a refusal the gate ends the stream where Go's reader
//! must fail: with a block that is not a valid header (bad checksum) when the reader expects a
//! header, or with nothing when it is inside an entry's data (a short entry is an error too).
//! Ending cleanly at a header boundary would look like a complete archive to Go, so it never does.

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Tar block size.
const BLOCK: usize = 512;
/// Bytes always held back behind the parse position.
pub const HOLD_BACK: usize = 10 * 1024;
/// Largest pax, GNU long-name, `manifest.json` or `repositories` entry read into memory
/// (Go's `archive/tar` refuses special files over 1 MiB too).
const MAX_CAPTURE: u64 = 1 << 20;
/// Entries an archive may hold (a `docker save` archive holds about four per layer).
const MAX_ENTRIES: usize = 100_000;
/// Total bytes of entry names kept for the end-of-archive checks.
const MAX_NAME_BYTES: usize = 16 << 20;
/// Longest entry path.
const MAX_PATH: usize = 4096;

/// Why an archive was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// The archive carries something a package may not (traversal, foreign tag, device...).
    #[error("{0}")]
    Refused(String),
    /// Not a readable tar stream (corrupt, truncated, not decompressible).
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    /// It unpacks to more than the limit: a possible decompression bomb.
    #[error("archive unpacks to more than {limit} bytes (MAX_IMAGE_SIZE): refused as a possible decompression bomb")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
}

/// What an archive may contain.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only tags `manifest.json` may set (the signed manifest's `image_tags`).
    pub allowed_tags: Vec<String>,
    /// Most bytes the decompressed archive may have.
    pub max_bytes: u64,
    /// Layer paths `manifest.json` may name without the archive carrying them: layers the engine
    /// already holds (by chain ID), which Docker skips without opening their files.
    pub omitted_layers: Vec<String>,
}

/// One image listed in the archive's `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageEntry {
    /// Path of the image config, `<hex>.json`.
    pub config: String,
    /// Tags the load sets.
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars, bottom first.
    pub layers: Vec<String>,
}

/// A checked archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// The images in `manifest.json`.
    pub images: Vec<ImageEntry>,
    /// Decompressed bytes read.
    pub bytes: u64,
}

/// The gate: an [`Inspector`] and the bytes it holds back.
#[derive(Debug)]
pub struct Gate {
    inspector: Inspector,
    held: BytesMut,
    /// Archive offset of `held[0]`: everything before was forwarded.
    forwarded: u64,
}

impl Gate {
    /// A gate for one archive.
    pub fn new(policy: Policy) -> Self {
        Self {
            inspector: Inspector::new(policy),
            held: BytesMut::new(),
            forwarded: 0,
        }
    }

    /// Checks `chunk` and returns what may be forwarded now (whole blocks, never the last
    /// [`HOLD_BACK`] bytes nor the end-of-archive marker).
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, ArchiveError> {
        let used = self.inspector.feed(chunk)?;
        self.held.extend_from_slice(&chunk[..used]);
        let end = self.forwarded + self.held.len() as u64;
        let limit = end
            .saturating_sub(HOLD_BACK as u64)
            .min(self.inspector.release_limit());
        let limit = limit - limit % BLOCK as u64;
        if limit <= self.forwarded {
            return Ok(Bytes::new());
        }
        let out = self
            .held
            .split_to((limit - self.forwarded) as usize)
            .freeze();
        self.forwarded = limit;
        self.inspector.released(limit);
        Ok(out)
    }

    /// At the end of the decompressed stream: the remaining bytes when every check passed.
    pub fn finish(&mut self) -> Result<(Bytes, ArchiveSummary), ArchiveError> {
        let summary = self.inspector.finish()?;
        self.forwarded += self.held.len() as u64;
        Ok((std::mem::take(&mut self.held).freeze(), summary))
    }

    /// After a refusal: the bytes that make Docker's tar reader fail at the forwarded position.
    pub fn poison(&self) -> Bytes {
        if self.inspector.is_header_position(self.forwarded) {
            invalid_header()
        } else {
            // Inside an entry's data (a block-aligned cut always leaves data bytes owing):
            // ending the stream here is an unexpected EOF for Go's reader.
            Bytes::new()
        }
    }
}

/// A 512-byte block that no tar reader takes for a header: non-zero, with a wrong checksum.
pub fn invalid_header() -> Bytes {
    let mut block = vec![0u8; BLOCK];
    block[..22].copy_from_slice(b"refused-by-deploy-recv");
    block[148..156].copy_from_slice(b"0000000\0");
    block[257..263].copy_from_slice(b"ustar\0");
    Bytes::from(block)
}

mod inspector;
mod tar;

pub use inspector::Inspector;
pub use tar::normalize_reference;

#[cfg(test)]
mod tests;
