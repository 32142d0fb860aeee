//! The replay guard: nonces of verified requests, kept until their signature's timestamp leaves the
//! skew window, in memory and in an append-only log under `STATE_DIR`, so that a request captured
//! before a restart of the receiver cannot be replayed after it.
//!
//! The log (`STATE_DIR/nonces.log`) holds one `<expires_at> <nonce>` line per accepted request.
//! A nonce is written and `fdatasync`ed before the request it belongs to is accepted. At start the
//! log is read back, expired lines are dropped, and the live ones are rewritten into a fresh file
//! (temp file, fsync, rename); the same compaction runs while serving once the log holds more than
//! twice the nonces that were live at its last rewrite (and at least 1,024).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use deploy_protocol::envelope::is_valid_nonce;
use deploy_protocol::AuthError;

use crate::error::ReceiverError;

/// File name of the log under `STATE_DIR`.
pub const NONCE_LOG: &str = "nonces.log";

/// Nonces seen inside the skew window. Only nonces of requests whose signature verified are
/// stored, so unauthenticated traffic can neither fill it nor evict entries.
#[derive(Debug)]
pub struct NonceCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug)]
struct Inner {
    seen: HashMap<String, i64>,
    log: Option<Log>,
}

#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: File,
    /// Lines in the file (live or expired).
    lines: usize,
    /// Lines when it was last rewritten (all live then).
    live_at_rewrite: usize,
}

impl NonceCache {
    /// An in-memory cache holding at most `capacity` live nonces (forgotten at restart).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                seen: HashMap::new(),
                log: None,
            }),
            capacity,
        }
    }

    /// A cache backed by the log at `path`: the nonces still live at `now` are read back, and the
    /// log is compacted to them. Malformed lines (a torn last line after a crash) are skipped.
    pub fn open(path: &Path, capacity: usize, now: i64) -> std::io::Result<Self> {
        let mut seen = HashMap::new();
        match File::open(path) {
            Ok(file) => {
                for line in BufReader::new(file).lines() {
                    let line = line?;
                    let Some((expires, nonce)) = line.split_once(' ') else {
                        continue;
                    };
                    let Ok(expires) = expires.parse::<i64>() else {
                        continue;
                    };
                    if expires >= now && is_valid_nonce(nonce) {
                        let entry = seen.entry(nonce.to_owned()).or_insert(expires);
                        *entry = (*entry).max(expires);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let log = Log::rewrite(path, &seen)?;
        Ok(Self {
            inner: Mutex::new(Inner {
                seen,
                log: Some(log),
            }),
            capacity,
        })
    }

    /// Records `nonce` until `expires_at` (Unix seconds); refuses one already recorded. Check and
    /// insert happen under one lock, so of parallel replays exactly one wins. With a log, the
    /// nonce is on disk before this returns Ok; if it cannot be written the request is refused.
    pub fn check_and_insert(
        &self,
        nonce: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), ReceiverError> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| ReceiverError::Internal("nonce store poisoned".into()))?;
        let Inner { seen, log } = &mut *inner;
        if seen.get(nonce).is_some_and(|&exp| exp >= now) {
            return Err(AuthError::ReplayedNonce.into());
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, exp| *exp >= now);
            if seen.len() >= self.capacity {
                // Fail closed: forgetting live nonces would re-open replays.
                return Err(ReceiverError::Busy {
                    message: "too many signed requests inside the replay window".into(),
                    retry_after_secs: 5,
                });
            }
        }
        if let Some(log) = log {
            let mut persist = || -> std::io::Result<()> {
                if log.lines >= 1024.max(2 * log.live_at_rewrite) {
                    seen.retain(|_, exp| *exp >= now);
                    *log = Log::rewrite(&log.path, seen)?;
                }
                log.append(nonce, expires_at)
            };
            persist().map_err(|e| {
                ReceiverError::Internal(format!("cannot record the request's nonce: {e}"))
            })?;
        }
        seen.insert(nonce.to_owned(), expires_at);
        Ok(())
    }

    /// Live entries (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner.lock().map(|s| s.seen.len()).unwrap_or(0)
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Log {
    /// Writes `seen` into a fresh log replacing `path` (temp file, fsync, rename, fsync of the
    /// directory) and opens it for appending.
    fn rewrite(path: &Path, seen: &HashMap<String, i64>) -> std::io::Result<Self> {
        let tmp = path.with_extension("log.tmp");
        {
            let _ = std::fs::remove_file(&tmp);
            let mut out = std::io::BufWriter::new(crate::store::private_file(&tmp)?);
            for (nonce, expires) in seen {
                writeln!(out, "{expires} {nonce}")?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            lines: seen.len(),
            live_at_rewrite: seen.len(),
        })
    }

    fn append(&mut self, nonce: &str, expires_at: i64) -> std::io::Result<()> {
        // One write call per line, so a crash leaves at most a torn last line (skipped on read).
        self.file
            .write_all(format!("{expires_at} {nonce}\n").as_bytes())?;
        self.file.sync_data()?;
        self.lines += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_replays_and_fails_closed_when_full() {
        let cache = NonceCache::new(2);
        assert!(cache.check_and_insert("a", 100, 10).is_ok());
        assert!(cache.check_and_insert("a", 100, 10).is_err());
        assert!(cache.check_and_insert("b", 100, 10).is_ok());
        assert!(matches!(
            cache.check_and_insert("c", 100, 10),
            Err(ReceiverError::Busy { .. })
        ));
        // once "a" and "b" have expired there is room again
        assert!(cache.check_and_insert("c", 300, 200).is_ok());
        assert!(cache.check_and_insert("a", 300, 200).is_ok());
    }

    const A: &str = "aaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccc";

    #[test]
    fn live_nonces_survive_a_reopen_and_expired_ones_are_compacted_away() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NONCE_LOG);
        {
            let cache = NonceCache::open(&path, 10, 0).expect("open");
            cache.check_and_insert(A, 100, 10).expect("a");
            cache.check_and_insert(B, 500, 10).expect("b");
            // dropped without any shutdown step, as a SIGKILL would leave it
        }
        let cache = NonceCache::open(&path, 10, 200).expect("reopen");
        assert_eq!(cache.len(), 1, "a expired at 100, b is live until 500");
        assert!(matches!(
            cache.check_and_insert(B, 500, 200),
            Err(ReceiverError::Unauthorized(AuthError::ReplayedNonce))
        ));
        cache
            .check_and_insert(A, 400, 200)
            .expect("a again, once expired");
        let text = std::fs::read_to_string(&path).expect("log");
        assert_eq!(
            text.lines().count(),
            2,
            "compacted at open, then one line: {text}"
        );
    }

    #[test]
    fn a_torn_or_garbled_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NONCE_LOG);
        std::fs::write(
            &path,
            format!("900 {A}\nnot a line\n900 short\n12x {B}\n900 {C}\n900 ccc"),
        )
        .expect("write");
        let cache = NonceCache::open(&path, 10, 0).expect("open");
        assert_eq!(cache.len(), 2);
        assert!(cache.check_and_insert(A, 900, 0).is_err());
        assert!(cache.check_and_insert(C, 900, 0).is_err());
        assert!(cache.check_and_insert(B, 900, 0).is_ok());
    }

    #[test]
    fn the_log_is_compacted_while_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NONCE_LOG);
        let cache = NonceCache::open(&path, 100_000, 0).expect("open");
        // 3000 requests, each live for 10 s, one per second: at most ~11 live at any time.
        for i in 0..3000i64 {
            let nonce = format!("nonce-{i:010}");
            cache.check_and_insert(&nonce, i + 10, i).expect("insert");
        }
        let lines = std::fs::read_to_string(&path).expect("log").lines().count();
        assert!(lines <= 1100, "the log was compacted: {lines} lines");
        // the live ones are still refused after a reopen
        let cache = NonceCache::open(&path, 100_000, 2999).expect("reopen");
        assert!(cache
            .check_and_insert("nonce-0000002999", 3009, 2999)
            .is_err());
        assert!(cache.len() <= 12, "{}", cache.len());
    }
}
