//! `deploy-sender rollouts list|undo`: the rollouts `deploy-sender deploy` ran to several hosts,
//! kept in the state directory (`pipeline::rollout::kept`). A rollout whose command died (SIGKILL,
//! a crash, a lost machine) is INTERRUPTED: `undo` looks up each host the record cannot vouch
//! for in its receiver's journal and rolls back every host on the new release, as
//! `DELETE /api/v1/rollouts/{id}` does for the service's.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use uuid::Uuid;

use super::rollout::print_report;
use super::terminal::print_json;
use crate::client::ReceiverTarget;
use crate::config::{EventsConfig, ReceiverConfig};
use crate::pipeline::rollout::kept::{cli_rollouts_dir, list_cli_rollouts, HeldRollout, TakeError};
use crate::pipeline::rollout::{
    command_gone, undo_on_receivers, HostError, RolloutEvent, RolloutRecorder, RolloutStatus,
};
use crate::pipeline::{now_rfc3339, Subject};
use crate::SenderError;

/// `deploy-sender rollouts ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum RolloutsCommand {
    /// List the rollouts `deploy-sender deploy` ran from this state directory, newest first
    /// (one whose command is gone without an end is INTERRUPTED).
    List(ListArgs),
    /// Undo an INTERRUPTED rollout: look up each host it left unknown on its receiver, then roll
    /// back every host on the new release (only look them up if it ran with --no-rollback).
    /// Exit code as a rollout's: 0 new release, 3 old release, 4 mixed.
    Undo(UndoArgs),
}

/// Where the records are.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// The package directory the rollouts' `deploy` ran with (the state directory defaults to
    /// `<PACKAGE_DIR>/.state`).
    #[arg(long, env = "PACKAGE_DIR", default_value = "./packages")]
    pub(crate) package_dir: PathBuf,
    /// The state directory the rollouts' `deploy` ran with: their records are in its
    /// `cli-rollouts/` [default: `<PACKAGE_DIR>/.state`].
    #[arg(long, env = "SENDER_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Print JSON: the records (`list`), the undo's report (`undo`).
    #[arg(long, env = "DEPLOY_JSON")]
    pub(crate) json: bool,
}

impl ListArgs {
    fn records_dir(&self) -> PathBuf {
        cli_rollouts_dir(
            &self
                .state_dir
                .clone()
                .unwrap_or_else(|| self.package_dir.join(".state")),
        )
    }
}

/// `rollouts undo`.
#[derive(clap::Args)]
pub(crate) struct UndoArgs {
    /// The rollout's id (as `deploy-sender deploy` printed it, or `rollouts list` shows it).
    pub(crate) rollout_id: Uuid,
    /// Id of the shared HMAC key the receivers know this sender by (the rollout's; its
    /// receivers are the record's).
    #[arg(long, env = "DEPLOY_HMAC_KEY_ID", default_value = "default")]
    pub(crate) key_id: String,
    /// Shared HMAC secret (prefer the environment variable: flags show in process lists).
    #[arg(long, env = "DEPLOY_HMAC_SECRET", hide_env_values = true)]
    pub(crate) secret: Option<String>,
    /// PEM file of CA certificate(s) to trust for `https://` receivers.
    #[arg(long, env = "DEPLOY_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// Kafka bootstrap servers for the undo's lifecycle event; unset: the local outbox only.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    pub(crate) kafka_bootstrap_servers: Option<String>,
    /// Kafka topic for lifecycle events.
    #[arg(long, env = "KAFKA_TOPIC", default_value = deploy_protocol::events::DEFAULT_TOPIC)]
    pub(crate) kafka_topic: String,
    /// Where the records are.
    #[command(flatten)]
    pub(crate) list: ListArgs,
}

impl fmt::Debug for UndoArgs {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UndoArgs")
            .field("rollout_id", &self.rollout_id)
            .field("key_id", &self.key_id)
            .field("list", &self.list)
            .finish_non_exhaustive()
    }
}

impl RolloutsCommand {
    /// Whether it prints JSON.
    pub(super) fn json(&self) -> bool {
        match self {
            RolloutsCommand::List(args) => args.json,
            RolloutsCommand::Undo(args) => args.list.json,
        }
    }
}

/// Runs the command; the exit code (`undo`: where the fleet ended).
pub(super) async fn run(command: RolloutsCommand) -> Result<u8, SenderError> {
    match command {
        RolloutsCommand::List(args) => {
            let dir = args.records_dir();
            let records = list_cli_rollouts(&dir).map_err(|e| {
                SenderError::Internal(format!("cannot read {}: {e}", dir.display()))
            })?;
            if args.json {
                print_json(&records);
            } else {
                println!(
                    "{:<36}  {:<20}  {:<12}  {:<11}  {:<11}  {:>5}  RELEASE",
                    "ROLLOUT", "STARTED", "CONTAINER", "STATUS", "FLEET", "HOSTS"
                );
                for r in records {
                    println!(
                        "{:<36}  {:<20}  {:<12}  {:<11}  {:<11}  {:>5}  {}",
                        r.rollout_id,
                        r.started_at,
                        r.container_name,
                        shown(r.report.status),
                        shown(r.report.fleet),
                        r.report.hosts.len(),
                        r.release
                    );
                }
            }
            Ok(0)
        }
        RolloutsCommand::Undo(args) => undo(args).await,
    }
}

async fn undo(args: UndoArgs) -> Result<u8, SenderError> {
    let dir = args.list.records_dir();
    let id = args.rollout_id;
    let held = HeldRollout::take(&dir, id).map_err(|e| match e {
        TakeError::Held(_) => SenderError::Conflict(format!(
            "{e}: its deploy-sender still runs it; stop that one with Ctrl-C or SIGTERM, which rolls back what it moved"
        )),
        TakeError::NotFound { .. } => SenderError::NotFound(format!(
            "{e} (the state directory is --state-dir, default <PACKAGE_DIR>/.state, as for the deploy)"
        )),
        other => SenderError::Internal(other.to_string()),
    })?;
    let record = held.record();
    let report = match record.report.status {
        RolloutStatus::Running => command_gone(record.report.clone(), &now_rfc3339()),
        RolloutStatus::Interrupted => record.report.clone(),
        other => {
            return Err(SenderError::Conflict(format!(
                "rollout {id} is {}: only an INTERRUPTED one is undone",
                shown(other)
            )))
        }
    };
    held.update(report.clone());
    eprintln!(
        "rollout {id} ({}): undoing ({} hosts, {}{})",
        dir.join(format!("{id}.json")).display(),
        report.hosts.len(),
        record.container_name,
        if record.rollback {
            ""
        } else {
            "; it ran with --no-rollback: hosts are only looked up"
        }
    );

    let receiver = ReceiverConfig {
        key_id: args.key_id.clone(),
        secret: args.secret.clone(),
        ca_cert: args.ca_cert.clone(),
        ..ReceiverConfig::default()
    };
    let secret = receiver.secret.as_deref().unwrap_or_default();
    let http = receiver.http_client()?;
    let clients: Vec<_> = report
        .hosts
        .iter()
        .map(|h| {
            ReceiverTarget::new(&h.host, &receiver.key_id, secret.as_bytes())
                .map(|target| receiver.client_for(http.clone(), target))
                .map_err(|e| HostError {
                    code: e.code(),
                    message: e.to_string(),
                })
        })
        .collect();
    let events = EventsConfig {
        state_dir: args.list.state_dir.clone(),
        kafka_bootstrap_servers: args.kafka_bootstrap_servers.clone(),
        kafka_topic: args.kafka_topic.clone(),
    }
    .open(&args.list.package_dir)
    .await?;
    let recorder = RolloutRecorder::spawn(
        events.clone(),
        Subject {
            package_id: None,
            correlation_id: Some(record.correlation_id.clone()),
            container_name: Some(record.container_name.clone()),
            image_tag: None,
        },
        id,
    );
    let on_event = |event: RolloutEvent| {
        recorder.observe(&event);
        held.update(event.into_report());
    };
    let report = undo_on_receivers(
        report,
        &clients,
        &record.container_name,
        &record.correlation_id,
        (
            record.rollback,
            Duration::from_secs(record.host_timeout_secs),
            Duration::from_secs(record.rollback_timeout_secs),
        ),
        &on_event,
    )
    .await;
    recorder.finish().await;
    events.close().await;
    held.finish();
    print_report(id, &report, args.list.json);
    Ok(report.fleet.exit_code())
}

/// A status or fleet state as the API spells it.
fn shown<T: serde::Serialize>(value: T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
