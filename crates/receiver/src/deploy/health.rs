//! Waiting for a container to be healthy: Docker's own HEALTHCHECK status, an HTTP probe from the
//! receiver to a published port, or (no check) the container staying up for a settle period.
//! Every wait is bounded by the spec's deadline and ends early when the container stops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::container::LogsOptions;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, HealthStatusEnum};
use bollard::system::EventsOptions;
use bollard::Docker;
use deploy_protocol::display::error_chain;
use deploy_protocol::{HealthCheckKind, HealthCheckSpec};
use futures::StreamExt;

use crate::docker::map_err;
use crate::error::{ReceiverError, Result};

/// How often Docker's health status and the container state are read (besides whenever Docker
/// reports a health or state change of the container).
const POLL: Duration = Duration::from_millis(250);
/// Longest health output kept (Docker's log lines can be long).
const MAX_OUTPUT: usize = 2000;

/// How a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    /// Whether the container became healthy.
    pub healthy: bool,
    /// The check applied: `docker`, `http` or `none`.
    pub kind: &'static str,
    /// The last probe output, Docker health log line, or why the container stopped.
    pub output: Option<String>,
    /// Time waited.
    pub duration: Duration,
}

/// Waits until `container` is healthy by `spec`, or it fails, or the deadline passes. Errors only
/// when Docker cannot be asked (or the container does not exist).
pub async fn wait(
    docker: &Docker,
    container: &str,
    spec: &HealthCheckSpec,
) -> Result<HealthReport> {
    let started = Instant::now();
    let inspect = inspect(docker, container).await?;
    let kind = resolve_kind(spec.kind, &inspect);
    let deadline = started + secs(spec.deadline_secs);
    let verdict = match kind {
        HealthCheckKind::Docker => wait_docker(docker, container, spec, deadline).await?,
        HealthCheckKind::Http => wait_http(docker, container, &inspect, spec, deadline).await?,
        HealthCheckKind::None | HealthCheckKind::Auto => {
            wait_settle(docker, container, spec).await?
        }
    };
    Ok(HealthReport {
        healthy: verdict.0,
        kind: kind_name(kind),
        output: verdict.1.map(truncate),
        duration: started.elapsed(),
    })
}

/// Whether an image or container config carries a usable HEALTHCHECK.
pub fn has_healthcheck(test: Option<&Vec<String>>) -> bool {
    test.is_some_and(|t| !t.is_empty() && t[0] != "NONE")
}

/// `auto` becomes `docker` when the container has a HEALTHCHECK, else `none`.
fn resolve_kind(kind: HealthCheckKind, inspect: &ContainerInspectResponse) -> HealthCheckKind {
    match kind {
        HealthCheckKind::Auto => {
            let test = inspect
                .config
                .as_ref()
                .and_then(|c| c.healthcheck.as_ref())
                .and_then(|h| h.test.as_ref());
            if has_healthcheck(test) {
                HealthCheckKind::Docker
            } else {
                HealthCheckKind::None
            }
        }
        other => other,
    }
}

fn kind_name(kind: HealthCheckKind) -> &'static str {
    match kind {
        HealthCheckKind::Docker => "docker",
        HealthCheckKind::Http => "http",
        HealthCheckKind::None | HealthCheckKind::Auto => "none",
    }
}

type Verdict = (bool, Option<String>);

async fn wait_docker(
    docker: &Docker,
    container: &str,
    spec: &HealthCheckSpec,
    deadline: Instant,
) -> Result<Verdict> {
    // Docker's events wake the wait as soon as the status changes; the poll stays as the floor
    // (an event stream that fails or ends only leaves the poll).
    let mut changes = docker.events(Some(EventsOptions {
        since: None,
        until: None,
        filters: HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("container".to_owned(), vec![container.to_owned()]),
            (
                "event".to_owned(),
                ["health_status", "die", "oom", "stop", "kill", "destroy"]
                    .map(str::to_owned)
                    .to_vec(),
            ),
        ]),
    }));
    let mut listening = true;
    // While Docker says `starting`, the image's own check is also run here every interval (the
    // first right away), as Docker 25's `--health-start-interval` would: the first pass counts
    // as healthy, a failed run counts for nothing (only Docker's `unhealthy` fails the wait).
    let mut next_probe = Instant::now();
    let mut command = None;
    loop {
        let inspect = inspect(docker, container).await?;
        if command.is_none() {
            command = Some(check_command(&inspect));
        }
        if let Some(stopped) = stopped(docker, container, &inspect).await {
            return Ok((false, Some(stopped)));
        }
        let health = inspect.state.as_ref().and_then(|s| s.health.as_ref());
        let last = health
            .and_then(|h| h.log.as_ref())
            .and_then(|log| log.last())
            .map(|r| {
                let out = r.output.as_deref().unwrap_or_default();
                exit_line(r.exit_code.unwrap_or(-1), out)
            });
        match health.and_then(|h| h.status) {
            Some(HealthStatusEnum::HEALTHY) => return Ok((true, last)),
            Some(HealthStatusEnum::UNHEALTHY) => return Ok((false, last)),
            None | Some(HealthStatusEnum::NONE | HealthStatusEnum::EMPTY) => {
                return Ok((
                    false,
                    Some(
                        "the container has no Docker HEALTHCHECK: use kind `http` or `none`".into(),
                    ),
                ))
            }
            Some(HealthStatusEnum::STARTING) => {}
        }
        let now = Instant::now();
        match &command {
            Some(Some(cmd)) if now >= next_probe && now < deadline => {
                let limit = secs(spec.timeout_secs).min(deadline - now);
                match run_check(docker, container, cmd, limit).await {
                    Probe::Passed(output) => {
                        return Ok((
                            true,
                            Some(format!(
                                "the image's HEALTHCHECK, run by the receiver before Docker's own first check: {output}"
                            )),
                        ))
                    }
                    Probe::Failed => next_probe = Instant::now() + secs(spec.interval_secs),
                    // A run that hung is left to Docker's own checks from here (Docker kills its
                    // timed-out checks; an exec cannot be killed through the API).
                    Probe::TimedOut => command = Some(None),
                }
            }
            Some(None) => next_probe = deadline,
            _ => {}
        }
        if Instant::now() >= deadline {
            return Ok((
                false,
                Some(format!(
                    "still `starting` after the {} s deadline; last check: {}",
                    spec.deadline_secs,
                    last.unwrap_or_else(|| "none ran yet".into())
                )),
            ));
        }
        let wait = POLL
            .min(deadline.saturating_duration_since(Instant::now()))
            .min(
                next_probe
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            );
        tokio::select! {
            change = changes.next(), if listening => {
                listening = matches!(change, Some(Ok(_)));
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The container's HEALTHCHECK as a command to exec, as Docker builds it: `CMD a b` runs `a b`,
/// `CMD-SHELL s` runs the container's shell (`SHELL`, default `/bin/sh -c`) followed by `s`; none
/// for `NONE` or no check.
fn check_command(inspect: &ContainerInspectResponse) -> Option<Vec<String>> {
    let config = inspect.config.as_ref()?;
    let test = config.healthcheck.as_ref()?.test.as_ref()?;
    let (kind, rest) = test.split_first()?;
    match kind.as_str() {
        "CMD" if !rest.is_empty() => Some(rest.to_vec()),
        "CMD-SHELL" if !rest.is_empty() => {
            let mut cmd = config
                .shell
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into()]);
            cmd.extend(rest.iter().cloned());
            Some(cmd)
        }
        _ => None,
    }
}

/// How one run of the image's check ended.
enum Probe {
    /// Exit code 0; its output.
    Passed(String),
    /// Another exit code, or it could not be run.
    Failed,
    /// Not done within its time.
    TimedOut,
}

/// Runs `cmd` in `container` (as Docker runs a health check: an exec), all of it within `limit`.
async fn run_check(docker: &Docker, container: &str, cmd: &[String], limit: Duration) -> Probe {
    let run = async {
        let exec = docker
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .ok()?;
        let mut text = String::new();
        if let Ok(StartExecResults::Attached { mut output, .. }) =
            docker.start_exec(&exec.id, None).await
        {
            while let Some(Ok(chunk)) = output.next().await {
                if text.len() < MAX_OUTPUT {
                    text.push_str(&chunk.to_string());
                }
            }
        }
        let code = docker.inspect_exec(&exec.id).await.ok()?.exit_code?;
        (code == 0).then(|| exit_line(0, &text))
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Some(output)) => Probe::Passed(output),
        Ok(None) => Probe::Failed,
        Err(_) => Probe::TimedOut,
    }
}

async fn wait_http(
    docker: &Docker,
    container: &str,
    inspect: &ContainerInspectResponse,
    spec: &HealthCheckSpec,
    deadline: Instant,
) -> Result<Verdict> {
    let path = spec.path.as_deref().unwrap_or("/");
    let (host, port) = probe_address(inspect, spec.port)?;
    let url = format!("http://{host}:{port}{path}");
    let client = reqwest::Client::builder()
        .timeout(secs(spec.timeout_secs))
        .no_proxy()
        .build()
        .map_err(|e| ReceiverError::Internal(format!("building the HTTP probe client: {e}")))?;
    let started = Instant::now();
    let mut failures = 0;
    loop {
        let inspect = self::inspect(docker, container).await?;
        if let Some(stopped) = stopped(docker, container, &inspect).await {
            return Ok((false, Some(stopped)));
        }
        let output = match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => {
                return Ok((true, Some(format!("GET {url}: HTTP {}", response.status()))))
            }
            Ok(response) => format!("GET {url}: HTTP {}", response.status()),
            Err(e) => format!("GET {url}: {}", error_chain(&e)),
        };
        if started.elapsed() >= secs(spec.start_period_secs) {
            failures += 1;
            if failures >= spec.retries.max(1) {
                return Ok((false, Some(format!("{output} ({failures} failed probes)"))));
            }
        }
        if Instant::now() >= deadline {
            return Ok((
                false,
                Some(format!(
                    "{output} (deadline of {} s passed)",
                    spec.deadline_secs
                )),
            ));
        }
        tokio::time::sleep(secs(spec.interval_secs)).await;
    }
}

async fn wait_settle(docker: &Docker, container: &str, spec: &HealthCheckSpec) -> Result<Verdict> {
    let until = Instant::now() + secs(spec.settle_secs);
    loop {
        let inspect = inspect(docker, container).await?;
        if let Some(stopped) = stopped(docker, container, &inspect).await {
            return Ok((false, Some(stopped)));
        }
        let now = Instant::now();
        if now >= until {
            return Ok((
                true,
                Some(format!("kept running for {} s", spec.settle_secs)),
            ));
        }
        tokio::time::sleep(POLL.min(until - now)).await;
    }
}

/// Why the container is not (steadily) running, with the tail of its log, or `None` if it runs.
async fn stopped(
    docker: &Docker,
    container: &str,
    inspect: &ContainerInspectResponse,
) -> Option<String> {
    let state = inspect.state.as_ref();
    let running = state.and_then(|s| s.running).unwrap_or(false);
    let restarting = state.and_then(|s| s.restarting).unwrap_or(false);
    if running && !restarting {
        return None;
    }
    let code = state.and_then(|s| s.exit_code).unwrap_or(-1);
    let mut why = if restarting {
        format!("the container keeps restarting (last exit code {code})")
    } else {
        format!("the container stopped with exit code {code}")
    };
    if let Some(error) = state
        .and_then(|s| s.error.as_deref())
        .filter(|e| !e.is_empty())
    {
        why.push_str(&format!(": {error}"));
    }
    let tail = log_tail(docker, container).await;
    if !tail.is_empty() {
        why.push_str(&format!("; last log lines: {tail}"));
    }
    Some(why)
}

async fn log_tail(docker: &Docker, container: &str) -> String {
    let options = LogsOptions::<String> {
        stdout: true,
        stderr: true,
        tail: "5".into(),
        ..Default::default()
    };
    let collect = docker
        .logs(container, Some(options))
        .filter_map(|r| async move { r.ok().map(|o| o.to_string()) })
        .collect::<Vec<_>>();
    match tokio::time::timeout(Duration::from_secs(2), collect).await {
        Ok(lines) => lines.concat().trim().to_owned(),
        Err(_) => String::new(),
    }
}

/// The address the receiver probes: the published host port of `container_port` (default: the
/// lowest published TCP port), on loopback when bound to all addresses.
fn probe_address(
    inspect: &ContainerInspectResponse,
    container_port: Option<u16>,
) -> Result<(String, u16)> {
    let host_network = inspect
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref())
        == Some("host");
    if host_network {
        let port = container_port.ok_or_else(|| {
            ReceiverError::Validation("an http health check on host networking needs `port`".into())
        })?;
        return Ok(("127.0.0.1".into(), port));
    }
    let ports = inspect
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref())
        .cloned()
        .unwrap_or_default();
    let mut published: Vec<(u16, String, u16)> = ports
        .iter()
        .filter_map(|(key, bindings)| {
            let port = key.strip_suffix("/tcp")?.parse::<u16>().ok()?;
            let binding = bindings.as_ref()?.first()?;
            let host_port = binding.host_port.as_deref()?.parse::<u16>().ok()?;
            Some((port, binding.host_ip.clone().unwrap_or_default(), host_port))
        })
        .filter(|(port, _, _)| container_port.is_none_or(|p| p == *port))
        .collect();
    published.sort();
    let (_, host_ip, host_port) = published.into_iter().next().ok_or_else(|| {
        ReceiverError::Validation(match container_port {
            Some(p) => format!("container port {p}/tcp is not published: the http health check probes the published host port"),
            None => "the container publishes no TCP port: the http health check probes a published host port".into(),
        })
    })?;
    let host = match host_ip.as_str() {
        "" | "0.0.0.0" => "127.0.0.1".to_owned(),
        "::" => "[::1]".to_owned(),
        ip if ip.contains(':') => format!("[{ip}]"),
        ip => ip.to_owned(),
    };
    Ok((host, host_port))
}

async fn inspect(docker: &Docker, container: &str) -> Result<ContainerInspectResponse> {
    docker
        .inspect_container(container, None)
        .await
        .map_err(|e| map_err(e, ReceiverError::Internal))
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// `POST /deployment/health-check`: waits for the named container; not healthy in time is
/// HEALTH_CHECK_FAILED with the last output, an unknown container NOT_FOUND.
pub async fn check(
    state: &crate::state::AppState,
    request: deploy_protocol::api::HealthCheckRequest,
) -> Result<deploy_protocol::api::HealthCheckResponse> {
    let name = &request.container_name;
    if !deploy_protocol::manifest::is_valid_container_name(name) {
        return Err(ReceiverError::Validation(format!(
            "{name:?} is not a container name"
        )));
    }
    let spec = &request.health_check;
    let durations = [
        spec.interval_secs,
        spec.timeout_secs,
        spec.start_period_secs,
        spec.settle_secs,
        spec.deadline_secs,
    ];
    if durations
        .iter()
        .any(|d| !d.is_finite() || !(0.0..=3600.0).contains(d))
        || spec.interval_secs < 0.05
        || spec.timeout_secs < 0.05
    {
        return Err(ReceiverError::Validation(
            "health-check durations must be between 0 and 3600 seconds (interval and timeout at least 0.05)".into(),
        ));
    }
    let docker = state.docker().client().await?;
    let not_found = || ReceiverError::NotFound(format!("no container named {name} on this host"));
    let container = super::containers::container_named(&docker, name)
        .await?
        .and_then(|c| c.id)
        .ok_or_else(not_found)?;
    let report = wait(&docker, &container, spec).await.map_err(|e| match e {
        ReceiverError::NotFound(_) => not_found(),
        other => other,
    })?;
    if !report.healthy {
        return Err(ReceiverError::HealthCheckFailed(format!(
            "container {name} is not healthy ({} check): {}",
            report.kind,
            report.output.unwrap_or_else(|| "no output".into())
        )));
    }
    Ok(deploy_protocol::api::HealthCheckResponse {
        container_name: name.clone(),
        healthy: true,
        kind: report.kind.into(),
        output: report.output,
        duration_ms: report.duration.as_millis() as u64,
    })
}
/// "exit code N", and ": what the check printed" when it printed something.
fn exit_line(code: i64, output: &str) -> String {
    match output.trim() {
        "" => format!("exit code {code}"),
        said => format!("exit code {code}: {said}"),
    }
}
