//! From a deployment spec to Docker's container config, and the policy that guards the keys that
//! reach past the container (privileged, host mounts, host networking, capabilities, devices).

use std::collections::HashMap;

use bollard::container::Config;
use bollard::models::{
    DeviceMapping, HostConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use deploy_protocol::DeploymentSpec;

use crate::config::Config as ReceiverConfig;
use crate::error::{ReceiverError, Result};

/// Refuses (POLICY_DENIED) every key of `spec` this receiver's configuration does not allow,
/// naming each with the flag that would allow it. Called before anything is touched.
pub fn check_policy(config: &ReceiverConfig, spec: &DeploymentSpec) -> Result<()> {
    let network = spec
        .network_mode
        .as_deref()
        .filter(|m| !matches!(*m, "" | "default" | "bridge"));
    let asks = [
        (
            spec.privileged,
            config.allow_privileged,
            "privileged",
            "ALLOW_PRIVILEGED",
        ),
        (
            !spec.binds.is_empty(),
            config.allow_host_mounts,
            "binds (host mounts)",
            "ALLOW_HOST_MOUNTS",
        ),
        (
            network.is_some(),
            config.allow_host_network,
            "network_mode other than bridge",
            "ALLOW_HOST_NETWORK",
        ),
        (
            !spec.cap_add.is_empty(),
            config.allow_cap_add,
            "cap_add",
            "ALLOW_CAP_ADD",
        ),
        (
            !spec.devices.is_empty(),
            config.allow_devices,
            "devices",
            "ALLOW_DEVICES",
        ),
    ];
    let denied: Vec<String> = asks
        .iter()
        .filter(|(asked, allowed, _, _)| *asked && !*allowed)
        .map(|(_, _, key, flag)| format!("{key} (allowed by {flag})"))
        .collect();
    if denied.is_empty() {
        return Ok(());
    }
    Err(ReceiverError::PolicyDenied(format!(
        "this receiver's policy does not allow {} for container {:?}; nothing was changed",
        denied.join(", "),
        spec.container_name
    )))
}

/// Docker's config for the new container: `spec` plus the receiver's `labels`.
pub fn container_config(
    spec: &DeploymentSpec,
    image: &str,
    labels: HashMap<String, String>,
) -> Result<Config<String>> {
    let mut all_labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all_labels.extend(labels);
    let mut exposed = HashMap::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &spec.ports {
        let key = format!("{}/{}", port.container_port, port.protocol.as_str());
        exposed.insert(key.clone(), HashMap::new());
        bindings
            .entry(key)
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: port.host_ip.clone(),
                // Empty: Docker picks a free port.
                host_port: Some(port.host_port.map(|p| p.to_string()).unwrap_or_default()),
            });
    }
    let devices = spec
        .devices
        .iter()
        .map(|d| device_mapping(d))
        .collect::<Result<Vec<_>>>()?;
    let restart = match spec.restart_policy {
        deploy_protocol::RestartPolicy::No => RestartPolicyNameEnum::NO,
        deploy_protocol::RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
        deploy_protocol::RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        deploy_protocol::RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
    };
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Ok(Config {
        image: Some(image.to_owned()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        cmd: spec.command.clone(),
        labels: Some(all_labels),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            restart_policy: Some(RestartPolicy {
                name: Some(restart),
                maximum_retry_count: None,
            }),
            privileged: spec.privileged.then_some(true),
            binds: non_empty(&spec.binds),
            network_mode: spec.network_mode.clone(),
            cap_add: non_empty(&spec.cap_add),
            devices: (!devices.is_empty()).then_some(devices),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// `/dev/host[:/dev/container[:rwm]]`.
fn device_mapping(spec: &str) -> Result<DeviceMapping> {
    let mut parts = spec.splitn(3, ':');
    let host = parts.next().filter(|p| p.starts_with('/')).ok_or_else(|| {
        ReceiverError::Validation(format!(
            "device {spec:?} must be /dev/host[:/dev/container[:rwm]]"
        ))
    })?;
    let inside = parts.next().unwrap_or(host);
    let permissions = parts.next().unwrap_or("rwm");
    Ok(DeviceMapping {
        path_on_host: Some(host.to_owned()),
        path_in_container: Some(inside.to_owned()),
        cgroup_permissions: Some(permissions.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeploymentSpec {
        DeploymentSpec {
            container_name: "web".into(),
            ..Default::default()
        }
    }

    #[test]
    fn policy_names_every_denied_key_and_its_flag() {
        let mut config = ReceiverConfig::for_dir("/tmp/x", "k");
        assert!(check_policy(&config, &spec()).is_ok());
        let mut risky = spec();
        risky.privileged = true;
        risky.binds = vec!["/etc:/host-etc:ro".into()];
        risky.network_mode = Some("host".into());
        let message = check_policy(&config, &risky)
            .expect_err("denied")
            .to_string();
        for needle in ["privileged", "ALLOW_HOST_MOUNTS", "ALLOW_HOST_NETWORK"] {
            assert!(message.contains(needle), "{message}");
        }
        config.allow_privileged = true;
        config.allow_host_mounts = true;
        config.allow_host_network = true;
        assert!(check_policy(&config, &risky).is_ok());
        let mut bridge = spec();
        bridge.network_mode = Some("bridge".into());
        assert!(check_policy(&ReceiverConfig::for_dir("/tmp/x", "k"), &bridge).is_ok());
    }

    #[test]
    fn ports_env_and_labels_reach_the_config() {
        let mut s = spec();
        s.ports = vec![
            "127.0.0.1:8080:80".parse().expect("port"),
            "53/udp".parse().expect("port"),
        ];
        s.env.insert("A".into(), "1".into());
        s.labels.insert("team".into(), "web".into());
        let labels = HashMap::from([("io.deploy.managed".to_owned(), "true".to_owned())]);
        let config = container_config(&s, "web:v1", labels).expect("config");
        let host = config.host_config.expect("host config");
        let bindings = host.port_bindings.expect("bindings");
        let tcp = bindings["80/tcp"].as_ref().expect("80")[0].clone();
        assert_eq!(
            (tcp.host_ip.as_deref(), tcp.host_port.as_deref()),
            (Some("127.0.0.1"), Some("8080"))
        );
        assert_eq!(
            bindings["53/udp"].as_ref().expect("53")[0]
                .host_port
                .as_deref(),
            Some("")
        );
        assert_eq!(config.env, Some(vec!["A=1".to_owned()]));
        let labels = config.labels.expect("labels");
        assert_eq!(
            (
                labels["team"].as_str(),
                labels["io.deploy.managed"].as_str()
            ),
            ("web", "true")
        );
        assert_eq!(host.privileged, None);
    }
}
