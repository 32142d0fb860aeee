//! Undoing a rollout that nothing drives any more (`deploy-sender serve` stopped while it ran):
//! each host it left IN_PROGRESS is looked up on its receiver (waiting out a deployment still
//! under way there), then every host on the new release is rolled back at once, as the hosts of
//! a stopped rollout are.

use std::future::Future;
use std::time::Duration;

use deploy_protocol::ErrorCode;
use uuid::Uuid;

use super::report::{FleetState, HostError, HostOutcome, HostReport, RolloutReport, RolloutStatus};
use super::run::{roll_back_moved, Ledger, RolloutEvent};

/// Where a host the rollout left IN_PROGRESS stands now, from its receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The rollout's deployment finished there: the host runs the new release.
    Moved {
        /// The receiver's deployment id (what a rollback undoes).
        deployment_id: Uuid,
        /// The image it runs.
        version_after: String,
    },
    /// The rollout's deployment failed there; the receiver kept (or restored) what ran before.
    Failed(HostError),
    /// The rollout's deployment there is rolled back already (it was being rolled back when the
    /// rollout stopped); the image it runs now, when known.
    RolledBack(Option<String>),
    /// No deployment of this rollout ever started there: its container was never touched.
    NotStarted,
}

/// How an interrupted rollout is undone: as it was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoOptions {
    /// Roll back the hosts it moved (the rollout's `rollback`). Without it the hosts are only
    /// looked up, and those on the new release stay there, as a stopped rollout's would.
    pub rollback: bool,
    /// Longest wait for one host's deployment to end on its receiver (the rollout's host
    /// timeout: the deployment may still run there).
    pub settle_timeout: Duration,
    /// Longest wait for one host's rollback.
    pub rollback_timeout: Duration,
}

/// Undoes the interrupted rollout `report`: `settle(i)` says where host `i`, left IN_PROGRESS or
/// NOT_REACHED, stands now (bounded by `options.settle_timeout`; no answer leaves an IN_PROGRESS
/// host ROLLBACK_FAILED, the new release possibly running, and a NOT_REACHED one as it was), then
/// with `options.rollback`, `rollback(i, deployment_id)` undoes every DEPLOYED host at once (and
/// those whose rollback had failed), as [`run`](super::run::run) does for a stopped rollout. Ends
/// ABORTED when no host is left on the new release (or unknown), FAILED otherwise.
pub async fn undo_interrupted<S, SF, R, RF>(
    report: RolloutReport,
    settle: S,
    rollback: R,
    options: UndoOptions,
    on_event: &(dyn Fn(RolloutEvent) + Send + Sync),
) -> RolloutReport
where
    S: Fn(usize) -> SF,
    SF: Future<Output = Result<Settled, HostError>>,
    R: Fn(usize, Uuid) -> RF,
    RF: Future<Output = Result<Option<String>, HostError>>,
{
    let ledger = Ledger::resume(report, on_event);
    // Hosts whose state the record cannot tell: IN_PROGRESS, and NOT_REACHED (the record is
    // written just after a host's deployment begins, so a stop in between shows it not reached).
    // A host whose rollback failed is tried again (a receiver answers a repeated rollback alike).
    // A host whose state was not settled (an undo itself interrupted) is asked again.
    let open: Vec<(usize, bool)> = ledger.update(|r| {
        r.status = RolloutStatus::Running;
        for h in &mut r.hosts {
            if options.rollback
                && h.outcome == HostOutcome::RollbackFailed
                && h.deployment_id.is_some()
            {
                h.outcome = HostOutcome::Deployed;
                h.rollback_error = None;
                h.rollback_ms = None;
            }
        }
        r.hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| match h.outcome {
                HostOutcome::InProgress | HostOutcome::NotReached | HostOutcome::Pending => true,
                // Given up at its deadline with its end unknown: its receiver may know now.
                HostOutcome::Failed => h.unknown,
                // Unsettled when it has no deployment id; one with it is left as it is when the
                // rollout rolls nothing back.
                HostOutcome::RollbackFailed => h.deployment_id.is_none(),
                _ => false,
            })
            .map(|(i, h)| (i, h.outcome == HostOutcome::NotReached))
            .collect()
    });
    let ledger = &ledger;
    let settle = &settle;
    futures::future::join_all(open.into_iter().map(|(i, not_reached)| async move {
        let result = tokio::time::timeout(options.settle_timeout, settle(i)).await;
        // A host the record shows not reached stays so when its receiver cannot be reached (a
        // deployment found there and still running past the deadline is another matter).
        if not_reached && matches!(&result, Ok(Err(e)) if e.code == ErrorCode::RemoteUnreachable) {
            return;
        }
        ledger.host(i, |h| match result {
            Ok(Ok(settled)) => {
                h.unknown = false;
                match settled {
                    Settled::Moved {
                        deployment_id,
                        version_after,
                    } => {
                        h.outcome = HostOutcome::Deployed;
                        h.deployment_id = Some(deployment_id);
                        h.version_after = Some(version_after);
                    }
                    Settled::Failed(error) => {
                        h.outcome = HostOutcome::Failed;
                        h.version_after.clone_from(&h.version_before);
                        h.error = Some(error);
                    }
                    Settled::RolledBack(now) => {
                        h.outcome = HostOutcome::RolledBack;
                        h.version_after = now;
                    }
                    Settled::NotStarted => h.outcome = HostOutcome::NotReached,
                }
            }
            Ok(Err(error)) => {
                h.outcome = HostOutcome::RollbackFailed;
                h.rollback_error = Some(error);
            }
            Err(_) => {
                h.outcome = HostOutcome::RollbackFailed;
                h.rollback_error = Some(HostError {
                    code: ErrorCode::Timeout,
                    message: format!(
                        "its deployment did not end within {} s: the host may run the new release",
                        options.settle_timeout.as_secs()
                    ),
                });
            }
        });
    }))
    .await;
    if options.rollback {
        roll_back_moved(ledger, &rollback, options.rollback_timeout).await;
    } else {
        ledger.update(|r| {
            if r.hosts.iter().any(HostReport::moved) {
                r.reason = Some(match r.reason.take() {
                    Some(reason) => format!(
                        "{reason}; moved hosts left on the new release (started with rollback: false)"
                    ),
                    None => "moved hosts left on the new release (started with rollback: false)"
                        .to_owned(),
                });
            }
        });
    }
    ledger.update(|r| {
        for h in &mut r.hosts {
            if h.outcome == HostOutcome::Pending {
                h.outcome = HostOutcome::NotReached;
            }
        }
        // A host that finished its deployment past its deadline (FAILED with a deployment id)
        // is on the new release too.
        let undone = !r
            .hosts
            .iter()
            .any(|h| h.moved() || h.outcome == HostOutcome::RollbackFailed || h.unknown);
        r.status = if undone {
            RolloutStatus::Aborted
        } else {
            RolloutStatus::Failed
        };
        r.fleet = FleetState::of(&r.hosts);
    });
    let report = ledger.snapshot();
    on_event(RolloutEvent::Finished {
        report: report.clone(),
    });
    report
}

/// What an interrupted rollout's report says: nothing drives it; hosts not reached never will
/// be; the fleet is MIXED while any host's state is unknown (IN_PROGRESS). For the service's
/// rollouts, found at the start `found` (a time).
pub fn interrupted(report: RolloutReport, found: &str) -> RolloutReport {
    interrupted_as(
        report,
        "the sender stopped",
        found,
        "DELETE looks them up and rolls back the hosts it moved (unless it was started with \
         rollback: false)",
    )
}

/// [`interrupted`] for a rollout of `deploy-sender deploy` whose command is gone, found so at
/// `found` (a time).
pub fn command_gone(report: RolloutReport, found: &str) -> RolloutReport {
    interrupted_as(
        report,
        "its deploy-sender command ended",
        found,
        "`deploy-sender rollouts undo` looks them up and rolls back the hosts it moved (unless it \
         ran with --no-rollback)",
    )
}

fn interrupted_as(
    mut report: RolloutReport,
    stopped_by: &str,
    found: &str,
    remedy: &str,
) -> RolloutReport {
    for h in &mut report.hosts {
        if h.outcome == HostOutcome::Pending {
            h.outcome = HostOutcome::NotReached;
        }
    }
    let unknown = report
        .hosts
        .iter()
        .any(|h| h.outcome == HostOutcome::InProgress);
    report.fleet = if unknown {
        FleetState::Mixed
    } else {
        FleetState::of(&report.hosts)
    };
    report.status = RolloutStatus::Interrupted;
    let stopped = match report.reason.take() {
        Some(reason) => format!("{reason}; then {stopped_by} while it ran"),
        None => format!("{stopped_by} while this rollout ran"),
    };
    report.reason = Some(format!(
        "{stopped} (found {found}): hosts IN_PROGRESS may run either release, hosts NOT_REACHED \
         were never touched; {remedy}"
    ));
    report
}

#[cfg(test)]
mod tests;
