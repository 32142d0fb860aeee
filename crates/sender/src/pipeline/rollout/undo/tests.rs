//! Undoing an interrupted rollout, with plain async functions standing for the receivers (the
//! end-to-end test in `tests/rollout_restart.rs` runs it against real receivers and engines).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use deploy_protocol::ErrorCode;
use uuid::Uuid;

use super::super::plan::{BatchSize, Plan};
use super::super::tests::{hosts, id, recording_rollback};
use super::*;

/// Rolling back, with `deadline` for each host's settling and rollback.
fn both(deadline: Duration) -> UndoOptions {
    UndoOptions {
        rollback: true,
        settle_timeout: deadline,
        rollback_timeout: deadline,
    }
}

/// An interrupted rollout of seven hosts, as the sender left it: 0 moved, 1-4 IN_PROGRESS (their
/// receivers then tell: moved, failed, rolled back already, never started), 5 PENDING (its
/// deployment may have begun just before the stop), 6 moved and its rollback failed.
fn interrupted_report() -> RolloutReport {
    let plan = Plan::new(7, Some(1), BatchSize::Hosts(6)).expect("plan");
    let mut report = RolloutReport::planned(&hosts(7), &plan);
    report.hosts[0].outcome = HostOutcome::Deployed;
    report.hosts[0].deployment_id = Some(id(0));
    report.hosts[0].version_before = Some("app:v1".into());
    for h in &mut report.hosts[1..5] {
        h.outcome = HostOutcome::InProgress;
        h.version_before = Some("app:v1".into());
    }
    report.hosts[6].outcome = HostOutcome::RollbackFailed;
    report.hosts[6].deployment_id = Some(id(6));
    report.steps_completed = 1;
    report.duration_ms = 5_000;
    interrupted(report, "at start")
}

#[test]
fn an_interrupted_report_is_mixed_while_any_host_is_unknown_and_names_what_to_do() {
    let report = interrupted_report();
    assert_eq!(report.status, RolloutStatus::Interrupted);
    assert_eq!(report.fleet, FleetState::Mixed);
    assert_eq!(report.hosts[5].outcome, HostOutcome::NotReached);
    let reason = report.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("sender stopped"), "{reason}");
    assert!(reason.contains("DELETE"), "{reason}");

    // With nothing unknown it is judged by its hosts.
    let plan = Plan::new(2, Some(0), BatchSize::Hosts(1)).expect("plan");
    let mut report = RolloutReport::planned(&hosts(2), &plan);
    report.reason = Some("host 1 failed".into());
    let report = interrupted(report, "at start");
    assert_eq!(report.fleet, FleetState::OldRelease);
    assert!(report
        .reason
        .as_deref()
        .is_some_and(|r| r.starts_with("host 1 failed; then the sender stopped")));
}

#[tokio::test]
async fn undoing_an_interrupted_rollout_settles_each_unknown_host_then_rolls_back_the_moved() {
    let rolled_back = Mutex::new(BTreeSet::new());
    let settle = |i: usize| async move {
        match i {
            1 => Ok(Settled::Moved {
                deployment_id: id(1),
                version_after: "app:v2".into(),
            }),
            2 => Ok(Settled::Failed(HostError {
                code: ErrorCode::HealthCheckFailed,
                message: "unhealthy".into(),
            })),
            3 => Ok(Settled::RolledBack(Some("app:v1".into()))),
            4 => Ok(Settled::NotStarted),
            // Shown not reached, but its receiver has the rollout's deployment.
            5 => Ok(Settled::Moved {
                deployment_id: id(5),
                version_after: "app:v2".into(),
            }),
            _ => panic!("host {i}'s state was known"),
        }
    };
    let rollback = recording_rollback(&rolled_back);
    let events = Mutex::new(Vec::new());
    let on_event = |e: RolloutEvent| events.lock().expect("lock").push(e);
    // Host 4's settle failed in an earlier undo, itself interrupted: it is asked again.
    let mut report = interrupted_report();
    report.hosts[4].outcome = HostOutcome::RollbackFailed;
    let report = undo_interrupted(
        report,
        settle,
        rollback,
        both(Duration::from_secs(5)),
        &on_event,
    )
    .await;
    use HostOutcome::*;
    let outcomes: Vec<_> = report.hosts.iter().map(|h| h.outcome).collect();
    assert_eq!(
        outcomes,
        [RolledBack, RolledBack, Failed, RolledBack, NotReached, RolledBack, RolledBack]
    );
    assert_eq!(
        *rolled_back.lock().expect("lock"),
        BTreeSet::from([0, 1, 5, 6]),
        "the moved, the settled moved, and the one whose rollback had failed"
    );
    assert_eq!(
        report.hosts[6].rollback_error, None,
        "the retry's outcome only"
    );
    assert_eq!(report.status, RolloutStatus::Aborted);
    assert_eq!(report.fleet, FleetState::OldRelease);
    assert_eq!(report.hosts[2].version_after.as_deref(), Some("app:v1"));
    assert!(report.duration_ms >= 5_000, "the duration goes on");
    let events = events.lock().expect("lock");
    assert!(matches!(events.last(), Some(RolloutEvent::Finished { .. })));
}

#[tokio::test]
async fn a_host_that_cannot_be_settled_or_rolled_back_leaves_the_undo_failed() {
    let settle = |i: usize| async move {
        match i {
            1 => Err(HostError {
                code: ErrorCode::RemoteUnreachable,
                message: "gone".into(),
            }),
            // Its deployment never ends within the deadline.
            2 => std::future::pending().await,
            // Shown not reached, and its receiver cannot be asked: it stays not reached.
            5 => Err(HostError {
                code: ErrorCode::RemoteUnreachable,
                message: "gone".into(),
            }),
            _ => Ok(Settled::NotStarted),
        }
    };
    let rollback = |_: usize, _: Uuid| async move {
        Err::<Option<String>, _>(HostError {
            code: ErrorCode::Conflict,
            message: "replaced since".into(),
        })
    };
    let report = undo_interrupted(
        interrupted_report(),
        settle,
        rollback,
        both(Duration::from_millis(50)),
        &|_| {},
    )
    .await;
    use HostOutcome::*;
    let outcomes: Vec<_> = report.hosts.iter().map(|h| h.outcome).collect();
    assert_eq!(
        outcomes,
        [
            RollbackFailed,
            RollbackFailed,
            RollbackFailed,
            NotReached,
            NotReached,
            NotReached,
            RollbackFailed
        ]
    );
    assert_eq!(report.status, RolloutStatus::Failed);
    assert_eq!(report.fleet, FleetState::Mixed);
    assert_eq!(
        report.hosts[2].rollback_error.as_ref().map(|e| e.code),
        Some(ErrorCode::Timeout)
    );
}

#[tokio::test]
async fn a_host_shown_not_reached_stays_so_only_when_its_receiver_cannot_be_reached() {
    let plan = Plan::new(3, Some(0), BatchSize::Hosts(3)).expect("plan");
    let report = interrupted(RolloutReport::planned(&hosts(3), &plan), "at start");
    let settle = |i: usize| async move {
        match i {
            0 => Err(HostError {
                code: ErrorCode::RemoteUnreachable,
                message: "connection refused".into(),
            }),
            // Its deployment was found there, still running past the deadline.
            1 => std::future::pending().await,
            _ => Err(HostError {
                code: ErrorCode::Unauthorized,
                message: "bad signature".into(),
            }),
        }
    };
    let rollback = |_: usize, _: Uuid| async move { Ok(None) };
    let report = undo_interrupted(
        report,
        settle,
        rollback,
        both(Duration::from_millis(50)),
        &|_| {},
    )
    .await;
    use HostOutcome::*;
    let outcomes: Vec<_> = report.hosts.iter().map(|h| h.outcome).collect();
    assert_eq!(outcomes, [NotReached, RollbackFailed, RollbackFailed]);
    assert_eq!(report.status, RolloutStatus::Failed);
}

#[tokio::test]
async fn a_rollout_started_without_rollback_has_its_hosts_settled_and_none_rolled_back() {
    let settle = |i: usize| async move {
        match i {
            1 => Ok(Settled::Moved {
                deployment_id: id(1),
                version_after: "app:v2".into(),
            }),
            2 => Ok(Settled::Failed(HostError {
                code: ErrorCode::HealthCheckFailed,
                message: "unhealthy".into(),
            })),
            _ => Ok(Settled::NotStarted),
        }
    };
    let rollback = |i: usize, _: Uuid| async move {
        panic!("host {i} was rolled back by a rollout started with rollback: false")
    };
    let options = UndoOptions {
        rollback: false,
        ..both(Duration::from_secs(5))
    };
    let report = undo_interrupted(interrupted_report(), settle, rollback, options, &|_| {}).await;
    use HostOutcome::*;
    let outcomes: Vec<_> = report.hosts.iter().map(|h| h.outcome).collect();
    assert_eq!(
        outcomes,
        [
            Deployed,
            Deployed,
            Failed,
            NotReached,
            NotReached,
            NotReached,
            RollbackFailed
        ],
        "the moved stay, the one whose rollback had failed is not tried again"
    );
    assert_eq!(report.hosts[1].deployment_id, Some(id(1)));
    assert_eq!(report.hosts[1].version_after.as_deref(), Some("app:v2"));
    assert_eq!(report.status, RolloutStatus::Failed);
    assert_eq!(report.fleet, FleetState::Mixed);
    let reason = report.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("moved hosts left on the new release (started with rollback: false)"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_host_that_finished_late_keeps_an_undo_without_rollback_from_counting_as_undone() {
    let plan = Plan::new(2, Some(0), BatchSize::Hosts(2)).expect("plan");
    let mut report = RolloutReport::planned(&hosts(2), &plan);
    // Host 0 missed its deadline, and its receiver finished the deployment anyway.
    report.hosts[0].outcome = HostOutcome::Failed;
    report.hosts[0].deployment_id = Some(id(0));
    report.hosts[1].outcome = HostOutcome::InProgress;
    let report = interrupted(report, "at start");
    let settle = |_: usize| async move { Ok(Settled::NotStarted) };
    let rollback = |i: usize, _: Uuid| async move {
        panic!("host {i} was rolled back by a rollout started with rollback: false")
    };
    let options = UndoOptions {
        rollback: false,
        ..both(Duration::from_secs(5))
    };
    let report = undo_interrupted(report, settle, rollback, options, &|_| {}).await;
    assert!(report.hosts[0].moved());
    assert_eq!(report.status, RolloutStatus::Failed, "{report:#?}");
    assert_eq!(report.fleet, FleetState::Mixed);
}

#[tokio::test]
async fn a_host_given_up_with_its_end_unknown_is_asked_again_and_rolled_back_when_it_moved() {
    // Host 0 moved; host 1 was given up at its deadline, its receiver not answering then.
    let plan = Plan::new(2, Some(1), BatchSize::Hosts(1)).expect("plan");
    let given_up = || {
        let mut report = RolloutReport::planned(&hosts(2), &plan);
        report.hosts[0].outcome = HostOutcome::Deployed;
        report.hosts[0].deployment_id = Some(id(0));
        report.hosts[1].outcome = HostOutcome::Failed;
        report.hosts[1].unknown = true;
        interrupted(report, "at start")
    };
    assert_eq!(given_up().fleet, FleetState::Mixed);

    // Its receiver answers now: it had finished the deployment, so both are rolled back.
    let rolled_back = Mutex::new(BTreeSet::new());
    let rollback = recording_rollback(&rolled_back);
    let settle = |i: usize| async move {
        assert_eq!(i, 1, "only the unknown host is asked");
        Ok(Settled::Moved {
            deployment_id: id(1),
            version_after: "app:v2".into(),
        })
    };
    let report = undo_interrupted(
        given_up(),
        settle,
        rollback,
        both(Duration::from_secs(5)),
        &|_| {},
    )
    .await;
    assert_eq!(
        rolled_back.into_inner().expect("lock"),
        BTreeSet::from([0, 1])
    );
    assert!(!report.hosts[1].unknown);
    assert_eq!(report.status, RolloutStatus::Aborted);
    assert_eq!(report.fleet, FleetState::OldRelease);

    // Its receiver still cannot be asked: the undo is not whole.
    let settle = |_: usize| async {
        Err(HostError {
            code: ErrorCode::RemoteUnreachable,
            message: "connection refused".into(),
        })
    };
    let report = undo_interrupted(
        given_up(),
        settle,
        |_: usize, _: Uuid| async { Ok(Some("app:v1".to_owned())) },
        both(Duration::from_secs(5)),
        &|_| {},
    )
    .await;
    assert!(report.hosts[1].unknown);
    assert_eq!(report.status, RolloutStatus::Failed);
    assert_eq!(report.fleet, FleetState::Mixed);
}
