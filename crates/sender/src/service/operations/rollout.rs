//! Fleet rollouts as a service resource: a stored package rolled out to several receivers in the
//! background ([`crate::pipeline::rollout`]), its report kept for `GET`, followed as server-sent events,
//! stoppable (`DELETE`: stop and roll back), and told as ROLLOUT_* lifecycle events. Each
//! rollout's record is kept in the state directory: a restarted service shows the rollouts of
//! earlier runs, those it was running then as INTERRUPTED, which `DELETE` undoes.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deploy_protocol::DeploymentSpec;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::serde_defaults::yes;
use crate::client::{ReceiverClient, ReceiverTarget};
use crate::pipeline::rollout::{
    lifecycle_event, roll_out, settle_interrupted, undo_interrupted, BatchSize, HostError, Payload,
    Plan, Release, RolloutEvent, RolloutOptions, RolloutRecorder, RolloutReport, RolloutStatus,
};
use crate::pipeline::{
    now_rfc3339, prepare_image, CompressionOptions, Lifecycle, NoProgress, PackageInfo, Subject,
};
use crate::service::error::correlation_id;
use crate::service::state::AppState;
use crate::SenderError;

/// `POST /api/v1/rollouts`: roll a stored package out to several receivers.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutInput {
    /// The stored package.
    pub package_id: Uuid,
    /// Receiver base URLs, in rollout order (the first `canary` are the canary).
    pub receivers: Vec<String>,
    /// What each receiver runs (`image` defaults to the package's first tag).
    pub deployment: DeploymentSpec,
    /// Canary hosts (default: 1 with 3 hosts or more, else 0).
    #[serde(default)]
    pub canary: Option<usize>,
    /// Hosts per batch after the canary: `"2"` or `"25%"` (the default).
    #[serde(default)]
    pub batch: Option<String>,
    /// Failed hosts tolerated (default 0; a failed canary always stops the rollout).
    #[serde(default)]
    pub max_failures: usize,
    /// Roll back the hosts a stopped rollout moved (default true).
    #[serde(default = "yes")]
    pub rollback: bool,
    /// Longest wait for one host's deployment, seconds (default 600).
    #[serde(default)]
    pub host_timeout_secs: Option<u64>,
    /// Send and load the release on every host after the first step while that step is deployed
    /// and checked, so that later steps only switch containers (default false). Hosts a stopped
    /// rollout did not reach may then hold the new image, never a container of it.
    #[serde(default)]
    pub preload: bool,
}

/// A rollout as the service shows it. Kept in the state directory (`rollouts/<id>.json`), so a
/// restarted service still shows it; one that was running then is INTERRUPTED.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutView {
    /// The rollout's id.
    pub rollout_id: Uuid,
    /// The package rolled out.
    pub package_id: Uuid,
    /// The container name on every host.
    pub container_name: String,
    /// Sent with every request to the receivers: their deployment records carry it.
    pub correlation_id: String,
    /// When it was started (RFC 3339).
    pub started_at: String,
    /// True once `DELETE` asked it to stop (or, INTERRUPTED, to be undone).
    pub abort_requested: bool,
    /// Hosts, outcomes, and where the fleet stands.
    pub report: RolloutReport,
}

struct Entry {
    view: watch::Sender<RolloutView>,
    abort: CancellationToken,
    /// Held while the record is written; true once a final report was: a RUNNING snapshot
    /// still on its way to the disk is then not written after it.
    written_final: Mutex<bool>,
}

impl Entry {
    fn new(view: RolloutView) -> Self {
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

/// Rollout records kept in the state directory; the oldest finished ones beyond this are removed
/// when the service starts.
const KEPT_ROLLOUTS: usize = 1000;

/// The rollouts of this service: those it runs, and those kept from earlier runs.
#[derive(Clone, Default)]
pub struct Rollouts {
    entries: Arc<Mutex<HashMap<Uuid, Arc<Entry>>>>,
    /// Where each rollout's record is written; `None`: kept in memory only.
    dir: Option<Arc<PathBuf>>,
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
            tracing::warn!(rollout_id = %view.rollout_id, "a rollout was running when the service stopped: it is INTERRUPTED; DELETE /api/v1/rollouts/{} rolls back the hosts it moved", view.rollout_id);
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
    fn publish(&self, entry: &Entry, report: RolloutReport) {
        if report.status != RolloutStatus::Running {
            if let Some(dir) = &self.dir {
                let mut view = entry.view.borrow().clone();
                view.report = report.clone();
                entry.write(dir, &view);
            }
        }
        entry.view.send_modify(|v| v.report = report);
    }

    fn insert(&self, entry: &Arc<Entry>) {
        let id = entry.view.borrow().rollout_id;
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(entry));
    }

    /// Writes the entry's record now and at every change, until it is no longer RUNNING (each
    /// write whole: a new file renamed over the old one).
    fn keep(&self, entry: &Arc<Entry>) {
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

/// `<the request's correlation id>.rollout-<id>` (the request's cut to fit the 128 characters a
/// correlation id may have), or `rollout-<id>`.
fn rollout_correlation_id(request: Option<&str>, id: Uuid) -> String {
    let own = format!("rollout-{id}");
    match request {
        Some(theirs) if !theirs.is_empty() => {
            let room = 128 - own.len() - 1;
            let cut: String = theirs.chars().take(room).collect();
            format!("{cut}.{own}")
        }
        _ => own,
    }
}

/// The events' subject of a rollout.
fn subject_of(view: &RolloutView) -> Subject {
    Subject {
        package_id: Some(view.package_id),
        correlation_id: Some(view.correlation_id.clone()),
        container_name: Some(view.container_name.clone()),
        image_tag: None,
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

/// Writes `view` as `<dir>/<id>.json`, whole: a new file (its own temporary name), synced, renamed
/// over the old one, the directory synced.
fn write_record(dir: &Path, view: &RolloutView) -> std::io::Result<()> {
    let path = dir.join(format!("{}.json", view.rollout_id));
    let bytes = serde_json::to_vec_pretty(view).map_err(std::io::Error::other)?;
    let partial = dir.join(format!(
        "{}.{}.tmp",
        view.rollout_id,
        Uuid::new_v4().simple()
    ));
    let written = (|| {
        let mut file = std::fs::File::create_new(&partial)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written?;
    std::fs::File::open(dir)?.sync_all()
}

/// Undoes an INTERRUPTED rollout: each host left IN_PROGRESS is looked up on its receiver (its
/// deployment of this rollout, waited for while it runs), then every host on the new release is
/// rolled back at once, as a stopped rollout's are; told as ROLLOUT_ROLLED_BACK or _FAILED.
async fn undo_interrupted_rollout(state: AppState, entry: Arc<Entry>) {
    let view = entry.view.borrow().clone();
    let receiver = &state.config().receiver;
    let secret = receiver.secret.as_deref().unwrap_or_default();
    let clients: Vec<Result<ReceiverClient, HostError>> = view
        .report
        .hosts
        .iter()
        .map(|h| {
            ReceiverTarget::new(&h.host, &receiver.key_id, secret.as_bytes())
                .map(|target| receiver.client_for(state.http().clone(), target))
                .map_err(|e| HostError {
                    code: e.code(),
                    message: e.to_string(),
                })
        })
        .collect();
    let name = view.container_name.as_str();
    let correlation_id = view.correlation_id.as_str();
    let recorder =
        RolloutRecorder::spawn(state.events().clone(), subject_of(&view), view.rollout_id);
    let on_event = |event: RolloutEvent| {
        recorder.observe(&event);
        let report = match event {
            RolloutEvent::Started { report }
            | RolloutEvent::Host { report, .. }
            | RolloutEvent::StepCompleted { report, .. }
            | RolloutEvent::RollingBack { report, .. }
            | RolloutEvent::Finished { report } => report,
        };
        state.rollouts().publish(&entry, report);
    };
    let clients = &clients;
    // Records written before a rollout had a correlation id of its own may share theirs with
    // other rollouts: a host such a record shows not reached is not looked up.
    let own_id = correlation_id.ends_with(&format!("rollout-{}", view.rollout_id));
    let not_reached: Vec<bool> = view
        .report
        .hosts
        .iter()
        .map(|h| h.outcome == crate::pipeline::rollout::HostOutcome::NotReached)
        .collect();
    let not_reached = &not_reached;
    let settle = |i: usize| async move {
        if !own_id && not_reached.get(i).copied().unwrap_or(false) {
            return Ok(crate::pipeline::rollout::Settled::NotStarted);
        }
        match &clients[i] {
            Ok(client) => settle_interrupted(client, name, correlation_id).await,
            Err(e) => Err(e.clone()),
        }
    };
    let rollback = |i: usize, deployment: Uuid| async move {
        let client = clients[i].as_ref().map_err(Clone::clone)?;
        client
            .rollback(deployment, Some(correlation_id))
            .await
            .map(|r| r.image)
            .map_err(|e| HostError {
                code: e.code(),
                message: e.to_string(),
            })
    };
    let deadline = RolloutOptions::default().rollback_timeout;
    undo_interrupted(view.report.clone(), settle, rollback, deadline, &on_event).await;
    recorder.finish().await;
}

/// Checks `input` and starts the rollout in the background; answers its first view.
pub async fn start(state: &AppState, input: RolloutInput) -> Result<RolloutView, SenderError> {
    let package = state.store().get(input.package_id).await?;
    let batch = match input.batch.as_deref() {
        Some(b) => b.parse::<BatchSize>().map_err(SenderError::Validation)?,
        None => BatchSize::default(),
    };
    let options = RolloutOptions {
        canary: input.canary,
        batch,
        max_failures: input.max_failures,
        rollback: input.rollback,
        host_timeout: Duration::from_secs(input.host_timeout_secs.unwrap_or(600).max(1)),
        max_concurrent: state.config().max_concurrent_transfers.max(1),
        slots: Some(std::sync::Arc::clone(state.transfer_slots())),
        preload: input.preload,
        ..RolloutOptions::default()
    };
    let plan = Plan::new(input.receivers.len(), options.canary, options.batch)
        .map_err(SenderError::Validation)?;
    let receiver = &state.config().receiver;
    let secret = receiver.secret.as_deref().unwrap_or_default();
    let targets = input
        .receivers
        .iter()
        .map(|url| {
            ReceiverTarget::new(url, &receiver.key_id, secret.as_bytes())
                .map(|target| receiver.client_for(state.http().clone(), target))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut check = input.deployment.clone();
    check.image = check.image.or_else(|| Some(package.image_id.clone()));
    check
        .validate()
        .map_err(|e| SenderError::Validation(format!("deployment: {e}")))?;

    let id = Uuid::new_v4();
    // Unique to the rollout (a client may send the same X-Correlation-Id again): the receivers'
    // records of its deployments carry it, which is how an interrupted rollout finds them.
    let correlation_id = rollout_correlation_id(correlation_id().as_deref(), id);
    let release = Release {
        payload: Payload::Package(Box::new(package.clone())),
        spec: input.deployment,
        correlation_id: Some(correlation_id.clone()),
    };
    let entry = Arc::new(Entry::new(RolloutView {
        rollout_id: id,
        package_id: package.package_id,
        container_name: release.spec.container_name.clone(),
        correlation_id: correlation_id.clone(),
        started_at: now_rfc3339(),
        abort_requested: false,
        report: RolloutReport::planned(&input.receivers, &plan),
    }));
    state.rollouts().insert(&entry);
    state.rollouts().keep(&entry);
    let first = entry.view.borrow().clone();

    let subject = Subject {
        package_id: Some(package.package_id),
        correlation_id: Some(correlation_id),
        container_name: Some(release.spec.container_name.clone()),
        image_tag: package.image_tags.first().cloned(),
    };
    let recorder = RolloutRecorder::spawn(state.events().clone(), subject, id);
    let state = state.clone();
    tokio::spawn(async move {
        let release = Release {
            payload: payload(&state, package).await,
            ..release
        };
        let on_event = |event: RolloutEvent| {
            recorder.observe(&event);
            let report = match event {
                RolloutEvent::Started { report }
                | RolloutEvent::Host { report, .. }
                | RolloutEvent::StepCompleted { report, .. }
                | RolloutEvent::RollingBack { report, .. }
                | RolloutEvent::Finished { report } => report,
            };
            state.rollouts().publish(&entry, report);
        };
        let result = roll_out(&targets, &release, &options, entry.abort.clone(), &on_event).await;
        if let Err(e) = result {
            tracing::error!(rollout_id = %id, error = %e, "rollout could not run");
            let mut report = entry.view.borrow().report.clone();
            report.status = RolloutStatus::Failed;
            report.reason = Some(e.to_string());
            state.rollouts().publish(&entry, report);
        }
        recorder.finish().await;
    });
    Ok(first)
}

/// The package's image as layers prepared in the layer cache (each host then receives only the
/// blobs it lacks), or the whole package when its image is no longer in the local engine (or
/// cannot be prepared).
async fn payload(state: &AppState, package: PackageInfo) -> Payload {
    let docker = match state.docker().await {
        Ok(docker) => docker,
        Err(e) => {
            tracing::warn!(error = %e, "no Docker engine: the rollout sends the whole package");
            return Payload::Package(Box::new(package));
        }
    };
    let options = CompressionOptions {
        compression: package.compression,
        level: package.compression_level,
        zstd_workers: state
            .config()
            .zstd_workers
            .unwrap_or_else(crate::pipeline::default_zstd_workers),
    };
    match prepare_image(
        &docker,
        state.layer_cache(),
        &package.image_id,
        &options,
        Arc::new(NoProgress),
    )
    .await
    {
        Ok(mut image) => {
            image.tags = package.image_tags.clone();
            Payload::Layers(Arc::new(image))
        }
        Err(e) => {
            tracing::warn!(image = %package.image_id, error = %e, "cannot prepare the image's layers: the rollout sends the whole package");
            Payload::Package(Box::new(package))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::rollout::HostOutcome;
    use deploy_protocol::events::EventType;

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
            abort_requested: false,
            report,
        }
    }

    fn stored(dir: &Path, id: Uuid) -> RolloutView {
        let bytes = std::fs::read(dir.join(format!("{id}.json"))).expect("the record");
        serde_json::from_slice(&bytes).expect("a rollout view")
    }

    #[test]
    fn a_rollouts_correlation_id_is_its_own_and_fits() {
        let id = Uuid::from_u128(7);
        assert_eq!(
            rollout_correlation_id(Some("ci-42"), id),
            format!("ci-42.rollout-{id}")
        );
        assert_eq!(rollout_correlation_id(None, id), format!("rollout-{id}"));
        let long = "x".repeat(128);
        let made = rollout_correlation_id(Some(&long), id);
        assert!(made.ends_with(&format!(".rollout-{id}")), "{made}");
        assert!(
            deploy_protocol::envelope::is_valid_correlation_id(&made),
            "{made}"
        );
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
}
