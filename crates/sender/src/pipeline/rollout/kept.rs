//! Rollout records on disk. The service keeps its own (`service::operations::rollout`); this
//! module also keeps those of `deploy-sender deploy` to several hosts, in
//! `<state dir>/cli-rollouts/`: `<id>.json`, written whole at every change, and `<id>.lock`,
//! locked while the command runs. A record found RUNNING whose lock nobody holds belongs to a
//! command that died (SIGKILL, a crash, a lost machine): it is INTERRUPTED, and
//! `deploy-sender rollouts undo` undoes it as `DELETE /api/v1/rollouts/{id}` undoes the
//! service's.

use std::fs::{File, TryLockError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::report::{RolloutReport, RolloutStatus};

/// Writes `value` as `<dir>/<id>.json`, whole: a new file (its own temporary name), synced,
/// renamed over the old one, the directory synced.
pub fn write_whole<T: Serialize>(dir: &Path, id: Uuid, value: &T) -> std::io::Result<()> {
    let path = dir.join(format!("{id}.json"));
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let partial = dir.join(format!("{id}.{}.tmp", Uuid::new_v4().simple()));
    let written = (|| {
        let mut file = File::create_new(&partial)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    File::open(dir)?.sync_all()
}

/// Where `deploy-sender deploy` keeps its rollouts' records, under the state directory.
pub fn cli_rollouts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cli-rollouts")
}

/// A rollout of `deploy-sender deploy`, as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CliRollout {
    /// The rollout's id.
    pub rollout_id: Uuid,
    /// The container name on every host.
    pub container_name: String,
    /// Sent with every request to the receivers (`<--correlation-id>.rollout-<id>`): how its
    /// deployments are found in their journals.
    pub correlation_id: String,
    /// When it was started (RFC 3339).
    pub started_at: String,
    /// What was rolled out (an image tag or id, or a package id with `--full`).
    pub release: String,
    /// Whether a stopped rollout rolls back the hosts it moved (not `--no-rollback`).
    pub rollback: bool,
    /// `--host-timeout`, seconds.
    pub host_timeout_secs: u64,
    /// `--rollback-timeout`, seconds (the undo's too).
    #[serde(default = "default_rollback_timeout_secs")]
    pub rollback_timeout_secs: u64,
    /// Hosts, outcomes, and where the fleet stands.
    pub report: RolloutReport,
}

fn default_rollback_timeout_secs() -> u64 {
    300
}

/// A record held by the command that runs (or undoes) its rollout: its lock held, and each
/// change written by a thread of its own (the newest first: a change that comes while one is
/// being written replaces any older one still waiting), so that no fsync holds up the rollout.
#[derive(Debug)]
pub struct HeldRollout {
    record: Mutex<CliRollout>,
    writes: Mutex<Option<std::sync::mpsc::Sender<CliRollout>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    _lock: File,
}

/// Why a record cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    /// Another process holds it: the command that runs the rollout (or undoes it) is alive.
    #[error("rollout {0} is being run or undone by another deploy-sender (its lock is held)")]
    Held(Uuid),
    /// No such record.
    #[error("no rollout {id} in {dir}")]
    NotFound {
        /// The rollout.
        id: Uuid,
        /// Where it was looked for.
        dir: String,
    },
    /// The file system refused.
    #[error("rollout records in {dir}: {error}")]
    Io {
        /// The directory.
        dir: String,
        /// What failed.
        error: std::io::Error,
    },
}

/// Finished records kept in the directory; older ones are removed when a rollout starts.
const KEPT: usize = 1000;

impl HeldRollout {
    /// Takes the lock of `record`'s rollout in `dir` (created if missing) and writes it, before
    /// any host is touched (an error if it cannot be). Leftover temp files, and the oldest
    /// finished records beyond 1000, are removed first.
    pub fn start(dir: &Path, record: CliRollout) -> Result<Self, TakeError> {
        let io = |error| TakeError::Io {
            dir: dir.display().to_string(),
            error,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        prune(dir);
        let lock = lock(dir, record.rollout_id)?;
        write_whole(dir, record.rollout_id, &record).map_err(io)?;
        Ok(Self::held(dir, record, lock))
    }

    /// Takes the lock of rollout `id` in `dir`, then reads its record. A lock held a moment
    /// (`rollouts list` looking at it) is waited for briefly.
    pub fn take(dir: &Path, id: Uuid) -> Result<Self, TakeError> {
        let io = |error| TakeError::Io {
            dir: dir.display().to_string(),
            error,
        };
        let path = dir.join(format!("{id}.json"));
        if !path.exists() {
            return Err(TakeError::NotFound {
                id,
                dir: dir.display().to_string(),
            });
        }
        let mut tries = 0;
        let lock = loop {
            match lock(dir, id) {
                Err(TakeError::Held(_)) if tries < 10 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let bytes = std::fs::read(&path).map_err(io)?;
        let record: CliRollout = serde_json::from_slice(&bytes)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Ok(Self::held(dir, record, lock))
    }

    fn held(dir: &Path, record: CliRollout, lock: File) -> Self {
        let (writes, pending) = std::sync::mpsc::channel::<CliRollout>();
        let dir = dir.to_owned();
        let writer = std::thread::spawn(move || {
            while let Ok(mut newest) = pending.recv() {
                while let Ok(newer) = pending.try_recv() {
                    newest = newer;
                }
                if let Err(e) = write_whole(&dir, newest.rollout_id, &newest) {
                    tracing::error!(rollout_id = %newest.rollout_id, error = %e, "cannot write the rollout's record");
                }
            }
        });
        Self {
            record: Mutex::new(record),
            writes: Mutex::new(Some(writes)),
            writer: Mutex::new(Some(writer)),
            _lock: lock,
        }
    }

    /// The record as it stands.
    pub fn record(&self) -> CliRollout {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records `report` (written by the writer thread; a failed write is logged: the rollout
    /// goes on).
    pub fn update(&self, report: RolloutReport) {
        let record = {
            let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
            record.report = report;
            record.clone()
        };
        if let Some(writes) = self
            .writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = writes.send(record);
        }
    }

    /// Waits until every change is written (then the lock goes with `self`).
    pub fn finish(self) {
        drop(
            self.writes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if let Some(writer) = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = writer.join();
        }
    }
}

/// Takes the lock of rollout `id` in `dir`.
fn lock(dir: &Path, id: Uuid) -> Result<File, TakeError> {
    let io = |error| TakeError::Io {
        dir: dir.display().to_string(),
        error,
    };
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{id}.lock")))
        .map_err(io)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(TryLockError::WouldBlock) => Err(TakeError::Held(id)),
        Err(TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Removes leftover temp files, and the oldest finished records (with their locks) beyond
/// [`KEPT`]; what cannot be removed is left.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(&path);
        }
    }
    let Ok(records) = list_cli_rollouts(dir) else {
        return;
    };
    let finished = records.iter().filter(|r| {
        !matches!(
            r.report.status,
            RolloutStatus::Running | RolloutStatus::Interrupted
        )
    });
    for old in finished.skip(KEPT) {
        let _ = std::fs::remove_file(dir.join(format!("{}.json", old.rollout_id)));
        let _ = std::fs::remove_file(dir.join(format!("{}.lock", old.rollout_id)));
    }
}

/// The rollouts kept in `dir`, newest first; one RUNNING whose lock nobody holds is shown
/// INTERRUPTED (not written: `undo` does that). Unreadable records are skipped with a warning.
pub fn list_cli_rollouts(dir: &Path) -> std::io::Result<Vec<CliRollout>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let read = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<CliRollout>(&b).map_err(|e| e.to_string()));
        match read {
            Ok(mut record) => {
                if record.report.status == RolloutStatus::Running
                    && !is_held(dir, record.rollout_id)
                {
                    record.report =
                        super::undo::interrupted(record.report, "its deploy-sender is gone");
                }
                found.push(record);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a rollout record that cannot be read")
            }
        }
    }
    found.sort_by(|a, b| b.started_at.cmp(&a.started_at));
    Ok(found)
}

/// Whether a live process holds rollout `id`'s lock.
fn is_held(dir: &Path, id: Uuid) -> bool {
    let Ok(lock) = File::open(dir.join(format!("{id}.lock"))) else {
        return false;
    };
    matches!(lock.try_lock_shared(), Err(TryLockError::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::super::plan::{BatchSize, Plan};
    use super::*;

    fn record(id: Uuid) -> CliRollout {
        let hosts = vec!["http://a/".to_owned(), "http://b/".to_owned()];
        let plan = Plan::new(2, Some(1), BatchSize::Hosts(1)).expect("plan");
        CliRollout {
            rollout_id: id,
            container_name: "web".into(),
            correlation_id: format!("rollout-{id}"),
            started_at: "2026-12-01T07:00:00Z".into(),
            release: "web:v2".into(),
            rollback: true,
            host_timeout_secs: 600,
            rollback_timeout_secs: 300,
            report: RolloutReport::planned(&hosts, &plan),
        }
    }

    #[test]
    fn a_running_record_is_interrupted_once_its_command_lets_go() {
        let dir = tempfile::tempdir().expect("dir");
        let id = Uuid::new_v4();
        let held = HeldRollout::start(dir.path(), record(id)).expect("taken");
        let mut report = held.record().report;
        report.hosts[0].outcome = super::super::report::HostOutcome::InProgress;
        held.update(report);
        let listed = list_cli_rollouts(dir.path()).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].report.status,
            RolloutStatus::Running,
            "its command holds it"
        );
        assert!(matches!(
            HeldRollout::take(dir.path(), id),
            Err(TakeError::Held(held)) if held == id
        ));

        held.finish();
        let listed = list_cli_rollouts(dir.path()).expect("list");
        assert_eq!(listed[0].report.status, RolloutStatus::Interrupted);
        let taken = HeldRollout::take(dir.path(), id).expect("nobody holds it");
        assert_eq!(taken.record().report.status, RolloutStatus::Running);
        assert_eq!(
            taken.record().report.hosts[0].outcome,
            super::super::report::HostOutcome::InProgress,
            "the update was written before finish() returned"
        );
        assert_eq!(taken.record().release, "web:v2");
        assert!(list_cli_rollouts(&dir.path().join("none"))
            .expect("no directory: none")
            .is_empty());
        assert!(matches!(
            HeldRollout::take(dir.path(), Uuid::new_v4()),
            Err(TakeError::NotFound { .. })
        ));
    }
}
