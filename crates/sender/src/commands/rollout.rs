//! `deploy-sender deploy` to several receivers: package the release once, roll it out (canary,
//! batches, rollback), print a line per host as it changes and the final table; the exit code
//! says where the fleet ended (0 new release, 3 old release, 4 mixed).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::print_json;
use crate::cli::DeployArgs;
use crate::package::package_image;
use crate::rollout::{roll_out, HostOutcome, Plan, Release, RolloutEvent};
use crate::store::PackageStore;
use crate::terminal::TerminalProgress;
use crate::upload::ReceiverTarget;
use crate::SenderError;

/// Rolls `args`' release out to `urls`; the exit code of the fleet's end state.
pub(super) async fn run(args: DeployArgs, urls: Vec<String>) -> Result<u8, SenderError> {
    let request = args.request()?;
    let options = args.rollout.options();
    // Refuse an impossible plan or a bad URL before building anything.
    Plan::new(urls.len(), options.canary, options.batch).map_err(SenderError::Validation)?;
    let secret = args.receiver.secret.as_deref().unwrap_or_default();
    let targets = urls
        .iter()
        .map(|u| ReceiverTarget::new(u, &args.receiver.key_id, secret.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut check = request.deployment.clone();
    check.image = None;
    check.validate().map_err(SenderError::Validation)?;

    let client = args.receiver.http_client()?;
    let store = PackageStore::open(&args.store.package_dir).await?;
    let docker = crate::docker::connect().await?;
    let mut package_request = request.package.clone();
    package_request.container_name = Some(request.deployment.container_name.clone());
    let bars = Arc::new(TerminalProgress::default());
    let package = package_image(&docker, &store, &package_request, &*bars).await;
    bars.clear();
    let package = package?;
    let rollout_id = Uuid::new_v4();
    let release = Release {
        package,
        spec: request.deployment.clone(),
        correlation_id: Some(
            request
                .correlation_id
                .clone()
                .unwrap_or_else(|| format!("rollout-{rollout_id}")),
        ),
    };
    eprintln!(
        "rollout {rollout_id}: {} to {} hosts (package {}, {:.2} MB)",
        release.spec.container_name,
        targets.len(),
        release.package.package_id,
        release.package.package_size_mb
    );

    let abort = CancellationToken::new();
    let on_ctrl_c = abort.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping the rollout and rolling back the hosts it moved (Ctrl-C again to quit at once)");
            on_ctrl_c.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    let report = roll_out(&client, &targets, &release, &options, abort, &print_event).await;
    watcher.abort();
    let report = report?;
    if args.json {
        print_json(&report);
    } else {
        print!("{}", report.table());
        let status = serde_json::to_value(report.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let fleet = serde_json::to_value(report.fleet)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "rollout {rollout_id}: {status}, fleet on {fleet}, {} of {} steps, {:.1} s{}",
            report.steps_completed,
            report.steps_planned,
            report.duration_ms as f64 / 1000.0,
            report
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    Ok(report.fleet.exit_code())
}

/// One stderr line per host that finishes a step, and per gate.
fn print_event(event: RolloutEvent) {
    match event {
        RolloutEvent::Started { .. } => {}
        RolloutEvent::Host { index, report } => {
            let Some(h) = report.hosts.get(index) else {
                return;
            };
            let what = match h.outcome {
                HostOutcome::InProgress if h.deploy_ms.is_none() => "deploying".to_owned(),
                HostOutcome::InProgress => "rolling back".to_owned(),
                HostOutcome::Deployed => format!(
                    "deployed {} in {:.1} s",
                    h.version_after.as_deref().unwrap_or("?"),
                    h.deploy_ms.unwrap_or(0) as f64 / 1000.0
                ),
                HostOutcome::Failed => format!(
                    "FAILED: {}",
                    h.error
                        .as_ref()
                        .map(|e| format!("{}: {}", e.code, e.message))
                        .unwrap_or_default()
                ),
                HostOutcome::RolledBack => format!(
                    "rolled back to {}",
                    h.version_after
                        .as_deref()
                        .unwrap_or("nothing (container removed)")
                ),
                HostOutcome::RollbackFailed => format!(
                    "ROLLBACK FAILED: {}",
                    h.rollback_error
                        .as_ref()
                        .map(|e| format!("{}: {}", e.code, e.message))
                        .unwrap_or_default()
                ),
                HostOutcome::Pending | HostOutcome::NotReached => return,
            };
            eprintln!("  {:<8} {}  {what}", h.phase.to_string(), h.host);
        }
        RolloutEvent::StepCompleted { phase, .. } => eprintln!("  {phase} healthy"),
        RolloutEvent::RollingBack { reason, .. } => {
            eprintln!("  stopping: {reason}; rolling back the hosts this rollout moved")
        }
        RolloutEvent::Finished { .. } => {}
    }
}
