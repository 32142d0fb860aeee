//! Preloads: the hosts after the first step receive and load the release ahead of their step,
//! once the first step's gate opens.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploy_protocol::ErrorCode;
use tokio_util::sync::CancellationToken;

use super::super::*;
use super::{half, hosts, outcomes, roll_out, roll_out_preloading, Fleet};

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

/// When a gated rollout's gate opens.
#[derive(Clone, Copy)]
enum Gate {
    /// Never (the first step's hosts are still sending).
    Never,
    /// This many ms into the canary's deployment (its bytes sent).
    After(u64),
    /// When the canary's deployment ends, as `roll_out` opens it for a host that failed.
    AtCanaryEnd,
}

/// What a gated rollout did.
struct Gated {
    report: RolloutReport,
    /// When each preload started, by host.
    starts: Vec<(usize, Duration)>,
    /// Most preloads and deployments at once.
    most_in_flight: usize,
}

/// A rollout of `n` hosts (canary 1, batches of 50 %) with preload behind `gate`, sharing
/// `slots` (if any) and aborted after `abort_after_ms` (if any).
async fn roll_out_gated(
    fleet: &Arc<Fleet>,
    n: usize,
    gate: Gate,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    abort_after_ms: Option<u64>,
) -> Gated {
    let (opener, opened) = tokio::sync::watch::channel(false);
    let options = RolloutOptions {
        preload: true,
        preload_after: Some(opened),
        slots,
        ..half()
    };
    let abort = CancellationToken::new();
    if let Some(ms) = abort_after_ms {
        let abort = abort.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            abort.cancel();
        });
    }
    let began = tokio::time::Instant::now();
    let starts = Mutex::new(Vec::new());
    let (opener, starts_ref) = (&opener, &starts);
    // Preloads and deployments, counted together.
    let counted = |work| async move {
        let now = fleet.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        fleet.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let result = work.await;
        fleet.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    };
    let report = run(
        &hosts(n),
        &options,
        |i, _slot| async move {
            if i != 0 {
                return fleet.deploy(i).await;
            }
            let result = match gate {
                Gate::After(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    opener.send_replace(true);
                    fleet.deploy(i).await
                }
                Gate::Never | Gate::AtCanaryEnd => fleet.deploy(i).await,
            };
            if let Gate::AtCanaryEnd = gate {
                opener.send_replace(true);
            }
            result
        },
        |i| {
            counted(async move {
                starts_ref.lock().expect("lock").push((i, began.elapsed()));
                fleet.preload(i).await
            })
        },
        |i, d| async move { fleet.rollback(i, d).await },
        abort,
        &|_| {},
    )
    .await
    .expect("a possible plan");
    let mut starts = starts.into_inner().expect("lock");
    starts.sort_unstable();
    Gated {
        report,
        starts,
        most_in_flight: fleet.most_in_flight.load(Ordering::SeqCst),
    }
}

// Paused time: the gate opens 5 ms into the canary's 25 ms deployment.
#[tokio::test(start_paused = true)]
async fn preloads_start_only_once_the_first_step_opens_their_gate() {
    let fleet = Fleet::failing(&[]);
    let Gated { report, starts, .. } = roll_out_gated(&fleet, 4, Gate::After(5), None, None).await;
    assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
    assert_eq!(fleet.preloaded(), [1, 2, 3]);
    assert!(
        starts
            .iter()
            .all(|(_, t)| *t >= Duration::from_millis(5) && *t < Duration::from_millis(25)),
        "preloads start when the gate opens, while the canary still deploys: {starts:?}"
    );
}

// Paused time: the canary's deployment takes 20 ms, a preload 10 ms.
#[tokio::test(start_paused = true)]
async fn a_preload_whose_gate_is_still_closed_runs_in_its_hosts_own_step() {
    let fleet = Fleet::failing(&[]);
    let Gated { report, starts, .. } = roll_out_gated(&fleet, 4, Gate::Never, None, None).await;
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

// Paused time. The shared slots bound preloads and deployments together, whether a preload
// runs in its host's step (gate closed, one slot) or ahead of it (gate open, two slots for
// more later hosts than preloads run at once).
#[tokio::test(start_paused = true)]
async fn preloads_and_deployments_take_the_shared_slots_in_turn() {
    for (n, gate, permits) in [(4, Gate::Never, 1), (8, Gate::After(0), 2)] {
        let fleet = Fleet::failing(&[]);
        let slots = Arc::new(tokio::sync::Semaphore::new(permits));
        let Gated {
            report,
            most_in_flight,
            ..
        } = roll_out_gated(&fleet, n, gate, Some(slots), None).await;
        assert_eq!(report.fleet, FleetState::NewRelease, "{}", report.table());
        assert_eq!(fleet.preloaded(), (1..n).collect::<Vec<_>>());
        assert_eq!(
            most_in_flight, permits,
            "{n} hosts, {permits} slot(s): preloads and deployments take them in turn"
        );
    }
}

// Paused time: another transfer holds the only slot; the rollout is aborted while the preloads
// (their gate open) wait for it.
#[tokio::test(start_paused = true)]
async fn preloads_still_waiting_for_a_slot_when_the_rollout_is_aborted_touch_nothing() {
    let fleet = Fleet::failing(&[]);
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let held = Arc::clone(&slots).acquire_owned().await.expect("slot");
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
    });
    let Gated { report, starts, .. } =
        roll_out_gated(&fleet, 4, Gate::After(0), Some(slots), Some(10)).await;
    release.await.expect("release");
    assert_eq!(report.status, RolloutStatus::Aborted, "{}", report.table());
    assert_eq!(starts, [], "no preload started");
    assert!(
        report.hosts.iter().all(|h| h.preload_error.is_none()),
        "{}",
        report.table()
    );
}

#[tokio::test(start_paused = true)]
async fn a_canary_that_fails_before_it_has_its_bytes_leaves_every_later_host_untouched() {
    let fleet = Fleet::failing(&[0]);
    // The failed canary's end opens the gate, as roll_out does: the rollout stops first.
    let Gated { report, starts, .. } =
        roll_out_gated(&fleet, 4, Gate::AtCanaryEnd, None, None).await;
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
                unknown: false,
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
