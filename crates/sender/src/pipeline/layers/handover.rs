//! The hand-overs of the layer split ([`super::split`]): Docker's export read ahead on a task of
//! its own ([`read_ahead`]), and each layer's writer on a thread of its own ([`LayerWriter`]):
//! zstd, BLAKE3 and file writes, then at the layer's end the sync and the commit to the cache.
//! Each hand-over has a fixed set of [`POOL`] buffers of [`CHUNK`] bytes going round, so memory
//! stays bounded and nothing is allocated per chunk.

use std::io::Read;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::cache::{CachedLayer, LayerCache, PinGuard};
use crate::pipeline::compress::PackageSink;
use crate::pipeline::docker::docker_error;
use crate::SenderError;

/// Layer writers alive at once: one compressing while the last one syncs and commits its file.
pub(super) const MAX_WRITERS: usize = 2;
/// Chunks waiting at each hand-over (Docker's stream to the split thread, the split thread to a
/// layer's writer).
const QUEUED_CHUNKS: usize = 4;
/// Buffers of each hand-over: the queued ones, the one being filled and the one being used.
const POOL: usize = QUEUED_CHUNKS + 2;
/// Size of a hand-over's buffers.
const CHUNK: usize = 256 * 1024;

/// A fixed set of [`CHUNK`]-sized buffers going round between two threads: taken from here,
/// handed over, and sent back by the other side, so that no buffer is allocated per chunk.
struct Pool {
    made: usize,
    back: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Pool {
    /// The pool, and the sender the other side returns buffers with (when every such sender is
    /// gone, a pool with no buffer left to give has none: the other side stopped).
    fn new() -> (Self, mpsc::UnboundedSender<Vec<u8>>) {
        let (returns, back) = mpsc::unbounded_channel();
        (Self { made: 0, back }, returns)
    }

    /// A buffer sent back, or a new one while fewer than [`POOL`] exist.
    fn take_now(&mut self) -> Option<Vec<u8>> {
        match self.back.try_recv() {
            Ok(buffer) => Some(buffer),
            Err(_) if self.made < POOL => {
                self.made += 1;
                Some(vec![0u8; CHUNK])
            }
            Err(_) => None,
        }
    }

    /// A buffer, waiting on a blocking thread for one to come back; `None`: the other side
    /// stopped.
    fn take_blocking(&mut self) -> Option<Vec<u8>> {
        self.take_now().or_else(|| self.back.blocking_recv())
    }

    /// A buffer, waiting on a task for one to come back; `None`: the other side stopped.
    async fn take(&mut self) -> Option<Vec<u8>> {
        match self.take_now() {
            Some(buffer) => Some(buffer),
            None => self.back.recv().await,
        }
    }
}

/// Reads Docker's export `stream` ahead on a task of its own, handing it over in full [`CHUNK`]s
/// (the last may be shorter), as a blocking [`Read`]. Docker's error, when the reader comes to it,
/// goes into `docker_failure` (converted with `what`). Dropping the reader ends the task at once,
/// which drops the stream (and so ends the export).
pub(super) fn read_ahead(
    stream: impl Stream<Item = Result<Bytes, bollard::errors::Error>> + Send + 'static,
    docker_failure: Arc<Mutex<Option<SenderError>>>,
    what: String,
) -> ChunkReader {
    let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
    let (mut pool, returns) = Pool::new();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut pending = Bytes::new();
        loop {
            let Some(mut chunk) = pool.take().await else {
                return;
            };
            let mut len = 0;
            let mut ended = false;
            while len < CHUNK {
                if pending.is_empty() {
                    let next = tokio::select! {
                        next = stream.next() => next,
                        () = tx.closed() => return,
                    };
                    match next {
                        Some(Ok(bytes)) => pending = bytes,
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        None => {
                            ended = true;
                            break;
                        }
                    }
                }
                let n = pending.len().min(CHUNK - len);
                chunk[len..len + n].copy_from_slice(&pending[..n]);
                pending.advance(n);
                len += n;
            }
            if len > 0 && tx.send(Ok((chunk, len))).await.is_err() {
                return;
            }
            if ended {
                return;
            }
        }
    });
    ChunkReader {
        rx,
        returns,
        current: None,
        docker_failure,
        what,
    }
}

/// The blocking end of [`read_ahead`].
pub(super) struct ChunkReader {
    rx: mpsc::Receiver<Result<(Vec<u8>, usize), bollard::errors::Error>>,
    returns: mpsc::UnboundedSender<Vec<u8>>,
    /// The chunk being read, its length and how far it was read.
    current: Option<(Vec<u8>, usize, usize)>,
    docker_failure: Arc<Mutex<Option<SenderError>>>,
    what: String,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.current.take() {
                Some((chunk, len, at)) if at < len => {
                    let n = out.len().min(len - at);
                    out[..n].copy_from_slice(&chunk[at..at + n]);
                    self.current = Some((chunk, len, at + n));
                    return Ok(n);
                }
                Some((chunk, _, _)) => {
                    let _ = self.returns.send(chunk);
                }
                None => match self.rx.blocking_recv() {
                    Some(Ok((chunk, len))) => self.current = Some((chunk, len, 0)),
                    Some(Err(e)) => {
                        let message = e.to_string();
                        let mut slot = self
                            .docker_failure
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        slot.get_or_insert(docker_error(&self.what, e));
                        return Err(std::io::Error::other(message));
                    }
                    None => return Ok(0),
                },
            }
        }
    }
}

/// A layer's writer ending: the layer committed to the cache, or `None` when it was not kept.
pub(super) type Committing =
    tokio::task::JoinHandle<Result<Option<(CachedLayer, PinGuard)>, SenderError>>;

/// One layer's compression, BLAKE3 and file writes on a blocking thread of its own, which at the
/// layer's end also syncs the file and commits it to the cache (or removes it), so the split
/// thread goes on to the next entry meanwhile.
pub(super) struct LayerWriter {
    tx: mpsc::Sender<(Vec<u8>, usize)>,
    pool: Pool,
    /// Which layer it was (diffID, uncompressed size), or `None`: not kept.
    verdict: tokio::sync::oneshot::Sender<Option<(String, u64)>>,
    task: Committing,
}

impl LayerWriter {
    pub(super) fn spawn(
        handle: &Handle,
        mut sink: PackageSink,
        temp: TempFile,
        cache: LayerCache,
        compression: deploy_protocol::Compression,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Vec<u8>, usize)>(QUEUED_CHUNKS);
        let (verdict, verdict_rx) = tokio::sync::oneshot::channel();
        let (pool, returns) = Pool::new();
        let runtime = handle.clone();
        let task = handle.spawn_blocking(move || {
            // Released when this task ends, however it ends.
            let _permit = permit;
            while let Some((chunk, len)) = rx.blocking_recv() {
                runtime.block_on(sink.write(&chunk[..len]))?;
                let _ = returns.send(chunk);
            }
            drop(returns);
            // Not kept (or the split stopped): the temp file goes with `temp`, unfinished.
            let Ok(Some((diff_id, uncompressed_size))) = verdict_rx.blocking_recv() else {
                return Ok(None);
            };
            let out = runtime.block_on(sink.finish())?;
            runtime
                .block_on(out.file.sync_all())
                .map_err(|e| SenderError::io(format!("cannot sync {}", temp.0.display()), e))?;
            drop(out.file);
            let layer = CachedLayer {
                diff_id,
                compression,
                blake3: out.checksum,
                size: out.size,
                uncompressed_size,
                created_at: String::new(),
                path: Default::default(),
            };
            let committed = runtime.block_on(cache.commit(&temp.0, layer))?;
            temp.disarm();
            Ok(Some(committed))
        });
        Self {
            tx,
            pool,
            verdict,
            task,
        }
    }

    /// A buffer to read the next bytes into (a new one if the writer has stopped: [`write`]
    /// then says so).
    ///
    /// [`write`]: LayerWriter::write
    pub(super) fn buffer(&mut self) -> Vec<u8> {
        self.pool
            .take_blocking()
            .unwrap_or_else(|| vec![0u8; CHUNK])
    }

    /// Hands the first `len` bytes of `chunk` over. An error when the writer has stopped: its own
    /// error is what its task returns, once [`end`](LayerWriter::end)ed.
    pub(super) fn write(&mut self, chunk: Vec<u8>, len: usize) -> Result<(), SenderError> {
        self.tx.blocking_send((chunk, len)).map_err(|_| {
            SenderError::Internal("the layer writer stopped before the layer's end".into())
        })
    }

    /// Ends the layer: kept as `verdict` (committed to the cache) or removed.
    pub(super) fn end(self, verdict: Option<(String, u64)>) -> Committing {
        drop(self.tx);
        let _ = self.verdict.send(verdict);
        self.task
    }
}

/// Removes a temp file unless disarmed.
pub(super) struct TempFile(pub(super) std::path::PathBuf);

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
