//! Running a plan: each step's hosts deployed at once (at most `max_concurrent` at a time), each
//! with a deadline; a step must end with no failed canary and no more than `max_failures` failed
//! hosts in all before the next starts. Stopped, every host the rollout moved is rolled back at
//! once. The deployment to one host and its rollback are the caller's functions, so the engine
//! decides the order and the gates and nothing else.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use deploy_protocol::ErrorCode;
use futures::future::FutureExt as _;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::plan::{BatchSize, Phase, Plan};
use super::report::{FleetState, HostError, HostOutcome, HostReport, RolloutReport, RolloutStatus};

/// How to roll out.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    /// Canary hosts (default: one when there are three hosts or more).
    pub canary: Option<usize>,
    /// Hosts per batch after the canary.
    pub batch: BatchSize,
    /// Failed hosts tolerated before the rollout stops (a failed canary always stops it).
    pub max_failures: usize,
    /// Roll back the hosts the rollout moved when it stops.
    pub rollback: bool,
    /// Longest wait for one host's deployment (transfer, load, start, health check).
    pub host_timeout: Duration,
    /// Longest wait for one host's rollback.
    pub rollback_timeout: Duration,
    /// Hosts deployed to at the same time.
    pub max_concurrent: usize,
    /// Slots shared with other transfers (the service's MAX_CONCURRENT_TRANSFERS): each host's
    /// deployment holds one while it runs. `None`: only `max_concurrent` bounds the rollout.
    pub slots: Option<std::sync::Arc<tokio::sync::Semaphore>>,
    /// Send and load the release on the hosts after the first step while that step is deployed
    /// and health-checked, so that each later step only switches containers. Hosts a stopped
    /// rollout did not reach then hold the new image (never a container of it).
    pub preload: bool,
    /// With `preload`: no preload starts before this turns true (except a host's own, when its
    /// step comes first). `None`: they start with the first step. [`roll_out`](super::roll_out)
    /// sets its own, open once the first step's hosts have been sent their bytes, so that the
    /// preloads do not share the sender's uplink with the step the rollout waits for.
    pub preload_after: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Default for RolloutOptions {
    /// Default canary, batches of 25 %, no failure tolerated, rollback on, 10 min per host,
    /// 5 min per rollback, 5 hosts at a time, no preload.
    fn default() -> Self {
        Self {
            canary: None,
            batch: BatchSize::default(),
            max_failures: 0,
            rollback: true,
            host_timeout: Duration::from_secs(600),
            rollback_timeout: Duration::from_secs(300),
            max_concurrent: 5,
            slots: None,
            preload: false,
            preload_after: None,
        }
    }
}

/// The longest deadline a host's deployment may be given, seconds (a day).
pub const MAX_HOST_TIMEOUT_SECS: u64 = 86_400;

/// A host that now runs the new release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    /// The receiver's deployment id (what a rollback undoes).
    pub deployment_id: Uuid,
    /// The image it ran before, when known.
    pub version_before: Option<String>,
    /// The image it runs now.
    pub version_after: String,
    /// Package bytes sent.
    pub bytes: u64,
}

/// A host whose deployment failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotMoved {
    /// Why.
    pub error: HostError,
    /// The image it ran before (and, the receiver having rolled back, still runs), when known.
    pub version_before: Option<String>,
    /// Package bytes sent before it failed.
    pub bytes: u64,
    /// A deployment that missed the host's deadline but that its receiver finished anyway:
    /// `(deployment id, image)`. The host runs the new release; it counts as failed, and a
    /// stopped rollout rolls it back with the moved hosts.
    pub finished_late: Option<(Uuid, String)>,
    /// What the host runs is unknown: its deployment outlived the deadline and its receiver
    /// could not say how it ended. The fleet then counts as MIXED.
    pub unknown: bool,
}

/// What happens during a rollout; every event carries the report as it stands after it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RolloutEvent {
    /// The plan is made; nothing has moved yet.
    Started {
        /// The report (every host PENDING).
        report: RolloutReport,
    },
    /// A host changed state.
    Host {
        /// Its index in the report.
        index: usize,
        /// The report.
        report: RolloutReport,
    },
    /// A step ended and its gate passed.
    StepCompleted {
        /// Which step.
        phase: Phase,
        /// The report.
        report: RolloutReport,
    },
    /// The rollout stopped; the moved hosts are being rolled back.
    RollingBack {
        /// Why it stopped.
        reason: String,
        /// The report.
        report: RolloutReport,
    },
    /// The rollout is over.
    Finished {
        /// The final report.
        report: RolloutReport,
    },
}

impl RolloutEvent {
    /// The report as it stands after the event, borrowed.
    pub fn report(&self) -> &RolloutReport {
        match self {
            RolloutEvent::Started { report }
            | RolloutEvent::Host { report, .. }
            | RolloutEvent::StepCompleted { report, .. }
            | RolloutEvent::RollingBack { report, .. }
            | RolloutEvent::Finished { report } => report,
        }
    }

    /// The report as it stands after the event.
    pub fn into_report(self) -> RolloutReport {
        self.report().clone()
    }
}

/// The report under construction, shared by the host futures.
pub(super) struct Ledger<'a> {
    report: Mutex<RolloutReport>,
    started: Instant,
    on_event: &'a (dyn Fn(RolloutEvent) + Send + Sync),
}

impl<'a> Ledger<'a> {
    /// A ledger that goes on from `report`: its duration counts on from the report's.
    pub(super) fn resume(
        report: RolloutReport,
        on_event: &'a (dyn Fn(RolloutEvent) + Send + Sync),
    ) -> Self {
        let now = Instant::now();
        let started = now
            .checked_sub(Duration::from_millis(report.duration_ms))
            .unwrap_or(now);
        Self {
            report: Mutex::new(report),
            started,
            on_event,
        }
    }

    pub(super) fn snapshot(&self) -> RolloutReport {
        let mut report = self
            .report
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        report.duration_ms = millis(self.started.elapsed());
        report
    }

    pub(super) fn update<T>(&self, change: impl FnOnce(&mut RolloutReport) -> T) -> T {
        let mut report = self.report.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut report)
    }

    pub(super) fn host(&self, index: usize, change: impl FnOnce(&mut HostReport)) {
        self.update(|r| {
            if let Some(h) = r.hosts.get_mut(index) {
                change(h);
            }
        });
        (self.on_event)(RolloutEvent::Host {
            index,
            report: self.snapshot(),
        });
    }
}

/// Rolls a release out to `hosts` (receiver URLs, in order): `deploy(i, slot)` deploys it to
/// host `i` holding `slot` (see [`HostSlot`]),
/// `preload(i)` (with [`RolloutOptions::preload`]) sends and loads it there ahead of the host's
/// step and answers the bytes it sent, `rollback(i, deployment_id)` undoes that deployment there
/// and answers the image the host runs afterwards. `abort` stops the rollout between hosts (hosts
/// being deployed to finish first) and rolls back. Refuses only an impossible plan; everything
/// else is in the report.
pub async fn run<D, DF, P, PF, R, RF>(
    hosts: &[String],
    options: &RolloutOptions,
    deploy: D,
    preload: P,
    rollback: R,
    abort: CancellationToken,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> Result<RolloutReport, String>
where
    D: Fn(usize, HostSlot) -> DF,
    DF: Future<Output = Result<Moved, NotMoved>>,
    P: Fn(usize) -> PF,
    PF: Future<Output = Result<u64, NotMoved>>,
    R: Fn(usize, Uuid) -> RF,
    RF: Future<Output = Result<Option<String>, HostError>>,
{
    let plan = Plan::new(hosts.len(), options.canary, options.batch)?;
    let ledger = Ledger {
        report: Mutex::new(RolloutReport::planned(hosts, &plan)),
        started: Instant::now(),
        on_event,
    };
    on_event(RolloutEvent::Started {
        report: ledger.snapshot(),
    });

    // Preloads: every host after the first step, started once `preload_after` opens (as many at a
    // time as deployments) and awaited by the host's own deployment; each runs once, whichever
    // of the two polls it first, under a slot of its own taken before it touches the host (and
    // given back before the host's deployment takes one). `began` says which ever started.
    let (ledger, preload, abort_ref) = (&ledger, &preload, &abort);
    let ahead: Vec<usize> = if options.preload && plan.steps.len() > 1 {
        plan.steps[1..]
            .iter()
            .flat_map(|(_, members)| members.iter().copied())
            .collect()
    } else {
        Vec::new()
    };
    let began: Vec<std::sync::atomic::AtomicBool> = (0..hosts.len())
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let began = &began;
    let mut preloads = vec![None; hosts.len()];
    let slots = &options.slots;
    for &i in &ahead {
        let one = async move {
            let Some(_slot) = slot(slots, abort_ref).await else {
                return;
            };
            if let Some(flag) = began.get(i) {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let started = Instant::now();
            let result = tokio::time::timeout(options.host_timeout, preload(i)).await;
            let elapsed = Some(millis(started.elapsed()));
            ledger.host(i, |h| {
                h.preload_ms = elapsed;
                match result {
                    Ok(Ok(bytes)) => h.bytes += bytes,
                    Ok(Err(failed)) => {
                        h.bytes += failed.bytes;
                        h.preload_error = Some(failed.error);
                    }
                    Err(_) => {
                        h.preload_error = Some(HostError {
                            code: ErrorCode::Timeout,
                            message: format!(
                                "no answer to the preload within {} s",
                                options.host_timeout.as_secs()
                            ),
                        })
                    }
                }
            });
        };
        if let Some(slot) = preloads.get_mut(i) {
            *slot = Some(one.shared());
        }
    }
    // The first step's hosts take their share of `max_concurrent` first.
    let first = plan.steps.first().map_or(0, |(_, members)| members.len());
    let preload_concurrency = options.max_concurrent.saturating_sub(first).max(1);
    let driver = {
        let all: Vec<_> = preloads.iter().flatten().cloned().collect();
        let mut after = options.preload_after.clone();
        async move {
            if let Some(after) = after.as_mut() {
                // A gate dropped unopened leaves the preloads to the hosts' own steps.
                if after.wait_for(|open| *open).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            stream::iter(all)
                .for_each_concurrent(preload_concurrency, |one| one)
                .await;
            // Every preload ended; the steps alone decide from here.
            std::future::pending::<()>().await;
        }
    };
    let owned_preloads = preloads;
    let preloads = &owned_preloads;

    let steps = async {
        let mut stop: Option<(String, bool)> = None;
        for (phase, members) in &plan.steps {
            if abort_ref.is_cancelled() {
                stop = Some(("aborted on request".into(), true));
                break;
            }
            let concurrency = options.max_concurrent.max(1);
            let (deploy, abort, slots) = (&deploy, abort_ref, &options.slots);
            let mut done = stream::iter(members.iter().copied())
                .map(|i| async move {
                    // The host's own preload ends first (run by the driver, or here when its
                    // gate is still closed; under a slot of its own either way), then the host
                    // takes a slot. Neither wait is part of the host's deadline.
                    if let Some(Some(one)) = preloads.get(i) {
                        tokio::select! {
                            biased;
                            () = abort.cancelled() => {}
                            () = one.clone() => {}
                        }
                    }
                    let Some(held) = slot(slots, abort).await else {
                        return;
                    };
                    deploy_one(ledger, i, deploy, held, options.host_timeout, abort).await;
                })
                .buffer_unordered(concurrency);
            while done.next().await.is_some() {}
            drop(done);

            let (failed_here, failed_total) = ledger.update(|r| {
                let failed = |h: &&HostReport| h.outcome == HostOutcome::Failed;
                let here: Vec<String> = members
                    .iter()
                    .filter_map(|&i| r.hosts.get(i))
                    .filter(failed)
                    .map(|h| h.host.clone())
                    .collect();
                (here, r.hosts.iter().filter(failed).count())
            });
            if *phase == Phase::Canary && !failed_here.is_empty() {
                stop = Some((
                    format!(
                        "canary {} failed: no other host moved",
                        failed_here.join(", ")
                    ),
                    false,
                ));
                break;
            }
            if failed_total > options.max_failures {
                stop = Some((
                    format!(
                        "{failed_total} host(s) failed ({}), more than --max-failures {}",
                        failed_here.join(", "),
                        options.max_failures
                    ),
                    false,
                ));
                break;
            }
            if abort.is_cancelled() {
                stop = Some(("aborted on request".into(), true));
                break;
            }
            ledger.update(|r| r.steps_completed += 1);
            on_event(RolloutEvent::StepCompleted {
                phase: *phase,
                report: ledger.snapshot(),
            });
        }
        stop
    };
    // The steps decide; the driver never ends (it stops driving preloads on abort).
    let stop = tokio::select! {
        stop = steps => stop,
        () = async {
            tokio::select! {
                () = driver => {}
                () = abort.cancelled() => {}
            }
            std::future::pending::<()>().await
        } => unreachable!("the preload driver never ends"),
    };
    // Preloads still running (a stopped rollout) end here, before any rollback: their hosts may
    // hold part of the release (blobs the receiver sweeps after PARTIAL_TTL), never a container.
    // Those that never started touched nothing.
    let unfinished: Vec<usize> = owned_preloads
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            began
                .get(*i)
                .is_some_and(|b| b.load(std::sync::atomic::Ordering::Relaxed))
        })
        .filter(|(_, one)| one.as_ref().is_some_and(|one| one.peek().is_none()))
        .map(|(i, _)| i)
        .collect();
    drop(owned_preloads);
    for i in unfinished {
        ledger.host(i, |h| {
            h.preload_error = Some(HostError {
                code: ErrorCode::TransferFailed,
                message: "the rollout stopped before this host's preload ended: it may hold part of the release's blobs, never a container of it".into(),
            });
        });
    }

    let status = match stop {
        None => RolloutStatus::Completed,
        Some((reason, aborted)) => {
            ledger.update(|r| r.reason = Some(reason.clone()));
            let mut undone = true;
            if options.rollback {
                on_event(RolloutEvent::RollingBack {
                    reason,
                    report: ledger.snapshot(),
                });
                undone = roll_back_moved(ledger, &rollback, options.rollback_timeout).await;
            } else {
                ledger.update(|r| {
                    let kept = r.hosts.iter().any(HostReport::moved);
                    undone = !kept;
                    if kept {
                        r.reason = r.reason.take().map(|reason| {
                            format!("{reason}; moved hosts left on the new release (--no-rollback)")
                        });
                    }
                });
            }
            // A host whose state is unknown cannot be rolled back (no deployment to undo): the
            // fleet is not known to be back.
            ledger.update(|r| {
                let unknown: Vec<&str> = r
                    .hosts
                    .iter()
                    .filter(|h| h.unknown)
                    .map(|h| h.host.as_str())
                    .collect();
                if !unknown.is_empty() {
                    undone = false;
                    let said = format!(
                        "what {} run(s) is unknown (no answer from the receiver past the host's deadline)",
                        unknown.join(", ")
                    );
                    r.reason = Some(match r.reason.take() {
                        Some(reason) => format!("{reason}; {said}"),
                        None => said,
                    });
                }
            });
            match (undone, aborted) {
                (false, _) => RolloutStatus::Failed,
                (true, true) => RolloutStatus::Aborted,
                (true, false) => RolloutStatus::RolledBack,
            }
        }
    };
    ledger.update(|r| {
        for h in &mut r.hosts {
            if h.outcome == HostOutcome::Pending {
                h.outcome = HostOutcome::NotReached;
            }
        }
        r.status = status;
        r.fleet = FleetState::of(&r.hosts);
    });
    let report = ledger.snapshot();
    on_event(RolloutEvent::Finished {
        report: report.clone(),
    });
    Ok(report)
}

/// Waits for one of `slots` (none to wait for without them); `None` once `abort` is cancelled,
/// whichever comes first when both are ready (a closed semaphore is no slot to wait for).
async fn slot(
    slots: &Option<std::sync::Arc<tokio::sync::Semaphore>>,
    abort: &CancellationToken,
) -> Option<HostSlot> {
    let permit = match slots {
        Some(slots) => tokio::select! {
            biased;
            () = abort.cancelled() => return None,
            slot = std::sync::Arc::clone(slots).acquire_owned() => slot.ok(),
        },
        None => None,
    };
    (!abort.is_cancelled()).then(|| HostSlot(std::sync::Arc::new(Mutex::new(permit))))
}

/// The transfer slot ([`RolloutOptions::slots`]) a host's deployment or preload holds: given
/// back when it ends, or earlier with [`HostSlot::release`] by a deployment that goes on
/// without using the uplink (the look-up of a host past its deadline), so that the next host's
/// transfer need not wait for it.
#[derive(Debug, Clone, Default)]
pub struct HostSlot(std::sync::Arc<Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl HostSlot {
    /// Gives the slot back now.
    pub fn release(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
    }
}

/// Deploys to host `i` under its deadline and records the outcome; a host not yet started when
/// the rollout is aborted stays PENDING.
async fn deploy_one<D, DF>(
    ledger: &Ledger<'_>,
    i: usize,
    deploy: &D,
    slot: HostSlot,
    deadline: Duration,
    abort: &CancellationToken,
) where
    D: Fn(usize, HostSlot) -> DF,
    DF: Future<Output = Result<Moved, NotMoved>>,
{
    if abort.is_cancelled() {
        return;
    }
    ledger.host(i, |h| h.outcome = HostOutcome::InProgress);
    let started = Instant::now();
    // Held here until the deployment ends, unless it gives the slot back itself.
    let result = tokio::time::timeout(deadline, deploy(i, slot.clone())).await;
    drop(slot);
    let elapsed = Some(millis(started.elapsed()));
    ledger.host(i, |h| {
        h.deploy_ms = elapsed;
        match result {
            Ok(Ok(moved)) => {
                h.outcome = HostOutcome::Deployed;
                h.deployment_id = Some(moved.deployment_id);
                h.version_before = moved.version_before;
                h.version_after = Some(moved.version_after);
                h.bytes += moved.bytes;
            }
            Ok(Err(failed)) => {
                h.outcome = HostOutcome::Failed;
                h.version_after = failed.version_before.clone();
                h.version_before = failed.version_before;
                h.bytes += failed.bytes;
                h.error = Some(failed.error);
                if let Some((deployment_id, image)) = failed.finished_late {
                    h.deployment_id = Some(deployment_id);
                    h.version_after = Some(image);
                }
                if failed.unknown {
                    h.unknown = true;
                    h.version_after = None;
                }
            }
            Err(_) => {
                h.outcome = HostOutcome::Failed;
                h.unknown = true;
                h.error = Some(HostError {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "no answer within {} s: the receiver may have gone away; what the host runs is unknown",
                        deadline.as_secs()
                    ),
                });
            }
        }
    });
}

/// Rolls back every host on the new release at once (DEPLOYED, and FAILED ones whose deployment
/// finished after their deadline); true when all of them were.
pub(super) async fn roll_back_moved<R, RF>(
    ledger: &Ledger<'_>,
    rollback: &R,
    deadline: Duration,
) -> bool
where
    R: Fn(usize, Uuid) -> RF,
    RF: Future<Output = Result<Option<String>, HostError>>,
{
    let moved: Vec<(usize, Uuid)> = ledger.update(|r| {
        r.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.moved())
            .filter_map(|(i, h)| h.deployment_id.map(|id| (i, id)))
            .collect()
    });
    let results = futures::future::join_all(moved.into_iter().map(|(i, id)| async move {
        ledger.host(i, |h| h.outcome = HostOutcome::InProgress);
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, rollback(i, id)).await;
        let elapsed = Some(millis(started.elapsed()));
        let ok = matches!(result, Ok(Ok(_)));
        ledger.host(i, |h| {
            h.rollback_ms = elapsed;
            match result {
                Ok(Ok(now)) => {
                    h.outcome = HostOutcome::RolledBack;
                    h.version_after = now;
                }
                Ok(Err(e)) => {
                    h.outcome = HostOutcome::RollbackFailed;
                    h.rollback_error = Some(e);
                }
                Err(_) => {
                    h.outcome = HostOutcome::RollbackFailed;
                    h.rollback_error = Some(HostError {
                        code: ErrorCode::Timeout,
                        message: format!(
                            "no answer to the rollback within {} s: the host may still run the new release",
                            deadline.as_secs()
                        ),
                    });
                }
            }
        });
        ok
    }))
    .await;
    results.into_iter().all(|ok| ok)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
