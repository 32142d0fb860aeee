//! Loading a stored package into Docker: the package file is decompressed on the fly, checked by
//! the archive gate (see [`crate::archive`]) and streamed into `docker load`, one load at a time.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use async_compression::zstd::DParameter;
use bollard::image::ImportImageOptions;
use bollard::models::BuildInfo;
use bytes::{Bytes, BytesMut};
use deploy_protocol::api::LoadResponse;
use deploy_protocol::{Checksum, Compression};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use crate::archive::{ArchiveError, ArchiveSummary, Gate, Policy};
use crate::error::{ReceiverError, Result};
use crate::state::AppState;
use crate::store::StoredPackage;

/// Largest zstd window accepted, as a power of two (128 MiB: zstd's own default limit, pinned
/// here so that a tiny frame cannot ask for gigabytes of decoder memory). Packages made with
/// `zstd --long` beyond 27 are refused.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Compressed bytes read from the package file at once.
const READ_BUFFER: usize = 256 * 1024;
/// Decompressed bytes read into the gate at once.
const CHUNK: usize = 256 * 1024;

/// One image load at a time per process (one process serves one engine): concurrent loads
/// compete for the engine's disk and CPU, and later ones simply wait their turn.
static LOAD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the gate concluded, shared between the request body (polled by the HTTP client) and
/// the load call.
type Verdict = Arc<Mutex<Option<std::result::Result<ArchiveSummary, ArchiveError>>>>;

/// Loads `package` into Docker after checking its archive in the same pass; waits for any load
/// in progress first. A refused or corrupt archive is LOAD_FAILED and leaves the engine as it was.
pub async fn load_package(state: &AppState, package: &StoredPackage) -> Result<LoadResponse> {
    let id = package.manifest.package_id;
    let _turn = load_turn().await;
    let started = Instant::now();
    let file = tokio::fs::File::open(&package.path).await?;
    let policy = Policy {
        allowed_tags: package.manifest.image_tags.clone(),
        max_bytes: state.config().max_image_size,
        omitted_layers: Vec::new(),
    };
    let compression = package.manifest.compression;
    let what = format!("package {id}");
    // What Docker reads is hashed on the way: a file swapped after it was verified is refused.
    let hashed = Hashed::default();
    let reader = HashingReader {
        inner: file,
        hashed: hashed.clone(),
    };
    let check = BodyCheck::Hashed {
        hashed,
        size: package.manifest.package_size,
        checksum: package.manifest.package_checksum,
    };
    let (summary, image_id, tags) = load_archive(
        state,
        &what,
        decompress(reader, compression),
        compression,
        Some(check),
        policy,
    )
    .await?;
    let duration = started.elapsed();
    state.metrics().stage("load", duration.as_secs_f64());
    tracing::info!(package_id = %id, image_id = %image_id, tags = ?tags, bytes = summary.bytes, elapsed_ms = duration.as_millis() as u64, "image loaded");
    Ok(LoadResponse {
        package_id: id,
        image_id,
        image_tags: tags,
        duration_ms: duration.as_millis() as u64,
    })
}

/// The turn to load: one load at a time per process.
pub async fn load_turn() -> tokio::sync::MutexGuard<'static, ()> {
    LOAD_LOCK.lock().await
}

/// The turn to load if no load is in progress.
pub fn try_load_turn() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    LOAD_LOCK.try_lock().ok()
}

/// Streams `reader` (an archive, `compression` only naming its source's format in messages)
/// through the gate into `docker load`; with a `check`, the source must hash to it before the
/// archive's tail goes to Docker. The caller holds [`load_turn`]. Returns the gate's summary,
/// the loaded image id and the tags Docker set. `what` names the source in messages. The loaded
/// image is recorded as verified; a tag of an image this receiver did not load is never moved.
pub(crate) async fn load_archive(
    state: &AppState,
    what: &str,
    reader: Pin<Box<dyn AsyncRead + Send>>,
    compression: Compression,
    check: Option<BodyCheck>,
    policy: Policy,
) -> Result<(ArchiveSummary, String, Vec<String>)> {
    let docker = state.docker().client().await?;
    let foreign = if state.config().allow_unverified_images {
        Vec::new()
    } else {
        foreign_tags(state, &docker, &policy.allowed_tags).await?
    };
    let verdict = Verdict::default();
    let body = gated_body(
        reader,
        compression,
        check,
        Gate::new(policy),
        verdict.clone(),
    );
    let output =
        read_output(docker.import_image_stream(ImportImageOptions { quiet: true }, body, None))
            .await;
    let verdict = verdict
        .lock()
        .map_err(|_| ReceiverError::Internal("load verdict poisoned".into()))?
        .take();
    let (summary, loaded) = match (verdict, output) {
        (Some(Err(refusal)), _) => {
            return Err(ReceiverError::LoadFailed(format!(
                "{what} was not loaded: {refusal}"
            )))
        }
        (_, Err(e)) => return Err(load_error(what, e)),
        (None, Ok(_)) => {
            return Err(ReceiverError::LoadFailed(format!(
                "Docker ended the load of {what} before the archive was read to its end"
            )))
        }
        (Some(Ok(summary)), Ok(loaded)) => (summary, loaded),
    };
    let image_id = match (loaded.image_ids.first(), loaded.tags.first()) {
        (Some(image_id), _) => image_id.clone(),
        (None, Some(tag)) => docker
            .inspect_image(tag)
            .await
            .map_err(|e| load_error(what, e))?
            .id
            .ok_or_else(|| {
                ReceiverError::LoadFailed(format!("Docker reports no id for the loaded {tag}"))
            })?,
        (None, None) => {
            return Err(ReceiverError::LoadFailed(format!(
                "Docker reported no loaded image for {what}"
            )))
        }
    };
    keep_foreign_tags(&docker, &foreign).await?;
    for loaded_id in loaded.image_ids.iter().chain(std::iter::once(&image_id)) {
        state.images().add(loaded_id).map_err(|e| {
            ReceiverError::Internal(format!(
                "image {loaded_id} was loaded but could not be recorded as verified: {e}"
            ))
        })?;
    }
    Ok((summary, image_id, loaded.tags))
}

/// BLAKE3 of the package bytes read so far (its count is their number).
type Hashed = Arc<Mutex<blake3::Hasher>>;

/// The package file, hashed as it is read.
struct HashingReader {
    inner: tokio::fs::File,
    hashed: Hashed,
}

impl AsyncRead for HashingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            if let Ok(mut hasher) = self.hashed.lock() {
                hasher.update(&buf.filled()[before..]);
            }
        }
        polled
    }
}

/// What must hold before the archive's tail goes to Docker.
pub(crate) enum BodyCheck {
    /// The package file read must hash to its verified size and checksum.
    Hashed {
        hashed: Hashed,
        size: u64,
        checksum: Checksum,
    },
    /// A streamed package: its seal must have checked out (set by the receiving side only after
    /// the seal's signature and the size and BLAKE3 of every byte matched). A stream that ends
    /// any other way, a dropped request included, is refused.
    Sealed(Arc<std::sync::atomic::AtomicBool>),
}

impl BodyCheck {
    /// Whether the bytes read are the verified package.
    fn verify(&self) -> std::result::Result<(), ArchiveError> {
        let (hashed, size, checksum) = match self {
            BodyCheck::Sealed(sealed) => {
                return if sealed.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(ArchiveError::Corrupt(
                        "the stream ended before its seal checked out".into(),
                    ))
                };
            }
            BodyCheck::Hashed {
                hashed,
                size,
                checksum,
            } => (hashed, *size, checksum),
        };
        let (read, count) = match hashed.lock() {
            Ok(hasher) => (Checksum::from_hasher(&hasher), hasher.count()),
            Err(_) => return Err(ArchiveError::Corrupt("package hash state lost".into())),
        };
        if count == size && read == *checksum {
            Ok(())
        } else {
            Err(ArchiveError::Corrupt(format!(
                "the package file changed after it was verified: read {count} bytes hashing to {read}, the signed manifest says {size} bytes hashing to {checksum}"
            )))
        }
    }
}

/// The package's tags that already name an image this receiver did not load (an image the host
/// had, such as `nginx:latest`), with that image's id.
async fn foreign_tags(
    state: &AppState,
    docker: &bollard::Docker,
    tags: &[String],
) -> Result<Vec<(String, String)>> {
    let mut foreign = Vec::new();
    for tag in tags {
        let current = match docker.inspect_image(tag).await {
            Ok(image) => image.id.unwrap_or_default(),
            Err(e) => match crate::docker::map_err(e, ReceiverError::Internal) {
                ReceiverError::NotFound(_) => continue,
                other => return Err(other),
            },
        };
        if !state.images().contains(&current) {
            foreign.push((tag.clone(), current));
        }
    }
    Ok(foreign)
}

/// After a load: a tag that named an image this receiver did not load must still name it. The
/// same image loaded again (same content, same id) is fine; a tag the load moved is put back on
/// its image and the load refused (POLICY_DENIED), so a package cannot re-point `nginx:latest`.
async fn keep_foreign_tags(docker: &bollard::Docker, foreign: &[(String, String)]) -> Result<()> {
    let mut moved = Vec::new();
    for (tag, before) in foreign {
        let now = docker
            .inspect_image(tag)
            .await
            .ok()
            .and_then(|image| image.id)
            .unwrap_or_default();
        if &now == before {
            continue;
        }
        let (repo, name) = tag.rsplit_once(':').unwrap_or((tag.as_str(), "latest"));
        let options = bollard::image::TagImageOptions { repo, tag: name };
        if let Err(e) = docker.tag_image(before, Some(options)).await {
            tracing::error!(tag = %tag, image = %before, error = %e, "could not put a moved tag back");
        }
        moved.push(format!("{tag} (on {before})"));
    }
    if moved.is_empty() {
        return Ok(());
    }
    Err(ReceiverError::PolicyDenied(format!(
        "the package would move tags from images this receiver did not load from a verified package: {}; they were put back (ALLOW_UNVERIFIED_IMAGES lets a package move them)",
        moved.join(", ")
    )))
}

/// A package or blob file's bytes, decompressed.
pub fn decompress(
    file: impl AsyncRead + Send + 'static,
    compression: Compression,
) -> Pin<Box<dyn AsyncRead + Send>> {
    let buffered = BufReader::with_capacity(READ_BUFFER, file);
    match compression {
        Compression::Gzip => {
            let mut decoder = GzipDecoder::new(buffered);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Compression::Zstd => {
            let mut decoder = ZstdDecoder::with_params(
                buffered,
                &[DParameter::window_log_max(ZSTD_WINDOW_LOG_MAX)],
            );
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Compression::None => Box::pin(buffered),
    }
}

struct BodyState {
    reader: Pin<Box<dyn AsyncRead + Send>>,
    compression: Compression,
    check: Option<BodyCheck>,
    gate: Gate,
    verdict: Verdict,
    buf: BytesMut,
}

impl BodyState {
    fn decide(&self, verdict: std::result::Result<ArchiveSummary, ArchiveError>) {
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
    }
}

/// The request body of `docker load`: what the gate lets through, then either the held-back
/// tail (all checks passed, the source hashed to its signed checksum) or the gate's poison
/// (refused). The stream is pulled by the HTTP
/// client; if the request is abandoned midway, the connection closes inside the chunked body
/// and Docker sees a broken upload, not a complete archive.
fn gated_body(
    reader: Pin<Box<dyn AsyncRead + Send>>,
    compression: Compression,
    check: Option<BodyCheck>,
    gate: Gate,
    verdict: Verdict,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let start = BodyState {
        reader,
        compression,
        check,
        gate,
        verdict,
        buf: BytesMut::new(),
    };
    futures::stream::unfold(Some(start), |body| async move {
        let mut body = body?;
        loop {
            body.buf.reserve(CHUNK);
            let step = match body.reader.read_buf(&mut body.buf).await {
                Ok(0) => match body
                    .check
                    .as_ref()
                    .map_or(Ok(()), BodyCheck::verify)
                    .and_then(|()| body.gate.finish())
                {
                    Ok((rest, summary)) => {
                        body.decide(Ok(summary));
                        return (!rest.is_empty()).then_some((rest, None));
                    }
                    Err(e) => Err(e),
                },
                Ok(_) => {
                    let chunk = body.buf.split();
                    body.gate.push(&chunk)
                }
                Err(e) => Err(ArchiveError::Corrupt(match body.compression {
                    Compression::None => format!("the archive cannot be read: {e}"),
                    other => format!("the package is not a valid {other} stream: {e}"),
                })),
            };
            match step {
                Ok(out) if out.is_empty() => continue,
                Ok(out) => return Some((out, Some(body))),
                Err(refusal) => {
                    let poison = body.gate.poison();
                    body.decide(Err(refusal));
                    return (!poison.is_empty()).then_some((poison, None));
                }
            }
        }
    })
}

/// What `docker load` printed.
#[derive(Debug, Default)]
struct Loaded {
    tags: Vec<String>,
    image_ids: Vec<String>,
}

async fn read_output(
    output: impl Stream<Item = std::result::Result<BuildInfo, bollard::errors::Error>>,
) -> std::result::Result<Loaded, bollard::errors::Error> {
    let mut output = std::pin::pin!(output);
    let mut loaded = Loaded::default();
    while let Some(info) = output.next().await {
        let info = info?;
        if let Some(message) = info.error_detail.and_then(|d| d.message) {
            return Err(bollard::errors::Error::DockerStreamError { error: message });
        }
        for line in info.stream.iter().flat_map(|s| s.lines()) {
            // The containerd image store reports a failed unpack in the stream and still
            // answers 200: a failure all the same.
            if line.contains("Error unpacking") {
                return Err(bollard::errors::Error::DockerStreamError {
                    error: line.trim().to_owned(),
                });
            }
            if let Some(image_id) = line.strip_prefix("Loaded image ID: ") {
                loaded.image_ids.push(image_id.trim().to_owned());
            } else if let Some(tag) = line.strip_prefix("Loaded image: ") {
                loaded.tags.push(tag.trim().to_owned());
            }
        }
    }
    Ok(loaded)
}

fn load_error(what: &str, e: bollard::errors::Error) -> ReceiverError {
    match e {
        bollard::errors::Error::DockerStreamError { error } => {
            ReceiverError::LoadFailed(format!("Docker could not load {what}: {error}"))
        }
        e => crate::docker::map_err(e, |m| {
            ReceiverError::LoadFailed(format!("Docker could not load {what}: {m}"))
        }),
    }
}
