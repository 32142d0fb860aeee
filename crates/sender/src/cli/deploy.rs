//! `deploy-sender deploy`: its flags, and how they become a [`DeployRequest`].

use std::collections::BTreeMap;

use deploy_protocol::{
    Compression, DeploymentSpec, HealthCheckKind, HealthCheckSpec, PortMapping, RestartPolicy,
};

use super::{parse_key_value, ImageSourceArgs, RolloutArgs};
use crate::config::{ReceiverConfig, StoreConfig};
use crate::deploy::DeployRequest;
use crate::package::{default_container_name, ImageSource, PackageRequest};
use crate::sink::{default_zstd_workers, CompressionOptions};
use crate::SenderError;

/// `deploy-sender deploy`: build (or take) an image, package it, send it to a receiver's
/// `/deployment/full`, and wait until the new container is healthy or rolled back.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The image to deploy.
    #[command(flatten)]
    pub source: ImageSourceArgs,
    /// Container name on the receiver; a container of that name is replaced (default: the image
    /// name's last component, `registry/team/web:v1` -> `web`).
    #[arg(long, env = "DEPLOY_CONTAINER_NAME")]
    pub name: Option<String>,
    /// Published port `[host_ip:]host:container[/tcp|udp]`, or `container` for any host port
    /// (repeatable).
    #[arg(long = "port", env = "DEPLOY_PORTS", value_delimiter = ',')]
    pub ports: Vec<PortMapping>,
    /// Environment variable `KEY=VALUE` for the container (repeatable).
    #[arg(long = "env", env = "DEPLOY_ENV", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Container label `KEY=VALUE` (repeatable; `io.deploy.*` is reserved).
    #[arg(long = "label", env = "DEPLOY_LABEL", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Restart policy: no, always, unless-stopped or on-failure.
    #[arg(long, env = "DEPLOY_RESTART", default_value = "unless-stopped", value_parser = parse_restart)]
    pub restart: RestartPolicy,
    /// Health check: `docker` (the image's HEALTHCHECK), `http:/path` (GET on the published
    /// port until 2xx), `none` (must keep running a few seconds), or `auto` (docker if the image
    /// has a HEALTHCHECK, else none).
    #[arg(long, env = "DEPLOY_HEALTH", default_value = "auto", value_parser = parse_health)]
    pub health: HealthArg,
    /// For `--health http:/path`: the container port to probe (default: the first --port).
    #[arg(long, env = "DEPLOY_HEALTH_PORT")]
    pub health_port: Option<u16>,
    /// Seconds to wait for the new container to be healthy before rolling back.
    #[arg(long, env = "DEPLOY_HEALTH_TIMEOUT_SECS", default_value_t = 120.0)]
    pub health_timeout: f64,
    /// Compression: zstd, gzip or none.
    #[arg(long, env = "DEPLOY_COMPRESSION", default_value = "zstd")]
    pub compression: Compression,
    /// Compression level: gzip 1-9 (default 1), zstd 1-19 (default 3).
    #[arg(long, env = "DEPLOY_COMPRESSION_LEVEL")]
    pub level: Option<i32>,
    /// zstd worker threads (default: one per core; 0 compresses on the calling thread).
    #[arg(long, env = "DEPLOY_ZSTD_WORKERS")]
    pub zstd_workers: Option<u32>,
    /// Package store.
    #[command(flatten)]
    pub store: StoreConfig,
    /// Receiver and key (`--to` defaults to DEFAULT_RECEIVER_URL).
    #[command(flatten)]
    pub receiver: ReceiverConfig,
    /// With several receivers: canary, batches, failures tolerated, rollback.
    #[command(flatten)]
    pub rollout: RolloutArgs,
    /// Correlation id to send (echoed in the receiver's logs, events and record).
    #[arg(long, env = "DEPLOY_CORRELATION_ID")]
    pub correlation_id: Option<String>,
    /// Print the outcome (package, transfer, deployment record) as JSON.
    #[arg(long, env = "DEPLOY_JSON")]
    pub json: bool,
    /// Command overriding the image's CMD, after `--`: `deploy ... -- /bin/app --serve`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// A parsed `--health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthArg {
    /// Which check.
    pub kind: HealthCheckKind,
    /// The path, for `http:/path`.
    pub path: Option<String>,
}

/// Parses `docker`, `none`, `auto` or `http:/path`.
pub fn parse_health(s: &str) -> Result<HealthArg, String> {
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

/// Parses a Docker restart policy name.
pub fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
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
    pub fn request(&self) -> Result<DeployRequest, SenderError> {
        let source = self.source.source()?;
        let container_name = match (&self.name, &source) {
            (Some(name), _) => name.clone(),
            (None, ImageSource::Build(spec)) => default_container_name(&spec.tag),
            (None, ImageSource::Existing(image)) => default_container_name(image),
        };
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
                ..HealthCheckSpec::default()
            },
            ..DeploymentSpec::default()
        };
        let mut package = PackageRequest::new(source);
        package.compression = CompressionOptions {
            compression: self.compression,
            level: self.level,
            zstd_workers: self.zstd_workers.unwrap_or_else(default_zstd_workers),
        };
        package.max_package_size = self.store.max_package_size;
        Ok(DeployRequest {
            package,
            deployment,
            correlation_id: self.correlation_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
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
        assert_eq!(request.package.compression.compression, Compression::Gzip);
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
        assert_eq!(
            request.package.source,
            ImageSource::Existing("web:v1".into())
        );
    }
}
