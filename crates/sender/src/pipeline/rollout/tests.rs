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

pub(super) fn hosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://host{i}")).collect()
}

pub(super) fn id(i: usize) -> Uuid {
    Uuid::from_u128(i as u128 + 1)
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
        |i| {
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
        |i| {
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
        |i| {
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

#[tokio::test]
async fn without_preload_no_host_is_preloaded() {
    let fleet = Fleet::failing(&[]);
    let report = roll_out(&fleet, 4, half()).await;
    assert_eq!(report.fleet, FleetState::NewRelease);
    assert_eq!(fleet.preloaded(), Vec::<usize>::new());
    assert!(report.hosts.iter().all(|h| h.preload_ms.is_none()));
}

// Paused time: the 10 ms preloads end before the 20 ms canary, whatever the machine's load.
#[tokio::test(start_paused = true)]
async fn with_preload_later_hosts_load_while_the_canary_deploys_and_switch_in_their_step() {
    let fleet = Fleet::failing(&[]);
    let options = RolloutOptions {
        preload: true,
        ..half()
    };
    let report = roll_out(&fleet, 4, options).await;
    assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
    // Every host but the canary was preloaded, all before the canary's deployment ended (each
    // preload takes 10 ms, a deployment 20 ms); the steps kept their order.
    assert_eq!(fleet.preloaded(), [1, 2, 3]);
    assert_eq!(fleet.started(), [0, 1, 2, 3]);
    assert!(report.hosts[0].preload_ms.is_none());
    for h in &report.hosts[1..] {
        assert!(h.preload_ms.is_some(), "{h:?}");
        assert_eq!(h.bytes, 170, "preload and deployment bytes: {h:?}");
    }
    assert_eq!(report.hosts[0].bytes, 100);
}

// Paused time: the gate opens 5 ms into the canary's 25 ms deployment.
#[tokio::test(start_paused = true)]
async fn preloads_start_only_once_the_first_step_opens_their_gate() {
    let fleet = Fleet::failing(&[]);
    let (report, starts) = roll_out_gated(&fleet, Some(5)).await;
    assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
    assert_eq!(fleet.preloaded(), [1, 2, 3]);
    assert!(
        starts
            .iter()
            .all(|(_, t)| *t >= Duration::from_millis(5) && *t < Duration::from_millis(25)),
        "preloads start when the gate opens, while the canary still deploys: {starts:?}"
    );
}

/// A rollout of four hosts with preload behind a gate that `open_after_ms` opens (never with
/// `None`); answers the report and when each preload started.
async fn roll_out_gated(
    fleet: &Arc<Fleet>,
    open_after_ms: Option<u64>,
) -> (RolloutReport, Vec<(usize, Duration)>) {
    let (gate, opened) = tokio::sync::watch::channel(false);
    let options = RolloutOptions {
        preload: true,
        preload_after: Some(opened),
        ..half()
    };
    let began = tokio::time::Instant::now();
    let starts = Mutex::new(Vec::new());
    let (gate, starts_ref) = (&gate, &starts);
    let report = run(
        &hosts(4),
        &options,
        |i| async move {
            if let (0, Some(ms)) = (i, open_after_ms) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                gate.send_replace(true);
            }
            fleet.deploy(i).await
        },
        |i| async move {
            starts_ref.lock().expect("lock").push((i, began.elapsed()));
            fleet.preload(i).await
        },
        |i, d| async move { fleet.rollback(i, d).await },
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("a possible plan");
    let mut starts = starts.into_inner().expect("lock");
    starts.sort_unstable();
    (report, starts)
}

// Paused time: the canary's deployment takes 20 ms (or 25 with the gate), a preload 10 ms.
#[tokio::test(start_paused = true)]
async fn a_preload_whose_gate_is_still_closed_runs_in_its_hosts_own_step() {
    let fleet = Fleet::failing(&[]);
    let (report, starts) = roll_out_gated(&fleet, None).await;
    assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
    assert_eq!(fleet.started(), [0, 1, 2, 3]);
    // Step 2 (hosts 1, 2) begins after the canary's 20 ms; step 3 (host 3) after step 2's
    // preload and deployment, 30 ms more.
    let at = |host: usize| starts.iter().find(|(i, _)| *i == host).map(|(_, t)| *t);
    assert!(at(1) >= Some(Duration::from_millis(20)), "{starts:?}");
    assert!(at(2) >= Some(Duration::from_millis(20)), "{starts:?}");
    assert!(at(3) >= Some(Duration::from_millis(50)), "{starts:?}");
    assert!(report.hosts.iter().all(|h| h.preload_error.is_none()));
    assert!(report.hosts[1..].iter().all(|h| h.preload_ms.is_some()));
}

// Paused time. One shared slot: a preload run in its host's step holds the host's slot.
#[tokio::test(start_paused = true)]
async fn a_preload_run_in_its_hosts_step_holds_that_hosts_slot() {
    let fleet = Fleet::failing(&[]);
    let (_gate, opened) = tokio::sync::watch::channel(false);
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let options = RolloutOptions {
        preload: true,
        preload_after: Some(opened),
        slots: Some(Arc::clone(&slots)),
        ..half()
    };
    let fleet_ref = &fleet;
    let report = run(
        &hosts(4),
        &options,
        |i| async move { fleet_ref.deploy(i).await },
        |i| async move {
            // Counted with the deployments: at most one of either at a time.
            let now = fleet_ref.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            fleet_ref.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let result = fleet_ref.preload(i).await;
            fleet_ref.in_flight.fetch_sub(1, Ordering::SeqCst);
            result
        },
        |i, d| async move { fleet_ref.rollback(i, d).await },
        CancellationToken::new(),
        &|_| {},
    )
    .await
    .expect("a possible plan");
    assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
    assert_eq!(fleet.preloaded(), [1, 2, 3]);
    assert_eq!(
        fleet.most_in_flight.load(Ordering::SeqCst),
        1,
        "preloads and deployments took the one slot in turn"
    );
    assert_eq!(slots.available_permits(), 1, "the slot given back");
}

#[tokio::test(start_paused = true)]
async fn a_canary_that_fails_before_the_gate_opens_leaves_every_later_host_untouched() {
    let fleet = Fleet::failing(&[0]);
    let (report, starts) = roll_out_gated(&fleet, None).await;
    assert_eq!(
        report.status,
        RolloutStatus::RolledBack,
        "{}",
        report.table()
    );
    assert_eq!(report.fleet, FleetState::OldRelease);
    assert_eq!(starts, [], "no preload started");
    assert!(
        report.hosts.iter().all(|h| h.preload_error.is_none()),
        "a preload that never started is not reported as cut off: {}",
        report.table()
    );
    assert!(report.hosts[1..]
        .iter()
        .all(|h| h.outcome == HostOutcome::NotReached && h.preload_ms.is_none()));
}

// Paused time: the 10 ms preloads end before the 20 ms canary, whatever the machine's load.
#[tokio::test(start_paused = true)]
async fn with_preload_a_failed_canary_moves_no_other_host() {
    let fleet = Fleet::failing(&[0]);
    let options = RolloutOptions {
        preload: true,
        ..half()
    };
    let report = roll_out(&fleet, 4, options).await;
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [Failed, NotReached, NotReached, NotReached],
        "{}",
        report.table()
    );
    assert_eq!(fleet.started(), [0], "no deployment beyond the canary");
    assert_eq!(fleet.rolled_back(), Vec::<usize>::new());
    // The preloads had ended (10 ms) before the canary failed (20 ms): their hosts hold the
    // image, which the report says, and the reason does not claim they were untouched.
    assert_eq!(fleet.preloaded(), [1, 2, 3]);
    for h in &report.hosts[1..] {
        assert!(h.preload_ms.is_some(), "{h:?}");
        assert!(h.preload_error.is_none(), "{h:?}");
        assert_eq!(h.bytes, 70);
    }
    assert!(
        report
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no other host moved")),
        "{:?}",
        report.reason
    );
}

// Paused time: the canary (20 ms) fails long before the slow preloads (10 s) end.
#[tokio::test(start_paused = true)]
async fn a_stopped_rollout_ends_the_preloads_still_running_and_says_so() {
    let fleet = Fleet::failing(&[0]);
    let options = RolloutOptions {
        preload: true,
        ..half()
    };
    let started = tokio::time::Instant::now();
    let report = roll_out_preloading(&fleet, 4, options, |_| async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok(70)
    })
    .await;
    use HostOutcome::*;
    assert_eq!(
        outcomes(&report),
        [Failed, NotReached, NotReached, NotReached]
    );
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the rollout waited for the preloads: {waited:?} of (virtual) time"
    );
    for h in &report.hosts[1..] {
        assert!(h.preload_ms.is_none(), "{h:?}");
        assert_eq!(
            h.preload_error.as_ref().map(|e| e.code),
            Some(ErrorCode::TransferFailed),
            "{h:?}"
        );
    }
}

// Paused time: the 10 ms preloads end before the 20 ms canary, whatever the machine's load.
#[tokio::test(start_paused = true)]
async fn a_failed_preload_is_reported_and_the_host_still_deploys() {
    let fleet = Fleet::failing(&[]);
    let options = RolloutOptions {
        preload: true,
        ..half()
    };
    let report = roll_out_preloading(&fleet, 4, options, |i| async move {
        if i == 2 {
            return Err(NotMoved {
                error: HostError {
                    code: ErrorCode::RemoteUnreachable,
                    message: "connection refused".into(),
                },
                version_before: None,
                bytes: 5,
                finished_late: None,
            });
        }
        Ok(70)
    })
    .await;
    assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
    let failed = &report.hosts[2];
    assert_eq!(
        failed.preload_error.as_ref().map(|e| e.code),
        Some(ErrorCode::RemoteUnreachable)
    );
    assert_eq!(failed.bytes, 105);
    assert_eq!(failed.outcome, HostOutcome::Deployed);
}

/// Three hosts, one per step; host 1 misses its deadline but its receiver finishes the
/// deployment (`finished_late`), the others deploy.
async fn roll_out_with_a_late_host(options: RolloutOptions) -> (RolloutReport, BTreeSet<usize>) {
    let rolled_back = Mutex::new(BTreeSet::new());
    let deploy = |i: usize| async move {
        if i == 1 {
            return Err(NotMoved {
                error: HostError {
                    code: ErrorCode::Timeout,
                    message:
                        "no answer within 3 s; its receiver finished the deployment afterwards"
                            .into(),
                },
                version_before: Some("app:v1".into()),
                bytes: 0,
                finished_late: Some((id(1), "app:v2".into())),
            });
        }
        Ok(Moved {
            deployment_id: id(i),
            version_before: Some("app:v1".into()),
            version_after: "app:v2".into(),
            bytes: 100,
        })
    };
    let rollback = |i: usize, deployment: Uuid| {
        let rolled_back = &rolled_back;
        async move {
            assert_eq!(deployment, id(i));
            rolled_back.lock().expect("lock").insert(i);
            Ok(Some("app:v1".to_owned()))
        }
    };
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
