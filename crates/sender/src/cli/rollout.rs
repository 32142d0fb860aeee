//! `deploy-sender deploy` to several receivers (`--to URL1,URL2` or `--hosts FILE`): the fleet
//! flags, then the run: prepare the release's layers once (or, with `--full`, package it once),
//! roll it out (canary, batches, rollback), print a
//! line per host as it changes and the final table; the exit code says where the fleet ended (0
//! new release, 3 old release, 4 mixed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::deploy::DeployArgs;
use super::terminal::{print_json, TerminalProgress};
use crate::client::{ReceiverClient, ReceiverTarget};
use crate::pipeline::rollout::kept::{cli_rollouts_dir, CliRollout, HeldRollout};
use crate::pipeline::rollout::{
    roll_out, BatchSize, HostOutcome, Payload, Plan, Release, RolloutEvent, RolloutOptions,
    RolloutRecorder, RolloutReport, MAX_HOST_TIMEOUT_SECS,
};
use crate::pipeline::{package_image, prepare_source, PackageStore, Subject};
use crate::SenderError;

/// How a release goes to several receivers (`--to URL1,URL2` or `--hosts FILE`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RolloutArgs {
    /// File of receiver URLs, one a line (blank lines and `#` comments skipped); with --to, the
    /// --to hosts come first.
    #[arg(long, env = "DEPLOY_HOSTS_FILE")]
    pub hosts: Option<PathBuf>,
    /// Hosts deployed to first, all of which must be healthy before any other host moves
    /// (default: 1 when there are 3 hosts or more, else 0).
    #[arg(long, env = "DEPLOY_CANARY")]
    pub canary: Option<usize>,
    /// Hosts per batch after the canary: a number (`2`) or a share of the fleet (`25%`); each
    /// batch is health-gated before the next.
    #[arg(long, env = "DEPLOY_BATCH", default_value = "25%")]
    pub batch: BatchSize,
    /// Failed hosts tolerated before the rollout stops and rolls back (a failed canary always
    /// stops it).
    #[arg(long, env = "DEPLOY_MAX_FAILURES", default_value_t = 0)]
    pub max_failures: usize,
    /// Leave the hosts a stopped rollout moved on the new release instead of rolling them back.
    #[arg(long, env = "DEPLOY_NO_ROLLBACK")]
    pub no_rollback: bool,
    /// Seconds one host's deployment (transfer, load, start, health check) may take before the
    /// host counts as failed: a receiver that goes away cannot hang the rollout. Its receiver is
    /// then asked for up to 60 s more whether it finished the deployment anyway (a stopped
    /// rollout rolls such a host back).
    #[arg(long, env = "DEPLOY_HOST_TIMEOUT_SECS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=MAX_HOST_TIMEOUT_SECS))]
    pub host_timeout: u64,
    /// Seconds one host's rollback may take.
    #[arg(long, env = "DEPLOY_ROLLBACK_TIMEOUT_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=MAX_HOST_TIMEOUT_SECS))]
    pub rollback_timeout: u64,
    /// Send and load the release on every host after the canary while the canary is loaded
    /// and checked (once the canary has been sent its bytes: they never share the uplink), so
    /// that each later batch only switches containers. Hosts a stopped rollout
    /// did not reach may then hold the new image (never a container of it). Layer transfers
    /// only (not `--full`).
    #[arg(long, env = "DEPLOY_PRELOAD")]
    pub preload: bool,
    /// Hosts sent to at the same time, preloads included (one host's transfer proceeds while
    /// others load).
    #[arg(long, env = "MAX_CONCURRENT_TRANSFERS", default_value_t = 5)]
    pub max_concurrent_transfers: usize,
}

impl RolloutArgs {
    /// The engine's options.
    pub fn options(&self) -> RolloutOptions {
        RolloutOptions {
            canary: self.canary,
            batch: self.batch,
            max_failures: self.max_failures,
            rollback: !self.no_rollback,
            host_timeout: Duration::from_secs(self.host_timeout.max(1)),
            rollback_timeout: Duration::from_secs(self.rollback_timeout.max(1)),
            max_concurrent: self.max_concurrent_transfers.max(1),
            // Preloads and deployments share them: at most this many hosts are sent to or
            // loading at once, as in `deploy-sender serve`.
            slots: Some(std::sync::Arc::new(tokio::sync::Semaphore::new(
                self.max_concurrent_transfers.max(1),
            ))),
            preload: self.preload,
            // roll_out opens the gate when the first step's hosts have their bytes.
            preload_after: None,
        }
    }

    /// `to` followed by the URLs of `--hosts`, each once.
    pub fn urls(&self, to: &[String]) -> Result<Vec<String>, SenderError> {
        let mut urls: Vec<String> = to.iter().filter(|u| !u.is_empty()).cloned().collect();
        if let Some(path) = &self.hosts {
            let text = std::fs::read_to_string(path).map_err(|e| {
                SenderError::Validation(format!("--hosts {}: cannot read it: {e}", path.display()))
            })?;
            urls.extend(parse_hosts(&text));
        }
        let mut seen = std::collections::HashSet::new();
        urls.retain(|u| seen.insert(crate::pipeline::rollout::same_receiver(u)));
        Ok(urls)
    }
}

/// The URLs of a hosts file: one a line, blank lines and `#` comments skipped.
pub fn parse_hosts(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

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

    let http = args.receiver.http_client()?;
    let receivers: Vec<ReceiverClient> = targets
        .into_iter()
        .map(|target| args.receiver.client_for(http.clone(), target))
        .collect();
    // SIGINT (Ctrl-C) or SIGTERM (a CI job cancelled, a service manager stopping the command):
    // while the release is prepared, it ends the command (130, what was being written removed);
    // once the rollout runs, it stops it and rolls back what it moved; a second one quits at once.
    let mut signals = Signals::new();
    let docker = crate::pipeline::connect_docker().await?;
    let bars = Arc::new(TerminalProgress::default());
    let prepared = async {
        let payload = prepare(&args, &docker, &request, &bars).await;
        bars.clear();
        payload
    };
    let payload = tokio::select! {
        payload = prepared => payload?,
        _ = signals.next() => {
            bars.clear();
            return Ok(130);
        }
    };
    let rollout_id = Uuid::new_v4();
    let release = Release {
        payload,
        spec: request.deployment.clone(),
        // The rollout's own (`<--correlation-id>.rollout-<id>`): how a host that misses its
        // deadline is found in its receiver's journal.
        correlation_id: Some(crate::pipeline::rollout::rollout_correlation_id(
            request.correlation_id.as_deref(),
            rollout_id,
        )),
    };
    let (what, package_id, tag) = match &release.payload {
        Payload::Layers(image) => (
            format!(
                "image {} as {} layers, {:.2} MB compressed ({} compressed now, {} from the layer cache)",
                image.tags.first().unwrap_or(&image.image_id),
                image.layers.len(),
                image.total_blob_bytes() as f64 / 1e6,
                image.stats.compressed_layers,
                image.stats.cached_layers
            ),
            None,
            image.tags.first().cloned(),
        ),
        Payload::Package(package) => (
            format!(
                "package {}, {:.2} MB, sent whole (--full)",
                package.package_id, package.package_size_mb
            ),
            Some(package.package_id),
            package.image_tags.first().cloned(),
        ),
    };
    eprintln!(
        "rollout {rollout_id}: {} to {} hosts ({what})",
        release.spec.container_name,
        receivers.len(),
    );
    let events = args.events.open(&args.store.package_dir).await?;
    let recorder = RolloutRecorder::spawn(
        events.clone(),
        Subject {
            package_id,
            correlation_id: release.correlation_id.clone(),
            container_name: Some(release.spec.container_name.clone()),
            image_tag: tag.clone(),
        },
        rollout_id,
    );

    // Kept on disk at every change, so that a rollout whose command dies can be undone
    // (`deploy-sender rollouts undo`).
    let plan = Plan::new(receivers.len(), options.canary, options.batch)
        .map_err(SenderError::Validation)?;
    let hosts: Vec<String> = receivers
        .iter()
        .map(|r| r.target().base_url.to_string())
        .collect();
    let state_dir = args.events.state_dir(&args.store.package_dir);
    let held = HeldRollout::start(
        &cli_rollouts_dir(&state_dir),
        CliRollout {
            rollout_id,
            container_name: release.spec.container_name.clone(),
            correlation_id: release.correlation_id.clone().unwrap_or_default(),
            started_at: crate::pipeline::now_rfc3339(),
            release: package_id
                .map(|id| format!("package {id}"))
                .or_else(|| tag.clone())
                .unwrap_or_else(|| release.payload.image_id().to_owned()),
            rollback: options.rollback,
            host_timeout_secs: options.host_timeout.as_secs(),
            rollback_timeout_secs: options.rollback_timeout.as_secs(),
            report: RolloutReport::planned(&hosts, &plan),
        },
    )
    .map_err(|e| SenderError::Internal(e.to_string()))?;
    let abort = CancellationToken::new();
    let on_signal = abort.clone();
    let watcher = tokio::spawn(async move {
        let what = signals.next().await;
        eprintln!("{what}: stopping the rollout and rolling back the hosts it moved (a second signal quits at once)");
        on_signal.cancel();
        signals.next().await;
        std::process::exit(130);
    });
    let on_event = |event: RolloutEvent| {
        recorder.observe(&event);
        held.update(event.report().clone());
        print_event(event);
    };
    let report = roll_out(&receivers, &release, &options, abort, &on_event).await;
    watcher.abort();
    recorder.finish().await;
    events.close().await;
    held.finish();
    let report = report?;
    print_report(rollout_id, &report, args.json);
    Ok(report.fleet.exit_code())
}

/// The final table and a line (or, with `json`, the report).
pub(super) fn print_report(rollout_id: Uuid, report: &RolloutReport, json: bool) {
    if json {
        print_json(report);
        return;
    }
    print!("{}", report.table());
    let name = |value: serde_json::Result<serde_json::Value>| {
        value
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    println!(
        "rollout {rollout_id}: {}, fleet on {}, {} of {} steps, {:.1} s{}",
        name(serde_json::to_value(report.status)),
        name(serde_json::to_value(report.fleet)),
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

/// What travels: the release's layers prepared once (the layer cache), or with `--full` one
/// stored package.
async fn prepare(
    args: &DeployArgs,
    docker: &bollard::Docker,
    request: &crate::pipeline::DeployRequest,
    bars: &Arc<TerminalProgress>,
) -> Result<Payload, SenderError> {
    if args.full {
        let store = PackageStore::open(&args.store.package_dir).await?;
        let mut package_request = request.package.clone();
        package_request.container_name = Some(request.deployment.container_name.clone());
        let package = package_image(docker, &store, &package_request, &**bars).await?;
        args.store.retain(&store, package.package_id).await;
        Ok(Payload::Package(Box::new(package)))
    } else {
        let cache = args.store.open_layer_cache().await?;
        let image = prepare_source(docker, &cache, &request.package, bars.clone()).await?;
        Ok(Payload::Layers(Arc::new(image)))
    }
}

/// One stderr line per host that finishes a step or a preload, and per gate.
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
                // A preload ended (the host's own step comes later).
                HostOutcome::Pending => match (&h.preload_error, h.preload_ms) {
                    (Some(e), _) => format!("preload failed: {}: {}", e.code, e.message),
                    (None, Some(ms)) => format!(
                        "preloaded ({} bytes) in {:.1} s",
                        h.bytes,
                        ms as f64 / 1000.0
                    ),
                    (None, None) => return,
                },
                HostOutcome::NotReached => return,
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

/// SIGINT and SIGTERM, as they come (each heard from [`Signals::new`] on, also while nobody
/// waits for the next).
struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts listening (the signals' default action, ending the process, is replaced from here
    /// on).
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        async fn one(signal: Option<&mut tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    if signal.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(self.int.as_mut()) => "interrupted (SIGINT)",
            () = one(self.term.as_mut()) => "terminated (SIGTERM)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preloads_and_deployments_share_max_concurrent_transfers() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            rollout: RolloutArgs,
        }
        let args = <Command as clap::Parser>::parse_from([
            "deploy",
            "--preload",
            "--max-concurrent-transfers",
            "3",
        ]);
        let options = args.rollout.options();
        assert!(options.preload);
        assert_eq!(options.max_concurrent, 3);
        let slots = options
            .slots
            .expect("slots shared by preloads and deployments");
        assert_eq!(slots.available_permits(), 3);
    }

    #[test]
    fn the_cli_refuses_what_would_break_a_rollout_and_names_each_receiver_once() {
        use super::super::Cli;
        use clap::Parser as _;
        let deploy = |extra: &[&str]| {
            let mut args = vec!["deploy-sender", "deploy", "--image", "app:v1"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args)
        };
        // A receiver would replace these correlation ids with its own.
        for bad in ["Build 42", "", "caf\u{e9}", &"x".repeat(129)] {
            assert!(deploy(&["--correlation-id", bad]).is_err(), "{bad:?}");
        }
        assert!(deploy(&["--correlation-id", "ci-job-42"]).is_ok());
        // Deadlines a Duration sum could overflow.
        assert!(deploy(&["--host-timeout", "86401"]).is_err());
        assert!(deploy(&["--rollback-timeout", "18446744073709551615"]).is_err());
        assert!(deploy(&["--host-timeout", "86400"]).is_ok());
        assert!(deploy(&["--host-timeout", "0"]).is_err());

        // The same receiver written twice is one host: a single deploy, interruptible at once.
        let twice = deploy(&["--to", "http://h:8001,http://H:8001/"]).expect("valid flags");
        assert!(twice.interruptible());
        let two = deploy(&["--to", "http://h:8001,http://h:8002"]).expect("valid flags");
        assert!(!two.interruptible(), "a rollout handles its signals itself");
        let args = RolloutArgs {
            hosts: None,
            ..parsed_rollout_args()
        };
        let urls = args
            .urls(&[
                "http://h:8001".into(),
                "http://H:8001/".into(),
                "http://h:80".into(),
                "http://h".into(),
            ])
            .expect("urls");
        assert_eq!(urls, ["http://h:8001", "http://h:80"]);
    }

    #[tokio::test]
    async fn sigterm_is_heard_as_a_signal_to_stop() {
        // Real signals to this test's own process: once `Signals` listens, SIGTERM no longer
        // ends the process (its default action), it is heard.
        let mut signals = Signals::new();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(sent.success());
        let heard = tokio::time::timeout(Duration::from_secs(10), signals.next())
            .await
            .expect("SIGTERM heard within 10 s");
        assert_eq!(heard, "terminated (SIGTERM)");
    }

    fn parsed_rollout_args() -> RolloutArgs {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            rollout: RolloutArgs,
        }
        <Command as clap::Parser>::parse_from(["deploy"]).rollout
    }

    #[test]
    fn a_hosts_file_has_one_url_a_line_and_comments() {
        let text = "# fleet\nhttp://10.0.0.1:8001\n\n  http://10.0.0.2:8001  # rack 2\n";
        assert_eq!(
            parse_hosts(text),
            ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]
        );
    }
}
