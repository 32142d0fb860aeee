//! The archive a release is loaded from, streamed: both `docker save` formats at once, so that
//! either of Docker's image stores takes it.
//!
//! - `manifest.json` (`[{"Config", "RepoTags", "Layers"}]`), read by the graph-driver store;
//! - OCI layout: `oci-layout`, `index.json` (one descriptor per tag, annotated with
//!   `io.containerd.image.name` and `org.opencontainers.image.ref.name`), the OCI manifest blob,
//!   read by the containerd store (and `ctr images import`);
//! - `blobs/sha256/<hex>`: the config and the uncompressed layer tars, named by diffID.
//!
//! Layers the engine already holds (by chain ID) are named in both manifests but not carried:
//! Docker skips a layer whose chain ID it holds without opening its file. Carried layers are
//! decompressed from the blob store while streaming and their sha256 and size compared with the
//! signed diffID at their end; a difference breaks the stream, which the tar gate turns into a
//! refused load.
//!
//! A carried layer's blob may still be arriving ([`BlobSource::Arriving`]): its file is then
//! followed as the upload writes it, so Docker reads a layer while the rest of it is on the wire.
//! Such a blob's bytes are also checked against the signed size and BLAKE3 before its layer's
//! end, so every byte Docker keeps was checked against the signed release, as for a complete one;
//! the verdict is published to the blob store, where the `PATCH` completing the blob takes it
//! instead of decompressing the blob again.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use deploy_protocol::{BlobRef, Checksum, Compression, ReleaseManifest, Sha256Digest};
use futures::stream::{self, BoxStream, StreamExt};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::blobs::{BlobMeta, BlobStore, FollowGuard};
use crate::archive::normalize_reference;

const BLOCK: usize = 512;
const CHUNK: usize = 256 * 1024;
/// OCI media types.
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// How long a followed blob's reader waits before looking at its file again.
const FOLLOW_POLL: Duration = Duration::from_millis(10);

/// A layer the archive carries.
#[derive(Debug, Clone)]
pub struct CarriedLayer {
    /// The signed diffID.
    pub diff_id: Sha256Digest,
    /// Uncompressed size (from the blob's verification, or the signed size of an arriving one).
    pub size: u64,
    /// Where its blob is read from.
    pub source: BlobSource,
    /// Its compression.
    pub compression: Compression,
}

/// Where a carried layer's blob is read from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// A complete blob file (its BLAKE3 checked when it completed).
    Complete(PathBuf),
    /// A blob still arriving in `store`: followed as it is written, its bytes checked against the
    /// signed size and BLAKE3; waiting ends with an error after `idle` without a new byte while
    /// none of `release_blobs` is being written (a client busy sending, or the receiver busy
    /// checking, an earlier blob of the release is not idle).
    Arriving {
        /// The blob store it is written to.
        store: Arc<BlobStore>,
        /// The signed blob.
        blob: BlobRef,
        /// Every blob the load awaits.
        release_blobs: Arc<Vec<Checksum>>,
        /// Longest wait for a new byte.
        idle: Duration,
    },
}

/// What goes into the archive besides the manifest.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Layers carried, by diffID.
    pub carried: Vec<CarriedLayer>,
    /// Uncompressed size of each layer in manifest order (for OCI descriptors; 0 when unknown).
    pub sizes: Vec<u64>,
}

/// The archive as a byte stream (uncompressed tar).
pub fn archive(manifest: &ReleaseManifest, plan: Plan) -> Pin<Box<dyn AsyncRead + Send>> {
    let mut parts: Vec<BoxStream<'static, std::io::Result<Bytes>>> = Vec::new();
    let mut file = |name: &str, data: Vec<u8>| {
        parts.push(stream::iter(file_entry(name, data).into_iter().map(Ok)).boxed());
    };
    let config_hex = manifest.image_id.hex();
    file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
    file(&blob_path(&config_hex), manifest.config.clone());
    let oci_manifest = oci_manifest(manifest, &plan.sizes);
    let oci_digest = Sha256Digest::of(&oci_manifest);
    file(&blob_path(&oci_digest.hex()), oci_manifest.clone());
    file(
        "index.json",
        index(manifest, &oci_digest, oci_manifest.len()),
    );
    file("manifest.json", docker_manifest(manifest));
    let mut seen = HashSet::new();
    for layer in plan.carried {
        if seen.insert(layer.diff_id) {
            parts.push(layer_entry(layer));
        }
    }
    parts.push(stream::iter([Ok(Bytes::from(vec![0u8; 2 * BLOCK]))]).boxed());
    Box::pin(tokio_util::io::StreamReader::new(
        stream::iter(parts).flatten(),
    ))
}

fn blob_path(hex: &str) -> String {
    format!("blobs/sha256/{hex}")
}

fn header(name: &str, size: u64) -> Bytes {
    let mut header = tar::Header::new_ustar();
    // Paths are `blobs/sha256/<64 hex>` at most: always within the 100-byte name field.
    let _ = header.set_path(name);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Bytes::copy_from_slice(header.as_bytes())
}

fn padding(size: u64) -> Bytes {
    let rest = (size % BLOCK as u64) as usize;
    Bytes::from(vec![0u8; if rest == 0 { 0 } else { BLOCK - rest }])
}

fn file_entry(name: &str, data: Vec<u8>) -> Vec<Bytes> {
    let size = data.len() as u64;
    vec![header(name, size), Bytes::from(data), padding(size)]
}

/// One carried layer: header, the decompressed blob checked against its diffID, padding.
fn layer_entry(layer: CarriedLayer) -> BoxStream<'static, std::io::Result<Bytes>> {
    let head = stream::iter([Ok(header(&blob_path(&layer.diff_id.hex()), layer.size))]);
    let tail = stream::iter([Ok(padding(layer.size))]);
    struct Reading {
        reader: Option<Pin<Box<dyn AsyncRead + Send>>>,
        hasher: sha2::Sha256,
        count: u64,
        layer: CarriedLayer,
        /// For a blob still arriving: this load's registration as its follower.
        following: Option<FollowGuard>,
    }
    let start = Reading {
        reader: None,
        hasher: sha2::Sha256::new(),
        count: 0,
        layer,
        following: None,
    };
    let body = stream::unfold(Some(start), |state| async move {
        let mut s = state?;
        if s.reader.is_none() {
            match &s.layer.source {
                BlobSource::Complete(path) => match tokio::fs::File::open(path).await {
                    Ok(f) => s.reader = Some(crate::load::decompress(f, s.layer.compression)),
                    Err(e) => return Some((Err(e), None)),
                },
                BlobSource::Arriving {
                    store,
                    blob,
                    release_blobs,
                    idle,
                } => {
                    s.following = Some(store.start_following(&blob.blake3));
                    let followed =
                        follow(Arc::clone(store), *blob, Arc::clone(release_blobs), *idle);
                    s.reader = Some(crate::load::decompress(followed, s.layer.compression));
                }
            }
        }
        let reader = s.reader.as_mut()?;
        let mut buf = vec![0u8; CHUNK];
        match reader.read(&mut buf).await {
            Err(e) => Some((Err(e), None)),
            Ok(0) => {
                let diff = Sha256Digest::from_hasher(std::mem::take(&mut s.hasher));
                if diff != s.layer.diff_id || s.count != s.layer.size {
                    let e = std::io::Error::other(format!(
                        "layer {} decompressed to {} bytes with sha256 {diff}: not the signed layer",
                        s.layer.diff_id, s.count
                    ));
                    return Some((Err(e), None));
                }
                // The decompressor read its input to the end, so `follow` checked the BLAKE3.
                if let Some(following) = &s.following {
                    following.verified(BlobMeta {
                        diff_id: diff,
                        uncompressed_size: s.count,
                    });
                }
                None
            }
            Ok(n) => {
                buf.truncate(n);
                s.count += n as u64;
                if s.count > s.layer.size {
                    let e = std::io::Error::other(format!(
                        "layer {} decompresses to more than its {} bytes",
                        s.layer.diff_id, s.layer.size
                    ));
                    return Some((Err(e), None));
                }
                s.hasher.update(&buf);
                if let Some(following) = &s.following {
                    following.reading(s.count);
                }
                Some((Ok(Bytes::from(buf)), Some(s)))
            }
        }
    });
    head.chain(body).chain(tail).boxed()
}

/// The bytes of an arriving blob as its upload writes them: its partial file (or, once it
/// completed, the same file in the complete store) read up to the signed size, then checked
/// against the signed BLAKE3. An error when no byte comes for `idle` while none of
/// `release_blobs` is being written, or when the file being followed was discarded (it failed
/// its own check) or replaced.
fn follow(
    store: Arc<BlobStore>,
    blob: BlobRef,
    release_blobs: Arc<Vec<Checksum>>,
    idle: Duration,
) -> impl AsyncRead + Send {
    struct Following {
        store: Arc<BlobStore>,
        blob: BlobRef,
        release_blobs: Arc<Vec<Checksum>>,
        idle: Duration,
        file: Option<(tokio::fs::File, u64)>,
        read: u64,
        hasher: blake3::Hasher,
        last_byte: Instant,
    }
    let start = Following {
        store,
        blob,
        release_blobs,
        idle,
        file: None,
        read: 0,
        hasher: blake3::Hasher::new(),
        last_byte: Instant::now(),
    };
    let bytes = stream::unfold(Some(start), |state| async move {
        let mut s = state?;
        loop {
            if s.read == s.blob.size {
                let got = Checksum::from_hasher(&s.hasher);
                if got != s.blob.blake3 {
                    let e = std::io::Error::other(format!(
                        "blob {} arrived as bytes with BLAKE3 {got}: not the signed blob",
                        s.blob.blake3
                    ));
                    return Some((Err(e), None));
                }
                return None;
            }
            if s.last_byte.elapsed() > s.idle && s.store.any_being_written(&s.release_blobs) {
                s.last_byte = Instant::now();
            }
            if s.last_byte.elapsed() > s.idle {
                let e = std::io::Error::other(format!(
                    "blob {} stopped arriving at {} of {} bytes (nothing for {} s, and no blob of the release being written)",
                    s.blob.blake3,
                    s.read,
                    s.blob.size,
                    s.idle.as_secs()
                ));
                return Some((Err(e), None));
            }
            let Some((file, inode)) = s.file.as_mut() else {
                s.file = open_blob(&s.store, &s.blob.blake3).await;
                if s.file.is_none() {
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                continue;
            };
            let want = usize::try_from(s.blob.size - s.read).map_or(CHUNK, |left| left.min(CHUNK));
            let mut buf = vec![0u8; want];
            match file.read(&mut buf).await {
                Err(e) => return Some((Err(e), None)),
                Ok(0) => {
                    if !still_followed(&s.store, &s.blob.blake3, *inode).await {
                        let e = std::io::Error::other(format!(
                            "blob {} was discarded while it was being loaded (it failed its check, or is being sent again)",
                            s.blob.blake3
                        ));
                        return Some((Err(e), None));
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
                Ok(n) => {
                    buf.truncate(n);
                    s.read += n as u64;
                    s.hasher.update(&buf);
                    s.last_byte = Instant::now();
                    return Some((Ok(Bytes::from(buf)), Some(s)));
                }
            }
        }
    });
    tokio_util::io::StreamReader::new(bytes)
}

/// The blob's file, partial or complete, with its inode.
async fn open_blob(store: &BlobStore, blake3: &Checksum) -> Option<(tokio::fs::File, u64)> {
    // The partial first: a completion renames it, so the complete one is tried after it.
    for path in [store.partial_path(blake3), store.complete_path(blake3)] {
        if let Ok(file) = tokio::fs::File::open(&path).await {
            let inode = file.metadata().await.ok()?.ino();
            return Some((file, inode));
        }
    }
    None
}

/// Whether the file with `inode` is still the blob's (partial, or renamed complete).
async fn still_followed(store: &BlobStore, blake3: &Checksum, inode: u64) -> bool {
    for path in [store.partial_path(blake3), store.complete_path(blake3)] {
        if tokio::fs::metadata(&path)
            .await
            .is_ok_and(|m| m.ino() == inode)
        {
            return true;
        }
    }
    false
}

fn oci_manifest(manifest: &ReleaseManifest, sizes: &[u64]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = manifest
        .layers
        .iter()
        .zip(sizes)
        .map(|(l, size)| serde_json::json!({"mediaType": MEDIA_LAYER, "digest": l.diff_id, "size": size}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": manifest.image_id, "size": manifest.config.len()},
        "layers": layers,
    }))
    .unwrap_or_default()
}

fn index(manifest: &ReleaseManifest, digest: &Sha256Digest, size: usize) -> Vec<u8> {
    let descriptor = |annotations: serde_json::Value| serde_json::json!({"mediaType": MEDIA_MANIFEST, "digest": digest, "size": size, "annotations": annotations});
    let manifests: Vec<serde_json::Value> = if manifest.image_tags.is_empty() {
        vec![descriptor(serde_json::json!({}))]
    } else {
        manifest
            .image_tags
            .iter()
            .map(|tag| {
                let tag_only = tag.rsplit_once(':').map_or(tag.as_str(), |(_, t)| t);
                descriptor(serde_json::json!({
                    "io.containerd.image.name": normalize_reference(tag),
                    "org.opencontainers.image.ref.name": tag_only,
                }))
            })
            .collect()
    };
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests,
    }))
    .unwrap_or_default()
}

fn docker_manifest(manifest: &ReleaseManifest) -> Vec<u8> {
    let layers: Vec<String> = manifest
        .layers
        .iter()
        .map(|l| blob_path(&l.diff_id.hex()))
        .collect();
    serde_json::to_vec(&serde_json::json!([{
        "Config": blob_path(&manifest.image_id.hex()),
        "RepoTags": manifest.image_tags,
        "Layers": layers,
    }]))
    .unwrap_or_default()
}
