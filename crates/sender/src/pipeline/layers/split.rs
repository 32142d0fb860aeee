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
//! 1 MiB chunks (not one HTTP frame at a time), the split thread parses the tar and hashes each
//! layer, and a layer's compression, BLAKE3 and file writes run on a thread of their own. Each
//! hand-over holds at most [`QUEUED_CHUNKS`] chunks, so memory stays bounded (docs/PERFORMANCE.md,
//! "Where `prepare` goes").

use std::collections::HashSet;
use std::io::Read;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::cache::{CachedLayer, LayerCache, MAX_CONFIG_SIZE};
use crate::pipeline::compress::{CompressionOptions, PackageSink, SinkOutcome};
use crate::pipeline::docker::docker_error;
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
    let slot = Arc::clone(&docker_failure);
    let what = format!("exporting {}", plan.image_id);
    let stream = docker.export_image(&plan.image_id).map(move |chunk| {
        chunk.map_err(|e| {
            let message = e.to_string();
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(docker_error(&what, e));
            std::io::Error::other(message)
        })
    });
    let handle = Handle::current();
    let reader = read_ahead(stream);
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
    let broken = |e: std::io::Error| {
        SenderError::Internal(format!(
            "cannot read the archive Docker exported for {}: {e}",
            plan.image_id
        ))
    };
    let mut outcome = SplitOutcome::default();
    let mut stored: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; 1024 * 1024];
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
                    let (temp, file) = handle.block_on(cache.temp_file())?;
                    let guard = TempFile(temp);
                    let writer =
                        LayerWriter::spawn(handle, PackageSink::new(file, options, u64::MAX)?);
                    sink = Some((writer, guard));
                }
                let mut sha = Sha256::new();
                loop {
                    let n = entry.read(&mut buf).map_err(broken)?;
                    if n == 0 {
                        break;
                    }
                    sha.update(&buf[..n]);
                    if let Some((writer, _)) = sink.as_mut() {
                        writer.write(handle, Bytes::copy_from_slice(&buf[..n]))?;
                    }
                    outcome.read += n as u64;
                    progress.advance(Stage::Export, outcome.read, plan.size_hint);
                }
                let diff_id = format!("sha256:{}", hex::encode(sha.finalize()));
                if named.as_ref().is_some_and(|n| *n != diff_id) {
                    return Err(SenderError::ChecksumMismatch(format!(
                        "layer blob {} Docker exported hashes to {diff_id}",
                        named.unwrap_or_default()
                    )));
                }
                let wanted = plan.wanted.contains(&diff_id) && !stored.contains(&diff_id);
                match sink {
                    Some((writer, temp)) if wanted => {
                        let out = writer.finish(handle)?;
                        handle.block_on(out.file.sync_all()).map_err(|e| {
                            SenderError::io(format!("cannot sync {}", temp.0.display()), e)
                        })?;
                        drop(out.file);
                        let layer = CachedLayer {
                            diff_id: diff_id.clone(),
                            compression: options.compression,
                            blake3: out.checksum,
                            size: out.size,
                            uncompressed_size: size,
                            created_at: String::new(),
                            path: Default::default(),
                        };
                        let layer = handle.block_on(cache.commit(&temp.0, layer))?;
                        temp.disarm();
                        outcome.compressed_input += size;
                        stored.insert(diff_id);
                        outcome.stored.push(layer);
                    }
                    Some(_) => {}
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

/// Chunks waiting at each hand-over (Docker's stream to the split thread, the split thread to a
/// layer's writer).
const QUEUED_CHUNKS: usize = 2;
/// Size of the chunks Docker's stream is handed over in.
const CHUNK: usize = 1024 * 1024;

/// Reads `stream` ahead on a task of its own, in chunks of [`CHUNK`] bytes (the last may be
/// shorter), as a blocking [`Read`]. Dropping the reader ends the task, which drops the stream.
fn read_ahead(stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static) -> ChunkReader {
    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut chunk = BytesMut::with_capacity(CHUNK);
        loop {
            match stream.next().await {
                Some(Ok(bytes)) => {
                    chunk.extend_from_slice(&bytes);
                    if chunk.len() >= CHUNK {
                        let full = std::mem::replace(&mut chunk, BytesMut::with_capacity(CHUNK));
                        if tx.send(Ok(full.freeze())).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                None => {
                    if !chunk.is_empty() {
                        let _ = tx.send(Ok(chunk.freeze())).await;
                    }
                    return;
                }
            }
        }
    });
    ChunkReader {
        rx,
        current: Bytes::new(),
    }
}

/// The blocking end of [`read_ahead`].
struct ChunkReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// One layer's compression, BLAKE3 and file writes, on a blocking thread of its own.
struct LayerWriter {
    tx: mpsc::Sender<Bytes>,
    task: tokio::task::JoinHandle<Result<SinkOutcome, SenderError>>,
}

impl LayerWriter {
    fn spawn(handle: &Handle, mut sink: PackageSink) -> Self {
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let runtime = handle.clone();
        let task = handle.spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                runtime.block_on(sink.write(&chunk))?;
            }
            runtime.block_on(sink.finish())
        });
        Self { tx, task }
    }

    /// Hands `chunk` over; the writer's own error when it has stopped.
    fn write(&mut self, handle: &Handle, chunk: Bytes) -> Result<(), SenderError> {
        if self.tx.blocking_send(chunk).is_ok() {
            return Ok(());
        }
        match handle.block_on(&mut self.task) {
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Err(SenderError::Internal(
                "the layer writer stopped before the layer's end".into(),
            )),
            Err(e) => Err(SenderError::Internal(format!(
                "the layer writer failed: {e}"
            ))),
        }
    }

    /// Ends the layer: the compressed stream's tail written, the totals.
    fn finish(self, handle: &Handle) -> Result<SinkOutcome, SenderError> {
        drop(self.tx);
        handle
            .block_on(self.task)
            .map_err(|e| SenderError::Internal(format!("the layer writer failed: {e}")))?
    }
}

/// Removes a temp file unless disarmed.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
