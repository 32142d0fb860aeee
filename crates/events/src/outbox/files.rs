//! The outbox's on-disk format: reading the log (and cutting a torn tail) and the cursor.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::Arc;

use deploy_protocol::events::LifecycleEvent;
use serde::{Deserialize, Serialize};

use super::Entry;
use crate::error::{EventError, Result};

#[derive(Serialize)]
pub(super) struct RecordRef<'a> {
    pub(super) seq: u64,
    pub(super) event: &'a LifecycleEvent,
}

#[derive(Deserialize)]
struct Record {
    seq: u64,
    event: LifecycleEvent,
}

pub(super) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EventError {
    let path = path.to_path_buf();
    move |source| EventError::Record {
        action,
        path,
        source,
    }
}

/// Entries of the log and the length of its well-formed prefix of complete lines.
pub(super) fn read_log(path: &Path) -> Result<(VecDeque<Entry>, u64)> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let mut entries: VecDeque<Entry> = VecDeque::new();
    let mut good_len = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if line.last() != Some(&b'\n') {
            break; // torn tail: its append never returned Ok
        }
        good_len += line.len();
        let line = &line[..line.len() - 1];
        match serde_json::from_slice::<Record>(line) {
            Ok(r) if entries.back().is_none_or(|last| r.seq > last.seq) => {
                entries.push_back(Entry {
                    seq: r.seq,
                    event: Arc::new(r.event),
                });
            }
            Ok(r) => {
                tracing::error!(path = %path.display(), seq = r.seq, "skipping an out-of-order outbox line")
            }
            Err(e) if !line.is_empty() => {
                tracing::error!(path = %path.display(), error = %e, "skipping a corrupt outbox line");
            }
            Err(_) => {}
        }
    }
    Ok((entries, good_len as u64))
}

/// A missing or unreadable cursor means "nothing delivered": the worst case is a redelivery,
/// which consumers absorb by deduplicating on `event_id`.
pub(super) fn read_cursor(path: &Path) -> u64 {
    match fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::error!(path = %path.display(), "unreadable outbox cursor; redelivering the retained events");
            0
        }),
        Err(_) => 0,
    }
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}
