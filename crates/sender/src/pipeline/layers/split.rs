//! Splitting one streamed `docker save` into layer blobs. Each layer tar is hashed (sha256: its
//! diffID) while it streams; the layers the cache lacks are compressed on the way into temp files
//! and committed under the diffID they turn out to have. Nothing uncompressed is written and no
//! layer is held in memory (1 MiB at a time).
//!
//! Docker 20.10 writes the legacy layout in lexical order (`<id>.json`, `<v1 id>/layer.tar`...,
//! `manifest.json` last), so a layer's diffID is known only once it has been read. A layer tar
//! whose size equals that of one of the image's already cached layers is only hashed; should it
//! turn out to be a missing one after all (two layers of equal size), it is reported in
//! [`SplitOutcome::missed`] and the caller splits again without that shortcut. Docker 25's OCI
//! layout names layer blobs by diffID (`blobs/sha256/<hex>`), so there the decision is exact.
//!
//! Three stages overlap: Docker's stream is read ahead on a task of its own and handed over in
//! full chunks (not one HTTP frame at a time), the split thread parses the tar and hashes each
//! layer, and a layer's compression (zstd on that one thread), BLAKE3 and file writes run on a
//! thread of their own, which at the layer's end also syncs and commits it while the split thread
//! reads on ([`super::handover`]; docs/PERFORMANCE.md, "`prepare` in three overlapping stages").

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};

use bollard::Docker;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use super::cache::{CachedLayer, LayerCache, PinGuard, MAX_CONFIG_SIZE};
use super::handover::{read_ahead, Committing, LayerWriter, TempFile, MAX_WRITERS};
use crate::pipeline::compress::{CompressionOptions, PackageSink};
use crate::pipeline::progress::{Progress, ProgressExt, Stage};
use crate::SenderError;

/// What to take out of the archive.
#[derive(Debug, Clone)]
pub(crate) struct SplitPlan {
    /// The image to save, `sha256:<hex>`.
    pub image_id: String,
    /// Every diffID of the image.
    pub diff_ids: HashSet<String>,
    /// The diffIDs to compress and cache.
    pub wanted: HashSet<String>,
    /// Uncompressed sizes of the image's cached layers (a layer tar of such a size is only hashed).
    pub cached_sizes: HashSet<u64>,
    /// Whether the config must be read.
    pub need_config: bool,
    /// The image's size, for progress.
    pub size_hint: Option<u64>,
}

/// What came out.
#[derive(Debug, Default)]
pub(crate) struct SplitOutcome {
    /// The config bytes, when asked for.
    pub config: Option<Vec<u8>>,
    /// Layers compressed and committed to the cache.
    pub stored: Vec<CachedLayer>,
    /// Pins on `stored` (taken as each was committed), held until the caller pins the image.
    pub pins: Vec<PinGuard>,
    /// Wanted layers that were only hashed (size collision with a cached one).
    pub missed: Vec<String>,
    /// Uncompressed layer bytes compressed.
    pub compressed_input: u64,
    /// Archive bytes read.
    pub read: u64,
}

enum Entry {
    Config,
    /// A layer tar, with its diffID when the path names it.
    Layer(Option<String>),
    Skip,
}

fn classify(path: &Path, plan: &SplitPlan) -> Entry {
    let parts: Vec<&str> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let image_hex = plan.image_id.trim_start_matches("sha256:");
    match parts.as_slice() {
        [name] if name.strip_suffix(".json") == Some(image_hex) => Entry::Config,
        [_, "layer.tar"] => Entry::Layer(None),
        ["blobs", "sha256", hex] if *hex == image_hex => Entry::Config,
        ["blobs", "sha256", hex] => {
            let digest = format!("sha256:{hex}");
            if plan.wanted.contains(&digest) {
                Entry::Layer(Some(digest))
            } else {
                Entry::Skip
            }
        }
        _ => Entry::Skip,
    }
}

/// Runs `docker save` of `plan.image_id` once and splits it (see the module comment).
pub(crate) async fn split_save(
    docker: &Docker,
    cache: &LayerCache,
    plan: SplitPlan,
    options: CompressionOptions,
    progress: Arc<dyn Progress>,
) -> Result<SplitOutcome, SenderError> {
    let docker_failure: Arc<Mutex<Option<SenderError>>> = Arc::default();
    let what = format!("exporting {}", plan.image_id);
    let stream = docker.export_image(&plan.image_id);
    let handle = Handle::current();
    let reader = read_ahead(stream, Arc::clone(&docker_failure), what);
    let cache = cache.clone();
    let result = tokio::task::spawn_blocking(move || {
        split_blocking(reader, &handle, &cache, &plan, &options, &*progress)
    })
    .await
    .map_err(|e| SenderError::Internal(format!("the layer split task failed: {e}")))?;
    match result {
        Err(e) => {
            let docker = docker_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            Err(docker.unwrap_or(e))
        }
        ok => ok,
    }
}

fn split_blocking(
    reader: impl Read,
    handle: &Handle,
    cache: &LayerCache,
    plan: &SplitPlan,
    options: &CompressionOptions,
    progress: &dyn Progress,
) -> Result<SplitOutcome, SenderError> {
    // Layers still being synced and committed by their writers, waited for whatever happened.
    let mut committing = Vec::new();
    let split = split_entries(
        reader,
        handle,
        cache,
        plan,
        options,
        progress,
        &mut committing,
    );
    let mut committed = Vec::new();
    let mut pins = Vec::new();
    let mut failed = None;
    for task in committing {
        match handle.block_on(task) {
            Ok(Ok(Some((layer, pin)))) => {
                committed.push(layer);
                pins.push(pin);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => {
                failed = failed.or(Some(SenderError::Internal(format!(
                    "the layer writer failed: {e}"
                ))))
            }
        }
    }
    // A writer's own failure (a full disk) is the cause of the split's, when both failed.
    if let Some(e) = failed {
        return Err(e);
    }
    let mut outcome = split?;
    outcome.stored = committed;
    outcome.pins = pins;
    Ok(outcome)
}

fn split_entries(
    reader: impl Read,
    handle: &Handle,
    cache: &LayerCache,
    plan: &SplitPlan,
    options: &CompressionOptions,
    progress: &dyn Progress,
    committing: &mut Vec<Committing>,
) -> Result<SplitOutcome, SenderError> {
    let broken = |e: std::io::Error| {
        SenderError::Internal(format!(
            "cannot read the archive Docker exported for {}: {e}",
            plan.image_id
        ))
    };
    let mut outcome = SplitOutcome::default();
    let mut stored: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let writers = Arc::new(tokio::sync::Semaphore::new(MAX_WRITERS));
    let mut archive = tar::Archive::new(reader);
    progress.advance(Stage::Export, 0, plan.size_hint);
    for entry in archive.entries().map_err(broken)? {
        let done = outcome.config.is_some() || !plan.need_config;
        if done && plan.wanted.iter().all(|d| stored.contains(d)) {
            // Everything needed is in: stop reading (dropping the stream ends the export).
            break;
        }
        let mut entry = entry.map_err(broken)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().map_err(broken)?.into_owned();
        let size = entry.size();
        match classify(&path, plan) {
            Entry::Skip => {}
            Entry::Config => {
                if size > MAX_CONFIG_SIZE {
                    return Err(SenderError::Validation(format!(
                        "the config of {} is {size} bytes, more than {MAX_CONFIG_SIZE}",
                        plan.image_id
                    )));
                }
                let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                entry.read_to_end(&mut bytes).map_err(broken)?;
                outcome.read += bytes.len() as u64;
                outcome.config = Some(bytes);
            }
            Entry::Layer(named) => {
                let compress = named.is_some() || !plan.cached_sizes.contains(&size);
                let mut sink = None;
                if compress {
                    // At most MAX_WRITERS layers compressing or committing at once.
                    let permit = handle
                        .block_on(Arc::clone(&writers).acquire_owned())
                        .map_err(|e| SenderError::Internal(format!("layer writers: {e}")))?;
                    let (temp, file) = handle.block_on(cache.temp_file())?;
                    let temp = TempFile(temp);
                    // zstd on the writer's own thread: the writer already runs beside the
                    // split, and a multi-threaded zstd context per layer cost 30-40 MiB more
                    // (docs/PERFORMANCE.md, "`prepare` in three overlapping stages").
                    let single = CompressionOptions {
                        zstd_workers: 0,
                        ..*options
                    };
                    let file_sink = PackageSink::new(file, &single, u64::MAX)?;
                    let (cache, compression) = (cache.clone(), options.compression);
                    let writer =
                        LayerWriter::spawn(handle, file_sink, temp, cache, compression, permit);
                    sink = Some(writer);
                }
                let counted = (&mut outcome.read, progress, plan.size_hint);
                let read = read_layer(&mut entry, sink.as_mut(), &mut buf, counted)
                    .map_err(|e| match e {
                        LayerReadError::Archive(e) => broken(e),
                        LayerReadError::Writer(e) => e,
                    })
                    .and_then(|diff_id| match named {
                        Some(named) if named != diff_id => Err(SenderError::ChecksumMismatch(
                            format!("layer blob {named} Docker exported hashes to {diff_id}"),
                        )),
                        _ => Ok(diff_id),
                    });
                let diff_id = match read {
                    Ok(diff_id) => diff_id,
                    Err(e) => {
                        // Its writer removes its temp file; the caller waits for that.
                        if let Some(writer) = sink {
                            committing.push(writer.end(None));
                        }
                        return Err(e);
                    }
                };
                let wanted = plan.wanted.contains(&diff_id) && !stored.contains(&diff_id);
                match sink {
                    Some(writer) if wanted => {
                        // Its writer syncs and commits it while the next entries are read.
                        committing.push(writer.end(Some((diff_id.clone(), size))));
                        outcome.compressed_input += size;
                        stored.insert(diff_id);
                    }
                    Some(writer) => {
                        committing.push(writer.end(None));
                    }
                    None if wanted => outcome.missed.push(diff_id),
                    None => {
                        if !plan.diff_ids.contains(&diff_id) {
                            tracing::warn!(%diff_id, image = %plan.image_id, "docker save carried a layer the image does not list");
                        }
                    }
                }
            }
        }
    }
    progress.finish(Stage::Export, outcome.read);
    Ok(outcome)
}

/// Why a layer could not be read to its end.
enum LayerReadError {
    /// The archive (Docker's stream) broke.
    Archive(std::io::Error),
    /// The layer's writer stopped (its own error is what its task returns).
    Writer(SenderError),
}

/// Reads one layer tar to its end, hashing it and handing it to `writer` when it is compressed;
/// its diffID. `counted` is the count of archive bytes read, advanced on the progress as it goes.
fn read_layer(
    entry: &mut impl Read,
    mut writer: Option<&mut LayerWriter>,
    buf: &mut [u8],
    counted: (&mut u64, &dyn Progress, Option<u64>),
) -> Result<String, LayerReadError> {
    let (read, progress, size_hint) = counted;
    let mut sha = Sha256::new();
    loop {
        // A layer being compressed is read straight into its writer's buffers.
        let mut chunk = writer.as_deref_mut().map(LayerWriter::buffer);
        let into = chunk.as_deref_mut().unwrap_or(&mut *buf);
        let n = entry.read(into).map_err(LayerReadError::Archive)?;
        if n == 0 {
            return Ok(format!("sha256:{}", hex::encode(sha.finalize())));
        }
        sha.update(&into[..n]);
        if let (Some(writer), Some(chunk)) = (writer.as_deref_mut(), chunk.take()) {
            writer.write(chunk, n).map_err(LayerReadError::Writer)?;
        }
        *read += n as u64;
        progress.advance(Stage::Export, *read, size_hint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::layers::digest_hex;
    use crate::pipeline::progress::NoProgress;

    fn plan() -> SplitPlan {
        let wanted = format!("sha256:{}", "b".repeat(64));
        SplitPlan {
            image_id: format!("sha256:{}", "a".repeat(64)),
            diff_ids: [wanted.clone()].into(),
            wanted: [wanted].into(),
            cached_sizes: HashSet::new(),
            need_config: true,
            size_hint: None,
        }
    }

    #[test]
    fn entries_are_classified_in_both_layouts() {
        let plan = plan();
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let kind = |p: &str| match classify(Path::new(p), &plan) {
            Entry::Config => "config".to_owned(),
            Entry::Layer(None) => "layer".to_owned(),
            Entry::Layer(Some(d)) => d,
            Entry::Skip => "skip".to_owned(),
        };
        assert_eq!(kind(&format!("{a}.json")), "config");
        assert_eq!(kind(&format!("{b}/layer.tar")), "layer");
        assert_eq!(kind(&format!("{b}/json")), "skip");
        assert_eq!(kind("manifest.json"), "skip");
        assert_eq!(kind(&format!("blobs/sha256/{a}")), "config");
        assert_eq!(kind(&format!("blobs/sha256/{b}")), format!("sha256:{b}"));
        assert_eq!(kind(&format!("blobs/sha256/{}", "c".repeat(64))), "skip");
    }

    /// An archive of one entry `path` holding `size` bytes of a pattern.
    fn archive(path: &str, size: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(size as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, data.as_slice())
            .expect("entry");
        builder.into_inner().expect("tar")
    }

    /// A reader that breaks off with an error after `limit` bytes. A fake, for a fault that
    /// cannot be caused for real: Docker's export stream failing mid-layer.
    struct BreaksAfter {
        bytes: std::io::Cursor<Vec<u8>>,
        limit: u64,
    }

    impl Read for BreaksAfter {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let left = self.limit.saturating_sub(self.bytes.position());
            if left == 0 {
                return Err(std::io::Error::other("the export broke off"));
            }
            let n = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            self.bytes.read(&mut out[..n])
        }
    }

    async fn split(
        reader: impl Read + Send + 'static,
        plan: SplitPlan,
    ) -> (SenderError, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = LayerCache::open(dir.path(), u64::MAX).await.expect("cache");
        let handle = Handle::current();
        let options = CompressionOptions::default();
        let blobs = cache.blobs_dir();
        let err = tokio::task::spawn_blocking(move || {
            split_blocking(reader, &handle, &cache, &plan, &options, &NoProgress)
        })
        .await
        .expect("split task")
        .expect_err("the split fails");
        let left = std::fs::read_dir(blobs)
            .expect("blobs dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        (err, left)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_breaking_off_mid_layer_fails_and_leaves_no_temp_file_once_split_returns() {
        let bytes = archive(&format!("{}/layer.tar", "c".repeat(64)), 3 << 20);
        let reader = BreaksAfter {
            bytes: std::io::Cursor::new(bytes),
            limit: 2 << 20,
        };
        let (err, left) = split(reader, plan()).await;
        assert!(err.to_string().contains("the export broke off"), "{err}");
        assert!(left.is_empty(), "nothing is left in the cache: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_named_layer_hashing_to_another_diff_id_fails_and_leaves_no_temp_file() {
        let plan = plan();
        let named = plan.wanted.iter().next().expect("wanted").clone();
        let bytes = archive(
            &format!("blobs/sha256/{}", digest_hex(&named).expect("hex")),
            1 << 20,
        );
        let (err, left) = split(std::io::Cursor::new(bytes), plan).await;
        assert_eq!(
            err.code(),
            deploy_protocol::ErrorCode::ChecksumMismatch,
            "{err}"
        );
        assert!(left.is_empty(), "nothing is left in the cache: {left:?}");
    }
}
