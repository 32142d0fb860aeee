//! Fleet rollouts: one release to many receivers, canary first, then health-gated batches; when
//! it fails beyond what is tolerated, every host it moved is rolled back at once.
//!
//! [`plan`] orders the hosts, [`run`](run::run) drives them through caller-given functions that
//! deploy to one host and roll one host back, and [`report`] says what became of each host and of
//! the fleet; [`receivers`] gives it real receivers, whose records [`journal`] reads; [`undo`]
//! rolls back what a rollout nobody drives any more (the sender stopped) moved. Nothing here
//! knows HTTP routes or terminals; the CLI and the REST service wire it.

pub mod journal;
pub mod kept;
pub mod lifecycle;
pub mod plan;
pub mod receivers;
pub mod report;
pub mod run;
pub mod undo;

pub use journal::settle_interrupted;
pub use lifecycle::{lifecycle_event, RolloutRecorder};
pub use plan::{BatchSize, Phase, Plan};
pub use receivers::{
    is_rollouts_own, roll_out, rollout_correlation_id, same_receiver, undo_on_receivers, Payload,
    Release, LATE_SETTLE,
};
pub use report::{FleetState, HostError, HostOutcome, HostReport, RolloutReport, RolloutStatus};
pub use run::{
    run, HostSlot, Moved, NotMoved, RolloutEvent, RolloutOptions, MAX_HOST_TIMEOUT_SECS,
};
pub use undo::{command_gone, interrupted, undo_interrupted, Settled, UndoOptions};

#[cfg(test)]
mod tests;
