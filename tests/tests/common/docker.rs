//! The real Docker engine in end-to-end tests: the connection, the cleanup guard and busybox
//! images come from the shared test kit (`deploy-testkit`); what is left here is specific to
//! these tests.

use bollard::Docker;
#[allow(unused_imports)] // each test binary uses a different subset
pub use deploy_testkit::docker::{docker, Guard};
#[allow(unused_imports)]
pub use deploy_testkit::images::{build_image, busybox_context, httpd_dockerfile};

/// A guard for one end-to-end test's containers and images.
pub fn host_guard() -> Guard {
    Guard::new("deploy-e2e")
}

/// The host port Docker published for `container`'s port 80/tcp.
pub async fn published_port(docker: &Docker, container: &str) -> u16 {
    let inspect = docker
        .inspect_container(container, None)
        .await
        .expect("inspect container");
    inspect
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|p| p.get("80/tcp").cloned().flatten())
        .and_then(|b| b.first().and_then(|b| b.host_port.clone()))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{container} publishes no host port for 80/tcp"))
}
