//! Resumable blob upload (protocol v2): `HEAD` asks the receiver how many bytes of a blob it
//! holds durably, `PATCH` sends the rest from exactly there. A dropped connection, a timeout or a
//! busy receiver is followed by the backoff, a `HEAD` and a `PATCH` from the offset it reports; a
//! `409` (offset mismatch, or another writer still finishing) by a `HEAD`: bytes are never sent
//! at an offset the receiver has not confirmed. An attempt that moves the offset forward starts
//! the backoff afresh, so a flaky link still finishes. Another writer holding the blob is waited
//! for as long as it moves the blob forward, and up to [`MAX_CONFLICT_WAIT`] when it does not. A
//! `PATCH` answered before its body ended (a refusal) stops sending the body there.

use std::io::SeekFrom;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploy_protocol::release::{paths, BlobRef, BLOB_CONTENT_TYPE, UPLOAD_OFFSET};
use deploy_protocol::{Checksum, ErrorCode};
use futures::{StreamExt, TryStreamExt};
use reqwest::{Method, StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::releases::{backoff, signed, ReleaseCalls};
use super::retry::{classify_send_error, remote_error};
use crate::SenderError;

/// Longest a blob waits while another writer holds it (`409 CONFLICT`: another transfer of the
/// same blob, or our own cut connection the receiver has not noticed yet) and its offset does not
/// move: the receiver ends a stalled writer after its `UPLOAD_IDLE_TIMEOUT_SECS` (30 s by default).
const MAX_CONFLICT_WAIT: Duration = Duration::from_secs(120);
/// Longest pause between two looks at a blob another writer holds.
const MAX_CONFLICT_DELAY: Duration = Duration::from_secs(2);
/// Longest a blob waits, answered `429 BUSY` (each answer waited out for the receiver's
/// `Retry-After`, 2 s from deploy-receiver), before the transfer fails; the wait starts again
/// whenever the blob gets a slot and moves forward.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(600);

/// How one blob went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobOutcome {
    /// Blob bytes put on the wire (a stretch sent twice counts twice).
    pub sent: u64,
    /// The highest offset sending resumed from: the receiver's offset at the start (> 0 after an
    /// earlier, interrupted transfer) or after an interruption during this call.
    pub resumed_from: u64,
    /// Interruptions resumed from during this call (dropped connections, conflicts).
    pub interruptions: u32,
}

/// One request's result.
enum Attempt {
    /// The receiver holds this many bytes.
    Held(u64),
    /// 409: another offset, or another writer.
    Conflict,
    /// 429: every upload slot of the receiver is taken (MAX_CONCURRENT_UPLOADS); try again after
    /// its `Retry-After`.
    Busy(Option<Duration>),
    /// Worth trying again after the backoff.
    Transient(SenderError),
    /// 422: the bytes the receiver held did not check out against the signed blob, and it
    /// discarded them (a copy torn by a crash there): worth sending the whole blob once more.
    Discarded(SenderError),
    /// Not worth trying again.
    Fatal(SenderError),
}

fn upload_offset(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get(UPLOAD_OFFSET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn is_transient(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// A failed send: a connection that could not be made or broke is worth resuming (offsets make
/// every `PATCH` safe to repeat); a refused TLS handshake is not.
fn send_failure(url: &Url, e: reqwest::Error) -> Attempt {
    let error = classify_send_error(url, e);
    match &error {
        SenderError::RemoteUnreachable { detail, .. } if detail.contains("TLS handshake") => {
            Attempt::Fatal(error)
        }
        _ => Attempt::Transient(error),
    }
}

impl ReleaseCalls<'_> {
    /// The receiver's durable offset of `blob` (`NOT_FOUND` when no stored release names it),
    /// retrying transient failures with the backoff.
    pub async fn blob_offset(&self, blob: &BlobRef) -> Result<u64, SenderError> {
        let mut delays = backoff(self.policy);
        loop {
            let error = match self.head(blob).await {
                Attempt::Held(offset) => return Ok(offset),
                // `head` answers no 422; a HEAD checks nothing.
                Attempt::Fatal(e) | Attempt::Discarded(e) => return Err(e),
                Attempt::Transient(e) => e,
                Attempt::Conflict => SenderError::TransferFailed("HEAD answered 409".into()),
                // `head` reports a 429 as transient; a HEAD takes no upload slot.
                Attempt::Busy(_) => SenderError::TransferFailed("HEAD answered 429".into()),
            };
            let Some(delay) = delays.next() else {
                return Err(error);
            };
            tracing::warn!(blob = %blob.blake3, error = %error, "HEAD of a blob failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn head(&self, blob: &BlobRef) -> Attempt {
        let (url, request) = signed(
            self.http,
            self.target,
            Method::HEAD,
            &paths::blob(&blob.blake3),
            &Checksum::of(&[]),
            self.correlation_id,
        );
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return send_failure(&url, e),
        };
        let status = response.status();
        match (status, upload_offset(&response)) {
            (StatusCode::OK, Some(offset)) => Attempt::Held(offset),
            (StatusCode::OK, None) => Attempt::Fatal(SenderError::TransferFailed(format!(
                "{url} answered HEAD without {UPLOAD_OFFSET}: is it a deploy-receiver of protocol v2?"
            ))),
            (s, _) if is_transient(s) => Attempt::Transient(SenderError::TransferFailed(format!(
                "HEAD {url} answered {s}"
            ))),
            (s, _) => {
                let code = match s.as_u16() {
                    401 => ErrorCode::Unauthorized,
                    403 => ErrorCode::Forbidden,
                    404 => ErrorCode::NotFound,
                    _ => ErrorCode::TransferFailed,
                };
                Attempt::Fatal(SenderError::Remote {
                    status: s.as_u16(),
                    code,
                    message: format!(
                        "HEAD {url} answered {s}: the receiver has no signed release naming blob {}",
                        blob.blake3
                    ),
                })
            }
        }
    }

    /// Sends `blob` (the file at `path`) from `offset`, the receiver's durable offset, to its
    /// end, resuming as the module comment says. `on_progress` hears the offset reached.
    pub async fn send_blob(
        &self,
        blob: &BlobRef,
        path: &Path,
        mut offset: u64,
        on_progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<BlobOutcome, SenderError> {
        let mut outcome = BlobOutcome {
            resumed_from: offset,
            ..BlobOutcome::default()
        };
        let mut delays = backoff(self.policy);
        let mut conflicts = 0u32;
        // Since when another writer has held the blob without moving it forward.
        let mut stuck_since: Option<Instant> = None;
        let mut conflict_delay = self.policy.min_delay;
        let mut busy = Duration::ZERO;
        // Done once a PATCH's answer says the receiver holds the whole blob: the PATCH that
        // completes a blob is answered after the receiver's check of it. A copy already at full
        // length whose check never ran (the receiver stopped first, or a body ran past the end)
        // is sent an empty PATCH at its end, which runs that check.
        let mut confirmed = false;
        let mut sent_again = false;
        while !confirmed {
            let sent = Arc::new(AtomicU64::new(0));
            let attempt = self
                .patch(blob, path, offset, Arc::clone(&sent), on_progress)
                .await;
            outcome.sent += sent.load(Ordering::Relaxed);
            let before = offset;
            match attempt {
                Attempt::Held(now) if now >= blob.size => {
                    offset = now;
                    on_progress(offset);
                    confirmed = true;
                    continue;
                }
                Attempt::Held(now) if now > offset => {
                    offset = now;
                    conflicts = 0;
                    stuck_since = None;
                    conflict_delay = self.policy.min_delay;
                    busy = Duration::ZERO;
                    delays = backoff(self.policy);
                    continue;
                }
                Attempt::Held(_) | Attempt::Conflict => {
                    conflicts += 1;
                    outcome.interruptions += 1;
                    let since = *stuck_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > MAX_CONFLICT_WAIT {
                        return Err(SenderError::TransferFailed(format!(
                            "blob {} stayed held by another writer at offset {offset} for {} s \
                             (409 CONFLICT): is another sender uploading it at the same time?",
                            blob.blake3,
                            since.elapsed().as_secs()
                        )));
                    }
                    if conflicts > 1 {
                        // Another writer (another transfer, or our own cut connection) is still
                        // at it: look again after a pause, longer each time up to 2 s.
                        tokio::time::sleep(conflict_delay).await;
                        conflict_delay = (conflict_delay * 2).min(MAX_CONFLICT_DELAY);
                    }
                }
                Attempt::Busy(after) => {
                    // Nothing was written: wait for a slot (other uploads, ours included, are
                    // using them) without spending the backoff meant for failures.
                    let wait = after.unwrap_or(self.policy.min_delay);
                    if wait > self.policy.max_retry_after {
                        return Err(SenderError::TransferFailed(format!(
                            "the receiver is busy (429 BUSY) and asks to retry blob {} in {} s, \
                             more than the {} s this sender waits",
                            blob.blake3,
                            wait.as_secs(),
                            self.policy.max_retry_after.as_secs()
                        )));
                    }
                    let wait = wait.max(self.policy.min_delay);
                    if busy + wait > MAX_BUSY_WAIT {
                        return Err(SenderError::TransferFailed(format!(
                            "the receiver stayed busy (429 BUSY: its upload slots, \
                             MAX_CONCURRENT_UPLOADS, all taken) for {} s at blob {}",
                            busy.as_secs(),
                            blob.blake3
                        )));
                    }
                    tracing::debug!(
                        blob = %blob.blake3, offset,
                        wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "the receiver is busy (429); waiting for an upload slot"
                    );
                    busy += wait;
                    tokio::time::sleep(wait).await;
                }
                Attempt::Transient(e) => {
                    outcome.interruptions += 1;
                    let Some(delay) = delays.next() else {
                        return Err(e);
                    };
                    tracing::warn!(
                        blob = %blob.blake3, offset, error = %e,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "blob transfer interrupted; resuming from the receiver's offset"
                    );
                    tokio::time::sleep(delay).await;
                }
                Attempt::Discarded(e) => {
                    if sent_again {
                        return Err(e);
                    }
                    tracing::warn!(
                        blob = %blob.blake3, error = %e,
                        "the receiver discarded its copy of the blob; sending it again whole"
                    );
                    sent_again = true;
                    outcome.interruptions += 1;
                }
                Attempt::Fatal(e) => return Err(e),
            }
            // Continue from the receiver's durable offset, never from our own idea of it.
            offset = self.blob_offset(blob).await?;
            outcome.resumed_from = outcome.resumed_from.max(offset.min(blob.size));
            on_progress(offset);
            if offset > before {
                // Moved forward (by us, or by another writer holding the blob).
                delays = backoff(self.policy);
                busy = Duration::ZERO;
                stuck_since = None;
            }
        }
        Ok(outcome)
    }

    async fn patch(
        &self,
        blob: &BlobRef,
        path: &Path,
        offset: u64,
        sent: Arc<AtomicU64>,
        on_progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Attempt {
        let local = |e: std::io::Error| {
            Attempt::Fatal(SenderError::io(
                format!("cannot read blob {}", path.display()),
                e,
            ))
        };
        let mut file = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) => return local(e),
        };
        match file.metadata().await {
            Ok(m) if m.len() == blob.size => {}
            Ok(m) => {
                return Attempt::Fatal(SenderError::ChecksumMismatch(format!(
                    "cached blob {} is {} bytes, {} expected: the layer cache changed under the \
                     transfer",
                    path.display(),
                    m.len(),
                    blob.size
                )))
            }
            Err(e) => return local(e),
        }
        if let Err(e) = file.seek(SeekFrom::Start(offset)).await {
            return local(e);
        }
        let remaining = blob.size - offset;
        let counter = Arc::clone(&sent);
        // Set once the receiver has answered with a refusal while the body was still going: the
        // body then ends with an error, which closes the connection, instead of sending on what
        // the receiver only discards.
        let refused = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&refused);
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(remaining), 256 * 1024)
            .map(move |chunk| {
                if stop.load(Ordering::Relaxed) {
                    Err(std::io::Error::other("answered before the body ended"))
                } else {
                    chunk
                }
            })
            .inspect_ok(move |chunk| {
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            });
        let (url, request) = signed(
            self.http,
            self.target,
            Method::PATCH,
            &paths::blob(&blob.blake3),
            &blob.blake3,
            self.correlation_id,
        );
        let send = request
            .header(UPLOAD_OFFSET, offset.to_string())
            .header(reqwest::header::CONTENT_TYPE, BLOB_CONTENT_TYPE)
            .header(reqwest::header::CONTENT_LENGTH, remaining.to_string())
            .body(reqwest::Body::wrap_stream(body))
            .send();
        tokio::pin!(send);
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        let response = loop {
            tokio::select! {
                r = &mut send => break r,
                _ = ticker.tick() => on_progress(offset + sent.load(Ordering::Relaxed)),
            }
        };
        let response = match response {
            Ok(r) => r,
            Err(e) => return send_failure(&url, e),
        };
        let status = response.status();
        let held = upload_offset(&response);
        if status.is_success() {
            let now = held.unwrap_or(offset + remaining);
            on_progress(now);
            return Attempt::Held(now);
        }
        if status == StatusCode::CONFLICT {
            refused.store(true, Ordering::Relaxed);
            return Attempt::Conflict;
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            let after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_secs);
            refused.store(true, Ordering::Relaxed);
            return Attempt::Busy(after);
        }
        // The answer's body (the error) first: stopping the request's body may close the
        // connection it comes on.
        let body = response.bytes().await.unwrap_or_default();
        refused.store(true, Ordering::Relaxed);
        let error = remote_error(&url, status.as_u16(), &body);
        if is_transient(status) {
            Attempt::Transient(error)
        } else if status == StatusCode::UNPROCESSABLE_ENTITY
            && matches!(
                &error,
                SenderError::Remote {
                    code: ErrorCode::ChecksumMismatch,
                    ..
                }
            )
        {
            Attempt::Discarded(error)
        } else {
            Attempt::Fatal(error)
        }
    }
}
