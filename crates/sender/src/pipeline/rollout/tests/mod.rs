//! The engine's decisions, with plain async functions standing for the hosts (the end-to-end
//! tests in `tests/rollout.rs` run it against real receivers and engines).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_protocol::ErrorCode;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;

mod preload;

pub(super) fn hosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://host{i}")).collect()
}

pub(super) fn id(i: usize) -> Uuid {
    Uuid::from_u128(i as u128 + 1)
}

/// A rollback that checks it is asked to undo host `i`'s own deployment (`id(i)`), records `i`
/// in `into`, and answers that the host runs `app:v1` again.
pub(super) fn recording_rollback<'a>(
    into: &'a Mutex<BTreeSet<usize>>,
) -> impl Fn(usize, Uuid) -> futures::future::BoxFuture<'a, Result<Option<String>, HostError>> + 'a
{
    move |i, deployment| {
        Box::pin(async move {
            assert_eq!(deployment, id(i), "the host's own deployment");
            into.lock().expect("lock").insert(i);
            Ok(Some("app:v1".to_owned()))
        })
    }
}

/// Hosts where `bad` fail; records the order of deploy starts and rollbacks.
#[derive(Default)]
struct Fleet {
    bad: BTreeSet<usize>,
    broken_rollback: BTreeSet<usize>,
    started: Mutex<Vec<usize>>,
    preloaded: Mutex<Vec<usize>>,
    rolled_back: Mutex<BTreeSet<usize>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Fleet {
    fn failing(bad: &[usize]) -> Arc<Self> {
        Arc::new(Self {
            bad: bad.iter().copied().collect(),
            ..Self::default()
        })
    }

    async fn deploy(&self, i: usize) -> Result<Moved, NotMoved> {
        self.started.lock().expect("lock").push(i);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.bad.contains(&i) {
            return Err(NotMoved {
                error: HostError {
                    code: ErrorCode::HealthCheckFailed,
                    message: "unhealthy".into(),
                },
                version_before: Some("app:v1".into()),
                bytes: 10,
                finished_late: None,
                unknown: false,
            });
        }
        Ok(Moved {
            deployment_id: id(i),
            version_before: Some("app:v1".into()),
            version_after: "app:v2".into(),
            bytes: 100,
        })
    }

    /// A preload: recorded when it starts, 70 bytes, ends after 10 ms (before the canary's
    /// deployment does).
    async fn preload(&self, i: usize) -> Result<u64, NotMoved> {
        self.preloaded.lock().expect("lock").push(i);
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(70)
    }

    async fn rollback(&self, i: usize, deployment: Uuid) -> Result<Option<String>, HostError> {
        assert_eq!(
            deployment,
            id(i),
            "the rollback names the host's own deployment"
        );
        self.rolled_back.lock().expect("lock").insert(i);
        if self.broken_rollback.contains(&i) {
            return Err(HostError {
                code: ErrorCode::HealthCheckFailed,
                message: "old release unhealthy".into(),
            });
        }
        Ok(Some("app:v1".into()))
    }

    fn started(&self) -> Vec<usize> {
        self.started.lock().expect("lock").clone()
    }

    fn preloaded(&self) -> Vec<usize> {
        let mut hosts = self.preloaded.lock().expect("lock").clone();
        hosts.sort_unstable();
        hosts
    }

    fn rolled_back(&self) -> Vec<usize> {
        self.rolled_back
            .lock()
            .expect("lock")
            .iter()
            .copied()
            .collect()
    }
}

async fn roll_out(fleet: &Arc<Fleet>, n: usize, options: RolloutOptions) -> RolloutReport {
    roll_out_with(fleet, n, options, CancellationToken::new(), &|_| {}).await
}

async fn roll_out_with(
    fleet: &Arc<Fleet>,
    n: usize,
    options: RolloutOptions,
    abort: CancellationToken,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> RolloutReport {
    run(
        &hosts(n),
        &options,
        |i, _slot| {
            let fleet = Arc::clone(fleet);
            async move { fleet.deploy(i).await }
        },
        |i| {
            let fleet = Arc::clone(fleet);
            async move { fleet.preload(i).await }
        },
        |i, d| {
            let fleet = Arc::clone(fleet);
            async move { fleet.rollback(i, d).await }
        },
        abort,
        on_event,
    )
    .await
    .expect("a possible plan")
}

/// The fleet's deployments and rollbacks, with `preload` for the preloads.
async fn roll_out_preloading<PF>(
    fleet: &Arc<Fleet>,
    n: usize,
    options: RolloutOptions,
    preload: impl Fn(usize) -> PF,
) -> RolloutReport
where
    PF: std::future::Future<Output = Result<u64, NotMoved>>,
{
    run(
        &hosts(n),
        &options,
        |i, _slot| {
            let fleet = Arc::clone(fleet);
            async move { fleet.deploy(i).await }
        },
        preload,
        |i, d| {
            let fleet = Arc::clone(fleet);
            async move { fleet.rollback(i, d).await }
        },
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("a possible plan")
}

fn outcomes(report: &RolloutReport) -> Vec<HostOutcome> {
    report.hosts.iter().map(|h| h.outcome).collect()
}

fn half() -> RolloutOptions {
    RolloutOptions {
        batch: BatchSize::Percent(50),
        ..RolloutOptions::default()
    }
}

#[tokio::test]
async fn a_healthy_release_reaches_every_host_canary_first() {
    let fleet = Fleet::failing(&[]);
    let report = roll_out(&fleet, 4, half()).await;
    use HostOutcome::*;
    assert_eq!(outcomes(&report), [Deployed; 4]);
    assert_eq!(report.status, RolloutStatus::Completed);
    assert_eq!(report.fleet, FleetState::NewRelease);
    assert_eq!(report.fleet.exit_code(), 0);
    assert_eq!(report.steps_completed, 3);
    assert_eq!(fleet.started()[0], 0, "the canary goes first");
    assert!(fleet.rolled_back().is_empty());
    assert_eq!(report.hosts[2].version_after.as_deref(), Some("app:v2"));
    assert!(
        report.table().contains("http://host3"),
        "{}",
        report.table()
    );
}

#[tokio::test]
async fn a_failed_canary_stops_the_rollout_before_any_other_host() {
    let fleet = Fleet::failing(&[0]);
    let report = roll_out(&fleet, 4, half()).await;
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [Failed, NotReached, NotReached, NotReached]
    );
    assert_eq!(fleet.started(), [0]);
    assert!(fleet.rolled_back().is_empty(), "the canary was not moved");
    assert_eq!(report.status, RolloutStatus::RolledBack);
    assert_eq!(report.fleet, FleetState::OldRelease);
    assert_eq!(report.fleet.exit_code(), 3);
    assert!(report.reason.as_deref().unwrap_or("").contains("canary"));
    let failed = &report.hosts[0];
    assert_eq!(
        failed.error.as_ref().map(|e| e.code),
        Some(ErrorCode::HealthCheckFailed)
    );
}

#[tokio::test]
async fn a_failure_in_a_batch_rolls_back_the_moved_hosts_and_leaves_the_rest_alone() {
    let fleet = Fleet::failing(&[2]);
    let report = roll_out(&fleet, 4, half()).await;
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [RolledBack, RolledBack, Failed, NotReached]
    );
    assert_eq!(fleet.rolled_back(), [0, 1]);
    assert!(!fleet.started().contains(&3));
    assert_eq!(report.status, RolloutStatus::RolledBack);
    assert_eq!(report.fleet, FleetState::OldRelease);
    assert_eq!(report.hosts[0].version_after.as_deref(), Some("app:v1"));
    assert!(report.hosts[0].rollback_ms.is_some());
}

#[tokio::test]
async fn failures_up_to_max_failures_are_tolerated() {
    let fleet = Fleet::failing(&[2]);
    let options = RolloutOptions {
        max_failures: 1,
        ..half()
    };
    let report = roll_out(&fleet, 4, options).await;
    use HostOutcome::*;
    assert_eq!(outcomes(&report), [Deployed, Deployed, Failed, Deployed]);
    assert_eq!(report.status, RolloutStatus::Completed);
    assert_eq!(report.fleet, FleetState::Mixed);
    assert_eq!(report.fleet.exit_code(), 4);
}

#[tokio::test]
async fn no_rollback_leaves_the_moved_hosts_on_the_new_release() {
    let fleet = Fleet::failing(&[2]);
    let options = RolloutOptions {
        rollback: false,
        ..half()
    };
    let report = roll_out(&fleet, 4, options).await;
    use HostOutcome::*;
    assert_eq!(outcomes(&report), [Deployed, Deployed, Failed, NotReached]);
    assert!(fleet.rolled_back().is_empty());
    assert_eq!(report.status, RolloutStatus::Failed);
    assert_eq!(report.fleet, FleetState::Mixed);
}

#[tokio::test]
async fn a_rollback_that_fails_leaves_a_mixed_fleet() {
    let fleet = Arc::new(Fleet {
        bad: [2].into(),
        broken_rollback: [1].into(),
        ..Fleet::default()
    });
    let report = roll_out(&fleet, 4, half()).await;
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [RolledBack, RollbackFailed, Failed, NotReached]
    );
    assert_eq!(report.status, RolloutStatus::Failed);
    assert_eq!(report.fleet, FleetState::Mixed);
    assert!(report.table().contains("old release unhealthy"));
}

#[tokio::test]
async fn a_host_that_never_answers_fails_at_its_deadline() {
    let fleet = Fleet::failing(&[]);
    let options = RolloutOptions {
        host_timeout: Duration::from_millis(200),
        ..half()
    };
    let report = run(
        &hosts(4),
        &options,
        |i, _slot| {
            let fleet = Arc::clone(&fleet);
            async move {
                if i == 1 {
                    std::future::pending::<()>().await;
                }
                fleet.deploy(i).await
            }
        },
        |i| {
            let fleet = Arc::clone(&fleet);
            async move { fleet.preload(i).await }
        },
        |i, d| {
            let fleet = Arc::clone(&fleet);
            async move { fleet.rollback(i, d).await }
        },
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("plan");
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [RolledBack, Failed, RolledBack, NotReached]
    );
    assert_eq!(
        report.hosts[1].error.as_ref().map(|e| e.code),
        Some(ErrorCode::Timeout)
    );
}

#[tokio::test]
async fn an_abort_stops_between_hosts_and_rolls_back() {
    let fleet = Fleet::failing(&[]);
    let abort = CancellationToken::new();
    let trigger = abort.clone();
    let events = Mutex::new(Vec::new());
    let on_event = move |e: RolloutEvent| {
        if let RolloutEvent::StepCompleted {
            phase: Phase::Canary,
            ..
        } = e
        {
            trigger.cancel();
        }
        events.lock().expect("lock").push(format!("{e:?}").len());
    };
    let report = roll_out_with(&fleet, 4, half(), abort, &on_event).await;
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [RolledBack, NotReached, NotReached, NotReached]
    );
    assert_eq!(report.status, RolloutStatus::Aborted);
    assert_eq!(report.fleet, FleetState::OldRelease);
}

#[tokio::test]
async fn hosts_of_a_batch_deploy_at_once_up_to_the_limit() {
    let fleet = Fleet::failing(&[]);
    let options = RolloutOptions {
        canary: Some(0),
        batch: BatchSize::Hosts(6),
        max_concurrent: 2,
        ..RolloutOptions::default()
    };
    let report = roll_out(&fleet, 6, options).await;
    assert_eq!(report.fleet, FleetState::NewRelease);
    assert_eq!(fleet.most_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn slots_shared_with_other_transfers_bound_the_hosts_in_flight() {
    let fleet = Fleet::failing(&[]);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(3));
    // Another transfer of the service holds two of the three slots for a while.
    let held = std::sync::Arc::clone(&slots)
        .acquire_many_owned(2)
        .await
        .expect("slots");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
    });
    let options = RolloutOptions {
        canary: Some(0),
        batch: BatchSize::Hosts(6),
        max_concurrent: 6,
        slots: Some(std::sync::Arc::clone(&slots)),
        ..RolloutOptions::default()
    };
    let report = roll_out(&fleet, 6, options).await;
    release.await.expect("release");
    assert_eq!(report.fleet, FleetState::NewRelease);
    assert!(
        fleet.most_in_flight.load(Ordering::SeqCst) <= 3,
        "at most the three shared slots: {}",
        fleet.most_in_flight.load(Ordering::SeqCst)
    );
    assert_eq!(slots.available_permits(), 3, "every slot given back");
}

#[tokio::test]
async fn events_tell_start_steps_and_end() {
    let fleet = Fleet::failing(&[]);
    let seen = Mutex::new(Vec::new());
    let on_event = |e: RolloutEvent| {
        let name = match e {
            RolloutEvent::Started { .. } => "started",
            RolloutEvent::Host { .. } => return,
            RolloutEvent::StepCompleted { .. } => "step",
            RolloutEvent::RollingBack { .. } => "rolling_back",
            RolloutEvent::Finished { .. } => "finished",
        };
        seen.lock().expect("lock").push(name);
    };
    roll_out_with(&fleet, 3, half(), CancellationToken::new(), &on_event).await;
    assert_eq!(
        *seen.lock().expect("lock"),
        ["started", "step", "step", "finished"]
    );
}

/// Three hosts, one per step; host 1 misses its deadline but its receiver finishes the
/// deployment (`finished_late`), the others deploy.
async fn roll_out_with_a_late_host(options: RolloutOptions) -> (RolloutReport, BTreeSet<usize>) {
    roll_out_with_a_host_past_its_deadline(options, false).await
}

/// As [`roll_out_with_a_late_host`]; with `unknown`, host 1's receiver could not be asked how
/// its deployment ended.
async fn roll_out_with_a_host_past_its_deadline(
    options: RolloutOptions,
    unknown: bool,
) -> (RolloutReport, BTreeSet<usize>) {
    let rolled_back = Mutex::new(BTreeSet::new());
    let deploy = |i: usize, _slot: HostSlot| async move {
        if i == 1 {
            return Err(NotMoved {
                error: HostError {
                    code: ErrorCode::Timeout,
                    message: if unknown {
                        "no answer within 3 s: what the host runs is unknown".into()
                    } else {
                        "no answer within 3 s; its receiver finished the deployment afterwards"
                            .into()
                    },
                },
                version_before: Some("app:v1".into()),
                bytes: 0,
                finished_late: (!unknown).then(|| (id(1), "app:v2".into())),
                unknown,
            });
        }
        Ok(Moved {
            deployment_id: id(i),
            version_before: Some("app:v1".into()),
            version_after: "app:v2".into(),
            bytes: 100,
        })
    };
    let rollback = recording_rollback(&rolled_back);
    let report = run(
        &hosts(3),
        &RolloutOptions {
            canary: Some(0),
            batch: BatchSize::Hosts(1),
            ..options
        },
        deploy,
        |_| async { Ok(0) },
        rollback,
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("a possible plan");
    let rolled_back = rolled_back.into_inner().expect("lock");
    (report, rolled_back)
}

#[tokio::test]
async fn a_host_that_finished_after_its_deadline_counts_as_failed_and_moved() {
    use HostOutcome::*;
    // Stopped: it is rolled back with the moved host.
    let (report, rolled_back) = roll_out_with_a_late_host(RolloutOptions::default()).await;
    assert_eq!(outcomes(&report), [RolledBack, RolledBack, NotReached]);
    assert_eq!(rolled_back, BTreeSet::from([0, 1]));
    assert_eq!(report.status, RolloutStatus::RolledBack);
    assert_eq!(report.fleet, FleetState::OldRelease);

    // --no-rollback: it is left on the new release, and said so.
    let (report, rolled_back) = roll_out_with_a_late_host(RolloutOptions {
        rollback: false,
        ..RolloutOptions::default()
    })
    .await;
    assert!(rolled_back.is_empty());
    assert_eq!(outcomes(&report), [Deployed, Failed, NotReached]);
    assert_eq!(report.hosts[1].deployment_id, Some(id(1)));
    assert_eq!(report.hosts[1].version_after.as_deref(), Some("app:v2"));
    assert_eq!(report.status, RolloutStatus::Failed);
    assert_eq!(report.fleet, FleetState::Mixed);
    assert!(report
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("--no-rollback")));

    // Tolerated: every host runs the new release.
    let (report, rolled_back) = roll_out_with_a_late_host(RolloutOptions {
        max_failures: 1,
        ..RolloutOptions::default()
    })
    .await;
    assert!(rolled_back.is_empty());
    assert_eq!(outcomes(&report), [Deployed, Failed, Deployed]);
    assert_eq!(report.status, RolloutStatus::Completed);
    assert_eq!(report.fleet, FleetState::NewRelease);
}

#[tokio::test]
async fn a_host_whose_end_is_unknown_leaves_the_fleet_mixed_and_the_rollout_not_undone() {
    use HostOutcome::*;
    for rollback in [true, false] {
        let (report, rolled_back) = roll_out_with_a_host_past_its_deadline(
            RolloutOptions {
                rollback,
                ..RolloutOptions::default()
            },
            true,
        )
        .await;
        // The moved canary is rolled back (or kept); the unknown host cannot be, and is not
        // shown as running what it ran before.
        let expected = if rollback {
            [RolledBack, Failed, NotReached]
        } else {
            [Deployed, Failed, NotReached]
        };
        assert_eq!(outcomes(&report), expected);
        assert_eq!(
            rolled_back,
            if rollback {
                BTreeSet::from([0])
            } else {
                BTreeSet::new()
            }
        );
        let host = &report.hosts[1];
        assert!(host.unknown, "{host:?}");
        assert_eq!(host.version_after, None, "{host:?}");
        assert_eq!(host.deployment_id, None);
        assert_eq!(report.status, RolloutStatus::Failed, "rollback {rollback}");
        assert_eq!(report.fleet, FleetState::Mixed, "rollback {rollback}");
        let reason = report.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("what http://host1 run(s) is unknown"),
            "{reason}"
        );
        assert_eq!(
            reason.contains("--no-rollback"),
            !rollback,
            "only a moved host is said left on the new release: {reason}"
        );
    }
}

#[tokio::test]
async fn a_deployment_that_gives_its_slot_back_lets_the_next_host_transfer_meanwhile() {
    // One transfer slot for the whole service, two hosts in one step: host 0 gives its slot back
    // (as a deployment past its deadline does before it looks the host up) and then waits for
    // host 1 to start, which it can only do with that slot.
    let second_started = tokio::sync::Notify::new();
    let second_started = &second_started;
    let options = RolloutOptions {
        canary: Some(0),
        batch: BatchSize::Hosts(2),
        max_concurrent: 2,
        slots: Some(Arc::new(tokio::sync::Semaphore::new(1))),
        ..RolloutOptions::default()
    };
    let moved = |i: usize| Moved {
        deployment_id: id(i),
        version_before: Some("app:v1".into()),
        version_after: "app:v2".into(),
        bytes: 100,
    };
    let report = run(
        &hosts(2),
        &options,
        |i, slot: HostSlot| async move {
            if i == 1 {
                second_started.notify_one();
                return Ok(moved(i));
            }
            slot.release();
            tokio::time::timeout(Duration::from_secs(5), second_started.notified())
                .await
                .map(|()| moved(i))
                .map_err(|_| NotMoved {
                    error: HostError {
                        code: ErrorCode::Timeout,
                        message: "host 1 never started while host 0 waited".into(),
                    },
                    version_before: None,
                    bytes: 0,
                    finished_late: None,
                    unknown: false,
                })
        },
        |_| async { Ok(0) },
        |_, _| async { Ok(Some("app:v1".to_owned())) },
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("a possible plan");
    assert_eq!(
        outcomes(&report),
        [HostOutcome::Deployed, HostOutcome::Deployed],
        "{:?}",
        report.hosts[0].error
    );
}
