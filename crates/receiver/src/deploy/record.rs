//! The record of a deployment under way: stage reports with their metrics, and a journal write
//! at every change.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deploy_protocol::api::{DeploymentRecord, DeploymentStatus, Stage, StageOutcome, StageReport};
use deploy_protocol::{DeploymentSpec, ErrorDetail, PackageManifest};
use uuid::Uuid;

use super::{LABEL_DEPLOYMENT_ID, LABEL_MANAGED, LABEL_PACKAGE_CHECKSUM, LABEL_PACKAGE_ID};
use crate::error::{correlation_id, ReceiverError, Result};
use crate::journal::now_rfc3339;
use crate::state::AppState;

fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Upload => "upload",
        Stage::Verify => "verify",
        Stage::Load => "load",
        Stage::Start => "start",
        Stage::Health => "health",
        Stage::Rollback => "rollback",
        Stage::Cleanup => "cleanup",
    }
}

fn status_label(status: DeploymentStatus) -> &'static str {
    match status {
        DeploymentStatus::InProgress => "in_progress",
        DeploymentStatus::Succeeded => "succeeded",
        DeploymentStatus::RolledBack => "rolled_back",
        DeploymentStatus::Failed => "failed",
    }
}

/// A deployment under way: its record, journaled at every change, and metrics.
pub struct Deployment {
    state: AppState,
    pub(super) record: DeploymentRecord,
}

impl Deployment {
    /// Starts a record (IN_PROGRESS) and writes it; a receiver that cannot journal does not deploy.
    pub async fn begin(
        state: &AppState,
        spec: &DeploymentSpec,
        image: &str,
        manifest: Option<&PackageManifest>,
    ) -> Result<Self> {
        let package = manifest.map(|m| (m.package_id, Some(m.package_checksum)));
        Self::begin_for(state, spec, image, package).await
    }

    /// As [`Deployment::begin`], for the package of `package` (its id, and its checksum when it
    /// is known before the deployment starts).
    pub async fn begin_for(
        state: &AppState,
        spec: &DeploymentSpec,
        image: &str,
        package: Option<(Uuid, Option<deploy_protocol::Checksum>)>,
    ) -> Result<Self> {
        let record = DeploymentRecord {
            deployment_id: Uuid::new_v4(),
            status: DeploymentStatus::InProgress,
            container_name: spec.container_name.clone(),
            image: image.to_owned(),
            image_id: None,
            package_id: package.map(|(id, _)| id),
            package_checksum: package.and_then(|(_, checksum)| checksum),
            container_id: None,
            previous_container_id: None,
            correlation_id: correlation_id(),
            started_at: now_rfc3339(),
            finished_at: None,
            stages: Vec::new(),
            error: None,
            spec: Some(DeploymentSpec {
                image: Some(image.to_owned()),
                ..spec.clone()
            }),
            rollback_of: None,
        };
        state.journal().save(&record).await?;
        tracing::info!(deployment_id = %record.deployment_id, container = %record.container_name, image, "deployment started");
        state.events().deployment(&record).await;
        Ok(Self {
            state: state.clone(),
            record,
        })
    }

    /// Continues a record found in the journal (reconciliation).
    pub fn resume(state: &AppState, record: DeploymentRecord) -> Self {
        Self {
            state: state.clone(),
            record,
        }
    }

    /// The record so far.
    pub fn record(&self) -> &DeploymentRecord {
        &self.record
    }

    pub(super) fn state(&self) -> &AppState {
        &self.state
    }

    /// The receiver's labels for the new container.
    pub(super) fn labels(&self) -> HashMap<String, String> {
        let r = &self.record;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_DEPLOYMENT_ID.to_owned(), r.deployment_id.to_string()),
        ]);
        if let Some(id) = r.package_id {
            labels.insert(LABEL_PACKAGE_ID.to_owned(), id.to_string());
        }
        if let Some(sum) = r.package_checksum {
            labels.insert(LABEL_PACKAGE_CHECKSUM.to_owned(), sum.to_string());
        }
        labels
    }

    /// Appends a stage report and observes its duration.
    pub fn stage(
        &mut self,
        stage: Stage,
        outcome: StageOutcome,
        duration: Duration,
        detail: Option<String>,
    ) {
        // The loader observes its own duration.
        if stage != Stage::Load {
            self.state
                .metrics()
                .stage(stage_label(stage), duration.as_secs_f64());
        }
        let outcome_label = match outcome {
            StageOutcome::Ok => "ok",
            StageOutcome::Failed => "failed",
            StageOutcome::Skipped => "skipped",
        };
        self.state
            .metrics()
            .stage_finished(stage_label(stage), outcome_label);
        tracing::info!(deployment_id = %self.record.deployment_id, stage = stage_label(stage), ?outcome, duration_ms = duration.as_millis() as u64, detail = detail.as_deref().unwrap_or(""), "stage finished");
        self.record.stages.push(StageReport {
            stage,
            outcome,
            duration_ms: duration.as_millis() as u64,
            detail,
        });
    }

    /// Starts timing `stage`; [`Timed::ok`] or [`Timed::failed`] records it.
    pub(super) fn time(stage: Stage) -> Timed {
        Timed {
            stage,
            started: Instant::now(),
        }
    }

    /// Writes the record. Mid-deploy a failed write is logged, not fatal: stopping halfway would
    /// leave the containers in a worse state than finishing with a stale journal entry.
    pub(super) async fn save(&self) {
        if let Err(e) = self.state.journal().save(&self.record).await {
            tracing::error!(deployment_id = %self.record.deployment_id, error = %e, "could not journal the deployment");
        }
    }

    /// Ends the deployment with `status`, and `error` when it failed.
    pub async fn finish(
        self,
        status: DeploymentStatus,
        error: Option<&ReceiverError>,
    ) -> DeploymentRecord {
        let detail = error.map(|e| ErrorDetail {
            code: e.code(),
            message: e.to_string(),
            correlation_id: correlation_id(),
        });
        self.finish_with(status, detail).await
    }

    pub(super) async fn finish_with(
        mut self,
        status: DeploymentStatus,
        error: Option<ErrorDetail>,
    ) -> DeploymentRecord {
        self.record.status = status;
        self.record.error = error;
        self.record.finished_at = Some(now_rfc3339());
        self.save().await;
        self.state.metrics().deployment(status_label(status));
        self.state.events().deployment(&self.record).await;
        match &self.record.error {
            None => {
                tracing::info!(deployment_id = %self.record.deployment_id, status = status_label(status), "deployment finished")
            }
            Some(e) => {
                tracing::warn!(deployment_id = %self.record.deployment_id, status = status_label(status), code = %e.code, error = %e.message, "deployment finished")
            }
        }
        self.record
    }
}

/// A stage being timed: started when made, recorded once with its outcome.
#[must_use = "a timed stage is recorded by ok() or failed()"]
pub(super) struct Timed {
    stage: Stage,
    started: Instant,
}

impl Timed {
    /// Records the stage as `outcome` with `detail`.
    pub(super) fn record(self, d: &mut Deployment, outcome: StageOutcome, detail: Option<String>) {
        d.stage(self.stage, outcome, self.started.elapsed(), detail);
    }

    /// Records the stage as done.
    pub(super) fn ok(self, d: &mut Deployment, detail: impl Into<String>) {
        self.record(d, StageOutcome::Ok, Some(detail.into()));
    }

    /// Records the stage as failed.
    pub(super) fn failed(self, d: &mut Deployment, detail: impl std::fmt::Display) {
        self.record(d, StageOutcome::Failed, Some(detail.to_string()));
    }
}
