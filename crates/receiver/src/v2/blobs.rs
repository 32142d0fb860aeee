//! The blob store: layer blobs received through `PATCH /deployment/v2/blobs/{blake3}`.
//!
//! `<dir>/partial/<blake3>` holds the bytes of a blob still arriving: its length is the durable
//! offset (bytes are fsynced before an offset is reported; page-cache bytes written before a
//! SIGKILL survive too, and a torn tail after a power cut fails the final BLAKE3 check, which
//! discards the partial). `<dir>/complete/<blake3>` is a blob whose BLAKE3 and diffID verified,
//! with `<blake3>.json` ([`BlobMeta`]) beside it. One writer per blob at a time.
//!
//! A load reading a blob while it arrives (`?await_blobs=true`) registers as its follower
//! ([`BlobStore::start_following`]) and publishes its verdict: the follower decompresses and hashes
//! the blob anyway to feed Docker, so the `PATCH` that completes the blob takes that verdict
//! instead of decompressing and hashing the same bytes a second time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use deploy_protocol::{Checksum, Sha256Digest};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// What a verified blob carries (written beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    /// sha256 of the decompressed layer tar.
    pub diff_id: Sha256Digest,
    /// Bytes of the decompressed layer tar.
    pub uncompressed_size: u64,
}

/// Where a blob stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// Verified and stored.
    Complete(BlobMeta),
    /// This many durable bytes held.
    Partial(u64),
    /// Nothing held.
    Missing,
}

/// The blob store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct BlobStore {
    partial: PathBuf,
    complete: PathBuf,
    /// Blobs being written, with their durable offset.
    active: Mutex<HashMap<Checksum, Arc<AtomicU64>>>,
    /// Blobs a load is reading as they arrive, by follower.
    followers: Mutex<HashMap<Checksum, (u64, watch::Receiver<Followed>)>>,
    next_follower: AtomicU64,
    /// Verdicts of loads that read a whole blob before its `PATCH` asked (a load keeping up with
    /// the upload often ends its layer while the `PATCH` still syncs and hashes the file).
    verified: Mutex<HashMap<Checksum, BlobMeta>>,
}

/// Most verdicts kept for `PATCH`es that have not asked yet; past it the store forgets them all
/// (a `PATCH` then checks its blob itself).
const MAX_VERDICTS: usize = 1024;

/// What a load reading an arriving blob knows of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Followed {
    /// This many of its bytes read so far.
    Reading(u64),
    /// Every byte read: the signed size and BLAKE3, and the decompressed layer's sha256 is
    /// `diff_id` over `uncompressed_size` bytes.
    Verified(BlobMeta),
}

/// A load's registration as the follower of one blob; dropping it ends the registration (a
/// `PATCH` waiting for its verdict then checks the blob itself).
#[derive(Debug)]
pub struct FollowGuard {
    store: Arc<BlobStore>,
    blake3: Checksum,
    id: u64,
    state: watch::Sender<Followed>,
}

impl FollowGuard {
    /// Records that `read` bytes of the blob were read.
    pub fn reading(&self, read: u64) {
        self.state.send_replace(Followed::Reading(read));
    }

    /// Records that the whole blob was read and matched its signed BLAKE3, and its content `meta`
    /// (kept for the blob's `PATCH` after this registration ends).
    pub fn verified(&self, meta: BlobMeta) {
        let mut verified = self.store.verified();
        if verified.len() >= MAX_VERDICTS {
            verified.clear();
        }
        verified.insert(self.blake3, meta);
        drop(verified);
        self.state.send_replace(Followed::Verified(meta));
    }
}

impl Drop for FollowGuard {
    fn drop(&mut self) {
        let mut followers = self.store.followers();
        if followers
            .get(&self.blake3)
            .is_some_and(|(id, _)| *id == self.id)
        {
            followers.remove(&self.blake3);
        }
    }
}

/// A claim on writing one blob; released on drop.
#[derive(Debug)]
pub struct WriteClaim {
    store: Arc<BlobStore>,
    blake3: Checksum,
    durable: Arc<AtomicU64>,
}

impl WriteClaim {
    /// The blob.
    pub fn blake3(&self) -> &Checksum {
        &self.blake3
    }

    /// Records `offset` as durable (after an fsync), for `HEAD` during the write.
    pub fn set_durable(&self, offset: u64) {
        self.durable.store(offset, Ordering::Release);
    }

    /// The store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }
}

impl Drop for WriteClaim {
    fn drop(&mut self) {
        self.store.lock().remove(&self.blake3);
    }
}

impl BlobStore {
    /// Opens (creating) the store under `dir`; temp files of an interrupted completion go.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let partial = dir.join("partial");
        let complete = dir.join("complete");
        std::fs::create_dir_all(&partial)?;
        std::fs::create_dir_all(&complete)?;
        for entry in std::fs::read_dir(&complete)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            partial,
            complete,
            active: Mutex::new(HashMap::new()),
            followers: Mutex::new(HashMap::new()),
            next_follower: AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
        })
    }

    fn verified(&self) -> std::sync::MutexGuard<'_, HashMap<Checksum, BlobMeta>> {
        self.verified.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict a load gave on `blake3` after reading all of it, taken (once).
    pub fn take_verdict(&self, blake3: &Checksum) -> Option<BlobMeta> {
        self.verified().remove(blake3)
    }

    fn followers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Checksum, (u64, watch::Receiver<Followed>)>> {
        self.followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a load reading `blake3` as it arrives (the latest registration wins).
    pub fn start_following(self: &Arc<Self>, blake3: &Checksum) -> FollowGuard {
        let id = self.next_follower.fetch_add(1, Ordering::Relaxed);
        let (state, receiver) = watch::channel(Followed::Reading(0));
        self.followers().insert(*blake3, (id, receiver));
        FollowGuard {
            store: Arc::clone(self),
            blake3: *blake3,
            id,
            state,
        }
    }

    /// The load reading `blake3` as it arrives, if one is.
    pub fn follower(&self, blake3: &Checksum) -> Option<watch::Receiver<Followed>> {
        self.followers().get(blake3).map(|(_, r)| r.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Checksum, Arc<AtomicU64>>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The partial file of a blob.
    pub fn partial_path(&self, blake3: &Checksum) -> PathBuf {
        self.partial.join(blake3.to_hex())
    }

    /// The file of a complete blob.
    pub fn complete_path(&self, blake3: &Checksum) -> PathBuf {
        self.complete.join(blake3.to_hex())
    }

    fn meta_path(&self, blake3: &Checksum) -> PathBuf {
        self.complete.join(format!("{}.json", blake3.to_hex()))
    }

    /// Where `blake3` stands.
    pub fn state(&self, blake3: &Checksum) -> BlobState {
        if let Some(meta) = self.meta(blake3) {
            return BlobState::Complete(meta);
        }
        if let Some(durable) = self.lock().get(blake3) {
            return BlobState::Partial(durable.load(Ordering::Acquire));
        }
        match std::fs::metadata(self.partial_path(blake3)) {
            Ok(m) => BlobState::Partial(m.len()),
            Err(_) => BlobState::Missing,
        }
    }

    /// Whether any of `blobs` is being written now (a `PATCH` appending, verifying or committing).
    pub fn any_being_written(&self, blobs: &[Checksum]) -> bool {
        let active = self.lock();
        blobs.iter().any(|b| active.contains_key(b))
    }

    /// The meta of a complete blob.
    pub fn meta(&self, blake3: &Checksum) -> Option<BlobMeta> {
        if !self.complete_path(blake3).is_file() {
            return None;
        }
        let bytes = std::fs::read(self.meta_path(blake3)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Claims the one writer slot of `blake3`, or `None` (with the durable offset) when another
    /// request writes it.
    pub fn claim(self: &Arc<Self>, blake3: &Checksum) -> Result<WriteClaim, u64> {
        let mut active = self.lock();
        if let Some(durable) = active.get(blake3) {
            return Err(durable.load(Ordering::Acquire));
        }
        let offset = std::fs::metadata(self.partial_path(blake3)).map_or(0, |m| m.len());
        let durable = Arc::new(AtomicU64::new(offset));
        active.insert(*blake3, durable.clone());
        Ok(WriteClaim {
            store: self.clone(),
            blake3: *blake3,
            durable,
        })
    }

    /// Moves a verified partial into the complete store with its meta (both fsynced).
    pub fn commit(&self, blake3: &Checksum, meta: &BlobMeta) -> std::io::Result<()> {
        use std::io::Write;
        self.verified().remove(blake3);
        let temp = self.complete.join(format!("{}.json.tmp", blake3.to_hex()));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&serde_json::to_vec(meta).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&temp, self.meta_path(blake3))?;
        std::fs::rename(self.partial_path(blake3), self.complete_path(blake3))?;
        std::fs::File::open(&self.complete)?.sync_all()?;
        std::fs::File::open(&self.partial)?.sync_all()
    }

    /// Discards a partial (it failed verification).
    pub fn discard_partial(&self, blake3: &Checksum) {
        self.verified().remove(blake3);
        let _ = std::fs::remove_file(self.partial_path(blake3));
    }

    /// Deletes a complete blob (its layer is in the engine now).
    pub fn remove_complete(&self, blake3: &Checksum) {
        let _ = std::fs::remove_file(self.complete_path(blake3));
        let _ = std::fs::remove_file(self.meta_path(blake3));
    }

    /// Sweeps blobs neither being written nor read by a load as they arrive: partial and
    /// complete files older than `ttl`, then the oldest partials until all partials fit in
    /// `budget` bytes. Returns how many went.
    pub fn sweep(&self, ttl: Duration, budget: u64) -> usize {
        // Whether a blob is being written is checked again under the claim lock as each file
        // goes: a `PATCH` that claims it meanwhile keeps it (and reads the offset it finds). A
        // followed partial stays too: its load holds the file open and waits for the bytes the
        // next `PATCH` appends, which a removed file would send to a new one it never sees.
        let remove = |hex: &str, path: &Path| {
            let active = self.lock();
            let in_use = hex.parse::<Checksum>().is_ok_and(|blake3| {
                active.contains_key(&blake3) || self.followers().contains_key(&blake3)
            });
            !in_use && std::fs::remove_file(path).is_ok()
        };
        let active: Vec<String> = self
            .lock()
            .keys()
            .chain(self.followers().keys())
            .map(Checksum::to_hex)
            .collect();
        let now = SystemTime::now();
        let mut removed = 0;
        let mut partials = Vec::new();
        for (dir, is_partial) in [(&self.partial, true), (&self.complete, false)] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let hex = name.strip_suffix(".json").unwrap_or(&name);
                if active.iter().any(|a| a == hex) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let modified = meta.modified().unwrap_or(now);
                let age = now.duration_since(modified).unwrap_or_default();
                if age > ttl {
                    if remove(hex, &entry.path()) {
                        removed += 1;
                    }
                } else if is_partial {
                    partials.push((modified, meta.len(), entry.path(), hex.to_owned()));
                }
            }
        }
        let mut total: u64 = partials.iter().map(|p| p.1).sum();
        partials.sort();
        for (_, len, path, hex) in partials {
            if total <= budget {
                break;
            }
            if remove(&hex, &path) {
                total -= len;
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(store: &BlobStore, bytes: &[u8]) -> Checksum {
        let blake3 = Checksum::of(bytes);
        std::fs::write(store.partial_path(&blake3), bytes).expect("partial");
        blake3
    }

    #[test]
    fn sweep_keeps_blobs_being_written_and_fits_partials_in_the_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(BlobStore::open(dir.path()).expect("open"));
        let old = partial(&store, &[1u8; 100]);
        std::thread::sleep(Duration::from_millis(20));
        let newer = partial(&store, &[2u8; 100]);
        let writing = partial(&store, &[3u8; 100]);
        let claim = store.claim(&writing).expect("claim");
        assert!(store.claim(&writing).is_err(), "one writer per blob");
        assert_eq!(store.state(&old), BlobState::Partial(100));

        // Within TTL, over a 150-byte budget: the oldest idle partial goes first.
        assert_eq!(store.sweep(Duration::from_secs(3600), 150), 1);
        assert_eq!(store.state(&old), BlobState::Missing);
        assert_eq!(store.state(&newer), BlobState::Partial(100));
        // Past TTL: every idle partial goes, the one being written stays.
        assert_eq!(store.sweep(Duration::ZERO, u64::MAX), 1);
        assert_eq!(store.state(&newer), BlobState::Missing);
        assert_eq!(store.state(&writing), BlobState::Partial(100));
        drop(claim);
        assert!(store.claim(&writing).is_ok());
    }

    #[test]
    fn sweep_keeps_a_partial_a_load_reads_as_it_arrives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(BlobStore::open(dir.path()).expect("open"));
        let followed = partial(&store, &[4u8; 100]);
        let following = store.start_following(&followed);
        assert_eq!(store.sweep(Duration::ZERO, 0), 0);
        assert_eq!(store.state(&followed), BlobState::Partial(100));
        drop(following);
        assert_eq!(store.sweep(Duration::ZERO, 0), 1);
        assert_eq!(store.state(&followed), BlobState::Missing);
    }

    #[test]
    fn a_committed_blob_is_complete_with_its_meta_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let blake3 = partial(&store, b"layer blob");
        let meta = BlobMeta {
            diff_id: Sha256Digest::of(b"layer"),
            uncompressed_size: 5,
        };
        store.commit(&blake3, &meta).expect("commit");
        let store = BlobStore::open(dir.path()).expect("reopen");
        assert_eq!(store.state(&blake3), BlobState::Complete(meta));
        store.remove_complete(&blake3);
        assert_eq!(store.state(&blake3), BlobState::Missing);
    }
}
