//! Streamed upload: the multipart body is read part by part, the signed manifest is verified
//! before one byte of the package is read, and the package flows to a temp file through BLAKE3
//! and a byte count on a blocking writer thread (its writeback to disk started along the way),
//! then is fsynced and renamed into the store.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, BodyDataStream};
use axum::http::request::Parts;
use bytes::Bytes;
use deploy_protocol::api::StoreOutcome;
use deploy_protocol::multipart::{
    MANIFEST_CONTENT_TYPE, MAX_BYTES_BEFORE_AUTHENTICATION, MAX_MANIFEST_BYTES,
    PACKAGE_CONTENT_TYPE, PART_MANIFEST, PART_PACKAGE,
};
use deploy_protocol::{Checksum, PackageManifest};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::auth::authenticate;
use crate::deadline::BodyTimeout;
use crate::error::{ReceiverError, Result};
use crate::state::{AppState, InFlight};
use crate::store::{StoredPackage, TempGuard};

/// Disk space kept free beyond the declared package size.
pub(crate) const FREE_SPACE_MARGIN: u64 = 16 * 1024 * 1024;

/// A received, verified and stored package.
#[derive(Debug)]
pub struct Received {
    /// The stored package and its manifest.
    pub package: StoredPackage,
    /// New, or the same package already stored.
    pub outcome: StoreOutcome,
    /// Package bytes received.
    pub bytes: u64,
    /// Time from the first manifest byte to the stored file.
    pub duration: Duration,
}

/// Receives one `manifest` + `package` multipart upload.
///
/// On a refusal the rest of the body is read and discarded in the background (at most
/// [`DRAIN_LIMIT`] bytes for [`DRAIN_TIME`]) while the answer goes out: a client still sending
/// then reads the `429`, `401` or `413` instead of a connection reset, and can tell a refusal
/// it must not repeat from a fault it may retry.
///
/// `admit` judges the authenticated manifest before a byte of the package is read or a slot
/// taken (`/deployment/full` checks its deployment spec against policy there): a refusal stores
/// nothing.
pub async fn receive_multipart(
    state: &AppState,
    parts: &Parts,
    body: Body,
    admit: impl FnOnce(&PackageManifest) -> Result<()>,
) -> Result<Received> {
    let upload = MultipartUpload::new(body);
    let drain = upload.drain_handle();
    let result = receive(state, parts, upload, admit).await;
    if result.is_err() {
        drain.drain_in_background();
    }
    result
}

/// A multipart upload being read part by part: the signed `manifest` part first, with at most
/// [`MAX_BYTES_BEFORE_AUTHENTICATION`] bytes read until it is authenticated. After a refusal the
/// caller drains the rest of the body with [`MultipartUpload::drain_handle`]'s handle.
pub(crate) struct MultipartUpload {
    reader: Option<SharedBody>,
    budget: Budget,
    body: Arc<Mutex<Option<BodyDataStream>>>,
}

/// The body of a refused upload, to be drained (see [`drain_in_background`]).
pub(crate) struct DrainHandle(Arc<Mutex<Option<BodyDataStream>>>);

impl DrainHandle {
    /// Reads and discards the rest of the body on a task of its own.
    pub(crate) fn drain_in_background(&self) {
        if let Some(stream) = self.0.lock().ok().and_then(|mut b| b.take()) {
            drain_in_background(stream);
        }
    }
}

/// An upload whose `manifest` part was read and authenticated.
pub(crate) struct OpenedUpload {
    /// The reader, positioned after the manifest part.
    pub multipart: multer::Multipart<'static>,
    /// The manifest part's bytes (the signed content).
    pub manifest_bytes: Vec<u8>,
    /// BLAKE3 of `manifest_bytes`.
    pub manifest_digest: Checksum,
    /// The request's verified envelope.
    pub headers: deploy_protocol::SignatureHeaders,
    /// When the first byte of the manifest part was asked for.
    pub started: Instant,
}

impl MultipartUpload {
    pub(crate) fn new(body: Body) -> Self {
        let budget = Budget::new();
        let body = Arc::new(Mutex::new(Some(body.into_data_stream())));
        let reader = SharedBody::new(Arc::clone(&body), budget.clone());
        Self {
            reader: Some(reader),
            budget,
            body,
        }
    }

    pub(crate) fn drain_handle(&self) -> DrainHandle {
        DrainHandle(Arc::clone(&self.body))
    }

    /// Reads the `manifest` part (whole within one idle period, at most
    /// [`MAX_MANIFEST_BYTES`]) and authenticates the request over its bytes; then lifts the bound
    /// on what may be read. `fields` are the parts this upload has, in order (for messages).
    pub(crate) async fn open(
        mut self,
        state: &AppState,
        parts: &Parts,
        fields: &'static [&'static str],
        sizes: multer::SizeLimit,
    ) -> Result<OpenedUpload> {
        let started = Instant::now();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let boundary = multer::parse_boundary(content_type).map_err(|_| {
            ReceiverError::Validation("expected a multipart/form-data body with a boundary".into())
        })?;
        let constraints = multer::Constraints::new()
            .allowed_fields(fields.to_vec())
            .size_limit(sizes.for_field(PART_MANIFEST, MAX_MANIFEST_BYTES as u64));
        let reader = self
            .reader
            .take()
            .ok_or_else(|| ReceiverError::Internal("upload opened twice".into()))?;
        let mut multipart = multer::Multipart::with_constraints(reader, boundary, constraints);
        let idle = Duration::from_secs(state.config().upload_idle_timeout_secs);
        // Until the signature is checked, the whole (at most 64 KiB) manifest must come within
        // one idle period: an unauthenticated client cannot hold the upload slot by trickling it.
        let pace = Pace::new(idle, started + idle, "the manifest part");
        let mut field = next_field(&mut multipart, &pace).await?.ok_or_else(|| {
            ReceiverError::Validation(format!("empty upload: expected parts {fields:?}"))
        })?;
        expect_part(&field, PART_MANIFEST, MANIFEST_CONTENT_TYPE, fields)?;
        let mut manifest_bytes = Vec::new();
        while let Some(chunk) = next_chunk(&mut field, &pace).await? {
            if manifest_bytes.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(ReceiverError::Validation(format!(
                    "manifest part is larger than {MAX_MANIFEST_BYTES} bytes"
                )));
            }
            manifest_bytes.extend_from_slice(&chunk);
        }
        drop(field);
        let manifest_digest = Checksum::of(&manifest_bytes);
        let headers = authenticate(state, parts, &manifest_digest)?;
        self.budget.lift();
        Ok(OpenedUpload {
            multipart,
            manifest_bytes,
            manifest_digest,
            headers,
            started,
        })
    }
}

/// Most body bytes read and discarded after a refusal.
pub const DRAIN_LIMIT: u64 = 64 << 20;
/// Longest time spent discarding them.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Most body bytes handed to the multipart reader in one go. It copies everything the connection
/// has ready into one buffer before it yields a chunk: after the writer queue was full for a
/// while that is the whole socket buffer (several MiB), and each queued chunk would hold that
/// much. Past this it is told to come back (woken at once), so a chunk stays about this size.
const GATHER_LIMIT: usize = 1 << 20;

/// The request body, shared between the multipart reader and, after a refusal, the drain.
struct SharedBody {
    body: Arc<Mutex<Option<BodyDataStream>>>,
    /// Bytes yielded since the body last had nothing ready.
    gathered: usize,
    /// Bytes it may still yield before the manifest is authenticated ([`Budget`]).
    budget: Budget,
    /// What a chunk held beyond the budget, yielded once the budget is lifted.
    held: Option<Bytes>,
    /// Polls answered "nothing now" because the budget was spent.
    starved: u32,
}

/// Polls of a spent budget before the body is refused (see [`SharedBody`]'s `poll_next`).
const STARVED_POLLS: u32 = 64;

/// The bound on what is read before authentication: the multipart reader buffers what it is
/// given while it looks for a boundary, so it is given at most
/// [`MAX_BYTES_BEFORE_AUTHENTICATION`] bytes until the manifest's signature is verified.
#[derive(Clone)]
struct Budget(Arc<std::sync::atomic::AtomicUsize>);

impl Budget {
    fn new() -> Self {
        Self(Arc::new(std::sync::atomic::AtomicUsize::new(
            MAX_BYTES_BEFORE_AUTHENTICATION,
        )))
    }

    /// The request authenticated: no more bound here (the package has its own limits).
    fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Relaxed);
    }

    fn left(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn spend(&self, n: usize) {
        let left = self.left();
        if left != usize::MAX {
            self.0.store(left.saturating_sub(n), Ordering::Relaxed);
        }
    }
}

/// The body went past [`MAX_BYTES_BEFORE_AUTHENTICATION`] before the manifest part was whole.
#[derive(Debug, thiserror::Error)]
#[error("more than {MAX_BYTES_BEFORE_AUTHENTICATION} bytes before the end of the manifest part (preamble, part headers and the manifest itself are bounded until it is authenticated)")]
struct OverBudget;

impl futures::Stream for SharedBody {
    type Item = std::result::Result<Bytes, axum::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.gathered >= GATHER_LIMIT {
            self.gathered = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let left = self.budget.left();
        if left == 0 {
            // `multer` reads greedily until the stream has nothing ready: "nothing now" (woken at
            // once) lets it parse what it holds, which for an honest client completes the
            // manifest, after which the budget is lifted. Still asking after that many turns, it
            // is looking for a boundary or a header end that is not within the bound.
            self.starved += 1;
            if self.starved > STARVED_POLLS {
                return Poll::Ready(Some(Err(axum::Error::new(OverBudget))));
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let polled = match self.held.take() {
            Some(held) => Poll::Ready(Some(Ok(held))),
            None => match self.body.lock() {
                Ok(mut body) => match body.as_mut() {
                    Some(stream) => stream.poll_next_unpin(cx),
                    None => Poll::Ready(None),
                },
                Err(_) => Poll::Ready(None),
            },
        };
        // Within the budget: a longer chunk is split, its rest held until the budget is lifted.
        let polled = match polled {
            Poll::Ready(Some(Ok(mut chunk))) if chunk.len() > left => {
                self.held = Some(chunk.split_off(left));
                Poll::Ready(Some(Ok(chunk)))
            }
            other => other,
        };
        if let Poll::Ready(Some(Ok(chunk))) = &polled {
            self.budget.spend(chunk.len());
        }
        match &polled {
            Poll::Ready(Some(Ok(chunk))) => self.gathered += chunk.len(),
            Poll::Pending => self.gathered = 0,
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl SharedBody {
    fn new(body: Arc<Mutex<Option<BodyDataStream>>>, budget: Budget) -> Self {
        Self {
            body,
            gathered: 0,
            budget,
            held: None,
            starved: 0,
        }
    }
}

/// Reads and discards the rest of a refused request's body on a task of its own (at most
/// [`DRAIN_LIMIT`] bytes for [`DRAIN_TIME`]) while the answer goes out. Without it the connection
/// closes with the client's bytes unread, the kernel answers them with a reset, and a client still
/// sending its body can see that reset instead of the answer.
pub fn drain_in_background(mut stream: BodyDataStream) {
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + DRAIN_TIME;
        let mut drained = 0u64;
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, stream.next()).await {
            drained += chunk.len() as u64;
            if drained > DRAIN_LIMIT {
                break;
            }
        }
    });
}

async fn receive(
    state: &AppState,
    parts: &Parts,
    upload: MultipartUpload,
    admit: impl FnOnce(&PackageManifest) -> Result<()>,
) -> Result<Received> {
    const FIELDS: &[&str] = &[PART_MANIFEST, PART_PACKAGE];
    let OpenedUpload {
        mut multipart,
        manifest_bytes,
        started,
        ..
    } = upload
        .open(state, parts, FIELDS, multer::SizeLimit::new())
        .await?;
    let idle = Duration::from_secs(state.config().upload_idle_timeout_secs);
    let manifest = PackageManifest::from_slice(&manifest_bytes)
        .map_err(|e| ReceiverError::Validation(e.to_string()))?;
    let id = manifest.package_id;
    let limit = state.config().max_package_size;
    if manifest.package_size > limit {
        return Err(ReceiverError::TooLarge {
            size: manifest.package_size,
            limit,
        });
    }
    admit(&manifest)?;
    // A slot only for an authenticated upload: clients without a key cannot hold them.
    let _slot = state.upload_slot()?;
    let _in_flight = InFlight::claim(state, id)?;
    let existing = state.store().get(id)?;
    if let Some(existing) = &existing {
        if existing.manifest.package_checksum != manifest.package_checksum {
            return Err(ReceiverError::Conflict(format!(
                "package {id} is already stored with checksum {}; a package id names one content",
                existing.manifest.package_checksum
            )));
        }
    } else {
        let free = state.store().free_bytes();
        let needed = manifest.package_size.saturating_add(FREE_SPACE_MARGIN);
        if free < needed {
            return Err(ReceiverError::InsufficientStorage(format!(
                "not enough free space in the package directory: {needed} bytes needed, {free} free"
            )));
        }
    }

    // Part 2: the package, streamed, at no less than UPLOAD_MIN_RATE on average.
    let min_rate = state.config().upload_min_rate.max(1);
    let allowed = Duration::from_secs(manifest.package_size / min_rate + 1);
    let pace = Pace::new(idle, Instant::now() + idle + allowed, "the upload");
    let mut field = next_field(&mut multipart, &pace).await?.ok_or_else(|| {
        ReceiverError::Validation(format!("missing part {PART_PACKAGE:?} after the manifest"))
    })?;
    expect_part(&field, PART_PACKAGE, PACKAGE_CONTENT_TYPE, FIELDS)?;
    let temp = match existing {
        // An idempotent repeat is hashed to prove it is the same, but not written.
        Some(_) => None,
        None => Some(TempGuard::new(
            state.store().temp_path(id, &manifest.package_checksum),
        )),
    };
    let file = match &temp {
        Some(guard) => Some(crate::store::private_file(guard.path())?),
        None => None,
    };
    let mut writer = SpoolWriter::spawn(file);
    let mut count: u64 = 0;
    while let Some(chunk) = next_chunk(&mut field, &pace).await? {
        count += chunk.len() as u64;
        if count > limit {
            return Err(ReceiverError::TooLarge { size: count, limit });
        }
        if count > manifest.package_size {
            // The upload was admitted (size limit, free space) for its declared size: a longer
            // body is over the limit that applies to it.
            return Err(ReceiverError::TooLarge {
                size: count,
                limit: manifest.package_size,
            });
        }
        state.metrics().received_bytes(chunk.len() as u64);
        writer.send(chunk).await?;
    }
    drop(field);
    if next_field(&mut multipart, &pace).await?.is_some() {
        return Err(ReceiverError::Validation(format!(
            "unexpected part after {PART_PACKAGE:?}: an upload has exactly two parts"
        )));
    }
    let (checksum, written) = writer.finish().await?;
    if written != manifest.package_size || checksum != manifest.package_checksum {
        return Err(ReceiverError::ChecksumMismatch(format!(
            "received {written} bytes hashing to {checksum}, but the signed manifest says {} bytes hashing to {}",
            manifest.package_size, manifest.package_checksum
        )));
    }
    let (package, outcome) = match temp {
        Some(guard) => {
            let stored = state.store().commit(guard.path(), &manifest)?;
            guard.disarm();
            (stored, StoreOutcome::Created)
        }
        None => {
            let stored = state
                .store()
                .get(id)?
                .ok_or_else(|| ReceiverError::NotFound(format!("package {id} vanished")))?;
            (stored, StoreOutcome::Existing)
        }
    };
    Ok(Received {
        package,
        outcome,
        bytes: written,
        duration: started.elapsed(),
    })
}

/// The part must be `expected`, with `content_type` (parameters aside, any case); `fields` are
/// the upload's parts in order, for the message.
pub(crate) fn expect_part(
    field: &multer::Field<'_>,
    expected: &str,
    content_type: &str,
    fields: &[&str],
) -> Result<()> {
    match field.name() {
        Some(name) if name == expected => {}
        other => {
            return Err(ReceiverError::Validation(format!(
                "expected part {expected:?} here, got {:?}: parts are {}",
                other.unwrap_or("<unnamed>"),
                fields
                    .iter()
                    .map(|f| format!("{f:?}"))
                    .collect::<Vec<_>>()
                    .join(" then ")
            )))
        }
    }
    let given = field
        .content_type()
        .map(|m| m.essence_str().to_ascii_lowercase());
    if given.as_deref() != Some(content_type) {
        return Err(ReceiverError::Validation(format!(
            "part {expected:?} must have Content-Type {content_type}, not {}",
            given.as_deref().unwrap_or("none")
        )));
    }
    Ok(())
}

/// How long the next read may take: an idle limit between bytes, and a deadline for the phase.
pub(crate) struct Pace {
    idle: Duration,
    deadline: Instant,
    what: &'static str,
}

impl Pace {
    pub(crate) fn new(idle: Duration, deadline: Instant, what: &'static str) -> Self {
        Self {
            idle,
            deadline,
            what,
        }
    }

    /// Runs `read` until the idle limit or the deadline, whichever comes first.
    async fn limit<T>(&self, read: impl std::future::Future<Output = T>) -> Result<T> {
        let now = Instant::now();
        let left = self.deadline.saturating_duration_since(now);
        match tokio::time::timeout(self.idle.min(left), read).await {
            Ok(value) => Ok(value),
            Err(_) if Instant::now() >= self.deadline => Err(ReceiverError::Timeout(format!(
                "{} took too long (slower than UPLOAD_MIN_RATE allows): upload abandoned",
                self.what
            ))),
            Err(_) => Err(ReceiverError::Timeout(format!(
                "no bytes received for {} s: upload abandoned",
                self.idle.as_secs()
            ))),
        }
    }
}

pub(crate) async fn next_field<'a>(
    multipart: &mut multer::Multipart<'a>,
    pace: &Pace,
) -> Result<Option<multer::Field<'a>>> {
    pace.limit(multipart.next_field())
        .await?
        .map_err(multipart_error)
}

pub(crate) async fn next_chunk(
    field: &mut multer::Field<'_>,
    pace: &Pace,
) -> Result<Option<Bytes>> {
    pace.limit(field.chunk()).await?.map_err(multipart_error)
}

fn multipart_error(e: multer::Error) -> ReceiverError {
    if let Some(why) = BodyTimeout::find(&e) {
        return ReceiverError::Timeout(why);
    }
    if find::<OverBudget>(&e) {
        return ReceiverError::Validation(OverBudget.to_string());
    }
    ReceiverError::Validation(format!("malformed multipart body: {e}"))
}

/// Whether `error` or one of its causes is an `E`.
fn find<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return true;
        }
        current = e.source();
    }
    false
}

enum Chunk {
    Data(Bytes),
    Finish,
}

/// Chunks (each about [`GATHER_LIMIT`]) waiting for the writer, at most: enough for the network
/// to run ahead of a disk that stalls for a moment, little enough that five uploads at once fit
/// the memory target.
const QUEUE_CHUNKS: usize = 4;

/// Hashes and writes on a blocking thread, so that network reads and disk writes overlap.
struct SpoolWriter {
    tx: mpsc::Sender<Chunk>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<(Checksum, u64)>>>,
}

impl SpoolWriter {
    fn spawn(file: Option<std::fs::File>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
        let handle = tokio::task::spawn_blocking(move || {
            let mut hasher = blake3::Hasher::new();
            let mut writeback = Writeback::spawn(file.as_ref())?;
            let mut out = file.map(|f| std::io::BufWriter::with_capacity(1 << 20, f));
            let mut written = 0u64;
            loop {
                match rx.blocking_recv() {
                    Some(Chunk::Data(bytes)) => {
                        hasher.update(&bytes);
                        if let Some(out) = out.as_mut() {
                            out.write_all(&bytes)?;
                            let in_file = written + bytes.len() as u64 - out.buffer().len() as u64;
                            writeback.advance(in_file);
                        }
                        written += bytes.len() as u64;
                    }
                    Some(Chunk::Finish) => break,
                    // The request was abandoned: stop without syncing; the temp guard removes the file.
                    None => return Err(std::io::Error::other("upload abandoned")),
                }
            }
            writeback.finish()?;
            if let Some(out) = out {
                out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            Ok((Checksum::from_hasher(&hasher), written))
        });
        Self {
            tx,
            handle: Some(handle),
        }
    }

    async fn send(&mut self, bytes: Bytes) -> Result<()> {
        if self.tx.send(Chunk::Data(bytes)).await.is_ok() {
            return Ok(());
        }
        // The writer stopped early: its own error says why.
        match self.join().await {
            Ok(_) => Err(ReceiverError::Internal(
                "package writer stopped early".into(),
            )),
            Err(e) => Err(e),
        }
    }

    async fn finish(mut self) -> Result<(Checksum, u64)> {
        let _ = self.tx.send(Chunk::Finish).await;
        self.join().await
    }

    async fn join(&mut self) -> Result<(Checksum, u64)> {
        let handle = self
            .handle
            .take()
            .ok_or_else(|| ReceiverError::Internal("package writer already joined".into()))?;
        match handle.await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::StorageFull => {
                Err(ReceiverError::InsufficientStorage("the package directory's disk filled up while writing; the partial file was removed".into()))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(ReceiverError::Internal(format!("package writer panicked: {e}"))),
        }
    }
}

/// Keeps the disk writing while the upload goes on: every [`WRITEBACK_STEP`] bytes that reached
/// the page cache, a helper thread `fdatasync`s a second handle of the file. The writer never
/// waits for it (a step that comes while a sync runs is left to the next one), and the final
/// fsync finds little left to write, instead of the whole package.
struct Writeback {
    poke: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    started_to: u64,
}

/// How many newly written bytes start a background sync. (8 MiB was slower with five uploads at
/// once than none at all: see docs/PERFORMANCE.md.)
const WRITEBACK_STEP: u64 = 32 << 20;

impl Writeback {
    fn spawn(file: Option<&std::fs::File>) -> std::io::Result<Self> {
        let (mut poke, mut thread) = (None, None);
        if let Some(file) = file {
            let file = file.try_clone()?;
            let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
            thread = Some(
                std::thread::Builder::new()
                    .name("spool-writeback".into())
                    .spawn(move || {
                        while rx.recv().is_ok() {
                            file.sync_data()?;
                        }
                        Ok(())
                    })?,
            );
            poke = Some(tx);
        }
        Ok(Self {
            poke,
            thread,
            started_to: 0,
        })
    }

    /// `in_file`: bytes of the file that reached the page cache.
    fn advance(&mut self, in_file: u64) {
        if in_file.saturating_sub(self.started_to) < WRITEBACK_STEP {
            return;
        }
        if let Some(poke) = &self.poke {
            if poke.try_send(()).is_ok() {
                self.started_to = in_file;
            }
        }
    }

    /// Waits for the helper and returns its error, if any. The handles share one open file
    /// description, and the kernel reports a writeback error once per description: one the
    /// helper saw would not come out of the final fsync again.
    fn finish(mut self) -> std::io::Result<()> {
        self.poke = None;
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(std::io::Error::other("the writeback thread panicked")),
        }
    }
}

impl Drop for Writeback {
    /// An abandoned upload: stop the helper after its current sync.
    fn drop(&mut self) {
        self.poke = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    struct CountWakes(AtomicUsize);

    impl futures::task::ArcWake for CountWakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_multipart_reader_is_handed_about_a_mebibyte_at_a_time_even_when_more_is_ready() {
        const PIECE: usize = 256 << 10;
        let ready = (0..10).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; PIECE])));
        let body = Body::from_stream(futures::stream::iter(ready)).into_data_stream();
        let budget = Budget::new();
        budget.lift();
        let mut shared = SharedBody::new(Arc::new(Mutex::new(Some(body))), budget);
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        let mut bursts = vec![0usize];
        loop {
            match shared.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(chunk)) => *bursts.last_mut().unwrap() += chunk.unwrap().len(),
                Poll::Ready(None) => break,
                Poll::Pending => bursts.push(0),
            }
        }
        assert_eq!(bursts, [GATHER_LIMIT, GATHER_LIMIT, 2 * PIECE]);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            2,
            "woken at once each time, so nothing waits for the network"
        );
    }

    #[test]
    fn before_authentication_the_reader_gets_the_bound_and_then_an_error() {
        const PIECE: usize = 48 << 10;
        let ready = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; PIECE])));
        let body = Body::from_stream(futures::stream::iter(ready)).into_data_stream();
        let budget = Budget::new();
        let mut shared = SharedBody::new(Arc::new(Mutex::new(Some(body))), budget.clone());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut given = 0;
        let mut starved = 0;
        let refused = loop {
            match shared.poll_next_unpin(&mut cx) {
                Poll::Ready(Some(Ok(chunk))) => given += chunk.len(),
                Poll::Ready(Some(Err(e))) => break e.to_string(),
                Poll::Pending => starved += 1,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            starved, STARVED_POLLS,
            "told 'nothing now' before the refusal"
        );
        assert_eq!(given, MAX_BYTES_BEFORE_AUTHENTICATION);
        assert!(
            refused.contains("before the end of the manifest part"),
            "{refused}"
        );
        // Authenticated: the held rest comes, then the remaining chunks.
        budget.lift();
        let mut rest = 0;
        while let Poll::Ready(Some(Ok(chunk))) = shared.poll_next_unpin(&mut cx) {
            rest += chunk.len();
        }
        assert_eq!(given + rest, 4 * PIECE);
    }
}
