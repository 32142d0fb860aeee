//! Long-running work as jobs: each packaging or transfer request runs as a task with an id, its
//! progress (fed by the pipeline's [`Progress`] reports) and its outcome kept in a `watch`
//! channel, so that `GET /api/v1/jobs/{id}` reads the latest state and the SSE stream follows it.
//! A request without `respond-async` runs as a job too and waits for it, so a client that hangs
//! up never leaves half a package behind.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deploy_protocol::{ErrorBody, ErrorDetail};
use futures::FutureExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::pipeline::now_rfc3339;
use crate::pipeline::{Progress, ProgressEvent, Stage};
use crate::SenderError;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// `package_container`.
    Package,
    /// `transfer_package`.
    Transfer,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Under way.
    Running,
    /// Finished; `result` holds the answer.
    Succeeded,
    /// Finished; `error` says why.
    Failed,
}

/// The latest progress report of a job.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobProgress {
    /// `context`, `build`, `export`, `verify`, `upload` or `deploy`.
    pub stage: String,
    /// Bytes done in this stage.
    pub done: u64,
    /// Bytes of this stage in all, when known (an estimate for `export`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Average rate of this stage so far, bytes per second.
    pub bytes_per_sec: f64,
    /// The latest line for people (a build log line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether the stage has finished.
    pub finished: bool,
    /// The receiver, for `upload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<String>,
}

/// A job as `GET /api/v1/jobs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobView {
    /// Job id.
    pub job_id: Uuid,
    /// What it does.
    pub kind: JobKind,
    /// Where it stands.
    pub state: JobState,
    /// Correlation id of the request that started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// The latest progress report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<JobProgress>,
    /// The answer, once succeeded (what the synchronous call returns).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// Within a stage, progress is published at most this often (the pipeline reports every chunk:
/// thousands a second). A new stage, a finished stage and the job's end are published at once.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// A rate is reported only over at least this long: a stage's first report comes microseconds
/// after its start, and bytes over microseconds is no rate.
const MIN_RATE_WINDOW: Duration = Duration::from_millis(200);

/// A running job's handle: the pipeline reports progress to it.
pub struct Job {
    view: watch::Sender<JobView>,
    stage_started: Mutex<Option<(Stage, Instant)>>,
    /// The stage and time of the last progress published.
    published: Mutex<Option<(Stage, Instant)>>,
}

impl Job {
    /// Its id.
    pub fn id(&self) -> Uuid {
        self.view.borrow().job_id
    }

    /// Whether a report of `stage` is published now: the first of a stage, a finished one, or
    /// PROGRESS_INTERVAL after the last one.
    fn due(&self, stage: Stage, finished: bool) -> bool {
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let due = finished
            || published.is_none_or(|(last, at)| {
                last != stage || now.duration_since(at) >= PROGRESS_INTERVAL
            });
        if due {
            *published = Some((stage, now));
        }
        due
    }

    /// Reports upload progress to `receiver`.
    pub fn upload_progress(&self, receiver: &str, done: u64, total: u64) {
        let rate = self.rate(Stage::Upload, done);
        if !self.due(Stage::Upload, done >= total) {
            return;
        }
        self.view.send_modify(|v| {
            v.progress = Some(JobProgress {
                stage: Stage::Upload.as_str().into(),
                done,
                total: Some(total),
                bytes_per_sec: rate,
                message: None,
                finished: done >= total,
                receiver: Some(receiver.to_owned()),
            });
        });
    }

    /// Average rate of `stage` since its first report.
    fn rate(&self, stage: Stage, done: u64) -> f64 {
        let mut started = self
            .stage_started
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let since = match *started {
            Some((s, at)) if s == stage => at,
            _ => {
                let now = Instant::now();
                *started = Some((stage, now));
                now
            }
        };
        let elapsed = since.elapsed();
        if elapsed >= MIN_RATE_WINDOW {
            done as f64 / elapsed.as_secs_f64()
        } else {
            0.0
        }
    }

    fn finish(&self, outcome: Result<serde_json::Value, ErrorDetail>) {
        self.view.send_modify(|v| {
            v.finished_at = Some(now_rfc3339());
            match outcome {
                Ok(result) => {
                    v.state = JobState::Succeeded;
                    v.result = Some(result);
                }
                Err(error) => {
                    v.state = JobState::Failed;
                    v.error = Some(error);
                }
            }
        });
    }
}

impl Progress for Job {
    fn report(&self, event: ProgressEvent<'_>) {
        let rate = self.rate(event.stage, event.done);
        if !self.due(event.stage, event.finished) {
            return;
        }
        self.view.send_modify(|v| {
            let message = event
                .message
                .map(str::to_owned)
                .or_else(|| match &v.progress {
                    // Keep the last build line while the stage goes on without one.
                    Some(p) if p.stage == event.stage.as_str() => p.message.clone(),
                    _ => None,
                });
            v.progress = Some(JobProgress {
                stage: event.stage.as_str().into(),
                done: event.done,
                total: event.total,
                bytes_per_sec: rate,
                message,
                finished: event.finished,
                receiver: None,
            });
        });
    }
}

/// The jobs of this process: running ones, and the newest finished ones up to a limit.
pub struct Jobs {
    inner: Mutex<JobsInner>,
    history: usize,
}

#[derive(Default)]
struct JobsInner {
    jobs: HashMap<Uuid, watch::Receiver<JobView>>,
    order: VecDeque<Uuid>,
}

impl Jobs {
    /// Keeps at most `history` finished jobs.
    pub fn new(history: usize) -> Self {
        Self {
            inner: Mutex::default(),
            history: history.max(1),
        }
    }

    /// A job's state channel: `borrow()` for now, `changed()` to follow it.
    pub fn get(&self, id: Uuid) -> Option<watch::Receiver<JobView>> {
        self.lock().jobs.get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `work` as a job on its own task. The handle yields the typed outcome (for a caller
    /// that waits); the job view gets it as JSON.
    pub fn spawn<T, F>(
        &self,
        kind: JobKind,
        correlation_id: Option<String>,
        work: impl FnOnce(Arc<Job>) -> F,
    ) -> (Uuid, JoinHandle<Result<T, SenderError>>)
    where
        T: Serialize + Send + 'static,
        F: Future<Output = Result<T, SenderError>> + Send + 'static,
    {
        let id = Uuid::new_v4();
        let (tx, rx) = watch::channel(JobView {
            job_id: id,
            kind,
            state: JobState::Running,
            correlation_id: correlation_id.clone(),
            created_at: now_rfc3339(),
            finished_at: None,
            progress: None,
            result: None,
            error: None,
        });
        let job = Arc::new(Job {
            view: tx,
            stage_started: Mutex::new(None),
            published: Mutex::new(None),
        });
        self.insert(id, rx);
        let future = work(job.clone());
        let handle = tokio::spawn(async move {
            // A panic in the work fails the job rather than leaving it RUNNING for good.
            let outcome = match AssertUnwindSafe(future).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(panic) => {
                    let what = panic_message(panic.as_ref());
                    tracing::error!(job_id = %id, panic = %what, "a job panicked");
                    Err(SenderError::Internal(format!(
                        "the job failed unexpectedly: {what}"
                    )))
                }
            };
            job.finish(match &outcome {
                Ok(value) => serde_json::to_value(value).map_err(|e| {
                    ErrorBody::new(
                        deploy_protocol::ErrorCode::InternalError,
                        format!("cannot serialise the result: {e}"),
                        correlation_id.clone(),
                    )
                    .error
                }),
                Err(e) => {
                    Err(ErrorBody::new(e.code(), e.to_string(), correlation_id.clone()).error)
                }
            });
            outcome
        });
        (id, handle)
    }

    /// Jobs still running.
    pub fn running(&self) -> usize {
        self.lock()
            .jobs
            .values()
            .filter(|j| j.borrow().state == JobState::Running)
            .count()
    }

    /// Waits until no job runs or `deadline` passes; answers how many still run then.
    pub async fn settle(&self, deadline: tokio::time::Instant) -> usize {
        loop {
            let running = self.running();
            if running == 0 || tokio::time::Instant::now() >= deadline {
                return running;
            }
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)),
            )
            .await;
        }
    }

    fn insert(&self, id: Uuid, rx: watch::Receiver<JobView>) {
        let mut inner = self.lock();
        inner.jobs.insert(id, rx);
        inner.order.push_back(id);
        // Forget the oldest finished jobs beyond the history; running ones always stay.
        let mut finished = inner
            .order
            .iter()
            .filter(|id| {
                inner
                    .jobs
                    .get(id)
                    .is_some_and(|j| j.borrow().state != JobState::Running)
            })
            .count();
        let mut index = 0;
        while finished > self.history && index < inner.order.len() {
            let candidate = inner.order[index];
            let done = inner
                .jobs
                .get(&candidate)
                .is_none_or(|j| j.borrow().state != JobState::Running);
            if done {
                inner.jobs.remove(&candidate);
                inner.order.remove(index);
                finished -= 1;
            } else {
                index += 1;
            }
        }
    }
}

/// What a panic said, when it said it with a string.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(job: &Job, stage: Stage, done: u64, total: u64, finished: bool) {
        job.report(ProgressEvent {
            stage,
            done,
            total: Some(total),
            message: None,
            finished,
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_is_throttled_per_job_with_stage_changes_and_the_end_exact() {
        let jobs = Jobs::new(10);
        let (id, handle) = jobs.spawn(JobKind::Package, None, |job: Arc<Job>| async move {
            // The context arrives in one report, microseconds after the stage began.
            report(&job, Stage::Context, 50_000_000, 50_000_000, true);
            tokio::time::sleep(Duration::from_millis(20)).await;
            for i in 0..20_000u64 {
                report(&job, Stage::Export, i * 20_000, 400_000_000, false);
                if i % 1000 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            report(&job, Stage::Export, 400_000_000, 400_000_000, true);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, SenderError>(())
        });
        let mut rx = jobs.get(id).expect("job");
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let view = rx.borrow_and_update().clone();
                let ended = view.state != JobState::Running;
                seen.push(view);
                if ended || rx.changed().await.is_err() {
                    return seen;
                }
            }
        });
        handle.await.expect("task").expect("job");
        let seen = reader.await.expect("reader");
        let progress: Vec<&JobProgress> = seen.iter().filter_map(|v| v.progress.as_ref()).collect();
        assert!(
            seen.len() <= 12,
            "20,000 export reports in about 0.1 s make a handful of updates, not {}",
            seen.len()
        );
        let stages: Vec<&str> = progress.iter().map(|p| p.stage.as_str()).collect();
        assert_eq!(stages.first(), Some(&"context"), "{stages:?}");
        assert!(stages.contains(&"export"), "{stages:?}");
        assert!(
            progress
                .iter()
                .any(|p| p.stage == "export" && p.finished && p.done == 400_000_000),
            "the finished stage is exact: {progress:?}"
        );
        assert!(
            progress
                .iter()
                .all(|p| p.bytes_per_sec.is_finite() && p.bytes_per_sec < 1e11),
            "sane rates: {progress:?}"
        );
        assert_eq!(seen.last().map(|v| v.state), Some(JobState::Succeeded));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_ends_failed_not_running() {
        let jobs = Jobs::new(10);
        let (id, handle) = jobs.spawn(JobKind::Transfer, None, |_job: Arc<Job>| async move {
            tokio::task::yield_now().await;
            if std::hint::black_box(true) {
                panic!("a bug in the pipeline");
            }
            Ok::<_, SenderError>(())
        });
        let outcome = handle.await.expect("the task itself ends");
        assert!(
            matches!(&outcome, Err(SenderError::Internal(m)) if m.contains("a bug in the pipeline")),
            "{outcome:?}"
        );
        let view = jobs.get(id).expect("job").borrow().clone();
        assert_eq!(view.state, JobState::Failed);
        let error = view.error.expect("error");
        assert_eq!(error.code, deploy_protocol::ErrorCode::InternalError);
        assert!(error.message.contains("a bug in the pipeline"), "{error:?}");
        assert_eq!(jobs.running(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settle_waits_for_running_jobs_until_its_deadline() {
        let jobs = Jobs::new(10);
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let (_, short) = jobs.spawn(JobKind::Package, None, |_job: Arc<Job>| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, SenderError>(())
        });
        let (_, long) = jobs.spawn(JobKind::Package, None, |_job: Arc<Job>| async move {
            let _ = wait.await;
            Ok::<_, SenderError>(())
        });
        assert_eq!(jobs.running(), 2);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
        let left = jobs.settle(deadline).await;
        assert_eq!(left, 1, "the short job finished, the long one did not");
        assert!(tokio::time::Instant::now() >= deadline);
        short.await.expect("task").expect("short job");
        let _ = release.send(());
        long.await.expect("task").expect("long job");
        let soon = tokio::time::Instant::now() + Duration::from_secs(5);
        assert_eq!(jobs.settle(soon).await, 0);
        assert!(
            tokio::time::Instant::now() < soon,
            "no wait once nothing runs"
        );
    }
}
