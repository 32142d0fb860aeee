//! What a rollout did to each host, and where that leaves the fleet.

use deploy_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::plan::{Phase, Plan};

/// What became of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HostOutcome {
    /// Not reached yet (only while the rollout runs).
    Pending,
    /// Being deployed to, or being rolled back.
    InProgress,
    /// Runs the new release, healthy.
    Deployed,
    /// The deployment failed here; the receiver kept (or restored) what ran before, or could not
    /// be asked (unreachable, timed out: see the error). With a `deployment_id`, it missed its
    /// deadline but its receiver finished it: the host runs the new release (`version_after`),
    /// and a stopped rollout rolls it back with the moved hosts.
    Failed,
    /// Moved to the new release, then rolled back by the rollout: runs what it ran before.
    RolledBack,
    /// Moved to the new release; rolling it back failed, so it may still run the new one.
    RollbackFailed,
    /// Never touched: the rollout stopped before reaching it.
    NotReached,
}

/// An error as the table shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostError {
    /// The stable code (the receiver's when it answered with one).
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

/// One host's line of the final table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostReport {
    /// The receiver's base URL.
    pub host: String,
    /// Canary or which batch.
    pub phase: Phase,
    /// Where it stands.
    pub outcome: HostOutcome,
    /// The image the container ran before the rollout, when known (none: there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_before: Option<String>,
    /// The image it runs after the rollout, as far as the rollout knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_after: Option<String>,
    /// The receiver's id of the deployment the rollout made there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<Uuid>,
    /// Why the deployment failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<HostError>,
    /// Why rolling it back failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_error: Option<HostError>,
    /// Package bytes sent to it.
    pub bytes: u64,
    /// The deployment, from the first byte sent to the receiver's answer (after the preload,
    /// when there was one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy_ms: Option<u64>,
    /// With preload: sending and loading the release there ahead of its step, from the first
    /// request to the receiver's answer (its bytes are in `bytes`); set once it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload_ms: Option<u64>,
    /// With preload: why it failed (the host's own deployment then sends what it lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload_error: Option<HostError>,
    /// The rollback, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_ms: Option<u64>,
    /// What the host runs is unknown: its deployment outlived its deadline and its receiver
    /// could not be asked how it ended (it may run the new release; nothing can roll it back
    /// without its deployment id). The fleet is then MIXED.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
}

impl HostReport {
    /// Whether the rollout moved it to the new release and it is still there: DEPLOYED, or
    /// FAILED past its deadline with a deployment its receiver finished anyway.
    pub fn moved(&self) -> bool {
        self.outcome == HostOutcome::Deployed
            || (self.outcome == HostOutcome::Failed && self.deployment_id.is_some())
    }
}

/// Where the fleet ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FleetState {
    /// Every host runs the new release.
    NewRelease,
    /// No host runs the new release: the rollout failed and was undone (or never moved a host).
    OldRelease,
    /// Some hosts run the new release and some do not (tolerated failures, `--no-rollback`, or a
    /// rollback that itself failed), or what a host runs is unknown.
    Mixed,
}

impl FleetState {
    /// The process exit code of `deploy-sender deploy` for this state: 0 new release, 3 old
    /// release, 4 mixed (1 stays for errors before any host was touched, 2 for usage errors).
    pub fn exit_code(self) -> u8 {
        match self {
            FleetState::NewRelease => 0,
            FleetState::OldRelease => 3,
            FleetState::Mixed => 4,
        }
    }

    /// Judges a finished rollout by its hosts.
    pub fn of(hosts: &[HostReport]) -> Self {
        let new = hosts
            .iter()
            .filter(|h| h.moved() || h.outcome == HostOutcome::RollbackFailed)
            .count();
        if hosts.iter().any(|h| h.unknown) {
            return FleetState::Mixed;
        }
        match new {
            0 => FleetState::OldRelease,
            n if n == hosts.len() => FleetState::NewRelease,
            _ => FleetState::Mixed,
        }
    }
}

/// How the rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutStatus {
    /// Still running.
    Running,
    /// Every planned step ran (with at most `max_failures` failed hosts).
    Completed,
    /// Stopped by failures; the hosts it moved were rolled back.
    RolledBack,
    /// Stopped by failures (or an abort) and not fully undone: `--no-rollback`, or a rollback
    /// that failed.
    Failed,
    /// Aborted on request; the hosts it moved were rolled back.
    Aborted,
    /// The sender stopped (a restart, a crash) while the rollout ran: nothing drives it any more.
    /// Hosts shown IN_PROGRESS may run either release; hosts not reached were never touched.
    /// `DELETE` finds out where each host stands and rolls back those it moved (a rollout of
    /// `deploy-sender deploy` whose command died: `deploy-sender rollouts undo`).
    Interrupted,
}

/// The whole rollout, as the final table and the REST resource show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RolloutReport {
    /// How it ended (or `RUNNING`).
    pub status: RolloutStatus,
    /// Where the fleet stands (meaningful once finished).
    pub fleet: FleetState,
    /// Why it stopped, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Steps that finished (canary included).
    pub steps_completed: usize,
    /// Steps planned.
    pub steps_planned: usize,
    /// Every host, in the order given.
    pub hosts: Vec<HostReport>,
    /// Wall time of the rollout, rollback included.
    pub duration_ms: u64,
}

impl RolloutReport {
    /// The report before anything moved: every host PENDING in its planned phase.
    pub fn planned(hosts: &[String], plan: &Plan) -> Self {
        Self {
            status: RolloutStatus::Running,
            fleet: FleetState::OldRelease,
            reason: None,
            steps_completed: 0,
            steps_planned: plan.steps.len(),
            hosts: hosts
                .iter()
                .zip(plan.phases(hosts.len()))
                .map(|(host, phase)| HostReport {
                    host: host.clone(),
                    phase,
                    outcome: HostOutcome::Pending,
                    version_before: None,
                    version_after: None,
                    deployment_id: None,
                    error: None,
                    rollback_error: None,
                    bytes: 0,
                    deploy_ms: None,
                    preload_ms: None,
                    preload_error: None,
                    rollback_ms: None,
                    unknown: false,
                })
                .collect(),
            duration_ms: 0,
        }
    }

    /// The final table, one line per host, for a terminal.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "HOST".to_owned(),
            "PHASE".to_owned(),
            "BEFORE".to_owned(),
            "AFTER".to_owned(),
            "OUTCOME".to_owned(),
            "BYTES".to_owned(),
            "PRELOAD".to_owned(),
            "DEPLOY".to_owned(),
            "ROLLBACK".to_owned(),
            "ERROR".to_owned(),
        ]];
        for h in &self.hosts {
            let error = [
                ("preload: ", &h.preload_error),
                ("", &h.error),
                ("rollback: ", &h.rollback_error),
            ]
            .into_iter()
            .filter_map(|(what, e)| e.as_ref().map(|e| (what, e)))
            .map(|(what, e)| format!("{what}{}: {}", e.code, e.message))
            .collect::<Vec<_>>()
            .join("; ");
            rows.push([
                h.host.clone(),
                h.phase.to_string(),
                h.version_before.clone().unwrap_or_else(|| "-".into()),
                match (&h.version_after, h.unknown) {
                    (_, true) => "unknown".into(),
                    (Some(after), false) => after.clone(),
                    (None, false) => "-".into(),
                },
                serde_json::to_value(h.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                h.bytes.to_string(),
                secs(h.preload_ms),
                secs(h.deploy_ms),
                secs(h.rollback_ms),
                error,
            ]);
        }
        let mut widths = [0usize; 10];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn secs(ms: Option<u64>) -> String {
    ms.map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}
