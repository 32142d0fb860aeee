//! The service's rollout records: each rollout's view kept in memory and written to
//! `<state dir>/rollouts/<id>.json` at every change, read back when the service starts (those
//! that were RUNNING then are INTERRUPTED), listed, followed, and stopped or undone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{subject_of, undo_interrupted_rollout, RolloutView};
use crate::pipeline::now_rfc3339;
use crate::pipeline::rollout::{lifecycle_event, RolloutEvent, RolloutReport, RolloutStatus};
use crate::pipeline::Lifecycle;
use crate::service::state::AppState;
use crate::SenderError;

/// A rollout the service shows: its view, followed, and how to stop it.
pub(super) struct Entry {
    pub(super) view: watch::Sender<RolloutView>,
    pub(super) abort: CancellationToken,
    /// Held while the record is written; true once a final report was: a RUNNING snapshot
    /// still on its way to the disk is then not written after it.
    written_final: Mutex<bool>,
}

impl Entry {
    pub(super) fn new(view: RolloutView) -> Self {
        let (view, _) = watch::channel(view);
        Self {
            view,
            abort: CancellationToken::new(),
            written_final: Mutex::new(false),
        }
    }

    /// Writes `view` as the record in `dir`, unless it is RUNNING and a final one was written.
    fn write(&self, dir: &Path, view: &RolloutView) {
        let mut written_final = self
            .written_final
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let running = view.report.status == RolloutStatus::Running;
        if running && *written_final {
            return;
        }
        match write_record(dir, view) {
            Ok(()) => *written_final = !running,
            Err(e) => {
                tracing::error!(rollout_id = %view.rollout_id, error = %e, "cannot write the rollout's record")
            }
        }
    }
}

/// Rollout records kept (in memory and in the state directory); the oldest finished ones beyond
/// this are removed when the service starts and whenever a rollout starts. INTERRUPTED ones stay
/// until they are undone: they may still have hosts to roll back.
const KEPT_ROLLOUTS: usize = 1000;

/// The rollouts of this service: those it runs, and those kept from earlier runs.
#[derive(Clone)]
pub struct Rollouts {
    entries: Arc<Mutex<HashMap<Uuid, Arc<Entry>>>>,
    /// Where each rollout's record is written; `None`: kept in memory only.
    dir: Option<Arc<PathBuf>>,
    /// [`KEPT_ROLLOUTS`], smaller in tests.
    kept: usize,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Rollouts {
    /// Opens the records in `dir` (created if missing). Records of rollouts that were running
    /// when the service last stopped become INTERRUPTED (written back, and told as
    /// ROLLOUT_FAILED through `events`); the oldest finished records beyond [`KEPT_ROLLOUTS`]
    /// are removed. An unreadable record is logged and left alone.
    pub async fn open(dir: PathBuf, events: &Lifecycle) -> Result<Self, SenderError> {
        let found = now_rfc3339();
        let (views, interrupted) = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || load_records(&dir, &found)
        })
        .await
        .map_err(|e| SenderError::Internal(format!("reading the rollout records: {e}")))?
        .map_err(|e| {
            SenderError::Internal(format!(
                "cannot read the rollout records in {}: {e}",
                dir.display()
            ))
        })?;
        for view in &interrupted {
            let undo = if view.rollback {
                "looks its hosts up and rolls back those it moved"
            } else {
                "looks its hosts up (it was started with rollback: false: none is rolled back)"
            };
            tracing::warn!(rollout_id = %view.rollout_id, "a rollout was running when the service stopped: it is INTERRUPTED; DELETE /api/v1/rollouts/{} {undo}", view.rollout_id);
            let event = RolloutEvent::Finished {
                report: view.report.clone(),
            };
            if let Some((event_type, payload)) = lifecycle_event(view.rollout_id, &event) {
                events.emit(event_type, &subject_of(view), payload).await;
            }
        }
        let entries = views
            .into_iter()
            .map(|view| (view.rollout_id, Arc::new(Entry::new(view))))
            .collect();
        Ok(Self {
            entries: Arc::new(Mutex::new(entries)),
            dir: Some(Arc::new(dir)),
            kept: KEPT_ROLLOUTS,
        })
    }

    fn get(&self, id: Uuid) -> Result<Arc<Entry>, SenderError> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
            .ok_or_else(|| SenderError::NotFound(format!("no rollout {id}")))
    }

    /// Shows `report` as the rollout's; a final one is written to its record first, so that a
    /// rollout shown finished is never found RUNNING (and so INTERRUPTED) by the next start.
    pub(super) fn publish(&self, entry: &Entry, report: RolloutReport) {
        if report.status != RolloutStatus::Running {
            if let Some(dir) = &self.dir {
                let mut view = entry.view.borrow().clone();
                view.report = report.clone();
                entry.write(dir, &view);
            }
        }
        entry.view.send_modify(|v| v.report = report);
    }

    /// Adds a rollout, and forgets the oldest finished ones beyond the records kept (their
    /// records are removed too).
    pub(super) fn insert(&self, entry: &Arc<Entry>) {
        let id = entry.view.borrow().rollout_id;
        let forgotten = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.insert(id, Arc::clone(entry));
            let excess = entries.len().saturating_sub(self.kept);
            let mut finished: Vec<(String, Uuid)> = entries
                .values()
                .map(|e| e.view.borrow())
                .filter(|v| {
                    !matches!(
                        v.report.status,
                        RolloutStatus::Running | RolloutStatus::Interrupted
                    )
                })
                .map(|v| (v.started_at.clone(), v.rollout_id))
                .collect();
            finished.sort();
            finished.truncate(excess);
            for (_, old) in &finished {
                entries.remove(old);
            }
            finished
        };
        if let (Some(dir), false) = (&self.dir, forgotten.is_empty()) {
            for (_, old) in forgotten {
                let path = dir.join(format!("{old}.json"));
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an old rollout record");
                }
            }
        }
    }

    /// Writes the entry's record now and at every change, until it is no longer RUNNING (each
    /// write whole: a new file renamed over the old one).
    pub(super) fn keep(&self, entry: &Arc<Entry>) {
        let Some(dir) = self.dir.clone() else {
            return;
        };
        let mut updates = entry.view.subscribe();
        let entry = Arc::clone(entry);
        tokio::spawn(async move {
            loop {
                let view = updates.borrow_and_update().clone();
                let running = view.report.status == RolloutStatus::Running;
                let id = view.rollout_id;
                let (dir, writer) = (Arc::clone(&dir), Arc::clone(&entry));
                if let Err(e) = tokio::task::spawn_blocking(move || writer.write(&dir, &view)).await
                {
                    tracing::error!(rollout_id = %id, error = %e, "cannot write the rollout's record");
                }
                if !running || updates.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// The views of the rollouts (in `status`, when given), newest first, at most `limit`.
    pub fn list(&self, status: Option<RolloutStatus>, limit: usize) -> Vec<RolloutView> {
        let mut views: Vec<RolloutView> = self
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|entry| entry.view.borrow().clone())
            .filter(|v| status.is_none_or(|s| v.report.status == s))
            .collect();
        views.sort_by(|a, b| (&b.started_at, b.rollout_id).cmp(&(&a.started_at, a.rollout_id)));
        views.truncate(limit);
        views
    }

    /// The rollout's view, followed.
    pub fn watch(&self, id: Uuid) -> Result<watch::Receiver<RolloutView>, SenderError> {
        Ok(self.get(id)?.view.subscribe())
    }

    /// Asks a running rollout to stop and roll back; undoes an INTERRUPTED one (finds where each
    /// host stands, rolls back those it moved); CONFLICT when it has already finished.
    pub fn abort(&self, state: &AppState, id: Uuid) -> Result<RolloutView, SenderError> {
        let entry = self.get(id)?;
        let undo = entry.view.send_if_modified(|v| {
            let interrupted = v.report.status == RolloutStatus::Interrupted;
            if interrupted {
                v.abort_requested = true;
                v.report.status = RolloutStatus::Running;
                v.report.reason = v
                    .report
                    .reason
                    .take()
                    .map(|r| format!("{r}; undone on request"));
            }
            interrupted
        });
        if undo {
            self.keep(&entry);
            tokio::spawn(undo_interrupted_rollout(state.clone(), Arc::clone(&entry)));
        } else if entry.view.borrow().report.status != RolloutStatus::Running {
            return Err(SenderError::Conflict(format!(
                "rollout {id} has already finished"
            )));
        } else {
            entry.abort.cancel();
            entry.view.send_modify(|v| v.abort_requested = true);
        }
        let view = entry.view.borrow().clone();
        Ok(view)
    }
}

/// Reads every record in `dir`: all of them, and (also among them) those that were RUNNING,
/// now INTERRUPTED and written back. Removes the oldest finished records beyond
/// [`KEPT_ROLLOUTS`] and leftover temporary files.
fn load_records(dir: &Path, found: &str) -> std::io::Result<(Vec<RolloutView>, Vec<RolloutView>)> {
    std::fs::create_dir_all(dir)?;
    let mut views = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<RolloutView>(&b).map_err(|e| e.to_string()))
        {
            Ok(view) => views.push(view),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a rollout record that cannot be read")
            }
        }
    }
    views.sort_by(|a, b| b.started_at.cmp(&a.started_at));
    let mut interrupted = Vec::new();
    for view in &mut views {
        if view.report.status == RolloutStatus::Running {
            view.report = crate::pipeline::rollout::interrupted(view.report.clone(), found);
            if let Err(e) = write_record(dir, view) {
                // Shown INTERRUPTED all the same; the next start finds it RUNNING again.
                tracing::error!(rollout_id = %view.rollout_id, error = %e, "cannot write the interrupted rollout's record");
            }
            interrupted.push(view.clone());
        }
    }
    if views.len() > KEPT_ROLLOUTS {
        for old in views.split_off(KEPT_ROLLOUTS) {
            let path = dir.join(format!("{}.json", old.rollout_id));
            if old.report.status == RolloutStatus::Interrupted {
                views.push(old);
            } else if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old rollout record");
            }
        }
    }
    Ok((views, interrupted))
}

/// Writes `view` as `<dir>/<id>.json`, whole (see [`write_whole`]).
fn write_record(dir: &Path, view: &RolloutView) -> std::io::Result<()> {
    crate::pipeline::rollout::kept::write_whole(dir, view.rollout_id, view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::rollout::HostOutcome;
    use crate::pipeline::rollout::{BatchSize, Plan};
    use deploy_protocol::events::EventType;
    use std::time::Duration;

    fn view(status: RolloutStatus, started_at: &str) -> RolloutView {
        let hosts = vec!["http://a/".to_owned(), "http://b/".to_owned()];
        let plan = Plan::new(2, Some(0), BatchSize::Hosts(1)).expect("plan");
        let mut report = RolloutReport::planned(&hosts, &plan);
        report.status = status;
        report.hosts[0].outcome = HostOutcome::InProgress;
        RolloutView {
            rollout_id: Uuid::new_v4(),
            package_id: Uuid::new_v4(),
            container_name: "web".into(),
            correlation_id: "rollout-test".into(),
            started_at: started_at.into(),
            rollback: true,
            host_timeout_secs: 600,
            abort_requested: false,
            report,
        }
    }

    fn stored(dir: &Path, id: Uuid) -> RolloutView {
        let bytes = std::fs::read(dir.join(format!("{id}.json"))).expect("the record");
        serde_json::from_slice(&bytes).expect("a rollout view")
    }

    #[tokio::test]
    async fn a_restart_keeps_finished_rollouts_and_marks_running_ones_interrupted() {
        let state = tempfile::tempdir().expect("state dir");
        let dir = state.path().join("rollouts");
        std::fs::create_dir_all(&dir).expect("dir");
        let running = view(RolloutStatus::Running, "2026-12-01T10:00:00Z");
        let done = view(RolloutStatus::Completed, "2026-12-01T09:00:00Z");
        for v in [&running, &done] {
            write_record(&dir, v).expect("write");
        }
        std::fs::write(dir.join("not-a-rollout.json"), b"{").expect("garbage");
        std::fs::write(dir.join("cut-off.json.tmp"), b"{\"rollout").expect("partial");
        let events = Lifecycle::open(state.path().to_path_buf(), None, "t".into())
            .await
            .expect("outbox");

        let rollouts = Rollouts::open(dir.clone(), &events).await.expect("open");
        let shown = rollouts
            .watch(running.rollout_id)
            .expect("kept")
            .borrow()
            .clone();
        assert_eq!(shown.report.status, RolloutStatus::Interrupted);
        assert_eq!(shown.report.hosts[1].outcome, HostOutcome::NotReached);
        assert_eq!(
            stored(&dir, running.rollout_id).report.status,
            RolloutStatus::Interrupted,
            "written back"
        );
        let finished = rollouts
            .watch(done.rollout_id)
            .expect("kept")
            .borrow()
            .clone();
        assert_eq!(
            finished.report, done.report,
            "a finished record is as it was"
        );
        assert!(dir.join("not-a-rollout.json").exists(), "left alone");
        assert!(
            !dir.join("cut-off.json.tmp").exists(),
            "a partial write goes"
        );
        let told = events.sink().list(10);
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].event_type, EventType::RolloutFailed);
        assert_eq!(told[0].payload["report"]["status"], "INTERRUPTED");
        assert_eq!(told[0].correlation_id.as_deref(), Some("rollout-test"));

        // Opened again, nothing new is told.
        let again = Rollouts::open(dir.clone(), &events).await.expect("open");
        assert!(again.watch(running.rollout_id).is_ok());
        assert_eq!(events.sink().list(10).len(), 1);
        assert!(matches!(
            again.watch(Uuid::new_v4()),
            Err(SenderError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_kept_rollout_is_written_at_every_change_until_it_ends() {
        let state = tempfile::tempdir().expect("state dir");
        let dir = state.path().join("rollouts");
        let events = Lifecycle::open(state.path().to_path_buf(), None, "t".into())
            .await
            .expect("outbox");
        let rollouts = Rollouts::open(dir.clone(), &events).await.expect("open");
        let v = view(RolloutStatus::Running, "2026-12-01T10:00:00Z");
        let entry = Arc::new(Entry::new(v.clone()));
        rollouts.insert(&entry);
        rollouts.keep(&entry);
        let until = |status: RolloutStatus| {
            let dir = dir.clone();
            async move {
                for _ in 0..200 {
                    if dir.join(format!("{}.json", v.rollout_id)).exists()
                        && stored(&dir, v.rollout_id).report.status == status
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("the record never said {status:?}");
            }
        };
        until(RolloutStatus::Running).await;
        entry
            .view
            .send_modify(|v| v.report.status = RolloutStatus::Completed);
        until(RolloutStatus::Completed).await;
        assert_eq!(
            std::fs::read_dir(&dir).expect("dir").count(),
            1,
            "one record, no partial file left"
        );
    }

    #[tokio::test]
    async fn starting_a_rollout_forgets_the_oldest_finished_beyond_those_kept() {
        let state = tempfile::tempdir().expect("state dir");
        let dir = state.path().join("rollouts");
        let events = Lifecycle::open(state.path().to_path_buf(), None, "t".into())
            .await
            .expect("outbox");
        let rollouts = Rollouts {
            kept: 3,
            ..Rollouts::open(dir.clone(), &events).await.expect("open")
        };
        let oldest_done = view(RolloutStatus::Completed, "2026-12-01T09:00:00Z");
        let interrupted = view(RolloutStatus::Interrupted, "2026-12-01T09:01:00Z");
        let running = view(RolloutStatus::Running, "2026-12-01T09:02:00Z");
        let newer_done = view(RolloutStatus::RolledBack, "2026-12-01T09:03:00Z");
        for v in [&oldest_done, &interrupted, &running, &newer_done] {
            write_record(&dir, v).expect("write");
            rollouts.insert(&Arc::new(Entry::new(v.clone())));
        }
        // Four held, three kept: the oldest finished one goes, from memory and from the disk.
        assert!(matches!(
            rollouts.watch(oldest_done.rollout_id),
            Err(SenderError::NotFound(_))
        ));
        assert!(!dir
            .join(format!("{}.json", oldest_done.rollout_id))
            .exists());
        for kept in [&interrupted, &running, &newer_done] {
            assert!(
                rollouts.watch(kept.rollout_id).is_ok(),
                "{:?}",
                kept.report.status
            );
            assert!(dir.join(format!("{}.json", kept.rollout_id)).exists());
        }
        // Only an INTERRUPTED and a RUNNING one beside a new one: nothing finished to forget
        // but the newer finished one.
        let newest = view(RolloutStatus::Running, "2026-12-01T09:04:00Z");
        rollouts.insert(&Arc::new(Entry::new(newest.clone())));
        assert!(rollouts.watch(newer_done.rollout_id).is_err());
        let statuses: Vec<RolloutStatus> = rollouts
            .list(None, 10)
            .into_iter()
            .map(|v| v.report.status)
            .collect();
        assert_eq!(
            statuses,
            [
                RolloutStatus::Running,
                RolloutStatus::Running,
                RolloutStatus::Interrupted
            ]
        );
        // None finished: the records may exceed the number kept, as running and interrupted
        // rollouts are never forgotten.
        rollouts.insert(&Arc::new(Entry::new(view(
            RolloutStatus::Running,
            "2026-12-01T09:05:00Z",
        ))));
        assert_eq!(rollouts.list(None, 10).len(), 4);
    }
}
