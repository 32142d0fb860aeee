//! The durable outbox: `events.jsonl`, an append-only log of `{"seq":N,"event":{...}}` lines, and
//! `events.cursor`, the highest sequence number the broker has acknowledged (see the crate docs
//! for the durability argument).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use deploy_protocol::events::LifecycleEvent;
use tokio::sync::{watch, Notify};

use crate::error::Result;
pub(crate) use dir_lock::DirLock;
use files::{io_err, read_cursor, read_log, sync_dir, RecordRef};

mod commit;
mod dir_lock;
mod files;

/// Name of the log in the state directory.
pub const LOG_FILE: &str = "events.jsonl";
/// Name of the "delivered up to" cursor in the state directory.
pub const CURSOR_FILE: &str = "events.cursor";
/// Largest event accepted, as JSON; well under Kafka's default `message.max.bytes` (1 MB), so an
/// event that was recorded can always be delivered.
pub const MAX_EVENT_BYTES: usize = 512 * 1024;

/// Position of an event in its outbox; grows by one per event and never repeats, also across
/// restarts and compactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Seq(pub u64);

/// One recorded event.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) seq: u64,
    pub(crate) event: Arc<LifecycleEvent>,
}

struct LogFile {
    file: File,
    len: u64,
    /// Every event up to here is in the file and synced, or failed to be written (see
    /// `State::failed`).
    written: u64,
}

struct State {
    /// What `events.jsonl` holds, oldest first, followed by the events recorded but not yet
    /// written (beyond `LogFile::written`).
    entries: VecDeque<Entry>,
    last_seq: u64,
    /// The lines of the events beyond `LogFile::written`, in order, waiting for the next commit.
    unwritten: Vec<u8>,
    /// Events whose batch could not be written, until their own `commit` call reports it.
    failed: HashMap<u64, (io::ErrorKind, Arc<str>)>,
    /// Every entry up to here is acknowledged by the broker.
    delivered: u64,
    /// Acknowledged entries beyond `delivered` (other partitions may ack out of order); kept so a
    /// retry after a failure does not send them twice.
    acked: BTreeSet<u64>,
    /// The value `events.cursor` holds.
    persisted: u64,
}

/// The outbox of one state directory. Lock order: `log`, then `state`.
pub(crate) struct Outbox {
    dir: PathBuf,
    log_path: PathBuf,
    cursor_path: PathBuf,
    retain: usize,
    /// Without Kafka the outbox is the sink: compaction need not wait for the broker.
    outbox_is_sink: bool,
    log: Mutex<LogFile>,
    state: Mutex<State>,
    cursor_write: Mutex<()>,
    appended: Notify,
    checkpoint_wanted: Notify,
    delivered_tx: watch::Sender<u64>,
    _lock: DirLock,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Outbox {
    /// Reads the log and the cursor (repairing a torn last line) and opens the log for appending.
    pub(crate) fn open(dir_lock: DirLock, retain: usize, outbox_is_sink: bool) -> Result<Self> {
        let dir = dir_lock.0.clone();
        let log_path = dir.join(LOG_FILE);
        let cursor_path = dir.join(CURSOR_FILE);
        let (entries, good_len) = read_log(&log_path)?;
        let persisted = read_cursor(&cursor_path);

        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("open", &log_path))?;
        let len = file.metadata().map_err(io_err("inspect", &log_path))?.len();
        if len > good_len {
            tracing::warn!(path = %log_path.display(), bytes = len - good_len,
                "dropping a torn last line of the event outbox (an append interrupted by a crash)");
            file.set_len(good_len)
                .map_err(io_err("repair", &log_path))?;
            file.sync_all().map_err(io_err("fsync", &log_path))?;
        }
        // Make the log's directory entry durable, whether it was just created or not, and the
        // directory's own (best effort: the parent may not be ours to open).
        sync_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            let _ = sync_dir(parent);
        }

        let last_seq = entries.back().map_or(0, |e: &Entry| e.seq).max(persisted);
        let delivered = persisted;
        Ok(Self {
            log_path,
            cursor_path,
            retain: retain.max(1),
            outbox_is_sink,
            log: Mutex::new(LogFile {
                file,
                len: good_len,
                written: last_seq,
            }),
            state: Mutex::new(State {
                entries,
                last_seq,
                unwritten: Vec::new(),
                failed: HashMap::new(),
                delivered,
                acked: BTreeSet::new(),
                persisted,
            }),
            cursor_write: Mutex::new(()),
            appended: Notify::new(),
            checkpoint_wanted: Notify::new(),
            delivered_tx: watch::Sender::new(delivered),
            dir,
            _lock: dir_lock,
        })
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Resolves when the cursor moved or the log grew since the last checkpoint; several
    /// requests during one checkpoint coalesce into one more.
    pub(crate) async fn checkpoint_wanted(&self) {
        self.checkpoint_wanted.notified().await;
    }

    /// Persists the cursor, then compacts if due. Blocking.
    pub(crate) fn checkpoint(&self) -> Result<()> {
        self.persist_cursor()?;
        self.maybe_compact().map(drop)
    }

    /// Resolves after an append (or at once if one happened since the last call).
    pub(crate) async fn appended(&self) {
        self.appended.notified().await;
    }

    /// Newest first.
    pub(crate) fn list(&self, limit: usize) -> Vec<LifecycleEvent> {
        let state = lock(&self.state);
        state
            .entries
            .iter()
            .rev()
            .take(limit)
            .map(|e| (*e.event).clone())
            .collect()
    }

    /// The newest event still recorded (a failed write forgets its events).
    pub(crate) fn last_seq(&self) -> Seq {
        let state = lock(&self.state);
        Seq(state.entries.back().map_or(state.delivered, |e| e.seq))
    }

    pub(crate) fn delivered(&self) -> u64 {
        lock(&self.state).delivered
    }

    pub(crate) fn subscribe_delivered(&self) -> watch::Receiver<u64> {
        self.delivered_tx.subscribe()
    }

    /// Recorded events the broker has not acknowledged yet.
    pub(crate) fn pending(&self) -> u64 {
        let state = lock(&self.state);
        let beyond =
            state.entries.len() - state.entries.partition_point(|e| e.seq <= state.delivered);
        beyond.saturating_sub(state.acked.len()) as u64
    }

    /// Up to `limit` unacknowledged entries after `after`, in order.
    pub(crate) fn pending_after(&self, after: u64, limit: usize) -> Vec<Entry> {
        let state = lock(&self.state);
        let start = state.entries.partition_point(|e| e.seq <= after);
        state
            .entries
            .range(start..)
            .filter(|e| !state.acked.contains(&e.seq))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Records the broker's acknowledgement of `seq` and moves the cursor over every entry that is
    /// now acknowledged without a gap.
    pub(crate) fn mark_delivered(&self, seq: u64) {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        // An event forgotten after a failed write is no longer waited for.
        let known = state.entries.binary_search_by_key(&seq, |e| e.seq).is_ok();
        if seq <= state.delivered || !known {
            return;
        }
        state.acked.insert(seq);
        loop {
            let next = state.entries.partition_point(|e| e.seq <= state.delivered);
            match state.entries.get(next) {
                Some(e) if state.acked.remove(&e.seq) => state.delivered = e.seq,
                _ => break,
            }
        }
        let moved = self.delivered_tx.send_if_modified(|d| {
            let changed = *d != state.delivered;
            *d = state.delivered;
            changed
        });
        if moved {
            self.checkpoint_wanted.notify_one();
        }
    }

    /// Writes the cursor if it moved: write a temporary file, fsync, rename over, fsync the dir.
    pub(crate) fn persist_cursor(&self) -> Result<()> {
        let _writer = lock(&self.cursor_write);
        let delivered = {
            let state = lock(&self.state);
            if state.delivered == state.persisted {
                return Ok(());
            }
            state.delivered
        };
        let tmp = self.dir.join(format!("{CURSOR_FILE}.tmp"));
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(format!("{delivered}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &self.cursor_path).map_err(io_err("replace", &self.cursor_path))?;
        sync_dir(&self.dir)?;
        lock(&self.state).persisted = delivered;
        Ok(())
    }

    /// Rewrites the log without its oldest entries once at least `retain` entries are both
    /// delivered and older than the newest `retain`; returns how many were dropped. Commits wait
    /// meanwhile (the rewrite holds at most `2 * retain` entries plus the undelivered ones).
    pub(crate) fn maybe_compact(&self) -> Result<usize> {
        let mut log = lock(&self.log);
        let (drop_count, keep) = {
            let state = lock(&self.state);
            // Only what the file holds: recorded events not yet committed stay queued and are
            // appended to the new file by their commit.
            let in_file = state.entries.partition_point(|e| e.seq <= log.written);
            let beyond_retain = state.entries.len().saturating_sub(self.retain);
            let droppable = if self.outbox_is_sink {
                beyond_retain
            } else {
                beyond_retain.min(state.entries.partition_point(|e| e.seq <= state.delivered))
            }
            .min(in_file);
            if droppable < self.retain {
                return Ok(0);
            }
            (
                droppable,
                state
                    .entries
                    .range(droppable..in_file)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };

        let tmp = self.dir.join(format!("{LOG_FILE}.tmp"));
        let mut buf = Vec::new();
        for entry in &keep {
            serde_json::to_writer(
                &mut buf,
                &RecordRef {
                    seq: entry.seq,
                    event: &entry.event,
                },
            )
            .map_err(|e| io_err("serialise an event for", &tmp)(e.into()))?;
            buf.push(b'\n');
        }
        // A leftover from an interrupted compaction holds nothing the log does not.
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(&buf)
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &tmp))?;
        // The handle stays valid across the rename and becomes the new append handle, so no
        // reopen can fail after the log has been replaced.
        if let Err(source) = fs::rename(&tmp, &self.log_path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("replace", &self.log_path)(source));
        }
        sync_dir(&self.dir)?;
        *log = LogFile {
            file,
            len: buf.len() as u64,
            written: log.written,
        };
        lock(&self.state).entries.drain(..drop_count);
        tracing::debug!(
            dropped = drop_count,
            kept = keep.len(),
            "compacted the event outbox"
        );
        Ok(drop_count)
    }
}
