//! One `PATCH` of a blob: bytes appended at the receiver's durable offset only, fsynced before an
//! offset is reported (every [`SYNC_EVERY`] bytes, and when the body ends or breaks off), never
//! past the signed size; at the last byte the BLAKE3 and the layer's diffID are verified and the
//! blob moves into the complete store (a blob that fails either is discarded whole). When a load
//! is reading the blob as it arrives, its verdict on the diffID is taken instead of decompressing
//! the blob a second time (the load checks the same bytes against the same signed release).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deploy_protocol::{Checksum, Compression, Sha256Digest};
use futures::{Stream, StreamExt};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::blobs::{BlobMeta, BlobStore, Followed, WriteClaim};
use crate::deadline::BodyTimeout;

/// Bytes written between two fsyncs while a body streams.
pub const SYNC_EVERY: u64 = 8 << 20;

/// What the signed releases say of a blob.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The blob.
    pub blake3: Checksum,
    /// Its signed size.
    pub size: u64,
    /// Its compression.
    pub compression: Compression,
    /// The diffIDs the releases naming it expect of its content.
    pub diff_ids: Vec<Sha256Digest>,
    /// Most bytes its content may decompress to (MAX_IMAGE_SIZE).
    pub max_uncompressed: u64,
}

/// Where a `PATCH` left the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This many durable bytes held; send the rest.
    Partial(u64),
    /// Complete and verified; who decompressed and hashed it (`None`: it was complete before).
    Complete(BlobMeta, Option<CheckedBy>),
}

/// Who decompressed a completed blob and hashed its content against the signed diffID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckedBy {
    /// The `PATCH` that completed it.
    Upload,
    /// The load reading it as it arrived.
    Load,
}

impl CheckedBy {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckedBy::Upload => "upload",
            CheckedBy::Load => "load",
        }
    }
}

/// Why a `PATCH` failed; `held` is the durable offset afterwards.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The request's offset is not the durable one.
    #[error("Upload-Offset {sent} is not this blob's durable offset {held}: continue from {held}")]
    OffsetMismatch {
        /// Offset sent.
        sent: u64,
        /// Durable offset.
        held: u64,
    },
    /// Another request is writing this blob.
    #[error("blob {blake3} is being written by another request (durable offset {held})")]
    InUse {
        /// The blob.
        blake3: Checksum,
        /// Durable offset.
        held: u64,
    },
    /// More bytes than the signed size.
    #[error("blob {blake3} is {size} bytes as signed; the body goes past that (the first {held} bytes are kept)")]
    TooLarge {
        /// The blob.
        blake3: Checksum,
        /// Signed size.
        size: u64,
        /// Durable offset.
        held: u64,
    },
    /// The complete bytes do not hash to the blob's name, or decompress to another diffID.
    #[error("{message}")]
    Mismatch {
        /// What differed.
        message: String,
    },
    /// The disk filled up; what was written before is kept.
    #[error("the disk is full after {held} bytes of blob {blake3}; the partial blob is kept: free space and continue from {held}")]
    StorageFull {
        /// The blob.
        blake3: Checksum,
        /// Durable offset.
        held: u64,
    },
    /// The client stopped sending for the idle timeout.
    #[error("no body bytes for {secs} s (UPLOAD_IDLE_TIMEOUT_SECS); {held} bytes are kept")]
    Idle {
        /// Seconds waited.
        secs: u64,
        /// Durable offset.
        held: u64,
    },
    /// The body missed its deadline (the request's idle or minimum-rate deadline).
    #[error("{why}; {held} bytes are kept")]
    Deadline {
        /// Durable offset.
        held: u64,
        /// Which deadline.
        why: String,
    },
    /// The connection broke off mid-body.
    #[error("the request body broke off after {held} durable bytes: {why}")]
    Cut {
        /// Durable offset.
        held: u64,
        /// The body error.
        why: String,
    },
    /// Another file-system failure.
    #[error("blob store I/O error at offset {held}: {error}")]
    Io {
        /// Durable offset.
        held: u64,
        /// The error.
        error: std::io::Error,
    },
}

impl UploadError {
    /// The durable offset to report with this error, when there is one.
    pub fn held(&self) -> Option<u64> {
        match self {
            UploadError::OffsetMismatch { held, .. }
            | UploadError::InUse { held, .. }
            | UploadError::TooLarge { held, .. }
            | UploadError::StorageFull { held, .. }
            | UploadError::Idle { held, .. }
            | UploadError::Deadline { held, .. }
            | UploadError::Cut { held, .. }
            | UploadError::Io { held, .. } => Some(*held),
            UploadError::Mismatch { .. } => None,
        }
    }
}

/// Appends `body` to the blob at `offset`.
pub async fn receive<E: std::error::Error + 'static>(
    store: &Arc<BlobStore>,
    expected: &Expected,
    offset: u64,
    body: impl Stream<Item = Result<Bytes, E>> + Unpin,
    idle: Duration,
) -> Result<Outcome, UploadError> {
    let blake3 = expected.blake3;
    if let Some(meta) = store.meta(&blake3) {
        return if offset == expected.size {
            Ok(Outcome::Complete(meta, None))
        } else {
            Err(UploadError::OffsetMismatch {
                sent: offset,
                held: expected.size,
            })
        };
    }
    let claim = store
        .claim(&blake3)
        .map_err(|held| UploadError::InUse { blake3, held })?;
    let held = claim_offset(store, &claim);
    if offset != held {
        return Err(UploadError::OffsetMismatch { sent: offset, held });
    }
    let written = append(&claim, expected, held, body, idle).await?;
    if written < expected.size {
        return Ok(Outcome::Partial(written));
    }
    // Only bytes that did not check out are discarded: an I/O error while reading them back
    // (500) keeps them, to be checked again.
    let (meta, checked) = verify(store, expected, idle).await.inspect_err(|e| {
        if matches!(e, UploadError::Mismatch { .. }) {
            store.discard_partial(&blake3);
        }
    })?;
    store
        .commit(&blake3, &meta)
        .map_err(|error| UploadError::Io {
            held: written,
            error,
        })?;
    Ok(Outcome::Complete(meta, Some(checked)))
}

fn claim_offset(store: &BlobStore, claim: &WriteClaim) -> u64 {
    std::fs::metadata(store.partial_path(claim.blake3())).map_or(0, |m| m.len())
}

/// Writes the body after `held` bytes; returns the durable length.
async fn append<E: std::error::Error + 'static>(
    claim: &WriteClaim,
    expected: &Expected,
    held: u64,
    mut body: impl Stream<Item = Result<Bytes, E>> + Unpin,
    idle: Duration,
) -> Result<u64, UploadError> {
    let path = claim.store().partial_path(claim.blake3());
    let io = |held: u64| move |error: std::io::Error| UploadError::Io { held, error };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .map_err(io(held))?;
    let mut written = held;
    let mut synced = held;
    let blake3 = expected.blake3;
    let outcome = loop {
        let next = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => {
                break Err(UploadError::Idle {
                    secs: idle.as_secs(),
                    held: 0,
                })
            }
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => {
                // The request's own deadline (crate::deadline) ends the body with an error of
                // its own: a stall, as the idle timer here would have called it, not a cut.
                break Err(match BodyTimeout::find(&e) {
                    Some(why) => UploadError::Deadline { held: 0, why },
                    None => UploadError::Cut {
                        held: 0,
                        why: e.to_string(),
                    },
                });
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        if written + next.len() as u64 > expected.size {
            break Err(UploadError::TooLarge {
                blake3,
                size: expected.size,
                held: 0,
            });
        }
        if let Err(error) = file.write_all(&next).await {
            break Err(write_error(blake3, error));
        }
        written += next.len() as u64;
        if written - synced >= SYNC_EVERY {
            if let Err(error) = file.flush().await {
                break Err(write_error(blake3, error));
            }
            file.sync_data().await.map_err(io(synced))?;
            synced = written;
            claim.set_durable(synced);
        }
    };
    // Whatever happened, what was written is made durable before any offset is reported. A
    // write may fail after `write_all` returned (tokio's file writes in the background and
    // reports the error at the next call): the file's length, not the count of chunks handed
    // over, is what arrived; appends only, so that prefix is the blob's.
    let flushed = file.flush().await;
    file.sync_all().await.map_err(io(synced))?;
    let written = tokio::fs::metadata(&path)
        .await
        .map_err(io(synced))?
        .len()
        .min(written);
    let outcome = match (outcome, flushed) {
        (Ok(()), Err(error)) => Err(write_error(blake3, error)),
        (outcome, _) => outcome,
    };
    claim.set_durable(written);
    outcome.map(|()| written).map_err(|e| with_held(e, written))
}

fn write_error(blake3: Checksum, error: std::io::Error) -> UploadError {
    if error.kind() == std::io::ErrorKind::StorageFull {
        UploadError::StorageFull { blake3, held: 0 }
    } else {
        UploadError::Io { held: 0, error }
    }
}

fn with_held(error: UploadError, written: u64) -> UploadError {
    match error {
        UploadError::Idle { secs, .. } => UploadError::Idle {
            secs,
            held: written,
        },
        UploadError::Cut { why, .. } => UploadError::Cut { held: written, why },
        UploadError::Deadline { why, .. } => UploadError::Deadline { held: written, why },
        UploadError::TooLarge { blake3, size, .. } => UploadError::TooLarge {
            blake3,
            size,
            held: written,
        },
        UploadError::StorageFull { blake3, .. } => UploadError::StorageFull {
            blake3,
            held: written,
        },
        UploadError::Io { error, .. } => UploadError::Io {
            held: written,
            error,
        },
        other => other,
    }
}

/// Hashes the complete partial (BLAKE3 of the bytes, sha256 of their decompressed content; the
/// latter from the load following the blob when one is and it verifies the blob).
async fn verify(
    store: &BlobStore,
    expected: &Expected,
    idle: Duration,
) -> Result<(BlobMeta, CheckedBy), UploadError> {
    let path = store.partial_path(&expected.blake3);
    let io = |error| UploadError::Io {
        held: expected.size,
        error,
    };
    let file_path = path.clone();
    let blake3 = tokio::task::spawn_blocking(move || -> std::io::Result<Checksum> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(&file_path)?)?;
        Ok(Checksum::from_hasher(&hasher))
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?
    .map_err(io)?;
    if blake3 != expected.blake3 {
        return Err(UploadError::Mismatch {
            message: format!(
                "blob bytes hash to BLAKE3 {blake3}, not {}: the blob was discarded, send it again",
                expected.blake3
            ),
        });
    }
    if let Some(meta) = follower_verdict(store, expected, idle).await {
        return Ok((meta, CheckedBy::Load));
    }
    // The file was just read whole for its BLAKE3: one that cannot be opened again is a store
    // failure (kept, checked again by the next PATCH), not bytes that failed their check.
    let file = tokio::fs::File::open(&path).await.map_err(io)?;
    let (diff_id, uncompressed_size) =
        layer_digest(file, expected.compression, expected.max_uncompressed)
            .await
            .map_err(|message| UploadError::Mismatch { message })?;
    if !expected.diff_ids.contains(&diff_id) {
        return Err(UploadError::Mismatch {
            message: format!(
                "blob {} decompresses to a layer with diffID {diff_id}, not the signed {}: the blob was discarded",
                expected.blake3,
                expected
                    .diff_ids
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        });
    }
    Ok((
        BlobMeta {
            diff_id,
            uncompressed_size,
        },
        CheckedBy::Upload,
    ))
}

/// The verdict of a load that read (or is reading) this blob as it arrived: its [`BlobMeta`] once
/// it read every byte, matching the signed BLAKE3, and the content hashed to one of the signed
/// diffIDs. `None` (the caller checks the blob itself) when no load read it, or the load stops
/// following it, or reads nothing new for `idle`, or its content is not a signed layer. (The
/// caller checked the file's BLAKE3 first: the verdict is on the same bytes.)
async fn follower_verdict(
    store: &BlobStore,
    expected: &Expected,
    idle: Duration,
) -> Option<BlobMeta> {
    let signed = |meta: BlobMeta| {
        (expected.diff_ids.contains(&meta.diff_id)
            && meta.uncompressed_size <= expected.max_uncompressed)
            .then_some(meta)
    };
    if let Some(meta) = store.take_verdict(&expected.blake3) {
        return signed(meta);
    }
    let mut followed = store.follower(&expected.blake3)?;
    loop {
        let now = *followed.borrow_and_update();
        match now {
            Followed::Verified(meta) => {
                store.take_verdict(&expected.blake3);
                return signed(meta);
            }
            Followed::Reading(_) => {
                // A closed channel (the load ended) or no progress for `idle`: check it here.
                tokio::time::timeout(idle, followed.changed())
                    .await
                    .ok()?
                    .ok()?;
            }
        }
    }
}

/// The sha256 and size of a blob's decompressed content (at most `max` bytes).
pub async fn layer_digest(
    file: tokio::fs::File,
    compression: Compression,
    max: u64,
) -> Result<(Sha256Digest, u64), String> {
    let mut reader = crate::load::decompress(file, compression);
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| format!("the blob is not a valid {compression} stream: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > max {
            return Err(format!(
                "the blob decompresses to more than {max} bytes (MAX_IMAGE_SIZE): refused as a possible decompression bomb"
            ));
        }
        hasher.update(&buf[..n]);
    }
    Ok((Sha256Digest::from_hasher(hasher), total))
}
