//! Appending with group commit: [`Outbox::record`] queues an event's line in memory (no I/O), and
//! [`Outbox::commit`] makes it durable. Whoever commits first writes every queued line with one
//! `write` and one `fdatasync`; publishers that queued meanwhile find their event already written
//! when they get the log, so concurrent publishers share a sync instead of taking turns.

use std::io::{self, Write};
use std::sync::Arc;

use deploy_protocol::events::LifecycleEvent;

use super::{io_err, lock, Entry, LogFile, Outbox, Seq, MAX_EVENT_BYTES};
use crate::error::{EventError, Result};

impl Outbox {
    /// Gives the event the next sequence number and queues its line for the next commit; the
    /// delivery task may send it from now on. Not durable until [`Outbox::commit`] returns `Ok`.
    pub(crate) fn record(&self, event: LifecycleEvent) -> Result<Seq> {
        // Serialised outside the lock; the line is `{"seq":N,"event":EVENT}`, as `RecordRef`.
        let json = serde_json::to_vec(&event)
            .map_err(|e| io_err("serialise an event for", &self.log_path)(e.into()))?;
        let mut state = lock(&self.state);
        let seq = state.last_seq + 1;
        let prefix = format!(r#"{{"seq":{seq},"event":"#);
        let size = prefix.len() + json.len() + 1;
        if size > MAX_EVENT_BYTES {
            return Err(EventError::TooLarge {
                event_id: event.event_id,
                size,
                limit: MAX_EVENT_BYTES,
            });
        }
        state.unwritten.reserve(size + 1);
        state.unwritten.extend_from_slice(prefix.as_bytes());
        state.unwritten.extend_from_slice(&json);
        state.unwritten.extend_from_slice(b"}\n");
        state.last_seq = seq;
        state.entries.push_back(Entry {
            seq,
            event: Arc::new(event),
        });
        drop(state);
        self.appended.notify_one();
        Ok(Seq(seq))
    }

    /// Blocks until the event `seq` (from [`Outbox::record`]) is written and `fdatasync`ed, by
    /// this call or by one that wrote it together with others; when this returns `Ok` the event
    /// survives a crash. On a write error the batch is cut off the file again and its events are
    /// forgotten (one already handed to the producer may still arrive); each of its publishers
    /// gets the error.
    pub(crate) fn commit(&self, seq: Seq) -> Result<()> {
        let mut log = lock(&self.log);
        if log.written < seq.0 {
            self.write_queued(&mut log);
        }
        drop(log);
        match lock(&self.state).failed.remove(&seq.0) {
            None => Ok(()),
            Some((kind, message)) => Err(io_err("append to", &self.log_path)(io::Error::new(
                kind,
                message.to_string(),
            ))),
        }
    }

    /// Writes whatever is queued now (for shutdown); a failure is left for the publishers.
    pub(crate) fn commit_queued(&self) {
        let mut log = lock(&self.log);
        if log.written < lock(&self.state).last_seq {
            self.write_queued(&mut log);
        }
    }

    /// Appends every queued line with one write and one `fdatasync`.
    fn write_queued(&self, log: &mut LogFile) {
        let (batch, last) = {
            let mut state = lock(&self.state);
            (std::mem::take(&mut state.unwritten), state.last_seq)
        };
        let first = log.written + 1;
        let result = log
            .file
            .write_all(&batch)
            .and_then(|()| log.file.sync_data());
        log.written = last;
        match result {
            Ok(()) => {
                log.len += batch.len() as u64;
                if self.outbox_is_sink {
                    self.checkpoint_wanted.notify_one(); // only compaction to do
                }
            }
            Err(error) => {
                // Cut a partial batch off so that the next one starts on a line boundary.
                let _ = log.file.set_len(log.len);
                tracing::error!(first, last, %error, "cannot append events to the outbox");
                self.forget(first, last, &error);
            }
        }
    }

    /// Drops the events `first..=last` of a batch that could not be written, and leaves the error
    /// for each of their publishers.
    fn forget(&self, first: u64, last: u64, error: &io::Error) {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let start = state.entries.partition_point(|e| e.seq < first);
        let end = state.entries.partition_point(|e| e.seq <= last);
        state.entries.drain(start..end);
        let message: Arc<str> = error.to_string().into();
        for seq in first..=last {
            state.failed.insert(seq, (error.kind(), message.clone()));
            state.acked.remove(&seq);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::outbox::DirLock;
    use deploy_protocol::events::EventType;

    fn event(n: usize) -> LifecycleEvent {
        LifecycleEvent {
            event_id: uuid::Uuid::new_v4(),
            event_type: EventType::BuildStarted,
            time: "2025-01-01T00:00:00Z".into(),
            correlation_id: Some(format!("c-{n}")),
            package_id: None,
            container_name: None,
            image_tag: None,
            source_service: "deploy-sender".into(),
            payload: serde_json::Value::Null,
        }
    }

    fn lines(outbox: &Outbox) -> Vec<serde_json::Value> {
        std::fs::read_to_string(outbox.log_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn one_commit_writes_every_event_recorded_before_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(DirLock::try_acquire(dir.path()).unwrap(), 100, true).unwrap();
        let seqs: Vec<_> = (0..3).map(|n| outbox.record(event(n)).unwrap()).collect();
        assert!(lines(&outbox).is_empty(), "recording alone writes nothing");

        outbox.commit(seqs[2]).unwrap();
        let written = lines(&outbox);
        assert_eq!(
            written.len(),
            3,
            "the last publisher's commit wrote all three"
        );
        for (n, line) in written.iter().enumerate() {
            assert_eq!(line["seq"], n as u64 + 1);
            assert_eq!(line["event"]["correlation_id"], format!("c-{n}"));
        }
        // The others find theirs written and write nothing more.
        outbox.commit(seqs[0]).unwrap();
        outbox.commit(seqs[1]).unwrap();
        assert_eq!(lines(&outbox).len(), 3);
    }

    #[test]
    fn a_recorded_line_matches_the_record_format_the_log_is_read_with() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::try_acquire(dir.path()).unwrap();
        let outbox = Outbox::open(lock, 100, true).unwrap();
        let sent = event(7);
        let seq = outbox.record(sent.clone()).unwrap();
        outbox.commit(seq).unwrap();
        drop(outbox);
        let (entries, _) =
            super::super::files::read_log(&dir.path().join(super::super::LOG_FILE)).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].seq, &*entries[0].event), (1, &sent));
    }

    #[test]
    fn a_failed_write_fails_every_publisher_of_its_batch_and_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(DirLock::try_acquire(dir.path()).unwrap(), 100, true).unwrap();
        let writable = {
            let mut log = lock(&outbox.log);
            let read_only = std::fs::File::open(outbox.log_path()).unwrap();
            std::mem::replace(&mut log.file, read_only)
        };
        let (a, b) = (
            outbox.record(event(0)).unwrap(),
            outbox.record(event(1)).unwrap(),
        );
        assert!(matches!(outbox.commit(b), Err(EventError::Record { .. })));
        assert!(
            matches!(outbox.commit(a), Err(EventError::Record { .. })),
            "the publisher whose event went in another's batch hears of it too"
        );
        assert!(outbox.list(10).is_empty(), "forgotten");
        assert!(
            lock(&outbox.state).failed.is_empty(),
            "each error reported once"
        );

        lock(&outbox.log).file = writable;
        let c = outbox.record(event(2)).unwrap();
        outbox.commit(c).unwrap();
        let written = lines(&outbox);
        assert_eq!(written.len(), 1);
        assert_eq!(written[0]["seq"], 3, "sequence numbers are not reused");
    }
}
