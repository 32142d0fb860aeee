//! The deployment spec: what container to run from a loaded image, and how to judge it healthy.
//!
//! Fields that reach past the container (privileged mode, host mounts, host networking, added
//! capabilities, devices) are part of the spec so that a receiver can refuse them by name; a
//! receiver allows each only when its own configuration says so.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{is_valid_container_name, is_valid_image_reference};

/// What to run and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Container name; a running container of this name is replaced.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
    )]
    pub container_name: String,
    /// Image reference to run (`name:tag` or an image id). For `/deployment/full` it defaults to
    /// the manifest's first image tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Command overriding the image's `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Extra container labels (keys under `io.deploy.` are reserved for the receiver).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// How to decide the new container is healthy.
    #[serde(default)]
    pub health_check: HealthCheckSpec,
    /// Run privileged. Refused unless the receiver allows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Host paths to mount (`/host:/container[:ro]`). Refused unless the receiver allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<String>,
    /// Docker network mode (`bridge` is the default; `host` is refused unless allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// Capabilities to add. Refused unless the receiver allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Host devices to map. Refused unless the receiver allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Replace a container of this name that the receiver did not create (one without its
    /// labels). Without it such a container is left alone and the deployment refused (409).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt_existing: bool,
}

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port inside the container (1-65535).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub container_port: u16,
    /// Port on the host (1-65535); absent = Docker picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub host_port: Option<u16>,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: PortProtocol,
    /// Host address to bind; absent = all addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

impl std::str::FromStr for PortMapping {
    type Err = String;

    /// Parses the CLI form `[host_ip:]host:container[/proto]` or `container[/proto]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (spec, protocol) = match s.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, PortProtocol::Tcp),
            Some((spec, "udp")) => (spec, PortProtocol::Udp),
            Some((_, other)) => {
                return Err(format!("unknown port protocol {other:?}: use tcp or udp"))
            }
            None => (s, PortProtocol::Tcp),
        };
        let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("invalid port {p:?} in {s:?}"))
        };
        let (host_ip, host_port, container_port) = match parts.as_slice() {
            [c] => (None, None, port(c)?),
            [c, h] => (None, Some(port(h)?), port(c)?),
            [c, h, ip] => (Some((*ip).to_owned()), Some(port(h)?), port(c)?),
            _ => return Err(format!("invalid port mapping {s:?}")),
        };
        Ok(Self {
            container_port,
            host_port,
            protocol,
            host_ip,
        })
    }
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl PortProtocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
}

/// Docker restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    No,
    /// Always restart.
    Always,
    /// Restart unless stopped by hand (default: survives host reboots).
    #[default]
    UnlessStopped,
    /// Restart when the process exits non-zero.
    OnFailure,
}

impl RestartPolicy {
    /// Docker's name of the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
}

/// Which health check to apply to a new container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    /// `docker` when the image has a HEALTHCHECK, else `none`.
    #[default]
    Auto,
    /// Wait for Docker's own health status (the image's HEALTHCHECK) to be `healthy`.
    Docker,
    /// Probe an HTTP path on a published port until it answers 2xx.
    Http,
    /// The container must stay running for the settle period.
    None,
}

/// Health-check parameters. Durations are in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSpec {
    /// Which check.
    pub kind: HealthCheckKind,
    /// For `http`: the path to probe (`/healthz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For `http`: the container port to probe (its published host port is used; it must be
    /// published for TCP); defaults to the lowest published TCP port. Required on host
    /// networking, where it is probed on loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65535))]
    pub port: Option<u16>,
    /// Seconds between probes (0.05 to 3600): `http` probes, and for `docker` the receiver's own
    /// runs of the image's check while Docker still reports `starting` (the first right after
    /// the start; the first pass counts as healthy).
    #[cfg_attr(feature = "openapi", schema(minimum = 0.05, maximum = 3600))]
    pub interval_secs: f64,
    /// Seconds one probe may take (0.05 to 3600).
    #[cfg_attr(feature = "openapi", schema(minimum = 0.05, maximum = 3600))]
    pub timeout_secs: f64,
    /// Failed probes (after the start period) before the container is judged unhealthy.
    pub retries: u32,
    /// Seconds after start during which failures do not count (0 to 3600).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 3600))]
    pub start_period_secs: f64,
    /// For `none` (and `auto` without a HEALTHCHECK): seconds the container must keep running
    /// (0 to 3600).
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 3600))]
    pub settle_secs: f64,
    /// Upper bound on the whole wait, in seconds (0.05 to 3600).
    #[cfg_attr(feature = "openapi", schema(minimum = 0.05, maximum = 3600))]
    pub deadline_secs: f64,
}

// f64 fields: equality is exact comparison of configured values, which is what a spec needs.
impl Eq for HealthCheckSpec {}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            kind: HealthCheckKind::Auto,
            path: None,
            port: None,
            interval_secs: 1.0,
            timeout_secs: 3.0,
            retries: 3,
            start_period_secs: 0.0,
            settle_secs: 3.0,
            deadline_secs: 120.0,
        }
    }
}

impl DeploymentSpec {
    /// Checks names, references and numbers; policy (privileged etc.) is the receiver's to judge.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_container_name(&self.container_name) {
            return Err(format!(
                "container_name {:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]{{0,127}}",
                self.container_name
            ));
        }
        if let Some(image) = &self.image {
            let is_id = image
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !is_id && !is_valid_image_reference(image) {
                return Err(format!(
                    "image {image:?} is neither name:tag nor sha256:<id>"
                ));
            }
        }
        for (key, value) in &self.env {
            if key.is_empty()
                || key.len() > 256
                || key.contains('=')
                || key.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(format!(
                    "invalid environment variable name {key:?}: 1 to 256 characters, no '=', no whitespace or control characters"
                ));
            }
            if value.contains('\0') {
                return Err(format!(
                    "the value of environment variable {key} contains a NUL byte"
                ));
            }
        }
        let has_nul = |s: &String| s.contains('\0');
        if self.labels.iter().any(|(k, v)| has_nul(k) || has_nul(v))
            || self.command.iter().flatten().any(has_nul)
        {
            return Err("labels and command must not contain NUL bytes".into());
        }
        if self.labels.keys().any(|k| k.starts_with("io.deploy.")) {
            return Err("labels under io.deploy. are reserved for the receiver".into());
        }
        let ports = self
            .ports
            .iter()
            .flat_map(|p| [Some(p.container_port), p.host_port]);
        if ports.chain([self.health_check.port]).any(|p| p == Some(0)) {
            return Err(
                "port 0 is not a port: ports are 1-65535 (leave host_port out to let Docker pick one)"
                    .into(),
            );
        }
        let h = &self.health_check;
        let durations = [
            h.interval_secs,
            h.timeout_secs,
            h.start_period_secs,
            h.settle_secs,
            h.deadline_secs,
        ];
        if durations
            .iter()
            .any(|d| !d.is_finite() || *d < 0.0 || *d > 3600.0)
        {
            return Err("health-check durations must be between 0 and 3600 seconds".into());
        }
        if h.interval_secs < 0.05 || h.timeout_secs < 0.05 || h.deadline_secs < 0.05 {
            return Err(
                "health-check interval, timeout and deadline must be at least 0.05 s".into(),
            );
        }
        if h.kind == HealthCheckKind::Http {
            if !h.path.as_deref().is_some_and(|p| p.starts_with('/')) {
                return Err("an http health check needs a path starting with '/'".into());
            }
            self.http_check_port()?;
        }
        Ok(())
    }

    /// An http check probes a port it can reach: on host networking the container's own `port`
    /// (which must be given); otherwise a published TCP port (`port`'s mapping when given).
    fn http_check_port(&self) -> Result<(), String> {
        let wanted = self.health_check.port;
        if self.network_mode.as_deref() == Some("host") {
            return match wanted {
                Some(_) => Ok(()),
                None => Err(
                    "an http health check on host networking needs `port`: the container's port to probe"
                        .into(),
                ),
            };
        }
        let published = self.ports.iter().any(|p| {
            p.protocol == PortProtocol::Tcp && wanted.is_none_or(|w| w == p.container_port)
        });
        match (published, wanted) {
            (true, _) => Ok(()),
            (false, Some(w)) => Err(format!(
                "the http health check's port {w}/tcp is not published: add it to `ports` (the check probes its published host port)"
            )),
            (false, None) => Err(
                "an http health check needs a published TCP port: the check probes its host port"
                    .into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mapping_forms() {
        let p: PortMapping = "8080:80".parse().expect("parses");
        assert_eq!(
            (p.host_port, p.container_port, p.protocol),
            (Some(8080), 80, PortProtocol::Tcp)
        );
        let p: PortMapping = "127.0.0.1:8080:80/udp".parse().expect("parses");
        assert_eq!(p.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(p.protocol, PortProtocol::Udp);
        let p: PortMapping = "80".parse().expect("parses");
        assert_eq!(p.host_port, None);
        assert!("x:80".parse::<PortMapping>().is_err());
        assert!("80/sctp".parse::<PortMapping>().is_err());
    }

    #[test]
    fn spec_validation() {
        let mut spec = DeploymentSpec {
            container_name: "web".into(),
            ..Default::default()
        };
        assert!(spec.validate().is_ok());
        spec.labels
            .insert("io.deploy.package_id".into(), "x".into());
        assert!(spec.validate().is_err());
        spec.labels.clear();
        spec.health_check.kind = HealthCheckKind::Http;
        assert!(spec.validate().is_err(), "http without path");
        spec.health_check.path = Some("/".into());
        assert!(spec.validate().is_err(), "http without port");
        spec.ports.push("8080:80".parse().expect("port"));
        assert!(spec.validate().is_ok());
        for zero in ["8080:0", "0:80"] {
            let mut spec = spec.clone();
            spec.ports.push(zero.parse().expect("port"));
            assert!(spec.validate().is_err(), "port 0 in {zero}");
        }
        let mut zero = spec.clone();
        zero.health_check.port = Some(0);
        assert!(zero.validate().is_err(), "health-check port 0");
        let json = serde_json::json!({"container_name": "web", "oops": true});
        assert!(serde_json::from_value::<DeploymentSpec>(json).is_err());
    }

    #[test]
    fn an_http_check_must_name_a_port_it_can_reach() {
        let mut spec = DeploymentSpec {
            container_name: "web".into(),
            ..Default::default()
        };
        spec.health_check.kind = HealthCheckKind::Http;
        spec.health_check.path = Some("/healthz".into());
        let error = |spec: &DeploymentSpec| spec.validate().err().unwrap_or_default();
        spec.ports.push("8080:80/udp".parse().expect("port"));
        assert!(
            error(&spec).contains("published TCP port"),
            "{}",
            error(&spec)
        );
        spec.ports.push("9090:90".parse().expect("port"));
        assert_eq!(spec.validate(), Ok(()), "the first TCP port is probed");
        spec.health_check.port = Some(80);
        assert!(
            error(&spec).contains("port 80/tcp is not published"),
            "80 is published for UDP only: {}",
            error(&spec)
        );
        spec.health_check.port = Some(90);
        assert_eq!(spec.validate(), Ok(()));
        // Host networking publishes nothing: the check probes the container's own port.
        spec.network_mode = Some("host".into());
        spec.ports.clear();
        assert_eq!(spec.validate(), Ok(()));
        spec.health_check.port = None;
        assert!(
            error(&spec).contains("host networking needs `port`"),
            "{}",
            error(&spec)
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = serde_json::json!({"container_name": "web", "oops": true});
        assert!(serde_json::from_value::<DeploymentSpec>(json).is_err());
    }
}
