//! ROLLOUT_* lifecycle events, recorded the same way by the CLI and the service: STARTED when
//! the plan is made, BATCH_COMPLETED per step whose gate passed, and at the end COMPLETED,
//! ROLLED_BACK (stopped or aborted, and undone) or FAILED (a rollback that itself failed).

use deploy_events::EventType;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::report::RolloutStatus;
use super::run::RolloutEvent;
use crate::pipeline::{Lifecycle, Subject};

/// The lifecycle event `event` of rollout `rollout_id` is told as, if any.
pub fn lifecycle_event(
    rollout_id: Uuid,
    event: &RolloutEvent,
) -> Option<(EventType, serde_json::Value)> {
    match event {
        RolloutEvent::Started { report } => Some((
            EventType::RolloutStarted,
            json!({"rollout_id": rollout_id,
                   "hosts": report.hosts.iter().map(|h| &h.host).collect::<Vec<_>>(),
                   "steps_planned": report.steps_planned}),
        )),
        RolloutEvent::StepCompleted { phase, report } => Some((
            EventType::RolloutBatchCompleted,
            json!({"rollout_id": rollout_id, "phase": phase.to_string(),
                   "steps_completed": report.steps_completed}),
        )),
        RolloutEvent::Finished { report } => Some((
            match report.status {
                RolloutStatus::Completed => EventType::RolloutCompleted,
                RolloutStatus::RolledBack | RolloutStatus::Aborted => EventType::RolloutRolledBack,
                RolloutStatus::Failed | RolloutStatus::Running | RolloutStatus::Interrupted => {
                    EventType::RolloutFailed
                }
            },
            json!({"rollout_id": rollout_id, "report": report}),
        )),
        RolloutEvent::Host { .. } | RolloutEvent::RollingBack { .. } => None,
    }
}

/// Records a rollout's lifecycle events in order from one task; the engine's (synchronous)
/// callback only queues them with [`observe`](Self::observe).
#[derive(Debug)]
pub struct RolloutRecorder {
    rollout_id: Uuid,
    queue: mpsc::UnboundedSender<(EventType, serde_json::Value)>,
    task: JoinHandle<()>,
}

impl RolloutRecorder {
    /// Starts recording the events of rollout `rollout_id` about `subject` in `lifecycle`.
    pub fn spawn(lifecycle: Lifecycle, subject: Subject, rollout_id: Uuid) -> Self {
        let (queue, mut queued) = mpsc::unbounded_channel::<(EventType, serde_json::Value)>();
        let task = tokio::spawn(async move {
            while let Some((event_type, payload)) = queued.recv().await {
                lifecycle.emit(event_type, &subject, payload).await;
            }
        });
        Self {
            rollout_id,
            queue,
            task,
        }
    }

    /// Queues the lifecycle event of `event`, if it has one.
    pub fn observe(&self, event: &RolloutEvent) {
        if let Some(e) = lifecycle_event(self.rollout_id, event) {
            let _ = self.queue.send(e);
        }
    }

    /// Waits until every queued event is recorded.
    pub async fn finish(self) {
        drop(self.queue);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the rollout's event recorder stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::rollout::{BatchSize, Phase, Plan, RolloutReport};

    #[test]
    fn the_start_each_passed_gate_and_each_end_have_their_event() {
        let hosts = vec!["http://a/".to_owned(), "http://b/".to_owned()];
        let plan = Plan::new(2, Some(1), BatchSize::Hosts(1)).expect("plan");
        let report = RolloutReport::planned(&hosts, &plan);
        let id = Uuid::new_v4();
        let of = |event: RolloutEvent| lifecycle_event(id, &event);
        let (t, p) = of(RolloutEvent::Started {
            report: report.clone(),
        })
        .expect("an event");
        assert_eq!(t, EventType::RolloutStarted);
        assert_eq!(p["hosts"], json!(hosts));
        assert_eq!(p["rollout_id"], json!(id));
        let (t, p) = of(RolloutEvent::StepCompleted {
            phase: Phase::Canary,
            report: report.clone(),
        })
        .expect("an event");
        assert_eq!(t, EventType::RolloutBatchCompleted);
        assert_eq!(p["phase"], json!("canary"));
        assert!(of(RolloutEvent::Host {
            index: 0,
            report: report.clone()
        })
        .is_none());
        for (status, expected) in [
            (RolloutStatus::Completed, EventType::RolloutCompleted),
            (RolloutStatus::RolledBack, EventType::RolloutRolledBack),
            (RolloutStatus::Aborted, EventType::RolloutRolledBack),
            (RolloutStatus::Failed, EventType::RolloutFailed),
            (RolloutStatus::Interrupted, EventType::RolloutFailed),
        ] {
            let mut report = report.clone();
            report.status = status;
            let (t, _) = of(RolloutEvent::Finished { report }).expect("an event");
            assert_eq!(t, expected, "{status:?}");
        }
    }
}
