//! `POST /deployment/stream`: a package loaded *while it arrives*. The sender streams `docker
//! save` compressed as it is made, so the request is signed over a manifest without the
//! package's size and BLAKE3; those come last, in a `seal` part whose HMAC binds them to the
//! request. The package part flows through decompression and the archive gate straight into
//! `docker load`, and nothing is stored: the gate holds the archive's tail back until the seal has
//! checked out (its signature, then the size and BLAKE3 of every byte that went by), and poisons
//! the archive otherwise, so Docker never keeps an image from bytes that were not verified.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::request::Parts;
use bytes::Bytes;
use deploy_protocol::api::{DeploymentRecord, LoadResponse, Stage, StageOutcome};
use deploy_protocol::multipart::{
    MANIFEST_CONTENT_TYPE, MAX_SEAL_BYTES, PACKAGE_CONTENT_TYPE, PART_MANIFEST, PART_PACKAGE,
    PART_SEAL,
};
use deploy_protocol::stream::{Seal, StreamManifest};
use deploy_protocol::{AuthError, Checksum, DeploymentSpec, SignatureHeaders};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::archive::Policy;
use crate::deploy;
use crate::error::{ReceiverError, Result};
use crate::load;
use crate::spool::{expect_part, next_chunk, next_field, MultipartUpload, OpenedUpload, Pace};
use crate::state::{AppState, InFlight};

/// The parts of a streamed upload, in order.
const FIELDS: &[&str] = &[PART_MANIFEST, PART_PACKAGE, PART_SEAL];
/// Package chunks queued between the network and the load, at most (each what the multipart
/// reader yields: at most about 1 MiB).
const QUEUE_CHUNKS: usize = 4;

/// Receives, loads and deploys one streamed package; the deployment record, or the error that
/// stopped it. Refused before the package is read (signature, manifest, policy, busy), the rest
/// of the body is drained while the answer goes out.
pub async fn receive_and_deploy(
    state: &AppState,
    parts: &Parts,
    body: Body,
) -> Result<DeploymentRecord> {
    let upload = MultipartUpload::new(body);
    let drain = upload.drain_handle();
    let admitted = admit(state, parts, upload).await;
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(e) => {
            state.metrics().upload(e.code().as_str());
            drain.drain_in_background();
            return Err(e);
        }
    };
    let Admitted {
        opened,
        manifest,
        spec,
        image,
        turn,
        _slot,
        _in_flight,
    } = admitted;
    // From here the deployment runs in a task of its own (`deploy::detached`): a client that
    // hangs up ends the package's body, so the load fails and the record says so, instead of the
    // whole deployment being dropped with the request halfway.
    let state = state.clone();
    let result = deploy::detached(&state.clone(), async move {
        let _held = (_slot, _in_flight);
        let state = &state;
        let mut deployment =
            deploy::begin_streamed(state, &spec, &image, manifest.package_id).await?;
        deployment.stage(
            Stage::Verify,
            StageOutcome::Ok,
            Duration::ZERO,
            Some(
                "streamed: loaded as it arrives; Docker gets the archive's tail only once the signed seal (size and BLAKE3 of every byte) checks out"
                    .into(),
            ),
        );
        let load = receive_and_load(state, opened, &manifest, turn);
        deploy::load_and_replace(state, deployment, &spec, &image, load).await
    })
    .await;
    if result.is_err() {
        // A load refused mid-stream leaves the client sending: let it read the answer.
        drain.drain_in_background();
    }
    result
}

/// An authenticated streamed upload that may proceed: its slot and the load turn are held.
struct Admitted {
    opened: OpenedUpload,
    manifest: StreamManifest,
    spec: DeploymentSpec,
    image: String,
    turn: tokio::sync::MutexGuard<'static, ()>,
    _slot: crate::state::UploadSlot,
    _in_flight: InFlight,
}

/// Authenticates the manifest, checks its spec against policy and takes an upload slot and the
/// load turn, all before a byte of the package is read. The turn is not waited for: a load in
/// progress is `429 BUSY` (a client should then send by another path or later), since a stream
/// left unread while it waits would run into its idle timeout.
async fn admit(state: &AppState, parts: &Parts, upload: MultipartUpload) -> Result<Admitted> {
    let sizes = multer::SizeLimit::new().for_field(PART_SEAL, MAX_SEAL_BYTES as u64);
    let opened = upload.open(state, parts, FIELDS, sizes).await?;
    let manifest = StreamManifest::from_slice(&opened.manifest_bytes)
        .map_err(|e| ReceiverError::Validation(e.to_string()))?;
    let (spec, image) = deploy::stream_spec(state, &manifest)?;
    if let Ok(docker) = state.docker().client().await {
        deploy::refuse_unmanaged(&docker, &spec).await?;
    }
    let slot = state.upload_slot()?;
    let in_flight = InFlight::claim(state, manifest.package_id)?;
    let turn = load::try_load_turn().ok_or_else(|| ReceiverError::Busy {
        message: "an image is being loaded into this host's engine; a streamed package is loaded as it arrives, so it is not queued: send it again later or as a release".into(),
        retry_after_secs: 2,
    })?;
    Ok(Admitted {
        opened,
        manifest,
        spec,
        image,
        turn,
        _slot: slot,
        _in_flight: in_flight,
    })
}

/// The package part into `docker load` through the gate, as it arrives, then the seal; the
/// load's answer once both succeeded. The receiving side wins when both failed: a bad seal or a
/// cut stream is what the client needs to hear, not the poisoned load it caused.
async fn receive_and_load(
    state: &AppState,
    opened: OpenedUpload,
    manifest: &StreamManifest,
    _turn: tokio::sync::MutexGuard<'static, ()>,
) -> Result<LoadResponse> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(QUEUE_CHUNKS);
    // Set only once the seal checked out: the gate releases the archive's tail on nothing else.
    let sealed = Arc::new(AtomicBool::new(false));
    let reader = tokio_util::io::StreamReader::new(ReceiverStream::new(rx));
    let policy = Policy {
        allowed_tags: manifest.image_tags.clone(),
        max_bytes: state.config().max_image_size,
        omitted_layers: Vec::new(),
    };
    let what = format!("streamed package {}", manifest.package_id);
    let loading = load::load_archive(
        state,
        &what,
        load::decompress(reader, manifest.compression),
        manifest.compression,
        Some(load::BodyCheck::Sealed(Arc::clone(&sealed))),
        policy,
    );
    let receiving = receive(state, opened, tx, &sealed);
    let (received, loaded) = tokio::join!(receiving, loading);
    let (seal, (summary, image_id, tags)) = match (received, loaded) {
        // The load ended first and the receiving side only saw it go: the load's error says why.
        (Err(ReceiverError::LoadFailed(_)), Err(e)) => {
            state.metrics().upload(e.code().as_str());
            return Err(e);
        }
        (Err(e), _) => {
            state.metrics().upload(e.code().as_str());
            return Err(e);
        }
        (Ok(_), Err(e)) => {
            state.metrics().upload("ok");
            return Err(e);
        }
        (Ok(seal), Ok(loaded)) => (seal, loaded),
    };
    state.metrics().upload("ok");
    let duration = started.elapsed();
    state.metrics().stage("load", duration.as_secs_f64());
    tracing::info!(
        package_id = %manifest.package_id,
        image_id = %image_id,
        tags = ?tags,
        package_bytes = seal.package_size,
        archive_bytes = summary.bytes,
        elapsed_ms = duration.as_millis() as u64,
        mb_per_s = seal.package_size as f64 / 1e6 / duration.as_secs_f64().max(1e-9),
        "streamed package received and loaded"
    );
    if image_id != manifest.image_id {
        return Err(ReceiverError::LoadFailed(format!(
            "the verified stream loaded image {image_id}, but its manifest names {}: the image stays, nothing is run",
            manifest.image_id
        )));
    }
    Ok(LoadResponse {
        package_id: manifest.package_id,
        image_id,
        image_tags: tags,
        duration_ms: duration.as_millis() as u64,
    })
}

/// Reads the package part into `tx` (hashed and counted as it goes), then the seal; ends the
/// load's input cleanly only once the seal checked out, and with an error otherwise (which the
/// gate turns into a poisoned archive).
async fn receive(
    state: &AppState,
    opened: OpenedUpload,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    sealed: &AtomicBool,
) -> Result<Seal> {
    let result = read_parts(state, opened, &tx).await;
    if result.is_ok() {
        sealed.store(true, Ordering::SeqCst);
    }
    if let Err(e) = &result {
        // The load must not see a clean end: hand it the refusal (it may be gone already).
        let _ = tx
            .send(Err(std::io::Error::other(format!(
                "the stream was refused: {e}"
            ))))
            .await;
    }
    result
}

async fn read_parts(
    state: &AppState,
    opened: OpenedUpload,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<Seal> {
    let OpenedUpload {
        mut multipart,
        manifest_digest,
        headers,
        ..
    } = opened;
    let config = state.config();
    let idle = Duration::from_secs(config.upload_idle_timeout_secs);
    let limit = config.max_package_size;
    // No declared size: the deadline is that of the largest package at UPLOAD_MIN_RATE.
    let allowed = Duration::from_secs(limit / config.upload_min_rate.max(1) + 1);
    let pace = Pace::new(idle, Instant::now() + idle + allowed, "the stream");
    let mut field = next_field(&mut multipart, &pace).await?.ok_or_else(|| {
        ReceiverError::Validation(format!("missing part {PART_PACKAGE:?} after the manifest"))
    })?;
    expect_part(&field, PART_PACKAGE, PACKAGE_CONTENT_TYPE, FIELDS)?;
    let mut hasher = blake3::Hasher::new();
    let mut count: u64 = 0;
    while let Some(chunk) = next_chunk(&mut field, &pace).await? {
        count += chunk.len() as u64;
        if count > limit {
            return Err(ReceiverError::TooLarge { size: count, limit });
        }
        hasher.update(&chunk);
        state.metrics().received_bytes(chunk.len() as u64);
        if tx.send(Ok(chunk)).await.is_err() {
            // The load ended before the package did; its error is the answer.
            return Err(ReceiverError::LoadFailed(
                "Docker stopped reading the streamed package before its end".into(),
            ));
        }
    }
    drop(field);
    let mut field = next_field(&mut multipart, &pace).await?.ok_or_else(|| {
        ReceiverError::Validation(format!(
            "missing part {PART_SEAL:?} after the package: a streamed package is loaded only once its seal checks out"
        ))
    })?;
    expect_part(&field, PART_SEAL, MANIFEST_CONTENT_TYPE, FIELDS)?;
    let mut bytes = Vec::new();
    while let Some(chunk) = next_chunk(&mut field, &pace).await? {
        if bytes.len() + chunk.len() > MAX_SEAL_BYTES {
            return Err(ReceiverError::Validation(format!(
                "seal part is larger than {MAX_SEAL_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    drop(field);
    if next_field(&mut multipart, &pace).await?.is_some() {
        return Err(ReceiverError::Validation(format!(
            "unexpected part after {PART_SEAL:?}: a streamed upload has exactly three parts"
        )));
    }
    let seal: Seal = serde_json::from_slice(&bytes)
        .map_err(|e| ReceiverError::Validation(format!("invalid seal: {e}")))?;
    check_seal(state, &headers, &manifest_digest, &seal)?;
    let checksum = Checksum::from_hasher(&hasher);
    if count != seal.package_size || checksum != seal.package_checksum {
        return Err(ReceiverError::ChecksumMismatch(format!(
            "received {count} bytes hashing to {checksum}, but the signed seal says {} bytes hashing to {}",
            seal.package_size, seal.package_checksum
        )));
    }
    Ok(seal)
}

/// The seal's HMAC, under the key that signed the request, over this request's nonce and
/// manifest: `401` otherwise.
fn check_seal(
    state: &AppState,
    headers: &SignatureHeaders,
    manifest_digest: &Checksum,
    seal: &Seal,
) -> Result<()> {
    let key = state
        .keys()
        .get(&headers.key_id)
        .ok_or_else(|| AuthError::UnknownKeyId(headers.key_id.clone()))?;
    if seal.verify(key, &headers.nonce, manifest_digest) {
        return Ok(());
    }
    state.metrics().auth_refused("bad_seal");
    Err(ReceiverError::Unauthorized(AuthError::BadSignature))
}
