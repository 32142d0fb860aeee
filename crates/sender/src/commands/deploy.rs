//! `deploy-sender deploy`: run the library's [`deploy`](crate::deploy::deploy) with progress bars,
//! then print every stage, the final status, the container and how to reach it.

use std::sync::Arc;

use deploy_protocol::api::{DeploymentRecord, StageOutcome};
use deploy_protocol::{DeploymentSpec, ErrorBody, PortProtocol};
use serde::Serialize;

use super::print_json;
use crate::cli::DeployArgs;
use crate::deploy::{deploy, DeployFailure, DeployOutcome};
use crate::store::{PackageInfo, PackageStore};
use crate::terminal::TerminalProgress;
use crate::upload::ReceiverTarget;
use crate::SenderError;

pub(super) async fn run(args: DeployArgs) -> Result<(), SenderError> {
    let request = args.request()?;
    let target = args.receiver.target()?;
    let client = args.receiver.http_client()?;
    let store = PackageStore::open(&args.store.package_dir).await?;
    let docker = crate::docker::connect().await?;
    let bars = Arc::new(TerminalProgress::default());
    let result = deploy(&docker, &store, &client, &target, &request, bars.clone()).await;
    bars.clear();
    match result {
        Ok(outcome) => {
            if args.json {
                print_json(&outcome);
            } else {
                print_success(&outcome, &request.deployment, &target);
            }
            Ok(())
        }
        Err(failure) => {
            if args.json {
                print_json(&FailureJson::of(&failure));
            } else {
                print_failure(&failure);
            }
            Err(failure.into())
        }
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

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

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
