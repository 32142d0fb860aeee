//! `deploy-sender deploy`: its flags and how they become a [`DeployRequest`], running the
//! pipeline's [`deploy`] with progress bars, then printing every stage, the final status, the
//! container and how to reach it.

use std::collections::BTreeMap;
use std::sync::Arc;

use deploy_protocol::api::{DeploymentRecord, StageOutcome};
use deploy_protocol::display::short;
use deploy_protocol::{
    DeploymentSpec, ErrorBody, HealthCheckKind, HealthCheckSpec, PortMapping, PortProtocol,
    RestartPolicy,
};
use serde::Serialize;

use super::image::{parse_key_value, ImageSourceArgs};
use super::rollout::RolloutArgs;
use super::terminal::{print_json, TerminalProgress};
use crate::client::{ReceiverTarget, RetryPolicy};
use crate::config::{EventsConfig, ReceiverConfig, StoreConfig};
use crate::pipeline::{
    default_container_name, deploy, deploy_release, DeployFailure, DeployOutcome, DeployRequest,
    FrontDoor, LayerFate, PackageInfo, PackageParts, PackageStore, ReleaseOutcome, TransferMode,
};
use crate::SenderError;

/// `deploy-sender deploy`: build (or take) an image, package it, send it to a receiver's
/// `/deployment/full`, and wait until the new container is healthy or rolled back.
#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// The image to deploy.
    #[command(flatten)]
    pub(crate) source: ImageSourceArgs,
    /// Container name on the receiver; a container of that name is replaced (default: the image
    /// name's last component, `registry/team/web:v1` -> `web`).
    #[arg(long, env = "DEPLOY_CONTAINER_NAME")]
    pub(crate) name: Option<String>,
    /// Published port `[host_ip:]host:container[/tcp|udp]`, or `container` for any host port
    /// (repeatable).
    #[arg(long = "port", env = "DEPLOY_PORTS", value_delimiter = ',')]
    pub(crate) ports: Vec<PortMapping>,
    /// Environment variable `KEY=VALUE` for the container (repeatable).
    #[arg(long = "env", env = "DEPLOY_ENV", value_parser = parse_key_value)]
    pub(crate) env: Vec<(String, String)>,
    /// Container label `KEY=VALUE` (repeatable; `io.deploy.*` is reserved).
    #[arg(long = "label", env = "DEPLOY_LABEL", value_parser = parse_key_value)]
    pub(crate) labels: Vec<(String, String)>,
    /// Restart policy: no, always, unless-stopped or on-failure.
    #[arg(long, env = "DEPLOY_RESTART", default_value = "unless-stopped", value_parser = parse_restart)]
    pub(crate) restart: RestartPolicy,
    /// Health check: `docker` (the image's HEALTHCHECK), `http:/path` (GET on the published
    /// port until 2xx), `none` (must keep running a few seconds), or `auto` (docker if the image
    /// has a HEALTHCHECK, else none).
    #[arg(long, env = "DEPLOY_HEALTH", default_value = "auto", value_parser = parse_health)]
    pub(crate) health: HealthArg,
    /// For `--health http:/path`: the container port to probe (default: the first --port).
    #[arg(long, env = "DEPLOY_HEALTH_PORT")]
    pub(crate) health_port: Option<u16>,
    /// Seconds to wait for the new container to be healthy before rolling back.
    #[arg(long, env = "DEPLOY_HEALTH_TIMEOUT_SECS", default_value_t = 120.0)]
    pub(crate) health_timeout: f64,
    /// For `--health none` (and `auto` on an image without a HEALTHCHECK): seconds the new
    /// container must keep running to count as healthy (0: as soon as it runs).
    #[arg(long, env = "DEPLOY_SETTLE_SECS", default_value_t = 3.0)]
    pub(crate) settle: f64,
    /// Package store.
    #[command(flatten)]
    pub(crate) store: StoreConfig,
    /// Lifecycle events (BUILD_*, TRANSFER_*, DEPLOYMENT_FAILED), as `serve` records them.
    #[command(flatten)]
    pub(crate) events: EventsConfig,
    /// Receiver and key (`--to` defaults to DEFAULT_RECEIVER_URL).
    #[command(flatten)]
    pub(crate) receiver: ReceiverConfig,
    /// With several receivers: canary, batches, failures tolerated, rollback.
    #[command(flatten)]
    pub(crate) rollout: RolloutArgs,
    /// Correlation id to send (echoed in the receiver's logs, events and record); a rollout to
    /// several receivers sends `<this>.rollout-<rollout id>`, its own.
    #[arg(long, env = "DEPLOY_CORRELATION_ID", value_parser = parse_correlation_id)]
    pub(crate) correlation_id: Option<String>,
    /// Print the outcome (package, transfer, deployment record) as JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub(crate) json: bool,
    /// Send the whole image as one v1 package to `/deployment/full` (as before protocol v2),
    /// instead of only the layers the target lacks.
    #[arg(long, env = "DEPLOY_FULL")]
    pub(crate) full: bool,
    /// Command overriding the image's CMD, after `--`: `deploy ... -- /bin/app --serve`.
    #[arg(last = true)]
    pub(crate) command: Vec<String>,
}

/// A parsed `--health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthArg {
    /// Which check.
    pub(crate) kind: HealthCheckKind,
    /// The path, for `http:/path`.
    pub(crate) path: Option<String>,
}

/// Parses `docker`, `none`, `auto` or `http:/path`.
pub(crate) fn parse_health(s: &str) -> Result<HealthArg, String> {
    let kind = match s {
        "docker" => HealthCheckKind::Docker,
        "none" => HealthCheckKind::None,
        "auto" => HealthCheckKind::Auto,
        _ => {
            return match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(HealthArg {
                    kind: HealthCheckKind::Http,
                    path: Some(path.to_owned()),
                }),
                _ => Err(format!(
                    "{s:?} is not a health check: use docker, none, auto or http:/path"
                )),
            }
        }
    };
    Ok(HealthArg { kind, path: None })
}

/// A correlation id as receivers take it (1 to 128 printable ASCII characters, no spaces): a
/// receiver replaces any other with one of its own, and a rollout could then not find its
/// deployments in the receivers' journals.
pub(crate) fn parse_correlation_id(s: &str) -> Result<String, String> {
    if deploy_protocol::envelope::is_valid_correlation_id(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a correlation id: use 1 to 128 printable ASCII characters, no spaces"
        ))
    }
}

/// Parses a Docker restart policy name.
pub(crate) fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    match s {
        "no" => Ok(RestartPolicy::No),
        "always" => Ok(RestartPolicy::Always),
        "unless-stopped" => Ok(RestartPolicy::UnlessStopped),
        "on-failure" => Ok(RestartPolicy::OnFailure),
        _ => Err(format!(
            "{s:?} is not a restart policy: use no, always, unless-stopped or on-failure"
        )),
    }
}

impl DeployArgs {
    /// The library request these flags describe.
    pub(crate) fn request(&self) -> Result<DeployRequest, SenderError> {
        let package = PackageParts {
            container_name: self.name.clone(),
            max_package_size: Some(self.store.max_package_size),
            ..self.source.parts()
        }
        .request(FrontDoor::Cli)?;
        let container_name = package
            .container_name
            .clone()
            .unwrap_or_else(|| default_container_name(package.source.reference()));
        let deployment = DeploymentSpec {
            container_name,
            image: None,
            ports: self.ports.clone(),
            env: self.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            command: (!self.command.is_empty()).then(|| self.command.clone()),
            labels: self.labels.iter().cloned().collect(),
            restart_policy: self.restart,
            health_check: HealthCheckSpec {
                kind: self.health.kind,
                path: self.health.path.clone(),
                port: self.health_port,
                deadline_secs: self.health_timeout,
                settle_secs: self.settle,
                ..HealthCheckSpec::default()
            },
            ..DeploymentSpec::default()
        };
        Ok(DeployRequest {
            package,
            deployment,
            correlation_id: self.correlation_id.clone(),
        })
    }
}

pub(super) async fn run(args: DeployArgs) -> Result<(), SenderError> {
    let request = args.request()?;
    let client = args.receiver.client()?;
    let docker = crate::pipeline::connect_docker().await?;
    let bars = Arc::new(TerminalProgress::default());
    let events = args.events.open(&args.store.package_dir).await?;
    if !args.full {
        let cache = args.store.open_layer_cache().await?;
        let policy = RetryPolicy::default();
        let calls = client.release_calls(request.correlation_id.as_deref(), &policy);
        let result = deploy_release(&docker, &cache, calls, &request, bars.clone(), &events).await;
        bars.clear();
        events.close().await;
        return report(args.json, result, |outcome| {
            print_release(outcome, &request.deployment, client.target())
        });
    }
    let store = PackageStore::open(&args.store.package_dir).await?;
    let result = deploy(&docker, &store, &client, &request, bars.clone(), &events).await;
    bars.clear();
    events.close().await;
    // Failed attempts count too: their packages are kept up to PACKAGE_HISTORY as well.
    let made = match &result {
        Ok(outcome) => Some(outcome.package.package_id),
        Err(failure) => failure.package.as_ref().map(|p| p.package_id),
    };
    if let Some(id) = made {
        args.store.retain(&store, id).await;
    }
    report(args.json, result, |outcome| {
        print_success(outcome, &request.deployment, client.target())
    })
}

/// Prints a deployment's outcome (one JSON document with `json`, else `print`'s text) or its
/// failure, and returns the failure as the command's error.
fn report<T: Serialize>(
    json: bool,
    result: Result<T, DeployFailure>,
    print: impl FnOnce(&T),
) -> Result<(), SenderError> {
    match result {
        Ok(outcome) => {
            if json {
                print_json(&outcome);
            } else {
                print(&outcome);
            }
            Ok(())
        }
        Err(failure) => {
            if json {
                print_json(&FailureJson::of(&failure));
            } else {
                print_failure(&failure);
            }
            Err(failure.into())
        }
    }
}

fn print_release(outcome: &ReleaseOutcome, spec: &DeploymentSpec, target: &ReceiverTarget) {
    let prep = &outcome.prepare;
    if outcome.mode == TransferMode::Stream {
        println!(
            "image      {} {} ({} layers, streamed whole: a cold host)",
            outcome
                .image_tags
                .first()
                .map_or(outcome.image_id.as_str(), String::as_str),
            short(&outcome.image_id),
            outcome.totals.layers,
        );
        println!("transfer   {}", outcome.summary);
        if let Some(record) = &outcome.deployment {
            print_stages(None, Some(record));
            print_running(record, spec, target);
        }
        return;
    }
    println!(
        "image      {} {} ({} layers: {} compressed now, {} from the layer cache{})",
        outcome
            .image_tags
            .first()
            .map_or(outcome.image_id.as_str(), String::as_str),
        short(&outcome.image_id),
        outcome.layers.len(),
        prep.compressed_layers,
        prep.cached_layers,
        if prep.exported {
            ""
        } else {
            ", no docker save"
        }
    );
    for layer in &outcome.layers {
        println!(
            "layer      {} {:>10.2} MB  {}",
            short(&layer.diff_id),
            layer.size as f64 / 1e6,
            match layer.fate {
                LayerFate::Resumed if layer.resumed_from > 0 =>
                    format!("resumed from {:.2} MB", layer.resumed_from as f64 / 1e6),
                fate => fate.as_str().to_owned(),
            }
        );
    }
    println!("transfer   {}", outcome.summary);
    let Some(record) = &outcome.deployment else {
        return;
    };
    print_stages(None, Some(record));
    print_running(record, spec, target);
}

/// The lines of a deployment that succeeded: what runs, its container, and where to reach it.
fn print_running(record: &DeploymentRecord, spec: &DeploymentSpec, target: &ReceiverTarget) {
    println!(
        "status     SUCCEEDED: {} runs {} (deployment {})",
        record.container_name, record.image, record.deployment_id
    );
    if let Some(id) = &record.container_id {
        let replaced = record
            .previous_container_id
            .as_deref()
            .map(|p| format!(", replaced {}", short(p)))
            .unwrap_or_default();
        println!("container  {}{replaced}", short(id));
    }
    let host = target.base_url.host_str().unwrap_or("localhost");
    for line in reach(spec, host) {
        println!("reach it   {line}");
    }
}

/// What `--json` prints on failure: the error body of the protocol, plus what got done.
#[derive(Serialize)]
struct FailureJson<'a> {
    #[serde(flatten)]
    error: ErrorBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    package: Option<&'a PackageInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deployment: Option<&'a DeploymentRecord>,
}

impl<'a> FailureJson<'a> {
    fn of(failure: &'a DeployFailure) -> Self {
        Self {
            error: ErrorBody::new(failure.code(), failure.to_string(), None),
            package: failure.package.as_ref(),
            deployment: failure.deployment(),
        }
    }
}

fn print_success(outcome: &DeployOutcome, spec: &DeploymentSpec, target: &ReceiverTarget) {
    let record = &outcome.deployment;
    print_package(&outcome.package);
    print_stages(Some(&outcome.package), Some(record));
    print_running(record, spec, target);
}

fn print_failure(failure: &DeployFailure) {
    if let Some(package) = &failure.package {
        print_package(package);
    }
    if failure.package.is_some() || failure.deployment().is_some() {
        print_stages(failure.package.as_ref(), failure.deployment());
    }
    if let Some(record) = failure.deployment() {
        let status = serde_json::to_value(record.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "status     {status}: {} (deployment {})",
            record.container_name, record.deployment_id
        );
    }
}

fn print_package(p: &PackageInfo) {
    println!(
        "package    {} {} {:.2} MB ({} from {:.2} MB, {:.1}% smaller)",
        p.package_id,
        p.image_tags
            .first()
            .map_or(p.image_id.as_str(), String::as_str),
        p.package_size_mb,
        p.compression,
        p.original_size as f64 / 1e6,
        p.compression_ratio * 100.0
    );
}

/// The sender's stages (build, export) then the receiver's, one line each.
fn print_stages(package: Option<&PackageInfo>, record: Option<&DeploymentRecord>) {
    println!("stage      outcome   duration  detail");
    if let Some(p) = package {
        if p.build_duration_ms > 0 {
            println!("{:<10} {:<8} {:>6} ms", "build", "ok", p.build_duration_ms);
        }
        let export = format!(
            "docker save + {} + BLAKE3, {} -> {} bytes",
            p.compression, p.original_size, p.package_size
        );
        println!(
            "{:<10} {:<8} {:>6} ms  {export}",
            "export", "ok", p.export_duration_ms
        );
    }
    for stage in record.map(|r| r.stages.as_slice()).unwrap_or_default() {
        let name = serde_json::to_value(stage.stage)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let outcome = match stage.outcome {
            StageOutcome::Ok => "ok",
            StageOutcome::Failed => "FAILED",
            StageOutcome::Skipped => "skipped",
        };
        println!(
            "{name:<10} {outcome:<8} {:>6} ms  {}",
            stage.duration_ms,
            stage.detail.as_deref().unwrap_or_default()
        );
    }
}

/// How to reach each published port: the host IP it is bound to, or the receiver's host.
fn reach(spec: &DeploymentSpec, receiver_host: &str) -> Vec<String> {
    spec.ports
        .iter()
        .map(|p| {
            let host = match p.host_ip.as_deref() {
                None | Some("0.0.0.0") | Some("::") | Some("") => receiver_host,
                Some(ip) => ip,
            };
            match (p.host_port, p.protocol) {
                (Some(port), PortProtocol::Tcp) => format!("http://{host}:{port}/"),
                (Some(port), PortProtocol::Udp) => format!("udp {host}:{port}"),
                (None, protocol) => format!(
                    "container port {}/{} on a host port Docker chose (docker port {})",
                    p.container_port,
                    protocol.as_str(),
                    spec.container_name
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::ImageSource;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<DeployArgs, clap::Error> {
        let cli = Cli::try_parse_from([&["deploy-sender", "deploy"], args].concat())?;
        match cli.command {
            Command::Deploy(args) => Ok(*args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn deploy_from_a_dockerfile_with_every_spec_flag() {
        let args = parse(&[
            "--dockerfile",
            "D",
            "--context",
            ".",
            "--tag",
            "registry:5000/team/web:v2",
            "--to",
            "http://127.0.0.1:8001",
            "--port",
            "8080:80",
            "--port",
            "127.0.0.1:9090:90/udp",
            "--env",
            "MODE=prod",
            "--label",
            "team=a",
            "--health",
            "http:/healthz",
            "--health-timeout",
            "30",
            "--restart",
            "always",
            "--compression",
            "gzip",
            "--",
            "/bin/app",
            "--serve",
        ])
        .expect("valid");
        let request = args.request().expect("a request");
        let spec = &request.deployment;
        assert_eq!(spec.container_name, "web");
        assert_eq!(spec.ports.len(), 2);
        assert_eq!(spec.ports[1].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(spec.env["MODE"], "prod");
        assert_eq!(spec.labels["team"], "a");
        assert_eq!(spec.restart_policy, RestartPolicy::Always);
        assert_eq!(spec.health_check.kind, HealthCheckKind::Http);
        assert_eq!(spec.health_check.path.as_deref(), Some("/healthz"));
        assert_eq!(spec.health_check.deadline_secs, 30.0);
        assert_eq!(
            spec.command.as_deref(),
            Some(&["/bin/app".to_owned(), "--serve".to_owned()][..])
        );
        assert_eq!(
            request.package.compression.compression,
            deploy_protocol::Compression::Gzip
        );
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn deploy_needs_exactly_one_source_and_valid_flags() {
        assert!(parse(&["--name", "web"]).is_err(), "no source");
        assert!(parse(&[
            "--image",
            "a:b",
            "--dockerfile",
            "D",
            "--context",
            ".",
            "--tag",
            "a:b"
        ])
        .is_err());
        assert!(parse(&["--image", "a:b", "--port", "x:80"]).is_err());
        assert!(parse(&["--image", "a:b", "--health", "http:healthz"]).is_err());
        assert!(parse(&["--image", "a:b", "--restart", "sometimes"]).is_err());
        let args = parse(&["--image", "web:v1", "--name", "front"]).expect("valid");
        let request = args.request().expect("request");
        assert_eq!(request.deployment.container_name, "front");
        assert_eq!(request.deployment.health_check.kind, HealthCheckKind::Auto);
        assert_eq!(request.deployment.health_check.settle_secs, 3.0);
        let quick = parse(&["--image", "web:v1", "--health", "none", "--settle", "0"]);
        let quick = quick.expect("valid").request().expect("request");
        assert_eq!(quick.deployment.health_check.settle_secs, 0.0);
        assert_eq!(
            request.package.source,
            ImageSource::Existing("web:v1".into())
        );
    }

    #[test]
    fn a_build_is_named_by_the_same_rule_as_in_the_api() {
        let tag_of = |flags: &[&str]| {
            let request = parse(flags).expect("flags").request().expect("request");
            match request.package.source {
                ImageSource::Build(spec) => (spec.tag, spec.dockerfile, request.deployment),
                other => panic!("{other:?}"),
            }
        };
        let (tag, dockerfile, deployment) =
            tag_of(&["--context", "app", "--tag", "1.0", "--name", "web"]);
        assert_eq!(tag, "web:1.0");
        assert_eq!(dockerfile, std::path::PathBuf::from("Dockerfile"));
        assert_eq!(deployment.container_name, "web");
        assert_eq!(
            tag_of(&["--context", "app", "--name", "web"]).0,
            "web:latest"
        );
        let (tag, _, deployment) = tag_of(&["--context", "app", "--tag", "reg.io/team/api:2"]);
        assert_eq!(tag, "reg.io/team/api:2");
        assert_eq!(deployment.container_name, "api");
        let bare = parse(&["--context", "app", "--tag", "1.0"]).expect("flags");
        let err = bare
            .request()
            .expect_err("a bare tag needs --name")
            .to_string();
        assert!(err.contains("--tag") && err.contains("--name"), "{err}");
    }

    #[test]
    fn published_ports_are_reached_on_their_bound_ip_or_the_receivers_host() {
        let spec = DeploymentSpec {
            container_name: "web".into(),
            ports: vec![
                "127.0.0.1:8080:80".parse().expect("port"),
                "9090:90".parse().expect("port"),
                "53/udp".parse().expect("port"),
            ],
            ..DeploymentSpec::default()
        };
        let lines = reach(&spec, "192.168.86.200");
        assert_eq!(lines[0], "http://127.0.0.1:8080/");
        assert_eq!(lines[1], "http://192.168.86.200:9090/");
        assert!(lines[2].contains("53/udp"), "{}", lines[2]);
    }
}
